//! Process tests of the supervisor (`evod run`): real processes, real
//! signals. Every wait polls `evod status --json`, `/proc` or the exit of a
//! process against a deadline; nothing sleeps a fixed time to "let things
//! happen".

mod common;

use common::{Daemon, assert_sigkilled, evod, text};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `cond` until it returns `Some`, failing with `what` past the deadline.
fn wait_for<T>(what: &str, cond: impl FnMut() -> Option<T>, context: impl Fn() -> String) -> T {
    common::poll_until(what, DEADLINE, cond, context)
}

/// Pids of every running child in a status report, standbys included.
fn child_and_standby_pids(status: &Value) -> Vec<u32> {
    status["children"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| [c["pid"].as_u64(), c["standby_pid"].as_u64()])
        .flatten()
        .map(|p| p as u32)
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: count it as alive (not reaped).
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `evod run --no-evolver --allow-fault-injection` in a temporary state
/// folder ([`Daemon`]), and what these tests do with it.
trait SupervisorDaemon {
    fn start(args: &[&str]) -> Daemon;
    fn start_with(workers: u32, args: &[&str]) -> Daemon;
    /// Starts on `dir`, which may hold an earlier daemon's state, and waits
    /// until it is healthy.
    fn start_in(dir: tempfile::TempDir, workers: u32, args: &[&str]) -> Daemon;
    fn wait_healthy(&self) -> Value;
    fn worker_pid(&self) -> u32;
    /// Waits until worker 0 runs again as a different process whose last
    /// exit mentions `words`; returns its status row.
    fn wait_respawn(&self, old_pid: u32, words: &str) -> Value;
    /// `evod exec` of one CartPole input row: the outputs, as printed.
    fn exec(&self) -> String;
    /// Waits until worker 0 has a standby that is ready; returns its pid.
    fn wait_standby_ready(&self) -> u32;
    fn fault(&self, kind: &str) -> Output;
    fn runtime_dir(&self) -> PathBuf;
}

impl SupervisorDaemon for Daemon {
    fn start(args: &[&str]) -> Daemon {
        Daemon::start_with(1, args)
    }

    fn start_with(workers: u32, args: &[&str]) -> Daemon {
        Daemon::start_in(tempfile::tempdir().unwrap(), workers, args)
    }

    fn start_in(dir: tempfile::TempDir, workers: u32, args: &[&str]) -> Daemon {
        let workers = workers.to_string();
        let base = [
            "--no-evolver",
            "--allow-fault-injection",
            "--workers",
            &workers,
        ];
        let args: Vec<&str> = base.iter().chain(args).copied().collect();
        let mut d = Daemon::spawn(dir, &args, DEADLINE);
        d.wait_for("a healthy daemon", |d| {
            d.status().filter(|s| s["healthy"] == true)
        });
        d
    }

    fn wait_healthy(&self) -> Value {
        wait_for(
            "a healthy daemon",
            || self.status().filter(|s| s["healthy"] == true),
            || self.log(),
        )
    }

    fn worker_pid(&self) -> u32 {
        let w = self.worker().expect("worker row");
        w["pid"].as_u64().expect("running worker has a pid") as u32
    }

    fn wait_respawn(&self, old_pid: u32, words: &str) -> Value {
        wait_for(
            &format!("a new worker after '{words}'"),
            || {
                let w = self.worker()?;
                let pid = w["pid"].as_u64()? as u32;
                let last = w["last_exit"].as_str()?;
                (pid != old_pid && last.contains(words) && w["state"] == "running").then_some(w)
            },
            || format!("status: {:?}\nlog:\n{}", self.status(), self.log()),
        )
    }

    fn exec(&self) -> String {
        let o = evod()
            .args(["exec", "--input", "0.1,0.2,0.3,0.4", "--dir"])
            .arg(self.dir())
            .output()
            .unwrap();
        assert!(o.status.success(), "exec: {}", text(&o.stderr));
        text(&o.stdout).trim().to_owned()
    }

    fn wait_standby_ready(&self) -> u32 {
        wait_for(
            "a ready standby",
            || {
                let w = self.worker()?;
                (w["standby_ready"] == true).then(|| w["standby_pid"].as_u64().unwrap() as u32)
            },
            || format!("status: {:?}\nlog:\n{}", self.status(), self.log()),
        )
    }

    fn fault(&self, kind: &str) -> Output {
        let o = evod()
            .args(["fault", "--worker", "0", "--kind", kind, "--dir"])
            .arg(self.dir())
            .output()
            .unwrap();
        assert!(o.status.success(), "evod fault {kind}: {}", text(&o.stderr));
        o
    }

    fn runtime_dir(&self) -> PathBuf {
        self.dir().join(".evod")
    }
}

#[test]
fn clients_without_a_daemon_say_so_and_exit_4() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["status"],
        vec!["status", "--check"],
        vec!["exec", "--input", "0.1,0.2"],
        vec!["stop"],
        vec!["rollback"],
    ] {
        let o = evod()
            .args(&args)
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {err}");
        assert!(err.contains("no evod daemon is running"), "{args:?}: {err}");
        assert!(err.contains(".evod/control.sock"), "{args:?}: {err}");
    }
}

