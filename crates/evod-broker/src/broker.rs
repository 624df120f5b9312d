//! The broker traits: [`Coordinator`] (the one process that publishes a
//! run's generations) and [`Evaluator`] (any number of hosts that evaluate
//! them), and the plain types they exchange. An engine implements both.

use std::time::Duration;

use crate::error::BrokerError;
use crate::wire::{Task, TaskResult};

/// A held coordinator lease: the token proves it is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Unique token (holder name, process and time).
    pub token: String,
    /// Time to live granted by each acquire or renew.
    pub ttl: Duration,
}

/// A round as the coordinator enqueues it: its broker id (the task's
/// `generation`) and the evolver step it belongs to (what a checkpoint
/// counts: [`Coordinator::retire`] removes the rounds of the steps a
/// checkpoint covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// The round's id (the tasks' and results' `generation`).
    pub id: u64,
    /// The evolver's generation (step) that evaluates it.
    pub step: u64,
}

/// What [`Coordinator::retire`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retired {
    /// Rounds retired (results and enqueue mark deleted).
    pub rounds: usize,
    /// Bases dropped.
    pub bases: usize,
    /// Keys deleted.
    pub keys: usize,
    /// Tasks of retired rounds still pending for some host, acknowledged
    /// (its late result records nothing).
    pub pending: usize,
    /// Dead letters trimmed (of retired rounds, and read).
    pub dead: usize,
}

/// What [`Coordinator::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The tasks were added (this many).
    New(usize),
    /// The generation had been enqueued before (by us before a restart, or
    /// by a previous coordinator): nothing was added.
    Already,
}

/// One task delivered to this evaluator, leased to it until acknowledged
/// or reclaimed.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Broker id of the task (a stream entry id for Redis).
    pub id: String,
    /// The task, decoded and checked to be of this run.
    pub task: Task,
    /// How many times it has been delivered, this one included.
    pub deliveries: u64,
}

/// What [`Evaluator::ack`] recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckOutcome {
    /// Results that were new.
    pub recorded: usize,
    /// Results already recorded by an earlier delivery (discarded).
    pub duplicates: usize,
}

/// What [`Evaluator::reclaim`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reclaimed {
    /// Tasks of stale consumers now leased to this one.
    pub tasks: Vec<Delivery>,
    /// Tasks moved to the dead-letter stream (delivered too often).
    pub dead_lettered: usize,
    /// Ids of pending tasks that were trimmed from the stream before they
    /// were done (`max_stream_len` too small); their candidates come back
    /// only through [`Coordinator::requeue`].
    pub lost: Vec<String>,
}

/// A task that was delivered too often without a result.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Broker id of the dead letter.
    pub id: String,
    /// The task (its candidates are to be quarantined), or why its bytes
    /// were refused (a malformed task is dead-lettered at once).
    pub task: Result<Task, crate::error::WireError>,
    /// Deliveries it had.
    pub deliveries: u64,
    /// Consumer that held it last.
    pub last_consumer: String,
    /// Why it was refused, when it was not for too many deliveries (a
    /// malformed task, or one an evaluator refused: a base it cannot
    /// use).
    pub why: Option<String>,
}

/// Where a run's unfinished tasks are ([`Coordinator::activity`]): a
/// round whose missing results are in none of these places lost its tasks
/// (a Redis restarted without its AOF, a stream trimmed too short) and is
/// re-enqueued; otherwise it is only slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    /// Tasks leased to a host that took or extended the lease within the
    /// window: being evaluated.
    pub live: usize,
    /// Tasks leased to a host that has been silent longer: to be taken
    /// over by a live host.
    pub stale: usize,
    /// Tasks not yet delivered to any host.
    pub waiting: u64,
}

impl Activity {
    /// No task anywhere: whatever is missing was lost.
    pub fn is_idle(&self) -> bool {
        self.live == 0 && self.stale == 0 && self.waiting == 0
    }
}

