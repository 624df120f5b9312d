//! The control socket: wire protocol, server (in the supervisor) and client
//! (`evod status`, `exec`, `stop`, `rollback`).
//!
//! Transport: an `interprocess` local socket (a Unix socket file), mode 0600,
//! in a runtime folder that must belong to us with no group or other access
//! (created 0700). The server checks each peer's uid (`SO_PEERCRED`) against
//! its own and closes the connection on a mismatch.
//!
//! Protocol: one JSON request line, one JSON response line, then the server
//! closes the connection. Requests are at most [`MAX_REQUEST`] bytes.
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"result":{…StatusReport…}}
//! → {"op":"exec","inputs":[0.1,0.2,0.3,0.4]}
//! ← {"ok":false,"error":"no worker is ready"}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, Stream};
use interprocess::os::unix::local_socket::ListenerOptionsExt;
use serde::{Deserialize, Serialize};

/// Largest request line accepted, in bytes.
pub const MAX_REQUEST: u64 = 1 << 20;
/// How long the server waits for a client to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's state ([`StatusReport`]).
    Status,
    /// Run the live model on one input row (`NEURAL_EXEC`).
    Exec {
        /// The input values.
        inputs: Vec<f32>,
    },
    /// Stop gracefully.
    Stop,
    /// Restore an earlier generation (the previous good one by default).
    Rollback {
        /// The generation to restore.
        to: Option<u64>,
    },
    /// Replace a worker that misbehaves without crashing (the evolver found
    /// its ring corrupt or its replies malformed): SIGKILL, then the usual
    /// restart. Any client of the socket may ask; it has the daemon's uid.
    Recycle {
        /// The worker's index.
        worker: usize,
        /// The epoch of the incarnation that misbehaved: a worker already
        /// replaced since is left alone.
        epoch: u64,
        /// Why, in words (logged and shown as the exit's cause).
        reason: String,
    },
    /// Inject a fault into a worker (`evod fault`; refused unless the
    /// daemon runs with `--allow-fault-injection`).
    Fault {
        /// The worker's index.
        worker: usize,
        /// `segv`, `abort`, `hang`, `scribble`, `lie`, `exit` or `exit:N`.
        kind: String,
    },
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success carrying `result`.
    pub fn ok(result: impl Serialize) -> Response {
        Response {
            ok: true,
            result: Some(serde_json::to_value(result).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }

    /// A failure.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// One child as `evod status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// `worker` or `evolver`.
    pub role: String,
    /// Index among children of the same role.
    pub index: usize,
    /// `running`, `starting`, `restarting` or `stopped`.
    pub state: String,
    /// Pid, while running.
    pub pid: Option<u32>,
    /// Seconds since this incarnation started.
    pub uptime_s: Option<f64>,
    /// Restarts so far.
    pub restarts: u64,
    /// How the previous incarnation ended, in words.
    pub last_exit: Option<String>,
    /// The worker segment's epoch (workers only).
    pub epoch: Option<u64>,
    /// Model generation the worker has loaded.
    pub generation: Option<u64>,
    /// Last control-channel PING round trip, microseconds.
    pub ping_us: Option<f64>,
    /// Seconds since the last heartbeat moved (workers only).
    pub heartbeat_age_s: Option<f64>,
    /// Ring and worker statistics (workers only), as reported by the ring.
    pub stats: Option<serde_json::Value>,
    /// Pid of the warm standby that replaces this worker if it dies.
    #[serde(default)]
    pub standby_pid: Option<u32>,
    /// Whether that standby has mapped the model and waits, ready.
    #[serde(default)]
    pub standby_ready: Option<bool>,
}

/// The answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The supervisor's pid.
    pub pid: u32,
    /// Seconds since the supervisor started.
    pub uptime_s: f64,
    /// State folder.
    pub dir: String,
    /// Live model file.
    pub model: String,
    /// Generation in the model file, as last read by a worker.
    pub generation: Option<u64>,
    /// Whether a graceful stop is under way.
    pub stopping: bool,
    /// Whether every worker is running and answering.
    pub healthy: bool,
    /// Rollbacks performed by the fallback so far.
    pub rollbacks: u64,
    /// Newest generation a worker loaded and answered the supervisor's
    /// canary `NEURAL_EXEC` on (the fallback's "last good" generation).
    #[serde(default)]
    pub good_generation: Option<u64>,
    /// Every child.
    pub children: Vec<ChildStatus>,
}

