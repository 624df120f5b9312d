//! `cargo xtask bench <name>`: each benchmark is a release-mode example of
//! the crate it measures, run with the Python venv at hand for its peers;
//! each writes `target/bench/<name>.json`.

use std::process::Command;

use anyhow::{Result, bail};

/// (name, package, example) of every benchmark.
const BENCHES: &[(&str, &str, &str)] = &[
    ("evolve", "evod-evolve", "bench_evolve"),
    ("gguf", "evod-gguf", "bench_gguf"),
    ("runtime", "evod-runtime", "bench_runtime"),
];

/// Runs the benchmarks named in `args` (all when empty).
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::root();
    let python = crate::venv()?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let wanted: Vec<&str> = if args.is_empty() {
        BENCHES.iter().map(|b| b.0).collect()
    } else {
        args.iter().map(String::as_str).collect()
    };
    for name in wanted {
        let Some(&(_, package, example)) = BENCHES.iter().find(|b| b.0 == name) else {
            let known: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
            bail!("unknown benchmark {name:?}; known: {known:?}");
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        crate::run(
            Command::new(cargo)
                .current_dir(&root)
                .env("EVOD_PYTHON", &python)
                .args(["run", "--release", "--package", package, "--example", example, "--"])
                .arg(out_dir.join(format!("{name}.json"))),
        )?;
    }
    Ok(())
}
