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

/// The scheduling slice [`prefer_short_slices`] asks for: the shortest the
/// kernel takes (it clamps a request to 0.1–100 ms).
pub const SHORT_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// Asks the kernel for short scheduling slices for the calling thread:
/// `sched_setattr` with `sched_runtime` = [`SHORT_SLICE`], its policy
/// (`SCHED_FLAG_KEEP_POLICY`) and nice value kept. From Linux 6.12 the fair
/// scheduler (EEVDF) lets a waking thread with a shorter slice than the
/// running one preempt it at once; with the default slice it may wait until
/// the running thread reaches parity, a few milliseconds later. The threads
/// that sleep on events and then work briefly — the supervisor's event
/// loop, its crash-notice, link and control threads, a standby waiting for
/// its promotion — call this, so that they run when their event comes even
/// while every core computes a worker's evaluation or `LOAD` (recovery
/// during a `LOAD`: `docs/benchmarks.md`). Older kernels take the call and
/// ignore the field. It needs no privilege (policy and nice unchanged).
/// The error is the caller's to log: the only cost of a failure is latency.
pub fn prefer_short_slices() -> std::io::Result<()> {
    set_slice(SHORT_SLICE)
}

/// Back to the kernel's default slice (`sched_runtime` 0): a standby
/// promoted to a worker that computes.
pub fn default_slices() -> std::io::Result<()> {
    set_slice(std::time::Duration::ZERO)
}

/// `sched_setattr(0, {SCHED_OTHER, KEEP_POLICY, nice, runtime = slice}, 0)`
/// for the calling thread.
fn set_slice(slice: std::time::Duration) -> std::io::Result<()> {
    /// `struct sched_attr` up to `sched_period` (`SCHED_ATTR_SIZE_VER0`,
    /// 48 bytes; linux/sched/types.h).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        sched_policy: u32,
        sched_flags: u64,
        sched_nice: i32,
        sched_priority: u32,
        sched_runtime: u64,
        sched_deadline: u64,
        sched_period: u64,
    }
    const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;
    // The calling thread's nice value (on Linux `PRIO_PROCESS` 0 is the
    // calling thread), kept: -1 is also the error value, told apart by
    // errno.
    nix::errno::Errno::clear();
    // SAFETY: getpriority reads the calling thread's nice value; no memory
    // is passed.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: SCHED_FLAG_KEEP_POLICY,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr reads `attr.size` bytes from the pointer, which
    // points at a live, initialised `SchedAttr` of exactly that size, laid
    // out as the kernel's `struct sched_attr` (repr(C), VER0 fields); pid 0
    // is the calling thread; flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_setattr,
            0 as libc::pid_t,
            &attr as *const SchedAttr,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`prefer_short_slices`], a failure logged once at debug level under
/// `what` (the thread's role).
pub fn prefer_short_slices_for(what: &str) {
    if let Err(e) = prefer_short_slices() {
        tracing::debug!("{what}: cannot ask for short scheduling slices: {e}");
    }
}
