//! `evod evolver` (hidden role): the metabolism loop as a process.
//!
//! Spawned by the supervisor with every worker's shared segment inherited.
//! Each cycle it asks the [`evod_evolve::Evolver`] for a generation, which
//! validates candidates and has them evaluated through [`RingEvaluator`]
//! (batched `EVAL` across all workers in parallel); when a generation passes
//! the gate it publishes the model atomically and links it into the history
//! (the supervisor then brings every worker to the new file). It
//! checkpoints the whole strategy state so that a killed evolver resumes
//! where it was, and appends one row per generation to the progress log
//! that `evod report` draws.
//!
//! Files under the run folder `DIR`:
//! - `vectorland.gguf`: the published model (only this process writes it
//!   while it runs; rollbacks stop it first).
//! - `history/gen-NNNNNNNN.gguf`: hard links of the last K published files.
//! - `state/checkpoint.bin`: the strategy state (atomic writes).
//! - `state/progress.csv`: one row per generation, thinned when it holds
//!   more than 3 × `--progress-keep` rows.
//! - `state/converged`: present while the evolver rests (converged).
//!
//! Modules: `run_loop` (the loop, resume, publish), `progress_log` (the
//! bounded progress log), `pulse` (the pulse line and the terminal's live
//! line), `rest` (rest when converged, and what wakes it), `report` (the
//! counters sent to the supervisor for `/metrics`), `ring`
//! ([`RingEvaluator`]), `io_fault` (the fault-injection I/O plan),
//! `options` ([`EvolveArgs`], shared with `evod run`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use evod_evolve::{
    EvalError, Evaluator, EvolveError, Evolver, EvolverConfig, GenerationReport, StrategyKind,
    load_checkpoint, save_checkpoint,
};
use evod_ring::{Channel, Client, RingError, Segment};
use evod_runtime::{Architecture, Model, ModelSpec, Task, write_model, write_model_with};

use crate::report::{PROGRESS_FILE, Row};

mod io_fault;
mod options;
mod progress_log;
mod pulse;
mod report;
mod rest;
mod ring;
mod run_loop;

use evod_wire::protocol::{self, EvalHeader, RecipesHeader, exchange, op, receive_id, status};
use io_fault::{IO_FAULT_FILE, read_io_fault};
pub use options::{EvolveArgs, Strategy};
use rest::Alarm;
pub use ring::RingEvaluator;
use run_loop::Loop;

/// The model's file name inside the run folder.
pub const MODEL_FILE: &str = evod_store::MODEL_FILE;

/// Arguments of `evod evolver`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run folder (holds the model, history and state).
    #[arg(long)]
    pub dir: PathBuf,
    /// Descriptor numbers of the workers' inherited segments, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ring_fds: Vec<i32>,
    /// The supervisor's control socket, to have a worker replaced that
    /// corrupts its ring without crashing (passed by `evod run`).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Honour the I/O fault plan in `DIR/.evod/io-fault` at each publish
    /// (tests only; passed by `evod run --allow-fault-injection`).
    #[arg(long, hide = true)]
    pub allow_fault_injection: bool,
    /// Evolution options.
    #[command(flatten)]
    pub evolve: EvolveArgs,
    /// Distributed-run options (the URL comes in `EVOD_BROKER`): this
    /// evolver is then the run's coordinator.
    #[command(flatten)]
    pub dist: crate::dist::DistArgs,
}

/// Takes over the workers' inherited segments named by `ring_fds` (each
/// number once).
pub fn attach_segments(ring_fds: &[i32]) -> Result<Vec<Segment>> {
    if let Some(fd) = (1..ring_fds.len())
        .find_map(|i| ring_fds[..i].contains(&ring_fds[i]).then_some(ring_fds[i]))
    {
        anyhow::bail!("--ring-fd {fd} is given twice: each segment descriptor is taken over once");
    }
    ring_fds
        .iter()
        .map(|&fd| {
            // SAFETY: each `--ring-fd` names a descriptor the supervisor
            // passed for one segment; nothing else here owns it, and each is
            // taken over once (no number twice, checked above;
            // `attach_inherited` checks it is a sealed memfd first).
            unsafe { Segment::attach_inherited(fd) }
                .with_context(|| format!("attaching the worker segment on descriptor {fd}"))
        })
        .collect()
}

