//! The `llm` half: a model and one context through llama.cpp's C API
//! (`llama-cpp-sys-2` raw bindings). The safe `llama-cpp-2` wrapper is not
//! used: it has no call for `llama_set_adapter_cvec`, hides the context
//! pointer, and ties the context to the model by a lifetime, where a worker
//! keeps both in one value for its whole life.

use std::any::Any;
use std::ffi::{CString, c_char, c_void};
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Once;

use llama_cpp_sys_2 as sys;

use crate::log::{capture, reason};
use crate::{LlamaError, LlamaOptions, Nll};

static BACKEND: Once = Once::new();

/// A loaded model, its context and a batch, freed together on drop.
pub(crate) struct Inner {
    model: NonNull<sys::llama_model>,
    ctx: NonNull<sys::llama_context>,
    vocab: NonNull<sys::llama_vocab>,
    batch: sys::llama_batch,
    n_batch: usize,
    pub(crate) arch: String,
    pub(crate) n_embd: usize,
    pub(crate) n_layer: usize,
    pub(crate) n_vocab: usize,
    pub(crate) n_ctx: u32,
}

// SAFETY: llama.cpp's model and context are plain heap objects with no
// thread affinity; `Inner` owns them exclusively and `BaseModel` is not
// `Sync`, so one thread at a time calls into them.
unsafe impl Send for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: each pointer came from its llama.cpp constructor, is freed
        // exactly once here, in reverse order of creation.
        unsafe {
            sys::llama_batch_free(self.batch);
            sys::llama_free(self.ctx.as_ptr());
            sys::llama_model_free(self.model.as_ptr());
        }
    }
}

