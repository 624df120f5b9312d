//! `cargo xtask bench recovery_load`: a worker killed by SIGSEGV → serving
//! again, while a 1 GiB `LOAD` is in flight, through a real `evod run`.
//!
//! The daemon (`evod run --no-evolver --workers 2`, warm standbys on, the
//! release binary from `EVOD_BIN`) serves a 4-16370-16370-2 CartPole model
//! (268 M parameters, 1.0 GiB). Each round publishes a model file
//! atomically (a hard link of one of two 1 GiB copies renamed over the live
//! path: a new inode, as the evolver's publish), which makes the
//! supervisor identify it and send `LOAD` (every value and the checksum
//! checked: about a second per worker) to both workers. Once the status
//! report shows the victim worker in that `LOAD` (its stats block's
//! `in_service`), the bench sends it SIGSEGV with `kill(2)` from outside
//! and polls the control socket until the slot shows a new pid that has
//! recovered. Figures per crash:
//!
//! - **outside**, the headline: `kill()` → the status report shows the new
//!   pid recovered (serving the live model). It includes the worker's
//!   crash notice (its signal handler's one byte on its link), the
//!   supervisor's reaction (SIGKILL, epoch bump, promotion), the
//!   replacement's first answer and the status poll (one control-socket
//!   round trip every ~200 µs);
//! - the supervisor's own (`last_recovery_us` in the status row, and the
//!   `evod_worker_recovery_seconds` histogram of `/metrics`): from the
//!   death's notice (or its reap, without one) to its replacement (the
//!   promoted standby) answering its first request, a `PING`, while
//!   serving the live model file;
//! - `kill()` → the kernel has ended the process (its pidfd is readable:
//!   after the teardown of its memory, when SIGCHLD is sent), waited for
//!   on a thread blocked in `poll`, so it costs no CPU while the recovery
//!   is measured. Before the crash notice this was on the recovery path;
//! - `kill()` → the first status report that shows the death (the slot's
//!   pid or restart count changed: the crash notice was acted on), and the
//!   status calls' own round trip (`*_status_poll_median_us`), which split
//!   the outside figure into the way in and the poll.
//!
//! Peer, same run, same daemon: the same crash with the daemon idle (no
//! `LOAD` in flight). Rounds: `ROUNDS` idle, then `ROUNDS` during a LOAD.
//! After each crash the bench waits for the reap to record the real exit
//! status (`killed by signal 11 (SIGSEGV)`) and checks every death was
//! counted once.
//!
//! Usage: `EVOD_BIN=target/release/evod bench_recovery_load OUT.json
//! [ROUNDS]` (writes `recovery_during_load_median_us` (outside),
//! `recovery_during_load_supervisor_median_us`,
//! `recovery_during_load_exit_median_us`, the idle peer's
//! `recovery_idle_*`, samples, how many deaths the supervisor learnt from
//! a crash notice, and how many crashes found the other worker still in
//! its `LOAD`). To look into a figure: `EVOD_LOG` sets the daemon's log
//! level (`info` if unset), `EVOD_BENCH_LOG=PATH` keeps its log there, and
//! `EVOD_BENCH_TRACE=1` prints every status poll of a crash (when it began
//! after the `kill()`, how long it took, what it showed).

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evod_wire::control::{ChildStatus, Request, StatusReport};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Bounds every wait (guards against a hang; not a measurement).
const PATIENCE: Duration = Duration::from_secs(300);
const WORKERS: usize = 2;

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    metrics: std::net::SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        // `EVOD_BENCH_LOG=PATH`: keep the daemon's log (its `EVOD_LOG`
        // level is taken from the bench's environment, `info` if unset).
        if let Some(keep) = std::env::var_os("EVOD_BENCH_LOG") {
            let _ = std::fs::copy(self.dir.path().join("run.log"), keep);
        }
    }
}

