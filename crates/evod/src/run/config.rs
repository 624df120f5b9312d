//! `evod run`'s configuration layers: the optional TOML file, then the
//! resolved [`evod_supervisor::Config`].
//!
//! Precedence, highest first: command-line flag, `EVOD_*` environment
//! variable (both through clap), the TOML file given with `--config`, the
//! built-in default. The TOML file uses the long flag names with `_` for `-`
//! at the top level and an `[evolve]` table for the evolution options:
//!
//! ```toml
//! dir = "/var/lib/evod"
//! workers = 2
//! grace_period = "10s"
//! log_format = "json"
//!
//! [evolve]
//! strategy = "es"
//! population = 64
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use evod_supervisor::LogFormat;
use evod_supervisor::config::{Config, DEFAULT_MODEL, default_socket};
use evod_supervisor::policy::{OnGiveUp, RestartPolicy};
use evod_supervisor::units::{parse_duration, parse_size};
use serde::{Deserialize, Deserializer};

use super::Args;
use super::settings::{Layer, MAX_WORKERS, SettingError, check_layer, check_merged};
use crate::evolver::EvolveArgs;
use crate::exit;

/// A size in the TOML file: a string (`"2G"`) or a number of bytes.
fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Bytes(u64),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Text(t)) => parse_size(&t).map(Some).map_err(serde::de::Error::custom),
        Some(Raw::Bytes(b)) => Ok(Some(b)),
    }
}

/// A duration in the TOML file: a string (`"10s"`) or a number of seconds.
fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Seconds(f64),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Text(t)) => parse_duration(&t)
            .map(Some)
            .map_err(serde::de::Error::custom),
        Some(Raw::Seconds(s)) => Duration::try_from_secs_f64(s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// The `--config` TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--dir`.
    pub dir: Option<PathBuf>,
    /// `--workers`.
    pub workers: Option<usize>,
    /// `--allow-fault-injection`.
    pub allow_fault_injection: Option<bool>,
    /// `--no-evolver`.
    pub no_evolver: Option<bool>,
    /// `--no-standby`.
    pub no_standby: Option<bool>,
    /// `--worker-cmd`.
    pub worker_cmd: Option<String>,
    /// `--worker-memory-limit`.
    #[serde(default, deserialize_with = "de_size")]
    pub worker_memory_limit: Option<u64>,
    /// `--grace-period`.
    #[serde(default, deserialize_with = "de_duration")]
    pub grace_period: Option<Duration>,
    /// `--heartbeat-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_timeout: Option<Duration>,
    /// `--load-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub load_timeout: Option<Duration>,
    /// `--exec-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub exec_timeout: Option<Duration>,
    /// `--eval-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub eval_timeout: Option<Duration>,
    /// `--restart-intensity`.
    pub restart_intensity: Option<u32>,
    /// `--restart-period`.
    #[serde(default, deserialize_with = "de_duration")]
    pub restart_period: Option<Duration>,
    /// `--backoff-initial`.
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_initial: Option<Duration>,
    /// `--backoff-max`.
    #[serde(default, deserialize_with = "de_duration")]
    pub backoff_max: Option<Duration>,
    /// `--on-give-up`.
    pub on_give_up: Option<OnGiveUp>,
    /// `--fallback-after`.
    pub fallback_after: Option<u32>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<String>,
    /// The evolution options.
    #[serde(default)]
    pub evolve: EvolveArgs,
    /// `--broker`.
    pub broker: Option<String>,
    /// `--run-id`.
    pub run_id: Option<String>,
    /// `--host-id`.
    pub host_id: Option<String>,
    /// `--task-lease`.
    #[serde(default, deserialize_with = "de_duration")]
    pub task_lease: Option<Duration>,
    /// `--candidates-per-task`.
    pub candidates_per_task: Option<u32>,
    /// `--lease-ttl`.
    #[serde(default, deserialize_with = "de_duration")]
    pub lease_ttl: Option<Duration>,
    /// `--min-hosts`.
    pub min_hosts: Option<u32>,
    /// `--remote-only`.
    pub remote_only: Option<bool>,
    /// `evod join --base-model` (an evaluator host's copy of a perplexity
    /// run's base model; refused by `evod run`).
    pub base_model: Option<PathBuf>,
    /// `evod join --text` (its copy of the corpus; refused by `evod run`).
    pub text: Option<PathBuf>,
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("bad config file {}: {e}", path.display()))
    }
}

