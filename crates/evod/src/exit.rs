//! Process exit codes, in one place so `docs/operations.md` can list them.
//!
//! Every command returns `anyhow::Result`; [`code_for`] turns an error into
//! the documented code by looking at what caused it.

#![allow(dead_code)] // Codes are used as the roles that return them land.

use std::process::ExitCode;

/// Success.
pub const OK: u8 = evod_supervisor::exit_code::OK;
/// Generic failure, or `evod status --check` found the daemon unhealthy.
pub const FAILURE: u8 = 1;
/// Bad command-line arguments (clap's own code).
pub const USAGE: u8 = 2;
/// A model or data file is malformed or does not match what was asked.
pub const BAD_INPUT: u8 = 3;
/// No daemon answers on the control socket.
pub const NO_DAEMON: u8 = 4;
/// The supervisor gave up: restarts exceeded the configured intensity.
pub const GAVE_UP: u8 = evod_supervisor::exit_code::GAVE_UP;
/// An I/O error while writing (disk full, read-only, EIO), or a state
/// folder `evod run` cannot write.
pub const IO: u8 = 6;
/// The control socket exists but we may not connect to it (the daemon
/// runs as another user).
pub const DENIED: u8 = 7;
/// The evolver could not progress (every candidate rejected or every
/// evaluation failing for `--max-useless-generations` in a row); the
/// supervisor ends the daemon with it.
pub const NO_PROGRESS: u8 = evod_supervisor::exit_code::NO_PROGRESS;

/// An error that carries the exit code the process should end with.
#[derive(Debug)]
pub struct Coded {
    /// The exit code.
    pub code: u8,
    /// What went wrong.
    pub error: anyhow::Error,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Coded {}

/// Wraps `error` so that the process exits with `code`.
pub fn with_code(code: u8, error: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Coded {
        code,
        error: error.into(),
    })
}

/// A control-socket client's error with its exit code: no daemon is
/// `NO_DAEMON`, a socket we may not open `DENIED`, anything else (a
/// timeout, a refusal) a plain failure.
pub fn client_error(error: evod_wire::ClientError) -> anyhow::Error {
    match error {
        evod_wire::ClientError::NoDaemon { .. } => with_code(NO_DAEMON, error),
        evod_wire::ClientError::PermissionDenied { .. } => with_code(DENIED, error),
        other => anyhow::Error::new(other),
    }
}

/// The exit code for an error that reached `main`.
pub fn code_for(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(coded) = cause.downcast_ref::<Coded>() {
            return coded.code;
        }
        if cause.downcast_ref::<evod_gguf::GgufError>().is_some() {
            return BAD_INPUT;
        }
    }
    FAILURE
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose
/// text its parent's message already ends with (libraries that both print
/// and return their source would otherwise say it twice).
pub fn render(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Converts a raw code into an [`ExitCode`].
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}