/// A registered evaluator host, for `evod status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Host id (its consumer name).
    pub host: String,
    /// Workers it runs.
    pub workers: u32,
    /// Results it recorded (duplicates not counted).
    pub tasks_done: u64,
    /// Time since its last heartbeat, by the broker's clock.
    pub last_seen: Duration,
}

/// The coordinator's side: one per run at a time, fenced by the lease.
pub trait Coordinator {
    /// Waits up to `wait` for the coordinator lease and takes it for `ttl`.
    /// Another live holder after `wait` is [`BrokerError::LeaseHeld`].
    fn acquire_lease(
        &mut self,
        holder: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, BrokerError>;
    /// Extends our lease by its ttl; [`BrokerError::LeaseLost`] if another
    /// holder took it (then stop publishing). A lease that merely lapsed
    /// (the broker was away longer than the ttl) and that nobody took is
    /// taken again with the same token: `Ok(true)`.
    fn renew_lease(&mut self, lease: &Lease) -> Result<bool, BrokerError>;
    /// Gives the lease up (only if still ours).
    fn release_lease(&mut self, lease: &Lease) -> Result<(), BrokerError>;
    /// Publishes a base's parameters under their checksum, chunked;
    /// idempotent. The base is indexed under `step` (the latest step that
    /// uses it), so that [`Coordinator::retire`] drops it once a
    /// checkpoint covers that step. Returns the checksum.
    fn publish_base(&mut self, step: u64, params: &[f32]) -> Result<u64, BrokerError>;
    /// The bases published and not dropped: (checksum, latest step).
    fn bases(&mut self) -> Result<Vec<(u64, u64)>, BrokerError>;
    /// Stores the run's model file (GGUF bytes), which an evaluator host
    /// that joins fetches once to start its workers (the network and task
    /// every base applies to). Fenced by the lease.
    fn publish_model(&mut self, lease: &Lease, model: &[u8]) -> Result<(), BrokerError>;
    /// Removes a base no task needs any more (and its index entry). Fenced
    /// by the lease.
    fn drop_base(&mut self, lease: &Lease, hash: u64) -> Result<(), BrokerError>;
    /// Enqueues a round's tasks (all its candidates), once: a round
    /// enqueued before is [`Enqueued::Already`]. The round is indexed under
    /// its step. Refused with [`BrokerError::LeaseLost`] unless `lease` is
    /// the live lease (never two publishers).
    fn enqueue(
        &mut self,
        lease: &Lease,
        round: Round,
        tasks: &[Task],
    ) -> Result<Enqueued, BrokerError>;
    /// Enqueues tasks again, even if the generation was enqueued before:
    /// for candidates still [`Coordinator::missing`] after their tasks
    /// should have been done (lost with a Redis that had no AOF, trimmed,
    /// dead-lettered and retried). Duplicated work is harmless: results are
    /// deduplicated. Fenced by the lease like `enqueue`.
    fn requeue(
        &mut self,
        lease: &Lease,
        round: Round,
        tasks: &[Task],
    ) -> Result<usize, BrokerError>;
    /// Candidates of `candidates` without a recorded result, in order.
    fn missing(
        &mut self,
        generation: u64,
        candidates: std::ops::Range<u32>,
    ) -> Result<Vec<u32>, BrokerError>;
    /// The generation's results recorded so far, one per candidate, sorted
    /// by candidate.
    fn results(&mut self, generation: u64) -> Result<Vec<TaskResult>, BrokerError>;
    /// Waits up to `timeout` until `want` results of the generation are
    /// recorded; returns those recorded by then.
    fn wait_results(
        &mut self,
        generation: u64,
        want: usize,
        timeout: Duration,
    ) -> Result<Vec<TaskResult>, BrokerError>;
    /// Waits up to `timeout` until `want` results of the generation are
    /// recorded; returns how many are by then (a count: the results
    /// themselves are read once, with [`Coordinator::results`]). The wait
    /// is woken when a round gets all its results or a task is
    /// dead-lettered, not per result.
    fn wait_count(
        &mut self,
        generation: u64,
        want: usize,
        timeout: Duration,
    ) -> Result<usize, BrokerError>;
    /// Dead letters of the run after the one with broker id `after`
    /// (`"0-0"`: all), oldest first: a coordinator reads each once.
    fn dead_letters_after(&mut self, after: &str) -> Result<Vec<DeadLetter>, BrokerError>;
    /// Where the run's unfinished tasks are: leases taken or extended
    /// within `window` are live, older ones stale.
    fn activity(&mut self, window: Duration) -> Result<Activity, BrokerError>;
    /// Dead letters of the run, oldest first.
    fn dead_letters(&mut self) -> Result<Vec<DeadLetter>, BrokerError>;
    /// A checkpoint covers every step before `before`: forgets the rounds
    /// indexed under those steps (results, enqueue marks), drops the bases
    /// indexed under them, acknowledges the tasks still pending that are
    /// older than the oldest round still indexed (no host takes them
    /// over), and trims the dead letters as old that the coordinator has
    /// read (up to id `dead_read`). Rounds of later steps (a restart redoes
    /// them) keep everything. Fenced by the lease.
    fn retire(
        &mut self,
        lease: &Lease,
        before: u64,
        dead_read: &str,
    ) -> Result<Retired, BrokerError>;
    /// Registered evaluator hosts.
    fn hosts(&mut self) -> Result<Vec<HostInfo>, BrokerError>;
}

/// An evaluator's side: one consumer of the run's group, named by its host
/// id.
pub trait Evaluator {
    /// Registers or refreshes this host with its worker count.
    fn heartbeat(&mut self, workers: u32) -> Result<(), BrokerError>;
    /// The run's model file as the coordinator published it (`None` until
    /// it has).
    fn fetch_model(&mut self) -> Result<Option<Vec<u8>>, BrokerError>;
    /// Refuses a delivered task this host must not evaluate (its base
    /// does not fit the run's network): moved to the dead-letter stream
    /// with `why` and acknowledged, so the coordinator quarantines its
    /// candidates instead of any host evaluating them.
    fn refuse(&mut self, delivery: &Delivery, why: &str) -> Result<(), BrokerError>;
    /// Which of `candidates` of round `generation` have no result yet, or
    /// `None` when the round is not enqueued (retired, or never enqueued
    /// by the run's coordinator). An evaluator asks when a task names a
    /// base that is not on the broker: a late copy of a finished round is
    /// acknowledged, a task of an open round whose candidates are missing
    /// names a base nobody published, and is refused.
    fn outstanding(
        &mut self,
        generation: u64,
        candidates: std::ops::Range<u32>,
    ) -> Result<Option<Vec<u32>>, BrokerError>;
    /// Fetches a base by hash and verifies it hashes to that name.
    fn fetch_base(&mut self, hash: u64) -> Result<Vec<f32>, BrokerError>;
    /// Reads up to `max` new tasks, waiting up to `block` for the first.
    fn read_tasks(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BrokerError>;
    /// Restarts a task's lease (a long evaluation);
    /// [`BrokerError::NotLeased`] if it is no longer ours.
    fn extend(&mut self, delivery: &Delivery) -> Result<(), BrokerError>;
    /// Records the task's results (deduplicated by (generation, candidate))
    /// and acknowledges it, atomically.
    fn ack(
        &mut self,
        delivery: &Delivery,
        results: &[TaskResult],
    ) -> Result<AckOutcome, BrokerError>;
    /// Records what results there are of a task this host could not finish
    /// (an evaluation error, candidates without a fitness here) and hands
    /// the task back, atomically: it stays pending, idle as long as a
    /// lease, so that another host takes it over at once; it is
    /// dead-lettered only after `max_deliveries` deliveries.
    fn release(
        &mut self,
        delivery: &Delivery,
        results: &[TaskResult],
    ) -> Result<AckOutcome, BrokerError>;
    /// Takes over up to `max` tasks of other consumers idle longer than the
    /// lease (their consumer is dead, stuck or released them; its own only
    /// after a few leases); those already delivered `max_deliveries` times
    /// go to the dead-letter stream instead.
    fn reclaim(&mut self, max: usize) -> Result<Reclaimed, BrokerError>;
}
