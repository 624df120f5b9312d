//! Warm standby workers: recovery without a process start on the critical path.
//!
//! Starting a worker costs a fork, an exec of the whole binary, dynamic
//! linking, argument parsing, attaching the segment and mapping the model:
//! about 2.5 ms here, of which the crash-to-answer path cannot hide any. So
//! next to each worker slot the supervisor keeps one *standby*: an
//! `evod worker --standby-fd N` started ahead of time with the slot's
//! segment and the model already mapped, blocked on one end of a socket
//! pair. It is not the server of the ring (it does not beat, read or write
//! the segment) until it is promoted:
//!
//! 1. the slot's worker has died and been reaped;
//! 2. the supervisor bumps the segment's epoch (exactly as for a cold start);
//! 3. [`Standby::promote`] writes one byte, `G`, to the link;
//! 4. the standby re-checks the model file's identity (a newer generation
//!    may have been published since it mapped it), claims the server end
//!    for the new epoch and serves.
//!
//! Then the supervisor starts the next standby, off the critical path (once
//! the recovery has settled) and off its event loop ([`Spawner`] forks it
//! on a thread of its own). The
//! standby says `R` on the link once it has mapped the model (status shows
//! it ready); it leaves quietly when the link closes (the supervisor dropped
//! it), and its parent-death signal covers a supervisor that died. A standby
//! holds only its own slot's segment, like the worker it will become.
//!
//! The link protocol is single bytes: standby → supervisor `R` (ready),
//! supervisor → standby `L` (a new model file is live: map it now, see
//! [`Standby::refresh`]) and `G` (go). After the promotion the link stays open
//! as the worker's crash-notice channel (`evod_wire::notice`): the
//! supervisor hands its end to `crate::notice`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::spawn::{self, Child, ChildSpec};

use evod_wire::standby::{GO, READY, REFRESH};

/// A started standby worker and the supervisor's end of its link.
#[derive(Debug)]
pub struct Standby {
    child: Child,
    link: UnixStream,
    ready: bool,
}

impl Standby {
    /// Starts a standby for a worker described by `worker` (the same
    /// arguments and descriptors plus `--standby-fd`). `program` is the
    /// executable (`None`: this one, `/proc/self/exe`).
    pub fn spawn(program: Option<&Path>, worker: &ChildSpec) -> io::Result<Standby> {
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let fd = theirs.as_raw_fd();
        let mut spec = worker.clone();
        spec.args.push("--standby-fd".into());
        spec.args.push(fd.to_string().into());
        spec.keep_fds.push(fd);
        let child = match program {
            Some(p) => spawn::spawn_program(p, &spec)?,
            None => spawn::spawn(&spec)?,
        };
        // The child has its own copy; ours must go, so that the child's
        // death is seen as end-of-file/EPIPE on our end.
        drop(theirs);
        Ok(Standby {
            child,
            link: ours,
            ready: false,
        })
    }

    /// The standby's process.
    pub fn child(&self) -> &Child {
        &self.child
    }

    /// Records that the reaper collected the standby.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the standby has said it is ready (reads the link without
    /// blocking).
    pub fn poll_ready(&mut self) -> bool {
        if !self.ready {
            let mut byte = [0u8; 1];
            if let Ok(1) = self.link.read(&mut byte) {
                self.ready = byte[0] == READY;
            }
        }
        self.ready
    }