/// A request delivered to the supervisor's event loop, with its reply slot.
#[derive(Debug)]
pub struct Incoming {
    /// The request.
    pub request: Request,
    /// Where the event loop sends the response.
    pub reply: mpsc::Sender<Response>,
}

/// Errors of the runtime folder and control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The runtime folder is unsafe or unusable.
    #[error("runtime folder {path}: {problem}")]
    RuntimeDir {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// Another daemon answers on the socket.
    #[error("another evod daemon is already running on {0}")]
    AlreadyRunning(PathBuf),
    /// Binding or another socket operation failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Errors of a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "no evod daemon is running (nothing answers on {path}: {reason}); start one with `evod run`"
    )]
    NoDaemon {
        /// The socket tried.
        path: PathBuf,
        /// Why the connection failed.
        reason: String,
    },
    /// The connection broke or timed out. (The cause is kept as text: an
    /// `io::Error` in the chain would make `main` take a broken pipe to the
    /// daemon for a closed stdout.)
    #[error("control socket {path}: {message}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The daemon answered something that is not a response.
    #[error("control socket {path}: bad response: {problem}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The daemon refused or failed the request.
    #[error("the daemon says: {0}")]
    Daemon(String),
}

/// Creates (0700) or checks the folder that holds the socket: it must be a
/// real folder owned by us with no group or other permissions.
pub fn prepare_runtime_dir(dir: &Path) -> Result<(), ControlError> {
    let bad = |problem: String| ControlError::RuntimeDir {
        path: dir.to_owned(),
        problem,
    };
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(bad(format!("cannot create: {e}"))),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a folder (a symlink or file is in the way)".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(bad(format!(
            "owned by uid {}, not by us (uid {uid})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| bad(format!("cannot set mode 0700: {e}")))?;
    }
    Ok(())
}

/// The listening side, owned by the supervisor.
pub struct ControlServer {
    path: PathBuf,
    inode: (u64, u64),
}