#[test]
fn worker_crashes_are_respawned_and_explained_in_status() {
    let d = Daemon::start(&[]);
    let s = d.wait_healthy();
    assert_eq!(s["children"][0]["epoch"], 1);
    // Real signals from outside, and fault opcodes from inside the worker.
    let cases: [(&str, &str); 4] = [
        ("segv", "killed by signal 11 (SIGSEGV)"),
        ("kill", "killed by signal 9 (SIGKILL)"),
        ("abort", "killed by signal 6 (SIGABRT)"),
        ("exit:7", "exited with code 7"),
    ];
    for (n, (kind, words)) in cases.iter().enumerate() {
        let pid = d.worker_pid();
        if *kind == "kill" {
            kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        } else {
            d.fault(kind);
        }
        let w = d.wait_respawn(pid, words);
        assert_eq!(w["restarts"], n as u64 + 1, "{w}");
        // The epoch was bumped before each respawn.
        assert_eq!(w["epoch"], n as u64 + 2, "{w}");
        assert!(!alive(pid), "old worker {pid} not reaped");
    }
    let s = d.wait_healthy();
    assert!(s["children"][0]["ping_us"].as_f64().unwrap() > 0.0);
    let log = d.log();
    assert!(log.contains("killed by signal 11 (SIGSEGV)"), "{log}");
    // The respawned worker serves: exec answers.
    assert_eq!(d.exec().split(',').count(), 2);
}

#[test]
fn a_hung_worker_is_killed_by_the_watchdog_and_respawned() {
    let d = Daemon::start(&["--heartbeat-timeout", "500ms"]);
    let pid = d.worker_pid();
    d.fault("hang");
    let w = d.wait_respawn(pid, "heartbeat stalled");
    assert_sigkilled(&w);
    d.wait_healthy();
}

#[test]
fn too_many_restarts_give_up_with_exit_code_5() {
    let mut d = Daemon::start(&[
        "--restart-intensity",
        "2",
        "--restart-period",
        "10m",
        "--backoff-initial",
        "1ms",
    ]);
    for n in 0..2 {
        let pid = d.worker_pid();
        d.fault("segv");
        let w = d.wait_respawn(pid, "SIGSEGV");
        assert_eq!(w["restarts"], n + 1);
    }
    let pid = d.worker_pid();
    // The daemon may exit before it writes this request's answer: only the
    // exit status below matters.
    let _ = evod()
        .args(["fault", "--worker", "0", "--kind", "segv", "--dir"])
        .arg(d.dir())
        .output()
        .unwrap();
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(status.code(), Some(5), "{log}");
    assert!(log.contains("giving up"), "{log}");
    assert!(log.contains("3 times within"), "{log}");
    assert!(!alive(pid));
}

#[test]
fn sigterm_stops_gracefully_with_exit_0_and_no_child_left() {
    let mut d = Daemon::start_with(2, &[]);
    let s = d.wait_healthy();
    let pids = child_and_standby_pids(&s);
    assert_eq!(pids.len(), 4, "two workers and their standbys: {s}");
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    for pid in pids {
        assert!(!alive(pid), "child {pid} outlived the supervisor");
    }
    assert!(
        d.log().contains("worker 0 exited with code 0"),
        "{}",
        d.log()
    );
    assert!(!d.runtime_dir().exists(), "runtime folder left behind");
}

