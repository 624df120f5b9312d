//! llama.cpp as an evod worker runtime.
//!
//! A [`BaseModel`] is one loaded GGUF language model plus ONE llama.cpp
//! context, kept across candidates: a worker sets a candidate's control
//! vector ([`BaseModel::set_control_vector`], `llama_set_adapter_cvec`, no
//! reload), then scores a token stream ([`BaseModel::nll`]): memory cleared
//! per window, decode, sum of next-token negative log-likelihoods.
//!
//! llama.cpp is compiled in only with the cargo feature `llm` (it vendors
//! llama.cpp through `llama-cpp-sys-2` and needs cmake, clang and
//! libclang-dev). Without it the API is the same and every constructor
//! returns [`LlamaError::NotBuilt`], so the workspace builds quickly.
//!
//! [`read_control_vector`] / [`write_control_vector`] read and write the
//! control-vector file llama.cpp's `--control-vector` loads
//! (`general.architecture = "controlvector"`, F32 tensors `direction.N`),
//! applying the rules of llama.cpp's loader (`common/common.cpp`,
//! `common_control_vector_load_one`).
#![deny(missing_docs)]

mod cvec;
mod error;
#[cfg(feature = "llm")]
mod ffi;
#[cfg(feature = "llm")]
mod log;

use std::path::Path;

pub use cvec::{ControlVector, read_control_vector, write_control_vector};
pub use error::LlamaError;

/// Whether this build has llama.cpp in it (the `llm` feature).
pub const BUILT: bool = cfg!(feature = "llm");

/// How a [`BaseModel`] runs llama.cpp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlamaOptions {
    /// Threads of ggml's CPU backend for one decode. evod runs one worker
    /// per core, so the default is 1: ggml's threads meet at spinning
    /// barriers, which stall when another process holds the core
    /// (docs/llm.md has the figures).
    pub threads: usize,
    /// Context size in tokens: the largest scoring window.
    pub n_ctx: u32,
    /// Tokens per `llama_decode` (also the physical micro-batch), at most
    /// `n_ctx` (a larger value is reduced to it). Logits of a whole batch
    /// are kept: `n_batch * n_vocab * 4` bytes.
    pub n_batch: u32,
    /// Keep the attention K/V cache in F32 instead of llama.cpp's default
    /// F16 (exact comparisons with a reference; twice the cache memory).
    pub kv_f32: bool,
    /// Use flash attention (llama.cpp's `flash_attn_type` enabled instead
    /// of disabled).
    pub flash_attn: bool,
}

impl Default for LlamaOptions {
    fn default() -> Self {
        LlamaOptions {
            threads: 1,
            n_ctx: 512,
            n_batch: 512,
            kv_f32: false,
            flash_attn: false,
        }
    }
}

impl LlamaOptions {
    fn check(&self) -> Result<(), LlamaError> {
        if self.threads == 0 || self.threads > 512 {
            return Err(LlamaError::Options(format!(
                "threads {} is outside 1..=512",
                self.threads
            )));
        }
        if self.n_ctx < 2 || self.n_ctx > 1 << 20 {
            return Err(LlamaError::Options(format!(
                "n_ctx {} is outside 2..=1048576",
                self.n_ctx
            )));
        }
        if self.n_batch == 0 {
            return Err(LlamaError::Options("n_batch is 0".into()));
        }
        Ok(())
    }
}

/// A sum of next-token negative log-likelihoods (natural log) over `count`
/// scored tokens. Sums, not a ratio, so callers can aggregate shards.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Nll {
    /// Sum of `-ln p(token | prefix)`.
    pub sum: f64,
    /// Tokens scored.
    pub count: u64,
}

impl Nll {
    /// `exp(sum / count)`; NaN when nothing was scored.
    pub fn perplexity(&self) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        (self.sum / self.count as f64).exp()
    }

    /// Mean NLL per scored token (`sum / count`).
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

impl std::ops::AddAssign for Nll {
    fn add_assign(&mut self, rhs: Nll) {
        self.sum += rhs.sum;
        self.count += rhs.count;
    }
}

/// Routes llama.cpp's and ggml's log into `tracing` (targets `llama.cpp` and
/// `ggml`; their INFO is our DEBUG), once per process; later calls do
/// nothing. [`BaseModel::load`] calls it too, because the reason a load
/// fails is only on that log. Without the `llm` feature it does nothing.
pub fn route_logs_to_tracing() {
    #[cfg(feature = "llm")]
    log::install();
}

/// One loaded base model and ONE context, reused across candidates.
///
/// Not `Sync`: one thread at a time drives it (it is `Send`).
pub struct BaseModel {
    #[cfg(feature = "llm")]
    inner: ffi::Inner,
    #[cfg(not(feature = "llm"))]
    never: std::convert::Infallible,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel")
            .field("architecture", &self.architecture())
            .field("n_embd", &self.n_embd())
            .field("n_layer", &self.n_layer())
            .finish_non_exhaustive()
    }
}

