//! [`EvalHost`]: one evaluator host's side of the broker — read tasks (or
//! take over those of dead consumers), fetch each base once by hash (kept
//! in a bounded cache), evaluate on the local workers through the
//! evolver's own [`RingEvaluator`] — ES recipes against their base (written
//! as `state/base/<checksum>.gguf`, the `EVAL_RECIPES` path), GA children
//! rebuilt here from their recipes and parents (`GaRecipe::apply_to`, the
//! code the evolver made them with) and sent as vectors — and acknowledge
//! the results under this host's id. A task flagged as the publish gate's
//! (`Task::gate`) goes to the workers as the single-host gate does
//! (`Purpose::Gate`: a perplexity worker scores the held-out windows);
//! training tasks keep their seeded window subsets.
//!
//! Nothing in a task is trusted: a base that does not hash to its name,
//! a base or recipe that does not fit the network, a parent that is not on
//! the broker while its round is open, a child that rebuilds to a
//! non-finite value — each is refused loudly (released, or dead-lettered
//! with the reason when no host could evaluate it), never evaluated.
//!
//! A keeper thread with its own connection heartbeats (with the worker
//! count) and extends the leases of the tasks under evaluation, so a long
//! evaluation is not taken for a dead one.
//!
//! A host's own failure never condemns a task: a task it could not finish
//! (an evaluation error, candidates without a fitness here, a base it
//! cannot fetch or that does not fit its model) is *released* — what
//! results there are recorded, the task left pending with its idle time
//! at a lease, so another host takes it over at once (a host is not handed
//! back its own tasks before three leases) — and the host backs off before
//! its next task. Only a task delivered `max_deliveries` times (over the
//! hosts) is dead-lettered and its missing candidates quarantined by the
//! coordinator. A base that does not fit this host's model means the
//! model is stale: the host says so and [`EvalHost::model_stale`] tells
//! the feeder to exit, to be restarted with the run's model fetched again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use evod_broker::{BrokerError, Delivery, Evaluator as _, RedisBroker, TaskResult, Work};
use evod_evolve::{Base, Evaluator as _, GaParents, ParamLayout, Purpose};

use super::DistSettings;
use crate::evolver::RingEvaluator;

/// How often the keeper heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Most tasks taken over at once.
const RECLAIM_MAX: usize = 4;
/// First and longest pause after a task failed here (doubling while
/// tasks keep failing; reset by a task done).
/// The most memory a GA task's rebuilt children take at once (they are
/// rebuilt and evaluated in slices of this size, at least one child).
const GA_REBUILD_BUDGET: usize = 256 << 20;

const FAILURE_BACKOFF: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Bytes of bases a host keeps (at least those of the task at hand).
const BASE_CACHE_BYTES: usize = 256 << 20;

/// Bases a host fetched, by checksum, least recently used evicted first
/// beyond [`BASE_CACHE_BYTES`]: an ES base serves a round's tasks, a GA
/// parent every child of it, so each is fetched once per host. The bases
/// of the task at hand (used since [`BaseCache::begin`]) are never evicted.
#[derive(Default)]
struct BaseCache {
    /// (checksum, parameters, last use), in no order.
    entries: Vec<(u64, Vec<f32>, u64)>,
    clock: u64,
    /// The clock when the task at hand began.
    task_start: u64,
}

impl BaseCache {
    /// A new task begins: what it uses from now on is kept.
    fn begin(&mut self) {
        self.clock += 1;
        self.task_start = self.clock;
    }

    /// Whether the base is held (and marks it used).
    fn contains(&mut self, hash: u64) -> bool {
        self.clock += 1;
        let now = self.clock;
        match self.entries.iter_mut().find(|(h, _, _)| *h == hash) {
            Some(e) => {
                e.2 = now;
                true
            }
            None => false,
        }
    }

    fn get(&self, hash: u64) -> Option<&[f32]> {
        self.entries
            .iter()
            .find(|(h, _, _)| *h == hash)
            .map(|(_, p, _)| p.as_slice())
    }

