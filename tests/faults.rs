//! The failure model of `../docs/failure-model.md`, proved against the real
//! daemon (`evod run`: supervisor + workers + evolver as real processes)
//! while it evolves: worker faults injected during evaluation through the
//! fault opcodes (`evod fault`), a poison candidate that crashes every
//! worker it reaches, the evolver SIGKILLed at 100 random instants, ENOSPC
//! and EIO at each step of a publish (through the evolver's I/O fault plan
//! `DIR/.evod/io-fault`), a malformed model at start.
//!
//! Every daemon here runs with `--allow-fault-injection`; every wait polls
//! for an event (a log line, a status field, a file) with a deadline.

mod common;

use common::{children_with_role, evod, text};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evod_gguf::GgufFile;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous: these are not timing tests, only guards against a hang.
const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `cond` until it holds; fails with `what` and `context()` past `within`.
fn wait_for(
    what: &str,
    within: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    common::poll_until(what, within, || cond().then_some(()), context);
}

/// `evod init` in `dir` with `args`.
fn init(dir: &Path, args: &[&str]) {
    let o = evod()
        .current_dir(dir)
        .arg("init")
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "evod init: {}", text(&o.stderr));
}

/// A running `evod run`, its output collected by reader threads.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(dir: &Path, args: &[&str]) -> Daemon {
        let mut child = evod()
            .arg("run")
            .arg("--dir")
            .arg(dir)
            .args(["--log-format", "json", "--allow-fault-injection"])
            .args(args)
            // Faults are injected while it evaluates: it must not rest.
            .env("EVOD_PATIENCE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning evod run");
        let log = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let mut readers = Vec::new();
        for mut pipe in pipes {
            let log = Arc::clone(&log);
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.lock().unwrap().push_str(&text(&buf[..n]));
                }
            }));
        }
        Daemon {
            child: Some(child),
            dir: dir.to_owned(),
            log,
            readers,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, what: &str, cond: impl Fn(&str) -> bool) {
        wait_for(
            what,
            DEADLINE,
            || cond(&self.log.lock().unwrap()),
            || format!("log:\n{}", self.log()),
        );
    }

    /// `evod status --json`, or None while the daemon does not answer.
    fn status(&self) -> Option<serde_json::Value> {
        let o = evod()
            .args(["status", "--json", "--dir"])
            .arg(&self.dir)
            .output()
            .unwrap();
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    /// Worker `i`'s row of the status.
    fn worker(&self, i: u64) -> Option<serde_json::Value> {
        let s = self.status()?;
        s["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker" && c["index"] == i)
            .cloned()
    }

    /// Waits for the daemon to exit by itself.
    fn finish(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let Some(status) = common::wait_exit(&mut child, DEADLINE) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "evod run did not finish within {DEADLINE:?}\n{}",
                self.log()
            );
        };
        // The reader threads end when the last writer (the supervisor's
        // janitor goes last) closes the pipes.
        for reader in std::mem::take(&mut self.readers) {
            wait_for(
                "the daemon's output pipes to close",
                DEADLINE,
                || reader.is_finished(),
                || self.log(),
            );
            let _ = reader.join();
        }
        (status, self.log())
    }

    /// `evod stop`, then waits for the exit.
    fn stop(self) -> (ExitStatus, String) {
        let o = evod()
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "evod stop: {}", text(&o.stderr));
        self.finish()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `evod fault --worker I --kind KIND` against the daemon in `dir`.
fn inject(dir: &Path, worker: u32, kind: &str) -> std::process::Output {
    evod()
        .args(["fault", "--dir"])
        .arg(dir)
        .args(["--worker", &worker.to_string(), "--kind", kind])
        .output()
        .unwrap()
}

/// Data checksum and generation of a model file, after checking it both as
/// GGUF and as an evod model (every tensor present, finite).
fn valid_model(path: &Path) -> (u64, u64) {
    let f = GgufFile::open(path).unwrap_or_else(|e| panic!("invalid model: {e}"));
    let m = evod_runtime::Model::open(path).unwrap_or_else(|e| panic!("invalid model: {e}"));
    (f.checksum(), m.spec.generation)
}