impl BaseModel {
    /// Loads `path` (mmap) and creates its context. A file llama.cpp cannot
    /// load is [`LlamaError::Load`] naming the file and the reason llama.cpp
    /// logged; options out of range are [`LlamaError::Options`].
    pub fn load(path: &Path, opts: &LlamaOptions) -> Result<Self, LlamaError> {
        opts.check()?;
        #[cfg(feature = "llm")]
        {
            Ok(BaseModel {
                inner: ffi::Inner::load(path, opts)?,
            })
        }
        #[cfg(not(feature = "llm"))]
        {
            let _ = path;
            Err(LlamaError::NotBuilt)
        }
    }

    /// `general.architecture` of the base (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> &str {
        #[cfg(feature = "llm")]
        return &self.inner.arch;
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Embedding width.
    pub fn n_embd(&self) -> usize {
        #[cfg(feature = "llm")]
        return self.inner.n_embd;
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Number of transformer blocks.
    pub fn n_layer(&self) -> usize {
        #[cfg(feature = "llm")]
        return self.inner.n_layer;
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        #[cfg(feature = "llm")]
        return self.inner.n_vocab;
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// The context size actually allocated (the largest window).
    pub fn n_ctx(&self) -> u32 {
        #[cfg(feature = "llm")]
        return self.inner.n_ctx;
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Length of a control vector for this model: `n_embd * (n_layer - 1)`,
    /// layer-major, `direction.1 ..= direction.(n_layer-1)` (llama.cpp never
    /// steers layer 0).
    pub fn cvec_len(&self) -> usize {
        cvec::cvec_len(self.n_embd(), self.n_layer())
    }

    /// Tokenizes `text` with the model's vocabulary, without BOS/EOS and
    /// without parsing special-token text. Empty text is
    /// [`LlamaError::EmptyText`].
    pub fn tokenize(&self, text: &str) -> Result<Vec<i32>, LlamaError> {
        if text.is_empty() {
            return Err(LlamaError::EmptyText);
        }
        #[cfg(feature = "llm")]
        return self.inner.tokenize(text);
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Set (Some) or clear (None) the control vector applied to layers
    /// 1..n_layer-1. Wrong length → [`LlamaError::CvecWidth`]; NaN or
    /// infinity → [`LlamaError::CvecNotFinite`]. Uses
    /// `llama_set_adapter_cvec` (raw bindings): no model reload. A zero
    /// vector scores bit for bit like no vector.
    pub fn set_control_vector(&mut self, cvec: Option<&[f32]>) -> Result<(), LlamaError> {
        if let Some(v) = cvec {
            let expected = self.cvec_len();
            if v.len() != expected {
                return Err(LlamaError::CvecWidth {
                    expected,
                    got: v.len(),
                });
            }
            if let Some((index, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                return Err(LlamaError::CvecNotFinite { index, value });
            }
        }
        #[cfg(feature = "llm")]
        return self.inner.set_cvec(cvec);
        #[cfg(not(feature = "llm"))]
        match self.never {}
    }

    /// Negative log-likelihood of `tokens`, scored in consecutive,
    /// non-overlapping windows of `window` tokens (the last may be shorter).
    /// The memory is cleared before each window; within a window every
    /// token but the first is scored, predicted from the window's tokens
    /// before it (so `count = tokens.len() - number of windows`; unlike
    /// llama-perplexity, which scores only each window's second half).
    /// `beat()` is called after every decode batch so a worker can keep its
    /// heartbeat. Returns sums; see [`Nll::perplexity`].
    ///
    /// Errors: fewer than 2 tokens, a window outside `2..=n_ctx`, a token
    /// outside the vocabulary, a failed decode, non-finite logits.
    pub fn nll(
        &mut self,
        tokens: &[i32],
        window: usize,
        beat: &mut dyn FnMut(),
    ) -> Result<Nll, LlamaError> {
        if tokens.len() < 2 {
            return Err(LlamaError::TooFewTokens {
                count: tokens.len(),
            });
        }
        let n_ctx = self.n_ctx();
        if window < 2 || window > n_ctx as usize {
            return Err(LlamaError::Window { window, n_ctx });
        }
        let n_vocab = self.n_vocab();
        if let Some((index, &token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| **t < 0 || **t as usize >= n_vocab)
        {
            return Err(LlamaError::Token {
                index,
                token,
                n_vocab,
            });
        }
        #[cfg(feature = "llm")]
        return self.inner.nll(tokens, window, beat);
        #[cfg(not(feature = "llm"))]
        {
            let _ = beat;
            match self.never {}
        }
    }
}
