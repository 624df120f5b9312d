//! `LlamaError`: every way the llama.cpp runtime and the control-vector file
//! helpers fail, each naming the thing and the problem.

use std::path::PathBuf;

/// An error of the llama.cpp runtime or of a control-vector file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LlamaError {
    /// The crate was compiled without its `llm` feature: no llama.cpp inside.
    #[error("this evod was built without the `llm` feature; rebuild with `--features llm`")]
    NotBuilt,
    /// llama.cpp returned NULL loading the base model.
    #[error("llama.cpp could not load the model {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What llama.cpp logged (its last warning and error lines), or our own check.
        reason: String,
    },
    /// llama.cpp returned NULL creating the context.
    #[error(
        "llama.cpp could not create a context for {path} (n_ctx {n_ctx}, n_batch {n_batch}): {reason}"
    )]
    Context {
        /// The model file.
        path: PathBuf,
        /// Requested context size.
        n_ctx: u32,
        /// Requested batch size.
        n_batch: u32,
        /// What llama.cpp logged.
        reason: String,
    },
    /// Options out of range.
    #[error("invalid llama options: {0}")]
    Options(String),
    /// A control vector whose length is not `n_embd * (n_layer - 1)`.
    #[error("control vector of {got} values, the model needs {expected} (n_embd x (n_layer - 1))")]
    CvecWidth {
        /// `n_embd * (n_layer - 1)`.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// A NaN or infinite value in a control vector.
    #[error("control vector value {index} is {value}; only finite values are allowed")]
    CvecNotFinite {
        /// Index in the layer-major vector.
        index: usize,
        /// The value.
        value: f32,
    },
    /// `llama_set_adapter_cvec` refused the vector.
    #[error("llama.cpp refused the control vector: {reason}")]
    Cvec {
        /// What llama.cpp logged.
        reason: String,
    },
    /// Empty text given to the tokenizer.
    #[error("the text is empty; there is nothing to tokenize")]
    EmptyText,
    /// Text longer than llama.cpp's `int32_t` lengths.
    #[error("the text is {bytes} bytes, more than llama.cpp's tokenizer takes (2^31 - 1)")]
    TextTooLong {
        /// Length in bytes.
        bytes: usize,
    },
    /// The tokenizer failed.
    #[error("llama.cpp could not tokenize the text: {reason}")]
    Tokenize {
        /// Why.
        reason: String,
    },
    /// Fewer than two tokens: no next-token likelihood to score.
    #[error("{count} tokens; at least 2 are needed to score a next-token likelihood")]
    TooFewTokens {
        /// The count.
        count: usize,
    },
    /// A scoring window outside `2..=n_ctx`.
    #[error("a window of {window} tokens is outside 2..={n_ctx} (the context size)")]
    Window {
        /// Requested window.
        window: usize,
        /// The context's size.
        n_ctx: u32,
    },
    /// A token id outside the model's vocabulary.
    #[error("token {token} at position {index} is outside the vocabulary 0..{n_vocab}")]
    Token {
        /// Position in the token slice.
        index: usize,
        /// The id.
        token: i32,
        /// Vocabulary size.
        n_vocab: usize,
    },
    /// `llama_decode` failed.
    #[error(
        "llama_decode returned {status} ({meaning}) in the window starting at token {window_start}: {reason}"
    )]
    Decode {
        /// The status code.
        status: i32,
        /// What the code means per llama.h.
        meaning: &'static str,
        /// First token of the window.
        window_start: usize,
        /// What llama.cpp logged.
        reason: String,
    },
    /// The model produced NaN or infinite logits (for example under a huge
    /// control vector): the likelihood is undefined. Callers that rank
    /// candidates treat it as the worst fitness.
    #[error("the logits predicting token {index} are not finite (NaN or infinity)")]
    NonFiniteLogits {
        /// Position of the predicted token in the token slice.
        index: usize,
    },
    /// A control-vector file that llama.cpp's loader would refuse, or whose
    /// width does not fit the model.
    #[error("control vector {path}: {problem}")]
    ControlVectorFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Reading or writing a GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] evod_gguf::GgufError),
}