/// Runs `evod evolver` until its bound is reached (exit 0) or forever.
pub fn run(args: Args) -> Result<ExitCode> {
    // First thing: until the handlers are in, SIGHUP (`evod wake`, or a
    // SIGHUP to the supervisor right after this evolver's restart) would
    // end the process by its default action and count as a crash. The
    // supervisor starts us with SIGHUP blocked (`ChildSpec::block_sighup`),
    // so one sent before this point is pending: unblocked once the
    // handler is in, before any thread starts, it is delivered to it. A
    // SIGTERM meanwhile is taken at the loop's first turn.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alarm = Alarm::install(std::sync::Arc::clone(&stop))?;
    evod_supervisor::spawn::unblock_sighup().context("unblocking SIGHUP")?;
    evod_supervisor::set_process_name(c"evod-evolver");
    evod_supervisor::init_logging(match std::env::var("EVOD_LOG_FORMAT").as_deref() {
        Ok("json") => evod_supervisor::LogFormat::Json,
        _ => evod_supervisor::LogFormat::Human,
    });
    let dist = crate::dist::DistSettings::from_args(&args.dist)?;
    let segments = attach_segments(&args.ring_fds)?;
    // A llama.cpp worker beats between decode batches, which take longer
    // than an MLP's ticks: wait for it as long as the supervisor's default
    // watchdog does before calling it lost.
    let client_config = if crate::llm::is_perplexity_model(&args.dir.join(MODEL_FILE)) {
        evod_ring::ClientConfig {
            peer_timeout: crate::llm::PEER_TIMEOUT,
            ..evod_ring::ClientConfig::default()
        }
    } else {
        evod_ring::ClientConfig::default()
    };
    let clients = segments
        .iter()
        .map(|s| {
            s.client_with(Channel::Eval, client_config)
                .context("claiming the evaluation channel")
        })
        .collect::<Result<Vec<_>>>()?;
    // A coordinator takes the run's lease *before* it loads its checkpoint:
    // a standby that waited for the lease resumes from the checkpoint as it
    // is when it takes over, not as it was when it started waiting.
    let mut coordination = match &dist {
        Some(settings) => {
            // Every task evod knows is distributed: a perplexity run's gate
            // tasks carry the gate flag, scored on the held-out windows.
            let spec = evod_runtime::Model::open(&args.dir.join(MODEL_FILE))?.spec;
            let layout = evod_evolve::ParamLayout::from_architecture(&spec.arch)?;
            match crate::dist::Coordination::start(
                settings,
                &args.dir.join(MODEL_FILE),
                layout,
                segments.len() as u32,
                args.evolve.eval_timeout_per_candidate(),
                std::sync::Arc::clone(&stop),
            )? {
                Some(c) => Some(c),
                // Stopped while waiting for the lease.
                None => return Ok(ExitCode::SUCCESS),
            }
        }
        None => None,
    };
    let mut main = Loop::start(&args.dir, &args.evolve)?;
    let mut ring = RingEvaluator::new(&segments, clients)
        .with_recipes(args.dir.join("state").join("base"), main.spec().clone());
    ring.stop = stop;
    ring.control_socket = args.control_socket.clone();
    ring.per_candidate_timeout = args.evolve.eval_timeout_per_candidate();
    if args.allow_fault_injection {
        main.io_fault_file = Some(
            args.dir
                .join(evod_wire::control::RUNTIME_DIR)
                .join(IO_FAULT_FILE),
        );
    }
    main.run(&args.evolve, &mut ring, alarm, coordination.as_mut())
}

