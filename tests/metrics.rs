//! Process tests of `--metrics-addr` (issue 12): `/metrics` counters move
//! (generations, a worker's SIGSEGV as a restart with its labels),
//! `/healthz` and `/readyz` follow "a verified model can be served", a
//! hostile HTTP client holds up neither `evod status` nor SIGTERM, and a
//! real Prometheus server (the Debian package `prometheus`) scrapes evod.
//! Real daemons, real signals, real sockets; every wait is on an event or
//! a polled condition with a deadline.

mod common;

use common::{Daemon, evod, poll_until};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(60);

/// `evod run --workers 1 --metrics-addr 127.0.0.1:0` in a temporary state
/// folder ([`Daemon`]), and its metrics endpoint.
trait MetricsDaemon {
    /// Starts with `args` and waits for the address it serves metrics on.
    fn start(args: &[&str]) -> Daemon;
    /// The metrics address the supervisor logged (port 0: the OS picked).
    fn addr(&self) -> SocketAddr;
    /// The value of the sample `series` (name and labels, as printed) in
    /// `/metrics`, if present.
    fn sample(&self, series: &str) -> Option<f64>;
}

impl MetricsDaemon for Daemon {
    fn start(args: &[&str]) -> Daemon {
        let base = ["--workers", "1", "--metrics-addr", "127.0.0.1:0"];
        let args: Vec<&str> = base.iter().chain(args).copied().collect();
        let mut d = Daemon::spawn(tempfile::tempdir().unwrap(), &args, DEADLINE).on_timeout(|d| {
            let metrics = logged_addr(d).map(|a| get(a, "/metrics"));
            match metrics {
                Some(Ok((_, body))) => format!("metrics:\n{body}"),
                Some(Err(e)) => format!("metrics: {e}"),
                None => "metrics: no address logged".to_owned(),
            }
        });
        d.wait_for("the metrics address in the log", logged_addr);
        d
    }

    fn addr(&self) -> SocketAddr {
        logged_addr(self).expect("no metrics address in the log")
    }

    fn sample(&self, series: &str) -> Option<f64> {
        let (code, body) = get(self.addr(), "/metrics").ok()?;
        assert_eq!(code, 200, "{body}");
        value_of(&body, series)
    }
}

/// The address after "/readyz on http://" in the daemon's log.
fn logged_addr(d: &Daemon) -> Option<SocketAddr> {
    let log = d.log();
    let at = log.find("/readyz on http://")? + "/readyz on http://".len();
    log[at..].split_whitespace().next()?.parse().ok()
}

/// The value of `series` in a Prometheus text exposition.
fn value_of(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `GET path` on `addr`: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: evod\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    Ok((code, body))
}

