//! [`Coordination`]: the evolver as a distributed run's coordinator.
//!
//! Both strategies are distributed: ES candidates travel as recipes
//! against the generation's base, GA children as recipes against their
//! parents (`evod_evolve::GaRecipe`), every parent a base published by
//! checksum; a host rebuilds each candidate with the code the evolver
//! built it with.
//!
//! It holds the coordinator lease (renewed by a thread of its own; a lease
//! lost — another coordinator took over after we stalled — ends this
//! process at once, so there are never two publishers), publishes the
//! run's model file once, and evaluates each evaluation of the evolver
//! through the broker ([`Coordination::evaluator`]): one round per
//! evaluation (a generation's training batch and its publish gate, in
//! the evolver's order),
//! named by a hash of what it evaluates ([`round_id`], [`ga_round_id`]:
//! the run's model and this build's protocol, the base, the recipes —
//! which name the GA parents —, the episode seed and count, and its
//! purpose). Every task of a gate round carries the gate flag
//! (`Task::gate`), so a host scores it as the single-host gate is (on the
//! held-out windows of a perplexity run). A round is
//! its bases published by hash (once; the ES mean, or every GA parent a
//! recipe names), its recipes cut into tasks of
//! `--candidates-per-task`, enqueued once (a restarted coordinator that
//! redoes a round finds it enqueued and its results recorded: nothing is
//! enqueued twice; another evaluation, e.g. of a coordinator that took
//! over from its own checkpoint, has another name and can never be
//! answered with these results), and the results read back in candidate
//! order —
//! never arrival order — so the published tensors are the same as on one
//! host. While waiting, the coordinator evaluates tasks on its own workers
//! like any host ([`EvalHost`]).
//!
//! Candidates of a dead-lettered task are quarantined (`None`), as a
//! candidate that crashes local workers is. A round that makes no progress
//! for a few leases with no task left anywhere on the broker (lost with a
//! Redis that had no AOF, a stream trimmed too short) has what is missing
//! re-enqueued; one whose tasks are only slow or waiting for a host is
//! logged, not re-enqueued. Rounds are retired
//! (their results and enqueue marks removed from the broker) once a
//! checkpoint covers them, so a restart from that checkpoint never needs
//! them again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use evod_broker::{
    BrokerError, Coordinator as _, Enqueued, HostInfo, Lease, RedisBroker, Round, Task, TaskResult,
    Work,
};
use evod_evolve::{Base, EvalError, Evaluator, GaBatch, GaRecipe, ParamLayout, Purpose, Recipe};

use super::{DistSettings, EvalHost, retry_logged};
use crate::evolver::RingEvaluator;

/// Exit code of an evolver whose lease was taken: the supervisor restarts
/// it, and it waits for the lease again.
const LEASE_LOST_EXIT: i32 = 1;
/// How often the dead-letter stream is read while a round is open (a
/// dead letter also wakes the wait at once).
const DEAD_LETTERS_EVERY: Duration = Duration::from_millis(500);
/// Longest wait for a round's results between two looks at it (its
/// count, dead letters, a stall, a stop): the wait is woken when the
/// round has all its results or a task is dead-lettered, never per result.
const WAIT_SLICE: Duration = Duration::from_millis(500);
/// A host silent this long is forgotten (`evod status` stops listing it).
const HOST_GONE: Duration = Duration::from_secs(600);
/// How often the hosts are listed for the status report.
const HOSTS_EVERY: Duration = Duration::from_secs(1);
/// How many finished rounds a coordinator remembers to drop their late
/// dead letters (a late copy comes within a few leases of its round).
const FINISHED_KEPT: usize = 1024;

/// The coordinator of a distributed run (see the module docs).
pub struct Coordination {
    broker: RedisBroker,
    settings: DistSettings,
    lease: Lease,
    /// The lease keeper thread (stopped, then the lease released, on drop).
    _keeper: Keeper,
    /// The run's [`fingerprint`], part of every round id.
    fingerprint: u64,
    /// Its own workers as an evaluator host (`None` with `--remote-only`).
    host: Option<EvalHost>,
    stop: Arc<AtomicBool>,
    /// Generation of the evolver's step under way.
    generation: u64,
    /// Bases of the current round (a round that names others drops those
    /// of this step and before it does not name).
    bases: Vec<u64>,
    /// The last dead letter read (broker id): each is read once.
    dead_after: String,
    /// Dead-lettered candidates by round, with their letter (a round's
    /// entry goes when it is done).
    dead: std::collections::HashMap<u64, Vec<(u32, evod_broker::DeadLetter)>>,
    /// The last [`FINISHED_KEPT`] rounds finished: a dead letter of one of
    /// them (a late copy of its task, dead-lettered after the round was
    /// settled) is dropped instead of kept for ever in `dead`.
    finished: std::collections::VecDeque<u64>,
    /// Hosts as last listed.
    hosts: Vec<HostInfo>,
    hosts_at: Option<Instant>,
    pruned_at: Option<Instant>,
    /// Tasks enqueued by this process (new and re-enqueued).
    pub enqueued: u64,
}