fn model_generation(dir: &Path) -> u64 {
    valid_model(&dir.join("vectorland.gguf")).1
}

/// Temporary files (of a publish or a checkpoint) left in the run folder.
fn temp_litter(dir: &Path) -> Vec<String> {
    [dir.to_owned(), dir.join("state")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

/// Names of publish temporary files in the run folder.
fn publish_temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".vectorland.gguf.tmp."))
                .collect()
        })
        .unwrap_or_default()
}

/// Generation numbers in `state/progress.csv`, in file order.
fn progress_generations(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("state/progress.csv"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next()?.parse().ok())
        .collect()
}

#[test]
fn every_worker_fault_during_evaluation_costs_a_respawn_not_the_run() {
    let (dir, d) = sine_daemon("1,32,1", "3", &["--heartbeat-timeout", "1s", "--seed", "4"]);
    let recycled = "killed by signal 9 (SIGKILL) (recycled: the evolver found that it";
    let cases: [(&str, &[&str]); 6] = [
        ("segv", &["killed by signal 11 (SIGSEGV)"]),
        ("abort", &["killed by signal 6 (SIGABRT)"]),
        ("hang", &["missed its heartbeat"]),
        // The scribbler exits 70 right after scribbling, unless the evolver
        // saw the garbage first and had it killed.
        ("scribble", &["exited with code 70", recycled]),
        ("exit:7", &["exited with code 7"]),
        // Corrupts its ring and keeps running: the evolver has it replaced.
        ("lie", &[recycled]),
    ];
    for (n, (kind, words)) in cases.into_iter().enumerate() {
        // The worker is up long enough not to count as crash-looping, and
        // the evolver keeps it busy evaluating.
        wait_for(
            "worker 0 up for a second",
            DEADLINE,
            || {
                d.worker(0).is_some_and(|w| {
                    w["state"] == "running" && w["uptime_s"].as_f64().unwrap_or(0.0) > 1.0
                })
            },
            || d.log(),
        );
        let rows = progress_generations(dir.path()).len();
        wait_for(
            "evaluation in progress",
            DEADLINE,
            || progress_generations(dir.path()).len() > rows,
            || d.log(),
        );
        let logged = d.log.lock().unwrap().len();
        let o = inject(dir.path(), 0, kind);
        assert!(o.status.success(), "evod fault {kind}: {}", text(&o.stderr));
        d.wait_log(&format!("{words:?} for {kind}"), |l| {
            words.iter().any(|w| l[logged..].contains(w))
        });
        wait_for(
            "worker 0 respawned",
            DEADLINE,
            || {
                d.worker(0)
                    .is_some_and(|w| w["restarts"] == (n as u64 + 1) && w["state"] == "running")
            },
            || d.log(),
        );
    }
    // The loop went on: more generations after the last fault.
    let rows = progress_generations(dir.path()).len();
    wait_for(
        "generations after the faults",
        DEADLINE,
        || progress_generations(dir.path()).len() > rows + 3,
        || d.log(),
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
    let gens = progress_generations(dir.path());
    assert!(
        gens.windows(2).all(|w| w[1] == w[0] + 1),
        "a generation was lost or repeated: {gens:?}"
    );
    assert!(!log.contains("panicked"), "{log}");
    valid_model(&dir.path().join("vectorland.gguf"));
}

#[test]
fn fault_requests_are_refused_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path(), &["--task", "xor", "--seed", "1"]);
    let mut child = evod()
        .args(["run", "--no-evolver", "--workers", "1", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = None;
    wait_for(
        "the daemon to answer",
        DEADLINE,
        || {
            let o = inject(dir.path(), 0, "segv");
            let answered = o.status.code() != Some(4);
            out = Some(o);
            answered
        },
        String::new,
    );
    let o = out.unwrap();
    let _ = evod().args(["stop", "--dir"]).arg(dir.path()).output();
    let status = child.wait().unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("--allow-fault-injection"),
        "{}",
        text(&o.stderr)
    );
    assert!(status.success());
}