#[test]
fn counters_move_and_a_worker_sigsegv_is_a_restart_with_its_labels() {
    // `--patience 0`: the evolver never rests (CartPole converges in a few
    // generations), so its counters keep moving.
    let mut d = Daemon::start(&["--patience", "0"]);
    let (code, body) = get(d.addr(), "/healthz").unwrap();
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    d.wait_for("/readyz 200", |d| {
        get(d.addr(), "/readyz").ok().filter(|(c, _)| *c == 200)
    });
    // The evolver's report reaches /metrics, and its counters grow.
    let first = d.wait_for("evod_generations_total", |d| {
        d.sample("evod_generations_total").filter(|g| *g > 0.0)
    });
    d.wait_for("evod_generations_total to grow", |d| {
        d.sample("evod_generations_total").filter(|g| *g > first)
    });
    assert!(d.sample("evod_evaluations_total").unwrap() > 0.0);
    assert!(
        d.sample("evod_rejections_total{reason=\"norm\"}").is_some(),
        "no rejections by reason"
    );
    assert!(d.sample("evod_evolver_report_age_seconds").is_some());
    assert_eq!(d.sample("evod_workers_running"), Some(1.0));
    // The supervisor's own PINGs are timed, and the workers' ring round
    // trips counted.
    d.wait_for("PING round trips in the histogram", |d| {
        d.sample("evod_worker_request_duration_seconds_count{opcode=\"PING\"}")
            .filter(|n| *n > 0.0)
    });
    assert!(
        d.sample("evod_ring_round_trips_total{opcode=\"EVAL\"}")
            .is_some_and(|n| n > 0.0)
    );
    // A real SIGSEGV of the worker: one restart, role worker, cause SIGSEGV.
    let series = "evod_restarts_total{role=\"worker\",cause=\"SIGSEGV\"}";
    assert_eq!(d.sample(series), None);
    let pid = d.wait_for("the worker's pid", |d| {
        d.status()?["children"]
            .as_array()?
            .iter()
            .find(|c| c["role"] == "worker")?["pid"]
            .as_i64()
    });
    kill(Pid::from_raw(pid as i32), Signal::SIGSEGV).unwrap();
    d.wait_for("the restart in /metrics", |d| {
        d.sample(series).filter(|n| *n == 1.0)
    });
    // Ring round trips of the dead incarnation are kept (a counter).
    assert!(
        d.sample("evod_ring_round_trips_total{opcode=\"EVAL\"}")
            .is_some_and(|n| n > 0.0)
    );
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit();
    assert!(status.success(), "{status}\n{}", d.log());
}

#[test]
fn converged_is_1_while_the_evolver_rests() {
    // CartPole reaches its maximum within a few generations: the evolver
    // rests (`state/converged`), and says so in /metrics.
    let mut d = Daemon::start(&[]);
    d.wait_for("evod_converged 1", |d| {
        d.sample("evod_converged").filter(|v| *v == 1.0)
    });
    let since = d.sample("evod_converged_since_timestamp_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(since > 0.0 && since <= now, "{since} vs {now}");
    // The last report before the rest stays, with its age.
    assert!(d.sample("evod_generations_total").is_some_and(|g| g > 0.0));
    assert!(d.sample("evod_evolver_report_age_seconds").is_some());
    // Ready while it rests: a resting evolver does not stop serving. (The
    // last generation it published may still be in its canary when the
    // rest begins: ready within the deadline, and it stays resting.)
    d.wait_for("/readyz 200 while resting", |d| {
        get(d.addr(), "/readyz").ok().filter(|(c, _)| *c == 200)
    });
    assert_eq!(d.sample("evod_converged"), Some(1.0));
}

#[test]
fn readyz_is_503_with_the_reason_when_the_model_is_corrupted_in_place() {
    let mut d = Daemon::start(&["--no-evolver"]);
    d.wait_for("/readyz 200", |d| {
        get(d.addr(), "/readyz").ok().filter(|(c, _)| *c == 200)
    });
    assert_eq!(d.sample("evod_ready"), Some(1.0));
    assert_eq!(d.sample("evod_workers_ready"), Some(1.0));
    // No evolver: none of its metrics.
    assert_eq!(d.sample("evod_generations_total"), None);
    // Truncate the live file in place (same inode): nothing can serve it.
    let model = d.dir().join("vectorland.gguf");
    let len = std::fs::metadata(&model).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let body = d.wait_for("/readyz 503 naming the model", |d| {
        get(d.addr(), "/readyz")
            .ok()
            .filter(|(c, b)| *c == 503 && b.contains("cannot be served"))
            .map(|x| x.1)
    });
    assert!(body.starts_with("not ready: "), "{body}");
    assert_eq!(d.sample("evod_ready"), Some(0.0));
    // The process is alive: /healthz stays 200; unknown paths are 404.
    assert_eq!(get(d.addr(), "/healthz").unwrap().0, 200);
    assert_eq!(get(d.addr(), "/nope").unwrap().0, 404);
}

#[test]
fn a_hostile_http_client_holds_up_neither_status_nor_sigterm() {
    let mut d = Daemon::start(&["--no-evolver", "--grace-period", "5s"]);
    d.wait_for("/readyz 200", |d| {
        get(d.addr(), "/readyz").ok().filter(|(c, _)| *c == 200)
    });
    // Many connections that trickle a request byte by byte, never ending
    // it, for as long as the test runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = d.addr();
    let tricklers: Vec<_> = (0..32)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        continue;
                    };
                    for b in b"GET /metrics HTTP/1.1\r\nX: ".iter().cycle() {
                        if stop.load(std::sync::atomic::Ordering::Relaxed)
                            || s.write_all(&[*b]).is_err()
                        {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        })
        .collect();
    // Wait until the server is saturated: a scrape is refused.
    d.wait_for("the metrics server to be saturated", |d| {
        match get(d.addr(), "/healthz") {
            Ok((503, _)) | Err(_) => Some(()),
            Ok(_) => None,
        }
    });
    // The loop does not care: status answers, many times over.
    for _ in 0..10 {
        let s = d
            .status()
            .expect("evod status failed under a hostile HTTP client");
        assert_eq!(s["healthy"], true, "{s}");
    }
    // SIGTERM: the daemon stops within its grace period (5 s) plus the
    // one-second final reap; the watchdog deadline is twice that.
    let asked = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit_within(Duration::from_secs(12));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tricklers {
        t.join().unwrap();
    }
    let status = status.unwrap_or_else(|| panic!("evod run did not stop on SIGTERM"));
    assert!(status.success(), "{status}\n{}", d.log());
    assert!(
        !d.log().contains("grace period of"),
        "stopping waited for the grace period ({:?}):\n{}",
        asked.elapsed(),
        d.log()
    );
}

