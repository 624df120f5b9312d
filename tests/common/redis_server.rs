//! A real `redis-server` for tests (Debian package `redis-server`;
//! `.ci/run` installs it): started on a free loopback port in a folder of
//! the test's, with the AOF on and fsynced at every write, so a server
//! SIGKILLed and started again on the same folder has everything it
//! acknowledged. Shared by `crates/evod-broker/tests/redis.rs` and
//! `tests/distributed.rs` (each includes this file with `#[path]`).

#![allow(dead_code)] // Each test file uses a different subset.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evod_broker::{RedisBroker, RedisConfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A `redis-server` child, killed and reaped on drop.
pub struct RedisServer {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a server on `port` with its data in `dir` (and `extra`
    /// arguments, e.g. `--requirepass`), and waits until it answers.
    pub fn start_with(dir: &Path, port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--daemonize", "no", "--logfile", "redis.log"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): install the Debian package \
                     `redis-server` (apt-get install -y redis-server; .ci/run does)"
                )
            });
        let server = Self {
            child,
            port,
            dir: dir.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        server.wait_ready(&server.url());
        server
    }

    /// [`RedisServer::start_with`] without extra arguments.
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, &[])
    }

    /// Waits until `url` (this server) answers PING (or refuses it for want
    /// of a password).
    pub fn wait_ready(&self, url: &str) {
        let mut c = RedisConfig::new(url, "probe", "probe");
        c.io_timeout = Duration::from_secs(2);
        let mut probe = RedisBroker::new(c).expect("valid probe config");
        let end = Instant::now() + Duration::from_secs(20);
        // An answer that refuses us (NOAUTH, a password is set) is an answer.
        while matches!(
            probe.ping(),
            Err(evod_broker::BrokerError::Unavailable { .. })
        ) {
            assert!(
                Instant::now() < end,
                "redis-server on port {} did not answer PING within 20s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, folder and arguments (its AOF
    /// brings back what it had), after [`RedisServer::kill`].
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let fresh = Self::start_with(&self.dir, self.port, &extra);
        let old = std::mem::replace(self, fresh);
        // `old` is dead already; dropping it kills nothing new.
        std::mem::forget(old);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A server in a new temp folder (kept as long as the returned folder).
pub fn start() -> (tempfile::TempDir, RedisServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = RedisServer::start(dir.path(), free_port());
    (dir, server)
}