    /// Adds a base (used now), then evicts the least recently used bases
    /// of earlier tasks while the cache holds more than the budget.
    fn insert(&mut self, hash: u64, params: Vec<f32>) {
        self.clock += 1;
        self.entries.push((hash, params, self.clock));
        self.entries.sort_by_key(|e| std::cmp::Reverse(e.2));
        let mut bytes: usize = self.entries.iter().map(|e| 4 * e.1.len()).sum();
        while bytes > BASE_CACHE_BYTES && self.entries.last().is_some_and(|e| e.2 < self.task_start)
        {
            let old = self.entries.pop().expect("checked");
            bytes -= 4 * old.1.len();
        }
    }
}

/// Tasks under evaluation, for the keeper thread.
type InFlight = Arc<Mutex<Vec<Delivery>>>;

/// One evaluator host (see the module docs).
pub struct EvalHost {
    broker: RedisBroker,
    settings: DistSettings,
    layout: ParamLayout,
    /// Bases fetched (ES bases, GA parents), by checksum.
    bases: BaseCache,
    in_flight: InFlight,
    last_reclaim: Instant,
    /// Candidate results recorded by this host (duplicates not counted).
    pub recorded: u64,
    /// Set by SIGTERM: stop between tasks.
    stop: Arc<AtomicBool>,
    /// Set when a base did not fit this host's model and the run's model
    /// is another (a stale model file): the feeder exits to fetch it again.
    pub model_stale: bool,
    /// xxh3 of the model file this host's workers run.
    model_hash: u64,
    /// Its network and task ([`super::coordinator::spec_hash`]).
    spec_hash: u64,
    /// Backoff after a failed task, and until when this host takes none.
    backoff: evod_broker::Backoff,
    paused_until: Option<Instant>,
}

/// A task this host could not finish (released for another host).
struct Failed;

