//! The one helper that starts every child process.
//!
//! Every child is the supervisor's own executable (`/proc/self/exe`, so a
//! binary replaced on disk does not change what is spawned) started with a
//! hidden role subcommand, shown in `ps` as `evod <role> …`. In the child,
//! between `fork` and `exec`:
//!
//! - it gets its own process group (a terminal's Ctrl-C reaches only the
//!   supervisor, and the supervisor signals the whole group);
//! - `PR_SET_PDEATHSIG = SIGKILL`, then a `getppid()` check against the
//!   supervisor's pid, so a supervisor that died before the `prctl` still
//!   takes the child with it;
//! - every descriptor except the ones listed in [`ChildSpec::keep_fds`] is
//!   marked close-on-exec (`close_range(…, CLOSE_RANGE_CLOEXEC)`), and the
//!   kept ones are made inheritable at their current numbers;
//! - with [`ChildSpec::harden`]: `no_new_privs` and no core dumps;
//! - with [`ChildSpec::memory_limit`]: `RLIMIT_DATA`.
//!
//! A [`Child`] kills its process group and reaps it (waiting at most one
//! second) when dropped, unless the supervisor's reaper already collected
//! it ([`Child::set_exited`]). The event loop itself only [`Child::kill`]s:
//! its SIGCHLD path reaps.

use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::reap::ExitReason;

/// What to start.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// The hidden role subcommand (`worker`, `evolver`).
    pub role: &'static str,
    /// Arguments after the role.
    pub args: Vec<OsString>,
    /// Descriptors the child inherits at their current numbers.
    pub keep_fds: Vec<RawFd>,
    /// Set `no_new_privs` and disable core dumps.
    pub harden: bool,
    /// `RLIMIT_DATA` in bytes (heap and private writable mappings; not the
    /// shared segment or the read-only model mapping): an allocation past
    /// it fails, which ends the child (Rust aborts on allocation failure).
    pub memory_limit: Option<u64>,
    /// Start with SIGHUP blocked (the mask survives `exec`): a SIGHUP sent
    /// before the child has installed its handler stays pending instead of
    /// ending it by its default action. The child unblocks it once its
    /// handler is in ([`unblock_sighup`]). The evolver's: `evod wake`
    /// right after a restart must not kill it.
    pub block_sighup: bool,
}

/// Unblocks SIGHUP in the calling thread (a child started with
/// [`ChildSpec::block_sighup`], once its handler is installed; threads it
/// starts afterwards inherit the unblocked mask). A SIGHUP that came
/// meanwhile is delivered now, to the handler.
pub fn unblock_sighup() -> io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGHUP);
    set.thread_unblock().map_err(io::Error::from)
}

/// A running (or ended, not yet dropped) child process.
#[derive(Debug)]
pub struct Child {
    pid: Pid,
    started: Instant,
    exited: Option<ExitReason>,
}

/// Starts a child as described by `spec`.
pub fn spawn(spec: &ChildSpec) -> io::Result<Child> {
    spawn_program("/proc/self/exe".as_ref(), spec)
}

/// Starts a child as described by `spec`, with `env` added to the
/// environment (a setting kept out of its command line, which any local
/// user can read: the broker URL with its password).
pub fn spawn_with_env(spec: &ChildSpec, env: &[(OsString, OsString)]) -> io::Result<Child> {
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("evod")
        .arg(spec.role)
        .args(&spec.args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    launch(command, spec)
}

/// Starts `program` with `spec` (tests and benchmarks use other programs).
pub fn spawn_program(program: &std::path::Path, spec: &ChildSpec) -> io::Result<Child> {
    let mut command = Command::new(program);
    command.arg0("evod").arg(spec.role).args(&spec.args);
    launch(command, spec)
}

/// Starts a user's worker program (`evod run --worker-cmd`): `argv[0]`
/// (a resolved path) with `argv[1..]`, then `spec.args` (no role word),
/// with `env` added to the environment, and the same hardening, limits and
/// kept descriptors as any child.
pub fn spawn_command(
    argv: &[OsString],
    env: &[(OsString, OsString)],
    spec: &ChildSpec,
) -> io::Result<Child> {
    let Some((program, args)) = argv.split_first() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "spawn: an empty worker command",
        ));
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .args(&spec.args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    launch(command, spec)
}