    /// Waits until the standby is ready (benchmarks and tests; the daemon
    /// only polls).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        loop {
            let mut byte = [0u8; 1];
            match self.link.read(&mut byte) {
                Ok(1) if byte[0] == READY => {
                    self.ready = true;
                    return Ok(());
                }
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the standby closed its link before it was ready",
                    ));
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the standby sent {:?} instead of its ready byte", byte[0]),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the standby did not become ready in time",
                        ));
                    }
                    wait_readable(&self.link, left)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Tells the standby that a new model file is live, so that it maps it
    /// now rather than at its promotion (the promoted standby checks the
    /// file's identity either way). Never blocks: a byte that cannot be
    /// written now is left out, and the promotion maps the file then. The
    /// standby stays ready meanwhile: a promotion that comes during the
    /// remap waits for it, as it would have mapped the file itself (the
    /// structure only: milliseconds for a 1 GiB network; a perplexity
    /// worker opens only its small vector file, its base model stays).
    pub fn refresh(&mut self) {
        let _ = self.link.write(&[REFRESH]);
    }

    /// Promotes the standby: it becomes the slot's worker for the current
    /// epoch (bump the epoch first). Its clock restarts, so uptime-based
    /// policy counts from now. Returns the worker and the supervisor's end
    /// of its link, which stays its crash-notice channel
    /// (`crate::notice`). On error (the standby died, or closed its link)
    /// it is killed and reaped, and the error returned; start a worker cold
    /// instead.
    ///
    /// A standby that has not said ready yet (still mapping or loading its
    /// model: a llama.cpp base model takes seconds) is not promoted: it
    /// would claim the ring and beat only once its loading is done, and
    /// the watchdog would take that silence for a hang. It is killed
    /// without waiting (the SIGCHLD path reaps it) and the error says so;
    /// a cold worker claims the ring first and loads while it beats.
    pub fn promote(mut self) -> io::Result<(Child, UnixStream)> {
        if let Some(reason) = self.child.exited() {
            return Err(io::Error::other(format!("the standby had ended: {reason}")));
        }
        if !self.poll_ready() {
            self.child.kill();
            let Standby { child, link, .. } = self;
            drop(link);
            // Not waited for on the event loop: reaped by the SIGCHLD path.
            std::mem::forget(child);
            return Err(io::Error::other(
                "the standby has not said ready yet (still loading its model)",
            ));
        }
        match self.link.write(&[GO]) {
            Ok(1) => {
                self.child.restart_clock();
                Ok((self.child, self.link))
            }
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "could not write to the standby's link",
            )),
            // `self` drops here: the child is killed and reaped.
            Err(e) => Err(e),
        }
    }
}

/// A standby [`Spawner`] started: the slot and token it was asked for,
/// and the standby or why it could not start.
#[derive(Debug)]
pub struct Spawned {
    /// The slot the standby is for.
    pub slot: usize,
    /// The token of the request ([`Spawner::request`]).
    pub token: u64,
    /// The standby, or the error of its fork or `exec`.
    pub result: io::Result<Standby>,
}

/// One request to the spawner thread.
struct Job {
    slot: usize,
    token: u64,
    program: Option<PathBuf>,
    spec: ChildSpec,
    /// Keeps the descriptors `spec` names open until the child has them
    /// (the slot's segment).
    hold: Box<dyn Send>,
}

/// The thread that starts standbys, so that neither the fork nor the wait
/// for the child's `exec` (`Command::spawn` reads a close-on-exec pipe
/// until the child has exec'd: 1–5 ms here while both cores are busy)
/// holds up the supervisor's event loop, which has a status request, a
/// crash notice or a recovery to serve meanwhile.
///
/// **It lives as long as the supervisor's children.** A child's
/// parent-death signal (`PR_SET_PDEATHSIG`, set by [`spawn`]) fires when
/// the *thread* that forked it ends, not the process, and a standby
/// becomes its slot's worker when promoted: a thread started per request
/// would take its standby down with it. The thread ends when the spawner
/// is dropped, so the supervisor drops it after every child is gone.
pub struct Spawner {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Spawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawner").finish_non_exhaustive()
    }
}