impl ControlServer {
    /// Binds `path` and serves it on a thread that forwards each request to
    /// `events` (wrapped by `wrap`) and writes back the reply.
    pub fn start<E: Send + 'static>(
        path: &Path,
        events: mpsc::Sender<E>,
        wrap: fn(Incoming) -> E,
    ) -> Result<ControlServer, ControlError> {
        let io = |source| ControlError::Io {
            path: path.to_owned(),
            source,
        };
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        prepare_runtime_dir(parent)?;
        if std::fs::symlink_metadata(path).is_ok() {
            // A socket left by a SIGKILLed daemon, or a live daemon?
            // Anything but "nobody listens" means a live daemon owns it.
            if !matches!(
                call(path, &Request::Status, Duration::from_secs(2)),
                Err(ClientError::NoDaemon { .. })
            ) {
                return Err(ControlError::AlreadyRunning(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        let name = path.to_fs_name::<GenericFilePath>().map_err(io)?;
        let mut listener = ListenerOptions::new()
            .name(name)
            .mode(0o600)
            .create_sync()
            .map_err(io)?;
        listener.do_not_reclaim_name_on_drop();
        let meta = std::fs::symlink_metadata(path).map_err(io)?;
        let my_uid = nix::unistd::geteuid().as_raw();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => serve(stream, my_uid, &events, wrap),
                        Err(e) => tracing::warn!("control socket: accept failed: {e}"),
                    }
                }
            })
            .map_err(io)?;
        Ok(ControlServer {
            path: path.to_owned(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the socket file, for the janitor.
    pub fn inode(&self) -> (u64, u64) {
        self.inode
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        remove_socket(&self.path, self.inode);
    }
}

/// Removes the socket at `path` if it is still ours (same device and inode),
/// then its folder if that is now empty.
pub fn remove_socket(path: &Path, inode: (u64, u64)) {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && (meta.dev(), meta.ino()) == inode
    {
        let _ = std::fs::remove_file(path);
        if let Some(parent) = path.parent() {
            // Fails (harmlessly) unless empty.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// The peer's effective uid (`SO_PEERCRED`). Read directly rather than
/// through `interprocess`' `peer_creds`, which fails for a peer in another
/// PID namespace (the kernel reports its pid as 0), e.g. `evod status` run
/// from the host against a daemon that is PID 1 in a container.
fn peer_uid(stream: &Stream) -> std::io::Result<u32> {
    use std::os::fd::AsFd;
    #[allow(unreachable_patterns)]
    let fd = match stream {
        Stream::UdSocket(s) => s.as_fd(),
        _ => return Err(std::io::Error::other("not a Unix socket")),
    };
    let creds = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(creds.uid())
}

fn serve<E>(stream: Stream, my_uid: u32, events: &mpsc::Sender<E>, wrap: fn(Incoming) -> E) {
    match peer_uid(&stream) {
        Ok(uid) if uid == my_uid => {}
        Ok(other) => {
            tracing::warn!(
                "control socket: refused a client with uid {other:?} (ours is {my_uid})"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: cannot read peer credentials: {e}");
            return;
        }
    }
    let _ = stream.set_recv_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_send_timeout(Some(REQUEST_TIMEOUT));
    let mut reader = BufReader::new(&stream).take(MAX_REQUEST);
    let mut line = String::new();
    let response = match reader.read_line(&mut line) {
        Ok(0) => return,
        Ok(_) if !line.ends_with('\n') => Response::error(format!(
            "request longer than {MAX_REQUEST} bytes or unterminated"
        )),
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (tx, rx) = mpsc::channel();
                if events.send(wrap(Incoming { request, reply: tx })).is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    rx.recv()
                        .unwrap_or_else(|_| Response::error("the daemon dropped the request"))
                }
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        },
        Err(e) => {
            tracing::debug!("control socket: reading a request failed: {e}");
            return;
        }
    };
    let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
}

/// Sends one request and returns the daemon's result.
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let io = |e: std::io::Error| ClientError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| ClientError::NoDaemon {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let stream = Stream::connect(name).map_err(|e| ClientError::NoDaemon {
        path: path.to_owned(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => "no such socket".into(),
            std::io::ErrorKind::ConnectionRefused => "connection refused (stale socket)".into(),
            _ => e.to_string(),
        },
    })?;
    stream.set_recv_timeout(Some(timeout)).map_err(io)?;
    stream.set_send_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_string(request).expect("requests always serialize");
    text.push('\n');
    (&stream).write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&stream)
        .take(64 << 20)
        .read_line(&mut line)
        .map_err(io)?;
    if line.is_empty() {
        return Err(ClientError::Protocol {
            path: path.to_owned(),
            problem: "the daemon closed the connection without answering".into(),
        });
    }
    let response: Response = serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
        path: path.to_owned(),
        problem: e.to_string(),
    })?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Daemon(
            response.error.unwrap_or_else(|| "unknown error".into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_json_form() {
        let text = serde_json::to_string(&Request::Rollback { to: Some(4) }).unwrap();
        assert_eq!(text, r#"{"op":"rollback","to":4}"#);
        let parsed: Request = serde_json::from_str(r#"{"op":"exec","inputs":[0.5,1]}"#).unwrap();
        assert_eq!(
            parsed,
            Request::Exec {
                inputs: vec![0.5, 1.0]
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn server_answers_checks_permissions_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("rt");
        let path = runtime.join("control.sock");
        let (tx, rx) = mpsc::channel::<Incoming>();
        let server = ControlServer::start(&path, tx, |i| i).unwrap();
        let answer = std::thread::spawn(move || {
            let incoming = rx.recv().unwrap();
            assert_eq!(incoming.request, Request::Stop);
            incoming.reply.send(Response::ok("stopping")).unwrap();
            let incoming = rx.recv().unwrap();
            incoming
                .reply
                .send(Response::error("no such generation"))
                .unwrap();
        });
        assert_eq!(
            call(&path, &Request::Stop, Duration::from_secs(5)).unwrap(),
            serde_json::json!("stopping")
        );
        let err = call(
            &path,
            &Request::Rollback { to: Some(9) },
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Daemon(ref m) if m == "no such generation"));
        answer.join().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&runtime), 0o700);
        assert_eq!(mode(&path), 0o600);
        // A second server on the same socket sees the first one.
        let (tx2, _rx2) = mpsc::channel::<Incoming>();
        assert!(matches!(
            ControlServer::start(&path, tx2, |i| i),
            Err(ControlError::AlreadyRunning(_))
        ));
        assert!(path.exists(), "the live daemon's socket was removed");
        drop(server);
        assert!(!runtime.exists(), "runtime folder left behind");
        let err = call(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ClientError::NoDaemon { .. }), "{err}");
        assert!(err.to_string().contains("no evod daemon is running"));
    }

    #[test]
    fn a_runtime_dir_that_is_a_symlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("rt");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let err = prepare_runtime_dir(&link).unwrap_err().to_string();
        assert!(err.contains("not a folder"), "{err}");
    }
}