#[test]
fn poison_candidates_are_quarantined_and_the_run_completes() {
    let (dir, d) = sine_daemon(
        "1,16,1",
        "5",
        &[
            "--poison-one-in",
            "12",
            "--population",
            "16",
            "--generations",
            "15",
            "--seed",
            "2",
            "--pulse-every",
            "1",
            "--pulse-interval",
            "0s",
            // Poison crashes come fast: keep the restart policy out of this
            // row (its own tests cover it). The crash-loop fallback keeps its
            // default: crashes in EVAL must not be blamed on the model.
            "--restart-intensity",
            "100000",
            "--backoff-max",
            "20ms",
        ],
    );
    let (status, log) = d.finish();
    assert!(
        !log.contains("rolling back"),
        "a poison candidate was blamed on the model:\n{log}"
    );
    assert!(status.success(), "exit {status:?}\n{log}");
    let quarantined = log.matches("crashed a worker twice: quarantined").count();
    assert!(quarantined >= 1, "nothing quarantined:\n{log}");
    let segv = log.matches("killed by signal 11 (SIGSEGV)").count();
    // Each quarantined candidate crashed a worker twice (once in its batch,
    // once alone).
    assert!(
        segv > quarantined,
        "{segv} crashes for {quarantined} quarantines\n{log}"
    );
    assert_eq!(
        progress_generations(dir.path()),
        (0..15).collect::<Vec<u64>>(),
        "generations lost"
    );
    // The evolver's own count reaches the pulse line.
    assert!(
        log.lines().any(|l| l.contains("\"pulse\"")
            && !l.contains("\"quarantined\":0")
            && l.contains("\"quarantined\"")),
        "no pulse counts quarantines:\n{log}"
    );
    // And the worker stats the evolver polls every cycle: requests served
    // by the live workers and the generation each of the two has loaded.
    let pulse: serde_json::Value = log
        .lines()
        .rfind(|l| l.contains("\"pulse\""))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a pulse line in JSON");
    let fields = &pulse["fields"];
    assert!(fields["worker_requests"].as_u64().unwrap() > 0, "{pulse}");
    assert_eq!(
        fields["worker_generations"]
            .as_str()
            .unwrap()
            .split(',')
            .count(),
        2,
        "{pulse}"
    );
    assert!(fields["worker_slowest_ms"].as_f64().is_some(), "{pulse}");
}

