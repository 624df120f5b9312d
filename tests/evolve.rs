//! The main job end to end: `evod run` (supervisor + workers + evolver, real
//! processes) evolving a model, bounded by `--until-solved` or
//! `--generations`. Same seed → same published tensors; an evolver killed
//! mid-run resumes and ends where an uninterrupted run ends; a worker
//! killed mid-batch costs a respawn, not the generation.

mod common;

use common::{children_with_role, evod, text};

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use evod_gguf::GgufFile;

/// Generous: this is not a timing test, only a guard against a hang.
const DEADLINE: Duration = Duration::from_secs(240);

fn spawn_run(dir: &Path, args: &[&str]) -> Child {
    evod()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--workers", "2", "--log-format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning evod run")
}

/// Waits for `child` with a deadline; kills it and fails past the deadline.
fn finish(mut child: Child) -> Output {
    if common::wait_exit(&mut child, DEADLINE).is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "evod run did not finish within {DEADLINE:?}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child.wait_with_output().unwrap()
}

/// Tensor data checksum and `evod.generation` of a model file.
fn identity(path: &Path) -> (u64, u64) {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let generation = f.get("evod.generation").and_then(|v| v.as_u64()).unwrap();
    (f.checksum(), generation)
}

fn progress_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("state/progress.csv"))
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

/// Polls `cond` until it holds or the deadline passes.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    common::poll_until(what, DEADLINE, || cond().then_some(()), String::new);
}

#[test]
fn run_until_solved_solves_cartpole_in_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = finish(spawn_run(dir.path(), &["--until-solved", "--seed", "1"]));
    assert!(
        out.status.success(),
        "exit {:?}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("solved"),
        "no summary: {}",
        text(&out.stdout)
    );
    let model = dir.path().join("vectorland.gguf");
    let (_, generation) = identity(&model);
    assert!(generation >= 1, "nothing published");
    // Independent check: 100 fresh episodes in this process (not the gate's
    // seeds) through `evod eval`.
    let o = evod()
        .args(["eval"])
        .arg(&model)
        .args(["--episodes", "100", "--seed", "123456", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mean = v["mean"].as_f64().unwrap();
    assert!(
        mean >= 475.0,
        "published model's mean return over 100 episodes is {mean}"
    );
    // The history holds the published generation and the report draws it.
    assert!(
        dir.path()
            .join(format!("history/gen-{generation:08}.gguf"))
            .exists()
    );
    let svg = dir.path().join("report.svg");
    let o = evod()
        .args(["report", "--dir"])
        .arg(dir.path())
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));
}

