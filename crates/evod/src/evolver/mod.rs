//! `evod evolver` (hidden role): the metabolism loop as a process.
//!
//! Spawned by the supervisor with every worker's shared segment inherited.
//! Each cycle it asks the [`evod_evolve::Evolver`] for a generation, which
//! validates candidates and has them evaluated through [`RingEvaluator`]
//! (batched `EVAL` across all workers in parallel); when a generation passes
//! the gate it publishes the model atomically, links it into the history,
//! `LOAD`s it into every worker and runs a `NEURAL_EXEC` canary. It
//! checkpoints the whole strategy state so that a killed evolver resumes
//! where it was, and appends one row per generation to the progress log
//! that `evod report` draws.
//!
//! Files under the run folder `DIR`:
//! - `vectorland.gguf`: the published model (only this process writes it
//!   while it runs; rollbacks stop it first).
//! - `history/gen-NNNNNNNN.gguf`: hard links of the last K published files.
//! - `state/checkpoint.bin`: the strategy state (atomic writes).
//! - `state/progress.csv`: one row per generation.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use evod_evolve::{
    EvalError, Evaluator, EvolveError, Evolver, EvolverConfig, GenerationReport, StrategyKind,
    load_checkpoint, save_checkpoint,
};
use evod_ring::{Channel, Client, RingError, Segment};
use evod_runtime::{Model, ModelSpec, Task, write_model, write_model_with};

use crate::report::{PROGRESS_FILE, PROGRESS_HEADER, Row};

mod options;

use evod_wire::protocol::{self, EvalHeader, exchange, op, receive_id, status};
pub use options::{EvolveArgs, Strategy};

/// The model's file name inside the run folder.
pub const MODEL_FILE: &str = "vectorland.gguf";

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
}

/// The I/O fault plan's file name inside the runtime folder `DIR/.evod`.
pub const IO_FAULT_FILE: &str = "io-fault";

/// Reads the I/O fault plan at `path`: one line `STEP ERRNO`, with STEP one
/// of `write`, `fsync`, `rename`, `dirfsync` and ERRNO a name (`ENOSPC`,
/// `EIO`, `EROFS`, `EDQUOT`) or a number. No file means no fault.
pub fn read_io_fault(path: &Path) -> Result<Option<evod_gguf::IoFault>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_io_fault(&text)
        .map(Some)
        .with_context(|| format!("{}: bad fault plan {:?}", path.display(), text.trim()))
}

/// Parses `STEP ERRNO` (see [`read_io_fault`]).
pub fn parse_io_fault(text: &str) -> Result<evod_gguf::IoFault> {
    use evod_gguf::IoFault;
    let mut words = text.split_whitespace();
    let (Some(step), Some(errno), None) = (words.next(), words.next(), words.next()) else {
        anyhow::bail!("expected `STEP ERRNO`, e.g. `write ENOSPC`");
    };
    let errno = match errno.to_ascii_uppercase().as_str() {
        "ENOSPC" => libc::ENOSPC,
        "EIO" => libc::EIO,
        "EROFS" => libc::EROFS,
        "EDQUOT" => libc::EDQUOT,
        n => match n.parse::<i32>() {
            Ok(n) if n > 0 => n,
            _ => {
                anyhow::bail!("unknown errno {errno:?}: use ENOSPC, EIO, EROFS, EDQUOT or a number")
            }
        },
    };
    Ok(match step {
        "write" => IoFault::Write(errno),
        "fsync" => IoFault::Fsync(errno),
        "rename" => IoFault::Rename(errno),
        "dirfsync" => IoFault::DirFsync(errno),
        other => anyhow::bail!("unknown step {other:?}: use write, fsync, rename or dirfsync"),
    })
}