impl EvalHost {
    /// A host of `workers` workers evaluating for the network of `layout`
    /// (of the model file whose xxh3 is `model_hash`, whose network and
    /// task hash to `spec_hash`), with its keeper thread started.
    pub fn start(
        settings: &DistSettings,
        layout: ParamLayout,
        model_hash: u64,
        spec_hash: u64,
        workers: u32,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<EvalHost> {
        let broker = settings.broker("")?;
        let in_flight: InFlight = Arc::default();
        let keeper = Keeper {
            broker: settings.broker("")?,
            url: settings.shown_url(),
            in_flight: Arc::clone(&in_flight),
            workers,
            extend_every: (settings.task_lease / 3).max(Duration::from_millis(20)),
        };
        std::thread::Builder::new()
            .name("broker-keeper".into())
            .spawn(move || keeper.run())?;
        Ok(EvalHost {
            broker,
            settings: settings.clone(),
            layout,
            bases: BaseCache::default(),
            in_flight,
            last_reclaim: Instant::now(),
            recorded: 0,
            stop,
            model_stale: false,
            model_hash,
            spec_hash,
            backoff: evod_broker::Backoff::new(FAILURE_BACKOFF.0, FAILURE_BACKOFF.1),
            paused_until: None,
        })
    }

    /// Evaluates what there is: tasks of dead consumers first (every half
    /// lease), else up to one new task, waiting up to `block` for it.
    /// Returns how many tasks were handled. A broker that is unreachable is
    /// `BrokerError::Unavailable` (the caller retries; the tasks stay
    /// leased to us and are taken over by others if we stay away).
    pub fn serve(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        block: Duration,
    ) -> Result<usize, BrokerError> {
        if let Some(until) = self.paused_until {
            let now = Instant::now();
            if now < until && !self.model_stale {
                // Backing off after a failure: no task meanwhile.
                std::thread::sleep(block.min(until - now));
                return Ok(0);
            }
            self.paused_until = None;
        }
        if self.model_stale {
            return Ok(0);
        }
        let mut deliveries = Vec::new();
        if self.last_reclaim.elapsed() >= self.settings.task_lease / 2 {
            let r = self.broker.reclaim(RECLAIM_MAX)?;
            self.last_reclaim = Instant::now();
            if !r.tasks.is_empty() {
                tracing::warn!(
                    tasks = r.tasks.len(),
                    "took over tasks whose consumer went silent for a lease"
                );
            }
            if r.dead_lettered > 0 {
                tracing::error!(
                    tasks = r.dead_lettered,
                    "tasks delivered too often without a result: dead-lettered"
                );
            }
            if !r.lost.is_empty() {
                tracing::error!(
                    ids = ?r.lost,
                    "pending tasks were trimmed from the stream; the coordinator re-enqueues what is missing"
                );
            }
            deliveries = r.tasks;
        }
        if deliveries.is_empty() {
            deliveries = self.broker.read_tasks(1, block)?;
        }
        let n = deliveries.len();
        let mut failed = false;
        for d in deliveries {
            if self.stop.load(Ordering::Relaxed) || failed || self.model_stale {
                // Handed back at once for another host (or taken over by
                // one after the lease if the broker is away).
                let _ = self.broker.release(&d, &[]);
                continue;
            }
            match self.handle(ring, d)? {
                Ok(()) => self.backoff.reset(),
                Err(Failed) => failed = true,
            }
        }
        if failed {
            let delay = self.backoff.next_delay();
            tracing::warn!(
                "a task failed on this host: taking no task for {delay:?} (other hosts take it over)"
            );
            self.paused_until = Some(Instant::now() + delay);
        }
        Ok(n)
    }

    /// Hands a task back for another host (see the module docs), with the
    /// results there are; a [`Failed`] task.
    fn release(
        &mut self,
        d: &Delivery,
        results: &[TaskResult],
        why: &str,
    ) -> Result<Result<(), Failed>, BrokerError> {
        tracing::error!(
            id = %d.id,
            round = %format_args!("{:016x}", d.task.generation),
            delivery = d.deliveries,
            "{why}; task released for another host"
        );
        let outcome = self.broker.release(d, results)?;
        self.recorded += outcome.recorded as u64;
        Ok(Err(Failed))
    }

    /// Makes sure every base `d`'s task names is in the cache, fetching
    /// the missing ones (and, when any was fetched, checking the run's
    /// fingerprint and taking its evaluation timeout). `Some(outcome)`:
    /// the task was settled here (a late copy acknowledged, or refused or
    /// released) and must not be evaluated.
    fn fetch_bases(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        d: &Delivery,
    ) -> Result<Option<Result<(), Failed>>, BrokerError> {
        let task = &d.task;
        let mut fetched = Vec::new();
        self.bases.begin();
        for hash in task.work.bases() {
            if self.bases.contains(hash) {
                continue;
            }
            match self.broker.fetch_base(hash) {
                Ok(params) => fetched.push((hash, params)),
                Err(BrokerError::BaseMissing { .. }) => {
                    return self.base_missing(d, hash).map(Some);
                }
                Err(e @ (BrokerError::BaseMismatch { .. } | BrokerError::BadBase { .. })) => {
                    let why = format!(
                        "host {} cannot use the task's base: {e}",
                        self.settings.host
                    );
                    return self.release(d, &[], &why).map(Some);
                }
                Err(e) => return Err(e),
            }
        }
        if fetched.is_empty() {
            return Ok(None);
        }
        // The run's fingerprint and the coordinator's evaluation timeout,
        // read with each new base (a restarted coordinator may have
        // others), in one round trip. Another model means this host's is
        // stale (fetched again by a feeder restart), another build is
        // refused loudly, never evaluated.
        let mut settings = self
            .broker
            .fetch_run_settings(&[
                super::coordinator::FINGERPRINT_SETTING,
                super::coordinator::EVAL_TIMEOUT_SETTING,
            ])?
            .into_iter();
        let (fingerprint, timeout) = (settings.next().flatten(), settings.next().flatten());
        if let Some(fp) = fingerprint {
            let mine = format!("{:016x} {}", self.spec_hash, super::coordinator::build());
            if fp != mine {
                let (model, build) = fp.split_once(' ').unwrap_or((fp.as_str(), ""));
                let why = if build != super::coordinator::build() {
                    format!(
                        "refused by host {}: the run's coordinator is build {build:?}, this host is {:?}: not evaluated",
                        self.settings.host,
                        super::coordinator::build()
                    )
                } else {
                    self.model_stale = true;
                    format!(
                        "the run's network and task are {model}, this host's {:016x}: the host's model is stale, fetching the run's model again",
                        self.spec_hash
                    )
                };
                return self.release(d, &[], &why).map(Some);
            }
        }
        if let Some(ms) = timeout {
            match ms.parse::<u64>() {
                Ok(ms) => ring.per_candidate_timeout = Duration::from_millis(ms),
                Err(_) => tracing::warn!(
                    "the run's evaluation timeout on the broker is not a number of ms: {ms:?}; keeping {:?}",
                    ring.per_candidate_timeout
                ),
            }
        }
        for (hash, params) in fetched {
            self.bases.insert(hash, params);
        }
        Ok(None)
    }

    /// A task names base `hash`, which is not on the broker. A late copy
    /// of a finished round (its base dropped by the coordinator once the
    /// round was complete, or the round retired) is acknowledged without
    /// results; a task of an open round whose candidates are still
    /// missing names a base nobody published (a forged or broken task):
    /// refused into the dead letters with the reason, never evaluated.
    fn base_missing(&mut self, d: &Delivery, hash: u64) -> Result<Result<(), Failed>, BrokerError> {
        let task = &d.task;
        let round = format!("{:016x}", task.generation);
        match self
            .broker
            .outstanding(task.generation, task.candidates())?
        {
            Some(missing) if !missing.is_empty() => {
                let why = format!(
                    "refused by host {}: the task names base {hash:016x}, which is not on the broker, while its round {round} still misses candidates {missing:?}: not evaluated",
                    self.settings.host
                );
                tracing::error!(id = %d.id, round = %round, "{why}; dead-lettered");
                self.broker.refuse(d, &why)?;
                Ok(Err(Failed))
            }
            open => {
                tracing::info!(
                    id = %d.id,
                    round = %round,
                    "base {hash:016x} is gone and the round is {}: acknowledging the task without results",
                    if open.is_some() { "complete" } else { "retired" }
                );
                self.broker.ack(d, &[])?;
                Ok(Ok(()))
            }
        }
    }

    /// A task whose base or recipes do not fit this host's network. Never
    /// evaluated. Either this host's model file is stale (the run was
    /// restarted with another model: the feeder fetches it again, the
    /// task goes to another host), or the task does not fit the run's own
    /// model either (then every host would refuse it: dead-lettered with
    /// the reason).
    fn does_not_fit(
        &mut self,
        d: &Delivery,
        what: String,
    ) -> Result<Result<(), Failed>, BrokerError> {
        let run_model = self.broker.fetch_model()?;
        if run_model.is_some_and(|m| xxhash_rust::xxh3::xxh3_64(&m) != self.model_hash) {
            self.model_stale = true;
            let why = format!(
                "{what} does not fit this host's model and the run's model changed: the host's model is stale, fetching the run's model again"
            );
            return self.release(d, &[], &why);
        }
        let why = format!(
            "refused by host {}: {what} does not fit this run's network",
            self.settings.host
        );
        tracing::error!(id = %d.id, round = %format_args!("{:016x}", d.task.generation), "{why}; dead-lettered");
        self.broker.refuse(d, &why)?;
        Ok(Err(Failed))
    }

    /// A task whose candidates cannot be rebuilt as they were made
    /// (a forged or broken recipe): dead-lettered with the reason, never
    /// evaluated.
    fn refuse(&mut self, d: &Delivery, what: String) -> Result<Result<(), Failed>, BrokerError> {
        let why = format!(
            "refused by host {}: {what}: not evaluated",
            self.settings.host
        );
        tracing::error!(id = %d.id, round = %format_args!("{:016x}", d.task.generation), "{why}; dead-lettered");
        self.broker.refuse(d, &why)?;
        Ok(Err(Failed))
    }

    /// Evaluates one delivered task and acknowledges its results; a task
    /// it could not finish is released ([`Failed`]).
    fn handle(
        &mut self,
        ring: &mut RingEvaluator<'_>,
        d: Delivery,
    ) -> Result<Result<(), Failed>, BrokerError> {
        if let Some(settled) = self.fetch_bases(ring, &d)? {
            return Ok(settled);
        }
        let task = &d.task;
        // Every base must be a vector of this host's network.
        for hash in task.work.bases() {
            let len = self.bases.get(hash).map_or(0, <[f32]>::len);
            if len != self.layout.n_params() {
                let what = format!(
                    "base {hash:016x} ({len} parameters; the network has {})",
                    self.layout.n_params()
                );
                return self.does_not_fit(&d, what);
            }
        }
        self.lock().push(d.clone());
        let started = Instant::now();
        let purpose = if task.gate {
            Purpose::Gate
        } else {
            Purpose::Train
        };
        let outcome = match &task.work {
            Work::Recipes { base, recipes } => {
                let params = self.bases.get(*base).expect("fetched above");
                let base = Base::with_checksum(params, &self.layout, *base)
                    .expect("the length was checked above");
                ring.evaluate_recipes_for(purpose, &base, recipes, task.seed, task.episodes)
            }
            Work::Ga(recipes) => {
                let mut parents = GaParents::new(&self.layout);
                for hash in task.work.bases() {
                    parents.insert(hash, self.bases.get(hash).expect("fetched above"));
                }
                // Rebuilt and evaluated a slice at a time, so that a task of
                // many children of a big network (up to 255 in a task) never
                // holds more than GA_REBUILD_BUDGET of them at once. A
                // candidate's fitness does not depend on its neighbours (a
                // task is itself a slice of its round), so slices change
                // nothing. A child that cannot be rebuilt refuses the whole
                // task, whatever its slices scored.
                let per_slice = (GA_REBUILD_BUDGET / (4 * self.layout.n_params().max(1))).max(1);
                let mut scored = Vec::with_capacity(recipes.len());
                let mut outcome = Ok(Vec::new());
                for (k, slice) in recipes.chunks(per_slice).enumerate() {
                    let mut children = Vec::with_capacity(slice.len());
                    let mut bad = None;
                    for (i, r) in slice.iter().enumerate() {
                        let c = task.first as usize + k * per_slice + i;
                        match r.materialize(&parents) {
                            Ok(child) => match child.iter().position(|x| !x.is_finite()) {
                                None => children.push(child),
                                Some(at) => {
                                    bad = Some(Err(format!(
                                        "candidate {c} rebuilt from its recipe has the non-finite value {} at index {at}",
                                        child[at]
                                    )));
                                    break;
                                }
                            },
                            Err(e @ evod_evolve::RecipeError::TensorCount { .. }) => {
                                bad = Some(Ok(format!("the recipe of candidate {c} ({e})")));
                                break;
                            }
                            Err(e) => {
                                bad = Some(Err(format!("candidate {c} cannot be rebuilt: {e}")));
                                break;
                            }
                        }
                    }
                    if let Some(fit) = bad {
                        self.lock().retain(|x| x.id != d.id);
                        return match fit {
                            Ok(what) => self.does_not_fit(&d, what),
                            Err(what) => self.refuse(&d, what),
                        };
                    }
                    let refs: Vec<&[f32]> = children.iter().map(Vec::as_slice).collect();
                    match ring.evaluate_for(purpose, &refs, task.seed, task.episodes) {
                        Ok(f) => scored.extend(f),
                        Err(e) => {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
                outcome.map(|_: Vec<Option<f64>>| scored)
            }
        };
        self.lock().retain(|x| x.id != d.id);
        let fitness = match outcome {
            Ok(f) if f.len() == task.work.len() => f,
            Ok(f) => {
                let why = format!(
                    "the workers answered {} fitnesses for {} candidates",
                    f.len(),
                    task.work.len()
                );
                return self.release(&d, &[], &why);
            }
            Err(e) => {
                let why = format!("evaluating the task failed: {e}");
                return self.release(&d, &[], &why);
            }
        };
        let mut results = Vec::with_capacity(fitness.len());
        let mut failed = Vec::new();
        for (c, f) in task.candidates().zip(&fitness) {
            match f {
                Some(f) if !f.is_nan() => results.push(TaskResult {
                    run: task.run.clone(),
                    generation: task.generation,
                    candidate: c,
                    fitness: *f,
                    host: self.settings.host.clone(),
                }),
                _ => failed.push(c),
            }
        }
        if !failed.is_empty() {
            // Candidates without a fitness here (a worker crashed on them
            // twice, no finite fitness): the others are recorded, and the
            // task goes to another host; after `max_deliveries` it is
            // dead-lettered and what is still missing quarantined.
            let why = format!(
                "candidates {failed:?} could not be evaluated on host {} (a worker crashed on them twice, or no finite fitness)",
                self.settings.host
            );
            return self.release(&d, &results, &why);
        }
        let outcome = self.ack(&d, &results)?;
        self.recorded += outcome.recorded as u64;
        tracing::debug!(
            id = %d.id,
            round = %format_args!("{:016x}", task.generation),
            candidates = task.work.len(),
            recorded = outcome.recorded,
            duplicates = outcome.duplicates,
            took_ms = started.elapsed().as_millis() as u64,
            "task done"
        );
        if outcome.duplicates > 0 {
            tracing::info!(
                id = %d.id,
                duplicates = outcome.duplicates,
                "results already recorded by another delivery: discarded"
            );
        }
        Ok(Ok(()))
    }

    /// Acknowledges with retries while the broker is unreachable (the ack
    /// is idempotent), up to one lease; then the task is left to be taken
    /// over.
    fn ack(
        &mut self,
        d: &Delivery,
        results: &[TaskResult],
    ) -> Result<evod_broker::AckOutcome, BrokerError> {
        let deadline = Instant::now() + self.settings.task_lease;
        let mut backoff = evod_broker::Backoff::default();
        let url = self.settings.shown_url();
        evod_broker::retry_unavailable(
            deadline,
            &mut backoff,
            |e, delay| {
                tracing::warn!(
                    "broker {url}: acknowledging {}: {e}; retrying in {delay:?}",
                    d.id
                )
            },
            || self.broker.ack(d, results),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Delivery>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The keeper thread: heartbeats and lease extensions.
struct Keeper {
    broker: RedisBroker,
    url: String,
    in_flight: InFlight,
    workers: u32,
    extend_every: Duration,
}

impl Keeper {
    fn run(mut self) {
        let mut last_extend = Instant::now();
        let mut failing = false;
        loop {
            let r = self.broker.heartbeat(self.workers).and_then(|()| {
                if last_extend.elapsed() >= self.extend_every {
                    last_extend = Instant::now();
                    let leased = self
                        .in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    for d in &leased {
                        match self.broker.extend(d) {
                            Ok(()) => {}
                            Err(e @ BrokerError::NotLeased { .. }) => {
                                // Acknowledged meanwhile, or taken over by
                                // another host after a stall.
                                tracing::debug!("{e}: its results count only if first");
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Ok(())
            });
            match r {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("broker {}: heartbeat: reachable again", self.url);
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!("broker {}: heartbeat: {e}; retrying", self.url);
                }
                Err(_) => {}
            }
            std::thread::sleep(HEARTBEAT_EVERY.min(self.extend_every));
        }
    }
}
