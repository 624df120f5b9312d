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
//! Also `recovery_during_load_median_us`: a worker killed by SIGSEGV →
//! its promoted standby answers PING, while another worker is busy in a
//! `LOAD` of a 1 GiB model (see `recovery_during_load`).
//!
//! Usage: `EVOD_BIN=target/release/evod EVOD_PYTHON=.venv/bin/python
//! bench_scale OUT.json [SIZES]` (SIZES: comma-separated hidden widths).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evod_ring::{Channel, LayoutConfig, RingError, Role, Segment};
use evod_supervisor::spawn::{ChildSpec, spawn_program};
use evod_supervisor::standby::Standby;
use evod_wire::op::{FAULT_SEGV, LOAD, PING};

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

fn worker_spec(seg: &Segment, model: &Path) -> ChildSpec {
    let fd = seg.fd().as_raw_fd();
    ChildSpec {
        role: "worker",
        args: vec![
            "--ring-fd".into(),
            fd.to_string().into(),
            "--model".into(),
            model.into(),
            "--allow-fault-injection".into(),
        ],
        keep_fds: vec![fd],
        harden: true,
        memory_limit: None,
    }
}

/// PINGs until a worker of the current epoch answers.
fn ping_until_answered(seg: &Segment, deadline: Instant) {
    loop {
        while seg.last_beat(Role::Worker).is_none() {
            assert!(Instant::now() < deadline, "the worker never beat");
            std::thread::yield_now();
        }
        assert!(Instant::now() < deadline, "the worker never answered PING");
        let mut client = seg.client(Channel::Control).expect("control client");
        match client.call(PING, 0, 0, |_| {}, deadline) {
            Ok(reply) if reply.header.status == 0 => return,
            Ok(reply) => panic!("PING refused with status {}", reply.header.status),
            Err(RingError::PeerLost { .. }) | Err(RingError::Timeout) | Err(RingError::Full) => {
                std::thread::yield_now();
            }
            Err(e) => panic!("PING failed: {e}"),
        }
    }
}

fn ready_standby(evod: &Path, seg: &Segment, model: &Path) -> Standby {
    let mut standby = Standby::spawn(Some(evod), &worker_spec(seg, model)).expect("standby");
    standby
        .wait_ready(Instant::now() + Duration::from_secs(120))
        .expect("standby ready");
    standby
}

/// SIGSEGV of worker B → its promoted standby answers PING, while worker A
/// serves a `LOAD` (with checksum: the whole 1 GiB file read and checked)
/// sent just before the crash. Driven with the supervisor's spawn and
/// standby code from this one thread, as `bench_recovery` does: it leaves
/// out the supervisor's event loop, whose rework (so that a slow `LOAD`
/// reply cannot delay a restart) is another change.
fn recovery_during_load(evod: &Path, small: &Path, big: &Path, rounds: usize) -> Vec<f64> {
    let checksum = evod_gguf::GgufFile::open(big)
        .expect("1 GiB model")
        .checksum();
    let seg_a = Segment::create(&LayoutConfig::default()).expect("segment");
    let seg_b = Segment::create(&LayoutConfig::default()).expect("segment");
    let mut a = spawn_program(evod, &worker_spec(&seg_a, small)).expect("worker A");
    let mut b = spawn_program(evod, &worker_spec(&seg_b, small)).expect("worker B");
    ping_until_answered(&seg_a, Instant::now() + Duration::from_secs(60));
    ping_until_answered(&seg_b, Instant::now() + Duration::from_secs(60));
    let mut spare = Some(ready_standby(evod, &seg_b, small));
    let mut samples = Vec::new();
    // A checked 1 GiB LOAD does not beat while it reads: wait for its reply
    // past the default stale-heartbeat limit.
    let mut client_a = seg_a
        .client_with(
            Channel::Control,
            evod_ring::ClientConfig {
                peer_timeout: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .expect("client A");
    for round in 0..rounds {
        // The same 1 GiB file every round, checked again (checksum and
        // every value) on each LOAD.
        let body = evod_wire::protocol::to_bincode(&evod_wire::LoadRequest {
            path: big.to_string_lossy().into_owned(),
            generation: 0,
            checksum,
        });
        let load_id = client_a
            .send(LOAD, 0, body.len(), |out| out.copy_from_slice(&body))
            .expect("send LOAD");
        // Let A start reading before B crashes.
        while seg_a.stats().in_service != Some(LOAD) {
            std::thread::yield_now();
        }
        let start = Instant::now();
        {
            let mut client = seg_b.client(Channel::Control).expect("client B");
            client
                .send(FAULT_SEGV, 0, 4, |o| o.fill(0))
                .expect("send fault");
        }
        let reason = b.wait().expect("worker B reaped");
        assert_eq!(reason.to_string(), "killed by signal 11 (SIGSEGV)");
        seg_b.bump_epoch();
        b = spare.take().expect("a standby").promote().expect("promote");
        ping_until_answered(&seg_b, Instant::now() + Duration::from_secs(60));
        let took = start.elapsed().as_secs_f64() * 1e6;
        let a_busy = seg_a.stats().in_service == Some(LOAD);
        println!("round {round}: recovery {took:.0} us (A still in LOAD: {a_busy})");
        samples.push(took);
        let reply = evod_wire::receive_id(
            &mut client_a,
            load_id,
            Instant::now() + Duration::from_secs(120),
        )
        .expect("LOAD reply");
        assert_eq!(reply.0, 0, "LOAD: {}", String::from_utf8_lossy(&reply.1));
        spare = Some(ready_standby(evod, &seg_b, small));
    }
    drop(client_a);
    for (child, seg) in [(&mut a, &seg_a), (&mut b, &seg_b)] {
        let mut c = seg.client(Channel::Control).expect("client");
        let _ = c.send(evod_wire::op::SHUTDOWN, 0, 0, |_| {});
        let _ = child.wait();
    }
    drop(spare);
    samples.sort_by(f64::total_cmp);
    samples
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
    // A 1 GiB model: 4-16370-16370-2 is 268 million parameters.
    let dir = tempfile::tempdir().expect("temp dir");
    let small = dir.path().join("small.gguf");
    let big = dir.path().join("big.gguf");
    for (path, layers) in [(&small, "4,16,2"), (&big, "4,16370,16370,2")] {
        let o = Command::new(&evod)
            .args(["init", "--task", "cartpole", "--layers", layers, "-o"])
            .arg(path)
            .output()
            .expect("evod init");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let samples = recovery_during_load(&evod, &small, &big, 9);
    let median = samples[samples.len() / 2];
    println!(
        "recovery during a 1 GiB LOAD: median {median:.0} us over {}",
        samples.len()
    );
    json["recovery_during_load_median_us"] = median.into();
    json["recovery_during_load_samples_us"] = samples.into();
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("report");
}
