//! `evod run` as PID 1 of a fresh PID namespace (`unshare --pid --fork
//! --mount-proc`), as in a container: orphans re-parented to it are reaped,
//! SIGTERM is honoured (a PID 1 without handlers would ignore it), and no
//! zombie is left. Needs root (CI runs as root); unshare's failure is a test
//! failure with its message, never a silent skip.

mod common;

use common::evod;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(60);

fn wait_for<T>(what: &str, cond: impl FnMut() -> Option<T>, context: impl Fn() -> String) -> T {
    common::poll_until(what, DEADLINE, cond, context)
}

/// Host pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The state letter of a process (`Z` for a zombie).
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

struct Namespace {
    unshare: Child,
    dir: tempfile::TempDir,
}

impl Namespace {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    /// The host pid of `evod run` (PID 1 inside).
    fn init_pid(&self) -> u32 {
        wait_for(
            "unshare to fork evod run",
            || children(self.unshare.id()).first().copied(),
            || self.log(),
        )
    }

    fn healthy(&self) -> bool {
        let o = evod()
            .args(["status", "--check", "--dir"])
            .arg(self.dir.path())
            .output()
            .unwrap();
        o.status.success()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

fn start() -> Namespace {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let unshare = Command::new("unshare")
        // --kill-child: if this test fails and kills unshare, the whole
        // namespace goes with it.
        .args(["--pid", "--fork", "--mount-proc", "--kill-child", "--"])
        .arg(env!("CARGO_BIN_EXE_evod"))
        .args(["run", "--no-evolver", "--workers", "1", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("running unshare (util-linux) — needs root, as in CI");
    let ns = Namespace { unshare, dir };
    wait_for(
        "evod run as PID 1 to be healthy",
        || ns.healthy().then_some(()),
        || ns.log(),
    );
    ns
}

#[test]
fn as_pid_1_orphans_are_reaped_and_sigterm_is_honoured() {
    let mut ns = start();
    let init = ns.init_pid();
    let status = evod()
        .args(["status", "--json", "--dir"])
        .arg(ns.dir.path())
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(s["pid"], 1, "evod run is not PID 1: {s}");

    // A grandchild orphaned inside the namespace: `sh` (entered into the
    // namespace by nsenter) starts `sleep` and exits; `sleep` is re-parented
    // to PID 1 = evod run; the test then kills it, and evod must reap it.
    // (The sleep is long so that a loaded machine cannot let it end before
    // the test has seen it adopted.)
    let before = children(init);
    let o = Command::new("nsenter")
        .args(["--target", &init.to_string(), "--pid", "--mount", "--"])
        .args(["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & exit 0"])
        .output()
        .expect("nsenter");
    assert!(
        o.status.success(),
        "nsenter: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let orphan = wait_for(
        "the orphan to be adopted by PID 1",
        || {
            children(init)
                .into_iter()
                .find(|c| !before.contains(c) && comm(*c) == "sleep")
        },
        || format!("children {:?}\n{}", children(init), ns.log()),
    );
    kill(Pid::from_raw(orphan as i32), Signal::SIGKILL).unwrap();
    wait_for(
        "the orphan to exit and be reaped (no zombie)",
        || (!Path::new(&format!("/proc/{orphan}")).exists()).then_some(()),
        || format!("orphan state {:?}\n{}", state(orphan), ns.log()),
    );
    let zombies: Vec<u32> = children(init)
        .into_iter()
        .filter(|c| state(*c) == Some('Z'))
        .collect();
    assert!(zombies.is_empty(), "zombies under PID 1: {zombies:?}");

    // SIGTERM to PID 1: graceful stop, exit 0 (unshare passes it on).
    kill(Pid::from_raw(init as i32), Signal::SIGTERM).unwrap();
    let status = common::wait_exit(&mut ns.unshare, DEADLINE)
        .unwrap_or_else(|| panic!("PID 1 ignored SIGTERM\n{}", ns.log()));
    assert_eq!(status.code(), Some(0), "{}", ns.log());
    assert!(ns.log().contains("stopping gracefully"), "{}", ns.log());
}