/// Smallest payload area of a worker's ring (the default: ES recipes and
/// small models need no more).
const MIN_PAYLOAD: usize = 8 << 20;
/// Largest payload area: four of them per worker (two channels, two
/// directions), touched only as far as messages reach.
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Candidates a GA `EVAL` should carry at once when the model allows (the
/// runtime's lockstep group).
const GA_BATCH_TARGET: usize = 8;

/// The payload area each worker's ring gets for the model at `model` and
/// the strategy of `evolve`: room for [`GA_BATCH_TARGET`] full candidates
/// (GA), within [`MIN_PAYLOAD`]..=[`MAX_PAYLOAD`]. A GA model whose single
/// candidate does not fit is refused (exit 2), suggesting `--strategy es`,
/// whose requests are recipes of a few bytes.
pub fn ring_payload_bytes(model: &Path, evolve: &EvolveArgs) -> Result<usize> {
    let file = evod_gguf::GgufFile::open(model)?;
    let spec = ModelSpec::from_file(&file)
        .with_context(|| format!("reading the network of {}", model.display()))?;
    let n = spec.arch.n_params();
    let task: Task = spec
        .task
        .parse()
        .with_context(|| format!("{}: task {:?}", model.display(), spec.task))?;
    let one = EvalHeader::SIZE.saturating_add(n.saturating_mul(4));
    let strategy = evolver_config(evolve, &task, &spec.arch).strategy;
    if strategy == StrategyKind::Ga && one > MAX_PAYLOAD {
        return Err(crate::exit::with_code(
            crate::exit::USAGE,
            anyhow::anyhow!(
                "--strategy ga sends whole candidates: one of {n} parameters is {one} bytes, more than the ring's largest payload area ({MAX_PAYLOAD} bytes); use --strategy es (candidates travel as recipes)"
            ),
        ));
    }
    let want = match strategy {
        StrategyKind::Ga => one.saturating_mul(GA_BATCH_TARGET),
        StrategyKind::Es => 0,
    };
    Ok(want.clamp(MIN_PAYLOAD, MAX_PAYLOAD).next_multiple_of(64))
}

/// The payload area of an evaluator host's rings (`evod join`): the host
/// evaluates whatever the run's coordinator sends — ES recipes, or GA
/// children rebuilt here and sent as vectors — so its rings are sized for
/// GA batches of the model, or for ES alone when one GA candidate of it
/// cannot fit a ring (its coordinator refuses `--strategy ga` then).
pub fn host_payload_bytes(model: &Path) -> Result<usize> {
    let ga = EvolveArgs {
        strategy: Some(Strategy::Ga),
        ..Default::default()
    };
    match ring_payload_bytes(model, &ga) {
        Ok(bytes) => Ok(bytes),
        Err(_) => {
            let es = EvolveArgs {
                strategy: Some(Strategy::Es),
                ..Default::default()
            };
            ring_payload_bytes(model, &es)
        }
    }
}

/// Whether `dir` holds nothing of a run yet (no history, no state): then
/// `evod run` may create the default model there.
pub fn is_fresh_folder(dir: &Path) -> bool {
    !dir.join("history").exists() && !dir.join("state").exists()
}

/// Creates the built-in default model at `path`: CartPole-v1, 4-16-2 tanh,
/// initialised from `seed` (what `evod init --seed SEED` writes).
pub fn create_default_model(path: &Path, seed: u64) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the run folder {}", parent.display()))?;
    }
    let task = Task::CartPole { episodes: 1 };
    let arch = task.default_arch(evod_runtime::Activation::Tanh);
    let params = evod_runtime::init_params(&arch, seed);
    let spec = ModelSpec::new(arch, task.name(), seed);
    write_model(path, &spec, &params, None)
        .with_context(|| format!("creating the default model {}", path.display()))?;
    tracing::info!(
        "created {} (CartPole-v1, 4-16-2 tanh, seed {seed})",
        path.display()
    );
    Ok(())
}

