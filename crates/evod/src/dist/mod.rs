//! Distributed evaluation over a broker (issue 15): the coordinator and
//! evaluator roles on top of `evod-broker`.
//!
//! - `evod run --broker URL` makes the evolver the run's **coordinator**
//!   ([`Coordination`]): it holds the coordinator lease, publishes the
//!   run's model file once and each generation's bases by hash (the ES
//!   mean and a gated best, or the GA parents), turns every evaluation (a
//!   generation's recipes and its publish gate, one after the other in
//!   the evolver's order) into tasks, and collects the results
//!   in candidate order. Its own workers
//!   take part: while it waits it consumes tasks like any evaluator host
//!   ([`EvalHost`] over its ring), under its host id.
//! - `evod join URL` ([`join`]) makes a host an **evaluator**: a
//!   supervisor with its workers whose evolver slot runs the hidden
//!   `evod feeder` role ([`feeder`]), an [`EvalHost`] feeding the workers
//!   tasks from the broker.
//!
//! Broker "generations" are evaluation rounds, each named by a hash of
//! what it evaluates (see [`coordinator`]). The protocol itself is in
//! `docs/distributed.md`.

use std::ffi::OsString;
use std::time::Duration;

use evod_broker::{BrokerError, RedisBroker, RedisConfig, redact_url, wire::check_name};
use evod_supervisor::units::parse_duration;
use serde::{Deserialize, Deserializer};

use crate::exit;

mod coordinator;
pub mod feeder;
mod host;
pub mod join;

pub use coordinator::Coordination;
pub use host::EvalHost;

/// Default run id on the broker.
pub const DEFAULT_RUN_ID: &str = "evod";
/// Default candidates per task (the measured sweet spot: ≤ 200 bytes and
/// ≤ 10 µs of broker work per candidate, see `docs/distributed.md`).
pub const DEFAULT_CANDIDATES_PER_TASK: u32 = 16;
/// Default task lease.
pub const DEFAULT_TASK_LEASE: Duration = Duration::from_secs(30);
/// Default coordinator lease time to live.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest and longest `--task-lease` and `--lease-ttl`.
pub const TASK_LEASE_RANGE: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(24 * 3600));
/// The environment variable of `--broker` (also how the URL reaches the
/// evolver or feeder: never on a command line, where any local user could
/// read its password).
pub const BROKER_ENV: &str = "EVOD_BROKER";

/// A duration in the TOML file: a string such as `"10s"`.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(t) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The distributed-run options of `evod run` and `evod join` (and of the
/// evolver and feeder roles, which get them back as arguments; the URL
/// through `EVOD_BROKER`). Top-level keys of the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct DistArgs {
    /// Coordinate a distributed run through this Redis broker:
    /// redis://[user:password@]host:port/db (either strategy). Prefer
    /// EVOD_BROKER or the TOML file for a URL with a password.
    #[arg(long, env = BROKER_ENV, hide_env_values = true, value_name = "URL")]
    pub broker: Option<String>,
    /// Run id on the broker: the coordinator's and its evaluators' common
    /// name, `[A-Za-z0-9._-]{1,64}` [default: evod].
    #[arg(long, env = "EVOD_RUN_ID", value_name = "ID")]
    pub run_id: Option<String>,
    /// This host's id on the broker (its consumer name; unique per host)
    /// [default: the host name].
    #[arg(long, env = "EVOD_HOST_ID", value_name = "ID")]
    pub host_id: Option<String>,
    /// A task not acknowledged or extended this long is taken over by
    /// another evaluator [default: 30s].
    #[arg(long, env = "EVOD_TASK_LEASE", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "de_duration")]
    pub task_lease: Option<Duration>,
    /// Candidates per task (1..=255) [default: 16].
    #[arg(long, env = "EVOD_CANDIDATES_PER_TASK", value_name = "N")]
    pub candidates_per_task: Option<u32>,
    /// Time to live of the coordinator lease: a second coordinator of the
    /// run takes over this long after the first stops renewing it
    /// [default: 10s].
    #[arg(long, env = "EVOD_LEASE_TTL", value_parser = parse_duration, value_name = "DURATION")]
    #[serde(default, deserialize_with = "de_duration")]
    pub lease_ttl: Option<Duration>,
    /// The coordinator starts evolving once this many evaluator hosts
    /// (besides itself) heartbeat, so a run starts on the hosts it was
    /// planned for [default: 0].
    #[arg(long, env = "EVOD_MIN_HOSTS", value_name = "N")]
    pub min_hosts: Option<u32>,
    /// The coordinator's own workers take no tasks: every evaluation runs
    /// on evaluator hosts (they only serve the live model).
    #[arg(long, env = "EVOD_REMOTE_ONLY")]
    #[serde(default)]
    pub remote_only: bool,
}

