//! [`EvalHost`]: one evaluator host's side of the broker — read tasks (or
//! take over those of dead consumers), fetch each base once by hash,
//! evaluate the recipes on the local workers through the evolver's own
//! [`RingEvaluator`] (the base written as `state/base/<checksum>.gguf`, the
//! `EVAL_RECIPES` path), and acknowledge the results under this host's id.
//!
//! A keeper thread with its own connection heartbeats (with the worker
//! count) and extends the leases of the tasks under evaluation, so a long
//! evaluation is not taken for a dead one. A task whose base cannot be
//! used here (missing parameters, another network) is refused loudly: it
//! goes to the dead-letter stream with the reason, and its candidates are
//! quarantined by the coordinator; a candidate the workers could not
//! evaluate (it crashed a worker twice) is dead-lettered likewise.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use evod_broker::{BrokerError, Delivery, Evaluator as _, RedisBroker, Task, TaskResult};
use evod_evolve::{Base, Evaluator as _, ParamLayout};

use super::DistSettings;
use crate::evolver::RingEvaluator;

/// How often the keeper heartbeats.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Most tasks taken over at once.
const RECLAIM_MAX: usize = 4;

/// Tasks under evaluation, for the keeper thread.
type InFlight = Arc<Mutex<Vec<Delivery>>>;

/// One evaluator host (see the module docs).
pub struct EvalHost {
    broker: RedisBroker,
    settings: DistSettings,
    layout: ParamLayout,
    /// The last base fetched: (hash, parameters).
    base: Option<(u64, Vec<f32>)>,
    in_flight: InFlight,
    last_reclaim: Instant,
    /// Candidate results recorded by this host (duplicates not counted).
    pub recorded: u64,
    /// Set by SIGTERM: stop between tasks.
    stop: Arc<AtomicBool>,
}

impl EvalHost {
    /// A host of `workers` workers evaluating for the network of `layout`,
    /// with its keeper thread started.
    pub fn start(
        settings: &DistSettings,
        layout: ParamLayout,
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
            base: None,
            in_flight,
            last_reclaim: Instant::now(),
            recorded: 0,
            stop,
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
        for d in deliveries {
            if self.stop.load(Ordering::Relaxed) {
                // Left leased: taken over by another host after the lease.
                break;
            }
            self.handle(ring, d)?;
        }
        Ok(n)
    }

    /// Evaluates one delivered task and acknowledges its results.
    fn handle(&mut self, ring: &mut RingEvaluator<'_>, d: Delivery) -> Result<(), BrokerError> {
        let task = &d.task;
        if self.base.as_ref().is_none_or(|(h, _)| *h != task.base) {
            match self.broker.fetch_base(task.base) {
                Ok(params) => self.base = Some((task.base, params)),
                Err(BrokerError::BaseMissing { .. }) => {
                    // Dropped by the coordinator: its round is complete (a
                    // late copy of a task done elsewhere). Nothing to add.
                    tracing::info!(
                        id = %d.id,
                        round = %format_args!("{:016x}", task.generation),
                        "base {:016x} is gone (round complete): acknowledging the task without results",
                        task.base
                    );
                    self.broker.ack(&d, &[])?;
                    return Ok(());
                }
                Err(e @ (BrokerError::BaseMismatch { .. } | BrokerError::BadBase { .. })) => {
                    return self
                        .refuse(&d, &format!("refused by host {}: {e}", self.settings.host));
                }
                Err(e) => return Err(e),
            }
        }
        let (_, params) = self.base.as_ref().expect("fetched above");
        let base = match Base::new(params, &self.layout) {
            Ok(b) => b,
            Err(e) => {
                let why = format!(
                    "refused by host {}: base {:016x} does not fit this run's network: {e}",
                    self.settings.host, task.base
                );
                return self.refuse(&d, &why);
            }
        };
        self.lock().push(d.clone());
        let started = Instant::now();
        let outcome = ring.evaluate_recipes(&base, &task.recipes, task.seed, task.episodes);
        self.lock().retain(|x| x.id != d.id);
        let fitness = match outcome {
            Ok(f) if f.len() == task.recipes.len() => f,
            Ok(f) => {
                tracing::error!(
                    id = %d.id,
                    "the workers answered {} fitnesses for {} candidates; leaving the task to be retried",
                    f.len(),
                    task.recipes.len()
                );
                return Ok(());
            }
            Err(e) => {
                // Not acknowledged: retried here or elsewhere after the
                // lease, dead-lettered after too many deliveries.
                tracing::warn!(id = %d.id, "evaluating a task failed, left to be retried: {e}");
                return Ok(());
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
        let outcome = self.ack(&d, &results)?;
        self.recorded += outcome.recorded as u64;
        tracing::debug!(
            id = %d.id,
            round = %format_args!("{:016x}", task.generation),
            candidates = task.recipes.len(),
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
        if !failed.is_empty() {
            // The candidates the workers could not evaluate, as a task of
            // their own in the dead-letter stream: quarantined by the
            // coordinator as it would locally.
            for c in &failed {
                let i = (c - task.first) as usize;
                let sub = Delivery {
                    id: d.id.clone(),
                    task: Task {
                        first: *c,
                        recipes: vec![task.recipes[i]],
                        ..task.clone()
                    },
                    deliveries: d.deliveries,
                };
                self.broker.refuse(
                    &sub,
                    &format!(
                        "candidate {c} could not be evaluated on host {} (it crashed a worker twice or has no finite fitness)",
                        self.settings.host
                    ),
                )?;
            }
        }
        Ok(())
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

    fn refuse(&mut self, d: &Delivery, why: &str) -> Result<(), BrokerError> {
        tracing::error!(id = %d.id, round = %format_args!("{:016x}", d.task.generation), "{why}; dead-lettered");
        self.broker.refuse(d, why)
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
