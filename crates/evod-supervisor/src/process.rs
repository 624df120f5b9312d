//! What every evod process sets up for itself: its log output and its name
//! in `top`. The supervisor, the worker and the evolver roles all use these
//! (children learn the log format from `EVOD_LOG_FORMAT`).
//!
//! On a terminal the log has one writer per process ([`TermWriter`]): a
//! human-format log line first clears the terminal's current line (another
//! process's live status line, say) and, if this process shows a status
//! line ([`status_line`]), draws it again below the log line, so log lines
//! and the live line never share a row.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use serde::Deserialize;

/// The live status line this process shows at the bottom of the terminal
/// (empty: none), and whether stderr is a terminal at all.
static TERM: Mutex<(String, bool)> = Mutex::new((String::new(), false));

/// ANSI: carriage return, then erase the whole line.
const CLEAR_LINE: &[u8] = b"\r\x1b[2K";

/// Shows `text` as this process's live status line on a terminal stderr
/// (replacing the previous one); does nothing when stderr is not a
/// terminal. Log lines printed meanwhile appear above it.
pub fn status_line(text: &str) {
    let mut term = TERM.lock().unwrap_or_else(|e| e.into_inner());
    if !term.1 {
        return;
    }
    term.0.clear();
    term.0.push_str(text);
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(CLEAR_LINE);
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

/// Ends the live status line: it stays on the terminal as it is and the
/// next output starts on a fresh line.
pub fn end_status_line() {
    let mut term = TERM.lock().unwrap_or_else(|e| e.into_inner());
    if term.1 && !term.0.is_empty() {
        term.0.clear();
        let _ = std::io::stderr().lock().write_all(b"\n");
    }
}

/// The log writer: buffers one event and writes it to stderr on drop, with
/// the terminal's current line cleared first and this process's status
/// line drawn again after (on a terminal; plain stderr otherwise).
#[derive(Debug, Default)]
pub struct TermWriter {
    buf: Vec<u8>,
}

impl Write for TermWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TermWriter {
    fn drop(&mut self) {
        let term = TERM.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        if term.1 {
            let _ = err.write_all(CLEAR_LINE);
        }
        let _ = err.write_all(&self.buf);
        if term.1 && !term.0.is_empty() {
            let _ = err.write_all(term.0.as_bytes());
        }
        let _ = err.flush();
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (for a terminal).
    Human,
    /// One JSON object per line (for containers and log collectors).
    Json,
}

impl LogFormat {
    /// The value of `EVOD_LOG_FORMAT` that selects this format.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        }
    }
}

/// Sends `tracing` output to stderr in `format`, filtered by `EVOD_LOG`
/// (default `info`); the human format on a terminal goes through
/// [`TermWriter`]. A second call does nothing.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EVOD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Human => {
            TERM.lock().unwrap_or_else(|e| e.into_inner()).1 = std::io::stderr().is_terminal();
            builder.with_writer(TermWriter::default).try_init()
        }
        LogFormat::Json => builder.with_writer(std::io::stderr).json().try_init(),
    };
}

/// Names this thread (and so the process, in `top`) for operators
/// (`PR_SET_NAME`; at most 15 bytes are kept). A failure is ignored: the
/// name is cosmetic.
pub fn set_process_name(name: &std::ffi::CStr) {
    let _ = nix::sys::prctl::set_name(name);
}
