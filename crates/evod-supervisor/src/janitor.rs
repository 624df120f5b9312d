//! The janitor: a tiny forked helper that removes the control socket and
//! the folders the control server created for it (each only if still the
//! same file, folders only if empty; never anything evod did not create)
//! when the supervisor dies without cleaning up, e.g. SIGKILL.
//!
//! [`Janitor::start`] forks before the supervisor starts any thread, so the
//! child may run ordinary code. The child keeps the read end of a pipe whose
//! write end only the supervisor holds (close-on-exec, so no worker inherits
//! it); when the supervisor dies, however it dies, the read returns end of
//! file and the janitor removes what it was told about, if it is still the
//! same file (device and inode), then exits.
//!
//! On a clean stop the supervisor disarms it first ([`Janitor::disarm`]:
//! a `cancel` line, then end of file), before the control server removes
//! the socket: an armed janitor acting later could otherwise remove a
//! newer daemon's socket that got the same device and inode (`evod stop;
//! evod run`). The janitor acts only on end of file with no `cancel`.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};

use crate::control::Created;

/// The supervisor's end of the janitor.
pub struct Janitor {
    pipe: std::fs::File,
    pid: Pid,
}

impl Janitor {
    /// Forks the janitor.
    ///
    /// # Safety
    /// The calling process must be single-threaded (nothing else can hold a
    /// lock the child would need).
    pub unsafe fn start() -> std::io::Result<Janitor> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        // SAFETY: the caller promises a single-threaded process, so the child
        // may allocate and use std freely.
        match unsafe { nix::unistd::fork() }? {
            ForkResult::Child => {
                drop(write);
                run_child(read);
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Janitor {
                    pipe: std::fs::File::from(write),
                    pid: child,
                })
            }
        }
    }

    /// The janitor's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Asks the janitor to remove what the control server created if the
    /// supervisor dies: the socket, then its folders (each only while it is
    /// still the file with the recorded device and inode).
    pub fn watch(&mut self, created: &Created) -> std::io::Result<()> {
        let mut text = String::new();
        for (kind, (path, (dev, ino))) in std::iter::once(("socket", &created.socket))
            .chain(created.dirs.iter().map(|d| ("dir", d)))
        {
            text.push_str(&format!("{kind}\t{dev}\t{ino}\t{}\n", path.display()));
        }
        self.pipe.write_all(text.as_bytes())
    }

    /// A clean stop: tells the janitor to remove nothing, closes the pipe
    /// and reaps it (for at most [`DISARM_REAP`]; the supervisor's own
    /// SIGCHLD path may have reaped it already). Call before the control
    /// server removes the socket.
    pub fn disarm(self) {
        let Janitor { mut pipe, pid } = self;
        // A failed write means the janitor is gone already (its pipe is
        // closed): nothing left to disarm. (Never signalled: its pid may
        // have been reaped and reused.)
        if let Err(e) = pipe.write_all(CANCEL.as_bytes()) {
            tracing::debug!("the janitor is gone already ({e})");
        }
        drop(pipe);
        let deadline = std::time::Instant::now() + DISARM_REAP;
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                _ => break,
            }
        }
    }
}

/// The line that disarms the janitor.
const CANCEL: &str = "cancel\n";
/// How long [`Janitor::disarm`] waits for the janitor to exit.
const DISARM_REAP: std::time::Duration = std::time::Duration::from_secs(1);

/// What the janitor must remove, from everything the supervisor wrote to
/// it: `None` if it was disarmed or told nothing.
fn brief(text: &str) -> Option<Created> {
    let mut created = Created {
        socket: (PathBuf::new(), (0, 0)),
        dirs: Vec::new(),
    };
    for line in text.lines() {
        if line == CANCEL.trim_end() {
            return None;
        }
        let mut parts = line.splitn(4, '\t');
        let (Some(kind), Some(dev), Some(ino), Some(path)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(dev), Ok(ino)) = (dev.parse(), ino.parse()) else {
            continue;
        };
        let entry = (PathBuf::from(path), (dev, ino));
        match kind {
            "socket" => created.socket = entry,
            "dir" => created.dirs.push(entry),
            _ => {}
        }
    }
    (!created.socket.0.as_os_str().is_empty()).then_some(created)
}

fn run_child(read: OwnedFd) -> ! {
    // Out of the terminal's process group: Ctrl-C is for the supervisor.
    let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    crate::process::set_process_name(c"evod-janitor");
    // Keep only stdio and the pipe.
    let fd = read.as_raw_fd();
    // SAFETY: marks descriptors close-on-exec and closes others this child
    // does not use; the pipe is kept.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, (fd - 1) as u32, 0u32);
        libc::syscall(libc::SYS_close_range, (fd + 1) as u32, u32::MAX, 0u32);
    }
    let mut text = Vec::new();
    let _ = std::fs::File::from(read)
        .take(1 << 20)
        .read_to_end(&mut text);
    if let Some(created) = brief(&String::from_utf8_lossy(&text)) {
        created.remove();
    }
    // SAFETY: _exit skips the parent's atexit handlers and buffered output,
    // which belong to the supervisor.
    unsafe { libc::_exit(0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIEF: &str = "socket\t1\t2\t/run/evod/control.sock\ndir\t1\t3\t/run/evod\n";

    #[test]
    fn an_armed_janitor_removes_what_it_was_told() {
        let created = brief(BRIEF).expect("armed");
        assert_eq!(
            created.socket,
            (PathBuf::from("/run/evod/control.sock"), (1, 2))
        );
        assert_eq!(created.dirs, vec![(PathBuf::from("/run/evod"), (1, 3))]);
        assert!(brief("").is_none(), "told nothing: nothing to remove");
    }

    #[test]
    fn a_disarmed_janitor_removes_nothing() {
        assert!(brief(&format!("{BRIEF}{CANCEL}")).is_none());
    }
}
