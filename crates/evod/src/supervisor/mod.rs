//! The supervisor's machinery, used by `evod run` (`run.rs`) and by the
//! control-socket clients (`status.rs`).
//!
//! - `daemon`: the event loop that ties everything together.
//! - `spawn`: the one helper that starts every child process.
//! - `reap`: reaping (children and orphans) and exit statuses in words.
//! - `policy`: restart policy (backoff, Erlang-style intensity/period).
//! - `link`: the supervisor's side of each worker's control channel.
//! - `control`: the control socket, its wire protocol, server and client.
//! - `config`: the optional TOML file and the resolved configuration.
//! - `janitor`: removes the control socket if the supervisor is SIGKILLed.
//! - `standby`: warm standby workers, promoted when a worker dies.

pub mod config;
pub mod control;
pub mod daemon;
pub mod janitor;
pub mod link;
pub mod policy;
pub mod reap;
pub mod spawn;
pub mod standby;
