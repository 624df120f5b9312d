//! Crash notices ([`evod_wire::notice`]): the supervisor's end of every
//! worker's link, watched by one thread.
//!
//! A worker dying of a fatal signal writes one byte on its link before the
//! kernel tears its memory down; SIGCHLD (and end of file on the link, and
//! a pidfd's readiness) come only after that teardown, tens of
//! milliseconds later for a worker that mapped a big model. The event loop
//! hands each worker's link to [`NoticeThread::watch`] under a token of
//! its own (one per process, never reused, so a notice can never be taken
//! for a later process that got the same pid); the thread `poll`s every
//! link and posts a [`Notice`] on the loop's channel for the first notice
//! byte of each, then closes it. A link that reaches end of file (its
//! worker has ended) is closed too. Other bytes (a standby's `R` the loop
//! had not read before promoting it) are ignored.
//!
//! `poll(2)` rather than epoll: the set is the worker count (a handful),
//! rebuilt only when a link is added or closed.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// A worker said it is dying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// The token its link was watched under.
    pub token: u64,
    /// The signal it named (0: none known). A claim by an untrusted
    /// process: its exit status, read when it is reaped, is the fact.
    pub signal: i32,
}

struct Shared {
    added: Mutex<Vec<(u64, UnixStream)>>,
    stop: AtomicBool,
}

/// The thread that watches every worker's link.
pub struct NoticeThread {
    shared: Arc<Shared>,
    /// Wakes the thread (a link added, or stop).
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NoticeThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoticeThread").finish_non_exhaustive()
    }
}

impl NoticeThread {
    /// Starts the thread; each [`Notice`] goes to `tx` wrapped by `wrap`.
    /// The thread ends when `tx`'s receiver is gone or this is dropped.
    pub fn start<E: Send + 'static>(
        tx: mpsc::Sender<E>,
        wrap: impl Fn(Notice) -> E + Send + 'static,
    ) -> io::Result<NoticeThread> {
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            added: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("notices".into())
            .spawn(move || watch_links(&theirs, woken, &tx, &wrap))?;
        Ok(NoticeThread {
            shared,
            wake,
            thread: Some(thread),
        })
    }

    /// Watches `link` (the supervisor's end of a worker's link) under
    /// `token` until it carries a notice or reaches end of file.
    pub fn watch(&self, token: u64, link: UnixStream) -> io::Result<()> {
        link.set_nonblocking(true)?;
        self.shared
            .added
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((token, link));
        self.nudge();
        Ok(())
    }

    fn nudge(&self) {
        // A full wake socket already wakes the thread.
        let _ = (&self.wake).write(&[0]);
    }
}

impl Drop for NoticeThread {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.nudge();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread's loop (see the module documentation).
fn watch_links<E>(
    shared: &Shared,
    mut woken: UnixStream,
    tx: &mpsc::Sender<E>,
    wrap: &impl Fn(Notice) -> E,
) {
    let mut links: Vec<(u64, UnixStream)> = Vec::new();
    loop {
        links.extend(
            shared
                .added
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let ready: Vec<bool> = {
            let mut fds = Vec::with_capacity(links.len() + 1);
            fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
            fds.extend(
                links
                    .iter()
                    .map(|(_, link)| PollFd::new(link.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::error!("crash notices: poll failed ({e}); notices are off");
                    return;
                }
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        if ready[0] {
            let mut sink = [0u8; 64];
            while matches!(woken.read(&mut sink), Ok(n) if n > 0) {}
        }
        let mut k = 0;
        let mut gone = false;
        links.retain_mut(|(token, link)| {
            k += 1;
            if !ready[k] {
                return true;
            }
            match read_notice(link) {
                LinkRead::Nothing => true,
                LinkRead::Closed => false,
                LinkRead::Notice(signal) => {
                    let notice = Notice {
                        token: *token,
                        signal,
                    };
                    gone |= tx.send(wrap(notice)).is_err();
                    // One notice per process is all the loop acts on.
                    false
                }
            }
        });
        if gone {
            return;
        }
    }
}

enum LinkRead {
    /// Nothing (more) to read now.
    Nothing,
    /// End of file or an error: the worker has ended.
    Closed,
    /// A crash notice naming this signal.
    Notice(i32),
}

/// Reads what `link` holds now: the first notice byte, if any.
fn read_notice(mut link: &UnixStream) -> LinkRead {
    let mut bytes = [0u8; 16];
    loop {
        match link.read(&mut bytes) {
            Ok(0) => return LinkRead::Closed,
            Ok(n) => {
                if let Some(signal) = bytes[..n]
                    .iter()
                    .find_map(|&b| evod_wire::notice::signal_of(b))
                {
                    return LinkRead::Notice(signal);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LinkRead::Nothing,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return LinkRead::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_notice_byte_is_posted_once_with_its_token_and_other_bytes_are_not() {
        let (tx, rx) = mpsc::channel();
        let notices = NoticeThread::start(tx, |n| n).unwrap();
        let (ours, mut worker) = UnixStream::pair().unwrap();
        notices.watch(7, ours).unwrap();
        let (quiet, mut standby) = UnixStream::pair().unwrap();
        notices.watch(8, quiet).unwrap();
        // A standby's ready byte is not a notice.
        standby.write_all(&[evod_wire::standby::READY]).unwrap();
        worker
            .write_all(&[
                evod_wire::standby::READY,
                evod_wire::notice::crash(libc::SIGSEGV),
                evod_wire::notice::crash(libc::SIGABRT),
            ])
            .unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            got,
            Notice {
                token: 7,
                signal: libc::SIGSEGV
            }
        );
        // The thread closed its end after the notice: the worker's next
        // write fails, and no second notice comes from that link.
        let closed = (0..1000).any(|_| {
            let failed = worker.write_all(&[evod_wire::notice::crash(6)]).is_err();
            if !failed {
                std::thread::sleep(Duration::from_millis(5));
            }
            failed
        });
        assert!(closed, "the link stayed open after its notice");
        // Nothing more from either: the next notice posted is a third
        // link's (the thread reads its links in the order they came).
        let (late, mut third) = UnixStream::pair().unwrap();
        notices.watch(9, late).unwrap();
        third
            .write_all(&[evod_wire::notice::crash(libc::SIGBUS)])
            .unwrap();
        let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            got,
            Notice {
                token: 9,
                signal: libc::SIGBUS
            }
        );
        drop(standby);
        drop(notices);
    }
}