impl DistArgs {
    /// `self` over `other` (flags and variables over the TOML file).
    pub fn or(self, other: DistArgs) -> DistArgs {
        DistArgs {
            broker: self.broker.or(other.broker),
            run_id: self.run_id.or(other.run_id),
            host_id: self.host_id.or(other.host_id),
            task_lease: self.task_lease.or(other.task_lease),
            candidates_per_task: self.candidates_per_task.or(other.candidates_per_task),
            lease_ttl: self.lease_ttl.or(other.lease_ttl),
            min_hosts: self.min_hosts.or(other.min_hosts),
            remote_only: self.remote_only || other.remote_only,
        }
    }

    /// The arguments that give the evolver or feeder these options (all
    /// but the URL, which goes through [`BROKER_ENV`]).
    pub fn to_cli_args(&self) -> Vec<OsString> {
        let mut out = Vec::new();
        let mut push = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                out.push(format!("{flag}={v}").into());
            }
        };
        push("--run-id", self.run_id.clone());
        push("--host-id", self.host_id.clone());
        push(
            "--task-lease",
            self.task_lease.map(|d| format!("{}us", d.as_micros())),
        );
        push(
            "--candidates-per-task",
            self.candidates_per_task.map(|n| n.to_string()),
        );
        push(
            "--lease-ttl",
            self.lease_ttl.map(|d| format!("{}us", d.as_micros())),
        );
        push("--min-hosts", self.min_hosts.map(|n| n.to_string()));
        if self.remote_only {
            out.push("--remote-only".into());
        }
        out
    }
}

/// Checked distributed settings.
#[derive(Debug, Clone)]
pub struct DistSettings {
    /// Broker URL (may hold a password: log [`DistSettings::shown_url`]).
    pub url: String,
    /// Run id.
    pub run: String,
    /// This host's id.
    pub host: String,
    /// Task lease.
    pub task_lease: Duration,
    /// Candidates per task.
    pub per_task: usize,
    /// Coordinator lease time to live.
    pub lease_ttl: Duration,
    /// Evaluator hosts to wait for before the first generation.
    pub min_hosts: u32,
    /// The coordinator's workers take no tasks.
    pub remote_only: bool,
}

impl DistSettings {
    /// Checks `args` (exit 2 naming the flag); `None` without a broker.
    pub fn from_args(args: &DistArgs) -> anyhow::Result<Option<DistSettings>> {
        let Some(url) = args.broker.clone() else {
            return Ok(None);
        };
        let usage = |flag: &str, e: String| {
            exit::with_code(exit::USAGE, anyhow::anyhow!("bad --{flag}: {e}"))
        };
        let run = args
            .run_id
            .clone()
            .unwrap_or_else(|| DEFAULT_RUN_ID.to_owned());
        check_name("setting", "run id", &run).map_err(|e| usage("run-id", e.to_string()))?;
        let host = match &args.host_id {
            Some(h) => h.clone(),
            None => default_host_id(),
        };
        check_name("setting", "host id", &host).map_err(|e| usage("host-id", e.to_string()))?;
        let task_lease = args.task_lease.unwrap_or(DEFAULT_TASK_LEASE);
        if task_lease < TASK_LEASE_RANGE.0 || task_lease > TASK_LEASE_RANGE.1 {
            return Err(usage(
                "task-lease",
                format!("{task_lease:?}: expected 100ms to 24h"),
            ));
        }
        let per_task = args
            .candidates_per_task
            .unwrap_or(DEFAULT_CANDIDATES_PER_TASK);
        if !(1..=evod_broker::wire::MAX_TASK_CANDIDATES as u32).contains(&per_task) {
            return Err(usage(
                "candidates-per-task",
                format!("{per_task}: expected 1 to 255"),
            ));
        }
        let lease_ttl = args.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < TASK_LEASE_RANGE.0 || lease_ttl > TASK_LEASE_RANGE.1 {
            return Err(usage(
                "lease-ttl",
                format!("{lease_ttl:?}: expected 100ms to 24h"),
            ));
        }
        let settings = DistSettings {
            url,
            run,
            host,
            task_lease,
            per_task: per_task as usize,
            lease_ttl,
            min_hosts: args.min_hosts.unwrap_or(0),
            remote_only: args.remote_only,
        };
        // A URL the client cannot parse is refused now, by name.
        settings.broker("")?;
        Ok(Some(settings))
    }