#[test]
fn evolver_sigkilled_at_100_random_instants_leaves_a_valid_model() {
    // Big enough that a publish (264 KiB, fsync) takes measurable time.
    let (dir, d) = sine_daemon(
        "1,256,256,1",
        "8",
        &[
            "--population",
            "4",
            "--seed",
            "6",
            "--checkpoint-every",
            "1",
            "--restart-intensity",
            "100000",
            "--backoff-max",
            "20ms",
        ],
    );
    let model = dir.path().join("vectorland.gguf");
    // A small deterministic generator for the kill instants.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut last = None;
    let mut aimed_hits = 0;
    for kill_no in 0..100 {
        let mut pid = 0;
        wait_for(
            "a new evolver",
            DEADLINE,
            || {
                pid = children_with_role(d.pid(), "evolver")
                    .into_iter()
                    .find(|p| Some(*p) != last)
                    .unwrap_or(0);
                pid != 0
            },
            || d.log(),
        );
        // The first 10 kills are aimed at a publish: the model from `evod
        // init` has no fitness, so each fresh evolver's first generation
        // publishes, and each is killed during it.
        let aimed = kill_no < 10;
        if kill_no == 10 {
            // A first checkpoint, so that every evolver after a kill resumes.
            wait_for(
                "the first checkpoint",
                DEADLINE,
                || dir.path().join("state/checkpoint.bin").exists(),
                || d.log(),
            );
        }
        let mut fresh = None;
        if aimed {
            // Aimed at a publish: the moment a new temporary file appears.
            let old = publish_temps(dir.path());
            let end = Instant::now() + DEADLINE;
            while fresh.is_none() {
                assert!(Instant::now() < end, "no publish began:\n{}", d.log());
                fresh = publish_temps(dir.path())
                    .into_iter()
                    .find(|n| !old.contains(n));
                std::thread::sleep(Duration::from_micros(100));
            }
        } else {
            // Anywhere in the evolver's start and first cycles.
            std::thread::sleep(Duration::from_micros(next() % 300_000));
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        last = Some(pid);
        // Gone (reaped by the supervisor) before looking at the file.
        wait_for(
            "the killed evolver to be reaped",
            DEADLINE,
            || !Path::new(&format!("/proc/{pid}")).exists(),
            || d.log(),
        );
        if fresh.is_some_and(|n| dir.path().join(n).exists()) {
            aimed_hits += 1;
        }
        valid_model(&model);
    }
    // The evolver after the last kill cleans up what killed ones left and
    // evolves on.
    let rows = progress_generations(dir.path()).len();
    wait_for(
        "a generation after the last kill",
        DEADLINE,
        || progress_generations(dir.path()).len() > rows,
        || d.log(),
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(
        temp_litter(dir.path()).is_empty(),
        "temporary files left: {:?}",
        temp_litter(dir.path())
    );
    assert!(log.contains("resuming from"), "never resumed:\n{log}");
    assert!(log.matches("killed by signal 9 (SIGKILL)").count() >= 100);
    valid_model(&model);
    // The aimed kills really interrupted publishes (their temporary file
    // was left behind for the next publish to remove).
    assert!(aimed_hits >= 1, "no kill landed mid-publish");
    eprintln!("{aimed_hits} of 10 aimed kills interrupted a publish");
}

/// A daemon (`--workers 2` and `args`) evolving a sine model with hidden
/// `layers`, initialised from `seed`, in a new folder.
fn sine_daemon(layers: &str, seed: &str, args: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    init(
        dir.path(),
        &["--task", "sine", "--layers", layers, "--seed", seed],
    );
    let mut all = vec!["--workers", "2"];
    all.extend_from_slice(args);
    let d = Daemon::start(dir.path(), &all);
    (dir, d)
}

/// A small sine daemon (seeds fixed) that checkpoints every cycle.
fn checkpointing_sine_daemon() -> (tempfile::TempDir, Daemon) {
    sine_daemon(
        "1,16,1",
        "11",
        &[
            "--seed",
            "12",
            "--population",
            "24",
            "--checkpoint-every",
            "1",
        ],
    )
}

#[test]
fn a_publish_lost_with_its_evolver_is_redone_by_the_next() {
    let (dir, d) = checkpointing_sine_daemon();
    let plan = dir.path().join(".evod/io-fault");
    wait_for(
        "the runtime folder",
        DEADLINE,
        || plan.parent().unwrap().exists(),
        || d.log(),
    );
    let words = "rename failed: No space left on device";
    std::fs::write(&plan, "rename ENOSPC").unwrap();
    // Two failures: the candidate failed, was retried, and the checkpoint
    // of the cycle in between counts it as published.
    d.wait_log("two failed publishes", |l| l.matches(words).count() >= 2);
    let g = model_generation(dir.path());
    let evolver = children_with_role(d.pid(), "evolver")[0];
    kill(Pid::from_raw(evolver as i32), Signal::SIGKILL).unwrap();
    d.wait_log("the evolver's SIGKILL", |l| {
        l.contains("evolver 0 killed by signal 9 (SIGKILL)")
    });
    std::fs::remove_file(&plan).unwrap();
    // The next evolver finds the publish its checkpoint counts missing from
    // the file and makes it.
    d.wait_log("the lost publish redone", |l| {
        l.contains("the checkpoint's last publish is not in the live file")
    });
    wait_for(
        "a publish after the kill",
        DEADLINE,
        || model_generation(dir.path()) > g,
        || d.log(),
    );
    valid_model(&dir.path().join("vectorland.gguf"));
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
}

#[test]
fn a_manual_rollback_is_not_undone_by_the_restarted_evolver() {
    let (dir, d) = checkpointing_sine_daemon();
    // Two publishes at least, so there is an earlier generation to restore.
    wait_for(
        "two publishes",
        DEADLINE,
        || d.log().matches("\"published ").count() >= 2,
        || d.log(),
    );
    let resumed = d.log().matches("resuming from").count();
    let o = evod()
        .args(["rollback", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "rollback: {}", text(&o.stderr));
    let to: u64 = text(&o.stdout)
        .trim()
        .strip_prefix("restored generation ")
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("rollback said {:?}", text(&o.stdout)));
    assert_eq!(model_generation(dir.path()), to);
    // The restarted evolver resumes a checkpoint that counts the newer
    // generation as published: it must leave the restored file alone.
    d.wait_log("the evolver to resume after the rollback", |l| {
        l.matches("resuming from").count() > resumed
    });
    let rows = progress_generations(dir.path()).len();
    wait_for(
        "five more generations",
        DEADLINE,
        || progress_generations(dir.path()).len() >= rows + 5,
        || d.log(),
    );
    let log = d.log();
    assert!(
        !log.contains("the checkpoint's last publish is not in the live file"),
        "the rollback was undone:\n{log}"
    );
    assert!(log.contains("the live file was rolled back"), "{log}");
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
}

#[test]
fn enospc_and_eio_on_publish_keep_the_old_file_and_publishing_resumes() {
    let (dir, d) = sine_daemon("1,16,1", "11", &["--seed", "12", "--population", "24"]);
    let model = dir.path().join("vectorland.gguf");
    let plan = dir.path().join(".evod/io-fault");
    let cases = [
        ("write ENOSPC", "write failed: No space left on device"),
        ("write EIO", "write failed: Input/output error"),
        ("fsync ENOSPC", "fsync failed: No space left on device"),
        ("fsync EIO", "fsync failed: Input/output error"),
        ("rename ENOSPC", "rename failed: No space left on device"),
        ("rename EIO", "rename failed: Input/output error"),
    ];
    for (fault, words) in cases {
        wait_for(
            "the runtime folder",
            DEADLINE,
            || plan.parent().unwrap().exists(),
            || d.log(),
        );
        let before_log = d.log().matches(words).count();
        std::fs::write(&plan, fault).unwrap();
        d.wait_log(&format!("the {fault} publish error"), |l| {
            l.matches(words).count() > before_log
        });
        // Read the file only now: a publish that began before the plan was
        // written may have completed after it; every later publish (the
        // evolver publishes one at a time) sees the fault.
        let old = std::fs::read(&model).unwrap();
        // Retried while the fault lasts: at least one more failure, and the
        // file never changed.
        d.wait_log(&format!("a retry under {fault}"), |l| {
            l.matches(words).count() > before_log + 1
        });
        assert_eq!(
            std::fs::read(&model).unwrap(),
            old,
            "{fault}: the old file changed"
        );
        valid_model(&model);
        // No litter check here: a retry may be mid-publish right now, its
        // temporary file legitimately present; the check is after the stop.
        let g = model_generation(dir.path());
        std::fs::remove_file(&plan).unwrap();
        wait_for(
            &format!("a publish after clearing {fault}"),
            DEADLINE,
            || model_generation(dir.path()) > g,
            || d.log(),
        );
    }
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("publish retried and succeeded"), "{log}");
    // Every failed publish removed its temporary file.
    let litter = temp_litter(dir.path());
    assert!(litter.is_empty(), "temporary files left: {litter:?}");
}

#[test]
fn malformed_model_at_start_exits_3_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("vectorland.gguf");
    for bytes in [
        b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        b"not a model at all".to_vec(),
    ] {
        std::fs::write(&model, &bytes).unwrap();
        let o = evod()
            .args(["run", "--workers", "1", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(3), "{err}");
        assert!(err.contains(&model.display().to_string()), "{err}");
        assert_eq!(
            std::fs::read(&model).unwrap(),
            bytes,
            "the bad file was touched"
        );
        assert!(children_with_role(std::process::id(), "worker").is_empty());
    }
}
