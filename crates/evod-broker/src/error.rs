//! The broker's typed errors: [`BrokerError`] for operations, [`WireError`]
//! for bytes read from the broker that are not a valid message.

use std::time::Duration;

use evod_evolve::RecipeError;
use thiserror::Error;

/// Why bytes read from the broker were refused. Everything read is
/// untrusted: a message that is not exactly what this build writes is
/// refused by name, never evaluated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum WireError {
    /// Fewer bytes than the field being read needs.
    #[error("{what}: truncated at {field} (needs {need} bytes, {have} left)")]
    Truncated {
        /// Message kind ("task", "result").
        what: &'static str,
        /// Field being read.
        field: &'static str,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes after the end of the message.
    #[error("{what}: {extra} bytes after the end of the message")]
    Trailing {
        /// Message kind.
        what: &'static str,
        /// Extra bytes.
        extra: usize,
    },
    /// A version byte this build does not speak.
    #[error("{what}: wire version {got}, this build speaks {want}")]
    Version {
        /// Message kind.
        what: &'static str,
        /// Version found.
        got: u8,
        /// Version this build writes.
        want: u8,
    },
    /// A task kind this build does not know.
    #[error("task: unknown candidate kind {0} (this build knows 1, ES recipes, and 2, GA recipes)")]
    Kind(u8),
    /// Task flags this build does not know (it knows bit 0, the gate).
    #[error("task: unknown flags {0:#04x} (this build knows 0x01, the publish gate)")]
    Flags(u8),
    /// A count or length outside its bounds.
    #[error("{what}: {field} is {got}, allowed {min}..={max}")]
    Bound {
        /// Message kind.
        what: &'static str,
        /// Field.
        field: &'static str,
        /// Value found.
        got: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// A run or host name that is not `[A-Za-z0-9._-]{1,64}`.
    #[error("{what}: {field} {name:?} is not 1 to 64 characters of [A-Za-z0-9._-]")]
    Name {
        /// Message kind.
        what: &'static str,
        /// Field.
        field: &'static str,
        /// The name, lossily decoded.
        name: String,
    },
    /// A recipe that does not decode.
    #[error("task: candidate {index}: {source}")]
    Recipe {
        /// Index of the recipe in the task.
        index: usize,
        /// Why.
        source: RecipeError,
    },
    /// A fitness that is NaN.
    #[error("result: fitness of candidate {candidate} is NaN")]
    Fitness {
        /// Candidate.
        candidate: u32,
    },
    /// A stream entry or hash without the field the protocol puts there.
    #[error("{what}: malformed broker entry: {reason}")]
    Entry {
        /// Entry kind.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// Why a broker operation failed.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The broker cannot be reached (refused, reset, timed out, loading its
    /// data after a restart). Retry with [`crate::Backoff`]; the connection
    /// is reopened on the next call.
    #[error("broker unavailable during {op}: {reason}")]
    Unavailable {
        /// Operation that failed.
        op: &'static str,
        /// The client's or server's words.
        reason: String,
    },
    /// The broker answered with an error other than unavailability.
    #[error("broker refused {op}: {reason}")]
    Server {
        /// Operation that failed.
        op: &'static str,
        /// The server's words.
        reason: String,
    },
    /// Bytes read from the broker are not a valid message.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A message names another run than this broker's.
    #[error("message is for run {got:?}, this broker serves run {want:?}")]
    WrongRun {
        /// Run named by the message.
        got: String,
        /// This broker's run.
        want: String,
    },
    /// No base with this hash has been published.
    #[error("base {hash:016x} is not on the broker")]
    BaseMissing {
        /// The hash asked for.
        hash: u64,
    },
    /// A fetched base whose bytes do not hash to the name it was fetched by.
    #[error("base {want:016x}: fetched parameters have checksum {have:016x}; refused")]
    BaseMismatch {
        /// Hash asked for.
        want: u64,
        /// Checksum of what came back.
        have: u64,
    },
    /// A base whose stored description is impossible.
    #[error("base {hash:016x}: {reason}")]
    BadBase {
        /// Hash asked for.
        hash: u64,
        /// What was wrong.
        reason: String,
    },
    /// Another coordinator holds the lease (after waiting as long as asked).
    #[error("coordinator lease is held by {holder:?} for {remaining:?} more")]
    LeaseHeld {
        /// The holder's token.
        holder: String,
        /// Time left on its lease.
        remaining: Duration,
    },
    /// Our coordinator lease lapsed or was taken: stop publishing.
    #[error("coordinator lease of {holder:?} is lost")]
    LeaseLost {
        /// Our token.
        holder: String,
    },
    /// A task's lease is no longer ours (it was reclaimed by another
    /// evaluator or acknowledged).
    #[error("task {id} is no longer leased to {consumer:?}")]
    NotLeased {
        /// Stream entry id.
        id: String,
        /// This evaluator's consumer name.
        consumer: String,
    },
    /// Results handed to `ack` that do not belong to the task.
    #[error("results do not match task {id}: {reason}")]
    ResultMismatch {
        /// Stream entry id.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// A configuration value out of range.
    #[error("broker configuration: {0}")]
    Config(String),
}
