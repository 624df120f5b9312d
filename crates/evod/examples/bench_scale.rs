//! `cargo xtask bench scale`: evaluation throughput and IPC per candidate
//! as the network grows, through the whole daemon, next to a numpy
//! OpenAI-ES peer in the same run.
//!
//! For CartPole-v1 policies 4-H-H-2 (H = 100, 300, 1000, 3160: about 10^4,
//! 10^5, 10^6 and 10^7 parameters) it runs `evod run --strategy es
//! --workers 2` for a few generations and reads the evolver's summary line:
//! evaluations per second of evolver wall time (ask, validation, base
//! file, EVALs, update: everything but the daemon's start), ring payload
//! bytes per candidate (requests + replies: the recipes) and base-file
//! bytes per generation (written once, mapped by every worker). The solve
//! threshold is set out of reach so that no 100-episode gate or publish
//! runs inside the measurement. Then the
//! numpy peer (`bench_scale_peer.py`: the same network, population and
//! episodes, gymnasium's CartPole) for about as long, twice: with BLAS
//! threads as they come and with one BLAS thread; the faster of the two
//! is numpy's figure (on a loaded machine OpenBLAS's two threads wait on
//! each other and one thread is several times faster).
//!
//! (Recovery during a 1 GiB `LOAD`, `recovery_during_load_median_us`, is
//! `cargo xtask bench recovery_load`: `bench_recovery_load.rs`.)
//!
//! Usage: `EVOD_BIN=target/release/evod EVOD_PYTHON=.venv/bin/python
//! bench_scale OUT.json [SIZES]` (SIZES: comma-separated hidden widths).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Candidates per generation, both sides.
const POPULATION: u32 = 48;
/// Episodes per candidate, both sides.
const EPISODES: u32 = 1;

/// The number after `key` in the summary line.
fn number_after(line: &str, key: &str) -> f64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"));
    line[at + key.len()..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in {line}"))
}

