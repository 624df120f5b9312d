//! The metabolism loop ([`Loop`]): resume from the checkpoint, one
//! `Evolver::step` per cycle, publish (atomic, never a quarantined model,
//! redoing a publish lost with a killed evolver), history, the progress log
//! (`progress_log`), the pulse and live line (`pulse`), rest when converged
//! (`rest`), and a bounded stop.

use super::progress_log::ProgressLog;
use super::pulse::{LiveLine, Pulse};
use super::rest::{Alarm, Patience, Wake};
use super::*;

pub(super) struct Loop {
    dir: PathBuf,
    model_path: PathBuf,
    spec: ModelSpec,
    evolver: Evolver,
    started: Instant,
    progress: ProgressLog,
    /// The task's best possible fitness, if known (rest at once there).
    maximum: Option<f64>,
    /// The task's data file (CSV tasks): a change wakes a resting evolver.
    data_file: Option<PathBuf>,
    /// Where the I/O fault plan is read at each publish (fault injection only).
    pub(super) io_fault_file: Option<PathBuf>,
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
    /// The perplexity task: the gate scores held-out windows, so every
    /// generation's best is gated and the start vector's held-out fitness
    /// is measured before the first generation when the file has none.
    perplexity: bool,
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
    pub(super) fn start(dir: &Path, evolve: &EvolveArgs) -> Result<Loop> {
        let model_path = dir.join(MODEL_FILE);
        let model = Model::open(&model_path)?;
        let task: Task = model
            .spec
            .task
            .parse()
            .with_context(|| format!("{}: task {:?}", model_path.display(), model.spec.task))?;
        let config = evolver_config(evolve, &task, &model.spec.arch);
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
        let mut evolver = match evolver {
            Some(e) => e,
            None => {
                let params = model.params()?.into_owned();
                let mut e = Evolver::new(config, &model.spec.arch, params, model.spec.fitness)?;
                // A file that has been evolved before (its checkpoint made
                // with other options, or gone): its numbering goes on, so
                // this run's publishes are not taken for replays of ones
                // the file already holds.
                e.start_at_generation(model.spec.generation)?;
                e
            }
        };
        let perplexity = task == Task::Perplexity;
        evolver.set_gate_every_generation(perplexity);
        evolver.set_gate_candidate(evolve.gate_candidate().to_library());
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
        let progress =
            ProgressLog::open(&progress_path, evolver.generation(), evolve.progress_keep());
        Ok(Loop {
            dir: dir.to_owned(),
            model_path,
            spec: model.spec,
            evolver,
            started: Instant::now(),
            progress,
            maximum: super::rest::task_maximum(&task),
            data_file: super::rest::data_file(&task),
            io_fault_file: None,
            pending,
            quarantined,
            rolled_back_from: mark
                .filter(|m| m.to == model_generation)
                .and_then(|m| m.from),
            perplexity,
        })
    }

