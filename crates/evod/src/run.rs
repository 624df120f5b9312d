//! `evod run`: the supervisor, in the foreground (also the container entrypoint).
//!
//! This file holds the command line ([`Args`], [`EvolveArgs`]) and the event
//! loop; the machinery lives in `supervisor/`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;

use crate::supervisor::config::{parse_duration, parse_size};
use crate::supervisor::policy::OnGiveUp;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (for a terminal).
    Human,
    /// One JSON object per line (for containers and log collectors).
    Json,
}

/// Evolution strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Genetic algorithm: Gaussian mutation, crossover, elitist selection.
    Ga,
    /// OpenAI-ES: antithetic pairs, centered ranks, Adam.
    Es,
}

impl Strategy {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Ga => "ga",
            Strategy::Es => "es",
        }
    }
}

/// Evolution options: given to `evod run`, passed through unchanged to the
/// `evod evolver` role (which flattens this same struct). Every field is
/// optional so that flags, `EVOD_*` variables and the TOML `[evolve]` table
/// can be layered; the accessors apply the defaults.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct EvolveArgs {
    /// Evolution strategy [default: ga].
    #[arg(long, env = "EVOD_STRATEGY", value_enum)]
    pub strategy: Option<Strategy>,
    /// Candidates per generation [default: 48].
    #[arg(long, env = "EVOD_POPULATION")]
    pub population: Option<u32>,
    /// Seed of all randomness; a run repeats exactly [default: 0].
    #[arg(long, env = "EVOD_SEED")]
    pub seed: Option<u64>,
    /// Stop evolving after N generations [default: never].
    #[arg(long, env = "EVOD_GENERATIONS", value_name = "N")]
    pub generations: Option<u64>,
    /// Stop evolving once the task is solved (publish gate passed).
    #[arg(long, env = "EVOD_UNTIL_SOLVED")]
    #[serde(default)]
    pub until_solved: bool,
    /// Mean return that counts as solved [default: 475].
    #[arg(long, env = "EVOD_SOLVE_THRESHOLD")]
    pub solve_threshold: Option<f64>,
    /// Episodes per candidate evaluation [default: 1].
    #[arg(long, env = "EVOD_EPISODES")]
    pub episodes: Option<u32>,
    /// Log a status line every N cycles [default: 60].
    #[arg(long, env = "EVOD_PULSE_EVERY", value_name = "N")]
    pub pulse_every: Option<u64>,
    /// Generations kept in DIR/history for rollback [default: 10].
    #[arg(long, env = "EVOD_HISTORY", value_name = "K")]
    pub history: Option<u32>,
    /// Checkpoint the strategy state every N generations [default: 10].
    #[arg(long, env = "EVOD_CHECKPOINT_EVERY", value_name = "N")]
    pub checkpoint_every: Option<u64>,
}

impl EvolveArgs {
    /// Seed, default 0.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }
    /// Solve threshold, default 475 (gymnasium's CartPole-v1 threshold).
    pub fn solve_threshold(&self) -> f64 {
        self.solve_threshold.unwrap_or(475.0)
    }
    /// Pulse interval in cycles, default 60.
    pub fn pulse_every(&self) -> u64 {
        self.pulse_every.unwrap_or(60)
    }
    /// History length, default 10.
    pub fn history(&self) -> u32 {
        self.history.unwrap_or(10)
    }
    /// Checkpoint interval in generations, default 10.
    pub fn checkpoint_every(&self) -> u64 {
        self.checkpoint_every.unwrap_or(10)
    }

    /// Fills every unset field of `self` from `other`.
    pub fn or(self, other: EvolveArgs) -> EvolveArgs {
        EvolveArgs {
            strategy: self.strategy.or(other.strategy),
            population: self.population.or(other.population),
            seed: self.seed.or(other.seed),
            generations: self.generations.or(other.generations),
            until_solved: self.until_solved || other.until_solved,
            solve_threshold: self.solve_threshold.or(other.solve_threshold),
            episodes: self.episodes.or(other.episodes),
            pulse_every: self.pulse_every.or(other.pulse_every),
            history: self.history.or(other.history),
            checkpoint_every: self.checkpoint_every.or(other.checkpoint_every),
        }
    }