/// The default of `--eval-timeout`: the longest `EVAL` the evolver may
/// legitimately keep a worker busy with — its own deadline (10 s plus
/// `--eval-timeout-per-candidate` per candidate and episode) for the
/// larger of a training batch (`population + 1` candidates over the
/// workers, `--episodes` each) and the gate (one candidate, 100 episodes),
/// never less than [`evod_supervisor::config::DEFAULT_EVAL_TIMEOUT`] and
/// never more than [`super::settings::MAX_DURATION`] (a day).
/// A worker busy that long answers the supervisor only afterwards, so it
/// is not taken for a mute one sooner.
fn longest_eval(evolve: &EvolveArgs, workers: usize) -> Duration {
    let defaults = evod_evolve::EvolverConfig::default();
    let population = evolve.population.unwrap_or(defaults.population as u32);
    let episodes = evolve.episodes.unwrap_or(defaults.episodes).max(1);
    let batch = (population.saturating_add(1)).div_ceil(workers.max(1) as u32);
    let units = batch.saturating_mul(episodes).max(defaults.gate_episodes);
    Duration::from_secs(10)
        .saturating_add(evolve.eval_timeout_per_candidate().saturating_mul(units))
        .max(evod_supervisor::config::DEFAULT_EVAL_TIMEOUT)
        .min(super::settings::MAX_DURATION)
}

