//! llama.cpp's and ggml's log, routed into `tracing` (target `llama.cpp`
//! or `ggml`), and captured per thread while a call runs so an error can
//! carry the reason llama.cpp only logs (a NULL model, a failed decode).

use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};
use std::sync::Once;

use llama_cpp_sys_2 as sys;

/// Lines kept from one captured call (the last ones win).
const CAPTURE_LINES: usize = 12;

#[derive(Default)]
struct ThreadLog {
    /// A line llama.cpp is still writing (no newline yet): level, text.
    partial: Option<(sys::ggml_log_level, String)>,
    /// Warning and error lines of the call being captured.
    capture: Option<Vec<String>>,
}

thread_local! {
    static LOG: RefCell<ThreadLog> = RefCell::new(ThreadLog::default());
}

static INSTALL: Once = Once::new();

/// Installs the callbacks, once per process.
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // SAFETY: the callbacks are `extern "C"` functions valid for the whole
        // process, never unwind (see `on_log`), and ignore `user_data`, so
        // a null user pointer is fine. Setting llama.cpp's callback also
        // sets ggml's; ggml's is set after it so ggml lines keep their target.
        unsafe {
            sys::llama_log_set(Some(llama_cb), std::ptr::null_mut());
            sys::ggml_log_set(Some(ggml_cb), std::ptr::null_mut());
        }
    });
}

/// Runs `f` capturing the warning and error lines llama.cpp logs on this
/// thread meanwhile.
pub(crate) fn capture<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    install();
    let outer = LOG.with(|l| l.borrow_mut().capture.replace(Vec::new()));
    let out = f();
    let lines = LOG.with(|l| {
        let mut l = l.borrow_mut();
        // A line without its newline yet belongs to this call too.
        if let Some((level, text)) = l.partial.take() {
            let line = text.trim_end().to_owned();
            emit(Source::Llama, level, &line);
            keep(&mut l, level, line);
        }
        let lines = l.capture.take().unwrap_or_default();
        l.capture = outer;
        lines
    });
    (out, lines)
}

/// The captured lines as one reason.
pub(crate) fn reason(lines: &[String]) -> String {
    if lines.is_empty() {
        "llama.cpp logged no warning or error".to_owned()
    } else {
        lines.join("; ")
    }
}

#[derive(Clone, Copy)]
enum Source {
    Llama,
    Ggml,
}

fn emit(source: Source, level: sys::ggml_log_level, line: &str) {
    if line.is_empty() {
        return;
    }
    macro_rules! ev {
        ($lvl:ident) => {
            match source {
                Source::Llama => tracing::$lvl!(target: "llama.cpp", "{line}"),
                Source::Ggml => tracing::$lvl!(target: "ggml", "{line}"),
            }
        };
    }
    match level {
        sys::GGML_LOG_LEVEL_ERROR => ev!(error),
        sys::GGML_LOG_LEVEL_WARN => ev!(warn),
        sys::GGML_LOG_LEVEL_INFO => ev!(debug),
        _ => ev!(trace),
    }
}

fn on_log(source: Source, level: sys::ggml_log_level, text: *const c_char) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
    let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    let _ = LOG.try_with(|l| {
        let Ok(mut l) = l.try_borrow_mut() else {
            return;
        };
        let (level, mut line) = match (level, l.partial.take()) {
            (sys::GGML_LOG_LEVEL_CONT, Some((lvl, mut prev))) => {
                prev.push_str(&text);
                (lvl, prev)
            }
            (sys::GGML_LOG_LEVEL_CONT, None) => (sys::GGML_LOG_LEVEL_INFO, text.into_owned()),
            (lvl, Some((plvl, prev))) => {
                // A new line starts: the unfinished one is complete.
                let prev = prev.trim_end().to_owned();
                emit(source, plvl, &prev);
                keep(&mut l, plvl, prev);
                (lvl, text.into_owned())
            }
            (lvl, None) => (lvl, text.into_owned()),
        };
        if !line.ends_with('\n') {
            l.partial = Some((level, line));
            return;
        }
        line.truncate(line.trim_end().len());
        emit(source, level, &line);
        keep(&mut l, level, line);
    });
}

/// Keeps a warning or error line for the call being captured, if any.
fn keep(l: &mut ThreadLog, level: sys::ggml_log_level, line: String) {
    if !(sys::GGML_LOG_LEVEL_WARN..=sys::GGML_LOG_LEVEL_ERROR).contains(&level) || line.is_empty() {
        return;
    }
    if let Some(c) = l.capture.as_mut() {
        if c.len() == CAPTURE_LINES {
            c.remove(0);
        }
        c.push(line);
    }
}

unsafe extern "C" fn llama_cb(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    // Never unwind into C: a panic (say, in a tracing subscriber) is dropped.
    let _ = std::panic::catch_unwind(|| on_log(Source::Llama, level, text));
}

unsafe extern "C" fn ggml_cb(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    let _ = std::panic::catch_unwind(|| on_log(Source::Ggml, level, text));
}
