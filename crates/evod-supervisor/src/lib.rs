//! evod's supervisor (trusted, small): `evod run` builds a [`Config`] and
//! calls [`run`].
//!
//! - `daemon`: the event loop and everything it drives (its modules: the
//!   children's lifecycle, model sync, fallback, control requests).
//! - `spawn`: the one helper that starts every child process.
//! - `reap`: reaping (children and orphans) and exit statuses in words.
//! - `policy`: restart policy (backoff, Erlang-style intensity/period).
//! - `link`: the supervisor's side of each worker's control channel.
//! - `control`: the control socket's server (the protocol and the client
//!   are `evod_wire::control`).
//! - `metrics`: Prometheus metrics and the `/healthz`, `/readyz` probes,
//!   served over HTTP off the event loop (`--metrics-addr`).
//! - `config`: the resolved configuration.
//! - `janitor`: removes the control socket if the supervisor is SIGKILLed.
//! - `standby`: warm standby workers, promoted when a worker dies.
//! - `notice`: the thread that reads the workers' crash notices.
//! - `process`: logging (one writer per terminal, the live status line)
//!   and the process name, for every role.
//! - `units`: durations and sizes as operators write them.

#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod janitor;
pub mod link;
pub mod metrics;
pub mod notice;
pub mod policy;
pub mod process;
pub mod reap;
pub mod spawn;
pub mod standby;
pub mod units;

use std::path::PathBuf;

pub use config::Config;
pub use daemon::run;
pub use process::{LogFormat, end_status_line, init_logging, set_process_name, status_line};

/// The exit codes the supervisor itself decides (the binary's `exit.rs`
/// defines the rest and reuses these).
pub mod exit_code {
    /// Success.
    pub const OK: u8 = 0;
    /// A child failed past its restart intensity (`--on-give-up exit`).
    pub const GAVE_UP: u8 = 5;
    /// The evolver could not make progress (every candidate rejected or
    /// every evaluation failing for its bounded number of generations): it
    /// exits with this code and the supervisor ends the daemon with it.
    pub const NO_PROGRESS: u8 = 8;
}

/// Why the supervisor could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// There is no model file.
    #[error("no model at {}; create one with `evod init` or pass --dir", .0.display())]
    NoModel(PathBuf),
    /// The model file does not validate.
    #[error(transparent)]
    BadModel(#[from] evod_gguf::GgufError),
    /// A child failed past its restart intensity.
    #[error("{0}")]
    GaveUp(String),
    /// The shared segment of a worker cannot be created.
    #[error("cannot create the shared segment of worker {index}")]
    Segment {
        /// The worker.
        index: usize,
        /// Why.
        source: evod_ring::RingError,
    },
    /// Setting up the process failed (a step named in words: the janitor,
    /// the signal handlers, a thread).
    #[error("{what}")]
    Setup {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The control socket cannot be served.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// The metrics address cannot be served (`--metrics-addr`).
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The signal and control threads ended.
    #[error("the signal and control threads are gone")]
    ThreadsGone,
}
