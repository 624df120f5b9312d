//! Control-socket clients: `evod status`, `exec`, `stop`, `rollback`,
//! `wake`.
//!
//! Each finds the daemon's socket from `--control-socket`, else
//! `EVOD_CONTROL_SOCKET`, else `DIR/.evod/control.sock` with `--dir` /
//! `EVOD_DIR` / the current folder, exactly as `evod run` chooses it.
//! Without a daemon each says so and exits with `exit::NO_DAEMON` (4); on a
//! socket it may not open, `exit::DENIED` (7). Each waits for the server's
//! whole-request deadline (`Request::deadline`) plus a margin.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::exit;
use evod_wire::control::{self, Request, StatusReport, default_socket};

/// Where the daemon is.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// The daemon's state folder [default: .].
    #[arg(long, env = "EVOD_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// The daemon's control socket [default: DIR/.evod/control.sock].
    #[arg(long, env = "EVOD_CONTROL_SOCKET", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| {
            default_socket(&self.dir.clone().unwrap_or_else(|| PathBuf::from(".")))
        })
    }

    fn call(&self, request: &Request) -> anyhow::Result<serde_json::Value> {
        let timeout = request.deadline() + control::CLIENT_MARGIN;
        control::call(&self.socket(), request, timeout).map_err(exit::client_error)
    }
}

/// Arguments of `evod status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print the complete status as JSON.
    #[arg(long)]
    json: bool,
    /// Health check: print one line, exit 0 if healthy, 1 if not (4 without a daemon).
    #[arg(long)]
    check: bool,
}

/// Arguments of `evod exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    #[command(flatten)]
    target: Target,
    /// Comma-separated input values, e.g. `0.1,0.2,0.3,0.4`.
    #[arg(long, value_name = "X,Y,…", allow_hyphen_values = true)]
    input: String,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `evod stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    target: Target,
}

/// Arguments of `evod wake`.
#[derive(Debug, clap::Args)]
pub struct WakeArgs {
    #[command(flatten)]
    target: Target,
}

/// Arguments of `evod rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    target: Target,
    /// The generation to restore [default: the previous one in DIR/history].
    #[arg(long, value_name = "GEN")]
    to: Option<u64>,
}

/// Runs `evod status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let value = args.target.call(&Request::Status)?;
    let report: StatusReport = serde_json::from_value(value.clone())
        .map_err(|e| anyhow::anyhow!("bad status from the daemon: {e}"))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else if args.check {
        let running = report
            .children
            .iter()
            .filter(|c| c.state == "running")
            .count();
        writeln!(
            out,
            "{}: {running}/{} children running, generation {}",
            if report.healthy {
                "healthy"
            } else {
                "unhealthy"
            },
            report.children.len(),
            report.generation.map_or("-".into(), |g| g.to_string())
        )?;
    } else {
        print_report(&mut out, &report)?;
    }
    if args.check && !report.healthy {
        return Ok(exit::exit(exit::FAILURE));
    }
    Ok(ExitCode::SUCCESS)
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_report(out: &mut impl Write, r: &StatusReport) -> std::io::Result<()> {
    writeln!(
        out,
        "evod supervisor pid {}, up {:.1}s, {}{}",
        r.pid,
        r.uptime_s,
        if r.healthy { "healthy" } else { "UNHEALTHY" },
        if r.stopping { " (stopping)" } else { "" }
    )?;
    writeln!(
        out,
        "model {} generation {} (last verified {}), rollbacks {}",
        r.model,
        dash(r.generation),
        dash(r.good_generation),
        r.rollbacks
    )?;
    if let Some(c) = &r.converged {
        writeln!(
            out,
            "converged since {} ({}; generation {}, model generation {}): resting, `evod wake` to evolve again",
            utc(c.since_unix),
            c.reason,
            c.generation,
            c.model_generation
        )?;
    }
    writeln!(
        out,
        "{:<8} {:>2} {:<10} {:>7} {:>9} {:>8} {:>5} {:>4} {:>10}  {:<16}  last exit",
        "role", "#", "state", "pid", "uptime", "restarts", "epoch", "gen", "ping", "standby"
    )?;
    for c in &r.children {
        let standby = match (c.standby_pid, c.standby_ready) {
            (Some(pid), Some(true)) => format!("{pid} ready"),
            (Some(pid), _) => format!("{pid} starting"),
            (None, _) => "-".into(),
        };
        writeln!(
            out,
            "{:<8} {:>2} {:<10} {:>7} {:>9} {:>8} {:>5} {:>4} {:>10}  {:<16}  {}",
            c.role,
            c.index,
            c.state,
            dash(c.pid),
            dash(c.uptime_s.map(|s| format!("{s:.1}s"))),
            c.restarts,
            dash(c.epoch),
            dash(c.generation),
            dash(c.ping_us.map(|us| format!("{us:.1}µs"))),
            standby,
            c.last_exit.as_deref().unwrap_or("-")
        )?;
    }
    if !r.hosts.is_empty() {
        writeln!(
            out,
            "evaluator hosts ({}):\n{:<24} {:>7} {:>10} {:>10}",
            r.hosts.len(),
            "host",
            "workers",
            "results",
            "last seen"
        )?;
        for h in &r.hosts {
            writeln!(
                out,
                "{:<24} {:>7} {:>10} {:>9.1}s",
                h.host, h.workers, h.tasks_done, h.last_seen_s
            )?;
        }
    }
    Ok(())
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `0.1,0.2,…` with the check the server applies too.
fn parse_inputs(text: &str) -> anyhow::Result<Vec<f32>> {
    control::parse_exec_inputs(text)
        .map_err(|e| exit::with_code(exit::USAGE, anyhow::anyhow!("bad --input: {e}")))
}

/// Runs `evod exec`.
pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let inputs = parse_inputs(&args.input)?;
    let value = args.target.call(&Request::Exec { inputs })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{value}")?;
    } else {
        let outputs: Vec<f32> = serde_json::from_value(value["outputs"].clone())
            .map_err(|e| anyhow::anyhow!("bad exec result from the daemon: {e}"))?;
        let text: Vec<String> = outputs.iter().map(|v| v.to_string()).collect();
        writeln!(out, "{}", text.join(","))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `evod stop`.
pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    args.target.call(&Request::Stop)?;
    writeln!(std::io::stdout(), "stopping")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `evod wake`.
pub fn wake(args: WakeArgs) -> anyhow::Result<ExitCode> {
    let value = args.target.call(&Request::Wake)?;
    writeln!(
        std::io::stdout(),
        "woke the evolver (pid {})",
        value["evolver"]
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `evod rollback`.
pub fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let value = args.target.call(&Request::Rollback { to: args.to })?;
    writeln!(
        std::io::stdout(),
        "restored generation {}",
        value["generation"]
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    #[test]
    fn inputs_parse_and_bad_ones_are_usage_errors() {
        assert_eq!(parse_inputs("0.1, -2,3e-1").unwrap(), vec![0.1, -2.0, 0.3]);
        let err = parse_inputs("0.1,x").unwrap_err();
        assert_eq!(exit::code_for(&err), exit::USAGE);
        assert!(err.to_string().contains("\"x\""));
        assert!(parse_inputs("nan").is_err());
        assert!(parse_inputs("").is_err());
        let err = parse_inputs("1e39").unwrap_err();
        assert_eq!(exit::code_for(&err), exit::USAGE);
        assert!(err.to_string().contains("not a finite f32"), "{err}");
    }
}