    /// The live model's spec.
    pub(super) fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub(super) fn run(
        mut self,
        evolve: &EvolveArgs,
        ring: &mut RingEvaluator<'_>,
        mut alarm: Alarm,
        mut dist: Option<&mut crate::dist::Coordination>,
    ) -> Result<ExitCode> {
        let checkpoint_path = self.dir.join("state/checkpoint.bin");
        let checkpoint_every = evolve.checkpoint_every().max(1);
        let mut last_evals = (Instant::now(), self.evolver.stats().evaluations);
        // Bounded tries: a run that cannot progress says why and exits
        // NO_PROGRESS instead of retrying forever or "reaching" its bound.
        let mut guard = evod_evolve::ProgressGuard::new(evolve.max_useless_generations());
        let reporter = super::report::Reporter::start(ring.control_socket.clone());
        // SIGTERM (the supervisor's graceful stop; `alarm`, installed
        // first thing in `evolver::run`, sets `ring.stop`) ends the loop
        // between generations with a checkpoint, so a stopped run resumes
        // exactly where it stopped; a second signal is not needed: the
        // supervisor SIGKILLs after its grace period, which is also safe.
        // SIGHUP wakes a resting evolver.
        let stop = std::sync::Arc::clone(&ring.stop);
        let mut patience = Patience::new(evolve.patience(), self.maximum);
        let mut pulse = Pulse::new(
            evolve.pulse_every(),
            evolve.pulse_interval(),
            self.evolver.stats(),
        );
        let mut live = LiveLine::default();
        if self.perplexity
            && self.evolver.stats().generations == 0
            && self.evolver.published().is_none()
        {
            // The base model's own held-out fitness (the start vector is
            // zero): the first publish must beat it.
            let params = self.evolver.best().0.to_vec();
            let gate = ring
                .evaluate_for(
                    evod_evolve::Purpose::Gate,
                    &[params.as_slice()],
                    self.evolver.gate_seed(self.evolver.generation()),
                    self.evolver.config().gate_episodes,
                )
                .context("scoring the start control vector on the held-out windows")?;
            if let Some(Some(f)) = gate.first().copied()
                && f.is_finite()
            {
                self.evolver.adopt_initial_fitness(f)?;
                tracing::info!(
                    fitness = f,
                    "held-out fitness of the start control vector: the first publish must beat it"
                );
            }
        }
        // A restarted evolver in the very state it rested in rests again.
        let mut resumed_rest = (evolve.patience() > 0)
            .then(|| {
                super::rest::resumable(&self.dir, self.evolver.generation(), self.spec.generation)
            })
            .flatten();
        if resumed_rest.is_none() {
            // Left by an evolver that rested in another state (a rollback
            // since, or other options): not converged any more.
            let _ = evod_wire::rest::clear(&self.dir);
        }
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                let why = match save_checkpoint(&checkpoint_path, &self.evolver.checkpoint()) {
                    Ok(()) => {
                        if let Some(c) = dist.as_deref_mut() {
                            c.checkpointed(self.evolver.generation());
                        }
                        "stopped by signal, checkpoint saved".to_owned()
                    }
                    // Stopping anyway; the previous checkpoint stays.
                    Err(e) => format!("stopped by signal, saving the checkpoint failed: {e}"),
                };
                self.finish(&why, ring, dist.as_deref_mut());
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(limit) = evolve.generations
                && self.evolver.generation() >= limit
            {
                self.finish(
                    &format!("reached {limit} generations"),
                    ring,
                    dist.as_deref_mut(),
                );
                return Ok(ExitCode::SUCCESS);
            }
            if alarm.take_hangup() {
                // Not resting: an operator's wake counts patience afresh.
                patience.woken();
                // A wake that came while starting, before the rest this
                // start would resume: it is not rested again.
                if resumed_rest.take().is_some() {
                    let _ = evod_wire::rest::clear(&self.dir);
                }
            }
            let converged = match resumed_rest.take() {
                Some(c) => Some((c.reason, c.since_unix)),
                None if self.pending.is_none() => patience
                    .converged(self.spec.fitness)
                    .map(|reason| (reason, super::rest::unix_now())),
                None => None,
            };
            if let Some((reason, since)) = converged {
                // A stop is taken at the top of the loop.
                if self.rest(&mut alarm, &checkpoint_path, reason, since)? != Wake::Stop {
                    patience.woken();
                    last_evals = (Instant::now(), self.evolver.stats().evaluations);
                }
                continue;
            }
            ring.poll_stats();
            let step = match dist.as_deref_mut() {
                Some(c) => {
                    c.begin(self.evolver.generation());
                    self.evolver.step(&mut c.evaluator(ring))
                }
                None => self.evolver.step(ring),
            };
            let checked = match &step {
                Ok(_) => guard.observe(&self.evolver),
                Err(e @ EvolveError::Eval { .. }) => guard.observe_error(e),
                Err(_) => Ok(()),
            };
            if let Err(why) = checked {
                let _ = save_checkpoint(&checkpoint_path, &self.evolver.checkpoint());
                self.finish(
                    &format!("no progress, giving up: {why}"),
                    ring,
                    dist.as_deref_mut(),
                );
                tracing::error!("{why}");
                return Ok(ExitCode::from(evod_supervisor::exit_code::NO_PROGRESS));
            }
            let report = match step {
                Ok(r) => r,
                Err(EvolveError::Eval { generation, source }) => {
                    tracing::warn!(
                        generation,
                        tries = guard.useless(),
                        "evaluation failed, retrying: {source}"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let (published, solved) = self.publish_pending(&report, evolve, dist.as_deref_mut());
            patience.generation(published);
            let row = Row {
                generation: report.generation,
                best: report.best_fitness,
                mean: report.mean_fitness,
                evaluations: self.evolver.stats().evaluations,
                publishes: u64::from(published),
                wall_s: self.started.elapsed().as_secs_f64(),
            };
            // A failing disk is logged, not fatal: the model and the loop
            // matter more than the log.
            if let Err(e) = self.progress.append(&row) {
                tracing::error!("writing the progress log failed: {e:#}");
            }
            let g = self.evolver.generation();
            if published || g.is_multiple_of(checkpoint_every) {
                // Atomic; on failure the previous checkpoint stays, and the
                // run resumes from it (deterministically) if killed.
                match save_checkpoint(&checkpoint_path, &self.evolver.checkpoint()) {
                    Ok(()) => {
                        if let Some(c) = dist.as_deref_mut() {
                            c.checkpointed(g);
                        }
                    }
                    Err(e) => tracing::error!("saving the checkpoint failed, will retry: {e}"),
                }
            }
            let now = Instant::now();
            let evals = self.evolver.stats().evaluations;
            let rate = (evals - last_evals.1) as f64
                / now.duration_since(last_evals.0).as_secs_f64().max(1e-9);
            last_evals = (now, evals);
            live.show(|| {
                format!(
                    "generation {:>5}  best {:>9.2}  mean {:>9.2}  evals/s {:>9.0}  restarts {}  published gen {}",
                    report.generation,
                    report.best_fitness,
                    report.mean_fitness,
                    rate,
                    ring.restarts,
                    self.spec.generation
                )
            });
            if pulse.due(g) {
                pulse.log(
                    ring,
                    self.evolver.stats(),
                    &report,
                    self.spec.generation,
                    rate,
                );
            }
            let mut counters = super::report::of(&self.evolver, &self.spec);
            if let Some(c) = dist.as_deref_mut() {
                counters.hosts = c.hosts();
            }
            reporter.update(counters);
            if evolve.until_solved && solved && published {
                self.finish("solved", ring, dist.as_deref_mut());
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    /// Publishes this generation's candidate, or retries one whose publish
    /// failed: (published, solved).
    /// A coordinator (`dist`) publishes only after confirming its lease.
    fn publish_pending(
        &mut self,
        report: &GenerationReport,
        evolve: &EvolveArgs,
        dist: Option<&mut crate::dist::Coordination>,
    ) -> (bool, bool) {
        // A new candidate supersedes one whose publish failed; without
        // one, the failed publish is retried.
        if let Some(candidate) = &report.publish {
            self.pending = Some((report.clone(), candidate.clone()));
        }
        let Some((pending_report, candidate)) = self.pending.take() else {
            return (false, false);
        };
        if let Some(c) = dist
            && let Err(why) = c.may_publish()
        {
            // Kept pending: retried next cycle, once the lease is confirmed.
            tracing::error!(
                "publishing generation {} postponed: {why}",
                pending_report.generation + 1
            );
            self.pending = Some((pending_report, candidate));
            return (false, false);
        }
        match self.publish(&pending_report, &candidate, evolve) {
            // Refused (quarantined parameters): nothing to retry.
            Ok(false) => (false, false),
            Ok(true) => {
                if pending_report.generation != report.generation {
                    tracing::info!(
                        generation = pending_report.generation + 1,
                        "publish retried and succeeded"
                    );
                }
                (true, pending_report.solved)
            }
            Err(e) => {
                // Old file intact (atomic publish): retried next cycle
                // unless a better generation comes first.
                tracing::error!(
                    "publishing generation {} failed (retrying next cycle): {e:#}",
                    pending_report.generation + 1
                );
                self.pending = Some((pending_report, candidate));
                (false, false)
            }
        }
    }

    /// Rests until woken (see `rest`): checkpoint, marker
    /// `state/converged`, block; the marker goes when it wakes.
    fn rest(
        &mut self,
        alarm: &mut Alarm,
        checkpoint_path: &Path,
        reason: String,
        since_unix: u64,
    ) -> Result<Wake> {
        // A restart (of the evolver or the daemon) resumes at this very
        // generation, which the marker names: it rests again at once. A
        // failing disk is logged, not fatal (as in the loop): a full disk
        // must not turn every start of a converged run into a crash until
        // the supervisor gives up; without this checkpoint a restart
        // resumes from the previous one and converges again.
        if let Err(e) = save_checkpoint(checkpoint_path, &self.evolver.checkpoint()) {
            tracing::error!("saving the checkpoint before resting failed: {e}");
        }
        alarm.arm();
        let marker = evod_wire::rest::Converged {
            since_unix,
            generation: self.evolver.generation(),
            model_generation: self.spec.generation,
            fitness: self.spec.fitness,
            reason,
        };
        if let Err(e) = evod_wire::rest::write(&self.dir, &marker) {
            tracing::error!(
                "cannot write {}: {e}",
                evod_wire::rest::marker(&self.dir).display()
            );
        }
        evod_supervisor::end_status_line();
        tracing::info!(
            generation = marker.generation,
            model_generation = marker.model_generation,
            fitness = marker.fitness,
            "converged ({}): resting; `evod wake` or SIGHUP evolves again",
            marker.reason
        );
        let wake = alarm.rest(self.data_file.as_deref());
        if wake == Wake::Stop {
            // The marker stays: a restart in this state rests again.
            return Ok(wake);
        }
        if let Err(e) = evod_wire::rest::clear(&self.dir) {
            tracing::error!(
                "cannot remove {}: {e}",
                evod_wire::rest::marker(&self.dir).display()
            );
        }
        match &wake {
            Wake::Hangup => tracing::info!("woken (SIGHUP): evolving again"),
            Wake::DataChanged(path) => {
                tracing::info!("woken ({} changed): evolving again", path.display())
            }
            Wake::Stop => unreachable!("returned above"),
        }
        Ok(wake)
    }

    fn finish(
        &self,
        why: &str,
        ring: &RingEvaluator<'_>,
        dist: Option<&mut crate::dist::Coordination>,
    ) {
        evod_supervisor::end_status_line();
        let stats = self.evolver.stats();
        let (_, best) = self.evolver.best();
        let ipc = ring.ipc;
        println!(
            "evod: {why}: {} generations, {} evaluations, best fitness {best:.2}, published generation {} (fitness {}) in {:.2}s; ring {:.0} bytes/candidate ({} bytes, {} candidates, {} requests, largest {} bytes), base files {} bytes ({} written)",
            self.evolver.generation(),
            stats.evaluations,
            self.spec.generation,
            self.spec
                .fitness
                .map_or("none".to_owned(), |f| format!("{f:.2}")),
            self.started.elapsed().as_secs_f64(),
            ipc.ring_bytes_per_candidate(),
            ipc.ring_bytes,
            ipc.candidates,
            ipc.requests,
            ipc.largest_request,
            ipc.base_bytes,
            ipc.bases,
        );
        if let Some(c) = dist {
            println!("evod: {}", c.summary());
        }
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
