//! Process tests of the supervisor's event loop (issue 11): it never waits
//! on a worker or reads the model on its own thread, its deadlines cannot
//! overflow, health means "can serve", and a worker that beats but does
//! not answer is replaced. Real daemons, real signals, real files; every
//! wait is on an event or a polled condition with a deadline.

mod common;

use common::{Daemon, assert_sigkilled, evod};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(60);

/// `evod run --no-evolver --allow-fault-injection --workers 1` in a
/// temporary state folder ([`Daemon`]), and what these tests do with it.
trait LoopDaemon {
    /// Starts with `args` and waits until it is healthy.
    fn start(args: &[&str]) -> Daemon;
    fn model(&self) -> PathBuf;
    /// The live generation, once a worker verified it.
    fn verified_generation(&mut self) -> u64;
    /// Publishes (atomically) a copy of the live model renumbered
    /// `generation`, carrying `evod.fault = fault` if given.
    fn publish(&self, source: &Path, generation: u64, fault: Option<&str>);
    /// A private copy of the live model (to publish variants of it).
    fn copy_model(&self) -> PathBuf;
}

impl LoopDaemon for Daemon {
    fn start(args: &[&str]) -> Daemon {
        let base = ["--no-evolver", "--allow-fault-injection", "--workers", "1"];
        let args: Vec<&str> = base.iter().chain(args).copied().collect();
        let mut d = Daemon::spawn(tempfile::tempdir().unwrap(), &args, DEADLINE);
        d.wait_for("a healthy daemon", |d| {
            d.status().filter(|s| s["healthy"] == true)
        });
        d
    }

    fn model(&self) -> PathBuf {
        self.dir().join("vectorland.gguf")
    }

    fn verified_generation(&mut self) -> u64 {
        self.wait_for("a verified generation", |d| {
            d.status()
                .filter(|s| s["healthy"] == true)
                .and_then(|s| s["good_generation"].as_u64())
        })
    }

    fn publish(&self, source: &Path, generation: u64, fault: Option<&str>) {
        use evod_gguf::{PublishOptions, Value, rewrite};
        let good = evod_gguf::GgufFile::open(source).unwrap();
        rewrite(
            &good,
            &self.model(),
            |meta| {
                for (k, v) in meta.iter_mut() {
                    if k == "evod.generation" {
                        *v = Value::U64(generation);
                    }
                }
                if let Some(fault) = fault {
                    meta.push(("evod.fault".into(), Value::String(fault.into())));
                }
            },
            &PublishOptions::default(),
        )
        .unwrap();
    }

    fn copy_model(&self) -> PathBuf {
        let copy = self.dir().join("good-copy.gguf");
        std::fs::copy(self.model(), &copy).unwrap();
        copy
    }
}

#[test]
fn a_worker_that_never_answers_holds_up_neither_status_nor_sigterm() {
    let mut d = Daemon::start(&[
        "--heartbeat-timeout",
        "120s",
        "--load-timeout",
        "120s",
        "--exec-timeout",
        "120s",
        "--eval-timeout",
        "120s",
        "--grace-period",
        "5s",
        "--no-standby",
    ]);
    let good = d.verified_generation();
    let copy = d.copy_model();
    // A generation that loads, then leaves every control request
    // unanswered (the worker keeps beating): the supervisor's canary on it
    // waits up to its 120 s deadline, then a LOAD of the next one would.
    d.publish(&copy, good + 1, Some("mute"));
    d.wait_for("the worker to load the mute generation", |d| {
        let w = d.worker()?;
        (w["stats"]["requests"]["LOAD"].as_u64()? >= 1).then_some(())
    });
    d.publish(&copy, good + 2, None);
    // The loop is not waiting on it: status answers at once, again and
    // again, and says the daemon cannot serve the live generation.
    for _ in 0..5 {
        let asked = Instant::now();
        let s = d.status().expect("status answers");
        let took = asked.elapsed();
        assert!(took < Duration::from_secs(2), "status took {took:?}");
        assert_eq!(s["healthy"], false, "{s}");
    }
    d.wait_for("the live generation to move on", |d| {
        d.status().filter(|s| s["generation"] == good + 2)
    });
    // SIGTERM stops it within the grace period (the worker, busy with a
    // call of the supervisor, is sent SIGTERM rather than SHUTDOWN).
    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    let took = asked.elapsed();
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(
        took < Duration::from_secs(8),
        "stopping took {took:?} with a 5 s grace period\n{}",
        d.log()
    );
}

