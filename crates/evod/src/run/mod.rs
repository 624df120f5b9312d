//! `evod run`: the supervisor, in the foreground (also the container entrypoint).
//!
//! This file holds the command line ([`Args`]); `config` layers it over
//! the TOML file into the supervisor's `Config`, `settings` checks every
//! value before anything starts (exit 2 naming the flag; exit 6 for a state
//! folder it cannot write), and the supervisor itself is the
//! `evod-supervisor` crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use evod_supervisor::LogFormat;
use evod_supervisor::policy::OnGiveUp;
use evod_supervisor::units::{parse_duration, parse_size};

use crate::evolver::EvolveArgs;
use crate::exit;

pub(crate) mod config;
mod settings;
pub(crate) mod worker_cmd;

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
    /// Run this program as every runtime worker instead of evod's own (a
    /// fitness evod does not know, e.g. `python3 fit.py` with
    /// `evod.serve`): split like a shell would split it (no shell runs
    /// it), found on PATH, given `--ring-fd N --model PATH` (and
    /// `EVOD_RING_FD`, `EVOD_MODEL`). Implies --no-standby.
    #[arg(long, env = "EVOD_WORKER_CMD", value_name = "\"CMD ARGS\"")]
    pub worker_cmd: Option<String>,
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
    /// Deadline of a worker's `LOAD` of a new model [default: 5s + 1s per 64 MiB of model].
    #[arg(long, env = "EVOD_LOAD_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub load_timeout: Option<Duration>,
    /// Deadline of a `NEURAL_EXEC` (`evod exec`, the supervisor's canary) [default: 5s].
    #[arg(long, env = "EVOD_EXEC_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub exec_timeout: Option<Duration>,
    /// The evolver's deadline for one EVAL; a worker that beats but leaves 3
    /// of the supervisor's requests in a row unanswered over this long is
    /// replaced [default: 60s].
    #[arg(long, env = "EVOD_EVAL_TIMEOUT", value_parser = parse_duration, value_name = "DURATION")]
    pub eval_timeout: Option<Duration>,
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
    /// Serve Prometheus metrics at /metrics and the /healthz and /readyz
    /// probes over HTTP on this address and port (e.g. 127.0.0.1:9464;
    /// port 0 picks a free one) [default: off].
    #[arg(long, env = "EVOD_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Evolution options (passed to the evolver).
    #[command(flatten, next_help_heading = "Evolution")]
    pub evolve: EvolveArgs,
    /// Distributed-run options (`--broker`: this host coordinates).
    #[command(flatten, next_help_heading = "Distributed")]
    pub dist: crate::dist::DistArgs,
}

/// Runs `evod run`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::dist::scrub_broker_env();
    crate::llm::scrub_host_files_env();
    if let Some(path) = &args.config {
        let file = config::FileConfig::load(path)?;
        if file.base_model.is_some() || file.text.is_some() {
            return Err(exit::with_code(
                exit::USAGE,
                anyhow::anyhow!(
                    "config file {}: base_model and text are evod join's (an evaluator host's copies of a perplexity run's files); evod run uses the files its model records",
                    path.display()
                ),
            ));
        }
    }
    let (mut config, evolve, dist) = config::resolve(args)?;
    let dist = crate::dist::DistSettings::from_args(&dist)?;
    if let Some(d) = &dist {
        config.evolver_env = d.child_env();
        config.evolver_args.extend(d.to_args().to_cli_args());
    }
    // Refuse a socket path that is taken before creating anything.
    evod_supervisor::control::check_socket_path(&config.control_socket)
        .map_err(|e| exit::with_code(exit::USAGE, e))?;
    settings::check_state_dir(&config.dir).map_err(|e| match e {
        settings::DirError::NotAFolder(_) => exit::with_code(exit::USAGE, e),
        settings::DirError::NotWritable { .. } => exit::with_code(exit::IO, e),
    })?;
    // evod's own worker cannot score an external model: say so now, not
    // in a retry loop of the evolver.
    if config.worker_cmd.is_none() && worker_cmd::is_external_model(&config.model) {
        return Err(exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "{}: the model's task is external (a fitness evod does not know): \
                 run the workers with --worker-cmd \"CMD ARGS\"",
                config.model.display()
            ),
        ));
    }
    // A perplexity model needs llama.cpp, its base model and its corpus:
    // refuse a build without it or a changed file now, by name.
    crate::llm::check_run(&config.model, config.worker_cmd.is_some())?;
    evod_supervisor::init_logging(config.log_format);
    if let Some(d) = &dist {
        d.check_reachable()?;
    }
    if !config.model.exists() && crate::evolver::is_fresh_folder(&config.dir) {
        crate::evolver::create_default_model(&config.model, evolve.seed())?;
    }
    if let Some(want) = evolve.directions
        && !config.no_evolver
    {
        // Before the supervisor starts: every worker loads the rewritten
        // file, so every worker applies recipes with its noise layout.
        crate::llm::apply_directions(&config.dir, &config.model, want, evolve.history() as usize)?;
    }
    if config.model.exists() && !config.no_evolver {
        config.payload_bytes = crate::evolver::ring_payload_bytes(&config.model, &evolve)?;
    }
    supervise(config)
}

/// Runs the supervisor with `config`, mapping its errors to exit codes.
pub fn supervise(config: evod_supervisor::config::Config) -> anyhow::Result<ExitCode> {
    match evod_supervisor::run(config) {
        Ok(code) => Ok(exit::exit(code)),
        // The codes of `exit.rs`: a bad model is BAD_INPUT (the
        // `GgufError` itself, as every command reports one), giving up is
        // GAVE_UP, anything else a plain failure.
        Err(evod_supervisor::SupervisorError::BadModel(e)) => Err(e.into()),
        Err(e @ evod_supervisor::SupervisorError::NoModel(_)) => {
            Err(exit::with_code(exit::BAD_INPUT, e))
        }
        Err(e @ evod_supervisor::SupervisorError::GaveUp(_)) => {
            Err(exit::with_code(exit::GAVE_UP, e))
        }
        Err(evod_supervisor::SupervisorError::Control(e)) if e.is_bad_path() => {
            Err(exit::with_code(exit::USAGE, e))
        }
        // A taken or foreign address: the operator picks another one.
        Err(evod_supervisor::SupervisorError::Metrics(e)) => Err(exit::with_code(
            exit::USAGE,
            anyhow::Error::new(e).context("--metrics-addr"),
        )),
        Err(e) => Err(e.into()),
    }
}