impl Inner {
    pub(crate) fn load(path: &Path, opts: &LlamaOptions) -> Result<Inner, LlamaError> {
        BACKEND.call_once(|| {
            crate::log::install();
            // SAFETY: one-time global initialisation, before any other call.
            unsafe { sys::llama_backend_init() }
        });
        let load_err = |reason: String| LlamaError::Load {
            path: path.to_owned(),
            reason,
        };
        // llama.cpp would take a directory or a FIFO and fail obscurely.
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(load_err("not a regular file".into())),
            Err(e) => return Err(load_err(e.to_string())),
        }
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| load_err("the path contains a NUL byte".into()))?;

        // SAFETY: returns a struct by value.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = 0;
        // SAFETY: `cpath` is a valid C string for the call; `mp` is a fully
        // initialised params struct (defaults, CPU only).
        let (model, lines) =
            capture(|| unsafe { sys::llama_model_load_from_file(cpath.as_ptr(), mp) });
        let model = NonNull::new(model).ok_or_else(|| load_err(reason(&lines)))?;

        // SAFETY (this block): `model` is a live model.
        let (vocab, n_embd, n_layer, n_vocab, arch) = unsafe {
            let vocab = sys::llama_model_get_vocab(model.as_ptr());
            let n_embd = sys::llama_model_n_embd(model.as_ptr());
            let n_layer = sys::llama_model_n_layer(model.as_ptr());
            let n_vocab = if vocab.is_null() {
                0
            } else {
                sys::llama_vocab_n_tokens(vocab)
            };
            (
                vocab,
                n_embd,
                n_layer,
                n_vocab,
                meta_str(model, "general.architecture"),
            )
        };
        let free_model = |e: LlamaError| {
            // SAFETY: `model` is live and not referenced elsewhere.
            unsafe { sys::llama_model_free(model.as_ptr()) };
            e
        };
        let Some(vocab) = NonNull::new(vocab.cast_mut()) else {
            return Err(free_model(load_err("the model has no vocabulary".into())));
        };
        if n_embd <= 0 || n_layer <= 0 || n_vocab <= 0 {
            return Err(free_model(load_err(format!(
                "unusable shape: n_embd {n_embd}, n_layer {n_layer}, n_vocab {n_vocab}"
            ))));
        }

        // SAFETY: returns a struct by value.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = opts.n_ctx;
        cp.n_batch = opts.n_batch.min(opts.n_ctx);
        cp.n_ubatch = cp.n_batch;
        cp.n_seq_max = 1;
        cp.n_threads = opts.threads as i32;
        cp.n_threads_batch = opts.threads as i32;
        cp.flash_attn_type = if opts.flash_attn {
            sys::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
        };
        if opts.kv_f32 {
            cp.type_k = sys::GGML_TYPE_F32;
            cp.type_v = sys::GGML_TYPE_F32;
        }
        cp.no_perf = true;
        // SAFETY: `model` is live; `cp` is a fully initialised params struct.
        let (ctx, lines) = capture(|| unsafe { sys::llama_init_from_model(model.as_ptr(), cp) });
        let Some(ctx) = NonNull::new(ctx) else {
            return Err(free_model(LlamaError::Context {
                path: path.to_owned(),
                n_ctx: opts.n_ctx,
                n_batch: opts.n_batch,
                reason: reason(&lines),
            }));
        };
        // SAFETY: `ctx` is live.
        let (n_ctx, n_batch) = unsafe {
            (
                sys::llama_n_ctx(ctx.as_ptr()),
                sys::llama_n_batch(ctx.as_ptr()),
            )
        };
        // SAFETY: allocates a batch of `n_batch` token slots for one sequence.
        let batch = unsafe { sys::llama_batch_init(n_batch as i32, 0, 1) };
        Ok(Inner {
            model,
            ctx,
            vocab,
            batch,
            n_batch: n_batch as usize,
            arch,
            n_embd: n_embd as usize,
            n_layer: n_layer as usize,
            n_vocab: n_vocab as usize,
            n_ctx,
        })
    }

    pub(crate) fn tokenize(&self, text: &str) -> Result<Vec<i32>, LlamaError> {
        let len =
            i32::try_from(text.len()).map_err(|_| LlamaError::TextTooLong { bytes: text.len() })?;
        let mut cap = text.len().saturating_add(2).min(i32::MAX as usize);
        for _ in 0..2 {
            let mut out = vec![0i32; cap];
            // SAFETY: `text` is `len` readable bytes (the function takes a
            // length, not a C string); `out` has room for `cap` tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab.as_ptr(),
                    text.as_ptr().cast::<c_char>(),
                    len,
                    out.as_mut_ptr(),
                    cap as i32,
                    false,
                    false,
                )
            };
            if n == i32::MIN {
                return Err(LlamaError::Tokenize {
                    reason: "more than 2^31 - 1 tokens".into(),
                });
            }
            if n >= 0 {
                out.truncate(n as usize);
                if out.is_empty() {
                    return Err(LlamaError::Tokenize {
                        reason: "the text gave no tokens".into(),
                    });
                }
                return Ok(out);
            }
            cap = n.unsigned_abs() as usize;
        }
        Err(LlamaError::Tokenize {
            reason: "the tokenizer's count changed between two calls".into(),
        })
    }

    pub(crate) fn set_cvec(&mut self, cvec: Option<&[f32]>) -> Result<(), LlamaError> {
        let il_end = self.n_layer as i32 - 1;
        // SAFETY: `ctx` is live; `data` is null (clear) or points to `len`
        // floats that outlive the call (llama.cpp copies them into its own
        // tensors); `len` was checked to be n_embd * (n_layer - 1).
        let (rc, lines) = capture(|| unsafe {
            match cvec {
                None => sys::llama_set_adapter_cvec(
                    self.ctx.as_ptr(),
                    std::ptr::null(),
                    0,
                    self.n_embd as i32,
                    1,
                    il_end,
                ),
                Some(v) => sys::llama_set_adapter_cvec(
                    self.ctx.as_ptr(),
                    v.as_ptr(),
                    v.len(),
                    self.n_embd as i32,
                    1,
                    il_end,
                ),
            }
        });
        if rc != 0 {
            return Err(LlamaError::Cvec {
                reason: reason(&lines),
            });
        }
        Ok(())
    }

    pub(crate) fn nll(
        &mut self,
        tokens: &[i32],
        window: usize,
        beat: &mut dyn FnMut(),
    ) -> Result<Nll, LlamaError> {
        // `beat` runs between decodes and, through the abort callback, from
        // inside them (between graph nodes), so a decode of a whole window
        // keeps the caller's heartbeat fresh. The hook lives on this stack
        // frame; `BeatGuard` unregisters it before the frame ends, on every
        // path (error returns and panics included).
        // One raw pointer, made once, is the only way to the hook until the
        // guard is dropped: llama.cpp's calls and ours all go through it.
        let mut hook = BeatHook { beat, panic: None };
        let hook_ptr: *mut BeatHook<'_> = &mut hook;
        let guard = BeatGuard::register(self.ctx, hook_ptr);
        let result = self.decode_windows(tokens, window, hook_ptr);
        drop(guard);
        if let Some(payload) = hook.panic.take() {
            resume_unwind(payload);
        }
        result
    }

    fn decode_windows(
        &mut self,
        tokens: &[i32],
        window: usize,
        hook: *mut BeatHook<'_>,
    ) -> Result<Nll, LlamaError> {
        // SAFETY (every `*hook` below): `hook` points to `nll`'s live
        // `BeatHook`; llama.cpp uses it only inside `llama_decode`, never
        // while we do.
        let mut total = Nll::default();
        let n_vocab = self.n_vocab;
        // SAFETY: `ctx` is live; the memory handle lives as long as it.
        let mem = unsafe { sys::llama_get_memory(self.ctx.as_ptr()) };
        for start in (0..tokens.len()).step_by(window) {
            let w = &tokens[start..(start + window).min(tokens.len())];
            if w.len() < 2 {
                continue;
            }
            // SAFETY: `mem` belongs to the live context. Clearing the data
            // too means nothing from an earlier window (NaN from a wild
            // vector included) can reach this one.
            unsafe { sys::llama_memory_clear(mem, true) };
            let mut p = 0;
            while p < w.len() {
                let n = self.n_batch.min(w.len() - p);
                // SAFETY: the batch has `n_batch >= n` slots, each with one
                // seq_id slot (llama_batch_init(n_batch, 0, 1)).
                unsafe {
                    self.batch.n_tokens = n as i32;
                    for i in 0..n {
                        *self.batch.token.add(i) = w[p + i];
                        *self.batch.pos.add(i) = (p + i) as i32;
                        *self.batch.n_seq_id.add(i) = 1;
                        *(*self.batch.seq_id.add(i)) = 0;
                        *self.batch.logits.add(i) = i8::from(p + i + 1 < w.len());
                    }
                }
                // SAFETY: `ctx` is live and the batch is filled above.
                // Known limit: llama.cpp's `llama_decode` has no try/catch;
                // after a control-vector change it re-reserves its compute
                // buffers and throws `std::runtime_error` if that allocation
                // fails. An exception unwinding through this `extern "C"`
                // call aborts the process (Rust does not catch foreign
                // unwinds): in a worker, that is a crash the supervisor
                // respawns, never the daemon (docs/llm.md, "Workers").
                let (status, lines) =
                    capture(|| unsafe { sys::llama_decode(self.ctx.as_ptr(), self.batch) });
                if unsafe { (*hook).panic.is_some() } {
                    // The beat panicked inside the decode; `nll` resumes it.
                    return Ok(total);
                }
                if status != 0 {
                    return Err(LlamaError::Decode {
                        status,
                        meaning: decode_meaning(status),
                        window_start: start,
                        reason: reason(&lines),
                    });
                }
                for i in 0..n {
                    let at = p + i;
                    if at + 1 >= w.len() {
                        break;
                    }
                    // SAFETY: token i of the last decode asked for logits;
                    // llama.cpp returns n_vocab floats valid until the next
                    // decode, or null.
                    let row = unsafe { sys::llama_get_logits_ith(self.ctx.as_ptr(), i as i32) };
                    if row.is_null() {
                        return Err(LlamaError::Decode {
                            status: 0,
                            meaning: "no logits for a token that asked for them",
                            window_start: start,
                            reason: format!("llama_get_logits_ith({i}) returned NULL"),
                        });
                    }
                    // SAFETY: see above: `n_vocab` floats.
                    let row = unsafe { std::slice::from_raw_parts(row, n_vocab) };
                    let target = w[at + 1] as usize;
                    total.sum += token_nll(row, target).ok_or(LlamaError::NonFiniteLogits {
                        index: start + at + 1,
                    })?;
                    total.count += 1;
                }
                // SAFETY: see the top of the function.
                if unsafe { (*hook).call_and_check() } {
                    return Ok(total);
                }
                p += n;
            }
        }
        Ok(total)
    }
}

