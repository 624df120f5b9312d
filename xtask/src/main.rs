//! Project automation, run as `cargo xtask <task>`.
//!
//! - `ci`: exactly what `.ci/run` runs: the Python venv the tests read our
//!   files with, `cargo fmt --check`, clippy with warnings denied, the
//!   container image, all tests (`tests/docker.rs` among them), the `evod`
//!   Python package built, installed into the venv and its pytest suite.
//! - `venv`: create `.venv` with the pinned Python peers (gguf, gymnasium, …).
//! - `bench <name>`: run a benchmark in release mode; each writes
//!   `target/bench/<name>.json`.
//! - `fault`: the fault-injection storm against a real daemon.
//! - `image [--tag TAG]`: the container image, built without a registry
//!   from the project's own static binary, llama.cpp included
//!   (`evod:local` by default).

mod bench;
mod fault;
mod image;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(task) = args.first() else {
        bail!("usage: cargo xtask <ci|venv|bench NAME|fault|image> [ARGS]");
    };
    match task.as_str() {
        "ci" => ci(),
        "venv" => venv().map(|_| ()),
        "bench" => bench::run(&args[1..]),
        "fault" => fault::run(&args[1..]),
        "image" => image::run_task(&args[1..]),
        other => bail!("unknown xtask {other:?}: expected ci, venv, bench, fault or image"),
    }
}

/// The workspace root (the folder holding `xtask/`).
pub fn root() -> PathBuf {
    // `cargo run` (the `cargo xtask` alias) sets CARGO_MANIFEST_DIR for the
    // program too: the checkout it was run in. The compile-time value is
    // the checkout that built this binary, which differs when two
    // checkouts share a target folder and cargo found the binary fresh
    // (and may be gone).
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target folder: `CARGO_TARGET_DIR` when set (a CI cache outside
/// the clone), else `target/` in the workspace.
/// (relative to the workspace when relative).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root().join(t) })
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `cmd`, failing with its rendering if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Creates (or updates) `.venv` with `tests/requirements.txt` and returns its
/// Python interpreter.
pub fn venv() -> Result<PathBuf> {
    let root = root();
    let venv = root.join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(root.join("tests/requirements.txt"))?;
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        run(Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(root.join("tests/requirements.txt")))?;
        std::fs::write(&stamp, wanted)?;
    }
    Ok(python)
}

/// Builds and installs the `evod` Python package (`python/`, maturin from
/// the venv, a debug build: the tests need no speed) into the venv, then
/// runs its pytest suite against the `evod` binary `cargo test` built.
fn python_package(python: &Path) -> Result<()> {
    let root = root();
    // Without build isolation pip runs maturin's hook in the venv's Python,
    // which looks for the `maturin` executable on PATH: the venv's.
    let bin = python.parent().context("the venv's python has a folder")?;
    let path = std::env::join_paths(std::iter::once(bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    run(Command::new(python)
        .current_dir(&root)
        .env("PATH", path)
        .env("MATURIN_PEP517_ARGS", "--profile dev")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-build-isolation",
            "--no-deps",
            "--force-reinstall",
            "./python",
        ]))?;
    run(Command::new(python)
        .current_dir(&root)
        .env("EVOD_BIN", target_dir().join("debug/evod"))
        .args(["-m", "pytest", "-q", "python/tests"]))
}

fn ci() -> Result<()> {
    let root = root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut steps: Vec<(&str, std::time::Duration)> = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let start = std::time::Instant::now();
        let result = f();
        steps.push((name, start.elapsed()));
        if let Err(e) = &result {
            eprintln!("xtask ci: step `{name}` failed: {e:#}");
        }
        result
    };
    let mut python = PathBuf::new();
    let result = (|| -> Result<()> {
        step("venv", &mut || venv().map(|p| python = p))?;
        step("fmt --check", &mut || {
            run(Command::new(&cargo)
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]))
        })?;
        step("clippy -D warnings", &mut || {
            run(Command::new(&cargo).current_dir(&root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
        // Its own step for the timing; tests/docker.rs, docker_dist.rs and
        // docker_llm.rs build the same image again, a no-op for cargo and
        // Docker's layer cache. The image's binary has llama.cpp in it (the
        // llm shape, release profile, static target): its own llama.cpp
        // build, cold once per target folder, like the dev one below.
        step("image (static, llm)", &mut || match image::engine() {
            Ok(()) => image::build(image::DEFAULT_TAG, &[]),
            Err(why) => {
                eprintln!("SKIPPED: xtask ci image: no Docker engine ({why})");
                Ok(())
            }
        })?;
        step("test --workspace", &mut || {
            run(Command::new(&cargo)
                .current_dir(&root)
                .env("EVOD_PYTHON", &python)
                .args(["test", "--workspace"]))
        })?;
        // llama.cpp (vendored by llama-cpp-sys-2) builds only with the `llm`
        // feature. llama-cpp-sys-2 builds it inside its build script's
        // folder, whose hash follows the host dependencies' unified features,
        // so every command here selects the same packages and features:
        // one cold llama.cpp build (10-30 min on 2 cores), then cached.
        // Tests: the runtime against numpy, the K-quants against the
        // compiled ggml, `evod surgeon` outputs loaded in llama.cpp, and the
        // perplexity task end to end (tests/llm.rs, required-features llm).
        step("llm (llama.cpp)", &mut || {
            let shape = image::LLM_SHAPE;
            run(Command::new(&cargo)
                .current_dir(&root)
                .arg("clippy")
                .args(shape)
                .args(["--all-targets", "--", "-D", "warnings"]))?;
            run(Command::new(&cargo)
                .current_dir(&root)
                .env("EVOD_PYTHON", &python)
                .arg("test")
                .args(shape)
                .args([
                    "--lib", "--test", "runtime", "--test", "kquants", "--test", "surgeon",
                    "--test", "llm",
                ]))
        })?;
        step("python package", &mut || python_package(&python))?;
        step("fault storm (50)", &mut || {
            // The dev-profile binary `cargo test` just built: no release
            // build in CI's budget.
            fault::run(&[
                "--storm".into(),
                "50".into(),
                "--seed".into(),
                "7".into(),
                "--debug".into(),
            ])
        })
    })();
    eprintln!("\nxtask ci summary:");
    for (name, took) in &steps {
        eprintln!("  {name:<22} {:>7.1}s", took.as_secs_f64());
    }
    match &result {
        Ok(()) => eprintln!("  all {} steps passed", steps.len()),
        Err(_) => eprintln!("  FAILED at step `{}`", steps.last().map_or("?", |s| s.0)),
    }
    result
}
