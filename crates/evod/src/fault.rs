//! `evod fault` (hidden): asks a running daemon to inject a fault into one
//! of its workers, for the fault-injection tests and `cargo xtask fault`.
//!
//! The supervisor sends the matching fault opcode on that worker's control
//! channel (a real invalid-memory write, `abort()`, a hang, a scribble over
//! the shared segment, a lying reply while it keeps running, `exit(n)`). The daemon refuses unless it was started
//! with `--allow-fault-injection`, and the worker refuses fault opcodes
//! unless it was too. Both checks are kept: either side alone is enough to
//! stop a stray request.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::exit;
use crate::protocol::op;
use crate::status::Target;
use crate::supervisor::config::default_socket;
use crate::supervisor::control::{self, ClientError, Request};

/// Arguments of `evod fault`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Index of the worker to hit.
    #[arg(long, value_name = "I")]
    worker: usize,
    /// `segv`, `abort`, `hang`, `scribble`, `lie`, `lie-control`, `alloc[:MiB]`,
    /// `exit` or `exit:N`.
    #[arg(long, value_name = "KIND")]
    kind: String,
}

/// The fault opcode and its u32 argument for a fault `kind`
/// (`segv`, `abort`, `hang`, `scribble`, `lie`, `lie-control`, `alloc`,
/// `alloc:MiB`, `exit`, `exit:N`).
pub fn parse_kind(kind: &str) -> Result<(u32, u32), String> {
    Ok(match kind {
        "segv" => (op::FAULT_SEGV, 0),
        "abort" => (op::FAULT_ABORT, 0),
        "hang" => (op::FAULT_HANG, 0),
        "scribble" => (op::FAULT_SCRIBBLE, 0),
        "lie" => (op::FAULT_LIE, 0),
        "lie-control" => (op::FAULT_LIE, 1),
        "alloc" => (op::FAULT_ALLOC, 1024),
        "exit" => (op::FAULT_EXIT, 1),
        other if other.starts_with("alloc:") => match other["alloc:".len()..].parse::<u32>() {
            Ok(mib) if mib > 0 => (op::FAULT_ALLOC, mib),
            _ => {
                return Err(format!(
                    "bad fault kind {other:?}: alloc:N takes a size in MiB, 1 or more"
                ));
            }
        },
        other => match other.strip_prefix("exit:").map(str::parse::<u8>) {
            Some(Ok(n)) => (op::FAULT_EXIT, u32::from(n)),
            Some(Err(_)) => {
                return Err(format!(
                    "bad fault kind {other:?}: the exit code must be 0 to 255"
                ));
            }
            None => {
                return Err(format!(
                    "unknown fault kind {other:?}: use segv, abort, hang, scribble, lie, lie-control, alloc[:MiB], exit or exit:N"
                ));
            }
        },
    })
}

/// Runs `evod fault`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    parse_kind(&args.kind).map_err(|e| exit::with_code(exit::USAGE, anyhow::anyhow!(e)))?;
    let socket = args.target.control_socket.clone().unwrap_or_else(|| {
        default_socket(
            &args
                .target
                .dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".")),
        )
    });
    let request = Request::Fault {
        worker: args.worker,
        kind: args.kind,
    };
    let value = control::call(&socket, &request, Duration::from_secs(10)).map_err(|e| match e {
        ClientError::NoDaemon { .. } => exit::with_code(exit::NO_DAEMON, e),
        other => anyhow::Error::new(other),
    })?;
    writeln!(std::io::stdout(), "{value}")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_to_opcodes_and_bad_ones_are_named() {
        assert_eq!(parse_kind("segv"), Ok((op::FAULT_SEGV, 0)));
        assert_eq!(parse_kind("hang"), Ok((op::FAULT_HANG, 0)));
        assert_eq!(parse_kind("exit"), Ok((op::FAULT_EXIT, 1)));
        assert_eq!(parse_kind("exit:42"), Ok((op::FAULT_EXIT, 42)));
        assert!(parse_kind("exit:300").unwrap_err().contains("0 to 255"));
        assert!(parse_kind("melt").unwrap_err().contains("\"melt\""));
    }
}
