//! `cargo xtask bench <name>`: each benchmark is a release-mode example of
//! the crate it measures, run with the Python venv at hand for its peers;
//! each writes `target/bench/<name>.json`.

use std::process::Command;

use anyhow::{Result, bail};

/// (name, package, example) of every benchmark.
const BENCHES: &[(&str, &str, &str)] = &[
    ("evolve", "evod-evolve", "bench_evolve"),
    ("gguf", "evod-gguf", "bench_gguf"),
    ("ring", "evod-ring", "bench_ring"),
    ("runtime", "evod-runtime", "bench_runtime"),
    ("runtime", "evod", "bench_eval"),
    ("evolve", "evod", "bench_daemon_solve"),
    ("recovery", "evod-supervisor", "bench_recovery"),
    ("metrics", "evod", "bench_metrics"),
    ("soak", "evod", "bench_soak"),
    ("scale", "evod", "bench_scale"),
];

/// Runs the benchmarks named in `args` (all when empty). A name may have
/// several examples (run in order, each adding its keys to the same JSON
/// file). Every example gets the Python venv (`EVOD_PYTHON`) and the release
/// `evod` binary (`EVOD_BIN`), built first.
pub fn run(args: &[String]) -> Result<()> {
    let root = crate::root();
    let python = crate::venv()?;
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let mut wanted: Vec<&str> = if args.is_empty() {
        BENCHES.iter().map(|b| b.0).collect()
    } else {
        args.iter().map(String::as_str).collect()
    };
    wanted.dedup();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(Command::new(&cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "evod",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from);
    let evod = target.join("release/evod");
    for name in wanted {
        let examples: Vec<_> = BENCHES.iter().filter(|b| b.0 == name).collect();
        if examples.is_empty() {
            let known: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
            bail!("unknown benchmark {name:?}; known: {known:?}");
        }
        for &&(_, package, example) in &examples {
            crate::run(
                Command::new(&cargo)
                    .current_dir(&root)
                    .env("EVOD_PYTHON", &python)
                    .env("EVOD_BIN", &evod)
                    .args([
                        "run",
                        "--release",
                        "--package",
                        package,
                        "--example",
                        example,
                        "--",
                    ])
                    .arg(out_dir.join(format!("{name}.json"))),
            )?;
        }
    }
    Ok(())
}
