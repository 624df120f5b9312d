//! Process tests of the control plane and the settings of `evod run`: the
//! socket path rule (never remove or chmod what evod did not create), many
//! control connections at once with a whole-request deadline, the checks
//! of every setting at start (exit 2 naming the flag; exit 6 for a state
//! folder that cannot be written), and the client's permission error.
//!
//! Two tests need root, as in CI (`unshare --mount` for a read-only mount,
//! `setpriv` to run a client as another uid); their tools failing is a test
//! failure, not a skip.

mod common;

use common::{evod, text};

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Guards against hangs only; not a timing assertion.
const DEADLINE: Duration = Duration::from_secs(60);

/// How fast a control request must be answered while a slow client holds
/// another connection (the slow client's own deadline is 5 s).
const PROMPT: Duration = Duration::from_secs(3);

/// `evod run --no-evolver --workers 1` on `dir` with `args`, stderr in
/// `log`; waits until `socket` answers a healthy status.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, socket: &Path, log: &Path, args: &[&str]) -> Daemon {
        let child = evod()
            .arg("run")
            .arg("--dir")
            .arg(dir)
            .arg("--control-socket")
            .arg(socket)
            .args(["--no-evolver", "--workers", "1"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawning evod run");
        let d = Daemon {
            child: Some(child),
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        let child = std::cell::RefCell::new(d);
        common::poll_until(
            "a healthy daemon",
            DEADLINE,
            || {
                let mut d = child.borrow_mut();
                if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("evod run exited early ({status}):\n{}", d.log());
                }
                d.status().filter(|s| s["healthy"] == true)
            },
            || child.borrow().log(),
        );
        child.into_inner()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self, args: &[&str]) -> Output {
        evod()
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .unwrap()
    }

    fn status(&self) -> Option<Value> {
        let o = self.client(&["status", "--json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// `evod stop`, then the daemon's exit code.
    fn stop(&mut self) -> Option<i32> {
        let o = self.client(&["stop"]);
        assert!(o.status.success(), "stop: {}", text(&o.stderr));
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        common::wait_exit(&mut child, DEADLINE)
            .unwrap_or_else(|| panic!("evod run did not exit\n{}", self.log()))
            .code()
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

/// `evod run --no-evolver --workers 1 --dir DIR --control-socket SOCKET`,
/// which must be refused with exit 2 before it starts anything; its stderr.
fn refused_start(dir: &Path, socket: &Path) -> String {
    let o = evod()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--no-evolver", "--workers", "1", "--control-socket"])
        .arg(socket)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    err
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A shared, sticky folder `v` (mode 1777) holding `important.txt`.
fn shared_folder(root: &Path) -> PathBuf {
    let v = root.join("v");
    std::fs::create_dir(&v).unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o1777)).unwrap();
    std::fs::write(v.join("important.txt"), "data\n").unwrap();
    v
}

#[test]
fn a_file_at_the_socket_path_is_refused_and_left_alone() {
    // The issue's reproduction: `--control-socket v/important.txt`.
    let root = tempfile::tempdir().unwrap();
    let v = shared_folder(root.path());
    let state = root.path().join("K");
    let file = v.join("important.txt");
    let err = refused_start(&state, &file);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("a regular file"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data\n");
    assert_eq!(mode(&v), 0o1777);
    assert!(!state.exists(), "nothing is created before the refusal");
    // A folder at the path: refused the same way.
    let err = refused_start(&state, &v);
    assert!(err.contains("a folder"), "{err}");
    assert_eq!(mode(&v), 0o1777);
}

#[test]
fn a_socket_in_a_shared_folder_leaves_the_folder_as_it_was() {
    let root = tempfile::tempdir().unwrap();
    let v = shared_folder(root.path());
    let state = root.path().join("K");
    let socket = v.join("evod.sock");
    let mut d = Daemon::start(&state, &socket, &root.path().join("run.log"), &[]);
    assert_eq!(mode(&v), 0o1777, "the shared folder was chmodded");
    // A second daemon on the live socket is refused with exit 2.
    let err = refused_start(&root.path().join("K2"), &socket);
    assert!(err.contains("already running"), "{err}");
    assert!(socket.exists(), "the live daemon's socket was removed");
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(!socket.exists(), "socket left behind");
    assert!(v.is_dir(), "the shared folder was removed");
    assert_eq!(mode(&v), 0o1777);
    assert_eq!(
        std::fs::read_to_string(v.join("important.txt")).unwrap(),
        "data\n"
    );
    // SIGKILLed: the janitor removes the socket, and only the socket.
    let mut d = Daemon::start(&state, &socket, &root.path().join("run2.log"), &[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_exit();
    common::poll_until(
        "the janitor to remove the socket",
        DEADLINE,
        || (!socket.exists()).then_some(()),
        || d.log(),
    );
    assert!(v.is_dir() && mode(&v) == 0o1777);
    assert!(v.join("important.txt").exists());
}

#[test]
fn created_socket_folders_are_removed_at_stop() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("a").join("b").join("evod.sock");
    let mut d = Daemon::start(
        &root.path().join("K"),
        &socket,
        &root.path().join("run.log"),
        &[],
    );
    assert_eq!(mode(&root.path().join("a")), 0o700);
    assert_eq!(mode(&root.path().join("a/b")), 0o700);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert!(
        !root.path().join("a").exists(),
        "created folders left behind"
    );
}

#[test]
fn a_slow_client_does_not_block_the_others() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("evod.sock");
    let mut d = Daemon::start(
        &root.path().join("K"),
        &socket,
        &root.path().join("run.log"),
        &[],
    );
    // A client that trickles one byte per second and never ends its line.
    let mut slow = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in br#"{"op":"status"}"#.iter().cycle() {
            if writer.write_all(&[*b]).is_err() {
                break;
            }
            // The client's own pace, not a wait for another process.
            if stop_rx.recv_timeout(Duration::from_secs(1)).is_ok() {
                break;
            }
        }
    });
    for args in [
        &["status", "--json"][..],
        &["exec", "--input", "0.1,0.2,0.3,0.4"],
        &["status", "--check"],
    ] {
        let started = Instant::now();
        let o = d.client(args);
        let took = started.elapsed();
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert!(took < PROMPT, "{args:?} took {took:?} beside a slow client");
    }
    // The slow client gets its own deadline's answer.
    slow.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    let _ = stop_tx.send(());
    trickle.join().unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no complete request line within 5s"),
        "{answer}"
    );
    // Stop while another slow client holds a connection.
    let mut slow = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    slow.write_all(b"{").unwrap();
    let started = Instant::now();
    let o = d.client(&["stop"]);
    let took = started.elapsed();
    assert!(o.status.success(), "stop: {}", text(&o.stderr));
    assert!(took < PROMPT, "stop took {took:?} beside a slow client");
    assert_eq!(d.wait_exit(), Some(0), "{}", d.log());
}

#[test]
fn exec_over_the_raw_socket_refuses_non_finite_inputs() {
    let root = tempfile::tempdir().unwrap();
    let socket = root.path().join("evod.sock");
    let d = Daemon::start(
        &root.path().join("K"),
        &socket,
        &root.path().join("run.log"),
        &[],
    );
    let ask = |line: &str| -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let answer = ask("{\"op\":\"exec\",\"inputs\":[1e39,0,0,0]}\n");
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not a finite f32"),
        "{answer}"
    );
    let answer = ask("{\"op\":\"exec\",\"inputs\":[]}\n");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no input values"),
        "{answer}"
    );
    let answer = ask("{\"op\":\"exec\",\"inputs\":[0.1,0.2,0.3,0.4]}\n");
    assert_eq!(answer["ok"], true, "{answer}");
    // The CLI refuses the same value with the same check.
    let o = d.client(&["exec", "--input", "1e39,0,0,0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("not a finite f32"));
}

/// Runs `evod run` with `args` (flags), `env` and an optional TOML text on
/// a state folder that does not exist; returns the exit code and stderr,
/// and checks that nothing started (the folder was not created).
fn run_refused(args: &[&str], env: &[(&str, &str)], toml: Option<&str>) -> (Option<i32>, String) {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("state");
    let mut cmd = evod();
    cmd.arg("run").arg("--dir").arg(&state).arg("--no-evolver");
    if let Some(toml) = toml {
        let path = root.path().join("evod.toml");
        std::fs::write(&path, toml).unwrap();
        cmd.arg("--config").arg(&path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.args(args).output().unwrap();
    assert!(
        !state.exists(),
        "{args:?} {env:?}: the state folder was created"
    );
    (o.status.code(), text(&o.stderr))
}

#[test]
fn every_bad_setting_exits_2_naming_it() {
    let flags: &[(&[&str], &str)] = &[
        (&["--population", "0"], "--population"),
        (&["--population", "2"], "--population"),
        (&["--episodes", "0"], "--episodes"),
        (&["--solve-threshold", "NaN"], "--solve-threshold"),
        (&["--solve-threshold", "inf"], "--solve-threshold"),
        (&["--heartbeat-timeout", "0s"], "--heartbeat-timeout"),
        (&["--heartbeat-timeout", "100ms"], "--heartbeat-timeout"),
        (&["--worker-memory-limit", "1"], "--worker-memory-limit"),
        (&["--workers", "0"], "--workers"),
        (&["--workers", "257"], "--workers"),
        (&["--grace-period", "100000h"], "--grace-period"),
        (&["--restart-period", "0s"], "--restart-period"),
        (&["--backoff-max", "0s"], "--backoff-max"),
        (&["--backoff-initial", "3s"], "--backoff-initial"),
        (
            &["--restart-intensity", "4000000000"],
            "--restart-intensity",
        ),
        (&["--fallback-after", "0"], "--fallback-after"),
        (&["--generations", "0"], "--generations"),
        (&["--history", "0"], "--history"),
        (&["--checkpoint-every", "0"], "--checkpoint-every"),
        (&["--pulse-every", "0"], "--pulse-every"),
        (&["--progress-keep", "0"], "--progress-keep"),
        (
            &["--progress-keep", "4000000000000000000"],
            "--progress-keep",
        ),
        (
            &["--eval-timeout-per-candidate=-1"],
            "--eval-timeout-per-candidate",
        ),
        (
            &["--eval-timeout-per-candidate", "NaN"],
            "--eval-timeout-per-candidate",
        ),
        (
            &["--eval-timeout-per-candidate", "1e17"],
            "--eval-timeout-per-candidate",
        ),
        (&["--load-timeout", "1ms"], "--load-timeout"),
        (&["--exec-timeout", "0s"], "--exec-timeout"),
        (&["--eval-timeout", "100000h"], "--eval-timeout"),
    ];
    for (args, flag) in flags {
        let (code, err) = run_refused(args, &[], None);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} not named: {err}");
    }
    // From the environment: the variable is named.
    for (var, value) in [
        ("EVOD_POPULATION", "0"),
        ("EVOD_EPISODES", "0"),
        ("EVOD_HEARTBEAT_TIMEOUT", "0s"),
        ("EVOD_WORKERS", "0"),
        ("EVOD_EVAL_TIMEOUT_PER_CANDIDATE", "-1"),
        ("EVOD_PROGRESS_KEEP", "4000000000000000000"),
        ("EVOD_LOAD_TIMEOUT", "0s"),
    ] {
        let (code, err) = run_refused(&[], &[(var, value)], None);
        assert_eq!(code, Some(2), "{var}: {err}");
        assert!(err.contains(var), "{var} not named: {err}");
    }
    // From the TOML file: the key and the file are named.
    for (toml, key) in [
        ("workers = 0\n", "`workers`"),
        ("worker_memory_limit = \"1K\"\n", "`worker_memory_limit`"),
        ("[evolve]\npopulation = 0\n", "`evolve.population`"),
        (
            "[evolve]\nsolve_threshold = nan\n",
            "`evolve.solve_threshold`",
        ),
        (
            "[evolve]\nmax_relative_change = nan\n",
            "`evolve.max_relative_change`",
        ),
        (
            "[evolve]\nmax_relative_change = -1.0\n",
            "`evolve.max_relative_change`",
        ),
        (
            "[evolve]\neval_timeout_per_candidate = -1.0\n",
            "`evolve.eval_timeout_per_candidate`",
        ),
        (
            "[evolve]\neval_timeout_per_candidate = 1e17\n",
            "`evolve.eval_timeout_per_candidate`",
        ),
        (
            "[evolve]\nprogress_keep = 4000000000000000000\n",
            "`evolve.progress_keep`",
        ),
        ("load_timeout = \"1ms\"\n", "`load_timeout`"),
        ("exec_timeout = \"100000h\"\n", "`exec_timeout`"),
        ("eval_timeout = \"0s\"\n", "`eval_timeout`"),
    ] {
        let (code, err) = run_refused(&[], &[], Some(toml));
        assert_eq!(code, Some(2), "{toml}: {err}");
        assert!(
            err.contains(key) && err.contains("evod.toml"),
            "{toml}: {err}"
        );
    }
}

#[test]
fn a_read_only_state_folder_exits_6() {
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("ro");
    std::fs::create_dir(&state).unwrap();
    // A read-only mount in a private mount namespace (needs root, as in CI).
    let o = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs -o ro tmpfs "$1" && exec "$2" run --dir "$1" --no-evolver --workers 1"#)
        .arg("sh")
        .arg(&state)
        .arg(env!("CARGO_BIN_EXE_evod"))
        .env_remove("EVOD_DIR")
        .env_remove("EVOD_CONTROL_SOCKET")
        .output()
        .expect("running unshare (util-linux) — needs root, as in CI");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(6), "{err}");
    assert!(
        err.contains("is not writable") && err.contains("Read-only file system"),
        "{err}"
    );
}

#[test]
fn a_socket_of_another_user_is_permission_denied_not_no_daemon() {
    let root = tempfile::tempdir().unwrap(); // 0700, owned by root
    let socket = root.path().join("evod.sock");
    let mut d = Daemon::start(
        &root.path().join("K"),
        &socket,
        &root.path().join("run.log"),
        &[],
    );
    // The client as uid 65534 (nobody), which may not reach the socket.
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_evod"))
        .args(["status", "--control-socket"])
        .arg(&socket)
        .env_remove("EVOD_DIR")
        .output()
        .expect("running setpriv (util-linux) — needs root, as in CI");
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(7), "{err}");
    assert!(
        err.contains(&format!(
            "permission denied on {} (the daemon runs as another user?)",
            socket.display()
        )),
        "{err}"
    );
    assert_eq!(d.stop(), Some(0));
}
