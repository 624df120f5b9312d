//! `evod fault` (hidden): asks a running daemon to inject a fault into one
//! of its workers, for the fault-injection tests and `cargo xtask fault`.
//!
//! The supervisor sends the matching fault opcode on that worker's control
//! channel (a real invalid-memory write, `abort()`, a hang, a scribble over
//! the shared segment, a lying reply while it keeps running, `exit(n)`, a
//! crash notice without a crash). The daemon refuses unless it was started
//! with `--allow-fault-injection`, and the worker refuses fault opcodes
//! unless it was too. Both checks are kept: either side alone is enough to
//! stop a stray request.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::exit;
use crate::status::Target;
use evod_wire::control::{self, Request, default_socket};

/// Arguments of `evod fault`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Index of the worker to hit.
    #[arg(long, value_name = "I")]
    worker: usize,
    /// `segv`, `abort`, `hang`, `scribble`, `lie`, `lie-control`, `alloc[:MiB]`,
    /// `exit`, `exit:N` or `notice`.
    #[arg(long, value_name = "KIND")]
    kind: String,
}

/// Runs `evod fault`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    evod_wire::fault::parse_kind(&args.kind).map_err(|e| exit::with_code(exit::USAGE, e))?;
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
    let timeout = request.deadline() + control::CLIENT_MARGIN;
    let value = control::call(&socket, &request, timeout).map_err(exit::client_error)?;
    writeln!(std::io::stdout(), "{value}")?;
    Ok(ExitCode::SUCCESS)
}