#[test]
fn a_second_sigint_stops_at_once() {
    // A hung worker ignores SHUTDOWN: without the second signal the stop
    // would take the whole (long) grace period.
    let mut d = Daemon::start(&["--grace-period", "1h", "--heartbeat-timeout", "1h"]);
    let pid = d.worker_pid();
    d.fault("hang");
    d.signal(Signal::SIGINT);
    wait_for(
        "the graceful stop to begin",
        || d.log().contains("stopping gracefully").then_some(()),
        || d.log(),
    );
    assert!(
        alive(pid),
        "the hung worker should still be waiting for its grace period"
    );
    d.signal(Signal::SIGINT);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(130), "{}", d.log());
    assert!(!alive(pid), "worker {pid} left running");
}

/// Where a process's descriptors point (`/proc/PID/fd` links).
fn fd_links(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| {
            r.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn shm_files() -> Vec<std::ffi::OsString> {
    std::fs::read_dir("/dev/shm")
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

#[test]
fn a_sigkilled_supervisor_takes_its_children_and_leaves_nothing_behind() {
    let shm_before = shm_files();
    let mut d = Daemon::start_with(2, &[]);
    let s = d.wait_healthy();
    let pids = child_and_standby_pids(&s);
    // The shared segments are memfds: each worker holds one, and no
    // process of the daemon holds anything in /dev/shm.
    for w in s["children"].as_array().unwrap() {
        let pid = w["pid"].as_u64().unwrap() as u32;
        let links = fd_links(pid);
        if w["role"] == "worker" {
            assert!(
                links.iter().any(|l| l.starts_with("/memfd:evod-ring")),
                "worker {pid} holds no memfd segment: {links:?}"
            );
        }
        assert!(
            !links.iter().any(|l| l.starts_with("/dev/shm")),
            "{pid}: {links:?}"
        );
    }
    let links = fd_links(d.pid());
    assert!(
        links.iter().any(|l| l.starts_with("/memfd:evod-ring")),
        "the supervisor holds no memfd segment: {links:?}"
    );
    assert!(d.runtime_dir().join("control.sock").exists());
    d.signal(Signal::SIGKILL);
    let status = d.wait_exit();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_eq!(pids.len(), 4, "two workers and their standbys: {s}");
    for &pid in &pids {
        wait_for(
            &format!("child {pid} to die with its parent"),
            // Reparented to init, which reaps it: gone from /proc.
            || (!alive(pid)).then_some(()),
            || d.log(),
        );
    }
    wait_for(
        "the janitor to remove the runtime folder",
        || (!d.runtime_dir().exists()).then_some(()),
        || d.log(),
    );
    // Nothing appeared in /dev/shm. (Other processes of the machine may
    // use it too; a file there that appeared meanwhile is listed.)
    let new: Vec<_> = shm_files()
        .into_iter()
        .filter(|n| !shm_before.contains(n))
        .collect();
    assert!(new.is_empty(), "new in /dev/shm: {new:?}");
    // A new daemon starts on the same folder (no stale socket in the way)
    // and runs: its workers have pids and segment epochs, and the status
    // names the model and its generation.
    let model = d.dir().join("vectorland.gguf");
    let generation = evod_store::generation_of(&evod_gguf::GgufFile::open(&model).unwrap());
    let dir = d.take_dir();
    let again = Daemon::start_in(dir, 2, &[]);
    let s = again.wait_healthy();
    assert_eq!(s["pid"], again.pid());
    assert_eq!(s["model"], model.display().to_string());
    assert_eq!(s["generation"].as_u64(), generation, "{s}");
    let workers: Vec<_> = s["children"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["role"] == "worker")
        .collect();
    assert_eq!(workers.len(), 2, "{s}");
    for w in workers {
        assert_eq!(w["state"], "running", "{w}");
        let pid = w["pid"].as_u64().expect("a running worker has a pid") as u32;
        assert!(alive(pid) && !pids.contains(&pid), "{w}");
        assert!(w["epoch"].as_u64().is_some_and(|e| e >= 1), "{w}");
        // The generation the worker itself reports having loaded.
        assert_eq!(
            w["stats"]["model_generation"].as_u64(),
            Some(generation.unwrap_or(0)),
            "{w}"
        );
    }
}

#[test]
fn status_check_and_json_describe_the_daemon() {
    let d = Daemon::start(&[]);
    let o = evod()
        .args(["status", "--check", "--dir"])
        .arg(d.dir())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).starts_with("healthy"));
    let s = d.status().unwrap();
    assert_eq!(s["pid"], d.pid());
    assert_eq!(s["stopping"], false);
    let w = &s["children"][0];
    for key in [
        "role", "index", "state", "pid", "uptime_s", "restarts", "epoch", "ping_us", "stats",
    ] {
        assert!(!w[key].is_null(), "missing {key} in {w}");
    }
    let o = evod()
        .args(["status", "--dir"])
        .arg(d.dir())
        .output()
        .unwrap();
    let human = text(&o.stdout);
    assert!(
        human.contains("worker") && human.contains("running"),
        "{human}"
    );
    // The control socket and its folder are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.runtime_dir()), 0o700);
    assert_eq!(mode(&d.runtime_dir().join("control.sock")), 0o600);
}

/// Prepares a fallback test: the daemon's model is copied into the history
/// and verified by the supervisor (its canary answered). Returns the file,
/// the good generation and the history folder.
fn verified_good_generation(d: &Daemon) -> (evod_gguf::GgufFile, u64, PathBuf) {
    let model = d.dir().join("vectorland.gguf");
    let good = evod_gguf::GgufFile::open(&model).unwrap();
    let generation = good
        .get("evod.generation")
        .and_then(|v| v.as_u64())
        .unwrap();
    let history = d.dir().join("history");
    std::fs::create_dir_all(&history).unwrap();
    std::fs::copy(&model, history.join(format!("gen-{generation:08}.gguf"))).unwrap();
    wait_for(
        "the supervisor to verify the good generation",
        || {
            d.status()
                .filter(|s| s["good_generation"] == generation)
                .map(|_| ())
        },
        || format!("status {:?}\nlog:\n{}", d.status(), d.log()),
    );
    (good, generation, history)
}

/// Publishes (atomically) `good` renumbered `generation` and carrying
/// `evod.fault = fault` (honoured only with --allow-fault-injection).
fn publish_faulty(d: &Daemon, good: &evod_gguf::GgufFile, generation: u64, fault: &str) {
    publish(d, good, generation, Some(fault));
}

/// Publishes (atomically: a new inode at the live path) `good` renumbered
/// `generation`, with `evod.fault = fault` if given.
fn publish(d: &Daemon, good: &evod_gguf::GgufFile, generation: u64, fault: Option<&str>) {
    use evod_gguf::{PublishOptions, Value, rewrite};
    rewrite(
        good,
        &d.dir().join("vectorland.gguf"),
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

/// Waits for rollback number `n` to `to`; checks the live file and the
/// quarantined one.
fn assert_rolled_back(d: &Daemon, n: u64, to: u64, bad: u64, fault: &str) {
    let s = wait_for(
        "the rollback",
        || {
            d.status().filter(|s| {
                s["rollbacks"] == n && s["healthy"] == true && s["good_generation"] == to
            })
        },
        || format!("status {:?}\nlog:\n{}", d.status(), d.log()),
    );
    assert_eq!(s["generation"], to, "{s}");
    let restored = evod_gguf::GgufFile::open(&d.dir().join("vectorland.gguf")).unwrap();
    assert_eq!(
        restored.get("evod.generation").and_then(|v| v.as_u64()),
        Some(to)
    );
    assert!(restored.get("evod.fault").is_none());
    let aside = d
        .dir()
        .join("history/quarantine")
        .join(format!("gen-{bad}.gguf"));
    let quarantined = evod_gguf::GgufFile::open(&aside).unwrap();
    assert_eq!(
        quarantined.get("evod.fault").and_then(|v| v.as_str()),
        Some(fault)
    );
    let log = d.log();
    assert!(log.contains("killed by signal 11 (SIGSEGV)"), "{log}");
    assert!(
        log.contains(&format!("rolling back to generation {to}")),
        "{log}"
    );
    // The restored file itself was loaded and answered the canary (its
    // first verification was before the bad generation came).
    wait_for(
        "the restored file to be verified",
        || {
            (d.log()
                .matches(&format!("generation {to} verified"))
                .count()
                >= 2)
                .then_some(())
        },
        || d.log(),
    );
}

#[test]
fn a_generation_that_crash_loops_the_workers_is_rolled_back_and_quarantined() {
    let d = Daemon::start(&["--fallback-after", "3"]);
    let (good, good_generation, _) = verified_good_generation(&d);
    // A generation that crashes the runtime on LOAD.
    publish_faulty(&d, &good, good_generation + 1, "segv");
    assert_rolled_back(&d, 1, good_generation, good_generation + 1, "segv");
}

#[test]
fn a_generation_that_crashes_only_when_served_is_caught_by_the_canary() {
    // The worker has been up for long when the bad generation comes: its
    // crashes count because the generation was never verified, not because
    // the worker was young.
    let d = Daemon::start_with(2, &["--fallback-after", "3"]);
    let (good, good_generation, _) = verified_good_generation(&d);
    wait_for(
        "workers up for over a second",
        || {
            let s = d.status()?;
            let ok = s["children"]
                .as_array()?
                .iter()
                .all(|c| c["uptime_s"].as_f64().unwrap_or(0.0) > 1.2);
            ok.then_some(())
        },
        || d.log(),
    );
    // Loads fine (LOAD accepts it); crashes at the first NEURAL_EXEC, which
    // only the supervisor's canary sends here (no evolver, no client).
    publish_faulty(&d, &good, good_generation + 1, "segv-on-exec");
    assert_rolled_back(&d, 1, good_generation, good_generation + 1, "segv-on-exec");
    // Once the restored generation is verified, crashes are not blamed on
    // it: three quick ones in a row roll nothing back.
    for _ in 0..3 {
        let pid = d.worker_pid();
        d.fault("segv");
        d.wait_respawn(pid, "SIGSEGV");
    }
    let s = d.wait_healthy();
    assert_eq!(s["rollbacks"], 1, "{s}");
    assert_eq!(s["generation"], good_generation, "{s}");
}

#[test]
fn a_crashed_worker_is_replaced_by_its_warm_standby() {
    let d = Daemon::start(&[]);
    let standby = d.wait_standby_ready();
    let worker = d.worker_pid();
    assert_ne!(standby, worker);
    // The standby is parked (not the ring's server) and says so in `ps`.
    assert_eq!(
        common::children_named(d.pid(), "evod-standby"),
        vec![standby]
    );
    assert_eq!(common::children_with_role(d.pid(), "worker"), vec![worker]);
    d.fault("segv");
    let w = d.wait_respawn(worker, "SIGSEGV");
    assert_eq!(w["pid"], standby, "the standby was promoted: {w}");
    assert_eq!(w["epoch"], 2, "{w}");
    let comm = std::fs::read_to_string(format!("/proc/{standby}/comm")).unwrap();
    assert_eq!(comm.trim(), "evod-worker");
    assert!(d.log().contains("standby promoted"), "{}", d.log());
    // The promoted standby serves the model, and a new standby takes its place.
    assert_eq!(d.exec().split(',').count(), 2);
    let next = d.wait_standby_ready();
    assert!(next != standby && next != worker, "{next}");
}

/// Whether `pid` has a mapping of the file with inode `ino`.
fn maps_inode(pid: u32, ino: u64) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.lines()
        .any(|l| l.split_whitespace().nth(4) == Some(ino.to_string().as_str()))
}

#[test]
fn a_standby_maps_a_newly_published_model_before_it_is_promoted() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start(&[]);
    let standby = d.wait_standby_ready();
    let worker = d.worker_pid();
    let live = d.dir().join("vectorland.gguf");
    let old = std::fs::metadata(&live).unwrap().ino();
    assert!(maps_inode(standby, old), "the standby maps the live file");
    // A new generation, published atomically: a new inode at the path.
    let good = evod_gguf::GgufFile::open(&live).unwrap();
    let generation = good
        .get("evod.generation")
        .and_then(|v| v.as_u64())
        .unwrap()
        + 1;
    publish(&d, &good, generation, None);
    drop(good);
    let new = std::fs::metadata(&live).unwrap().ino();
    assert_ne!(new, old);
    // Told by the supervisor, the standby (not promoted, same process)
    // maps the new file and lets the old one go.
    wait_for(
        "the standby to map the new file instead of the old one",
        || (maps_inode(standby, new) && !maps_inode(standby, old)).then_some(()),
        || {
            let maps = std::fs::read_to_string(format!("/proc/{standby}/maps"));
            format!("maps: {maps:?}\nlog:\n{}", d.log())
        },
    );
    assert_eq!(d.worker().unwrap()["standby_pid"], standby);
    // Promoted at the next crash, it serves the new generation.
    d.fault("segv");
    let w = d.wait_respawn(worker, "SIGSEGV");
    assert_eq!(w["pid"], standby, "{w}");
    wait_for(
        "the promoted standby on the new generation",
        || d.worker().filter(|w| w["generation"] == generation),
        || format!("status: {:?}\nlog:\n{}", d.status(), d.log()),
    );
}

#[test]
fn a_killed_standby_is_replaced_and_the_worker_is_untouched() {
    let d = Daemon::start(&[]);
    let standby = d.wait_standby_ready();
    let worker = d.worker_pid();
    kill(Pid::from_raw(standby as i32), Signal::SIGKILL).unwrap();
    let next = wait_for(
        "a new standby",
        || {
            let w = d.worker()?;
            let pid = w["standby_pid"].as_u64()? as u32;
            (pid != standby && w["standby_ready"] == true).then_some(pid)
        },
        || format!("status: {:?}\nlog:\n{}", d.status(), d.log()),
    );
    assert!(!alive(standby), "the killed standby was not reaped");
    let w = d.worker().unwrap();
    assert_eq!(w["pid"], worker, "{w}");
    assert_eq!(w["restarts"], 0, "{w}");
    assert!(d.log().contains("standby of worker 0 killed by signal 9"));
    // And it is the one promoted at the next crash.
    d.fault("abort");
    let w = d.wait_respawn(worker, "SIGABRT");
    assert_eq!(w["pid"], next, "{w}");
}

#[test]
fn no_standby_starts_workers_cold() {
    let d = Daemon::start(&["--no-standby"]);
    let s = d.wait_healthy();
    assert_eq!(s["children"][0]["standby_pid"], Value::Null, "{s}");
    let workers = common::children_with_role(d.pid(), "worker");
    assert_eq!(workers, vec![d.worker_pid()]);
    let standbys = common::children_named(d.pid(), "evod-standby");
    assert!(standbys.is_empty(), "standby processes: {standbys:?}");
    let worker = d.worker_pid();
    d.fault("segv");
    let w = d.wait_respawn(worker, "SIGSEGV");
    assert_eq!(w["standby_pid"], Value::Null, "{w}");
    assert!(!d.log().contains("standby promoted"), "{}", d.log());
}

#[test]
fn a_worker_past_its_memory_limit_aborts_and_is_restarted() {
    let d = Daemon::start(&["--worker-memory-limit", "256M"]);
    let worker = d.worker_pid();
    let standby = d.wait_standby_ready();
    for pid in [worker, standby] {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let data = limits
            .lines()
            .find(|l| l.starts_with("Max data size"))
            .unwrap();
        assert_eq!(
            data.split_whitespace().nth(3),
            Some("268435456"),
            "pid {pid}: {data}"
        );
    }
    // Within the limit the worker allocates and serves on.
    d.fault("alloc:16");
    assert_eq!(d.exec().split(',').count(), 2);
    assert_eq!(d.worker_pid(), worker);
    // Past it the allocation fails: abort, restart.
    d.fault("alloc:1024");
    let w = d.wait_respawn(worker, "killed by signal 6 (SIGABRT)");
    assert_eq!(w["restarts"], 1, "{w}");
    assert!(
        d.log()
            .contains("memory allocation of 1073741824 bytes failed"),
        "{}",
        d.log()
    );
    assert_eq!(d.exec().split(',').count(), 2);
}

#[test]
fn a_worker_that_lies_on_its_control_channel_is_replaced() {
    // It keeps running and beating, but answers every control request with
    // a reply whose payload lies outside the payload area: the supervisor
    // (the reader of that channel) must not trust it again.
    let d = Daemon::start(&[]);
    let worker = d.worker_pid();
    d.fault("lie-control");
    // The status PING (or the tick's canary) reads the lie.
    let w = d.wait_respawn(worker, "its control channel is corrupt");
    assert_sigkilled(&w);
    assert_eq!(w["restarts"], 1, "{w}");
    assert!(!alive(worker), "the liar was not reaped");
    assert_eq!(d.exec().split(',').count(), 2);
    d.wait_healthy();
}
