//! What every evod process sets up for itself: its log output and its name
//! in `top`. The supervisor, the worker and the evolver roles all use these
//! (children learn the log format from `EVOD_LOG_FORMAT`).

use serde::Deserialize;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (for a terminal).
    Human,
    /// One JSON object per line (for containers and log collectors).
    Json,
}

impl LogFormat {
    /// The value of `EVOD_LOG_FORMAT` that selects this format.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// Sends `tracing` output to stderr in `format`, filtered by `EVOD_LOG`
/// (default `info`). A second call does nothing.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVOD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Names this thread (and so the process, in `top`) for operators
/// (`PR_SET_NAME`; at most 15 bytes are kept). A failure is ignored: the
/// name is cosmetic.
pub fn set_process_name(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
}