/// A free TCP port on loopback (bound then released: Prometheus takes it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `prometheus`, started on a free port with a config scraping `target`
/// every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let binary = std::env::var_os("PROMETHEUS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("prometheus"));
        let found = Command::new(&binary)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "`prometheus` is not installed: this test needs the Prometheus server \
             (Debian package `prometheus`: apt-get install -y prometheus; .ci/run installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: evod\n    scrape_interval: 1s\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant query that returns one sample.
    fn query(&self, expr: &str) -> Option<f64> {
        let (code, body) = get(self.addr, &format!("/api/v1/query?query={expr}")).ok()?;
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_server_scrapes_growing_generations() {
    let d = Daemon::start(&["--patience", "0"]);
    let p = Prometheus::start(d.addr());
    // The scrape target is up (Prometheus parsed our exposition).
    let up = poll_until(
        "prometheus to scrape evod (up == 1)",
        DEADLINE,
        || p.query("up").filter(|v| *v == 1.0),
        || format!("prometheus log:\n{}\nevod log:\n{}", p.log(), d.log()),
    );
    assert_eq!(up, 1.0);
    let first = poll_until(
        "evod_generations_total in prometheus",
        DEADLINE,
        || p.query("evod_generations_total"),
        || format!("prometheus log:\n{}\nevod log:\n{}", p.log(), d.log()),
    );
    poll_until(
        "evod_generations_total to grow in prometheus",
        DEADLINE,
        || p.query("evod_generations_total").filter(|g| *g > first),
        || format!("prometheus log:\n{}\nevod log:\n{}", p.log(), d.log()),
    );
    let ready = poll_until(
        "evod_ready in prometheus",
        DEADLINE,
        || p.query("evod_ready").filter(|v| *v == 1.0),
        || p.log(),
    );
    assert_eq!(ready, 1.0);
}

#[test]
fn a_taken_port_stops_evod_run_with_exit_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let o = evod()
        .arg("run")
        .arg("--dir")
        .arg(dir.path())
        .args(["--no-evolver", "--workers", "1", "--metrics-addr"])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = common::text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--metrics-addr") && err.contains(&addr.to_string()) && err.contains("in use"),
        "{err}"
    );
    // Bound before the control socket: nothing of it is left.
    assert!(!dir.path().join(".evod/control.sock").exists());
}