impl Coordination {
    /// Connects, waits for the coordinator lease (logging who holds it;
    /// `stop` ends the wait: then `None`), publishes the model file at
    /// `model` for joining hosts, and starts the lease keeper.
    pub fn start(
        settings: &DistSettings,
        model: &std::path::Path,
        layout: ParamLayout,
        workers: u32,
        eval_timeout_per_candidate: Duration,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Option<Coordination>> {
        let url = settings.shown_url();
        let mut broker = settings.broker("")?;
        // The first try does not wait, so a held lease is reported at once.
        let mut wait = Duration::ZERO;
        let lease = loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let r = retry_logged("coordinator lease", &url, &stop, || {
                broker.acquire_lease(&settings.host, settings.lease_ttl, wait)
            });
            wait = Duration::from_secs(5);
            match r {
                Ok(lease) => break lease,
                Err(BrokerError::LeaseHeld { holder, remaining }) => tracing::info!(
                    run = %settings.run,
                    "waiting for the coordinator lease of run {}: held by {holder} ({:.1}s left)",
                    settings.run,
                    remaining.as_secs_f64()
                ),
                Err(e @ BrokerError::Unavailable { .. }) => {
                    tracing::warn!("broker {url}: {e}");
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(
            run = %settings.run,
            host = %settings.host,
            "coordinating run {} on {url} (lease {:?})",
            settings.run,
            settings.lease_ttl
        );
        // From here on, any way out (an error, a stop) stops the keeper
        // and releases the lease: `keeper` does both when dropped.
        let keeper = Keeper::start(settings.broker("")?, lease.clone(), url.clone())?;
        let bytes = std::fs::read(model)
            .map_err(|e| anyhow::anyhow!("reading {} to publish it: {e}", model.display()))?;
        retry_logged("publish the model", &url, &stop, || {
            broker.publish_model(&lease, &bytes)
        })?;
        let model_hash = xxhash_rust::xxh3::xxh3_64(&bytes);
        let spec = evod_runtime::Model::open(model)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", model.display()))?
            .spec;
        let fingerprint = fingerprint(&spec);
        let shown = format!("{:016x} {}", spec_hash(&spec), build());
        retry_logged("publish the run's fingerprint", &url, &stop, || {
            broker.publish_run_setting(&lease, FINGERPRINT_SETTING, &shown)
        })?;
        // The hosts evaluate with the coordinator's timeouts.
        let per_candidate_ms = eval_timeout_per_candidate.as_millis().to_string();
        retry_logged("publish the evaluation timeout", &url, &stop, || {
            broker.publish_run_setting(&lease, EVAL_TIMEOUT_SETTING, &per_candidate_ms)
        })?;
        let host = if settings.remote_only {
            None
        } else {
            Some(EvalHost::start(
                settings,
                layout,
                model_hash,
                spec_hash(&spec),
                workers,
                Arc::clone(&stop),
            )?)
        };
        if !wait_for_hosts(&mut broker, settings, &stop)? {
            // Stopped while waiting: the keeper, dropped, releases the
            // lease, so the next coordinator need not wait for it to lapse.
            return Ok(None);
        }
        Ok(Some(Coordination {
            broker,
            settings: settings.clone(),
            lease,
            _keeper: keeper,
            fingerprint,
            host,
            stop,
            generation: 0,
            bases: Vec::new(),
            dead_after: "0-0".to_owned(),
            dead: Default::default(),
            finished: Default::default(),
            hosts: Vec::new(),
            hosts_at: None,
            pruned_at: None,
            enqueued: 0,
        }))
    }

    /// Checks, right before a publish, that this process still holds the
    /// lease, renewing it synchronously: a coordinator cut off from Redis
    /// longer than the lease may have been replaced before its keeper
    /// noticed. `Err` (Redis unreachable): do not publish now (retried next
    /// cycle). A lease another coordinator holds ends this process, as the
    /// keeper does: never two publishers.
    pub fn may_publish(&mut self) -> Result<(), String> {
        match self.broker.renew_lease(&self.lease) {
            Ok(retaken) => {
                if retaken {
                    tracing::warn!(
                        "the coordinator lease had lapsed (Redis away longer than it); taken again"
                    );
                }
                Ok(())
            }
            Err(e @ BrokerError::LeaseLost { .. }) => lease_lost(&e),
            Err(e) => Err(format!(
                "cannot confirm the coordinator lease on {}: {e}; not publishing until it is confirmed",
                self.settings.shown_url()
            )),
        }
    }

    /// Called before each of the evolver's steps, with its generation.
    pub fn begin(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The evolver's evaluator for this step: ES and GA recipes through
    /// the broker.
    pub fn evaluator<'a, 's>(&'a mut self, ring: &'a mut RingEvaluator<'s>) -> Distributed<'a, 's> {
        Distributed { coord: self, ring }
    }

    /// A checkpoint of generation `generation` (the next to run) was
    /// saved: rounds of earlier steps are never redone, so they are
    /// retired — every round and base the run's indexes list under those
    /// steps (a previous coordinator's too), the pending tasks before the
    /// oldest round still indexed, and the dead letters read of that time.
    pub fn checkpointed(&mut self, generation: u64) {
        match self
            .broker
            .retire(&self.lease, generation, &self.dead_after)
        {
            Ok(r) => tracing::debug!(
                rounds = r.rounds,
                bases = r.bases,
                keys = r.keys,
                pending = r.pending,
                dead = r.dead,
                "retired what the checkpoint of generation {generation} covers"
            ),
            // Left for the next checkpoint (the index keeps them listed).
            Err(e) => tracing::warn!("retiring rounds before generation {generation} failed: {e}"),
        }
    }

    /// The evaluator hosts (listed at most once a second; hosts silent for
    /// [`HOST_GONE`] are forgotten).
    pub fn hosts(&mut self) -> Vec<evod_wire::HostStatus> {
        if self.pruned_at.is_none_or(|t| t.elapsed() >= HOST_GONE / 10) {
            self.pruned_at = Some(Instant::now());
            match self.broker.prune_hosts(HOST_GONE) {
                Ok(gone) if !gone.is_empty() => tracing::info!(
                    hosts = ?gone,
                    "forgot hosts silent for {HOST_GONE:?}"
                ),
                Ok(_) => {}
                Err(e) => tracing::debug!("pruning the hosts failed: {e}"),
            }
        }
        if self.hosts_at.is_none_or(|t| t.elapsed() >= HOSTS_EVERY) {
            match self.broker.hosts() {
                Ok(h) => self.hosts = h,
                Err(e) => tracing::debug!("listing the hosts failed: {e}"),
            }
            self.hosts_at = Some(Instant::now());
        }
        self.hosts
            .iter()
            .map(|h| evod_wire::HostStatus {
                host: h.host.clone(),
                workers: h.workers,
                tasks_done: h.tasks_done,
                last_seen_s: h.last_seen.as_secs_f64(),
            })
            .collect()
    }

    /// One line about the broker for the run's last words.
    pub fn summary(&mut self) -> String {
        self.hosts_at = None;
        let hosts = self.hosts();
        let list: Vec<String> = hosts
            .iter()
            .map(|h| format!("{} ({} results)", h.host, h.tasks_done))
            .collect();
        format!(
            "broker run {}: {} tasks enqueued by this coordinator, {} results by its own workers; hosts: {}",
            self.settings.run,
            self.enqueued,
            self.host.as_ref().map_or(0, |h| h.recorded),
            if list.is_empty() {
                "-".to_owned()
            } else {
                list.join(", ")
            }
        )
    }

    fn stopping(&self) -> Result<(), EvalError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(EvalError::Unavailable("the evolver is stopping".into()));
        }
        Ok(())
    }

    /// `op` retried while the broker is unreachable (logged); a stop ends
    /// the retries.
    fn retry<T>(
        &mut self,
        what: &str,
        mut op: impl FnMut(&mut RedisBroker, &Lease) -> Result<T, BrokerError>,
    ) -> Result<T, EvalError> {
        let url = self.settings.shown_url();
        let (broker, lease) = (&mut self.broker, &self.lease);
        retry_logged(what, &url, &self.stop, || op(broker, lease)).map_err(|e| match e {
            BrokerError::Unavailable { .. } => EvalError::Unavailable(e.to_string()),
            e => EvalError::Failed(format!("broker: {what}: {e}")),
        })
    }

    /// Tasks of `round` for the candidates `which` (indices into the
    /// round's candidates, ascending), contiguous runs of at most
    /// `per_task`, each flagged with the round's `purpose`.
    fn tasks(
        &self,
        round: u64,
        work: &RoundWork<'_>,
        which: &[u32],
        seed: u64,
        episodes: u32,
    ) -> Vec<Task> {
        let gate = work.purpose() == Purpose::Gate;
        let mut out: Vec<Task> = Vec::new();
        for &c in which {
            match out.last_mut() {
                Some(t)
                    if t.first + t.work.len() as u32 == c
                        && t.work.len() < self.settings.per_task =>
                {
                    match (&mut t.work, work) {
                        (Work::Recipes { recipes, .. }, RoundWork::Es { recipes: all, .. }) => {
                            recipes.push(all[c as usize])
                        }
                        (Work::Ga(recipes), RoundWork::Ga(batch, _)) => {
                            recipes.push(batch.recipes[c as usize].clone())
                        }
                        _ => unreachable!("tasks of one round are of one kind"),
                    }
                }
                _ => out.push(Task {
                    run: self.settings.run.clone(),
                    generation: round,
                    seed,
                    episodes,
                    first: c,
                    gate,
                    work: match work {
                        RoundWork::Es { base, recipes, .. } => Work::Recipes {
                            base: base.checksum(),
                            recipes: vec![recipes[c as usize]],
                        },
                        RoundWork::Ga(batch, _) => {
                            Work::Ga(vec![batch.recipes[c as usize].clone()])
                        }
                    },
                }),
            }
        }
        out
    }

    /// Publishes the bases `work` needs (ES: the base; GA: every parent a
    /// recipe names), each under its checksum (idempotent on the broker),
    /// and checks the broker named each as we do. Returns their hashes.
    fn publish_bases(&mut self, work: &RoundWork<'_>) -> Result<Vec<u64>, EvalError> {
        let bases: Vec<(u64, &[f32])> = match work {
            RoundWork::Es { base, .. } => vec![(base.checksum(), base.params())],
            RoundWork::Ga(batch, _) => {
                let mut named: Vec<u64> = Vec::new();
                for h in batch.recipes.iter().flat_map(GaRecipe::parents) {
                    if !named.contains(&h) {
                        named.push(h);
                    }
                }
                named
                    .into_iter()
                    .map(|h| {
                        batch.parents.get(h).map(|p| (h, p)).ok_or_else(|| {
                            EvalError::Failed(format!(
                                "a GA recipe names parent {h:016x}, which the batch does not hold"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let mut out = Vec::with_capacity(bases.len());
        for (want, params) in bases {
            let step = self.generation;
            let hash = self.retry("publish a base", |b, _| b.publish_base(step, params))?;
            if hash != want {
                return Err(EvalError::Failed(format!(
                    "the broker named the base {hash:016x}, its checksum is {want:016x}"
                )));
            }
            out.push(hash);
        }
        Ok(out)
    }

    /// Evaluates `work` through the broker (see the module docs).
    fn round(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        work: &RoundWork<'_>,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let round = work.round_id(self.fingerprint, seed, episodes);
        // A round run again (a retried step) takes its dead letters again.
        self.finished.retain(|&r| r != round);
        let total = work.len();
        if total == 0 {
            return Ok(Vec::new());
        }
        let total_u32 = u32::try_from(total)
            .map_err(|_| EvalError::Failed(format!("{total} candidates in one round")))?;
        // The bases, once per hash (idempotent on the broker), indexed
        // under this step.
        let step = self.generation;
        let hashes = self.publish_bases(work)?;
        if self.bases != hashes {
            // Rounds of this step and before are complete: bases this one
            // does not name are not needed (a late copy of one of their
            // tasks finds its base gone and is acknowledged without
            // results). Bases of later steps (a previous coordinator's,
            // which a restart redoes) stay.
            match self.broker.bases() {
                Ok(listed) => {
                    for (old, _) in listed
                        .into_iter()
                        .filter(|&(h, s)| !hashes.contains(&h) && s <= step)
                    {
                        if let Err(e) = self.broker.drop_base(&self.lease, old) {
                            tracing::warn!("dropping base {old:016x} failed: {e}");
                        }
                    }
                }
                Err(e) => tracing::warn!("listing the bases failed: {e}"),
            }
            self.bases = hashes;
        }
        let all: Vec<u32> = (0..total_u32).collect();
        let tasks = self.tasks(round, work, &all, seed, episodes);
        let n_tasks = tasks.len();
        let id = Round { id: round, step };
        match self.retry("enqueue", |b, lease| b.enqueue(lease, id, &tasks))? {
            Enqueued::New(n) => {
                self.enqueued += n as u64;
                tracing::debug!(
                    generation = self.generation,
                    tasks = n,
                    candidates = total,
                    "round {round:016x} enqueued"
                );
            }
            Enqueued::Already => tracing::info!(
                generation = self.generation,
                tasks = n_tasks,
                "round {round:016x} was enqueued before (resumed): using what is recorded"
            ),
        }
        self.collect(ring, round, work, seed, episodes)
    }

    /// Waits for every candidate of `round` to have a result or be
    /// quarantined, evaluating tasks on the local workers meanwhile.
    fn collect(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        round: u64,
        work: &RoundWork<'_>,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let total = work.len();
        let mut quarantined = vec![false; total];
        let mut last_count = 0usize;
        let mut progress_at = Instant::now();
        let mut dead_at: Option<Instant> = None;
        // A round with no new result for this long is looked at: what is
        // missing is re-enqueued if no task is left on the broker (lost),
        // else the wait is logged (slow, or waiting for a host).
        let stall = self
            .settings
            .task_lease
            .saturating_mul(4)
            .max(Duration::from_secs(2));
        let url = self.settings.shown_url();
        let mut unreachable_since: Option<Instant> = None;
        loop {
            self.stopping()?;
            // Our own workers first: one task, without waiting long.
            let served = match self.host.as_mut() {
                Some(host) => host.serve(ring, Duration::from_millis(1)),
                None => Ok(0),
            };
            let worked = match served {
                Ok(n) => n,
                Err(e @ BrokerError::Unavailable { .. }) => {
                    // A stop interrupts a blocking read: not a broker problem.
                    self.stopping()?;
                    if unreachable_since.is_none() {
                        tracing::warn!("broker {url}: {e}; retrying");
                        unreachable_since = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => {
                    tracing::error!("evaluating a task here failed: {e}");
                    // Not a tight loop of the same error.
                    std::thread::sleep(Duration::from_millis(200));
                    0
                }
            };
            // After a task done here, only a look at the count (more tasks
            // may wait in the stream); else a wait of up to a slice, woken
            // when the round has all its results or a task is
            // dead-lettered (no undelivered task is left for the local
            // workers: only this coordinator adds tasks).
            let wait = if worked > 0 {
                Duration::ZERO
            } else {
                WAIT_SLICE
            };
            let count = match self.broker.wait_count(round, total, wait) {
                Ok(n) => n,
                Err(e @ BrokerError::Unavailable { .. }) => {
                    // A stop interrupts a blocking read: not a broker problem.
                    self.stopping()?;
                    if unreachable_since.is_none() {
                        tracing::warn!("broker {url}: {e}; retrying");
                        unreachable_since = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(EvalError::Failed(format!("broker: results: {e}"))),
            };
            if let Some(since) = unreachable_since.take() {
                tracing::info!(
                    "broker {url}: reachable again after {:.1}s",
                    since.elapsed().as_secs_f64()
                );
            }
            // A count (HLEN) while waiting; the results themselves are read
            // only when they may settle the round, or to look at a stall.
            // Dead letters after every wait (it may have been a letter that
            // woke it), else every `DEAD_LETTERS_EVERY`.
            if worked == 0 || dead_at.is_none_or(|t| t.elapsed() >= DEAD_LETTERS_EVERY) {
                dead_at = Some(Instant::now());
                self.poll_dead_letters()?;
            }
            let dead_here = self.dead.get(&round).map_or(0, |d| d.len());
            let stalled = count <= last_count && progress_at.elapsed() >= stall;
            if count > last_count {
                last_count = count;
                progress_at = Instant::now();
            }
            if count < total && (dead_here == 0 || count + dead_here < total) && !stalled {
                continue;
            }
            let results = match self.broker.results(round) {
                Ok(r) => r,
                Err(BrokerError::Unavailable { .. }) => continue,
                Err(e) => return Err(EvalError::Failed(format!("broker: results: {e}"))),
            };
            for bad in self.broker.take_malformed() {
                tracing::error!(round = %format_args!("{round:016x}"), "{bad}");
            }
            if results.len() < last_count {
                // Malformed entries removed: those candidates are missing.
                last_count = results.len();
            }
            self.apply_dead_letters(round, &results, &mut quarantined);
            let have: std::collections::HashSet<u32> =
                results.iter().map(|r| r.candidate).collect();
            let settled = (0..total)
                .filter(|&i| have.contains(&(i as u32)) || quarantined[i])
                .count();
            if settled == total {
                return Ok(self.finish_round(round, total, &results, &quarantined));
            }
            if stalled {
                progress_at = Instant::now();
                // Slow is not lost: re-enqueue only when the missing
                // candidates' tasks are nowhere (a Redis restarted without
                // its AOF, a stream trimmed too short).
                let activity = match self.broker.activity(self.settings.task_lease) {
                    Ok(a) => a,
                    Err(BrokerError::Unavailable { .. }) => continue,
                    Err(e) => return Err(EvalError::Failed(format!("broker: activity: {e}"))),
                };
                let missing: Vec<u32> = (0..total as u32)
                    .filter(|c| !have.contains(c) && !quarantined[*c as usize])
                    .collect();
                if !activity.is_idle() {
                    tracing::info!(
                        generation = self.generation,
                        missing = missing.len(),
                        live = activity.live,
                        stale = activity.stale,
                        waiting = activity.waiting,
                        "round {round:016x}: no new result for {stall:?}; tasks are being evaluated ({}), to be taken over ({}) or waiting for a host ({})",
                        activity.live,
                        activity.stale,
                        activity.waiting
                    );
                    continue;
                }
                tracing::warn!(
                    generation = self.generation,
                    missing = missing.len(),
                    "round {round:016x}: no result for {stall:?} and no task left on the broker: re-enqueueing the candidates still missing"
                );
                // The bases too: a broker that lost its data lost them.
                self.publish_bases(work)?;
                let tasks = self.tasks(round, work, &missing, seed, episodes);
                let id = Round {
                    id: round,
                    step: self.generation,
                };
                let n = self.retry("re-enqueue", |b, lease| b.requeue(lease, id, &tasks))?;
                self.enqueued += n as u64;
            }
        }
    }

    /// Reads the dead letters added since the last read (each once) and
    /// keeps those of this run by round, but for rounds just finished; a
    /// malformed one is logged.
    fn poll_dead_letters(&mut self) -> Result<(), EvalError> {
        let letters = match self.broker.dead_letters_after(&self.dead_after) {
            Ok(l) => l,
            Err(BrokerError::Unavailable { .. }) => return Ok(()),
            Err(e) => return Err(EvalError::Failed(format!("broker: dead letters: {e}"))),
        };
        for letter in letters {
            self.dead_after = letter.id.clone();
            let task = match &letter.task {
                Ok(t) if t.run == self.settings.run => t,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!(
                        id = %letter.id,
                        "a malformed task was dead-lettered ({e}): {}",
                        letter.why.as_deref().unwrap_or("-")
                    );
                    continue;
                }
            };
            // A letter of a round that has finished (a late copy of one of
            // its tasks, dead-lettered since) would be kept for ever. Others
            // are kept, the round under way's and those of rounds not
            // collected yet (a restarted coordinator replaying, a retried
            // step).
            if self.finished.contains(&task.generation) {
                tracing::debug!(
                    id = %letter.id,
                    round = %format_args!("{:016x}", task.generation),
                    "dead letter of a finished round: dropped"
                );
                continue;
            }
            let entry = self.dead.entry(task.generation).or_default();
            for c in task.candidates() {
                if !entry.iter().any(|(x, _)| *x == c) {
                    entry.push((c, letter.clone()));
                }
            }
        }
        Ok(())
    }

    /// Quarantines the candidates of `round`'s dead letters that have no
    /// result.
    fn apply_dead_letters(&mut self, round: u64, results: &[TaskResult], quarantined: &mut [bool]) {
        let Some(letters) = self.dead.get(&round) else {
            return;
        };
        for (c, letter) in letters {
            let i = *c as usize;
            if i < quarantined.len()
                && !quarantined[i]
                && !results.iter().any(|r| r.candidate == *c)
            {
                quarantined[i] = true;
                tracing::warn!(
                    generation = self.generation,
                    candidate = c,
                    deliveries = letter.deliveries,
                    last_host = %letter.last_consumer,
                    "candidate quarantined: {}",
                    letter
                        .why
                        .as_deref()
                        .unwrap_or("delivered too often without a result")
                );
            }
        }
    }

    /// The round's fitnesses in candidate order, and the round noted as
    /// done.
    fn finish_round(
        &mut self,
        round: u64,
        total: usize,
        results: &[TaskResult],
        quarantined: &[bool],
    ) -> Vec<Option<f64>> {
        let mut out = vec![None; total];
        // `results` is sorted by candidate; placed by index all the same.
        for r in results {
            if let Some(slot) = out.get_mut(r.candidate as usize) {
                *slot = Some(r.fitness);
            }
        }
        // A quarantined candidate has no result (a result that came after
        // all counts: it is in `results`).
        debug_assert!(
            out.iter()
                .zip(quarantined)
                .all(|(slot, &q)| slot.is_some() || q)
        );
        self.dead.remove(&round);
        self.finished.push_back(round);
        if self.finished.len() > FINISHED_KEPT {
            self.finished.pop_front();
        }
        out
    }
}

/// What one round evaluates: ES recipes against a base, or GA children
/// as recipes against their parents; and what for (training or the
/// publish gate).
enum RoundWork<'b> {
    Es {
        base: &'b Base<'b>,
        recipes: &'b [Recipe],
        purpose: Purpose,
    },
    Ga(&'b GaBatch<'b>, Purpose),
}

impl RoundWork<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Es { recipes, .. } => recipes.len(),
            Self::Ga(batch, _) => batch.recipes.len(),
        }
    }

    fn purpose(&self) -> Purpose {
        match self {
            Self::Es { purpose, .. } | Self::Ga(_, purpose) => *purpose,
        }
    }

    /// The round's broker name ([`round_id`], [`ga_round_id`]), its
    /// purpose mixed in: a gate and a training round of the same
    /// candidates and seed are two rounds.
    fn round_id(&self, fingerprint: u64, seed: u64, episodes: u32) -> u64 {
        let id = match self {
            Self::Es { base, recipes, .. } => {
                round_id(fingerprint, base.checksum(), recipes, seed, episodes)
            }
            Self::Ga(batch, _) => ga_round_id(fingerprint, batch.recipes, seed, episodes),
        };
        match self.purpose() {
            Purpose::Train => id,
            Purpose::Gate => {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                h.update(b"gate");
                h.update(&id.to_le_bytes());
                h.digest()
            }
        }
    }
}

/// [`round_id`] of a GA evaluation: the fingerprint, the episode seed and
/// count, and every recipe's encoding (which names its parents by
/// checksum), after a tag no ES round hashes.
pub fn ga_round_id(fingerprint: u64, recipes: &[GaRecipe], seed: u64, episodes: u32) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(b"ga-round");
    h.update(&fingerprint.to_le_bytes());
    h.update(&seed.to_le_bytes());
    h.update(&episodes.to_le_bytes());
    h.update(&(recipes.len() as u64).to_le_bytes());
    let mut buf = Vec::new();
    for r in recipes {
        buf.clear();
        // A recipe that cannot be encoded cannot be enqueued either (the
        // enqueue reports it); its bytes so far still name it here.
        let _ = r.encode_into(&mut buf);
        h.update(&buf);
    }
    h.digest()
}

/// The broker name of an evaluation: a hash (xxh3) of everything that
/// decides its fitnesses — the run's model and build ([`fingerprint`]),
/// the base, the recipes, the episode seed and count. The same evaluation
/// redone (a restart) has the same name; any other (another model or
/// task, another build) has another.
pub fn round_id(fingerprint: u64, base: u64, recipes: &[Recipe], seed: u64, episodes: u32) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&fingerprint.to_le_bytes());
    h.update(&base.to_le_bytes());
    h.update(&seed.to_le_bytes());
    h.update(&episodes.to_le_bytes());
    h.update(&(recipes.len() as u64).to_le_bytes());
    for r in recipes {
        h.update(&r.to_bytes());
    }
    h.digest()
}

/// The evolver's evaluator of one step (see [`Coordination::evaluator`]).
pub struct Distributed<'a, 's> {
    coord: &'a mut Coordination,
    ring: &'a mut RingEvaluator<'s>,
}

impl Evaluator for Distributed<'_, '_> {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        // Bare vectors (no recipe to ship): the evolver sends none in a
        // distributed run; evaluated here if it ever does.
        self.ring.evaluate(candidates, seed, episodes)
    }

    fn evaluate_for(
        &mut self,
        purpose: Purpose,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.ring.evaluate_for(purpose, candidates, seed, episodes)
    }

    fn evaluate_recipes(
        &mut self,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.evaluate_recipes_for(Purpose::Train, base, recipes, seed, episodes)
    }

    fn evaluate_recipes_for(
        &mut self,
        purpose: Purpose,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let work = RoundWork::Es {
            base,
            recipes,
            purpose,
        };
        self.coord.round(self.ring, &work, seed, episodes)
    }

    fn evaluate_ga_for(
        &mut self,
        purpose: Purpose,
        batch: &GaBatch<'_>,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.coord
            .round(self.ring, &RoundWork::Ga(batch, purpose), seed, episodes)
    }
}

/// Waits until `--min-hosts` evaluator hosts other than this one have
/// heartbeat within the last few seconds; `false` if stopped meanwhile.
fn wait_for_hosts(
    broker: &mut RedisBroker,
    settings: &DistSettings,
    stop: &AtomicBool,
) -> anyhow::Result<bool> {
    let want = settings.min_hosts as usize;
    if want == 0 {
        return Ok(true);
    }
    let url = settings.shown_url();
    let mut said = None;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let hosts = retry_logged("list the hosts", &url, stop, || broker.hosts())?;
        let live: Vec<&str> = hosts
            .iter()
            .filter(|h| h.host != settings.host && h.last_seen < Duration::from_secs(3))
            .map(|h| h.host.as_str())
            .collect();
        if live.len() >= want {
            tracing::info!(hosts = ?live, "{} evaluator hosts are here: evolving", live.len());
            return Ok(true);
        }
        if said != Some(live.len()) {
            tracing::info!(
                "waiting for {want} evaluator hosts of run {} (--min-hosts); {} so far",
                settings.run,
                live.len()
            );
            said = Some(live.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// This build's protocol: the hosts of a run must speak it (wire format
/// and evaluation code).
pub fn build() -> String {
    format!(
        "evod-{}/wire-{}",
        env!("CARGO_PKG_VERSION"),
        evod_broker::wire::WIRE_VERSION
    )
}

/// An xxh3 of what decides a candidate's fitness besides its parameters:
/// the model's architecture and task (not its weights, generation or
/// other metadata, which change with every publish).
pub fn spec_hash(spec: &evod_runtime::ModelSpec) -> u64 {
    xxhash_rust::xxh3::xxh3_64(format!("{:?}|{}", spec.arch, spec.task).as_bytes())
}

/// The fingerprint of what a run's rounds are evaluated with: the model's
/// [`spec_hash`] and [`build`].
pub fn fingerprint(spec: &evod_runtime::ModelSpec) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&spec_hash(spec).to_le_bytes());
    h.update(build().as_bytes());
    h.digest()
}

/// The run setting under which the coordinator publishes the run's
/// fingerprint, as `<spec_hash hex> <build>`: a host with another network
/// or task fetches the run's model again, one of another build refuses
/// the run's tasks loudly.
pub const FINGERPRINT_SETTING: &str = "fingerprint";

/// The run setting under which the coordinator publishes its
/// per-candidate evaluation timeout (milliseconds) for the hosts.
pub const EVAL_TIMEOUT_SETTING: &str = "eval-timeout-per-candidate-ms";

/// Logs a lost lease and ends the process (the supervisor restarts the
/// evolver, which waits for the lease again).
fn lease_lost(e: &BrokerError) -> ! {
    tracing::error!(
        "{e}: another coordinator took the run over; stopping this evolver (it waits for the lease when restarted)"
    );
    std::process::exit(LEASE_LOST_EXIT);
}

/// The lease keeper thread: renews every third of the ttl; a lease that
/// another holder took ends the process (another coordinator publishes
/// now); a lease that only lapsed while Redis was away is taken again.
/// Dropped, it stops the thread, waits for it, and releases the lease.
struct Keeper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    fn start(broker: RedisBroker, lease: Lease, url: String) -> std::io::Result<Keeper> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("lease-keeper".into())
            .spawn(move || keep_lease(broker, &lease, &url, &flag))?;
        Ok(Keeper {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Keeper {
    /// Stops the keeper, then gives the lease up (a graceful stop): a
    /// waiting coordinator takes over at once instead of after the ttl.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The keeper's loop (see [`Keeper`]); releases the lease when stopped.
fn keep_lease(mut broker: RedisBroker, lease: &Lease, url: &str, stop: &AtomicBool) {
    let every = lease.ttl / 3;
    let mut failing: Option<Instant> = None;
    let mut next = Instant::now() + every;
    loop {
        // Short naps: a stop is taken within 50 ms.
        while Instant::now() < next {
            if stop.load(Ordering::Relaxed) {
                match broker.release_lease(lease) {
                    Ok(()) => tracing::info!("coordinator lease released"),
                    Err(e) => tracing::warn!(
                        "releasing the coordinator lease failed (it lapses by itself): {e}"
                    ),
                }
                return;
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
        }
        next = Instant::now() + every;
        match broker.renew_lease(lease) {
            Ok(retaken) => {
                if let Some(since) = failing.take() {
                    tracing::info!(
                        "broker {url}: lease renewed again after {:.1}s",
                        since.elapsed().as_secs_f64()
                    );
                }
                if retaken {
                    tracing::warn!(
                        "broker {url}: the coordinator lease had lapsed while Redis was away and nobody took it: taken again"
                    );
                }
            }
            Err(e @ BrokerError::LeaseLost { .. }) => lease_lost(&e),
            Err(e) => {
                if failing.is_none() {
                    failing = Some(Instant::now());
                    tracing::warn!("broker {url}: renewing the coordinator lease: {e}; retrying");
                }
            }
        }
    }
}
