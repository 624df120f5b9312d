//! The crash notice: the one byte a dying worker writes to the supervisor
//! before the kernel tears its memory down (the mechanism: `evod-serve`'s
//! `notice.rs` on the worker side, `evod-supervisor`'s `notice.rs` and
//! `daemon/children.rs` on the supervisor's).
//!
//! Every worker process has a *link*, one end of a Unix socket pair whose
//! other end the supervisor holds: a warm standby's `--standby-fd` (which
//! also carries [`crate::standby`]'s bytes and stays open after the
//! promotion), or, for a worker started cold, `--notice-fd N` (built-in
//! worker) / [`NOTICE_FD_VAR`] (any worker program). On a fatal signal
//! (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP) the worker's handler
//! writes [`crash`]`(signal)` there with one non-blocking `send(2)` and
//! dies of that signal. The kernel sends SIGCHLD only once the process's memory is torn
//! down (tens of milliseconds for a worker that mapped 1 GiB); the notice
//! comes before, so the supervisor counts the death and promotes the
//! standby without waiting for the reap (and SIGKILLs the worker 100 ms
//! later if it is not dying by then).
//!
//! The byte is a claim by an untrusted process: the supervisor acts on it
//! only for the slot's current worker, and the only thing it can obtain is
//! that worker's own replacement (and its death). Its exit status, read
//! when it is reaped, is what the logs and metrics record.

/// Environment variable naming a cold-started worker's notice descriptor
/// (also `--notice-fd N` on the built-in worker's command line; a user's
/// worker program gets only the variable, so its arguments are unchanged).
pub const NOTICE_FD_VAR: &str = "EVOD_NOTICE_FD";

/// The notice byte for a death by `signal`: `0x80 | signal`, so it can
/// never be taken for a standby's `R` or `G`. Signals outside 1..=127 give
/// `0x80` (a crash of no known signal).
pub const fn crash(signal: i32) -> u8 {
    if signal > 0 && signal < 128 {
        0x80 | signal as u8
    } else {
        0x80
    }
}

/// What a byte read from a worker's link says: `Some(signal)` for a crash
/// notice (`Some(0)`: no known signal), `None` for any other byte.
pub const fn signal_of(byte: u8) -> Option<i32> {
    if byte & 0x80 != 0 {
        Some((byte & 0x7f) as i32)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_round_trip_and_never_look_like_standby_bytes() {
        for signal in [4, 5, 6, 7, 8, 11] {
            assert_eq!(signal_of(crash(signal)), Some(signal));
        }
        assert_eq!(signal_of(crash(0)), Some(0));
        assert_eq!(signal_of(crash(300)), Some(0));
        assert_eq!(signal_of(crate::standby::READY), None);
        assert_eq!(signal_of(crate::standby::GO), None);
        assert_eq!(signal_of(crate::standby::REFRESH), None);
    }
}
