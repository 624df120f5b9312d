//! Helpers shared by the process-level tests in this folder: the `evod`
//! command with a clean environment, output as text, the children of a
//! process by role (read from `/proc`), waits with a deadline, and
//! [`Daemon`], an `evod run` in a temporary state folder.

#![allow(dead_code)] // Each test file uses a different subset.

use std::process::Command;

/// `evod` (the binary under test) without the caller's `EVOD_*` settings.
pub fn evod() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evod"));
    cmd.env_remove("EVOD_DIR")
        .env_remove("EVOD_CONTROL_SOCKET")
        .env("NO_COLOR", "1");
    cmd
}

/// Bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Live (not zombie) children of `pid` whose process name (`comm`, as in
/// `ps -o comm`) is `name`.
pub fn children_named(pid: u32, name: &str) -> Vec<u32> {
    live_children(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// Live (not zombie) children of `pid`.
fn live_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(") ").map(|x| x.1) else {
            continue;
        };
        let mut fields = after.split(' ');
        let state = fields.next().unwrap_or("");
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == pid && state != "Z" {
            out.push(p);
        }
    }
    out
}

/// Live (not zombie) children of `pid` whose first argument is `role`
/// (`worker`, `evolver`). A warm standby (`evod worker --standby-fd`, named
/// `evod-standby` until promoted) is not counted as a worker.
pub fn children_with_role(pid: u32, role: &str) -> Vec<u32> {
    live_children(pid)
        .into_iter()
        .filter(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|&b| b == 0).map(text).collect();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            let standby = args.iter().any(|a| a == "--standby-fd") && comm.trim() != "evod-worker";
            args.get(1).is_some_and(|a| a == role) && !standby
        })
        .collect()
}