/// Merges flags/environment (`args`) over the TOML file over defaults;
/// also returns the evolution options (the default model's seed is one)
/// and the distributed-run options (checked by `dist::DistSettings`).
pub fn resolve(args: Args) -> anyhow::Result<(Config, EvolveArgs, crate::dist::DistArgs)> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let usage = |e: SettingError| exit::with_code(exit::USAGE, e);
    check_layer(&Layer::of_args(&args)).map_err(usage)?;
    if let Some(path) = &args.config {
        check_layer(&Layer::of_file(&file, path)).map_err(usage)?;
    }
    let dir = args.dir.or(file.dir).unwrap_or_else(|| PathBuf::from("."));
    let dir = std::path::absolute(&dir)
        .map_err(|e| anyhow::anyhow!("bad state folder {}: {e}", dir.display()))?;
    let model = dir.join(DEFAULT_MODEL);
    let workers = args.workers.or(file.workers).unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
    });
    let defaults = RestartPolicy::default();
    let policy = RestartPolicy {
        min_uptime: defaults.min_uptime,
        backoff_initial: args
            .backoff_initial
            .or(file.backoff_initial)
            .unwrap_or(defaults.backoff_initial),
        backoff_max: args
            .backoff_max
            .or(file.backoff_max)
            .unwrap_or(defaults.backoff_max),
        intensity: args
            .restart_intensity
            .or(file.restart_intensity)
            .unwrap_or(defaults.intensity),
        period: args
            .restart_period
            .or(file.restart_period)
            .unwrap_or(defaults.period),
        on_give_up: args
            .on_give_up
            .or(file.on_give_up)
            .unwrap_or(defaults.on_give_up),
    };
    let control_socket = args
        .control_socket
        .or(file.control_socket)
        .unwrap_or_else(|| default_socket(&dir));
    let evolve = args.evolve.or(file.evolve);
    // The supervisor's request deadlines (issue 11).
    let load_timeout = args.load_timeout.or(file.load_timeout);
    let exec_timeout = args
        .exec_timeout
        .or(file.exec_timeout)
        .unwrap_or(evod_supervisor::config::DEFAULT_EXEC_TIMEOUT);
    let eval_timeout = args
        .eval_timeout
        .or(file.eval_timeout)
        .unwrap_or_else(|| longest_eval(&evolve, workers));
    let worker_cmd = match (&args.worker_cmd, &file.worker_cmd, &args.config) {
        (Some(cmd), _, _) => Some(super::worker_cmd::resolve(
            cmd,
            &super::settings::Origin::CommandLine.name("worker-cmd", None),
        )),
        (None, Some(cmd), Some(path)) => Some(super::worker_cmd::resolve(
            cmd,
            &super::settings::Origin::File(path).name("worker-cmd", None),
        )),
        _ => None,
    }
    .transpose()
    .map_err(usage)?;
    let config = Config {
        model,
        workers,
        allow_fault_injection: args.allow_fault_injection
            || file.allow_fault_injection.unwrap_or(false),
        poison_one_in: args.poison_one_in.filter(|_| args.allow_fault_injection),
        no_evolver: args.no_evolver || file.no_evolver.unwrap_or(false),
        // A user's program cannot stand by (it knows nothing of the
        // standby link): its workers start cold.
        standby: !(args.no_standby || file.no_standby.unwrap_or(false)) && worker_cmd.is_none(),
        worker_cmd,
        worker_memory_limit: args.worker_memory_limit.or(file.worker_memory_limit),
        grace_period: args
            .grace_period
            .or(file.grace_period)
            .unwrap_or(Duration::from_secs(10)),
        heartbeat_timeout: args
            .heartbeat_timeout
            .or(file.heartbeat_timeout)
            .unwrap_or(Duration::from_secs(5)),
        load_timeout,
        exec_timeout,
        eval_timeout,
        policy,
        fallback_after: args.fallback_after.or(file.fallback_after).unwrap_or(3),
        log_format: args
            .log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Human),
        control_socket,
        metrics_addr: args
            .metrics_addr
            .as_deref()
            .or(file.metrics_addr.as_deref())
            .map(str::parse)
            .transpose()
            .map_err(|e| anyhow::anyhow!("bad --metrics-addr: {e}"))?,
        evolver_args: evolve.to_cli_args(),
        evolver_bounded: evolve.generations.is_some() || evolve.until_solved,
        evolver_role: "evolver",
        evolver_env: Vec::new(),
        // Sized from the model in `run` (`evolver::ring_payload_bytes`).
        payload_bytes: evod_ring::LayoutConfig::default().payload_bytes,
        dir,
    };
    check_merged(&config, &evolve).map_err(usage)?;
    let dist = args.dist.or(crate::dist::DistArgs {
        broker: file.broker,
        run_id: file.run_id,
        host_id: file.host_id,
        task_lease: file.task_lease,
        candidates_per_task: file.candidates_per_task,
        lease_ttl: file.lease_ttl,
        min_hosts: file.min_hosts,
        remote_only: file.remote_only.unwrap_or(false),
    });
    Ok((config, evolve, dist))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evod.toml");
        std::fs::write(
            &path,
            "workers = 3\ngrace_period = \"250ms\"\nrestart_intensity = 7\n\
             [evolve]\npopulation = 12\nseed = 5\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "evod",
            "--config",
            path.to_str().unwrap(),
            "--workers",
            "2",
            "--dir",
            dir.path().to_str().unwrap(),
            "--seed",
            "9",
        ])
        .unwrap();
        let (c, evolve, _) = resolve(cli.args).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.grace_period, Duration::from_millis(250));
        assert_eq!(c.policy.intensity, 7);
        assert_eq!(c.policy.period, Duration::from_secs(60));
        assert_eq!(evolve.population, Some(12));
        assert_eq!(evolve.seed, Some(9));
        assert_eq!(c.model, dir.path().join(DEFAULT_MODEL));
        assert_eq!(
            c.control_socket,
            dir.path().join(".evod").join("control.sock")
        );
    }

    #[test]
    fn distributed_settings_layer_like_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evod.toml");
        std::fs::write(
            &path,
            "broker = \"redis://:pw@db:6379/1\"\nrun_id = \"r1\"\ntask_lease = \"5s\"\n\
             candidates_per_task = 8\nmin_hosts = 2\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "evod",
            "--config",
            path.to_str().unwrap(),
            "--dir",
            dir.path().to_str().unwrap(),
            "--run-id",
            "r2",
        ])
        .unwrap();
        let (_, _, dist) = resolve(cli.args).unwrap();
        assert_eq!(dist.broker.as_deref(), Some("redis://:pw@db:6379/1"));
        assert_eq!(dist.run_id.as_deref(), Some("r2"), "the flag wins");
        assert_eq!(dist.task_lease, Some(Duration::from_secs(5)));
        assert_eq!(dist.candidates_per_task, Some(8));
        assert_eq!(dist.min_hosts, Some(2));
        let s = crate::dist::DistSettings::from_args(&dist)
            .unwrap()
            .unwrap();
        assert_eq!(s.shown_url(), "redis://:***@db:6379/1");
        // The child gets everything but the URL as arguments, the URL in
        // its environment.
        let args: Vec<String> = s
            .to_args()
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(args.contains(&"--run-id=r2".to_owned()), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("pw")), "{args:?}");
        assert_eq!(s.child_env()[0].0, "EVOD_BROKER");
    }

    #[test]
    fn unknown_keys_and_bad_values_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evod.toml");
        std::fs::write(&path, "wrokers = 3\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("evod.toml") && err.contains("wrokers"),
            "{err}"
        );
        std::fs::write(&path, "grace_period = \"soon\"\n").unwrap();
        assert!(FileConfig::load(&path).is_err());
        let missing = dir.path().join("nope.toml");
        let err = FileConfig::load(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn worker_cmd_layers_resolves_and_turns_standbys_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evod.toml");
        std::fs::write(&path, "worker_cmd = \"sh -c 'exit 0' fit\"\n").unwrap();
        let d = dir.path().to_str().unwrap();
        let from_file = |extra: &[&str]| {
            let mut argv = vec!["evod", "--config", path.to_str().unwrap(), "--dir", d];
            argv.extend_from_slice(extra);
            resolve(Cli::try_parse_from(argv).unwrap().args)
        };
        let (c, _, _) = from_file(&[]).unwrap();
        let argv = c.worker_cmd.expect("the file's worker_cmd");
        assert!(argv[0].to_str().unwrap().ends_with("/sh"), "{argv:?}");
        assert_eq!(&argv[1..], ["-c", "exit 0", "fit"]);
        assert!(!c.standby, "a user's program cannot stand by");
        // The flag wins; a missing program names the layer it came from.
        let err = from_file(&["--worker-cmd", "no-such-program-evod-x"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--worker-cmd") && err.contains("not there"),
            "{err}"
        );
        std::fs::write(&path, "worker_cmd = \"\"\n").unwrap();
        let err = from_file(&[]).unwrap_err().to_string();
        assert!(
            err.contains("`worker_cmd` in") && err.contains("(--worker-cmd)"),
            "{err}"
        );
        // Without it: evod's own worker, with standbys.
        std::fs::write(&path, "workers = 1\n").unwrap();
        let (c, _, _) = from_file(&[]).unwrap();
        assert!(c.worker_cmd.is_none() && c.standby);
    }
}
