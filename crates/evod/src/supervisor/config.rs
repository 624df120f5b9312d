//! Configuration of `evod run`: the optional TOML file, duration values, and
//! the resolved [`Config`].
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

use serde::{Deserialize, Deserializer};

use super::policy::{OnGiveUp, RestartPolicy};
use crate::run::{Args, EvolveArgs, LogFormat};

/// The name of the model file inside the state folder.
pub const DEFAULT_MODEL: &str = "vectorland.gguf";
/// The runtime folder inside the state folder (0700; holds the control socket).
pub const RUNTIME_DIR: &str = ".evod";
/// The control socket's file name inside the runtime folder.
pub const SOCKET_NAME: &str = "control.sock";

/// Splits `text` (trimmed) into its leading number and the unit after it;
/// `None` if it does not start with a number.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// Parses a duration: `250ms`, `10s`, `2m`, `1.5s`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("bad duration {text:?}: expected e.g. 250ms, 10s, 2m"))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "bad duration unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("bad duration {text:?}: {e}"))
}

/// Parses a size in bytes: `512M`, `2G`, `64MiB`, `1.5G`, or a bare number
/// of bytes (binary multiples: K = 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (value, unit) = number_and_unit(text)
        .ok_or_else(|| format!("bad size {text:?}: expected e.g. 512M, 2G"))?;
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "bad size unit {other:?} in {text:?}: use K, M, G or T"
            ));
        }
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("bad size {text:?}: out of range"));
    }
    Ok(bytes as u64)
}

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
    /// `--worker-memory-limit`.
    #[serde(default, deserialize_with = "de_size")]
    pub worker_memory_limit: Option<u64>,
    /// `--grace-period`.
    #[serde(default, deserialize_with = "de_duration")]
    pub grace_period: Option<Duration>,
    /// `--heartbeat-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub heartbeat_timeout: Option<Duration>,
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
    /// The evolution options.
    #[serde(default)]
    pub evolve: EvolveArgs,
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
    /// Keep a warm standby next to each worker (see `standby.rs`).
    pub standby: bool,
    /// `RLIMIT_DATA` of each worker, bytes.
    pub worker_memory_limit: Option<u64>,
    /// How long a graceful stop may take before SIGKILL.
    pub grace_period: Duration,
    /// A worker whose heartbeat does not move for this long is killed.
    pub heartbeat_timeout: Duration,
    /// Restart policy of every child.
    pub policy: RestartPolicy,
    /// Quick worker crashes after a new generation that trigger a rollback.
    pub fallback_after: u32,
    /// Log output format.
    pub log_format: LogFormat,
    /// The control socket.
    pub control_socket: PathBuf,
    /// Evolution options passed through to the evolver.
    pub evolve: EvolveArgs,
}

/// The control socket of the daemon whose state folder is `dir`.
pub fn default_socket(dir: &Path) -> PathBuf {
    dir.join(RUNTIME_DIR).join(SOCKET_NAME)
}

impl Config {
    /// Merges flags/environment (`args`) over the TOML file over defaults.
    pub fn resolve(args: Args) -> anyhow::Result<Config> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let dir = args.dir.or(file.dir).unwrap_or_else(|| PathBuf::from("."));
        let dir = std::path::absolute(&dir)
            .map_err(|e| anyhow::anyhow!("bad state folder {}: {e}", dir.display()))?;
        let model = dir.join(DEFAULT_MODEL);
        let workers = args
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 || workers > 256 {
            anyhow::bail!("bad --workers {workers}: expected 1 to 256");
        }
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
        Ok(Config {
            model,
            workers,
            allow_fault_injection: args.allow_fault_injection
                || file.allow_fault_injection.unwrap_or(false),
            poison_one_in: args.poison_one_in.filter(|_| args.allow_fault_injection),
            no_evolver: args.no_evolver || file.no_evolver.unwrap_or(false),
            standby: !(args.no_standby || file.no_standby.unwrap_or(false)),
            worker_memory_limit: args.worker_memory_limit.or(file.worker_memory_limit),
            grace_period: args
                .grace_period
                .or(file.grace_period)
                .unwrap_or(Duration::from_secs(10)),
            heartbeat_timeout: args
                .heartbeat_timeout
                .or(file.heartbeat_timeout)
                .unwrap_or(Duration::from_secs(5)),
            policy,
            fallback_after: args.fallback_after.or(file.fallback_after).unwrap_or(3),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            control_socket,
            evolve: args.evolve.or(file.evolve),
            dir,
        })
    }
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
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("2X").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
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
        let c = Config::resolve(cli.args).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.grace_period, Duration::from_millis(250));
        assert_eq!(c.policy.intensity, 7);
        assert_eq!(c.policy.period, Duration::from_secs(60));
        assert_eq!(c.evolve.population, Some(12));
        assert_eq!(c.evolve.seed, Some(9));
        assert_eq!(c.model, dir.path().join(DEFAULT_MODEL));
        assert_eq!(
            c.control_socket,
            dir.path().join(".evod").join("control.sock")
        );
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
}
