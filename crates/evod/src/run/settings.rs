//! The checks of every `evod run` setting, before anything starts: each bad
//! value is an error naming where it came from (the flag, its `EVOD_*`
//! variable, or the TOML key and file) and the allowed range; `run` exits 2
//! on it ([`SettingError`]), or 6 for a state folder it cannot write.
//!
//! Each layer (command line and environment, TOML file) is checked on its
//! own, so the error names the layer the bad value is in; the settings that
//! depend on each other are checked on the merged result. Ranges are
//! constants here so `docs/operations.md` can list them. Add a new setting's
//! check to [`check_layer`] (one value) or [`check_merged`] (a relation).

use std::path::Path;
use std::time::Duration;

use evod_supervisor::config::Config;

use super::Args;
use super::config::FileConfig;
use crate::evolver::{EvolveArgs, Strategy};

/// Most runtime workers.
pub const MAX_WORKERS: usize = 256;
/// Smallest `--worker-memory-limit`. Measured here with the default model:
/// a worker starts and answers under a 512 KiB limit and crash-loops
/// (SIGSEGV at start) under 64 KiB; 4 MiB leaves room for the allocator
/// and a bigger model's scratch buffers (the model itself is mapped, not
/// counted).
pub const MIN_WORKER_MEMORY: u64 = 4 << 20;
/// Longest duration any setting accepts (a day): far from any overflow of
/// `Instant + Duration`, and past it a value is surely a typo.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The worker's heartbeat interval; `--heartbeat-timeout` must allow two.
pub const BEAT_INTERVAL: Duration = evod_ring::DEFAULT_BEAT_INTERVAL;
/// Smallest `--restart-period` and `--backoff-max`.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// Most restarts in `--restart-intensity` and quick crashes in `--fallback-after`.
pub const MAX_COUNT: u32 = 1_000_000;
/// Largest population.
pub const MAX_POPULATION: u32 = 1_000_000;
/// Most episodes per evaluation.
pub const MAX_EPISODES: u32 = 100_000;
/// Smallest `--load-timeout`, `--exec-timeout` and `--eval-timeout`.
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(10);
/// Longest `--eval-timeout-per-candidate`, in seconds (an hour per
/// candidate; times a batch's candidates and episodes the evolver's EVAL
/// deadline is clamped, never overflowed).
pub const MAX_EVAL_TIMEOUT_PER_CANDIDATE: f64 = 3600.0;
/// Most `--progress-keep` rows: far more than anyone reads, and far from
/// the overflow of the progress log's `3 × N` and the thinning's `2 × N`.
pub const MAX_PROGRESS_KEEP: u64 = 1_000_000_000;

/// A setting out of its range.
#[derive(Debug, thiserror::Error)]
#[error("bad {origin} {value}: expected {expected}")]
pub struct SettingError {
    /// Where the value came from: `--population`, `EVOD_POPULATION
    /// (--population)`, or `` `evolve.population` in FILE (--population) ``.
    pub origin: String,
    /// The value, as given.
    pub value: String,
    /// The allowed range, in words.
    pub expected: String,
}

/// Where one layer's values came from.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A flag or its `EVOD_*` variable (clap merged them).
    CommandLine,
    /// The `--config` TOML file.
    File(&'a Path),
}

impl Origin<'_> {
    /// Names the setting `flag` (without `--`) as this layer gave it.
    pub(super) fn name(self, flag: &str, table: Option<&str>) -> String {
        match self {
            Origin::CommandLine => {
                let long = format!("--{flag}");
                let given = std::env::args_os().any(|a| {
                    a.to_str()
                        .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
                });
                let var = format!("EVOD_{}", flag.replace('-', "_").to_uppercase());
                if !given && std::env::var_os(&var).is_some() {
                    format!("{var} ({long})")
                } else {
                    long
                }
            }
            Origin::File(path) => {
                let key = flag.replace('-', "_");
                let key = match table {
                    Some(t) => format!("{t}.{key}"),
                    None => key,
                };
                format!("`{key}` in {} (--{flag})", path.display())
            }
        }
    }
}