fn init_sine(dir: &Path) {
    let o = evod()
        .current_dir(dir)
        .args([
            "init", "--task", "sine", "--layers", "1,16,1", "--seed", "5",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
}

const SINE_RUN: &[&str] = &[
    "--generations",
    "60",
    "--seed",
    "9",
    "--checkpoint-every",
    "1",
];

#[test]
fn same_seed_publishes_the_same_tensors() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [a.path(), b.path()] {
        init_sine(d);
        let out = finish(spawn_run(d, SINE_RUN));
        assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    }
    let ia = identity(&a.path().join("vectorland.gguf"));
    let ib = identity(&b.path().join("vectorland.gguf"));
    assert!(ia.1 > 0, "sine run published nothing");
    assert_eq!(ia, ib, "same seed, different published model");
}

#[test]
fn killed_evolver_resumes_and_ends_like_an_uninterrupted_run() {
    let reference = tempfile::tempdir().unwrap();
    init_sine(reference.path());
    let out = finish(spawn_run(reference.path(), SINE_RUN));
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    init_sine(dir.path());
    let child = spawn_run(dir.path(), SINE_RUN);
    let sup = child.id();
    // Kill the evolver twice, at different points of the run.
    for rows in [4, 12] {
        wait_for("progress", || progress_rows(dir.path()) >= rows);
        let pid = children_with_role(sup, "evolver")[0];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    let out = finish(child);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let log = text(&out.stderr);
    assert_eq!(
        log.matches("killed by signal 9 (SIGKILL)").count(),
        2,
        "the kills were not logged:\n{log}"
    );
    assert_eq!(
        identity(&dir.path().join("vectorland.gguf")),
        identity(&reference.path().join("vectorland.gguf")),
        "interrupted run ended elsewhere than the uninterrupted one"
    );
    // No temporary file survives.
    let litter: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(litter.is_empty(), "{litter:?}");
}

#[test]
fn worker_killed_mid_run_costs_a_respawn_not_the_run() {
    let reference = tempfile::tempdir().unwrap();
    init_sine(reference.path());
    let out = finish(spawn_run(reference.path(), SINE_RUN));
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    init_sine(dir.path());
    let child = spawn_run(dir.path(), SINE_RUN);
    let sup = child.id();
    for (rows, signal) in [
        (3, nix::sys::signal::Signal::SIGKILL),
        (8, nix::sys::signal::Signal::SIGABRT),
    ] {
        wait_for("progress", || progress_rows(dir.path()) >= rows);
        let pid = children_with_role(sup, "worker")[0];
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
    }
    let out = finish(child);
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let log = text(&out.stderr);
    for words in [
        "killed by signal 9 (SIGKILL)",
        "killed by signal 6 (SIGABRT)",
    ] {
        assert!(log.contains(words), "{words:?} not logged:\n{log}");
    }
    assert!(progress_rows(dir.path()) >= 60, "generations lost");
    // Evaluation is deterministic whichever worker runs it, so the
    // result is the uninterrupted run's.
    assert_eq!(
        identity(&dir.path().join("vectorland.gguf")),
        identity(&reference.path().join("vectorland.gguf"))
    );
}

#[test]
fn a_quarantined_generation_is_never_published_again() {
    // What a replay after a rollback would do: the same seed reaches the
    // same candidate. Here the reference run's last publish is set aside as
    // quarantined (as the supervisor's fallback does) before an identical
    // run starts: that run must refuse to publish it.
    let reference = tempfile::tempdir().unwrap();
    init_sine(reference.path());
    let out = finish(spawn_run(reference.path(), SINE_RUN));
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let (_, bad) = identity(&reference.path().join("vectorland.gguf"));
    assert!(bad > 1, "the reference run published too little");

    let dir = tempfile::tempdir().unwrap();
    init_sine(dir.path());
    let quarantine = dir.path().join("history/quarantine");
    std::fs::create_dir_all(&quarantine).unwrap();
    std::fs::copy(
        reference.path().join("vectorland.gguf"),
        quarantine.join(format!("gen-{bad}.gguf")),
    )
    .unwrap();
    let out = finish(spawn_run(dir.path(), SINE_RUN));
    let log = text(&out.stderr);
    assert!(out.status.success(), "stderr:\n{log}");
    assert!(
        log.contains(&format!(
            "same parameters as quarantined generation {bad}, which crashed the runtime"
        )),
        "{log}"
    );
    let (_, live) = identity(&dir.path().join("vectorland.gguf"));
    assert!(
        live < bad,
        "generation {live} published, {bad} was quarantined"
    );
    assert!(
        !dir.path()
            .join(format!("history/gen-{bad:08}.gguf"))
            .exists(),
        "the quarantined generation reached the history"
    );
}

#[test]
fn a_replay_does_not_republish_the_model_rolled_back_from() {
    // What a replay after `evod rollback` would do: reach the candidate
    // whose model was rolled back from. Here the reference run's first
    // publish is named in the rollback marker (as `evod rollback` writes
    // it) before an identical run starts on the initial file.
    let one = ["--generations", "1", "--seed", "9"];
    let reference = tempfile::tempdir().unwrap();
    init_sine(reference.path());
    let out = finish(spawn_run(reference.path(), &one));
    assert!(out.status.success(), "stderr:\n{}", text(&out.stderr));
    let published = reference.path().join("vectorland.gguf");
    let (_, generation) = identity(&published);
    assert_eq!(generation, 1, "the reference run did not publish");
    let model = evod_runtime::Model::open(&published).unwrap();
    // The marker's hash: xxh3 of the parameters as little-endian f32 bytes
    // (`supervisor::rollback::params_hash`).
    let bytes: Vec<u8> = model
        .params()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let from = xxhash_rust::xxh3::xxh3_64(&bytes);

    let dir = tempfile::tempdir().unwrap();
    init_sine(dir.path());
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::write(
        dir.path().join("state/rolled-back-to"),
        format!("0 {from:016x}\n"),
    )
    .unwrap();
    let out = finish(spawn_run(dir.path(), &one));
    let log = text(&out.stderr);
    assert!(out.status.success(), "stderr:\n{log}");
    assert!(
        log.contains("these are the parameters the live file was rolled back from"),
        "{log}"
    );
    let (_, live) = identity(&dir.path().join("vectorland.gguf"));
    assert_eq!(live, 0, "the rolled-back-from model was published again");
}