impl Spawner {
    /// Starts the thread; each [`Spawned`] goes to `tx` wrapped by `wrap`.
    /// A standby whose report cannot be delivered (the receiver is gone) is
    /// dropped there: killed and reaped.
    pub fn start<E: Send + 'static>(
        tx: mpsc::Sender<E>,
        wrap: impl Fn(Spawned) -> E + Send + 'static,
    ) -> io::Result<Spawner> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("standbys".into())
            .spawn(move || {
                for job in rx {
                    // Never ends on a panic: its end would SIGKILL every
                    // standby and promoted worker it forked.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        Standby::spawn(job.program.as_deref(), &job.spec)
                    }))
                    .unwrap_or_else(|_| Err(io::Error::other("the standby spawner panicked")));
                    drop(job.hold);
                    let _ = tx.send(wrap(Spawned {
                        slot: job.slot,
                        token: job.token,
                        result,
                    }));
                }
            })?;
        Ok(Spawner {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Asks for a standby of the worker `spec` describes (`program`: as in
    /// [`Standby::spawn`]); `hold` is kept until the fork is done (what
    /// owns the descriptors in `spec.keep_fds`). The answer comes as a
    /// [`Spawned`] with this `slot` and `token`. Fails only if the thread
    /// is gone, handing the request back so the caller can spawn itself.
    pub fn request(
        &self,
        slot: usize,
        token: u64,
        program: Option<PathBuf>,
        spec: ChildSpec,
        hold: Box<dyn Send>,
    ) -> Result<(), ChildSpec> {
        let job = Job {
            slot,
            token,
            program,
            spec,
            hold,
        };
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| e.0.spec),
            None => Err(job.spec),
        }
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current fork.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Blocks until `link` is readable (or closed), up to `timeout`.
#[cfg_attr(not(test), allow(dead_code))]
fn wait_readable(link: &UnixStream, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        link.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
    match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bash standing in for a worker (dash cannot redirect descriptors
    /// above 9): it reads the standby descriptor
    /// from its last argument, says `R`, waits for `G`, then writes `ok` to
    /// the file named by its first argument and sleeps.
    fn fake_worker(out: &Path) -> ChildSpec {
        ChildSpec {
            role: "-c",
            args: vec![
                r#"for fd; do :; done
                   printf R >&"$fd"
                   go=$(dd bs=1 count=1 <&"$fd" 2>/dev/null)
                   [ "$go" = G ] && echo ok > "$0"
                   exec sleep 30"#
                    .into(),
                out.into(),
            ],
            keep_fds: vec![],
            harden: true,
            memory_limit: None,
            block_sighup: false,
        }
    }

    #[test]
    fn a_standby_waits_for_go_and_then_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("promoted");
        let mut standby = Standby::spawn(Some("/bin/bash".as_ref()), &fake_worker(&out)).unwrap();
        standby
            .wait_ready(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert!(standby.poll_ready());
        assert!(!out.exists(), "the standby ran before it was promoted");
        let before = standby.child().started();
        let (mut child, _link) = standby.promote().unwrap();
        assert!(child.started() > before, "promotion restarts the clock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&out).unwrap_or_default() != "ok\n" {
            assert!(Instant::now() < deadline, "the promoted standby never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            child.kill_and_reap().unwrap().to_string(),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_standby_not_ready_yet_is_not_promoted_but_killed() {
        // A standby still loading: it never says `R` within the test.
        let spec = ChildSpec {
            role: "-c",
            args: vec!["exec sleep 30".into()],
            keep_fds: vec![],
            harden: true,
            memory_limit: None,
            block_sighup: false,
        };
        let mut standby = Standby::spawn(Some("/bin/sh".as_ref()), &spec).unwrap();
        assert!(!standby.poll_ready());
        let pid = standby.child().pid();
        let err = standby.promote().unwrap_err();
        assert!(err.to_string().contains("not said ready"), "{err}");
        // Killed, not reaped: whoever reaps (here the test) finds SIGKILL.
        let status = nix::sys::wait::waitpid(pid, None).unwrap();
        assert_eq!(
            crate::reap::ExitReason::from_wait(status).map(|(_, r)| r.to_string()),
            Some("killed by signal 9 (SIGKILL)".to_owned())
        );
    }

    #[test]
    fn promoting_a_dead_standby_fails_so_the_caller_starts_cold() {
        let spec = ChildSpec {
            role: "-c",
            args: vec!["exit 3".into()],
            keep_fds: vec![],
            harden: true,
            memory_limit: None,
            block_sighup: false,
        };
        let mut standby = Standby::spawn(Some("/bin/sh".as_ref()), &spec).unwrap();
        let err = standby
            .wait_ready(Instant::now() + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        let reason = standby.child_mut().wait().unwrap();
        assert_eq!(reason.to_string(), "exited with code 3");
        assert!(standby.promote().is_err());
    }

    #[test]
    fn the_spawner_forks_on_its_own_thread_and_its_standbys_outlive_the_asker() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("promoted");
        let (tx, rx) = mpsc::channel();
        let spawner = Spawner::start(tx, |s| s).unwrap();
        // Asked from a thread that ends at once: the standby's parent-death
        // signal is tied to the spawner's thread, not to the asker's.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                spawner
                    .request(
                        3,
                        41,
                        Some("/bin/bash".into()),
                        fake_worker(&out),
                        Box::new(()),
                    )
                    .unwrap();
            });
        });
        let spawned = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((spawned.slot, spawned.token), (3, 41));
        let mut standby = spawned.result.unwrap();
        standby
            .wait_ready(Instant::now() + Duration::from_secs(10))
            .unwrap();
        let (mut child, _link) = standby.promote().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&out).unwrap_or_default() != "ok\n" {
            assert!(Instant::now() < deadline, "the promoted standby never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(child.exited().is_none());
        assert_eq!(
            child.kill_and_reap().unwrap().to_string(),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn a_spawn_that_fails_is_reported_with_its_slot_and_token() {
        let (tx, rx) = mpsc::channel();
        let spawner = Spawner::start(tx, |s| s).unwrap();
        let spec = ChildSpec {
            role: "-c",
            args: vec![],
            keep_fds: vec![],
            harden: false,
            memory_limit: None,
            block_sighup: false,
        };
        spawner
            .request(0, 7, Some("/nonexistent/evod".into()), spec, Box::new(()))
            .unwrap();
        let spawned = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((spawned.slot, spawned.token), (0, 7));
        let err = spawned.result.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        drop(spawner);
    }
}
