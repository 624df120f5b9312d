//! evod's task broker: how a coordinator hands a generation's candidates to
//! evaluators on other hosts and gets their fitnesses back.
//!
//! The traits ([`Coordinator`], [`Evaluator`]) are the boundary; the one
//! engine today is Redis Streams ([`RedisBroker`]), chosen so that another
//! (NATS JetStream) can be added behind the same traits. What travels is
//! small and untrusted: tasks name a run, a generation, the base's hash and
//! the candidates as recipes ([`wire::Task`]); results carry (run,
//! generation, candidate, fitness, host) ([`wire::TaskResult`]). Every byte
//! read from the broker is decoded with bounded lengths and refused with a
//! typed [`WireError`] when it is not exactly what this build writes.
//!
//! Delivery is at least once; results are deduplicated by (generation,
//! candidate) on the server, atomically with the acknowledgement, so each
//! result counts exactly once. The protocol (keys, streams, leases, dead
//! letters) is described in `docs/distributed.md`.

#![deny(missing_docs)]

mod backoff;
mod broker;
mod error;
mod redis_broker;
mod scripts;
pub mod wire;

pub use backoff::{Backoff, retry_unavailable};
pub use broker::{
    AckOutcome, Activity, Coordinator, DeadLetter, Delivery, Enqueued, Evaluator, HostInfo, Lease,
    Reclaimed, Retired, Round,
};
pub use error::{BrokerError, WireError};
pub use redis_broker::{RedisBroker, RedisConfig, redact_url};
pub use wire::{Task, TaskResult, Work};