/// The evolver configuration for `evolve` on `task`.
/// `arch` is the model's: a tied control vector has its own σ and step.
pub fn evolver_config(evolve: &EvolveArgs, task: &Task, arch: &Architecture) -> EvolverConfig {
    // Unset options take the library's tuned defaults.
    let defaults = EvolverConfig::default();
    let strategy = match evolve.strategy {
        Some(Strategy::Ga) => StrategyKind::Ga,
        Some(Strategy::Es) => StrategyKind::Es,
        // A control vector's candidates travel as recipes (a few bytes
        // each) and ES averages the noisy window-subset fitness.
        None if *task == Task::Perplexity => StrategyKind::Es,
        None => defaults.strategy,
    };
    // The perplexity task's own defaults (docs/llm.md, "Choosing the ES
    // settings"): every evaluation decodes whole windows, so a generation
    // is expensive and its size and step are tuned for it.
    let (population, sigma, learning_rate) = if *task == Task::Perplexity {
        if arch.tied_directions() {
            (
                crate::llm::DEFAULT_POPULATION,
                crate::llm::DEFAULT_SIGMA_TIED,
                crate::llm::DEFAULT_LEARNING_RATE_TIED,
            )
        } else {
            (
                crate::llm::DEFAULT_POPULATION,
                crate::llm::DEFAULT_SIGMA,
                crate::llm::DEFAULT_LEARNING_RATE,
            )
        }
    } else {
        let sigma = match strategy {
            StrategyKind::Ga => defaults.ga.sigma,
            StrategyKind::Es => defaults.es.sigma,
        };
        (defaults.population, sigma, defaults.es.learning_rate)
    };
    let mut config = EvolverConfig {
        strategy,
        population: evolve.population.map_or(population, |p| p as usize),
        seed: evolve.seed(),
        episodes: evolve.episodes.unwrap_or(defaults.episodes),
        ..defaults
    };
    let sigma = evolve.sigma.map_or(sigma, |s| s as f32);
    match strategy {
        StrategyKind::Ga => config.ga.sigma = sigma,
        StrategyKind::Es => config.es.sigma = sigma,
    }
    config.es.learning_rate = evolve.learning_rate.unwrap_or(learning_rate);
    if let Some(x) = evolve.max_relative_change {
        config.validation.max_relative_change = x;
    }
    if strategy == StrategyKind::Es && config.population % 2 == 1 {
        config.population += 1;
    }
    config.solve_threshold = match task {
        // Only the user knows when an external fitness is solved.
        Task::External => evolve.solve_threshold,
        _ => task.solve_threshold().map(|_| evolve.solve_threshold()),
    };
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The perplexity task has its own ES defaults (a tied vector its
    /// own σ and step); `--sigma` and `--learning-rate` override them;
    /// other tasks keep the library's.
    #[test]
    fn the_perplexity_task_has_its_own_es_defaults_and_flags_override_them() {
        let none = EvolveArgs::default();
        let cvec = Architecture::control_vector(576, 29, "llama").unwrap();
        let mlp = Task::CartPole { episodes: 1 }.default_arch(evod_runtime::Activation::Tanh);
        let c = evolver_config(&none, &Task::Perplexity, &cvec);
        assert_eq!(c.strategy, StrategyKind::Es);
        assert_eq!(c.population, crate::llm::DEFAULT_POPULATION);
        assert_eq!(c.es.sigma, crate::llm::DEFAULT_SIGMA);
        assert_eq!(c.es.learning_rate, crate::llm::DEFAULT_LEARNING_RATE);
        let tied = cvec.clone().with_tied_directions(true);
        let c = evolver_config(&none, &Task::Perplexity, &tied);
        assert_eq!(
            (c.population, c.es.sigma, c.es.learning_rate),
            (
                crate::llm::DEFAULT_POPULATION,
                crate::llm::DEFAULT_SIGMA_TIED,
                crate::llm::DEFAULT_LEARNING_RATE_TIED
            )
        );
        let given = EvolveArgs {
            population: Some(16),
            sigma: Some(0.3),
            learning_rate: Some(0.05),
            ..EvolveArgs::default()
        };
        let c = evolver_config(&given, &Task::Perplexity, &tied);
        assert_eq!(
            (c.population, c.es.sigma, c.es.learning_rate),
            (16, 0.3, 0.05)
        );
        let library = EvolverConfig::default();
        let c = evolver_config(&none, &Task::CartPole { episodes: 1 }, &mlp);
        assert_eq!(c.population, library.population);
        assert_eq!(c.ga.sigma, library.ga.sigma);
        assert_eq!(c.es.learning_rate, library.es.learning_rate);
        let ga = EvolveArgs {
            strategy: Some(Strategy::Ga),
            sigma: Some(0.2),
            ..EvolveArgs::default()
        };
        let c = evolver_config(&ga, &Task::CartPole { episodes: 1 }, &mlp);
        assert_eq!((c.ga.sigma, c.es.sigma), (0.2, library.es.sigma));
    }
}