/// One layer's values, as the checks see them.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// Where they came from.
    pub origin: Origin<'a>,
    /// `--workers`.
    pub workers: Option<usize>,
    /// `--worker-memory-limit`.
    pub worker_memory_limit: Option<u64>,
    /// `--grace-period`.
    pub grace_period: Option<Duration>,
    /// `--heartbeat-timeout`.
    pub heartbeat_timeout: Option<Duration>,
    /// `--restart-intensity`.
    pub restart_intensity: Option<u32>,
    /// `--restart-period`.
    pub restart_period: Option<Duration>,
    /// `--backoff-initial`.
    pub backoff_initial: Option<Duration>,
    /// `--backoff-max`.
    pub backoff_max: Option<Duration>,
    /// `--load-timeout`.
    pub load_timeout: Option<Duration>,
    /// `--exec-timeout`.
    pub exec_timeout: Option<Duration>,
    /// `--eval-timeout`.
    pub eval_timeout: Option<Duration>,
    /// `--fallback-after`.
    pub fallback_after: Option<u32>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<&'a str>,
    /// The evolution options.
    pub evolve: &'a EvolveArgs,
}

impl<'a> Layer<'a> {
    /// The command-line (and environment) layer.
    pub fn of_args(args: &'a Args) -> Layer<'a> {
        Layer {
            origin: Origin::CommandLine,
            workers: args.workers,
            worker_memory_limit: args.worker_memory_limit,
            grace_period: args.grace_period,
            heartbeat_timeout: args.heartbeat_timeout,
            restart_intensity: args.restart_intensity,
            restart_period: args.restart_period,
            backoff_initial: args.backoff_initial,
            backoff_max: args.backoff_max,
            load_timeout: args.load_timeout,
            exec_timeout: args.exec_timeout,
            eval_timeout: args.eval_timeout,
            fallback_after: args.fallback_after,
            metrics_addr: args.metrics_addr.as_deref(),
            evolve: &args.evolve,
        }
    }

    /// The TOML file's layer.
    pub fn of_file(file: &'a FileConfig, path: &'a Path) -> Layer<'a> {
        Layer {
            origin: Origin::File(path),
            workers: file.workers,
            worker_memory_limit: file.worker_memory_limit,
            grace_period: file.grace_period,
            heartbeat_timeout: file.heartbeat_timeout,
            restart_intensity: file.restart_intensity,
            restart_period: file.restart_period,
            backoff_initial: file.backoff_initial,
            backoff_max: file.backoff_max,
            load_timeout: file.load_timeout,
            exec_timeout: file.exec_timeout,
            eval_timeout: file.eval_timeout,
            fallback_after: file.fallback_after,
            metrics_addr: file.metrics_addr.as_deref(),
            evolve: &file.evolve,
        }
    }
}

/// Checks `value` (if set) against `ok`.
fn check<T: std::fmt::Debug>(
    origin: Origin<'_>,
    flag: &str,
    table: Option<&str>,
    value: Option<T>,
    ok: impl Fn(&T) -> bool,
    expected: impl Fn() -> String,
    show: impl Fn(&T) -> String,
) -> Result<(), SettingError> {
    match value {
        Some(v) if !ok(&v) => Err(SettingError {
            origin: origin.name(flag, table),
            value: show(&v),
            expected: expected(),
        }),
        _ => Ok(()),
    }
}