    /// The flags that reproduce the set fields (for the evolver's command line).
    pub fn to_cli_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(v) = value {
                out.push(flag.into());
                out.push(v.into());
            }
        };
        push("--strategy", self.strategy.map(|s| s.as_str().to_owned()));
        push("--population", self.population.map(|v| v.to_string()));
        push("--seed", self.seed.map(|v| v.to_string()));
        push("--generations", self.generations.map(|v| v.to_string()));
        push(
            "--solve-threshold",
            self.solve_threshold.map(|v| v.to_string()),
        );
        push("--episodes", self.episodes.map(|v| v.to_string()));
        push("--pulse-every", self.pulse_every.map(|v| v.to_string()));
        push("--history", self.history.map(|v| v.to_string()));
        push(
            "--checkpoint-every",
            self.checkpoint_every.map(|v| v.to_string()),
        );
        if self.until_solved {
            out.push("--until-solved".into());
        }
        out
    }
}

/// Arguments of `evod run`. Every option also reads an `EVOD_*` environment
/// variable and the `--config` TOML file (flag > variable > file > default).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// TOML configuration file (keys are the long flag names, `_` for `-`).
    #[arg(long, env = "EVOD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State folder: DIR/vectorland.gguf, DIR/history/, checkpoints, and the DIR/.evod runtime folder [default: .].
    #[arg(long, env = "EVOD_DIR", value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Number of runtime workers [default: number of CPUs].
    #[arg(long, env = "EVOD_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Let workers honour fault-injection opcodes and the `evod.fault` model key (tests only).
    #[arg(long, env = "EVOD_ALLOW_FAULT_INJECTION")]
    pub allow_fault_injection: bool,
    /// Fault injection (tests only; needs --allow-fault-injection): workers
    /// crash on every candidate whose FNV-1a hash is divisible by N.
    #[arg(long, hide = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub poison_one_in: Option<u64>,
    /// Serve the model without evolving it (no evolver process).
    #[arg(long, env = "EVOD_NO_EVOLVER")]
    pub no_evolver: bool,
    /// Do not keep a warm standby process next to each worker (saves one
    /// idle process per worker; a crashed worker is then replaced by a cold
    /// start, ~2.5 ms instead of ~0.45 ms here).
    #[arg(long, env = "EVOD_NO_STANDBY")]
    pub no_standby: bool,
    /// Cap on each worker's heap (`RLIMIT_DATA`: e.g. 512M, 2G; not counting
    /// the shared ring or the mapped model). A worker that allocates past it
    /// aborts and is restarted like any crashed worker [default: no limit].
    #[arg(long, env = "EVOD_WORKER_MEMORY_LIMIT", value_parser = parse_size, value_name = "SIZE")]
    pub worker_memory_limit: Option<u64>,
    /// Time a graceful stop may take before children are killed [default: 10s].
    #[arg(long, env = "EVOD_GRACE_PERIOD", value_parser = parse_duration, value_name = "DURATION")]
    pub grace_period: Option<Duration>,
    /// A worker whose heartbeat stalls this long is killed and respawned [default: 5s].
    #[arg(long, env = "EVOD_HEARTBEAT_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_timeout: Option<Duration>,
    /// Restarts of one child allowed within --restart-period before giving up [default: 20].
    #[arg(long, env = "EVOD_RESTART_INTENSITY", value_name = "N")]
    pub restart_intensity: Option<u32>,
    /// Window of --restart-intensity [default: 60s].
    #[arg(long, env = "EVOD_RESTART_PERIOD", value_parser = parse_duration, value_name = "DURATION")]
    pub restart_period: Option<Duration>,
    /// First delay after a crash within 1 s of start; doubles per quick crash [default: 10ms].
    #[arg(long, env = "EVOD_BACKOFF_INITIAL", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_initial: Option<Duration>,
    /// Largest restart delay [default: 2s].
    #[arg(long, env = "EVOD_BACKOFF_MAX", value_parser = parse_duration, value_name = "DURATION")]
    pub backoff_max: Option<Duration>,
    /// Past the restart intensity: exit with code 5, or keep restarting every --backoff-max [default: exit].
    #[arg(long, env = "EVOD_ON_GIVE_UP", value_enum)]
    pub on_give_up: Option<OnGiveUp>,
    /// Quick worker crashes right after a new generation that roll the model back [default: 3].
    #[arg(long, env = "EVOD_FALLBACK_AFTER", value_name = "N")]
    pub fallback_after: Option<u32>,
    /// Log format [default: human].
    #[arg(long, env = "EVOD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Control socket path [default: DIR/.evod/control.sock].
    #[arg(long, env = "EVOD_CONTROL_SOCKET", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Evolution options (passed to the evolver).
    #[command(flatten, next_help_heading = "Evolution")]
    pub evolve: EvolveArgs,
}

/// Runs `evod run`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = crate::supervisor::config::Config::resolve(args)?;
    crate::supervisor::daemon::run(config)
}