/// Runs `evod evolver` until its bound is reached (exit 0) or forever.
pub fn run(args: Args) -> Result<ExitCode> {
    evod_supervisor::set_process_name(c"evod-evolver");
    evod_supervisor::init_logging(match std::env::var("EVOD_LOG_FORMAT").as_deref() {
        Ok("json") => evod_supervisor::LogFormat::Json,
        _ => evod_supervisor::LogFormat::Human,
    });
    let segments = args
        .ring_fds
        .iter()
        .map(|&fd| {
            Segment::attach_inherited(fd)
                .with_context(|| format!("attaching the worker segment on descriptor {fd}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let clients = segments
        .iter()
        .map(|s| {
            s.client(Channel::Eval)
                .context("claiming the evaluation channel")
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ring = RingEvaluator::new(&segments, clients);
    ring.control_socket = args.control_socket.clone();
    let mut main = Loop::start(&args.dir, &args.evolve)?;
    if args.allow_fault_injection {
        main.io_fault_file = Some(
            args.dir
                .join(evod_wire::control::RUNTIME_DIR)
                .join(IO_FAULT_FILE),
        );
    }
    main.run(&args.evolve, &mut ring)
}

/// Opens the progress log for appending after rewriting it to hold only
/// well-formed rows of generations before `resume_at`: a resumed run
/// replays the generations after its checkpoint and writes them again, and a
/// killed evolver may have left a torn last line.
fn open_progress(path: &Path, resume_at: u64) -> Result<std::fs::File> {
    let mut text = format!("{PROGRESS_HEADER}\n");
    if let Ok(old) = std::fs::read_to_string(path) {
        for line in old.lines().skip(1) {
            let ok = line.split(',').count() == 6
                && line
                    .split(',')
                    .next()
                    .and_then(|g| g.parse::<u64>().ok())
                    .is_some_and(|g| g < resume_at);
            if ok {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    let tmp = path.with_extension("csv.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
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
pub fn evolver_config(evolve: &EvolveArgs, task: &Task) -> EvolverConfig {
    // Unset options take the library's tuned defaults.
    let defaults = EvolverConfig::default();
    let strategy = match evolve.strategy {
        Some(Strategy::Ga) => StrategyKind::Ga,
        Some(Strategy::Es) => StrategyKind::Es,
        None => defaults.strategy,
    };
    let mut config = EvolverConfig {
        strategy,
        population: evolve
            .population
            .map_or(defaults.population, |p| p as usize),
        seed: evolve.seed(),
        episodes: evolve.episodes.unwrap_or(defaults.episodes),
        ..defaults
    };
    if strategy == StrategyKind::Es && config.population % 2 == 1 {
        config.population += 1;
    }
    config.solve_threshold = task.solve_threshold().map(|_| evolve.solve_threshold());
    config
}

struct Loop {
    dir: PathBuf,
    model_path: PathBuf,
    spec: ModelSpec,
    evolver: Evolver,
    started: Instant,
    progress: std::fs::File,
    tty: bool,
    /// Where the I/O fault plan is read at each publish (fault injection only).
    io_fault_file: Option<PathBuf>,
    /// A generation whose publish failed: retried every cycle until it
    /// succeeds or a better generation supersedes it (the strategy already
    /// counts it as published). Carries the report's generation and whether
    /// it solved the task.
    pending: Option<(GenerationReport, evod_evolve::PublishCandidate)>,
    /// (generation, [`params_hash`]) of each model in
    /// `history/quarantine/`: generations the supervisor rolled back because
    /// they crashed the runtime. Read at start (a rollback restarts the
    /// evolver); a candidate with the same parameters is never published.
    quarantined: Vec<(u64, u64)>,
    /// [`evod_store::params_hash`] of the model the live
    /// file was rolled back from (`state/rolled-back-to`), while the live
    /// file is the one restored: a replay from an older checkpoint would
    /// publish it again, undoing the rollback.
    rolled_back_from: Option<u64>,
}

/// A publish the checkpoint counts as done but the live file does not hold:
/// the strategy's published candidate is better than the live model and is
/// not it. That happens when a publish failed (a full disk) and its evolver
/// was killed before a retry succeeded. Returns it as a pending publish,
/// numbered by the resumed cycle (the next cycles number after it). Not
/// when the candidate was quarantined: then the live file is a rollback.
fn lost_publish(
    evolver: &Evolver,
    live: &Model,
    quarantined: &[(u64, u64)],
) -> Result<Option<(GenerationReport, evod_evolve::PublishCandidate)>> {
    let Some((params, fitness)) = evolver.published() else {
        return Ok(None);
    };
    if live.spec.fitness.is_some_and(|f| f >= fitness)
        || *live.params()? == *params
        || quarantined
            .iter()
            .any(|(_, h)| *h == evod_store::params_hash(params))
    {
        return Ok(None);
    }
    tracing::warn!(
        fitness,
        live_fitness = live.spec.fitness,
        "the checkpoint's last publish is not in the live file (a failed publish whose evolver stopped): publishing it again"
    );
    let solved = evolver
        .config()
        .solve_threshold
        .is_some_and(|t| fitness >= t);
    let report = GenerationReport {
        generation: evolver.generation().saturating_sub(1),
        best_fitness: fitness,
        mean_fitness: fitness,
        evaluations: 0,
        rejected: 0,
        quarantined: 0,
        publish: None,
        solved,
    };
    let candidate = evod_evolve::PublishCandidate {
        params: params.to_vec(),
        fitness,
        gate_fitness: Some(fitness),
    };
    Ok(Some((report, candidate)))
}

impl Loop {
    fn start(dir: &Path, evolve: &EvolveArgs) -> Result<Loop> {
        let model_path = dir.join(MODEL_FILE);
        let model = Model::open(&model_path)?;
        let task: Task = model
            .spec
            .task
            .parse()
            .with_context(|| format!("{}: task {:?}", model_path.display(), model.spec.task))?;
        let config = evolver_config(evolve, &task);
        let state = dir.join("state");
        std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
        remove_leftovers(dir, &state);
        std::fs::create_dir_all(dir.join("history"))?;
        let checkpoint_path = state.join("checkpoint.bin");
        let mut evolver = None;
        if checkpoint_path.exists() {
            match load_checkpoint(&checkpoint_path)
                .and_then(|c| Evolver::from_checkpoint(c, &model.spec.arch))
            {
                Ok(e) if *e.config() == config => {
                    tracing::info!(
                        generation = e.generation(),
                        "resuming from {}",
                        checkpoint_path.display()
                    );
                    evolver = Some(e);
                }
                Ok(_) => tracing::warn!(
                    "{}: made with other evolution options; starting afresh from the model",
                    checkpoint_path.display()
                ),
                Err(e) => tracing::warn!("ignoring checkpoint: {e}"),
            }
        }
        let resumed = evolver.is_some();
        let evolver = match evolver {
            Some(e) => e,
            None => {
                let params = model.params()?.into_owned();
                Evolver::new(config, &model.spec.arch, params, model.spec.fitness)?
            }
        };
        let quarantined = evod_store::read_quarantine(dir);
        let model_generation = model.spec.generation;
        let mark = evod_store::read_rollback_marker(dir);
        let rolled_back_from_published = mark.is_some_and(|m| {
            m.to == model.spec.generation
                && evolver.published().is_some_and(|(params, _)| {
                    m.from.is_none_or(|h| h == evod_store::params_hash(params))
                })
        });
        let pending = if !resumed {
            None
        } else if rolled_back_from_published {
            tracing::info!(
                generation = model.spec.generation,
                "the live file was rolled back: not redoing the checkpoint's later publishes"
            );
            None
        } else {
            lost_publish(&evolver, &model, &quarantined)?
        };
        let progress_path = state.join(PROGRESS_FILE);
        let progress = open_progress(&progress_path, evolver.generation())?;
        Ok(Loop {
            dir: dir.to_owned(),
            model_path,
            spec: model.spec,
            evolver,
            started: Instant::now(),
            progress,
            tty: std::io::stderr().is_terminal(),
            io_fault_file: None,
            pending,
            quarantined,
            rolled_back_from: mark
                .filter(|m| m.to == model_generation)
                .and_then(|m| m.from),
        })
    }

    fn run(mut self, evolve: &EvolveArgs, ring: &mut RingEvaluator<'_>) -> Result<ExitCode> {
        let checkpoint_path = self.dir.join("state/checkpoint.bin");
        let pulse_every = evolve.pulse_every().max(1);
        let checkpoint_every = evolve.checkpoint_every().max(1);
        let mut last_evals = (Instant::now(), self.evolver.stats().evaluations);
        // SIGTERM (the supervisor's graceful stop) ends the loop between
        // generations with a checkpoint, so a stopped run resumes exactly
        // where it stopped; a second signal is not needed: the supervisor
        // SIGKILLs after its grace period, which is also safe.
        let stop = std::sync::Arc::clone(&ring.stop);
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))
                .context("installing the SIGTERM handler")?;
        }
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                save_checkpoint(&checkpoint_path, &self.evolver.checkpoint())?;
                self.finish("stopped by signal, checkpoint saved");
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(limit) = evolve.generations
                && self.evolver.generation() >= limit
            {
                self.finish(&format!("reached {limit} generations"));
                return Ok(ExitCode::SUCCESS);
            }
            ring.poll_stats();
            let report = match self.evolver.step(ring) {
                Ok(r) => r,
                Err(EvolveError::Eval { generation, source }) => {
                    tracing::warn!(generation, "evaluation failed, retrying: {source}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // A new candidate supersedes one whose publish failed; without
            // one, the failed publish is retried.
            if let Some(candidate) = &report.publish {
                self.pending = Some((report.clone(), candidate.clone()));
            }
            let mut published = false;
            let mut solved = false;
            if let Some((pending_report, candidate)) = self.pending.take() {
                match self.publish(&pending_report, &candidate, evolve) {
                    // Refused (quarantined parameters): nothing to retry.
                    Ok(false) => {}
                    Ok(true) => {
                        published = true;
                        solved = pending_report.solved;
                        if pending_report.generation != report.generation {
                            tracing::info!(
                                generation = pending_report.generation + 1,
                                "publish retried and succeeded"
                            );
                        }
                    }
                    Err(e) => {
                        // Old file intact (atomic publish): retried next
                        // cycle unless a better generation comes first.
                        tracing::error!(
                            "publishing generation {} failed (retrying next cycle): {e:#}",
                            pending_report.generation + 1
                        );
                        self.pending = Some((pending_report, candidate));
                    }
                }
            }
            let row = Row {
                generation: report.generation,
                best: report.best_fitness,
                mean: report.mean_fitness,
                evaluations: self.evolver.stats().evaluations,
                published,
                wall_s: self.started.elapsed().as_secs_f64(),
            };
            // One write per row (a killed evolver leaves at most a torn last
            // line, which the next start drops); a failing disk is logged,
            // not fatal: the model and the loop matter more than the log.
            if let Err(e) = self
                .progress
                .write_all(format!("{}\n", row.to_csv()).as_bytes())
            {
                tracing::error!("appending to the progress log failed: {e}");
            }
            let g = self.evolver.generation();
            if published || g.is_multiple_of(checkpoint_every) {
                // Atomic; on failure the previous checkpoint stays, and the
                // run resumes from it (deterministically) if killed.
                if let Err(e) = save_checkpoint(&checkpoint_path, &self.evolver.checkpoint()) {
                    tracing::error!("saving the checkpoint failed, will retry: {e}");
                }
            }
            let now = Instant::now();
            let evals = self.evolver.stats().evaluations;
            let rate = (evals - last_evals.1) as f64
                / now.duration_since(last_evals.0).as_secs_f64().max(1e-9);
            last_evals = (now, evals);
            if self.tty {
                eprint!(
                    "\r\x1b[2Kgeneration {:>5}  best {:>9.2}  mean {:>9.2}  evals/s {:>9.0}  restarts {}  published gen {}",
                    report.generation,
                    report.best_fitness,
                    report.mean_fitness,
                    rate,
                    ring.restarts,
                    self.spec.generation
                );
            }
            if g.is_multiple_of(pulse_every) {
                self.pulse(ring, &report, rate);
            }
            if evolve.until_solved && solved && published {
                self.finish("solved");
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    fn pulse(&self, ring: &mut RingEvaluator<'_>, report: &GenerationReport, rate: f64) {
        let alive = ring.ping_all();
        let stats = self.evolver.stats();
        let polled = ring.stats_summary();
        if self.tty {
            eprintln!();
        }
        tracing::info!(
            generation = report.generation,
            best = report.best_fitness,
            mean = report.mean_fitness,
            evals_per_s = rate as u64,
            workers_alive = alive,
            workers = ring.segments.len(),
            restarts = ring.restarts,
            rejected = stats.rejected,
            quarantined = stats.quarantined,
            publishes = stats.publishes,
            model_generation = self.spec.generation,
            worker_requests = polled.requests,
            worker_errors = polled.errors,
            worker_slowest_ms = polled.slowest.as_secs_f64() * 1e3,
            worker_generations = %polled.generations,
            youngest_worker_s = polled.youngest.map(|d| d.as_secs_f64()),
            "pulse"
        );
    }

    fn finish(&self, why: &str) {
        if self.tty {
            eprintln!();
        }
        let stats = self.evolver.stats();
        let (_, best) = self.evolver.best();
        println!(
            "evod: {why}: {} generations, {} evaluations, best fitness {best:.2}, published generation {} (fitness {}) in {:.2}s",
            self.evolver.generation(),
            stats.evaluations,
            self.spec.generation,
            self.spec
                .fitness
                .map_or("none".to_owned(), |f| format!("{f:.2}")),
            self.started.elapsed().as_secs_f64()
        );
    }

    /// Publishes `candidate` as generation `report.generation + 1`. `Ok(false)`:
    /// refused, its parameters are those of a quarantined generation.
    fn publish(
        &mut self,
        report: &GenerationReport,
        candidate: &evod_evolve::PublishCandidate,
        evolve: &EvolveArgs,
    ) -> Result<bool> {
        // Published generations are numbered by metabolism cycle (1-based),
        // so a run's numbering does not depend on when it was interrupted.
        let generation = report.generation + 1;
        if generation <= self.spec.generation {
            // Replaying cycles after a resume from an older checkpoint: the
            // run is deterministic, so the file already holds this result
            // (or a later one).
            tracing::info!(
                generation,
                live = self.spec.generation,
                "already published (replayed after resume); not writing again"
            );
            return Ok(true);
        }
        let hash = evod_store::params_hash(&candidate.params);
        if self.rolled_back_from == Some(hash) {
            // A replay reached the model an operator (or the fallback)
            // rolled back from: leave the rollback in place.
            tracing::warn!(
                generation,
                "not publishing: these are the parameters the live file was rolled back from"
            );
            return Ok(false);
        }
        if let Some((bad, _)) = self.quarantined.iter().find(|(_, h)| *h == hash) {
            // A replay after a rollback would publish the very model that
            // crashed the runtime: skip it; a better generation will come.
            tracing::error!(
                generation,
                "not publishing: same parameters as quarantined generation {bad}, which crashed the runtime"
            );
            return Ok(false);
        }
        let old = evod_gguf::GgufFile::open(&self.model_path)?;
        let mut spec = self.spec.clone();
        spec.generation = generation;
        spec.parent_checksum = Some(old.checksum());
        spec.fitness = Some(candidate.gate_fitness.unwrap_or(candidate.fitness));
        spec.seed = evolve.seed();
        spec.strategy = match self.evolver.config().strategy {
            StrategyKind::Ga => "ga".into(),
            StrategyKind::Es => "openai-es".into(),
        };
        spec.created_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut opts = evod_gguf::PublishOptions::default();
        if let Some(plan) = &self.io_fault_file {
            opts.fault = read_io_fault(plan)?;
            if let Some(fault) = opts.fault {
                tracing::warn!(
                    ?fault,
                    "injecting an I/O fault into this publish ({})",
                    plan.display()
                );
            }
        }
        let written = write_model_with(
            &self.model_path,
            &spec,
            &candidate.params,
            Some(&old),
            &opts,
        )
        .with_context(|| format!("publishing generation {generation}"))?;
        drop(old);
        tracing::info!(
            generation = spec.generation,
            fitness = spec.fitness,
            checksum = format!("{:016x}", written.checksum),
            "published {}",
            self.model_path.display()
        );
        self.spec = spec;
        // A newer generation is live: a rollback marker is history now.
        let _ = std::fs::remove_file(evod_store::rollback_marker(&self.dir));
        self.rolled_back_from = None;
        evod_store::keep_history(
            &self.dir,
            &self.model_path,
            self.spec.generation,
            evolve.history() as usize,
        )?;
        // The supervisor notices the new file and has every worker LOAD it
        // and answer a canary (its `sync_workers`): doing it here as well
        // would load and check every published file twice. EVAL does not
        // read the live weights, so evaluation does not wait for it.
        Ok(true)
    }
}

/// Removes the temporary files of an evolver killed while publishing
/// (`DIR/.vectorland.gguf.tmp.*`) or checkpointing
/// (`DIR/state/.checkpoint.bin.tmp.*`): while it runs this process is the
/// only writer of both (a rollback stops it first).
fn remove_leftovers(dir: &Path, state: &Path) {
    let publish = evod_gguf::temp_prefix(MODEL_FILE);
    let entries = [dir, state]
        .into_iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten());
    for entry in entries {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".checkpoint.bin.tmp.") || n.starts_with(&publish))
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {} (left by a killed evolver)",
                    entry.path().display()
                ),
                Err(e) => tracing::warn!("cannot remove {}: {e}", entry.path().display()),
            }
        }
    }
}

/// Evaluates candidates on the workers through their `Eval` channels: one
/// batched `EVAL` per worker in flight at once, re-sent after a worker is
/// lost; a candidate that kills a worker twice is quarantined.
pub struct RingEvaluator<'s> {
    segments: &'s [Segment],
    clients: Vec<Client<'s>>,
    /// Worker replacements noticed (epoch changes).
    pub restarts: u64,
    epochs: Vec<u64>,
    /// Deadline for one worker to answer one request.
    pub request_timeout: Duration,
    /// Set by SIGTERM: stop waiting for workers (they are being stopped too).
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Where to ask the supervisor to replace a misbehaving worker.
    pub control_socket: Option<PathBuf>,
    /// Workers reported as misbehaving: not used again until they are
    /// replaced (their epoch changes).
    suspect: Vec<Option<Suspect>>,
    /// Each worker's stats block, polled every cycle ([`Self::poll_stats`]).
    polled: Vec<Polled>,
}

/// A worker that broke the protocol, waiting to be replaced.
#[derive(Debug, Clone)]
struct Suspect {
    /// The epoch the garbage was read under.
    epoch: u64,
    /// Why, for the supervisor's log.
    why: String,
    /// When the recycle request was last sent, and whether it was accepted.
    asked: Option<(Instant, bool)>,
}

/// What the evolver read from one worker's stats block. Worker-written, so
/// it is reported in the pulse line, never used for a decision.
#[derive(Debug, Clone, Default)]
struct Polled {
    snapshot: Option<evod_ring::StatsSnapshot>,
    /// Largest service time of a request seen by the polls since the last
    /// pulse.
    slowest: Duration,
}

/// The polled worker stats, summed over the workers, for the pulse line.
#[derive(Debug, Default)]
struct StatsSummary {
    /// Requests served by the current incarnations.
    requests: u64,
    /// Of which answered with an error status.
    errors: u64,
    /// Slowest request seen by the polls since the previous pulse.
    slowest: Duration,
    /// Model generation each worker has loaded, comma-separated.
    generations: String,
    /// Uptime of the youngest worker.
    youngest: Option<Duration>,
}

/// What became of one request.
enum Outcome {
    Done(Vec<f64>),
    /// The worker died or was replaced while it held the request.
    Lost,
}

impl<'s> RingEvaluator<'s> {
    /// An evaluator over `clients` (one per segment, same order).
    pub fn new(segments: &'s [Segment], clients: Vec<Client<'s>>) -> Self {
        RingEvaluator {
            epochs: segments.iter().map(Segment::epoch).collect(),
            segments,
            clients,
            restarts: 0,
            request_timeout: Duration::from_secs(60),
            stop: std::sync::Arc::default(),
            control_socket: None,
            suspect: vec![None; segments.len()],
            polled: vec![Polled::default(); segments.len()],
        }
    }

    fn stopping(&self) -> Result<(), EvalError> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(EvalError::Unavailable("the evolver is stopping".into()));
        }
        Ok(())
    }

    fn note_epochs(&mut self) {
        for (i, seg) in self.segments.iter().enumerate() {
            let e = seg.epoch();
            if e != self.epochs[i] {
                self.restarts += 1;
                self.epochs[i] = e;
            }
        }
    }

    /// Sends `EVAL` for `group` (indices into `candidates`) to worker `w`.
    fn send(
        &mut self,
        w: usize,
        candidates: &[&[f32]],
        group: &[usize],
        seed: u64,
        episodes: u32,
    ) -> Result<u64, RingError> {
        let n = candidates[0].len();
        let header = EvalHeader {
            candidates: group.len() as u32,
            params: n as u32,
            seed,
            episodes,
            flags: 0,
            reserved: 0,
        };
        let len = header.request_len();
        self.clients[w].send(op::EVAL, 0, len, |out| {
            header.encode(out);
            let mut at = EvalHeader::SIZE;
            for &i in group {
                protocol::write_f32s(candidates[i], &mut out[at..at + 4 * n]);
                at += 4 * n;
            }
        })
    }

    /// Waits for worker `w`'s reply to request `id`.
    fn receive(&mut self, w: usize, id: u64, expect: usize) -> Result<Outcome, EvalError> {
        let deadline = Instant::now() + self.request_timeout;
        let (st, payload) = match receive_id(&mut self.clients[w], id, deadline) {
            Ok(r) => r,
            Err(RingError::PeerLost { reason, .. }) => {
                tracing::warn!(worker = w, "worker lost mid-request ({reason}); re-sending");
                return Ok(Outcome::Lost);
            }
            Err(RingError::PeerCorrupt { what }) => {
                self.faulty(w, &format!("it wrote garbage into its segment: {what}"));
                return Ok(Outcome::Lost);
            }
            Err(RingError::Timeout) => {
                return Err(EvalError::Unavailable(format!(
                    "worker {w} did not answer within {:?}",
                    self.request_timeout
                )));
            }
            Err(e) => return Err(EvalError::Other(Box::new(e))),
        };
        if st != status::OK {
            return Err(EvalError::Failed(format!(
                "worker {w}: {}",
                String::from_utf8_lossy(&payload)
            )));
        }
        match protocol::read_f64s(&payload, expect) {
            Ok(values) => Ok(Outcome::Done(values)),
            Err(e) => {
                self.faulty(w, &format!("it sent a malformed EVAL reply: {e}"));
                Ok(Outcome::Lost)
            }
        }
    }

    /// Worker `w` broke the protocol but may still be running: a worker
    /// that lies once is not trusted again. Its epoch (the one its client
    /// read the garbage under) is noted, and the supervisor is asked to
    /// replace it; [`Self::settle`] waits for the replacement (and asks
    /// again while the request fails) and no work goes to the worker
    /// meanwhile.
    fn faulty(&mut self, w: usize, why: &str) {
        tracing::error!(worker = w, "worker misbehaves: {why}");
        let epoch = self.clients[w].epoch();
        if self.suspect[w].as_ref().is_some_and(|s| s.epoch == epoch) {
            return;
        }
        self.suspect[w] = Some(Suspect {
            epoch,
            why: format!("the evolver found that {why}"),
            asked: None,
        });
        self.ask_recycle(w);
    }

    /// Sends the recycle request for suspect worker `w` (unless one was
    /// accepted already, or one failed less than a second ago).
    fn ask_recycle(&mut self, w: usize) {
        let Some(suspect) = self.suspect[w].as_mut() else {
            return;
        };
        if let Some((at, ok)) = suspect.asked
            && (ok || at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        let Some(socket) = &self.control_socket else {
            if suspect.asked.is_none() {
                tracing::error!(
                    worker = w,
                    "no control socket: cannot have the worker replaced"
                );
            }
            suspect.asked = Some((Instant::now(), false));
            return;
        };
        let request = evod_wire::Request::Recycle {
            worker: w,
            epoch: suspect.epoch,
            reason: suspect.why.clone(),
        };
        let ok = match evod_wire::call(socket, &request, Duration::from_secs(2)) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(
                    worker = w,
                    "cannot have the worker replaced (asking again): {e}"
                );
                false
            }
        };
        suspect.asked = Some((Instant::now(), ok));
    }

    /// Whether worker `w` is known to misbehave and not yet replaced.
    fn is_suspect(&mut self, w: usize) -> bool {
        let epoch = self.segments[w].epoch();
        if self.suspect[w].as_ref().is_some_and(|s| s.epoch != epoch) {
            self.suspect[w] = None;
        }
        self.suspect[w].is_some()
    }

    /// Waits until worker `w` can take requests again (a replacement was
    /// spawned, or, for a worker not known to misbehave, the heartbeat came
    /// back).
    fn settle(&mut self, w: usize, deadline: Instant) -> Result<(), EvalError> {
        let before = self.epochs[w];
        while Instant::now() < deadline {
            self.stopping()?;
            self.note_epochs();
            let suspect = self.is_suspect(w);
            if suspect {
                self.ask_recycle(w);
            }
            let seg = &self.segments[w];
            if self.epochs[w] != before
                || (!suspect && seg.beat_age(evod_ring::Role::Worker) < Duration::from_secs(1))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(EvalError::Unavailable(format!(
            "worker {w} did not come back"
        )))
    }

    /// Reads every worker's stats block (no round trip: it lives in the
    /// shared segment). Called once per cycle.
    pub fn poll_stats(&mut self) {
        for (seg, polled) in self.segments.iter().zip(&mut self.polled) {
            let s = seg.stats();
            polled.slowest = polled.slowest.max(s.last_service);
            polled.snapshot = Some(s);
        }
    }

    /// The pulse's summary of the polled stats (then starts a new window for
    /// the slowest request).
    fn stats_summary(&mut self) -> StatsSummary {
        let mut out = StatsSummary::default();
        let mut generations = Vec::new();
        for polled in &mut self.polled {
            out.slowest = out.slowest.max(polled.slowest);
            polled.slowest = Duration::ZERO;
            let Some(s) = &polled.snapshot else {
                generations.push("-".to_owned());
                continue;
            };
            out.requests = out
                .requests
                .saturating_add(
                    s.requests_per_opcode
                        .iter()
                        .fold(0u64, |a, &n| a.saturating_add(n)),
                )
                .saturating_add(s.requests_other_opcodes);
            out.errors = out.errors.saturating_add(s.errors);
            generations.push(s.model_generation.to_string());
            if let Some(up) = s.uptime {
                out.youngest = Some(out.youngest.map_or(up, |y: Duration| y.min(up)));
            }
        }
        out.generations = generations.join(",");
        out
    }

    /// Sends `PING` to every worker; returns how many answered.
    pub fn ping_all(&mut self) -> usize {
        let mut alive = 0;
        for c in &mut self.clients {
            let deadline = Instant::now() + Duration::from_secs(2);
            if let Ok((st, _)) = exchange(c, op::PING, 0, |_| {}, deadline)
                && st == status::OK
            {
                alive += 1;
            }
        }
        alive
    }
}

impl Evaluator for RingEvaluator<'_> {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let mut results: Vec<Option<f64>> = vec![None; candidates.len()];
        if candidates.is_empty() {
            return Ok(results);
        }
        let workers = self.clients.len();
        // Groups still to evaluate; a group that crashed a worker is split
        // into single candidates so the culprit can be found.
        let per = candidates.len().div_ceil(workers);
        let mut pending: Vec<Vec<usize>> = (0..candidates.len())
            .collect::<Vec<_>>()
            .chunks(per)
            .map(<[usize]>::to_vec)
            .collect();
        let mut crashes = vec![0u32; candidates.len()];
        let give_up = Instant::now() + self.request_timeout * 4;
        while !pending.is_empty() {
            if Instant::now() > give_up {
                return Err(EvalError::Unavailable("workers keep failing".into()));
            }
            self.stopping()?;
            self.note_epochs();
            // One group per worker in flight, with the id it was sent as.
            let mut flight: Vec<(usize, u64, Vec<usize>)> = Vec::new();
            let mut suspects = Vec::new();
            for w in 0..workers {
                // No work for a worker that lied until it is replaced: the
                // others take it.
                if self.is_suspect(w) {
                    suspects.push(w);
                    continue;
                }
                let Some(group) = pending.pop() else { break };
                match self.send(w, candidates, &group, seed, episodes) {
                    Ok(id) => flight.push((w, id, group)),
                    Err(RingError::PeerLost { .. } | RingError::Full) => {
                        pending.push(group);
                        self.settle(w, give_up)?;
                    }
                    Err(RingError::PeerCorrupt { what }) => {
                        pending.push(group);
                        self.faulty(w, &format!("it wrote garbage into its segment: {what}"));
                    }
                    Err(e) => return Err(EvalError::Other(Box::new(e))),
                }
            }
            if flight.is_empty()
                && let Some(&w) = suspects.first()
            {
                // Every worker that could take work is waiting to be
                // replaced: wait for the first replacement.
                self.settle(w, give_up)?;
            }
            for (w, id, group) in flight {
                match self.receive(w, id, group.len())? {
                    Outcome::Done(values) => {
                        for (&i, v) in group.iter().zip(values) {
                            results[i] = Some(v);
                        }
                    }
                    Outcome::Lost => {
                        for &i in &group {
                            crashes[i] += 1;
                        }
                        if group.len() == 1 {
                            let i = group[0];
                            if crashes[i] >= 2 {
                                tracing::warn!("candidate {i} crashed a worker twice: quarantined");
                            } else {
                                pending.push(group);
                            }
                        } else {
                            pending.extend(group.into_iter().map(|i| vec![i]));
                        }
                        self.settle(w, give_up)?;
                    }
                }
            }
        }
        Ok(results)
    }
}
