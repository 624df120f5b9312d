//! Error types of the crate: [`EvolveError`] for the loop and checkpoints,
//! [`EvalError`] for evaluators.

use std::path::PathBuf;

use thiserror::Error;

/// Why an [`crate::Evaluator`] could not evaluate a batch at all.
///
/// A single candidate that cannot be evaluated is not an error: the
/// evaluator returns `None` for it (quarantined).
#[derive(Debug, Error)]
pub enum EvalError {
    /// No worker (or thread) is available to evaluate.
    #[error("evaluator unavailable: {0}")]
    Unavailable(String),
    /// The evaluation failed for a reason that concerns the whole batch.
    #[error("evaluation failed: {0}")]
    Failed(String),
    /// Any other error, kept as its source.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Errors of the evolution loop and of checkpoint files.
#[derive(Debug, Error)]
pub enum EvolveError {
    /// A configuration value is out of range.
    #[error("invalid evolver configuration: {0}")]
    Config(String),
    /// The parameter layout (tensor specs) is unusable.
    #[error("invalid parameter layout: {0}")]
    Layout(String),
    /// The initial parameters (or a checkpoint's state) fail validation.
    #[error("invalid {what}: {reason}")]
    InvalidState {
        /// What was checked (e.g. "initial parameters").
        what: String,
        /// The rejection.
        reason: String,
    },
    /// The evaluator failed for the whole batch; the generation was not
    /// committed and the step may be retried.
    #[error("generation {generation}: {source}")]
    Eval {
        /// The generation that was being evaluated.
        generation: u64,
        /// The evaluator's error.
        source: EvalError,
    },
    /// The evaluator broke its contract (wrong number of results).
    #[error("evaluator returned {got} results for {expected} candidates")]
    EvaluatorContract {
        /// Candidates sent.
        expected: usize,
        /// Results received.
        got: usize,
    },
    /// A checkpoint does not match the architecture it is resumed with.
    #[error("checkpoint does not match the architecture: {0}")]
    CheckpointMismatch(String),
    /// Reading or writing a checkpoint file failed.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The checkpoint file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The checkpoint file is shorter than its header says.
    #[error("checkpoint {path}: truncated: {len} bytes, expected {expected}")]
    Truncated {
        /// The checkpoint file.
        path: PathBuf,
        /// Actual length.
        len: u64,
        /// Length the header promises (or the header's own length).
        expected: u64,
    },
    /// The file does not start with the checkpoint magic.
    #[error("checkpoint {path}: not an evod checkpoint (bad magic)")]
    BadMagic {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// The file's format version is not one this build reads.
    #[error("checkpoint {path}: unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// The checkpoint file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// The payload's checksum does not match: the file is corrupt.
    #[error("checkpoint {path}: checksum mismatch (file is corrupt)")]
    Checksum {
        /// The checkpoint file.
        path: PathBuf,
    },
    /// The payload passed the checksum but does not decode.
    #[error("checkpoint {path}: cannot decode: {reason}")]
    Decode {
        /// The checkpoint file.
        path: PathBuf,
        /// Decoder message.
        reason: String,
    },
    /// The run cannot progress: `generations` consecutive generations (or
    /// failed steps) did nothing; `reason` is the last one's.
    #[error("no progress in {generations} consecutive generations: {reason}")]
    NoProgress {
        /// Consecutive useless generations or failed steps.
        generations: u32,
        /// Why the last one did nothing.
        reason: crate::progress::NoProgress,
    },
    /// The checkpoint could not be encoded.
    #[error("checkpoint encoding failed: {0}")]
    Encode(String),
}
