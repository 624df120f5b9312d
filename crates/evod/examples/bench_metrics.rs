//! `cargo xtask bench metrics`: how long a scrape of `/metrics` takes
//! against a running daemon (`evod run --workers 2 --metrics-addr`, the
//! evolver running, so every family is present): connect, request, the
//! whole body read, a new connection each time (the server answers one
//! request per connection). Writes `metrics_scrape_ms` (the median; the
//! target is ≤ 10 ms) with p99, max and the body size to OUT.json.
//!
//! Usage: `EVOD_BIN=target/release/evod bench_metrics OUT.json`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Scrapes measured.
const SCRAPES: usize = 500;
/// Longest the daemon may take to come up and report.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// One `GET path`: the status line's code, the body, and the time from
/// connect to the last byte.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: evod\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let took = started.elapsed();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    Ok((code, body, took))
}

/// `SCRAPES` timed scrapes of `/metrics` at `addr`, in milliseconds, and
/// the last body's size in bytes.
fn scrape_ms(addr: SocketAddr, n: usize) -> (Vec<f64>, usize) {
    let mut times = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let (code, body, took) = get(addr, "/metrics").expect("scraping /metrics");
        assert_eq!(code, 200, "{body}");
        bytes = body.len();
        times.push(took.as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times, bytes)
}

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: bench_metrics OUT.json"),
    );
    let evod =
        PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: path of a release evod"));
    let dir = tempfile::tempdir().expect("a temporary folder");
    let log_path = dir.path().join("run.log");
    let mut child = Command::new(&evod)
        .arg("run")
        .arg("--dir")
        .arg(dir.path())
        .args(["--workers", "2", "--metrics-addr", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("the log file"))
        .spawn()
        .expect("starting evod run");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let end = Instant::now() + READY_WITHIN;
    // The address (port 0: the daemon logs the one it got), then a report
    // from the evolver in /metrics.
    let addr: SocketAddr = loop {
        let text = log();
        if let Some(at) = text.find("/readyz on http://") {
            let rest = &text[at + "/readyz on http://".len()..];
            if let Some(a) = rest.split_whitespace().next().and_then(|a| a.parse().ok()) {
                break a;
            }
        }
        assert!(
            Instant::now() < end,
            "no metrics address logged:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    loop {
        if let Ok((200, body, _)) = get(addr, "/metrics")
            && body.contains("evod_generations_total")
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "no evolver report in /metrics:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (times, bytes) = scrape_ms(addr, SCRAPES);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let (median, p99, max) = (at(0.5), at(0.99), times[times.len() - 1]);
    println!(
        "metrics scrape: median {median:.3} ms, p99 {p99:.3} ms, max {max:.3} ms over {SCRAPES} scrapes of {bytes} bytes"
    );
    let mut json: serde_json::Value = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    json["metrics_scrape_ms"] = median.into();
    json["metrics_scrape_p99_ms"] = p99.into();
    json["metrics_scrape_max_ms"] = max.into();
    json["metrics_scrape_bytes"] = bytes.into();
    json["metrics_scrapes"] = SCRAPES.into();
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("writing the report");
}