#[test]
fn a_huge_grace_period_is_refused_and_the_largest_allowed_does_not_panic_on_sigterm() {
    // Beyond the documented range: refused before anything starts.
    let dir = tempfile::tempdir().unwrap();
    let out = evod()
        .args([
            "run",
            "--no-evolver",
            "--workers",
            "1",
            "--grace-period",
            "1000000000s",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--grace-period"), "{stderr}");
    // The largest allowed one: the deadline arithmetic (saturating, see
    // `policy::later`) must not panic PID 1 on SIGTERM.
    let mut d = Daemon::start(&["--grace-period", "24h"]);
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    let log = d.log();
    assert!(status.success(), "{status}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("all children stopped"), "{log}");
}

#[test]
fn a_model_truncated_in_place_is_unhealthy_until_a_good_file_is_published() {
    let mut d = Daemon::start(&[]);
    let good = d.verified_generation();
    let copy = d.copy_model();
    // Truncate the live file in place (same inode): nothing can serve it.
    let len = std::fs::metadata(d.model()).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.model())
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let s = d.wait_for("status to turn unhealthy", |d| {
        d.status().filter(|s| s["healthy"] == false)
    });
    assert_eq!(s["stopping"], false, "{s}");
    let check = evod()
        .args(["status", "--check", "--dir"])
        .arg(d.dir())
        .output()
        .unwrap();
    assert!(
        !check.status.success(),
        "status --check passed on a truncated model"
    );
    // A good file published over it: healthy again, on the new generation.
    d.publish(&copy, good + 1, None);
    let s = d.wait_for("status to turn healthy again", |d| {
        d.status()
            .filter(|s| s["healthy"] == true && s["good_generation"] == good + 1)
    });
    assert_eq!(s["generation"], good + 1, "{s}");
    assert!(
        d.log().contains("cannot be served"),
        "the truncation is not reported:\n{}",
        d.log()
    );
}

#[test]
fn a_worker_that_beats_but_never_answers_is_replaced() {
    let mut d = Daemon::start(&[
        "--eval-timeout",
        "1s",
        "--exec-timeout",
        "300ms",
        "--heartbeat-timeout",
        "120s",
        "--fallback-after",
        "1",
    ]);
    let good = d.verified_generation();
    let copy = d.copy_model();
    // History holds the good generation: a rollback would be possible.
    let history = d.dir().join("history");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::copy(&copy, history.join(format!("gen-{good:08}.gguf"))).unwrap();
    // A generation that loads, then leaves every control request
    // unanswered while the worker keeps beating.
    d.publish(&copy, good + 1, Some("mute"));
    let w = d.wait_for("the mute worker to be replaced", |d| {
        let w = d.worker()?;
        w["last_exit"]
            .as_str()?
            .contains("unresponsive")
            .then_some(w)
    });
    assert_sigkilled(&w);
    // Replaced for not answering, not blamed on the model: no rollback.
    let s = d.status().unwrap();
    assert_eq!(s["rollbacks"], 0, "{s}");
    assert_eq!(s["healthy"], false, "{s}");
}

#[test]
fn a_worker_slower_than_the_exec_timeout_is_still_verified() {
    // The worker serves one request at a time: the supervisor's canary may
    // wait behind an EVAL far longer than --exec-timeout. A generation
    // whose NEURAL_EXEC takes 1 s (as when queued behind a long EVAL)
    // with --exec-timeout 100ms is still verified: the canary's deadline
    // includes --eval-timeout.
    let mut d = Daemon::start(&[
        "--exec-timeout",
        "100ms",
        "--eval-timeout",
        "5s",
        "--no-standby",
    ]);
    let good = d.verified_generation();
    let copy = d.copy_model();
    d.publish(&copy, good + 1, Some("slow-exec"));
    d.wait_for("the slow generation to be verified", |d| {
        d.status()
            .filter(|s| s["healthy"] == true && s["good_generation"] == good + 1)
    });
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit().success(), "{}", d.log());
}

#[test]
fn a_worker_killed_during_a_load_is_replaced_and_the_daemon_ends_healthy_on_the_new_model() {
    let mut d = Daemon::start(&[]);
    let good = d.verified_generation();
    let copy = d.copy_model();
    let w = d.wait_for("worker 0 with a ready standby", |d| {
        d.worker().filter(|w| w["standby_ready"] == true)
    });
    let (pid, standby) = (w["pid"].as_u64().unwrap(), w["standby_pid"].clone());
    // A generation whose LOAD takes two seconds (beating): the supervisor's
    // LOAD is in flight when the worker is killed from outside.
    d.publish(&copy, good + 1, Some("slow-load"));
    d.wait_for("worker 0 in the LOAD of the new generation", |d| {
        d.worker()
            .filter(|w| w["pid"] == pid && w["stats"]["in_service"] == "LOAD")
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSEGV).unwrap();
    let s = d.wait_for("healthy on the new generation", |d| {
        d.status()
            .filter(|s| s["healthy"] == true && s["good_generation"] == good + 1)
    });
    assert_eq!(s["generation"], good + 1, "{s}");
    // Not blamed on the generation beyond the fallback's threshold.
    assert_eq!(s["rollbacks"], 0, "{s}");
    let w = &s["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["role"] == "worker" && c["index"] == 0)
        .unwrap()
        .clone();
    assert!(w["last_exit"].as_str().unwrap().contains("SIGSEGV"), "{w}");
    // The standby was promoted, serves the new generation, and the
    // supervisor timed the recovery.
    assert_eq!(w["pid"], standby, "{w}");
    assert_eq!(w["stats"]["model_generation"], good + 1, "{w}");
    assert_eq!(w["recoveries"], 1, "{w}");
    assert!(w["last_recovery_us"].as_f64().unwrap() > 0.0, "{w}");
    let exec = d.cli(&["exec", "--input", "0,0,0,0", "--json"]);
    assert!(exec.status.success(), "{}", common::text(&exec.stderr));
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit().success(), "{}", d.log());
}
