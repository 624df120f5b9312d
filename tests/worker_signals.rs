//! A worker (and a warm standby) dies of the FIRST SIGSEGV sent to it from
//! outside, as chaos tools and `docker kill -s SEGV` send it: Rust's runtime
//! installs a SIGSEGV/SIGBUS handler for stack overflows that returns when
//! the signal is not a fault, so without `worker::die_on_first_segv` the
//! first external signal was survived. Real daemon, real `kill(2)`; every
//! wait is on `evod status --json` or `/proc` against a deadline.

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
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
        let child = evod()
            .args(["run", "--no-evolver", "--workers", "1", "--dir"])
            .arg(dir.path())
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
    assert!(gone(pid), "worker {pid} survived one SIGSEGV\n{}", d.log());
    assert_ne!(after["pid"], before["pid"], "{after}");
    let last_exit = after["last_exit"].as_str().unwrap();
    assert!(
        last_exit.starts_with("killed by signal 11 (SIGSEGV)"),
        "the worker did not die of the SIGSEGV: {after}"
    );
    // The supervisor logged the crash, once.
    assert_eq!(
        d.log().matches("killed by signal 11 (SIGSEGV)").count(),
        1,
        "{}",
        d.log()
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
