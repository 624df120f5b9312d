//! Service mode, as a daemon that runs for months would: `evod run` with no
//! bound. Its files stay bounded (the progress log is thinned), its log is
//! quiet (at most one pulse per `--pulse-interval`, no warning per rejected
//! candidate), and once converged it rests: near-zero CPU measured from
//! `/proc/PID/stat` over a window, woken by `evod wake`, SIGHUP, a rollback
//! and a changed CSV data file; a SIGHUP as the evolver starts is a wake,
//! not its death. Real processes, real signals, real files;
//! every wait is on a condition with a deadline.

mod common;

use common::{Daemon, children_with_role, evod, poll_until, text};

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(120);

/// `evod run` (with the evolver) in a temporary folder ([`Daemon`]), and
/// what these tests do with it.
trait ServiceDaemon {
    /// Starts on the folder's model (`evod run` creates CartPole's if none).
    fn start(dir: tempfile::TempDir, args: &[&str]) -> Daemon;
    /// Waits until the evolver rests past evolver generation `after`;
    /// returns the status's `converged` object.
    fn wait_converged(&self, after: Option<u64>) -> Value;
    /// The supervisor and every process under it.
    fn tree(&self) -> Vec<u32>;
}

impl ServiceDaemon for Daemon {
    fn start(dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        Daemon::spawn(dir, args, DEADLINE)
    }

    fn wait_converged(&self, after: Option<u64>) -> Value {
        poll_until(
            "the evolver to rest (status: converged)",
            DEADLINE,
            || {
                let c = self.status()?["converged"].clone();
                let g = c["generation"].as_u64()?;
                after.is_none_or(|a| g > a).then_some(c)
            },
            || self.log(),
        )
    }

    fn tree(&self) -> Vec<u32> {
        let mut out = vec![self.pid()];
        let mut i = 0;
        while i < out.len() {
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if stat_fields(p).is_some_and(|f| f[1].parse::<u32>().ok() == Some(out[i])) {
                    out.push(p);
                }
            }
            i += 1;
        }
        out
    }
}

/// `evod init -o DIR/vectorland.gguf`: CartPole's model in `dir`.
fn init(dir: &std::path::Path) {
    let o = evod()
        .arg("init")
        .arg("-o")
        .arg(dir.join("vectorland.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "evod init: {}", text(&o.stderr));
}

/// The fields of `/proc/PID/stat` after the command name (state first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    Some(after.split(' ').map(str::to_owned).collect())
}

/// User + system CPU time of `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_fields(pid).map_or(0, |f| {
        f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
    })
}

/// CPU used by `pids` over `window`, in percent of one core.
fn cpu_percent(pids: &[u32], window: Duration) -> f64 {
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let start = Instant::now();
    // Measuring over a fixed window, not waiting for an event.
    std::thread::sleep(window);
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    // SAFETY: sysconf takes a constant and touches no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (after - before) as f64 / hz / start.elapsed().as_secs_f64() * 100.0
}