    /// These settings as arguments (the resolved host id included, so the
    /// child uses the very one checked here).
    pub fn to_args(&self) -> DistArgs {
        DistArgs {
            broker: None,
            run_id: Some(self.run.clone()),
            host_id: Some(self.host.clone()),
            task_lease: Some(self.task_lease),
            candidates_per_task: Some(self.per_task as u32),
            lease_ttl: Some(self.lease_ttl),
            min_hosts: Some(self.min_hosts),
            remote_only: self.remote_only,
        }
    }

    /// The evolver's or feeder's added environment: the URL.
    pub fn child_env(&self) -> Vec<(OsString, OsString)> {
        vec![(BROKER_ENV.into(), self.url.clone().into())]
    }

    /// The URL with its password hidden.
    pub fn shown_url(&self) -> String {
        redact_url(&self.url)
    }

    /// A broker connection (lazy) whose consumer name is this host's id
    /// with `suffix` (`""`: the host id itself).
    pub fn broker(&self, suffix: &str) -> anyhow::Result<RedisBroker> {
        let consumer = if suffix.is_empty() {
            self.host.clone()
        } else {
            format!("{}.{suffix}", self.host)
        };
        let mut config = RedisConfig::new(&self.url, &self.run, &consumer);
        config.task_lease = self.task_lease;
        RedisBroker::new(config).map_err(|e| {
            exit::with_code(
                exit::USAGE,
                anyhow::anyhow!("bad --broker {}: {e}", self.shown_url()),
            )
        })
    }

    /// Checks at start that the broker answers and accepts us: a refusal
    /// (authentication, a wrong database) is exit 2 naming `--broker`; a
    /// broker that is not reachable now is only a warning (the roles retry
    /// with backoff).
    pub fn check_reachable(&self) -> anyhow::Result<()> {
        let mut broker = self.broker("")?;
        match broker.ping() {
            Ok(()) => Ok(()),
            Err(e @ BrokerError::Unavailable { .. }) => {
                tracing::warn!(
                    "broker {} is not reachable now ({e}); retrying with backoff",
                    self.shown_url()
                );
                Ok(())
            }
            Err(e) => Err(exit::with_code(
                exit::USAGE,
                anyhow::anyhow!("--broker {}: {e}", self.shown_url()),
            )),
        }
    }
}

/// Removes `EVOD_BROKER` from this process's environment (clap has read
/// it), so that no child inherits the URL and its password: the evolver
/// or feeder gets it back through `Config::evolver_env`, the workers
/// (untrusted, maybe a user's program) never see it. Call first thing in
/// `evod run` and `evod join`, before any thread exists.
pub fn scrub_broker_env() {
    if std::env::var_os(BROKER_ENV).is_some() {
        // SAFETY: called at the start of `evod run` / `evod join`, before
        // logging is set up or any thread or child is started, so no other
        // thread reads or writes the environment meanwhile.
        unsafe { std::env::remove_var(BROKER_ENV) };
    }
}

/// This machine's host name as a broker name: `[A-Za-z0-9._-]`, at most
/// 64 characters (`host` if it has none).
pub fn default_host_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if id.is_empty() { "host".into() } else { id }
}

/// Calls `op` until it succeeds or fails with anything but
/// [`BrokerError::Unavailable`], logging each retry (a broker that is gone
/// is reported, never a silent stall) and stopping early when `stop` is
/// set (then the last error is returned).
pub fn retry_logged<T>(
    what: &str,
    url: &str,
    stop: &std::sync::atomic::AtomicBool,
    mut op: impl FnMut() -> Result<T, BrokerError>,
) -> Result<T, BrokerError> {
    let mut backoff = evod_broker::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut tries = 0u64;
    loop {
        let slice = std::time::Instant::now() + Duration::from_millis(500);
        let r = evod_broker::retry_unavailable(
            slice,
            &mut backoff,
            |e, delay| {
                tries += 1;
                // The first retries, then one line in ten: visible, not a flood.
                if tries <= 3 || tries.is_multiple_of(10) {
                    // `e` names the URL (password hidden) and the error.
                    tracing::warn!("{what}: {e}; retrying in {delay:?}");
                }
            },
            &mut op,
        );
        match r {
            Err(e @ BrokerError::Unavailable { .. }) => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(e);
                }
            }
            other => {
                if tries > 0 {
                    tracing::info!("broker {url}: {what}: reachable again");
                }
                return other;
            }
        }
    }
}
