//! The control socket's wire protocol and its client (`evod status`,
//! `exec`, `stop`, `rollback`, `wake`, `fault`, and the evolver's `recycle`); the
//! server is `evod-supervisor`'s `control.rs`.
//!
//! Transport: a Unix socket file (an `interprocess` local socket). Protocol:
//! one JSON request line, one JSON response line, then the server closes the
//! connection. Requests are at most [`MAX_REQUEST`] bytes.
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"result":{…StatusReport…}}
//! → {"op":"exec","inputs":[0.1,0.2,0.3,0.4]}
//! ← {"ok":false,"error":"no worker is ready"}
//! ```

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use interprocess::local_socket::prelude::*;
use interprocess::local_socket::{GenericFilePath, Stream};
use serde::{Deserialize, Serialize};

/// The runtime folder inside a daemon's state folder (0700; holds the
/// control socket).
pub const RUNTIME_DIR: &str = ".evod";
/// The control socket's file name inside the runtime folder.
pub const SOCKET_NAME: &str = "control.sock";

/// The control socket of the daemon whose state folder is `dir`.
pub fn default_socket(dir: &Path) -> PathBuf {
    dir.join(RUNTIME_DIR).join(SOCKET_NAME)
}

/// Largest request line accepted, in bytes.
pub const MAX_REQUEST: u64 = 1 << 20;

/// How long the server gives a client to send its whole request line.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// How long the server gives most requests, from accepting the connection
/// to writing the answer (see [`Request::deadline`]).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The deadline of a rollback, which stops the evolver and restarts every
/// worker on the restored file.
pub const ROLLBACK_DEADLINE: Duration = Duration::from_secs(60);

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
    /// Wake a resting (converged) evolver: the supervisor sends it SIGHUP,
    /// as it does on its own SIGHUP.
    Wake,
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
    /// The evolver's counters (at most one a second, from its reporting
    /// thread): the supervisor keeps the last one and serves it as
    /// Prometheus metrics, with its age.
    Report {
        /// The counters.
        report: EvolverReport,
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

impl Request {
    /// The server's whole-request deadline for this request: reading it,
    /// getting the supervisor's answer and writing it back. A client waits
    /// a little longer than this, so that it sees the server's "did not
    /// answer within" error rather than its own timeout.
    pub fn deadline(&self) -> Duration {
        match self {
            Request::Rollback { .. } => ROLLBACK_DEADLINE,
            _ => REQUEST_DEADLINE,
        }
    }
}

/// How much longer than [`Request::deadline`] a client waits, so that it
/// sees the server's own "did not answer within" answer.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(2);

/// Most values one `exec` request may carry.
pub const MAX_EXEC_INPUTS: usize = 65536;

/// Why `exec` inputs were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    /// No values at all.
    #[error("no input values (expected 1 to {MAX_EXEC_INPUTS})")]
    Empty,
    /// More than [`MAX_EXEC_INPUTS`] values.
    #[error("{0} input values (expected 1 to {MAX_EXEC_INPUTS})")]
    TooMany(usize),
    /// A value that is not a number.
    #[error("input value {index} {text:?} is not a number")]
    NotANumber {
        /// Its position, from 0.
        index: usize,
        /// The text.
        text: String,
    },
    /// A value that is NaN or infinite as an f32 (e.g. `1e39`).
    #[error("input value {index} ({value}) is not a finite f32")]
    NotFinite {
        /// Its position, from 0.
        index: usize,
        /// The value as read.
        value: f64,
    },
}

/// Checks `exec` inputs: 1 to [`MAX_EXEC_INPUTS`] finite f32 values. The
/// server applies it to every `exec` request; [`parse_exec_inputs`] (the
/// CLI's parser) ends with it.
pub fn check_exec_inputs(inputs: &[f32]) -> Result<(), InputError> {
    if inputs.is_empty() {
        return Err(InputError::Empty);
    }
    if inputs.len() > MAX_EXEC_INPUTS {
        return Err(InputError::TooMany(inputs.len()));
    }
    match inputs.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(InputError::NotFinite {
            index,
            value: f64::from(inputs[index]),
        }),
        None => Ok(()),
    }
}