#[test]
fn a_converged_run_rests_at_near_zero_cpu_and_wakes_on_each_trigger() {
    // Solve threshold 1: every better generation publishes, so the history
    // holds an earlier generation to roll back to. CartPole's maximum (500)
    // makes it rest at once; after a wake it rests after --patience.
    let d = Daemon::start(
        tempfile::tempdir().unwrap(),
        &["--solve-threshold", "1", "--patience", "40"],
    );
    let rest = d.wait_converged(None);
    assert_eq!(rest["fitness"], 500.0, "{rest}");
    assert!(
        rest["reason"].as_str().unwrap().contains("maximum 500"),
        "{rest}"
    );
    let shown = text(&d.cli(&["status"]).stdout);
    assert!(shown.contains("converged since "), "{shown}");

    // Resting: the whole tree (supervisor, janitor, workers, standbys,
    // evolver) stays under 1% of a core.
    let cpu = cpu_percent(&d.tree(), Duration::from_secs(5));
    assert!(cpu <= 1.0, "resting daemon used {cpu:.2}% of a core");

    // `evod wake`: it evolves again (the maximum no longer counts), then
    // rests after --patience generations.
    let o = d.cli(&["wake"]);
    assert!(o.status.success(), "evod wake: {}", text(&o.stderr));
    let again = d.wait_converged(rest["generation"].as_u64());
    assert!(
        again["reason"].as_str().unwrap().contains("40 generations"),
        "{again}"
    );

    // SIGHUP to the supervisor does the same.
    kill(Pid::from_raw(d.pid() as i32), Signal::SIGHUP).unwrap();
    let hup = d.wait_converged(again["generation"].as_u64());

    // A rollback restarts the evolver on an older model: it evolves again
    // and rests on that model.
    let live = hup["model_generation"].as_u64().unwrap();
    let o = d.cli(&["rollback"]);
    assert!(o.status.success(), "evod rollback: {}", text(&o.stderr));
    let after = d.wait_converged(hup["generation"].as_u64());
    assert!(
        after["model_generation"].as_u64().unwrap() < live,
        "{after}\n{}",
        d.log()
    );
    assert!(d.log().contains("woken (SIGHUP)"), "{}", d.log());
}

#[test]
fn a_disk_refusing_the_checkpoint_and_the_log_rewrite_does_not_stop_the_run_from_resting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // Folders where the evolver replaces files: the checkpoint's rename and
    // the progress log's rewrite fail every time, as on a full disk. Both
    // used to end the evolver (at its start, and as it rests), so it never
    // rested and the supervisor gave up after its restart intensity.
    std::fs::create_dir_all(state.join("checkpoint.bin").join("x")).unwrap();
    std::fs::create_dir_all(state.join("progress.csv.tmp")).unwrap();
    init(dir.path());
    let d = Daemon::start(dir, &["--solve-threshold", "1", "--patience", "40"]);
    let rest = d.wait_converged(None);
    assert_eq!(rest["fitness"], 500.0, "{rest}");
    let log = d.log();
    assert!(
        log.contains("rewriting the progress log failed")
            && log.contains("saving the checkpoint before resting failed"),
        "{log}"
    );
    let evolver = d.row(|c| c["role"] == "evolver").unwrap();
    assert_eq!(evolver["restarts"], 0, "{evolver}\n{log}");
    assert_eq!(evolver["state"], "running", "{evolver}");
}

#[test]
fn a_sighup_as_the_evolver_starts_does_not_kill_it() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path());
    // A long progress log to read and rewrite keeps the start (model,
    // checkpoint, log) long enough to be hit reliably.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut csv = String::from("generation,best,mean,evaluations,published,wall_s\n");
    for g in 0..300_000u64 {
        csv.push_str(&format!("{g},1,1,{g},0,0.000\n"));
    }
    std::fs::write(state.join("progress.csv"), csv).unwrap();
    let d = Daemon::start(dir, &["--patience", "0"]);
    let supervisor = d.pid();
    // The evolver names itself first thing in `evod evolver`, once its
    // handlers are in: a SIGHUP from then on is a wake, never a death.
    let pid = poll_until(
        "the evolver to name itself",
        DEADLINE,
        || {
            children_with_role(supervisor, "evolver")
                .into_iter()
                .find(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "evod-evolver")
                })
        },
        || d.log(),
    );
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).unwrap();
    // It evolves: generations come in the progress log.
    poll_until(
        "a generation in the progress log",
        DEADLINE,
        || {
            let text = std::fs::read_to_string(d.dir().join("state/progress.csv")).ok()?;
            (text.lines().count() > 1 && text.len() < 1 << 20).then_some(())
        },
        || d.log(),
    );
    let evolver = d.row(|c| c["role"] == "evolver").unwrap();
    assert_eq!(evolver["restarts"], 0, "{evolver}\n{}", d.log());
    assert_eq!(evolver["pid"], pid, "{evolver}");
}

