//! evod's neural runtime: the MLP a model file describes, the fitness tasks
//! it is scored on, and the model file conventions.
//!
//! - [`arch`]: [`Architecture`] and [`Activation`], the flat parameter layout.
//! - [`mlp`]: [`forward_batch`], [`Mlp`] and [`MlpLanes`] (8 networks side
//!   by side), f32 forward passes defined
//!   operation by operation so a numpy reference reproduces them exactly.
//! - [`cartpole`]: gymnasium's CartPole-v1, bit-exact; [`numpy_rng`] its
//!   seeding.
//! - [`supervised`] (XOR, sine) and [`csv`] (a user's data set).
//! - [`task`]: [`Task`], the one entry point that scores a parameter vector.
//! - [`model`]: [`Model`], [`ModelSpec`], [`write_model`], [`init_params`]:
//!   reading and writing evod models (see `docs/model-format.md`).
#![deny(missing_docs)]

pub mod arch;
pub mod cartpole;
pub mod csv;
mod error;
pub mod mlp;
pub mod model;
pub mod numpy_rng;
pub mod perplexity;
pub mod supervised;
pub mod task;

pub use arch::{Activation, Architecture, Family};
pub use error::RuntimeError;
pub use mlp::{Mlp, MlpLanes, Scratch, forward_batch};
pub use model::{Model, ModelSpec, init_params, read_params, write_model, write_model_with};
pub use task::Task;