/// The common part of every spawn: stdio, process group, and the pre-exec
/// steps of the module documentation.
fn launch(mut command: Command, spec: &ChildSpec) -> io::Result<Child> {
    command.stdin(Stdio::null()).process_group(0);
    let parent = nix::unistd::getpid();
    let mut keep = spec.keep_fds.clone();
    keep.sort_unstable();
    keep.dedup();
    if keep.iter().any(|&fd| fd < 3) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "spawn: descriptors 0-2 are the child's stdio and cannot be passed as extra fds",
        ));
    }
    let harden = spec.harden;
    let memory_limit = spec.memory_limit;
    let block_sighup = spec.block_sighup;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (sigemptyset, sigaddset, sigprocmask,
    // prctl, getppid, setrlimit, close_range, fcntl); it allocates nothing
    // (`keep` was built before the fork).
    unsafe {
        command.pre_exec(move || {
            // Added to the mask the child inherits; the mask survives exec.
            if block_sighup {
                let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                if libc::sigemptyset(set.as_mut_ptr()) != 0
                    || libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP) != 0
                    || libc::sigprocmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut()) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl: then no
            // death signal will ever come, so leave now.
            if libc::getppid() != parent.as_raw() {
                libc::_exit(1);
            }
            if harden {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let zero = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &zero) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(bytes) = memory_limit {
                let limit = libc::rlimit {
                    rlim_cur: bytes as libc::rlim_t,
                    rlim_max: bytes as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_DATA, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Everything from 3 up except the kept fds: close-on-exec. Rust
            // opens descriptors with O_CLOEXEC already; this also covers
            // anything a library opened without it.
            let mut low: libc::c_uint = 3;
            for &fd in &keep {
                let fd = fd as libc::c_uint;
                if fd > low {
                    cloexec_range(low, fd - 1);
                }
                low = fd + 1;
            }
            cloexec_range(low, libc::c_uint::MAX);
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(Child {
        pid: Pid::from_raw(child.id() as i32),
        started: Instant::now(),
        exited: None,
    })
}

/// In a child: checks that inherited descriptor `fd` (given on the command
/// line) is open, above stdio, and a socket, before it is taken over.
pub fn check_inherited_fd(fd: RawFd) -> io::Result<()> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is stdio or negative, not an inherited socket"),
        ));
    }
    // SAFETY: `libc::stat` is plain integers (all-zero is a valid value);
    // fstat only writes into that buffer, which we own, and reports an
    // invalid descriptor number as EBADF.
    let rc = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        let rc = libc::fstat(fd, &mut st);
        (rc, st.st_mode)
    };
    let (rc, mode) = rc;
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket"),
        ));
    }
    Ok(())
}

/// Marks `[first, last]` close-on-exec; an old kernel without `close_range`
/// is fine (std already opens descriptors close-on-exec).
///
/// # Safety
/// Only marks descriptors; async-signal-safe.
unsafe fn cloexec_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing, it only
    // sets a flag on descriptors in range; unknown numbers are ignored.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            last,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
    }
}

impl Child {
    /// The child's pid (also its process group id).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Restarts the uptime clock (a standby promoted to serve now).
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// How it ended, once reaped.
    pub fn exited(&self) -> Option<ExitReason> {
        self.exited
    }

    /// Records that the reaper collected this child (its pid may now be reused,
    /// so it is never signalled or waited for again).
    pub fn set_exited(&mut self, reason: ExitReason) {
        self.exited = Some(reason);
    }

