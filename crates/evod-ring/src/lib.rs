//! `evod-ring`: the shared-memory request/response channel between evod's
//! trusted processes (supervisor, evolver) and an untrusted runtime worker.
//!
//! One [`Segment`] per worker: an anonymous, sealed, owner-only `memfd`
//! created by the supervisor and inherited by the worker and the evolver.
//! It holds two channels ([`Channel::Eval`], [`Channel::Control`]), each a
//! pair of single-producer/single-consumer queues of fixed [`MsgHeader`]s
//! with an in-place payload area per direction, plus the worker epoch,
//! heartbeats and a stats block.
//!
//! - [`Client`] (evolver for `Eval`, supervisor for `Control`) sends requests
//!   and receives replies; [`Server`] (the worker) serves both channels.
//! - Waiting spins briefly, then parks on a shared futex word (see `wait`).
//! - Nothing read from the segment is trusted: a bad index, length or offset
//!   is [`RingError::PeerCorrupt`]; a dead worker (epoch bumped, heartbeat
//!   stale) is [`RingError::PeerLost`] with the ids that were in flight.
//! - No Rust reference is ever made over segment bytes a peer may write
//!   (that would be undefined behaviour, whatever the values): payloads and
//!   headers are copied in and out through raw pointers
//!   (`ptr::copy_nonoverlapping`, volatile reads and writes) to and from
//!   private buffers and validated there; [`Request::payload`] and
//!   [`Reply::payload`] point into those private buffers. The only
//!   references into the mapping are to blocks made of atomics.
//!
//! The design, memory orderings and failure detection are described in
//! `docs/ring.md`.

#![deny(missing_docs)]

mod client;
mod lane;
mod layout;
mod segment;
mod server;
mod sync;
pub mod sys;
mod wait;

use std::time::Duration;

pub use client::{Client, ClientConfig, Reply};
pub use layout::{
    LAYOUT_VERSION, MAGIC, MAX_PAYLOAD_BYTES, MAX_QUEUE_DEPTH, MsgHeader, PAYLOAD_ALIGN,
    STATS_OPCODES, TOKEN_PURPOSES, ZeroCopy,
};
pub use segment::{Beat, LayoutConfig, Scribble, Segment, StatsSnapshot};
pub use server::{Request, Server, ServerConfig};
pub use wait::WaitPolicy;

/// What the tokens a worker decodes are for, as the stats block counts
/// them ([`Segment::add_tokens`], [`StatsSnapshot::tokens`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenPurpose {
    /// Scoring training candidates.
    Train = 0,
    /// Scoring the publish gate's candidate on held-out data.
    Gate = 1,
}

impl TokenPurpose {
    /// Every purpose, in index order.
    pub const ALL: [TokenPurpose; TOKEN_PURPOSES] = [TokenPurpose::Train, TokenPurpose::Gate];

    /// The metric label: `train` or `gate`.
    pub fn name(self) -> &'static str {
        match self {
            TokenPurpose::Train => "train",
            TokenPurpose::Gate => "gate",
        }
    }
}

/// A process role with a heartbeat in the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `evod run`, the owner of the segment.
    Supervisor = 0,
    /// `evod evolver`, client of [`Channel::Eval`].
    Evolver = 1,
    /// `evod worker`, server of both channels.
    Worker = 2,
}

/// One of the two channels of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Evaluation traffic: client = evolver, server = worker.
    Eval = 0,
    /// Control traffic (PING, STATS, NEURAL_EXEC from the CLI): client =
    /// supervisor, server = worker.
    Control = 1,
}

impl Channel {
    /// Both channels, in index order.
    pub const ALL: [Channel; 2] = [Channel::Eval, Channel::Control];
}

/// Everything that can go wrong on the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The peer wrote something impossible into the segment.
    #[error("shared-memory peer is corrupt: {what}")]
    PeerCorrupt {
        /// What was wrong, naming the field and the values.
        what: String,
    },
    /// The worker died or was replaced (epoch changed, heartbeat stale);
    /// these requests will never be answered.
    #[error("shared-memory peer lost ({reason}); {} request(s) in flight: {in_flight:?}", in_flight.len())]
    PeerLost {
        /// Ids of the requests that were in flight.
        in_flight: Vec<u64>,
        /// Why the peer is considered lost.
        reason: String,
    },
    /// The segment was made by another layout or is not a segment at all.
    #[error("shared-memory segment layout mismatch: {what}")]
    LayoutMismatch {
        /// What differs, with both values.
        what: String,
    },
    /// The server's epoch is no longer the segment's: this worker has been
    /// replaced and must exit.
    #[error("worker epoch {mine} superseded by epoch {now}")]
    EpochChanged {
        /// The epoch this server serves.
        mine: u64,
        /// The segment's epoch now.
        now: u64,
    },
    /// The deadline passed before the event happened.
    #[error("timed out waiting on the shared-memory ring")]
    Timeout,
    /// No room in the queue or the payload area right now.
    #[error("shared-memory queue or payload area full")]
    Full,
    /// `recv` with no request in flight.
    #[error("no request in flight to receive a reply for")]
    NothingInFlight,
    /// The payload exceeds a lane's payload area.
    #[error("payload of {len} bytes exceeds the {max}-byte payload area")]
    PayloadTooLarge {
        /// Requested length.
        len: usize,
        /// Largest payload a message may carry.
        max: usize,
    },
    /// A second client for one channel, or a second server, in this process.
    #[error("{what} is already in use in this process")]
    InUse {
        /// The endpoint.
        what: String,
    },
    /// The API was used out of protocol (e.g. replying on an unsynced channel).
    #[error("ring misuse: {what}")]
    Protocol {
        /// What was wrong.
        what: String,
    },
    /// A system call failed; the message names it.
    #[error("shared-memory segment: {0}")]
    Io(#[from] std::io::Error),
}

/// Default time after which a silent worker heartbeat means `PeerLost`.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(2);
/// Default interval at which a [`Server`] refreshes the worker heartbeat.
pub const DEFAULT_BEAT_INTERVAL: Duration = Duration::from_millis(100);