/// Calls `cond` every 10 ms until it returns `Some`, and returns that;
/// panics with `what` and `context()` past `within`. For conditions that
/// have no event to block on (a status answer, a log line, a file).
pub fn poll_until<T>(
    what: &str,
    within: std::time::Duration,
    mut cond: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let end = std::time::Instant::now() + within;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out after {within:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits up to `within` for `child` to exit, blocking on its pidfd (no
/// polling): its status, or `None` past the deadline (the child is left
/// running).
pub fn wait_exit(
    child: &mut std::process::Child,
    within: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let end = std::time::Instant::now() + within;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // (closed below) or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) } as i32;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            if fd >= 0 {
                // SAFETY: `fd` is the pidfd opened above, closed once.
                unsafe { libc::close(fd) };
            }
            return Some(status);
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            if fd >= 0 {
                // SAFETY: as above.
                unsafe { libc::close(fd) };
            }
            return None;
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        if fd >= 0 {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call; the
            // pidfd turns readable when the process exits. EINTR or a
            // timeout just goes round the loop.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        } else {
            // No pidfd (a kernel before 5.3): block until it exits.
            return Some(child.wait().unwrap());
        }
    }
}

/// A worker row's last exit was a SIGKILL (from the supervisor).
pub fn assert_sigkilled(w: &serde_json::Value) {
    assert!(
        w["last_exit"]
            .as_str()
            .unwrap()
            .starts_with("killed by signal 9 (SIGKILL)"),
        "{w}"
    );
}

/// `evod run --dir DIR ARGS...` in a temporary state folder, stderr logged
/// to `run.log` there; killed (and reaped) on drop unless it already exited
/// through [`Daemon::wait_exit`].
pub struct Daemon {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    deadline: std::time::Duration,
    context: fn(&Daemon) -> String,
}

impl Daemon {
    /// Spawns `evod run --dir DIR ARGS...` on `dir` (which may hold an
    /// earlier daemon's state); waits for nothing. `deadline` bounds every
    /// wait of [`Daemon::wait_for`] and [`Daemon::wait_exit`].
    pub fn spawn(dir: tempfile::TempDir, args: &[&str], deadline: std::time::Duration) -> Daemon {
        let log = std::fs::File::create(dir.path().join("run.log")).unwrap();
        let child = evod()
            .arg("run")
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning evod run");
        Daemon {
            child: Some(child),
            dir,
            deadline,
            context: |d| format!("status {:?}", d.status()),
        }
    }

    /// What a timed-out [`Daemon::wait_for`] prints before the log
    /// (by default the status report).
    pub fn on_timeout(mut self, context: fn(&Daemon) -> String) -> Daemon {
        self.context = context;
        self
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Takes the state folder (for a next daemon to start on), leaving an
    /// empty one in its place.
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The supervisor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The supervisor's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("run.log")).unwrap_or_default()
    }

    /// `evod ARGS... --dir DIR`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        evod()
            .args(args)
            .arg("--dir")
            .arg(self.dir())
            .output()
            .unwrap()
    }

    /// `evod status --json`, if it answered.
    pub fn status(&self) -> Option<serde_json::Value> {
        let o = self.cli(&["status", "--json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    /// Worker 0's row in the status report.
    pub fn worker(&self) -> Option<serde_json::Value> {
        self.row(|c| c["role"] == "worker" && c["index"] == 0)
    }

    /// The first child row in the status report that `is` picks.
    pub fn row(&self, is: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.status()?["children"]
            .as_array()?
            .iter()
            .find(|c| is(c))
            .cloned()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Polls `cond` until `Some`; fails with the timeout context and the
    /// log past the deadline, or if the daemon exited.
    pub fn wait_for<T>(&mut self, what: &str, mut cond: impl FnMut(&Daemon) -> Option<T>) -> T {
        let end = std::time::Instant::now() + self.deadline;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "evod run exited ({status}) waiting for {what}:\n{}",
                    self.log()
                );
            }
            if let Some(v) = cond(self) {
                return v;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}\n{}\nlog:\n{}",
                (self.context)(self),
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Waits (to the deadline) for the supervisor to exit; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.wait_exit_within(self.deadline)
            .unwrap_or_else(|| panic!("evod run did not exit\n{}", self.log()))
    }

    /// Waits up to `within` for the supervisor to exit: its status, or
    /// `None` (still running; killed on drop).
    pub fn wait_exit_within(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let status = wait_exit(self.child.as_mut().unwrap(), within)?;
        self.child = None;
        Some(status)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `docker` CLI helpers shared by `tests/docker.rs`,
/// `tests/docker_dist.rs` and `tests/docker_llm.rs`.
pub mod docker {
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};

    /// The workspace root.
    pub fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The tag `<repository>:test-<hash of this checkout's path>` the tests
    /// of this checkout build and run: another checkout's tests on the same
    /// Docker engine (another worktree, a CI clone) build their own tag and
    /// cannot re-tag this one's image in the middle of its run.
    pub fn test_tag(repository: &str) -> String {
        use std::hash::{Hash, Hasher};
        let root = root().canonicalize().unwrap_or_else(|_| root());
        let mut h = std::hash::DefaultHasher::new();
        root.hash(&mut h);
        format!("{repository}:test-{:016x}", h.finish())
    }

    /// The label every test image carries: the checkout whose tests built
    /// it (`test_tag`'s path), so that a later run can tell an image whose
    /// checkout is gone ([`prune_stale_test_images`]).
    pub const CHECKOUT_LABEL: &str = "org.evod.test.checkout";

    /// This checkout's path, as [`CHECKOUT_LABEL`] records it.
    pub fn checkout() -> String {
        root()
            .canonicalize()
            .unwrap_or_else(|_| root())
            .display()
            .to_string()
    }

    /// Removes the test images of checkouts that are gone: every tag
    /// labelled [`CHECKOUT_LABEL`] whose folder no longer holds a
    /// `Cargo.toml` (a deleted CI clone or worktree), and the untagged
    /// images with that label (an earlier build of a tag since rebuilt).
    /// Images of checkouts that exist, another's running tests included,
    /// and every image without the label (`evod:local`, the user's) are
    /// left alone; an image a container still uses is left too (`docker
    /// rmi` refuses it). The tags removed.
    pub fn prune_stale_test_images() -> Vec<String> {
        let filter = format!("label={CHECKOUT_LABEL}");
        let listed = docker(&[
            "image",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ]);
        let mut removed = Vec::new();
        for tag in super::text(&listed.stdout).lines().map(str::trim) {
            if tag.is_empty() || tag.contains("<none>") {
                continue;
            }
            let format = format!("{{{{index .Config.Labels \"{CHECKOUT_LABEL}\"}}}}");
            let o = docker(&["image", "inspect", "--format", &format, tag]);
            let owner = super::text(&o.stdout).trim().to_owned();
            if !o.status.success() || owner.is_empty() {
                continue;
            }
            if !Path::new(&owner).join("Cargo.toml").exists()
                && docker(&["rmi", tag]).status.success()
            {
                removed.push(tag.to_owned());
            }
        }
        docker(&["image", "prune", "--force", "--filter", &filter]);
        removed
    }

    /// Runs `docker ARGS` with no stdin; its output.
    pub fn docker(args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running docker")
    }

    /// Stdout then stderr, lossily as text.
    pub fn text(o: &Output) -> String {
        format!("{}{}", super::text(&o.stdout), super::text(&o.stderr))
    }

    /// `docker inspect --format FORMAT CONTAINER`, trimmed.
    pub fn inspect(container: &str, format: &str) -> String {
        super::text(&docker(&["inspect", "--format", format, container]).stdout)
            .trim()
            .to_owned()
    }

    /// The container's log (stdout and stderr).
    pub fn logs(container: &str) -> String {
        text(&docker(&["logs", container]))
    }

    /// The container's JSON log lines whose message is `message`, in order.
    pub fn log_events(container: &str, message: &str) -> Vec<serde_json::Value> {
        logs(container)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == message)
            .collect()
    }

    /// The bytes of the regular file `path` in `container` (running or
    /// not), through `docker cp` (the image has no shell to `cat` with):
    /// a tar stream of one 512-byte ustar header (size in octal at offset
    /// 124), then the bytes.
    pub fn read_file(container: &str, path: &str) -> Vec<u8> {
        let o = docker(&["cp", &format!("{container}:{path}"), "-"]);
        assert!(o.status.success(), "docker cp {path}: {}", text(&o));
        let tar = o.stdout;
        assert!(
            tar.len() >= 512 && matches!(tar[156], b'0' | 0),
            "docker cp {path}: not one regular file in ustar form"
        );
        let size = std::str::from_utf8(&tar[124..136])
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_matches(|c| c == '\0' || c == ' '), 8).ok())
            .expect("ustar size field") as usize;
        tar[512..512 + size].to_vec()
    }

    /// Once per test binary: builds the images, each with `cargo xtask
    /// ARGS` (`image --tag …`, `image --redis --tag …`; a no-op for cargo
    /// and Docker's layer cache when nothing changed), and returns `true`;
    /// without a usable engine (`docker info` fails) prints one loud
    /// `SKIPPED: <who>: …` line on the real stderr (past the harness's
    /// capture) and returns `false`. A failed build fails the test. Each
    /// image is labelled with this checkout ([`CHECKOUT_LABEL`]), and the
    /// test images of checkouts that are gone are removed first
    /// ([`prune_stale_test_images`]).
    pub fn images_or_skip(who: &str, builds: &[&[&str]]) -> bool {
        use std::io::Write;
        static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *READY.get_or_init(|| {
            let why = match Command::new("docker")
                .args(["info", "--format", "{{.ServerVersion}}"])
                .output()
            {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(super::text(&o.stderr).trim().to_owned()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = why {
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: {who}: no Docker engine (docker info failed: {why})"
                );
                return false;
            }
            // A shared engine keeps every checkout's test tags: drop
            // those of checkouts that are gone before adding ours.
            let pruned = prune_stale_test_images();
            if !pruned.is_empty() {
                let _ = writeln!(
                    std::io::stderr(),
                    "{who}: removed the test images of checkouts that are gone: {}",
                    pruned.join(", ")
                );
            }
            let label = format!("{CHECKOUT_LABEL}={}", checkout());
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").into());
            for args in builds {
                let o = Command::new(&cargo)
                    .current_dir(root())
                    .args(["run", "--quiet", "-p", "xtask", "--"])
                    .args(*args)
                    .args(["--label", &label])
                    .stdin(Stdio::null())
                    .output()
                    .expect("running cargo xtask image");
                assert!(
                    o.status.success(),
                    "cargo xtask {args:?} failed:\n{}",
                    text(&o)
                );
            }
            true
        })
    }
}
