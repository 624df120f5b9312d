//! The resolved configuration of the supervisor ([`Config`]): every
//! setting with its default applied. The `evod` binary builds it from its
//! flags, `EVOD_*` variables and the TOML file (its `run/config.rs`); nothing
//! here knows about the command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::policy::RestartPolicy;
use crate::process::LogFormat;

pub use evod_store::MODEL_FILE as DEFAULT_MODEL;
pub use evod_wire::control::{RUNTIME_DIR, SOCKET_NAME, default_socket};

/// Default of [`Config::exec_timeout`].
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`Config::eval_timeout`].
pub const DEFAULT_EVAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests of the supervisor in a row a worker may leave unanswered
/// (timeouts) before it is replaced (see [`Config::eval_timeout`]).
pub const UNANSWERED_IN_ROW: u32 = 3;

/// Everything `evod run` needs, with defaults applied.
#[derive(Debug, Clone)]
pub struct Config {
    /// State folder (model, history, runtime folder).
    pub dir: PathBuf,
    /// The live model file.
    pub model: PathBuf,
    /// Number of workers.
    pub workers: usize,
    /// Whether workers honour fault-injection opcodes and `evod.fault`.
    pub allow_fault_injection: bool,
    /// Workers crash on every candidate whose FNV-1a hash is divisible by this
    /// (fault injection only).
    pub poison_one_in: Option<u64>,
    /// Run without an evolver (serve the model only).
    pub no_evolver: bool,
    /// The user's worker program (`--worker-cmd`): the resolved program
    /// path, then its arguments. Started instead of `evod worker` in every
    /// worker slot, with `--ring-fd N --model PATH` appended and
    /// `EVOD_RING_FD`, `EVOD_MODEL` set; never a standby, never given
    /// `--allow-fault-injection`.
    pub worker_cmd: Option<Vec<OsString>>,
    /// Keep a warm standby next to each worker (see `standby.rs`).
    pub standby: bool,
    /// `RLIMIT_DATA` of each worker, bytes.
    pub worker_memory_limit: Option<u64>,
    /// How long a graceful stop may take before SIGKILL.
    pub grace_period: Duration,
    /// A worker whose heartbeat does not move for this long is killed.
    pub heartbeat_timeout: Duration,
    /// Deadline of a `LOAD` (`None`: scaled from the model's size, see
    /// [`Config::load_timeout_for`]).
    pub load_timeout: Option<Duration>,
    /// Deadline of a `NEURAL_EXEC` (`evod exec` and the canary).
    pub exec_timeout: Duration,
    /// The longest `EVAL` a worker may legitimately be busy with (by
    /// default the evolver's own deadline for its largest request, computed
    /// by `evod run`). A worker busy with an `EVAL` answers the supervisor
    /// only after it, so a worker is declared unresponsive only after
    /// [`UNANSWERED_IN_ROW`] timeouts in a row spanning at least this.
    pub eval_timeout: Duration,
    /// Restart policy of every child.
    pub policy: RestartPolicy,
    /// Quick worker crashes after a new generation that trigger a rollback.
    pub fallback_after: u32,
    /// Log output format.
    pub log_format: LogFormat,
    /// The control socket.
    pub control_socket: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` over HTTP
    /// (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The evolution options, as the evolver's command-line arguments
    /// (passed through unread).
    pub evolver_args: Vec<OsString>,
    /// Whether the evolver stops by itself (a generation bound or
    /// `--until-solved`): its exit 0 then stops the daemon.
    pub evolver_bounded: bool,
    /// The hidden role subcommand of the evolver's slot: `evolver`, or
    /// `feeder` on an evaluator host of a distributed run (`evod join`),
    /// which feeds the workers tasks from the broker instead of evolving.
    pub evolver_role: &'static str,
    /// Variables added to the evolver's (or feeder's) environment: the
    /// settings kept off its command line (`EVOD_BROKER`).
    pub evolver_env: Vec<(OsString, OsString)>,
    /// Payload bytes per channel and direction of each worker's ring,
    /// sized from the model by the caller (`evod run`).
    pub payload_bytes: usize,
}

impl Config {
    /// The `LOAD` deadline for a model file of `bytes`: the setting, or 5 s
    /// plus 1 s per 64 MiB (a worker reads and checks the whole file).
    pub fn load_timeout_for(&self, bytes: u64) -> Duration {
        self.load_timeout.unwrap_or_else(|| {
            Duration::from_secs(5).saturating_add(Duration::from_secs(bytes >> 26))
        })
    }

    /// How long the supervisor's own `LOAD` of a file of `bytes` may take:
    /// [`Config::load_timeout_for`] plus [`Config::eval_timeout`], as the
    /// worker serves one request at a time and takes the `LOAD` only after
    /// the `EVAL` it may be busy with. (It runs on the worker's link
    /// thread, off the loop: a long wait holds up only that worker's
    /// control queue.)
    pub fn sync_load_timeout(&self, bytes: u64) -> Duration {
        self.load_timeout_for(bytes)
            .saturating_add(self.eval_timeout)
    }

    /// How long the supervisor's canary `NEURAL_EXEC` may take:
    /// [`Config::exec_timeout`] plus [`Config::eval_timeout`] (see
    /// [`Config::sync_load_timeout`]), so that a model whose `EVAL`s are
    /// slower than `--exec-timeout` still gets verified.
    pub fn canary_timeout(&self) -> Duration {
        self.exec_timeout.saturating_add(self.eval_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(exec: Duration, eval: Duration, load: Option<Duration>) -> Config {
        Config {
            dir: PathBuf::from("/tmp/evod-test"),
            model: PathBuf::from("/tmp/evod-test/model.gguf"),
            workers: 1,
            allow_fault_injection: false,
            poison_one_in: None,
            no_evolver: true,
            worker_cmd: None,
            standby: false,
            worker_memory_limit: None,
            grace_period: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(5),
            load_timeout: load,
            exec_timeout: exec,
            eval_timeout: eval,
            policy: RestartPolicy::default(),
            fallback_after: 3,
            log_format: LogFormat::Human,
            control_socket: PathBuf::from("/tmp/evod-test/evod.sock"),
            metrics_addr: None,
            evolver_args: Vec::new(),
            evolver_bounded: false,
            evolver_role: "evolver",
            evolver_env: Vec::new(),
            payload_bytes: 1 << 20,
        }
    }

    #[test]
    fn the_canary_and_load_outwait_the_longest_eval() {
        // EVALs of a big model take longer than --exec-timeout: the
        // supervisor's own calls, queued behind one, must still succeed.
        let c = config(
            Duration::from_secs(5),
            Duration::from_secs(120),
            Some(Duration::from_secs(7)),
        );
        assert_eq!(c.canary_timeout(), Duration::from_secs(125));
        assert_eq!(c.sync_load_timeout(0), Duration::from_secs(127));
        // `evod exec` keeps its own deadline.
        assert_eq!(c.exec_timeout, Duration::from_secs(5));
        // The largest settings do not overflow.
        let huge = config(Duration::MAX, Duration::MAX, None);
        assert_eq!(huge.canary_timeout(), Duration::MAX);
        assert_eq!(huge.sync_load_timeout(u64::MAX), Duration::MAX);
    }
}