    /// Sends `signal` to the child's whole process group, if it is still running.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        if self.exited.is_some() {
            return Ok(());
        }
        match killpg(self.pid, signal) {
            // The group may be gone while the leader is a zombie: signal it.
            Err(nix::errno::Errno::ESRCH) => kill(self.pid, signal),
            other => other,
        }
    }

    /// Kills the process group without waiting (the supervisor's SIGCHLD
    /// path reaps it).
    pub fn kill(&self) {
        if self.exited.is_none() {
            let _ = self.signal(Signal::SIGKILL);
        }
    }

    /// Kills the process group and waits for the child, up to one second
    /// (SIGKILL is not instant for a process in uninterruptible sleep);
    /// `None` if it was not reaped by then (it is then left to whoever
    /// reaps later).
    pub fn kill_and_reap(&mut self) -> Option<ExitReason> {
        self.kill();
        self.reap_by(Instant::now() + Duration::from_secs(1))
    }

    /// Reaps the child if it has ended, waiting up to `deadline`, without
    /// signalling it. `None` if it is still running at the deadline.
    pub fn reap_by(&mut self, deadline: Instant) -> Option<ExitReason> {
        let mut pause = Duration::from_micros(100);
        while self.exited.is_none() {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
                Ok(status) => {
                    if let Some((_, reason)) = ExitReason::from_wait(status) {
                        self.exited = Some(reason);
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                // ECHILD: someone else reaped it; nothing to wait for.
                Err(_) => break,
            }
        }
        self.exited
    }

    /// Waits for the child to end by itself (blocking, no deadline: tests
    /// and benchmarks only, never the supervisor's loop) and reaps it.
    pub fn wait(&mut self) -> Option<ExitReason> {
        self.reap_by(crate::policy::later(Instant::now(), Duration::MAX))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.exited.is_none() && self.kill_and_reap().is_none() {
            tracing::warn!(
                pid = self.pid.as_raw(),
                "a killed child did not end within 1 s; left for the reaper"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn sh(script: &str, keep_fds: Vec<RawFd>) -> Child {
        // argv is ["evod", role, args…] = ["evod", "-c", SCRIPT].
        spawn_program(
            "/bin/sh".as_ref(),
            &ChildSpec {
                role: "-c",
                args: vec![script.into()],
                keep_fds,
                harden: true,
                memory_limit: None,
                block_sighup: false,
            },
        )
        .expect("spawn sh")
    }

    fn read_proc(pid: Pid, what: &str) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default()
    }

    #[test]
    fn child_is_group_leader_and_dropping_kills_and_reaps_it() {
        let child = sh("sleep 30", vec![]);
        let pid = child.pid();
        assert_eq!(nix::unistd::getpgid(Some(pid)).unwrap(), pid);
        drop(child);
        // Reaped: no /proc entry, not even a zombie.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn only_kept_fds_are_inherited_and_hardening_applies() {
        let kept = std::fs::File::open("/proc/self/exe").unwrap();
        let hidden = std::fs::File::open("/proc/self/exe").unwrap();
        let (k, h) = (kept.as_raw_fd(), hidden.as_raw_fd());
        // Clear close-on-exec on `hidden` to prove the helper sets it again.
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(h, libc::F_SETFD, 0) };
        let mut child = sh("exec sleep 30", vec![k]);
        let pid = child.pid();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !read_proc(pid, "cmdline").starts_with("sleep") {
            assert!(Instant::now() < deadline, "child never exec'd sleep");
            std::thread::yield_now();
        }
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(fds.contains(&k.to_string()), "kept fd missing: {fds:?}");
        assert!(!fds.contains(&h.to_string()), "leaked fd: {fds:?}");
        let status = read_proc(pid, "status");
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        let limits = read_proc(pid, "limits");
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
        let reason = child.kill_and_reap().unwrap();
        assert_eq!(reason.to_string(), "killed by signal 9 (SIGKILL)");
        drop((kept, hidden));
    }

    /// A child started with `block_sighup` holds a SIGHUP sent before it
    /// could install a handler (pending, not delivered) instead of dying of
    /// it; one started without it dies of it.
    #[test]
    fn a_sighup_before_the_handler_is_held_when_asked() {
        let spec = |block_sighup| ChildSpec {
            role: "-c",
            args: vec!["exec sleep 30".into()],
            keep_fds: vec![],
            harden: true,
            memory_limit: None,
            block_sighup,
        };
        let mut held = spawn_program("/bin/sh".as_ref(), &spec(true)).expect("spawn sh");
        held.signal(Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        // Bit 0 of the masks is SIGHUP.
        let hup = |line: &str| {
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap_or("0"), 16).unwrap_or(0) & 1
                == 1
        };
        loop {
            let status = read_proc(held.pid(), "status");
            let field = |name: &str| status.lines().find(|l| l.starts_with(name)).map(hup);
            assert_eq!(field("SigBlk:"), Some(true), "{status}");
            if field("ShdPnd:") == Some(true) || field("SigPnd:") == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "SIGHUP never pending: {status}");
            std::thread::yield_now();
        }
        assert!(held.exited().is_none(), "the held child ended");
        let reason = held.kill_and_reap().unwrap();
        assert_eq!(reason.to_string(), "killed by signal 9 (SIGKILL)");

        let mut plain = spawn_program("/bin/sh".as_ref(), &spec(false)).expect("spawn sh");
        plain.signal(Signal::SIGHUP).unwrap();
        let reason = plain.wait().unwrap();
        assert_eq!(reason.to_string(), "killed by signal 1 (SIGHUP)");
    }

    #[test]
    fn fds_below_three_are_refused() {
        let err = spawn_program(
            "/bin/true".as_ref(),
            &ChildSpec {
                role: "x",
                args: vec![],
                keep_fds: vec![1],
                harden: false,
                memory_limit: None,
                block_sighup: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
