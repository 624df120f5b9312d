//! Reaping and exit statuses.
//!
//! The supervisor reaps with `waitpid(-1, WNOHANG)` after every `SIGCHLD`,
//! which collects its own children and, when it is PID 1 or a subreaper
//! ([`become_subreaper`]), every orphan re-parented to it. [`ExitReason`] is
//! the one place where an exit status is put into words.

use std::fmt;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExitReason {
    /// `exit(code)` or a return from `main`.
    Exited {
        /// The exit code.
        code: i32,
    },
    /// Killed by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether a core was dumped.
        core_dumped: bool,
    },
}

impl ExitReason {
    /// Whether this is a clean `exit(0)`.
    pub fn success(&self) -> bool {
        matches!(self, ExitReason::Exited { code: 0 })
    }

    /// Converts a `waitpid` status; `None` for stops and continues.
    pub fn from_wait(status: WaitStatus) -> Option<(Pid, ExitReason)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((pid, ExitReason::Exited { code })),
            WaitStatus::Signaled(pid, signal, core_dumped) => Some((
                pid,
                ExitReason::Signaled {
                    signal: signal as i32,
                    core_dumped,
                },
            )),
            _ => None,
        }
    }
}

/// The conventional name of a signal number ("SIGSEGV"), or "unknown signal".
pub fn signal_name(signal: i32) -> &'static str {
    Signal::try_from(signal)
        .map(Signal::as_str)
        .unwrap_or("unknown signal")
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Exited { code } => write!(f, "exited with code {code}"),
            ExitReason::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by signal {signal} ({})", signal_name(signal))?;
                if core_dumped {
                    write!(f, ", core dumped")?;
                }
                Ok(())
            }
        }
    }
}

/// Reaps every child (and adopted orphan) that has ended, without blocking.
pub fn reap_all() -> Vec<(Pid, ExitReason)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => break,
            Ok(status) => {
                if let Some(ended) = ExitReason::from_wait(status) {
                    out.push(ended);
                }
            }
            Err(Errno::EINTR) => continue,
            // ECHILD: no children at all.
            Err(_) => break,
        }
    }
    out
}

/// Makes this process adopt its orphaned descendants (`PR_SET_CHILD_SUBREAPER`),
/// unless it is already PID 1 (which adopts them anyway).
pub fn become_subreaper() -> nix::Result<()> {
    if std::process::id() == 1 {
        return Ok(());
    }
    nix::sys::prctl::set_child_subreaper(true)
}

/// Whether `pid` has exited and waits to be reaped (a zombie).
pub fn is_zombie(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, after)| after.starts_with('Z'))
    })
}

/// Whether `pid` (a child not reaped yet, so the number is still its own)
/// has begun to end: a zombie, or its main thread in `do_exit`
/// (`PF_EXITING` in the flags of `/proc/PID/stat`). Its exit status is
/// decided by then, so a SIGKILL sent now would not change it. False if
/// the file cannot be read.
pub fn is_exiting(pid: nix::unistd::Pid) -> bool {
    /// `include/linux/sched.h`: getting shut down.
    const PF_EXITING: u64 = 0x4;
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let Some((_, after)) = stat.rsplit_once(") ") else {
            return false;
        };
        // state ppid pgrp session tty_nr tpgid flags …
        let mut fields = after.split(' ');
        let state = fields.next().unwrap_or("");
        let flags = fields.nth(5).and_then(|f| f.parse::<u64>().ok());
        state.starts_with('Z')
            || state.starts_with('X')
            || flags.is_some_and(|f| f & PF_EXITING != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_words() {
        assert_eq!(
            ExitReason::Signaled {
                signal: 11,
                core_dumped: false
            }
            .to_string(),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            ExitReason::Signaled {
                signal: 6,
                core_dumped: true
            }
            .to_string(),
            "killed by signal 6 (SIGABRT), core dumped"
        );
        assert_eq!(
            ExitReason::Exited { code: 3 }.to_string(),
            "exited with code 3"
        );
        assert_eq!(signal_name(999), "unknown signal");
        assert!(ExitReason::Exited { code: 0 }.success());
        assert!(!ExitReason::Exited { code: 1 }.success());
    }

    #[test]
    #[allow(clippy::zombie_processes)] // Reaped below with waitpid, which is the point.
    fn a_running_child_is_not_exiting_and_a_killed_one_is() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        assert!(!is_exiting(pid), "a sleeping child");
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        // Ends within the deadline (then a zombie until reaped below).
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_exiting(pid) {
            assert!(std::time::Instant::now() < end, "never seen exiting");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let status = waitpid(pid, None).unwrap();
        assert!(matches!(
            status,
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
    }

    #[test]
    #[allow(clippy::zombie_processes)] // Reaped below with waitpid, which is the point.
    fn reaps_a_killed_child_with_its_signal() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
        let status = waitpid(pid, None).unwrap();
        assert_eq!(
            ExitReason::from_wait(status),
            Some((
                pid,
                ExitReason::Signaled {
                    signal: 9,
                    core_dumped: false
                }
            ))
        );
    }
}
