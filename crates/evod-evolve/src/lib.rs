//! evod's evolution library: strategies (GA, OpenAI-ES), candidate
//! validation (CTRM), checkpoints, and a generation loop that does not care
//! how candidates are evaluated.
//!
//! - [`Evolver`]: one [`Evolver::step`] per generation against any
//!   [`Evaluator`]; [`GenerationReport`] says what happened, including a
//!   [`PublishCandidate`] when a candidate passed the gate.
//! - [`EvolverConfig`], [`GaConfig`], [`EsConfig`], [`ValidationConfig`]:
//!   documented defaults that solve CartPole-v1 (4-16-2 tanh) quickly.
//! - [`Validator`] and [`Rejection`]: what a candidate must pass before it
//!   reaches an evaluator or the model file.
//! - [`Checkpoint`], [`save_checkpoint`], [`load_checkpoint`]: resumable,
//!   bit-identical runs.
//! - [`InProcessEvaluator`] and [`solve_in_process`]: evaluation on threads
//!   of this process over an `evod_runtime::Task`.
//!
//! The format, defaults and guarantees are in `docs/evolution.md`.
#![deny(missing_docs)]

use evod_runtime as rt;

mod checkpoint;
mod config;
mod error;
mod es;
mod evaluator;
mod evolver;
mod ga;
mod inprocess;
mod layout;
mod validate;

pub use checkpoint::{
    CHECKPOINT_MAGIC, CHECKPOINT_VERSION, Checkpoint, RngState, StrategyState, decode_checkpoint,
    encode_checkpoint, load_checkpoint, save_checkpoint,
};
pub use config::{
    Crossover, EsConfig, EvolverConfig, GaConfig, Selection, StrategyKind, ValidationConfig,
};
pub use error::{EvalError, EvolveError};
pub use es::EsState;
pub use evaluator::{Evaluator, FnEvaluator};
pub use evolver::{EvolveStats, Evolver, GenerationReport, PublishCandidate, Scored};
pub use ga::{GaState, Individual};
pub use inprocess::{InProcessEvaluator, SolveReport, solve_in_process};
pub use layout::{ParamLayout, TensorSpan};
pub use validate::{Rejection, RejectionKind, Validator};