fn secs(d: &Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Checks each value of one layer against its range.
pub fn check_layer(layer: &Layer<'_>) -> Result<(), SettingError> {
    let o = layer.origin;
    let num = |v: &dyn std::fmt::Display| v.to_string();
    check(
        o,
        "workers",
        None,
        layer.workers,
        |&n| (1..=MAX_WORKERS).contains(&n),
        || format!("1 to {MAX_WORKERS}"),
        |v| num(v),
    )?;
    check(
        o,
        "worker-memory-limit",
        None,
        layer.worker_memory_limit,
        |&b| b >= MIN_WORKER_MEMORY,
        || {
            format!(
                "at least {} (a worker cannot start in less)",
                mib(MIN_WORKER_MEMORY)
            )
        },
        |&b| format!("{b} bytes"),
    )?;
    let duration = |flag: &str, value: Option<Duration>, min: Duration| {
        check(
            o,
            flag,
            None,
            value,
            |d| (min..=MAX_DURATION).contains(d),
            || format!("{} to {}", secs(&min), secs(&MAX_DURATION)),
            secs,
        )
    };
    check(
        o,
        "metrics-addr",
        None,
        layer.metrics_addr,
        |a| a.parse::<std::net::SocketAddr>().is_ok(),
        || "an IP address and port, like 127.0.0.1:9464 or [::1]:9464".into(),
        |a| format!("{a:?}"),
    )?;
    duration("grace-period", layer.grace_period, Duration::ZERO)?;
    duration(
        "heartbeat-timeout",
        layer.heartbeat_timeout,
        2 * BEAT_INTERVAL,
    )?;
    duration("restart-period", layer.restart_period, MIN_PERIOD)?;
    duration("backoff-initial", layer.backoff_initial, Duration::ZERO)?;
    duration("backoff-max", layer.backoff_max, MIN_PERIOD)?;
    duration("load-timeout", layer.load_timeout, MIN_REQUEST_TIMEOUT)?;
    duration("exec-timeout", layer.exec_timeout, MIN_REQUEST_TIMEOUT)?;
    duration("eval-timeout", layer.eval_timeout, MIN_REQUEST_TIMEOUT)?;
    check(
        o,
        "restart-intensity",
        None,
        layer.restart_intensity,
        |&n| n <= MAX_COUNT,
        || format!("0 to {MAX_COUNT}"),
        |v| num(v),
    )?;
    check(
        o,
        "fallback-after",
        None,
        layer.fallback_after,
        |&n| (1..=MAX_COUNT).contains(&n),
        || format!("1 to {MAX_COUNT}"),
        |v| num(v),
    )?;
    let e = layer.evolve;
    let ev = Some("evolve");
    check(
        o,
        "population",
        ev,
        e.population,
        |&n| (2..=MAX_POPULATION).contains(&n),
        || format!("2 to {MAX_POPULATION} (3 or more for --strategy ga)"),
        |v| num(v),
    )?;
    check(
        o,
        "episodes",
        ev,
        e.episodes,
        |&n| (1..=MAX_EPISODES).contains(&n),
        || format!("1 to {MAX_EPISODES}"),
        |v| num(v),
    )?;
    check(
        o,
        "solve-threshold",
        ev,
        e.solve_threshold,
        |t| t.is_finite(),
        || "a finite number".into(),
        |v| num(v),
    )?;
    let at_least_one = |flag: &str, value: Option<u64>| {
        check(
            o,
            flag,
            ev,
            value,
            |&n| n >= 1,
            || "1 or more".into(),
            |v| num(v),
        )
    };
    at_least_one("generations", e.generations)?;
    at_least_one("pulse-every", e.pulse_every)?;
    at_least_one("checkpoint-every", e.checkpoint_every)?;
    at_least_one("history", e.history.map(u64::from))?;
    check(
        o,
        "progress-keep",
        ev,
        e.progress_keep,
        |&n| (1..=MAX_PROGRESS_KEEP).contains(&n),
        || format!("1 to {MAX_PROGRESS_KEEP}"),
        |v| num(v),
    )?;
    check(
        o,
        "max-relative-change",
        ev,
        e.max_relative_change,
        |x| x.is_finite() && *x > 0.0,
        || "a finite number greater than 0".into(),
        |v| num(v),
    )?;
    for (flag, value) in [("sigma", e.sigma), ("learning-rate", e.learning_rate)] {
        check(
            o,
            flag,
            ev,
            value,
            |x| x.is_finite() && *x > 0.0,
            || "a finite number greater than 0".into(),
            |v| num(v),
        )?;
    }
    check(
        o,
        "eval-timeout-per-candidate",
        ev,
        e.eval_timeout_per_candidate,
        |x| x.is_finite() && *x > 0.0 && *x <= MAX_EVAL_TIMEOUT_PER_CANDIDATE,
        || format!("a number of seconds greater than 0, at most {MAX_EVAL_TIMEOUT_PER_CANDIDATE}"),
        |v| num(v),
    )?;
    check(
        o,
        "patience",
        ev,
        e.patience,
        |&n| n <= u64::from(MAX_COUNT),
        || format!("0 (never rest) to {MAX_COUNT}"),
        |v| num(v),
    )?;
    check(
        o,
        "pulse-interval",
        ev,
        e.pulse_interval,
        |d| *d <= MAX_DURATION,
        || format!("0s to {}", secs(&MAX_DURATION)),
        secs,
    )?;
    Ok(())
}

/// Checks the settings that depend on each other, on the merged result.
pub fn check_merged(config: &Config, evolve: &EvolveArgs) -> Result<(), SettingError> {
    let policy = &config.policy;
    if policy.backoff_initial > policy.backoff_max {
        return Err(SettingError {
            origin: "--backoff-initial".into(),
            value: secs(&policy.backoff_initial),
            expected: format!("at most --backoff-max ({})", secs(&policy.backoff_max)),
        });
    }
    let population = evolve.population.unwrap_or(48);
    if evolve.strategy.unwrap_or(Strategy::Ga) == Strategy::Ga && population < 3 {
        return Err(SettingError {
            origin: "--population".into(),
            value: population.to_string(),
            expected: "3 or more with --strategy ga (it keeps 2 elites)".into(),
        });
    }
    Ok(())
}

/// Why the state folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Not a folder.
    #[error("state folder {}: not a folder", .0.display())]
    NotAFolder(std::path::PathBuf),
    /// Cannot be created or written (read-only file system, permissions).
    #[error("state folder {} is not writable", path.display())]
    NotWritable {
        /// The folder.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Creates the state folder if needed and checks that it is writable (a
/// read-only mount or missing permission is found here, not by the first
/// write of a running daemon).
pub fn check_state_dir(dir: &Path) -> Result<(), DirError> {
    let not_writable = |source| DirError::NotWritable {
        path: dir.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::metadata(dir)
        && !meta.is_dir()
    {
        return Err(DirError::NotAFolder(dir.to_owned()));
    }
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|errno| not_writable(std::io::Error::from(errno)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(evolve: &EvolveArgs) -> Layer<'_> {
        Layer {
            origin: Origin::File(Path::new("evod.toml")),
            workers: None,
            worker_memory_limit: None,
            grace_period: None,
            heartbeat_timeout: None,
            restart_intensity: None,
            restart_period: None,
            backoff_initial: None,
            backoff_max: None,
            load_timeout: None,
            exec_timeout: None,
            eval_timeout: None,
            fallback_after: None,
            metrics_addr: None,
            evolve,
        }
    }

    #[test]
    fn a_bad_value_in_the_file_names_its_key_the_file_and_the_flag() {
        let evolve = EvolveArgs {
            population: Some(0),
            ..EvolveArgs::default()
        };
        let err = check_layer(&layer(&evolve)).unwrap_err().to_string();
        assert!(
            err.contains("`evolve.population` in evod.toml (--population)") && err.contains("2 to"),
            "{err}"
        );
        let none = EvolveArgs::default();
        let mut l = layer(&none);
        l.heartbeat_timeout = Some(Duration::from_millis(150));
        let err = check_layer(&l).unwrap_err().to_string();
        assert!(
            err.contains("`heartbeat_timeout`") && err.contains("0.2s to"),
            "{err}"
        );
        l.heartbeat_timeout = Some(Duration::from_millis(200));
        check_layer(&l).unwrap();
    }

    #[test]
    fn a_metrics_address_must_be_an_ip_address_and_port() {
        let none = EvolveArgs::default();
        let mut l = layer(&none);
        for bad in ["localhost:9464", "127.0.0.1", "127.0.0.1:99999", ":9464"] {
            l.metrics_addr = Some(bad);
            let err = check_layer(&l).unwrap_err().to_string();
            assert!(
                err.contains("`metrics_addr` in evod.toml (--metrics-addr)")
                    && err.contains("IP address and port"),
                "{bad}: {err}"
            );
        }
        for good in ["127.0.0.1:9464", "[::1]:0", "0.0.0.0:9464"] {
            l.metrics_addr = Some(good);
            check_layer(&l).unwrap();
        }
    }

    #[test]
    fn a_read_only_state_folder_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        check_state_dir(&dir.path().join("new")).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(check_state_dir(&file).is_err());
    }
}
