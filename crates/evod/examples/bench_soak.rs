//! `cargo xtask bench soak`: `evod run` in service mode (no bound) on the
//! default task in an empty folder for a fixed time, as a new user would
//! start it, measuring what running for months would cost:
//!
//! - `disk_bytes_per_day`: growth of the run folder (every regular file,
//!   each inode once) after the warm-up, extrapolated to a day;
//! - `log_lines_per_hour`: log lines (default level) after the warm-up,
//!   extrapolated to an hour;
//! - `converged_cpu_percent`: CPU of the whole process tree (supervisor,
//!   janitor, workers, standbys, evolver) over a window once `evod status`
//!   says it converged, in percent of one core, from `/proc/PID/stat`;
//! - `metrics_scrape_ms`: added to the same file by `bench_metrics`,
//!   which `cargo xtask bench soak` runs right after this one.
//!
//! A second phase runs with `--patience 0` (never rests) and
//! `--progress-keep 1000`, to show the bounds hold while it evolves:
//! `evolving_log_lines_per_hour`, `evolving_dir_bytes_max` (largest folder
//! size seen), `evolving_progress_rows_max`.
//!
//! Usage: `EVOD_BIN=target/release/evod bench_soak OUT.json`; the phase
//! length is `EVOD_SOAK_SECS` (default 60), the warm-up a quarter of it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of every regular file under `dir`, each inode once.
fn dir_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for entry in entries.flatten() {
            let Ok(m) = entry.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                total += walk(&entry.path(), seen);
            } else if m.is_file() && seen.insert((m.dev(), m.ino())) {
                total += m.len();
            }
        }
        total
    }
    walk(dir, &mut HashSet::new())
}

fn log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn progress_rows(dir: &Path) -> usize {
    log_lines(&dir.join("state/progress.csv")).saturating_sub(1)
}

/// The process tree under `root`, `root` included.
fn tree(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if stat(p).is_some_and(|f| f[1].parse::<u32>().ok() == Some(out[i])) {
                out.push(p);
            }
        }
        i += 1;
    }
    out
}

fn stat(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(
        text.rsplit_once(") ")?
            .1
            .split(' ')
            .map(str::to_owned)
            .collect(),
    )
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&p| stat(p))
        .map(|f| f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0))
        .sum()
}

fn start(evod: &Path, dir: &Path, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join("../soak.log")).expect("creating the log");
    Command::new(evod)
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .env("NO_COLOR", "1")
        .spawn()
        .expect("spawning evod run")
}

fn converged(evod: &Path, dir: &Path) -> bool {
    Command::new(evod)
        .args(["status", "--json", "--dir"])
        .arg(dir)
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|s| !s["converged"].is_null())
}

fn stop(mut child: Child) {
    // SAFETY: kill takes a pid and a signal number, no memory.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: bench_soak OUT.json"));
    let evod =
        PathBuf::from(std::env::var_os("EVOD_BIN").expect("EVOD_BIN: path of a release evod"));
    let phase = Duration::from_secs(
        std::env::var("EVOD_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let warm_up = phase / 4;
    // SAFETY: sysconf takes a constant, no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;

    // Phase 1: the default service run.
    let top = tempfile::tempdir().expect("temp dir");
    let dir = top.path().join("run");
    std::fs::create_dir(&dir).unwrap();
    let log = top.path().join("soak.log");
    let t0 = Instant::now();
    let start_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let child = start(&evod, &dir, &[]);
    std::thread::sleep(warm_up);
    let (bytes0, lines0, w0) = (dir_bytes(&dir), log_lines(&log), Instant::now());
    let deadline = t0 + phase;
    while !converged(&evod, &dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let is_converged = converged(&evod, &dir);
    // When it started resting, from the marker (whole seconds).
    let converged_at = std::fs::read_to_string(dir.join("state/converged"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|c| c["since_unix"].as_u64())
        .map(|since| since.saturating_sub(start_unix));
    let pids = tree(child.id());
    let c0 = (cpu_ticks(&pids), Instant::now());
    std::thread::sleep(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(5)),
    );
    let cpu = (cpu_ticks(&pids) - c0.0) as f64 / hz / c0.1.elapsed().as_secs_f64() * 100.0;
    let (bytes1, lines1, span) = (dir_bytes(&dir), log_lines(&log), w0.elapsed().as_secs_f64());
    stop(child);
    let per_day = (bytes1 as f64 - bytes0 as f64) / span * 86_400.0;
    let per_hour = (lines1 - lines0) as f64 / span * 3600.0;
    println!(
        "service run: converged after {} s ({is_converged}); disk {per_day:.0} B/day, {per_hour:.0} log lines/hour, {cpu:.3}% of a core converged",
        converged_at.map_or("-".into(), |s| s.to_string())
    );

    // Phase 2: never rests; the bounds must hold while it evolves.
    let top2 = tempfile::tempdir().expect("temp dir");
    let dir2 = top2.path().join("run");
    std::fs::create_dir(&dir2).unwrap();
    let log2 = top2.path().join("soak.log");
    let child = start(
        &evod,
        &dir2,
        &["--patience", "0", "--progress-keep", "1000"],
    );
    std::thread::sleep(warm_up);
    let (lines0, w0) = (log_lines(&log2), Instant::now());
    let (mut bytes_max, mut rows_max) = (0u64, 0usize);
    let end = Instant::now() + phase - warm_up;
    while Instant::now() < end {
        bytes_max = bytes_max.max(dir_bytes(&dir2));
        rows_max = rows_max.max(progress_rows(&dir2));
        std::thread::sleep(Duration::from_millis(100));
    }
    let evolving_per_hour =
        (log_lines(&log2) - lines0) as f64 / w0.elapsed().as_secs_f64() * 3600.0;
    let generations = std::fs::read_to_string(dir2.join("state/progress.csv"))
        .ok()
        .and_then(|t| t.lines().last()?.split(',').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    stop(child);
    println!(
        "evolving run: {generations} generations, {evolving_per_hour:.0} log lines/hour, folder at most {bytes_max} B, progress.csv at most {rows_max} rows"
    );

    let json = serde_json::json!({
        "soak_phase_s": phase.as_secs_f64(),
        "warm_up_s": warm_up.as_secs_f64(),
        "converged": is_converged,
        "converged_after_s": converged_at,
        "disk_bytes_per_day": per_day,
        "log_lines_per_hour": per_hour,
        "converged_cpu_percent": cpu,
        "evolving_generations": generations,
        "evolving_log_lines_per_hour": evolving_per_hour,
        "evolving_dir_bytes_max": bytes_max,
        "evolving_progress_rows_max": rows_max,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("writing the report");
}