/// Parses comma-separated `exec` inputs (`0.1, -2,3e-1`) and checks them
/// with [`check_exec_inputs`]. A value that overflows f32 (`1e39`) is
/// refused, not rounded to infinity.
pub fn parse_exec_inputs(text: &str) -> Result<Vec<f32>, InputError> {
    let mut values = Vec::new();
    for (index, part) in text.split(',').enumerate() {
        let part = part.trim();
        let wide: f64 = part.parse().map_err(|_| InputError::NotANumber {
            index,
            text: part.to_owned(),
        })?;
        let value = wide as f32;
        if !value.is_finite() {
            return Err(InputError::NotFinite { index, value: wide });
        }
        values.push(value);
    }
    check_exec_inputs(&values)?;
    Ok(values)
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
    /// Whether that standby has mapped the model (a perplexity standby:
    /// loaded the base model, its context and the corpus too) and waits,
    /// ready.
    #[serde(default)]
    pub standby_ready: Option<bool>,
    /// Workers that died unasked in this slot and were replaced by one
    /// that answered on the live model (see `last_recovery_us`).
    #[serde(default)]
    pub recoveries: u64,
    /// The last of those recoveries, microseconds: from the supervisor
    /// reaping the dead worker to its replacement (a promoted standby, or a
    /// cold start) answering its first request, a `PING`, while the
    /// supervisor knows it serves the live model file.
    #[serde(default)]
    pub last_recovery_us: Option<f64>,
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
    /// The evolver rests because the run converged (its marker
    /// `state/converged`, see [`crate::rest`]); `None` while it evolves.
    #[serde(default)]
    pub converged: Option<crate::rest::Converged>,
    /// Evaluator hosts of a distributed run (`evod run --broker`), from
    /// the coordinator's last report; empty otherwise.
    #[serde(default)]
    pub hosts: Vec<HostStatus>,
}

/// One evaluator host of a distributed run, as the broker knows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostStatus {
    /// Host id (its consumer name on the broker).
    pub host: String,
    /// Workers it runs.
    pub workers: u32,
    /// Candidate results it recorded (each counted once).
    pub tasks_done: u64,
    /// Seconds since its last heartbeat, by the broker's clock, when the
    /// report was made.
    pub last_seen_s: f64,
}

/// What the evolver reports of its run ([`Request::Report`]). Counters
/// are the evolver's own totals (carried across restarts by its
/// checkpoint), not increments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvolverReport {
    /// Generations completed.
    pub generations: u64,
    /// Candidate evaluations (training and gate).
    pub evaluations: u64,
    /// Episodes those evaluations ran.
    pub episodes: u64,
    /// Models published.
    pub publishes: u64,
    /// Candidates rejected by validation, by reason: `non_finite`,
    /// `shape`, `norm`, `change`, `regression` (gate below the published
    /// fitness).
    pub rejections: Vec<(String, u64)>,
    /// Candidates the workers could not evaluate (quarantined).
    pub quarantined: u64,
    /// Best fitness seen so far.
    pub best_fitness: Option<f64>,
    /// Fitness recorded in the live model file.
    pub published_fitness: Option<f64>,
    /// Generation of the live model file.
    pub published_generation: u64,
    /// Evaluator hosts of a distributed run (empty without a broker).
    pub hosts: Vec<HostStatus>,
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
    /// The socket exists but we may not connect to it (`EACCES`).
    #[error("permission denied on {path} (the daemon runs as another user?)")]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
    },
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {}s on {path}", after.as_secs_f64())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        after: Duration,
    },
    /// The connection broke. (The cause is kept as text: an
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