/// The number just before `key` in the summary line.
fn number_before(line: &str, key: &str) -> f64 {
    let at = line
        .find(key)
        .unwrap_or_else(|| panic!("no {key:?} in {line}"));
    line[..at]
        .trim_end()
        .rsplit(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {key:?} in {line}"))
}

struct Daemon {
    n_params: u64,
    evals_per_s: f64,
    /// CartPole steps per second: the sum of every candidate's return
    /// (1 per step) over the run, from `state/progress.csv` (mean × new
    /// evaluations of each generation), per second.
    steps_per_s: f64,
    ring_bytes_per_candidate: f64,
    base_bytes_per_generation: f64,
    wall_s: f64,
    summary: String,
}

fn daemon(evod: &Path, hidden: u32, generations: u32) -> Daemon {
    let dir = tempfile::tempdir().expect("temp dir");
    let layers = format!("4,{hidden},{hidden},2");
    let o = Command::new(evod)
        .args(["init", "--task", "cartpole", "--layers", &layers, "-o"])
        .arg(dir.path().join("vectorland.gguf"))
        .output()
        .expect("evod init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(evod)
        .args(["run", "--workers", "2", "--strategy", "es", "--seed", "0"])
        .args(["--population", &POPULATION.to_string()])
        .args(["--episodes", &EPISODES.to_string()])
        .args(["--generations", &generations.to_string()])
        // Unreachable: no 100-episode publish gate (and no publish of the
        // model) inside the measurement; every evaluation is one episode
        // per candidate, as the peer's.
        .args(["--solve-threshold", "1e9"])
        .arg("--dir")
        .arg(dir.path())
        .env("EVOD_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("evod run");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "evod run {layers}: {stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("evod: "))
        .unwrap_or_else(|| panic!("no summary: {stdout}"))
        .to_owned();
    let evaluations = number_before(&summary, "evaluations,");
    let wall_s = number_before(&summary, "s; ring");
    let bases = number_before(&summary, "written)");
    let base_bytes = number_after(&summary, "base files");
    let progress =
        std::fs::read_to_string(dir.path().join("state/progress.csv")).expect("the progress log");
    let (mut steps, mut before) = (0.0, 0.0);
    for row in progress.lines().skip(1) {
        let cols: Vec<&str> = row.split(',').collect();
        let mean: f64 = cols[2].parse().expect("mean");
        let evals: f64 = cols[3].parse().expect("evaluations");
        if mean.is_finite() {
            steps += mean * (evals - before);
        }
        before = evals;
    }
    let n_params = {
        let h = u64::from(hidden);
        4 * h + h + h * h + h + h * 2 + 2
    };
    Daemon {
        n_params,
        evals_per_s: evaluations / wall_s,
        steps_per_s: steps / wall_s,
        ring_bytes_per_candidate: number_after(&summary, "ring"),
        base_bytes_per_generation: base_bytes / bases.max(1.0),
        wall_s,
        summary,
    }
}

/// The numpy peer with BLAS threads as they come (`one_thread: false`) or
/// pinned to one (`true`).
fn numpy_run(python: &Path, hidden: u32, seconds: f64, one_thread: bool) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bench_scale_peer.py");
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg(format!("4,{hidden},{hidden},2"))
        .arg(POPULATION.to_string())
        .arg(EPISODES.to_string())
        .arg(format!("{seconds}"))
        .arg("0");
    if one_thread {
        for var in ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"] {
            cmd.env(var, "1");
        }
    }
    let o = cmd.output().expect("running the numpy peer");
    assert!(
        o.status.success(),
        "numpy peer: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the peer's JSON");
    v["blas_threads"] = if one_thread {
        "1".into()
    } else {
        "default".into()
    };
    v
}

/// The stronger of the two numpy runs (BLAS threads as they come, and one
/// BLAS thread: on a loaded machine OpenBLAS's threads wait on each other
/// and one thread can be several times faster), with both runs' rates.
fn numpy(python: &Path, hidden: u32, seconds: f64) -> serde_json::Value {
    let threads = numpy_run(python, hidden, seconds, false);
    let one = numpy_run(python, hidden, seconds, true);
    let rate = |v: &serde_json::Value| v["evals_per_s"].as_f64().expect("evals_per_s");
    let (r_threads, r_one) = (rate(&threads), rate(&one));
    let mut best = if r_one > r_threads { one } else { threads };
    best["evals_per_s_blas_default"] = r_threads.into();
    best["evals_per_s_blas_one_thread"] = r_one.into();
    best
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: bench_scale OUT.json"),
    );
    let sizes: Vec<u32> = std::env::args().nth(2).map_or_else(
        || vec![100, 300, 1000, 3160],
        |s| s.split(',').map(|x| x.parse().expect("a width")).collect(),
    );
    let evod = PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: a release evod"));
    let python = PathBuf::from(std::env::var_os("EVOD_PYTHON").expect("EVOD_PYTHON"));
    let mut json: serde_json::Value = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    // Measured by `bench_recovery_load` now (recovery_load.json).
    if let Some(o) = json.as_object_mut() {
        o.remove("recovery_during_load_median_us");
        o.remove("recovery_during_load_samples_us");
    }
    json["scale_population"] = POPULATION.into();
    json["scale_episodes"] = EPISODES.into();
    for &hidden in &sizes {
        // About 10 s of evolver time per size.
        let generations = match hidden {
            0..=150 => 100,
            151..=500 => 40,
            501..=1500 => 10,
            _ => 3,
        };
        let d = daemon(&evod, hidden, generations);
        let peer = numpy(&python, hidden, d.wall_s.max(3.0));
        let peer_rate = peer["evals_per_s"].as_f64().expect("evals_per_s");
        let peer_steps = peer["steps_per_s"].as_f64().expect("steps_per_s");
        let tag = match d.n_params {
            0..30_000 => "1e4",
            30_000..300_000 => "1e5",
            300_000..3_000_000 => "1e6",
            _ => "1e7",
        };
        println!(
            "4-{hidden}-{hidden}-2 ({} params): daemon {:.1} evals/s ({:.0} steps/s), {:.0} ring bytes/candidate, base {:.0} bytes/generation; numpy {:.1} evals/s ({:.0} steps/s); ratio {:.2} evals, {:.2} steps\n  {}",
            d.n_params,
            d.evals_per_s,
            d.steps_per_s,
            d.ring_bytes_per_candidate,
            d.base_bytes_per_generation,
            peer_rate,
            peer_steps,
            d.evals_per_s / peer_rate,
            d.steps_per_s / peer_steps,
            d.summary
        );
        json[format!("n_params_{tag}")] = d.n_params.into();
        json[format!("evals_per_s_{tag}")] = d.evals_per_s.into();
        json[format!("ipc_bytes_per_candidate_{tag}")] = d.ring_bytes_per_candidate.into();
        json[format!("base_file_bytes_per_generation_{tag}")] = d.base_bytes_per_generation.into();
        json[format!("numpy_evals_per_s_{tag}")] = peer_rate.into();
        json[format!("evals_per_s_ratio_{tag}")] = (d.evals_per_s / peer_rate).into();
        json[format!("steps_per_s_{tag}")] = d.steps_per_s.into();
        json[format!("numpy_steps_per_s_{tag}")] = peer_steps.into();
        json[format!("steps_per_s_ratio_{tag}")] = (d.steps_per_s / peer_steps).into();
        json[format!("numpy_peer_{tag}")] = peer;
        json[format!("daemon_summary_{tag}")] = d.summary.into();
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("report");
    }
}