/// The caller's heartbeat for the duration of one [`Inner::nll`]; a panic in
/// it is kept (it must not unwind through llama.cpp's C frames) and resumed
/// once the decode has returned.
struct BeatHook<'a> {
    beat: &'a mut dyn FnMut(),
    panic: Option<Box<dyn Any + Send>>,
}

impl BeatHook<'_> {
    fn call(&mut self) {
        if self.panic.is_some() {
            return;
        }
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| (self.beat)())) {
            self.panic = Some(payload);
        }
    }

    /// [`BeatHook::call`], then whether the beat has panicked.
    fn call_and_check(&mut self) -> bool {
        self.call();
        self.panic.is_some()
    }
}

/// llama.cpp's abort callback, registered by [`BeatGuard`]: ggml's CPU
/// backend calls it on the thread that called `llama_decode` (ggml's thread
/// 0, the caller itself, with the ggml threadpool and with OpenMP alike)
/// after each graph node. It beats and returns `false`: never abort.
///
/// # Safety
/// `data` must be the `*mut BeatHook` that [`BeatGuard::register`] stored,
/// still alive and not otherwise borrowed during the call: the guard
/// unregisters it before the hook's frame ends, and `nll` does not touch
/// the hook while `llama_decode` runs (the callback runs on the thread
/// that called it, so calls never overlap).
unsafe extern "C" fn beat_trampoline(data: *mut c_void) -> bool {
    // SAFETY: see the function's contract.
    let hook = unsafe { &mut *data.cast::<BeatHook<'_>>() };
    hook.call();
    false
}

/// Registers a [`BeatHook`] as the context's abort callback and
/// unregisters it (null callback and data) on drop.
struct BeatGuard {
    ctx: NonNull<sys::llama_context>,
}

impl BeatGuard {
    fn register(ctx: NonNull<sys::llama_context>, hook: *mut BeatHook<'_>) -> BeatGuard {
        // SAFETY: `ctx` is live; the hook outlives the guard (both are
        // locals of `nll`, the guard dropped first), so the pointer is
        // valid for every call llama.cpp makes until `drop` clears it.
        unsafe {
            sys::llama_set_abort_callback(
                ctx.as_ptr(),
                Some(beat_trampoline),
                hook.cast::<c_void>(),
            )
        };
        BeatGuard { ctx }
    }
}

impl Drop for BeatGuard {
    fn drop(&mut self) {
        // SAFETY: `ctx` is live (the guard lives inside `nll`, which holds
        // `&mut Inner`); a null callback means ggml calls nothing.
        unsafe { sys::llama_set_abort_callback(self.ctx.as_ptr(), None, std::ptr::null_mut()) };
    }
}

/// `-ln softmax(row)[target]` (exp in f32, sums in f64, like
/// llama-perplexity); None when a logit is NaN or infinite.
fn token_nll(row: &[f32], target: usize) -> Option<f64> {
    let mut max = f32::NEG_INFINITY;
    let mut finite = true;
    for &x in row {
        finite &= x.is_finite();
        max = max.max(x);
    }
    if !finite {
        return None;
    }
    let sum: f64 = row.iter().map(|&x| f64::from((x - max).exp())).sum();
    Some(sum.ln() + f64::from(max) - f64::from(row[target]))
}

fn decode_meaning(status: i32) -> &'static str {
    match status {
        1 => "no KV slot for the batch",
        2 => "aborted",
        -1 => "invalid input batch",
        _ => "fatal error",
    }
}

/// A string metadata value of the model, "" when absent.
///
/// # Safety
/// `model` must be live.
unsafe fn meta_str(model: NonNull<sys::llama_model>, key: &str) -> String {
    let Ok(ckey) = CString::new(key) else {
        return String::new();
    };
    let mut buf = vec![0u8; 256];
    for _ in 0..2 {
        // SAFETY: `model` is live (caller); `buf` has `buf.len()` bytes; the
        // function writes at most that many, NUL included, and returns the
        // full length (or -1 when the key is absent).
        let n = unsafe {
            sys::llama_model_meta_val_str(
                model.as_ptr(),
                ckey.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return String::new();
        }
        let n = n as usize;
        if n < buf.len() {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
        buf.resize(n + 1, 0);
    }
    String::new()
}