impl Daemon {
    fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|e| panic!("status: {e}\nlog:\n{}", self.log()))
    }

    fn try_status(&self) -> Result<StatusReport, evod_wire::ClientError> {
        let value =
            evod_wire::control::call(&self.socket, &Request::Status, Duration::from_secs(10))?;
        Ok(serde_json::from_value(value).expect("a status report"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("run.log")).unwrap_or_default()
    }

    /// `GET /metrics`.
    fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(self.metrics).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("metrics text");
        out
    }

    /// Polls the status until `cond` holds; returns that report.
    fn wait_for(&mut self, what: &str, cond: impl Fn(&StatusReport) -> bool) -> StatusReport {
        let end = Instant::now() + PATIENCE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("evod run exited ({s}) waiting for {what}\n{}", self.log());
            }
            // Not answering yet (starting): asked again.
            let s = self.try_status();
            if let Ok(s) = &s
                && cond(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {s:?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every worker verified on the live model (`/metrics`), each with a
    /// ready standby and nothing in service.
    fn wait_steady(&mut self) {
        let end = Instant::now() + PATIENCE;
        loop {
            let s = self.wait_for("every worker serving with a ready standby", |s| {
                s.healthy
                    && workers(s).count() == WORKERS
                    && workers(s).all(|c| {
                        c.state == "running"
                            && c.standby_ready == Some(true)
                            && in_service(c).is_none()
                    })
            });
            let ready = format!("evod_workers_ready {WORKERS}\n");
            if self.metrics().contains(&ready) {
                return;
            }
            assert!(
                Instant::now() < end,
                "workers never all verified: {s:?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn workers(s: &StatusReport) -> impl Iterator<Item = &ChildStatus> {
    s.children.iter().filter(|c| c.role == "worker")
}

fn worker(s: &StatusReport, index: usize) -> &ChildStatus {
    workers(s).find(|c| c.index == index).expect("a worker row")
}

/// What the worker's stats block says it serves now.
fn in_service(c: &ChildStatus) -> Option<&str> {
    c.stats.as_ref()?.get("in_service")?.as_str()
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().unwrap()
}

fn start(evod: &Path, dir: tempfile::TempDir) -> Daemon {
    let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
    let metrics = free_port();
    let child = Command::new(evod)
        .arg("run")
        .arg("--dir")
        .arg(dir.path())
        .args(["--no-evolver", "--workers", &WORKERS.to_string()])
        // Every crash is the bench's: neither the restart intensity nor the
        // crash-loop fallback may act on them.
        .args([
            "--restart-intensity",
            "100000",
            "--fallback-after",
            "100000",
        ])
        // A worker's first `NEURAL_EXEC` on this model (the canary) gathers
        // 1 GiB and runs 268 M multiply-adds without beating: on a loaded
        // 2-core machine that can pass the default 5 s, and a worker killed
        // for it would be a death the bench did not cause.
        .args(["--heartbeat-timeout", "60s"])
        .args(["--metrics-addr", &metrics.to_string()])
        .env(
            "EVOD_LOG",
            std::env::var("EVOD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("evod run");
    Daemon {
        child,
        socket: evod_wire::control::default_socket(dir.path()),
        dir,
        metrics,
    }
}

struct Crash {
    inside_us: f64,
    outside_us: f64,
    /// `kill()` → the first status report that shows the death (its
    /// crash notice, or the reap).
    seen_us: f64,
    /// The status calls' round trips during the wait (the poll's own cost).
    polls_us: Vec<f64>,
    /// `kill()` → the kernel has ended the process (pidfd readable).
    exit_us: f64,
    other_in_load: bool,
}

/// A pidfd of `pid` (not our child: `pidfd_open`).
fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor, owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// SIGSEGV to worker `victim` → the status shows its replacement recovered.
fn crash(d: &mut Daemon, victim: usize, before: &StatusReport) -> Crash {
    use std::os::fd::AsFd;
    let row = worker(before, victim);
    let pid = row.pid.expect("the victim runs");
    let recoveries = row.recoveries;
    let fd = pidfd(pid);
    let start = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGSEGV).expect("kill the worker");
    // The kernel's part, on a thread blocked in poll (no CPU taken from
    // the recovery being measured): readable once the process has ended.
    let ended = std::thread::spawn(move || {
        let mut fds = [nix::poll::PollFd::new(
            fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        loop {
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(60_000u16)) {
                Ok(n) if n > 0 => return start.elapsed().as_secs_f64() * 1e6,
                Ok(_) if start.elapsed() < PATIENCE => {}
                Err(nix::errno::Errno::EINTR) => {}
                other => panic!("worker {pid} never ended: {other:?}"),
            }
        }
    });
    let end = start + PATIENCE;
    let trace = std::env::var_os("EVOD_BENCH_TRACE").is_some();
    let mut seen_us = None;
    let mut polls_us = Vec::new();
    let (inside_us, outside_us, other_in_load) = loop {
        let asked = Instant::now();
        let s = d.status();
        let took_us = asked.elapsed().as_secs_f64() * 1e6;
        polls_us.push(took_us);
        let c = worker(&s, victim);
        if trace {
            eprintln!(
                "  poll at {:.0} us took {took_us:.0} us: pid {:?} restarts {} recoveries {} state {}",
                asked.duration_since(start).as_secs_f64() * 1e6,
                c.pid,
                c.restarts,
                c.recoveries,
                c.state
            );
        }
        if seen_us.is_none() && (c.pid != Some(pid) || c.restarts > row.restarts) {
            seen_us = Some(start.elapsed().as_secs_f64() * 1e6);
        }
        if c.recoveries > recoveries && c.pid.is_some_and(|p| p != pid) {
            let outside_us = start.elapsed().as_secs_f64() * 1e6;
            let last = c.last_exit.clone().unwrap_or_default();
            assert!(last.contains("SIGSEGV"), "worker {victim} ended: {last}");
            break (
                c.last_recovery_us.expect("a recovery time"),
                outside_us,
                in_service(worker(&s, 1 - victim)) == Some("LOAD"),
            );
        }
        assert!(
            Instant::now() < end,
            "worker {victim} never recovered: {s:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    };
    let exit_us = ended.join().expect("the pidfd waiter");
    // Its reap records the real exit status (the death was counted once,
    // at its notice).
    d.wait_for("the victim's exit status recorded", |s| {
        worker(s, victim)
            .last_exit
            .as_deref()
            .is_some_and(|l| l.starts_with("killed by signal 11 (SIGSEGV)"))
    });
    Crash {
        inside_us,
        outside_us,
        seen_us: seen_us.unwrap_or(outside_us),
        polls_us,
        exit_us,
        other_in_load,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The number on the `name` line of a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: bench_recovery_load OUT.json [ROUNDS]"),
    );
    let rounds: usize = std::env::args()
        .nth(2)
        .map_or(11, |n| n.parse().expect("ROUNDS: a number"));
    let evod = PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: a release evod"));
    let dir = tempfile::tempdir().expect("temp dir");
    let live = dir.path().join("vectorland.gguf");
    let made = Instant::now();
    // 4 → 16370 → 16370 → 2: 268 M f32 parameters, 1.0 GiB.
    let o = Command::new(&evod)
        .args([
            "init",
            "--task",
            "cartpole",
            "--layers",
            "4,16370,16370,2",
            "-o",
        ])
        .arg(&live)
        .output()
        .expect("evod init");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::metadata(&live).unwrap().len();
    // Two files to publish in turn (the same content, each its own inode).
    let copies = [dir.path().join("a.gguf"), dir.path().join("b.gguf")];
    std::fs::hard_link(&live, &copies[0]).expect("link the model");
    std::fs::copy(&live, &copies[1]).expect("copy the model");
    println!(
        "1 GiB model ready ({bytes} bytes) in {:.1}s",
        made.elapsed().as_secs_f64()
    );
    let mut d = start(&evod, dir);
    let mut idle = Vec::new();
    for round in 0..rounds {
        d.wait_steady();
        let s = d.status();
        let c = crash(&mut d, round % WORKERS, &s);
        println!(
            "idle round {round}: outside {:.0} us, supervisor {:.0} us (kill → death seen in status {:.0} us; kill → process ended {:.0} us)",
            c.outside_us, c.inside_us, c.seen_us, c.exit_us
        );
        idle.push(c);
    }
    let mut during = Vec::new();
    for round in 0..rounds {
        d.wait_steady();
        let victim = round % WORKERS;
        // Publish: a new inode at the live path, atomically.
        let tmp = d.dir.path().join(".publish.tmp");
        std::fs::hard_link(&copies[(round + 1) % 2], &tmp).expect("link");
        std::fs::rename(&tmp, &live).expect("publish");
        let s = d.wait_for("the victim in its LOAD", |s| {
            in_service(worker(s, victim)) == Some("LOAD")
        });
        let c = crash(&mut d, victim, &s);
        println!(
            "LOAD round {round}: outside {:.0} us, supervisor {:.0} us (kill → death seen in status {:.0} us; kill → process ended {:.0} us; other worker still in LOAD: {})",
            c.outside_us, c.inside_us, c.seen_us, c.exit_us, c.other_in_load
        );
        during.push(c);
    }
    d.wait_steady();
    let text = d.metrics();
    let count = metric(&text, "evod_worker_recovery_seconds_count");
    let sum = metric(&text, "evod_worker_recovery_seconds_sum");
    let s = d.status();
    let recoveries: u64 = workers(&s).map(|c| c.recoveries).sum();
    let restarts: u64 = workers(&s).map(|c| c.restarts).sum();
    // Every death is the bench's, and each was one recovery.
    assert_eq!(
        (count as u64, recoveries, restarts),
        (2 * rounds as u64, 2 * rounds as u64, 2 * rounds as u64),
        "histogram count, status recoveries, restarts\n{text}\nlog:\n{}",
        d.log()
    );
    let canary_s = metric(
        &text,
        "evod_worker_request_duration_seconds_sum{opcode=\"NEURAL_EXEC\"}",
    ) / metric(
        &text,
        "evod_worker_request_duration_seconds_count{opcode=\"NEURAL_EXEC\"}",
    );
    let inside = |v: &[Crash]| v.iter().map(|c| c.inside_us).collect::<Vec<_>>();
    let outside = |v: &[Crash]| v.iter().map(|c| c.outside_us).collect::<Vec<_>>();
    let exit = |v: &[Crash]| v.iter().map(|c| c.exit_us).collect::<Vec<_>>();
    let seen = |v: &[Crash]| v.iter().map(|c| c.seen_us).collect::<Vec<_>>();
    let polls = |v: &[Crash]| {
        v.iter()
            .flat_map(|c| c.polls_us.iter().copied())
            .collect::<Vec<_>>()
    };
    let load_median = median(&outside(&during));
    let idle_median = median(&outside(&idle));
    // How many deaths the supervisor learnt from a crash notice (the rest
    // from SIGCHLD).
    let noticed = d
        .log()
        .matches("sent a crash notice (SIGSEGV): replaced")
        .count();
    let result = serde_json::json!({
        "recovery_during_load_median_us": load_median,
        "recovery_during_load_samples_us": outside(&during),
        "recovery_during_load_supervisor_median_us": median(&inside(&during)),
        "recovery_during_load_supervisor_samples_us": inside(&during),
        "recovery_during_load_seen_median_us": median(&seen(&during)),
        "recovery_during_load_seen_samples_us": seen(&during),
        "recovery_during_load_status_poll_median_us": median(&polls(&during)),
        "recovery_during_load_exit_median_us": median(&exit(&during)),
        "recovery_during_load_exit_samples_us": exit(&during),
        "recovery_during_load_other_worker_in_load": during.iter().filter(|c| c.other_in_load).count(),
        "recovery_during_load_crashes": during.len(),
        "recovery_idle_median_us": idle_median,
        "recovery_idle_samples_us": outside(&idle),
        "recovery_idle_supervisor_median_us": median(&inside(&idle)),
        "recovery_idle_supervisor_samples_us": inside(&idle),
        "recovery_idle_exit_median_us": median(&exit(&idle)),
        "recovery_idle_seen_median_us": median(&seen(&idle)),
        "recovery_idle_status_poll_median_us": median(&polls(&idle)),
        "recovery_during_load_over_idle": load_median / idle_median,
        "recovery_noticed": noticed,
        "recovery_crashes": during.len() + idle.len(),
        "recovery_metrics_count": count,
        "recovery_metrics_mean_us": sum / count * 1e6,
        "model_bytes": bytes,
        "canary_mean_s": canary_s,
    });
    let text = serde_json::to_string_pretty(&result).unwrap();
    println!("{text}");
    std::fs::write(&out, text + "\n").expect("report");
}
