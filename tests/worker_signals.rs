//! A worker (and a warm standby) dies of the FIRST SIGSEGV sent to it from
//! outside, as chaos tools and `docker kill -s SEGV` send it: Rust's runtime
//! installs a SIGSEGV/SIGBUS handler for stack overflows that returns when
//! the signal is not a fault, so without the worker's own handlers
//! (`worker::install_crash_notice`) the first external signal was
//! survived. The worker's crash notice reaches the supervisor before its
//! death does; each death is recorded once, with its real exit status. A
//! worker that sends a notice without dying is killed and replaced, once.
//! Real daemon, real `kill(2)`; every wait is on `evod status --json` or
//! `/proc` against a deadline.

mod common;

use common::evod;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn start() -> Daemon {
        Daemon::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
        let child = evod()
            .args(["run", "--no-evolver", "--workers", "1", "--dir"])
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning evod run");
        Daemon { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    fn worker(&self) -> Option<Value> {
        let o = evod()
            .args(["status", "--json", "--dir"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        if !o.status.success() {
            return None;
        }
        let s: Value = serde_json::from_slice(&o.stdout).unwrap();
        s["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker")
            .cloned()
            .filter(|_| s["healthy"] == true)
    }

    /// The worker row once the daemon is healthy, the worker has been
    /// restarted `restarts` times and its warm standby is ready.
    fn wait_worker(&self, restarts: u64) -> Value {
        common::poll_until(
            &format!("a healthy daemon, worker restarted {restarts}x, standby ready"),
            DEADLINE,
            || {
                self.worker()
                    .filter(|w| w["restarts"] == restarts && w["standby_ready"] == true)
            },
            || self.log(),
        )
    }

    /// The worker row once its `last_exit` starts with `words` (a death
    /// learnt from a crash notice is described again when it is reaped).
    fn wait_last_exit(&self, words: &str) -> Value {
        common::poll_until(
            &format!("the worker's last_exit to start with {words:?}"),
            DEADLINE,
            || {
                self.worker().filter(|w| {
                    w["last_exit"]
                        .as_str()
                        .is_some_and(|l| l.starts_with(words))
                })
            },
            || self.log(),
        )
    }
}

fn gone(pid: u32) -> bool {
    // A zombie still has a /proc entry: gone means died AND reaped.
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn the_first_external_sigsegv_kills_a_worker_which_is_replaced() {
    let d = Daemon::start();
    let before = d.wait_worker(0);
    let pid = before["pid"].as_u64().unwrap() as u32;
    kill(Pid::from_raw(pid as i32), Signal::SIGSEGV).unwrap();
    let after = d.wait_worker(1);
    assert_ne!(after["pid"], before["pid"], "{after}");
    // The replacement is the promoted standby, and it serves.
    assert_eq!(after["pid"], before["standby_pid"], "{after}");
    assert_eq!(after["state"], "running", "{after}");
    // The exit status, once reaped, is the SIGSEGV's.
    let after = d.wait_last_exit("killed by signal 11 (SIGSEGV)");
    assert!(gone(pid), "worker {pid} survived one SIGSEGV\n{}", d.log());
    assert_eq!(after["restarts"], 1, "{after}");
    assert_eq!(after["recoveries"], 1, "{after}");
    // The supervisor logged the crash, once: from its notice (then its
    // reap, which only records the status) or, had the reap come first,
    // from the reap alone.
    let log = d.log();
    assert_eq!(
        log.matches("killed by signal 11 (SIGSEGV)").count(),
        1,
        "{log}"
    );
    let noticed = log
        .matches("sent a crash notice (SIGSEGV): replaced")
        .count();
    assert!(noticed <= 1, "{log}");
    assert_eq!(
        log.matches("killed by signal 11 (SIGSEGV) (after its crash notice")
            .count(),
        noticed,
        "{log}"
    );
}

#[test]
fn a_worker_that_sends_a_crash_notice_without_dying_is_killed_and_replaced_once() {
    let d = Daemon::start_with(&["--allow-fault-injection"]);
    let before = d.wait_worker(0);
    let pid = before["pid"].as_u64().unwrap() as u32;
    let o = evod()
        .args(["fault", "--worker", "0", "--kind", "notice", "--dir"])
        .arg(d.dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::text(&o.stderr));
    // Killed by the supervisor (only the notice can have told it: the
    // worker kept beating and answering), replaced by its standby.
    let after = d.wait_worker(1);
    assert_eq!(after["pid"], before["standby_pid"], "{after}");
    let after = d.wait_last_exit("killed by signal 9 (SIGKILL)");
    assert!(gone(pid), "worker {pid} survived its notice\n{}", d.log());
    assert!(
        after["last_exit"]
            .as_str()
            .unwrap()
            .contains("crash notice (SIGSEGV) without dying of it"),
        "{after}"
    );
    assert_eq!(after["restarts"], 1, "{after}");
    assert_eq!(after["recoveries"], 1, "{after}");
    let log = d.log();
    assert_eq!(
        log.matches("sent a crash notice (SIGSEGV): replaced")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("and is still running: killing it").count(),
        1,
        "{log}"
    );
    assert_eq!(
        log.matches("killed by signal 9 (SIGKILL)").count(),
        1,
        "{log}"
    );
}

#[test]
fn the_first_external_sigsegv_kills_a_standby_which_is_replaced() {
    let d = Daemon::start();
    let before = d.wait_worker(0);
    let standby = before["standby_pid"].as_u64().unwrap() as u32;
    kill(Pid::from_raw(standby as i32), Signal::SIGSEGV).unwrap();
    let after = common::poll_until(
        "the standby to die and a new one to be ready",
        DEADLINE,
        || {
            d.worker().filter(|w| {
                w["standby_ready"] == true && w["standby_pid"].as_u64() != Some(standby.into())
            })
        },
        || d.log(),
    );
    assert!(gone(standby), "standby {standby} survived one SIGSEGV");
    // The serving worker was not touched.
    assert_eq!(after["pid"], before["pid"], "{after}");
    assert_eq!(after["restarts"], 0, "{after}");
}