/// Whether an I/O error is a socket timeout (`EAGAIN` from `SO_RCVTIMEO`
/// shows as `WouldBlock`).
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Sends one request and returns the daemon's result, all within
/// `timeout` (a whole-call deadline, not a per-read one).
pub fn call(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let deadline = std::time::Instant::now() + timeout;
    let io = |e: std::io::Error| {
        if is_timeout(&e) {
            ClientError::Timeout {
                path: path.to_owned(),
                after: timeout,
            }
        } else {
            ClientError::Io {
                path: path.to_owned(),
                message: e.to_string(),
            }
        }
    };
    let name = path
        .to_fs_name::<GenericFilePath>()
        .map_err(|e| ClientError::NoDaemon {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    let stream = Stream::connect(name).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            path: path.to_owned(),
        },
        kind => ClientError::NoDaemon {
            path: path.to_owned(),
            reason: match kind {
                std::io::ErrorKind::NotFound => "no such socket".into(),
                std::io::ErrorKind::ConnectionRefused => "connection refused (stale socket)".into(),
                _ => e.to_string(),
            },
        },
    })?;
    // Each blocking step gets what is left of the deadline.
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut))
    };
    stream
        .set_send_timeout(Some(left().map_err(io)?))
        .map_err(io)?;
    let mut text = serde_json::to_string(request).expect("requests always serialize");
    text.push('\n');
    (&stream).write_all(text.as_bytes()).map_err(io)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_recv_timeout(Some(left().map_err(io)?))
            .map_err(io)?;
        match (&stream).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&chunk[..n]);
                if reply.contains(&b'\n') || reply.len() > 64 << 20 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let line = String::from_utf8_lossy(&reply);
    let line = line.split('\n').next().unwrap_or("");
    if line.is_empty() {
        return Err(ClientError::Protocol {
            path: path.to_owned(),
            problem: "the daemon closed the connection without answering".into(),
        });
    }
    let response: Response = serde_json::from_str(line).map_err(|e| ClientError::Protocol {
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
        assert_eq!(
            serde_json::to_string(&Request::Wake).unwrap(),
            r#"{"op":"wake"}"#
        );
    }

    #[test]
    fn exec_inputs_are_finite_f32_and_bounded() {
        assert_eq!(
            parse_exec_inputs("0.5, -2,3e-1").unwrap(),
            vec![0.5, -2.0, 0.3]
        );
        let err = parse_exec_inputs("1e39").unwrap_err();
        assert!(
            matches!(err, InputError::NotFinite { index: 0, .. }),
            "{err}"
        );
        assert!(matches!(
            parse_exec_inputs("1,x"),
            Err(InputError::NotANumber { index: 1, .. })
        ));
        assert_eq!(
            parse_exec_inputs(""),
            Err(InputError::NotANumber {
                index: 0,
                text: String::new()
            })
        );
        assert_eq!(check_exec_inputs(&[]), Err(InputError::Empty));
        assert!(check_exec_inputs(&[f32::NAN]).is_err());
        assert!(check_exec_inputs(&vec![0.0; MAX_EXEC_INPUTS]).is_ok());
        assert_eq!(
            check_exec_inputs(&vec![0.0; MAX_EXEC_INPUTS + 1]),
            Err(InputError::TooMany(MAX_EXEC_INPUTS + 1))
        );
        // JSON 1e39 becomes infinity as an f32: the server's check sees it.
        let parsed: Request = serde_json::from_str(r#"{"op":"exec","inputs":[1e39]}"#).unwrap();
        let Request::Exec { inputs } = parsed else {
            unreachable!()
        };
        assert!(check_exec_inputs(&inputs).is_err());
    }

    #[test]
    fn a_silent_daemon_is_a_timeout_not_an_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let hold = std::thread::spawn(move || listener.accept().unwrap());
        let started = std::time::Instant::now();
        let err = call(&path, &Request::Status, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("did not answer within 0.3s"), "{text}");
        assert!(!text.contains("os error"), "{text}");
        drop(hold.join().unwrap());
    }
}
