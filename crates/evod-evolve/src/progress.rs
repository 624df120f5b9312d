//! No-progress detection: a generation in which no new candidate could be
//! evaluated is *useless* ([`NoProgress`] says why), and a run with
//! `max_useless` of them in a row, or as many consecutive evaluator
//! failures, must stop with a typed error rather than report "reached N
//! generations" with nothing done ([`ProgressGuard`]).
//!
//! A generation is useless when every new candidate (GA children, ES
//! perturbations; elites and the ES centre do not count) was rejected by
//! validation — the strategy cannot move — or every one sent to the
//! evaluator came back quarantined or non-finite.

use thiserror::Error;

use crate::error::EvolveError;
use crate::evolver::Evolver;
use crate::validate::RejectionKind;

/// Consecutive useless generations (or failed steps) a [`ProgressGuard`]
/// tolerates by default before it gives up.
pub const DEFAULT_MAX_USELESS_GENERATIONS: u32 = 10;

/// Why a generation did nothing.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum NoProgress {
    /// Validation rejected every new candidate.
    #[error(
        "every new candidate was rejected ({rejected} rejections, mostly {dominant:?}: {example})"
    )]
    AllRejected {
        /// Rejections this generation.
        rejected: u64,
        /// The most frequent kind.
        dominant: RejectionKind,
        /// One rejection of that kind, as text.
        example: String,
    },
    /// Every new candidate sent was quarantined or got a non-finite fitness.
    #[error("every evaluation failed ({failed} candidates quarantined or with non-finite fitness)")]
    AllFailed {
        /// Candidates sent without a usable fitness.
        failed: u64,
    },
    /// The evaluator returned an error for the whole batch.
    #[error("the evaluator failed: {error}")]
    EvaluatorFailed {
        /// The error, as text.
        error: String,
    },
}

/// Counts consecutive useless generations and failed steps; see the module
/// documentation. The caller feeds it every step's outcome.
///
/// ```text
/// let mut guard = ProgressGuard::default();
/// loop {
///     match evolver.step(&mut ev) {
///         Ok(_) => guard.observe(&evolver)?,
///         Err(e @ EvolveError::Eval { .. }) => guard.observe_error(&e)?, // retry
///         Err(e) => return Err(e),
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressGuard {
    max_useless: u32,
    useless: u32,
}

impl Default for ProgressGuard {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_USELESS_GENERATIONS)
    }
}

impl ProgressGuard {
    /// A guard that fails at the `max_useless`-th consecutive useless
    /// generation or failed step (at least 1).
    pub fn new(max_useless: u32) -> Self {
        Self {
            max_useless: max_useless.max(1),
            useless: 0,
        }
    }

    /// Consecutive useless generations or failed steps so far.
    pub fn useless(&self) -> u32 {
        self.useless
    }

    /// Records the outcome of the step `evolver` just completed.
    pub fn observe(&mut self, evolver: &Evolver) -> Result<(), EvolveError> {
        self.observe_outcome(evolver.no_progress())
    }

    /// Records a completed generation: `None` if it made progress.
    pub fn observe_outcome(&mut self, outcome: Option<&NoProgress>) -> Result<(), EvolveError> {
        match outcome {
            None => {
                self.useless = 0;
                Ok(())
            }
            Some(reason) => self.count(reason.clone()),
        }
    }

    /// Records a step that failed with `error` (nothing committed; the
    /// caller retries).
    pub fn observe_error(&mut self, error: &EvolveError) -> Result<(), EvolveError> {
        self.count(NoProgress::EvaluatorFailed {
            error: error.to_string(),
        })
    }

    fn count(&mut self, reason: NoProgress) -> Result<(), EvolveError> {
        self.useless += 1;
        if self.useless >= self.max_useless {
            return Err(EvolveError::NoProgress {
                generations: self.useless,
                reason,
            });
        }
        Ok(())
    }
}
