//! [`RuntimeError`]: everything the runtime can refuse, each naming the
//! thing it is about.

use std::path::PathBuf;

use crate::csv::CsvError;

/// An error of the neural runtime, its tasks or its model files.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Layer sizes that cannot form a network.
    #[error("invalid architecture: {reason}")]
    InvalidArchitecture {
        /// What is wrong.
        reason: String,
    },
    /// An activation name that is not one of tanh, relu, sigmoid, identity.
    #[error("unknown activation {0:?} (expected tanh, relu, sigmoid or identity)")]
    UnknownActivation(String),
    /// A parameter vector of the wrong length.
    #[error("parameter vector has {found} values, the architecture needs {expected}")]
    ParamCount {
        /// What the architecture needs.
        expected: usize,
        /// What was given.
        found: usize,
    },
    /// A lane index beyond the lanes of [`crate::mlp::MlpLanes`].
    #[error("lane {lane} is out of range: there are {lanes} lanes")]
    LaneIndex {
        /// The index given.
        lane: usize,
        /// How many lanes there are.
        lanes: usize,
    },
    /// An input or output buffer of the wrong length.
    #[error("{what} buffer has {found} values, expected {expected}")]
    BufferSize {
        /// Which buffer.
        what: &'static str,
        /// The length needed (`usize::MAX` when it overflows).
        expected: usize,
        /// The length given.
        found: usize,
    },
    /// A task name or task string that is not understood.
    #[error("unknown task {0:?} (expected cartpole, xor, sine, external or csv:<path>:<target>)")]
    UnknownTask(String),
    /// A model of the `external` task evaluated by evod's own runtime: its
    /// fitness is the user's program's (`evod run --worker-cmd`).
    #[error("external task: run the workers with --worker-cmd")]
    ExternalTask,
    /// A model of the `perplexity` task evaluated by evod's own MLP
    /// runtime: its fitness is llama.cpp's (a worker built with the `llm`
    /// feature).
    #[error(
        "perplexity task: scored by llama.cpp in `evod worker` built with the llm feature, not by evod's MLP runtime"
    )]
    PerplexityTask,
    /// The base model or corpus of a perplexity task: missing, changed
    /// since `evod init`, empty, not UTF-8, too short.
    #[error("{}: {problem}", path.display())]
    PerplexityInput {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A forward pass asked of something that has none (a control vector).
    #[error("{what} has no forward pass of its own (it steers a llama.cpp base model)")]
    NoForwardPass {
        /// What it is.
        what: String,
    },
    /// A network whose input or output size does not fit the task.
    #[error("task {task} needs {expected}, the network has layers {layers}")]
    TaskMismatch {
        /// The task.
        task: String,
        /// What the task needs.
        expected: String,
        /// The network's layer sizes.
        layers: String,
    },
    /// A CSV data set that cannot be used.
    #[error(transparent)]
    Csv(#[from] CsvError),
    /// A GGUF file that cannot be read or written.
    #[error(transparent)]
    Gguf(#[from] evod_gguf::GgufError),
    /// A model file that is valid GGUF but not a valid evod model.
    #[error("{path}: {problem}", path = path.display())]
    Model {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
}
