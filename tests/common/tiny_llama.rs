//! The tiny llama-architecture GGUF the llama.cpp tests run on, written by
//! gguf-py (`crates/evod-llama/tests/py/tiny_llama.py`: 3 layers of width
//! 32 with F32 weights and a small vocabulary unless told otherwise; its
//! `nll` command is the numpy reference forward pass), and a corpus for
//! it. Shared by `crates/evod-llama/tests/runtime.rs`, `tests/llm.rs` and
//! `tests/docker_llm.rs` (each includes this file with `#[path]`).
//!
//! The Python is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (`cargo xtask venv`).

#![allow(dead_code)] // Each test file uses a different subset.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter with gguf-py and numpy.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EVOD_PYTHON") {
        return p.into();
    }
    // Every crate of the workspace is two folders below its root.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no python with gguf-py and numpy: set EVOD_PYTHON or run `cargo xtask venv` (looked for {})",
        venv.display()
    );
    venv
}

/// The fixture script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../evod-llama/tests/py/tiny_llama.py")
}

/// `tiny_llama.py ARGS...`, which must succeed; its stdout.
pub fn run_script<S: AsRef<OsStr>>(args: &[S]) -> String {
    let o = Command::new(python())
        .arg(script())
        .args(args)
        .output()
        .expect("running tiny_llama.py");
    assert!(
        o.status.success(),
        "tiny_llama.py {:?}: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("tiny_llama.py prints UTF-8")
}

/// Writes the tiny llama base model at `out` (`args`: `--n-embd N`,
/// `--layers N` to change its shape).
pub fn write(out: &Path, args: &[&str]) {
    let mut all: Vec<&OsStr> = vec![OsStr::new("write"), out.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    run_script(&all);
}

/// A deterministic English-like corpus of about `bytes` bytes: sentences
/// drawn from a small vocabulary, so the held-out part looks like the
/// training part.
pub fn corpus(bytes: usize) -> String {
    const WORDS: [&str; 16] = [
        "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "house", "big", "red",
        "small", "saw", "it",
    ];
    let mut s = String::new();
    let mut x: u64 = 12345;
    while s.len() < bytes {
        let n = 4 + (x % 5) as usize;
        for k in 0..n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let w = WORDS[((x >> 33) % WORDS.len() as u64) as usize];
            if k > 0 {
                s.push(' ');
            }
            s.push_str(w);
        }
        s.push_str(".\n");
    }
    s
}
