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
//!   reaches an evaluator or the model file; bounds are per element and
//!   relative to each tensor's scale ([`TensorScale`]).
//! - [`Recipe`], [`Base`] and [`noise`]: an ES candidate travels as
//!   `(base checksum, seed, σ, sign)` and is regenerated bit-identically by
//!   whoever evaluates it ([`Evaluator::evaluate_recipes`]).
//! - [`GaRecipe`], [`GaParents`]: a GA child travels as its parents'
//!   checksums, its crossover and its mutation (seed, σ per tensor), and is
//!   rebuilt bit-identically by whoever holds the parents
//!   ([`Evaluator::evaluate_ga_for`]).
//! - [`NoProgress`] and [`ProgressGuard`]: a generation in which every
//!   candidate was rejected or every evaluation failed, and a bounded
//!   number of them in a row turned into a typed error.
//! - [`Checkpoint`], [`save_checkpoint`], [`load_checkpoint`]: resumable,
//!   bit-identical runs.
//! - [`InProcessEvaluator`] and [`solve_in_process`]: evaluation on threads
//!   of this process over an `evod_runtime::Task`.
//!
//! The format, defaults and guarantees are in `docs/evolution.md`.
#![deny(missing_docs)]

use evod_runtime as rt;

/// Defines `fn $name` as `$body`, also compiled for AVX2 (and BMI2's
/// `mulx`) and picked at run time where the CPU has them. The integer
/// arithmetic is exact and every floating-point operation is one correctly
/// rounded IEEE operation (Rust never fuses or reorders them), so both
/// versions give the same bits; the wide one only runs faster.
macro_rules! multiversioned {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,bmi2")]
                fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("bmi2")
                {
                    // SAFETY: `wide` is `body` compiled for AVX2 and BMI2,
                    // which the CPU was just checked to support.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

mod checkpoint;
mod config;
mod error;
mod es;
mod evaluator;
mod evolver;
mod ga;
mod ga_recipe;
mod inprocess;
mod layout;
pub mod noise;
mod par;
mod progress;
mod recipe;
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
pub use evaluator::{Evaluator, FnEvaluator, Purpose, RecipePart};
pub use evolver::{
    EvolveStats, Evolver, GateCandidate, GenerationReport, PublishCandidate, Scored,
};
pub use ga::{GaState, Individual};
pub use ga_recipe::{Blend, Cross, GaBatch, GaParents, GaRecipe, MAX_GA_TENSORS, Mutation};
pub use inprocess::{InProcessEvaluator, SolveReport, solve_in_process};
pub use layout::{ParamLayout, TensorScale, TensorSpan};
pub use progress::{DEFAULT_MAX_USELESS_GENERATIONS, NoProgress, ProgressGuard};
pub use recipe::{
    Base, CHECKSUM_TICK, RECIPE_BYTES, Recipe, RecipeError, Sign, checksum, checksum_with,
};
pub use validate::{Rejection, RejectionKind, Validator};