#[test]
fn a_resting_csv_run_wakes_when_its_data_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.csv");
    let mut csv = String::from("a,b,y\n");
    for i in 0..20u32 {
        let (a, b) = (f64::from(i % 7) / 7.0, f64::from(i % 5) / 5.0);
        csv.push_str(&format!("{a},{b},{}\n", a + 2.0 * b));
    }
    std::fs::write(&data, &csv).unwrap();
    let o = evod()
        .args(["init", "--task", "csv", "--target", "y", "--data"])
        .arg(&data)
        .arg("-o")
        .arg(dir.path().join("vectorland.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "evod init: {}", text(&o.stderr));
    // Patience 1: rests at the first generation that publishes nothing.
    let d = Daemon::start(dir, &["--patience", "1"]);
    let rest = d.wait_converged(None);
    csv.push_str("0.5,0.5,1.5\n");
    std::fs::write(&data, &csv).unwrap();
    d.wait_converged(rest["generation"].as_u64());
    assert!(d.log().contains("data.csv changed"), "{}", d.log());
}

#[test]
fn a_service_run_keeps_its_files_bounded_and_its_log_quiet() {
    // Never rests (patience 0), keeps 100 rows at full resolution, pulses at
    // most every 2 s.
    const KEEP: usize = 100;
    const RUN: Duration = Duration::from_secs(60);
    let d = Daemon::start(
        tempfile::tempdir().unwrap(),
        &[
            "--patience",
            "0",
            "--progress-keep",
            "100",
            "--pulse-every",
            "1",
            "--pulse-interval",
            "2s",
        ],
    );
    let progress = d.dir().join("state/progress.csv");
    let rows = || {
        std::fs::read_to_string(&progress)
            .map(|t| t.lines().count().saturating_sub(1))
            .unwrap_or(0)
    };
    let start = Instant::now();
    let mut most = 0;
    let mut last = 0;
    // Sampling the file while the run goes on: every sample is in bounds.
    while start.elapsed() < RUN {
        most = most.max(rows());
        last = poll_until(
            "the next progress row",
            DEADLINE,
            || {
                let text = std::fs::read_to_string(&progress).ok()?;
                let g = text
                    .lines()
                    .last()?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()?;
                (g > last || last == 0).then_some(g)
            },
            || d.log(),
        );
    }
    most = most.max(rows());
    assert!(most <= 3 * KEEP, "progress.csv held {most} rows");
    assert!(
        last as usize > 3 * KEEP,
        "only {last} generations: thinning was not exercised"
    );
    // The report still draws the whole run, from generation 0.
    let svg = d.dir().join("report.svg");
    let o = evod()
        .args(["report", "--dir"])
        .arg(d.dir())
        .arg("-o")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "evod report: {}", text(&o.stderr));
    assert!(
        std::fs::read_to_string(&svg)
            .unwrap()
            .contains(">generation 0<"),
        "the report does not start at generation 0"
    );
    let log = d.log();
    let pulses = log.lines().filter(|l| l.contains(" pulse ")).count();
    let most_pulses = (start.elapsed().as_secs_f64() / 2.0).ceil() as usize + 1;
    assert!(
        (5..=most_pulses).contains(&pulses),
        "{pulses} pulses in {:?} (at most one per 2 s)\n{log}",
        start.elapsed()
    );
    assert!(
        !log.contains(" WARN ") && !log.contains("candidate rejected"),
        "warnings in a healthy run:\n{log}"
    );
    let pulse = log.lines().find(|l| l.contains(" pulse ")).unwrap();
    // Numbers for people: four significant digits at most.
    let slowest = pulse
        .split_whitespace()
        .find_map(|f| f.strip_prefix("worker_slowest_ms="))
        .unwrap_or_else(|| panic!("no worker_slowest_ms in {pulse}"));
    // Significant digits: leading zeros (0.03016) do not count.
    let digits = slowest
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|c| *c == '0')
        .count();
    assert!(pulse.contains("rejected_by=") && digits <= 4, "{pulse}");
}
