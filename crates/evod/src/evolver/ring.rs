//! [`RingEvaluator`]: the `evod_evolve::Evaluator` over the workers' `Eval`
//! channels (batches in flight on every worker, sized to the ring's payload
//! area, lost batches split and re-sent, misbehaving or silent workers
//! reported for recycling, stats polled for the pulse). ES candidates travel
//! as recipes (`EVAL_RECIPES`) against a base file written once per
//! generation under `DIR/state/base/`.

use super::*;
use std::collections::VecDeque;

/// Evaluates candidates on the workers through their `Eval` channels: one
/// batched `EVAL` per worker in flight at once, re-sent after a worker is
/// lost; a candidate that kills a worker twice is quarantined.
pub struct RingEvaluator<'s> {
    pub(super) segments: &'s [Segment],
    clients: Vec<Client<'s>>,
    /// Worker replacements noticed (epoch changes).
    pub restarts: u64,
    epochs: Vec<u64>,
    /// Fixed part of the deadline for one worker to answer one request
    /// (plus [`Self::per_candidate_timeout`] per candidate).
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
    /// Where ES bases are written (`DIR/state/base`); `None`: recipes are
    /// materialised and sent as vectors.
    base_dir: Option<PathBuf>,
    /// The model's spec, the header of every base file.
    base_spec: Option<ModelSpec>,
    /// Checksum and path of the last base written.
    last_base: Option<(u64, PathBuf)>,
    /// Part of an EVAL's deadline that grows with its candidates and
    /// their episodes (per candidate and episode).
    pub per_candidate_timeout: Duration,
    /// Episodes per candidate of the evaluation under way (the gate runs
    /// many more than training).
    episodes: u32,
    /// Ring traffic so far ([`IpcCounters`]).
    pub ipc: IpcCounters,
    /// What the evaluation under way is for (put on the wire as
    /// `eval_flags`; set by `evaluate_for` / `evaluate_recipes_for`).
    purpose: evod_evolve::Purpose,
}

/// What evaluation cost in bytes: ring payload bytes (requests and
/// replies) and base-file bytes, and the candidates they carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpcCounters {
    /// Payload bytes of EVAL / EVAL_RECIPES requests and their replies.
    pub ring_bytes: u64,
    /// Candidates evaluated (answered) over the ring.
    pub candidates: u64,
    /// EVAL / EVAL_RECIPES requests sent.
    pub requests: u64,
    /// Payload bytes of the largest request sent.
    pub largest_request: u64,
    /// Bytes of base files written (ES: one per generation).
    pub base_bytes: u64,
    /// Base files written.
    pub bases: u64,
}

impl IpcCounters {
    /// Ring bytes per evaluated candidate (0 before any).
    pub fn ring_bytes_per_candidate(&self) -> f64 {
        self.ring_bytes as f64 / self.candidates.max(1) as f64
    }
}

/// Base files kept in `DIR/state/base` (the current and the previous one,
/// which a worker may still be reading).
const BASES_KEPT: usize = 2;

/// What one batch request carries.
#[derive(Clone, Copy)]
enum Work<'a> {
    /// Full vectors (`EVAL`).
    Vectors(&'a [&'a [f32]]),
    /// Recipes against the base file at `path` (`EVAL_RECIPES`).
    Recipes {
        base: u64,
        params: u32,
        path: &'a [u8],
        recipes: &'a [evod_evolve::Recipe],
    },
}

impl Work<'_> {
    fn len(&self) -> usize {
        match self {
            Work::Vectors(v) => v.len(),
            Work::Recipes { recipes, .. } => recipes.len(),
        }
    }
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
pub(super) struct StatsSummary {
    /// Requests served by the current incarnations.
    pub(super) requests: u64,
    /// Of which answered with an error status.
    pub(super) errors: u64,
    /// Slowest request seen by the polls since the previous pulse.
    pub(super) slowest: Duration,
    /// Model generation each worker has loaded, comma-separated.
    pub(super) generations: String,
    /// Uptime of the youngest worker.
    pub(super) youngest: Option<Duration>,
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
            request_timeout: Duration::from_secs(10),
            stop: std::sync::Arc::default(),
            control_socket: None,
            suspect: vec![None; segments.len()],
            polled: vec![Polled::default(); segments.len()],
            base_dir: None,
            base_spec: None,
            last_base: None,
            per_candidate_timeout: DEFAULT_PER_CANDIDATE_TIMEOUT,
            episodes: 1,
            ipc: IpcCounters::default(),
            purpose: evod_evolve::Purpose::Train,
        }
    }

    /// Ships ES candidates as recipes: bases are written under `dir` as
    /// GGUF files of `spec`'s network.
    pub fn with_recipes(mut self, dir: PathBuf, spec: ModelSpec) -> Self {
        self.base_dir = Some(dir);
        self.base_spec = Some(spec);
        self
    }

    /// Most candidates of `n` parameters one `EVAL` may carry: what fits
    /// the smallest payload area of the workers' rings, and `MAX_BATCH`.
    pub fn max_vectors_per_request(&self, n: usize) -> usize {
        let area = self
            .segments
            .iter()
            .map(|s| s.config().payload_bytes)
            .min()
            .unwrap_or(0);
        (area.saturating_sub(EvalHeader::SIZE) / (4 * n).max(1)).min(evod_wire::MAX_BATCH as usize)
    }

    /// The deadline of one request carrying `candidates` of the
    /// evaluation under way: the base timeout plus the per-candidate one
    /// for each candidate and episode.
    fn request_deadline(&self, candidates: usize) -> Duration {
        self.request_deadline_for(candidates, self.episodes)
    }

    /// [`Self::request_deadline`] for a request of `episodes` each.
    fn request_deadline_for(&self, candidates: usize, episodes: u32) -> Duration {
        let units = u32::try_from(candidates)
            .unwrap_or(u32::MAX)
            .saturating_mul(episodes.max(1));
        self.request_timeout
            .saturating_add(self.per_candidate_timeout.saturating_mul(units))
    }

    /// Writes `base` as `DIR/state/base/<checksum>.gguf` (atomically, once
    /// per checksum; older files beyond [`BASES_KEPT`] removed).
    fn write_base(&mut self, base: &evod_evolve::Base<'_>) -> Result<PathBuf, EvalError> {
        let (Some(dir), Some(spec)) = (&self.base_dir, &self.base_spec) else {
            return Err(EvalError::Failed("no base folder".into()));
        };
        if let Some((c, p)) = &self.last_base
            && *c == base.checksum()
        {
            return Ok(p.clone());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| EvalError::Failed(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!("{:016x}.gguf", base.checksum()));
        write_model(&path, spec, base.params(), None)
            .map_err(|e| EvalError::Failed(format!("writing the base {}: {e}", path.display())))?;
        let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        self.ipc.base_bytes += bytes;
        self.ipc.bases += 1;
        let keep: Vec<PathBuf> = std::iter::once(path.clone())
            .chain(self.last_base.as_ref().map(|(_, p)| p.clone()))
            .take(BASES_KEPT)
            .collect();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "gguf") && !keep.contains(&p) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        self.last_base = Some((base.checksum(), path.clone()));
        Ok(path)
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

    /// Sends `EVAL` (or `EVAL_RECIPES`) for `group` (indices into `work`)
    /// to worker `w`, for `purpose`.
    fn send(
        &mut self,
        w: usize,
        work: Work<'_>,
        group: &[usize],
        seed: u64,
        episodes: u32,
        purpose: evod_evolve::Purpose,
    ) -> Result<u64, RingError> {
        let gate = evod_wire::eval_flags::of_gate(purpose == evod_evolve::Purpose::Gate);
        let (id, len) = match work {
            Work::Vectors(candidates) => {
                let n = candidates[0].len();
                let header = EvalHeader {
                    candidates: group.len() as u32,
                    params: n as u32,
                    seed,
                    episodes,
                    flags: gate,
                    reserved: 0,
                };
                let len = header.request_len();
                let id = self.clients[w].send(op::EVAL, 0, len, |out| {
                    header.encode(out);
                    let mut at = EvalHeader::SIZE;
                    for &i in group {
                        protocol::write_f32s(candidates[i], &mut out[at..at + 4 * n]);
                        at += 4 * n;
                    }
                })?;
                (id, len)
            }
            Work::Recipes {
                base,
                params,
                path,
                recipes,
            } => {
                let header = RecipesHeader {
                    candidates: group.len() as u32,
                    params,
                    seed,
                    episodes,
                    path_len: path.len() as u32,
                    base,
                    flags: gate,
                };
                let bytes: Vec<u8> = group.iter().flat_map(|&i| recipes[i].to_bytes()).collect();
                let len = header.request_len();
                let id = self.clients[w].send(op::EVAL_RECIPES, 0, len, |out| {
                    header.encode(path, &bytes, out);
                })?;
                (id, len)
            }
        };
        self.ipc.ring_bytes += len as u64;
        self.ipc.requests += 1;
        self.ipc.largest_request = self.ipc.largest_request.max(len as u64);
        Ok(id)
    }

    /// Waits for worker `w`'s reply to request `id` (carrying `expect`
    /// candidates, sent at `sent`).
    fn receive(
        &mut self,
        w: usize,
        id: u64,
        expect: usize,
        sent: Instant,
    ) -> Result<Outcome, EvalError> {
        let allowed = self.request_deadline(expect);
        let deadline = later(sent, allowed);
        loop {
            if let Some(outcome) = self.poll_reply(w, id, expect, deadline, allowed, None)? {
                return Ok(outcome);
            }
        }
    }

    /// [`Self::receive`] by `until` at the latest (`None`: the request's
    /// `deadline`, `allowed` after it was sent): `None` if the request is
    /// still in flight then, before its deadline.
    fn poll_reply(
        &mut self,
        w: usize,
        id: u64,
        expect: usize,
        deadline: Instant,
        allowed: Duration,
        until: Option<Instant>,
    ) -> Result<Option<Outcome>, EvalError> {
        let wait = until.map_or(deadline, |u| u.min(deadline));
        let (st, payload) = match receive_id(&mut self.clients[w], id, wait) {
            Ok(r) => r,
            Err(RingError::Timeout) if Instant::now() < deadline => return Ok(None),
            Err(RingError::PeerLost { reason, .. }) => {
                tracing::warn!(worker = w, "worker lost mid-request ({reason}); re-sending");
                return Ok(Some(Outcome::Lost));
            }
            Err(RingError::PeerCorrupt { what }) => {
                self.faulty(w, &format!("it wrote garbage into its segment: {what}"));
                return Ok(Some(Outcome::Lost));
            }
            Err(RingError::Timeout) => {
                // Alive (it beats, or the ring would have said `PeerLost`)
                // but silent: have it replaced, give its batch to others.
                self.faulty(
                    w,
                    &format!("it did not answer an EVAL of {expect} candidates within {allowed:?}"),
                );
                return Ok(Some(Outcome::Lost));
            }
            Err(e) => return Err(EvalError::Other(Box::new(e))),
        };
        self.ipc.ring_bytes += payload.len() as u64;
        if st != status::OK {
            return Err(EvalError::Failed(format!(
                "worker {w}: {}",
                String::from_utf8_lossy(&payload)
            )));
        }
        match protocol::read_f64s(&payload, expect) {
            Ok(values) => Ok(Some(Outcome::Done(values))),
            Err(e) => {
                self.faulty(w, &format!("it sent a malformed EVAL reply: {e}"));
                Ok(Some(Outcome::Lost))
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
    pub(super) fn stats_summary(&mut self) -> StatsSummary {
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

/// `at + after`, or a far-future instant (a century on) where that sum
/// does not fit: a deadline so long is no deadline, not a panic.
fn later(at: Instant, after: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    at.checked_add(after)
        .or_else(|| at.checked_add(CENTURY))
        .unwrap_or(at)
}

/// Default of [`RingEvaluator::per_candidate_timeout`].
pub const DEFAULT_PER_CANDIDATE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`RingEvaluator::dispatch`] waits on the busy workers, in
/// turn, before it looks again for a free one: a twentieth of how long the
/// oldest request has been in flight, between these bounds. A worker that
/// answers waits at most that long for its next request; each look costs
/// the evolver a wake-up, taken from the cores the workers compute on
/// (looking every millisecond made llama.cpp's windows about 2 % slower
/// than every 50 ms), so evaluations of seconds are looked at every 50 ms,
/// which costs them under 2 % of their time, and short ones sooner.
const DISPATCH_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// [`DISPATCH_POLL`] for requests in flight since `oldest`.
fn dispatch_poll(oldest: Duration) -> Duration {
    (oldest / 20).clamp(DISPATCH_POLL.0, DISPATCH_POLL.1)
}

/// One part of a [`RingEvaluator::dispatch`].
struct Job<'a> {
    work: Work<'a>,
    purpose: evod_evolve::Purpose,
    seed: u64,
    episodes: u32,
    /// Most candidates of one request.
    max_group: usize,
}

/// A request of [`RingEvaluator::dispatch`] in flight on one worker.
struct InFlight {
    job: usize,
    group: Vec<usize>,
    /// Its candidates were in a lost request: sent one per request.
    alone: bool,
    id: u64,
    sent: Instant,
    deadline: Instant,
    allowed: Duration,
}

/// The next request of a [`RingEvaluator::dispatch`]: a candidate of a lost
/// request on its own (so the one that kills a worker is found), else the
/// candidates at the front of `queue`, all of one job, as many as a share
/// of what is left (guided self-scheduling: `⌈left / 2·workers⌉`, at most
/// the job's `max_group`), so that requests shrink towards the end and the
/// workers finish together. Returns the job, the candidates and whether
/// they go alone.
fn next_group(
    alone: &mut VecDeque<(usize, usize)>,
    queue: &mut VecDeque<(usize, usize)>,
    max_group: impl Fn(usize) -> usize,
    workers: usize,
) -> Option<(usize, Vec<usize>, bool)> {
    if let Some((j, i)) = alone.pop_front() {
        return Some((j, vec![i], true));
    }
    let &(j, _) = queue.front()?;
    let share = queue
        .len()
        .div_ceil(2 * workers.max(1))
        .clamp(1, max_group(j).max(1));
    let mut group = Vec::with_capacity(share);
    while group.len() < share
        && let Some(&(k, i)) = queue.front()
        && k == j
    {
        queue.pop_front();
        group.push(i);
    }
    Some((j, group, false))
}

impl RingEvaluator<'_> {
    /// Evaluates `work` on the workers: groups of at most `max_group`
    /// candidates, one in flight per worker, lost groups split and re-sent.
    fn schedule(
        &mut self,
        work: Work<'_>,
        max_group: usize,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let total = work.len();
        let mut results: Vec<Option<f64>> = vec![None; total];
        if total == 0 {
            return Ok(results);
        }
        self.episodes = episodes;
        let workers = self.clients.len();
        // Groups still to evaluate; a group that crashed a worker is split
        // into single candidates so the culprit can be found.
        let per = total.div_ceil(workers).clamp(1, max_group.max(1));
        let mut pending: Vec<Vec<usize>> = (0..total)
            .collect::<Vec<_>>()
            .chunks(per)
            .rev()
            .map(<[usize]>::to_vec)
            .collect();
        let mut crashes = vec![0u32; total];
        // Every candidate may be tried on a few workers before giving up.
        let give_up = later(
            Instant::now(),
            self.request_deadline(per).saturating_mul(4).saturating_add(
                self.per_candidate_timeout
                    .saturating_mul(u32::try_from(total.div_ceil(workers)).unwrap_or(u32::MAX)),
            ),
        );
        while !pending.is_empty() {
            if Instant::now() > give_up {
                return Err(EvalError::Unavailable("workers keep failing".into()));
            }
            self.stopping()?;
            self.note_epochs();
            // One group per worker in flight, with the id it was sent as.
            let mut flight: Vec<(usize, u64, Vec<usize>, Instant)> = Vec::new();
            let mut suspects = Vec::new();
            for w in 0..workers {
                // No work for a worker that lied until it is replaced: the
                // others take it.
                if self.is_suspect(w) {
                    suspects.push(w);
                    continue;
                }
                let Some(group) = pending.pop() else { break };
                match self.send(w, work, &group, seed, episodes, self.purpose) {
                    Ok(id) => flight.push((w, id, group, Instant::now())),
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
            for (w, id, group, sent) in flight {
                match self.receive(w, id, group.len(), sent)? {
                    Outcome::Done(values) => {
                        self.ipc.candidates += group.len() as u64;
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
                        if !self.is_suspect(w) {
                            self.settle(w, give_up)?;
                        }
                    }
                }
            }
        }
        Ok(results)
    }
}

impl RingEvaluator<'_> {
    /// Evaluates `jobs` side by side: every worker is given a request as
    /// soon as it is free (the candidates of [`next_group`], jobs in the
    /// order given), so a job whose candidates cost more than another's (a
    /// gate scoring every held-out window beside training candidates
    /// scoring one) does not leave the other workers waiting for it. One
    /// request in flight per worker; the busy workers are polled in turn
    /// ([`dispatch_poll`]). Lost requests and misbehaving workers are
    /// handled as in [`Self::schedule`]: a lost request's candidates go
    /// again one per request, and one that kills a worker twice is
    /// quarantined (`None`).
    fn dispatch(&mut self, jobs: &[Job<'_>]) -> Result<Vec<Vec<Option<f64>>>, EvalError> {
        let mut results: Vec<Vec<Option<f64>>> =
            jobs.iter().map(|j| vec![None; j.work.len()]).collect();
        let workers = self.clients.len();
        let mut queue: VecDeque<(usize, usize)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.work.len()).map(move |i| (j, i)))
            .collect();
        let mut alone: VecDeque<(usize, usize)> = VecDeque::new();
        let mut crashes: Vec<Vec<u32>> = jobs.iter().map(|j| vec![0; j.work.len()]).collect();
        let mut flight: Vec<Option<InFlight>> = (0..workers).map(|_| None).collect();
        // Every candidate may be tried on a few workers before giving up
        // (as `schedule`, summed over the jobs).
        let give_up =
            later(
                Instant::now(),
                jobs.iter().fold(Duration::ZERO, |sum, job| {
                    let n = job.work.len();
                    let per = n.div_ceil(workers.max(1)).clamp(1, job.max_group.max(1));
                    sum.saturating_add(
                        self.request_deadline_for(per, job.episodes)
                            .saturating_mul(4),
                    )
                    .saturating_add(self.per_candidate_timeout.saturating_mul(
                        u32::try_from(n.div_ceil(workers.max(1))).unwrap_or(u32::MAX),
                    ))
                }),
            );
        loop {
            if queue.is_empty() && alone.is_empty() && flight.iter().all(Option::is_none) {
                return Ok(results);
            }
            if Instant::now() > give_up {
                return Err(EvalError::Unavailable("workers keep failing".into()));
            }
            self.stopping()?;
            self.note_epochs();
            let mut suspects = Vec::new();
            for (w, slot) in flight.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                // No work for a worker that lied until it is replaced.
                if self.is_suspect(w) {
                    suspects.push(w);
                    continue;
                }
                let Some((j, group, lone)) =
                    next_group(&mut alone, &mut queue, |j| jobs[j].max_group, workers)
                else {
                    break;
                };
                let job = &jobs[j];
                let put_back = |alone: &mut VecDeque<_>, queue: &mut VecDeque<_>| {
                    if lone {
                        alone.push_front((j, group[0]));
                    } else {
                        for &i in group.iter().rev() {
                            queue.push_front((j, i));
                        }
                    }
                };
                match self.send(w, job.work, &group, job.seed, job.episodes, job.purpose) {
                    Ok(id) => {
                        tracing::debug!(
                            worker = w,
                            purpose = job.purpose.name(),
                            candidates = group.len(),
                            "dispatch: sent"
                        );
                        let allowed = self.request_deadline_for(group.len(), job.episodes);
                        *slot = Some(InFlight {
                            job: j,
                            group,
                            alone: lone,
                            id,
                            sent: Instant::now(),
                            deadline: later(Instant::now(), allowed),
                            allowed,
                        });
                    }
                    Err(RingError::PeerLost { .. } | RingError::Full) => {
                        put_back(&mut alone, &mut queue);
                        self.settle(w, give_up)?;
                    }
                    Err(RingError::PeerCorrupt { what }) => {
                        put_back(&mut alone, &mut queue);
                        self.faulty(w, &format!("it wrote garbage into its segment: {what}"));
                    }
                    Err(e) => return Err(EvalError::Other(Box::new(e))),
                }
            }
            let busy: Vec<usize> = (0..workers).filter(|&w| flight[w].is_some()).collect();
            if busy.is_empty() {
                match suspects.first() {
                    // Every worker that could take work is waiting to be
                    // replaced: wait for the first replacement.
                    Some(&w) => self.settle(w, give_up)?,
                    // Nothing could be sent (a full queue, settled at
                    // once): not a busy loop until `give_up`.
                    None => std::thread::sleep(DISPATCH_POLL.0),
                }
                continue;
            }
            let now = Instant::now();
            let oldest = busy
                .iter()
                .filter_map(|&w| flight[w].as_ref())
                .map(|f| now.saturating_duration_since(f.sent))
                .max()
                .unwrap_or_default();
            let slice = dispatch_poll(oldest) / busy.len() as u32;
            for w in busy {
                let f = flight[w].as_ref().expect("busy");
                let until = Some(Instant::now() + slice);
                let polled =
                    self.poll_reply(w, f.id, f.group.len(), f.deadline, f.allowed, until)?;
                let Some(outcome) = polled else { continue };
                let f = flight[w].take().expect("busy");
                tracing::debug!(
                    worker = w,
                    purpose = jobs[f.job].purpose.name(),
                    candidates = f.group.len(),
                    took_ms = f.sent.elapsed().as_millis() as u64,
                    "dispatch: answered"
                );
                match outcome {
                    Outcome::Done(values) => {
                        self.ipc.candidates += f.group.len() as u64;
                        for (&i, v) in f.group.iter().zip(values) {
                            results[f.job][i] = Some(v);
                        }
                    }
                    Outcome::Lost => {
                        for &i in &f.group {
                            crashes[f.job][i] += 1;
                            if f.alone && crashes[f.job][i] >= 2 {
                                tracing::warn!(
                                    "candidate {i} ({}) crashed a worker twice: quarantined",
                                    jobs[f.job].purpose.name()
                                );
                            } else {
                                alone.push_back((f.job, i));
                            }
                        }
                        if !self.is_suspect(w) {
                            self.settle(w, give_up)?;
                        }
                    }
                }
            }
        }
    }
}

impl Evaluator for RingEvaluator<'_> {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let Some(first) = candidates.first() else {
            return Ok(Vec::new());
        };
        let n = first.len();
        let max = self.max_vectors_per_request(n);
        if max == 0 {
            return Err(EvalError::Failed(format!(
                "one candidate of {n} parameters ({} bytes) does not fit the ring's payload area; use --strategy es",
                4 * n + EvalHeader::SIZE
            )));
        }
        self.schedule(Work::Vectors(candidates), max, seed, episodes)
    }

    fn evaluate_recipes(
        &mut self,
        base: &evod_evolve::Base<'_>,
        recipes: &[evod_evolve::Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        if self.base_dir.is_none() {
            // No base folder: materialise (the trait's default).
            let candidates = recipes
                .iter()
                .map(|r| r.materialize(base))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| EvalError::Failed(e.to_string()))?;
            let refs: Vec<&[f32]> = candidates.iter().map(Vec::as_slice).collect();
            return self.evaluate(&refs, seed, episodes);
        }
        if recipes.is_empty() {
            return Ok(Vec::new());
        }
        let path = self.write_base(base)?;
        let path = path.to_string_lossy().into_owned();
        let work = Work::Recipes {
            base: base.checksum(),
            params: base.params().len() as u32,
            path: path.as_bytes(),
            recipes,
        };
        self.schedule(work, evod_wire::MAX_BATCH as usize, seed, episodes)
    }

    fn evaluate_for(
        &mut self,
        purpose: evod_evolve::Purpose,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.purpose = purpose;
        let out = self.evaluate(candidates, seed, episodes);
        self.purpose = evod_evolve::Purpose::Train;
        out
    }

    fn evaluate_recipes_together(
        &mut self,
        parts: &[evod_evolve::RecipePart<'_>],
    ) -> Result<Vec<Vec<Option<f64>>>, EvalError> {
        // More parts than base files kept would delete a part's base
        // while its requests need it.
        if self.base_dir.is_none() || parts.len() < 2 || parts.len() > BASES_KEPT {
            return parts
                .iter()
                .map(|p| {
                    self.evaluate_recipes_for(p.purpose, &p.base, p.recipes, p.seed, p.episodes)
                })
                .collect();
        }
        // Every part's base on file (the last `BASES_KEPT` are kept: a
        // call's two parts have their two bases); none for a part with
        // nothing to evaluate.
        let mut paths = Vec::with_capacity(parts.len());
        for p in parts {
            paths.push(if p.recipes.is_empty() {
                String::new()
            } else {
                self.write_base(&p.base)?.to_string_lossy().into_owned()
            });
        }
        let jobs: Vec<Job<'_>> = parts
            .iter()
            .zip(&paths)
            .map(|(p, path)| Job {
                work: Work::Recipes {
                    base: p.base.checksum(),
                    params: p.base.params().len() as u32,
                    path: path.as_bytes(),
                    recipes: p.recipes,
                },
                purpose: p.purpose,
                seed: p.seed,
                episodes: p.episodes,
                max_group: evod_wire::MAX_BATCH as usize,
            })
            .collect();
        self.dispatch(&jobs)
    }

    fn evaluate_recipes_for(
        &mut self,
        purpose: evod_evolve::Purpose,
        base: &evod_evolve::Base<'_>,
        recipes: &[evod_evolve::Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.purpose = purpose;
        let out = self.evaluate_recipes(base, recipes, seed, episodes);
        self.purpose = evod_evolve::Purpose::Train;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The perplexity task's generation: the gate of the previous best (one
    /// candidate, scoring 2 held-out windows) first, then 8 training
    /// candidates, over 2 workers: the gate goes alone, requests shrink
    /// towards the end, and a lost request's candidates go first, alone.
    #[test]
    fn dispatch_takes_one_job_per_request_shares_that_shrink_and_lost_ones_alone() {
        let mut queue: VecDeque<(usize, usize)> = std::iter::once((0, 0))
            .chain((0..8).map(|i| (1, i)))
            .collect();
        let mut alone = VecDeque::new();
        let mut take = |alone: &mut VecDeque<_>| next_group(alone, &mut queue, |_| 64, 2);
        assert_eq!(
            take(&mut alone),
            Some((0, vec![0], false)),
            "the gate alone"
        );
        assert_eq!(take(&mut alone), Some((1, vec![0, 1], false)), "⌈8 / 4⌉");
        assert_eq!(take(&mut alone), Some((1, vec![2, 3], false)), "⌈6 / 4⌉");
        alone.push_back((1, 2));
        alone.push_back((1, 3));
        assert_eq!(
            take(&mut alone),
            Some((1, vec![2], true)),
            "lost ones first"
        );
        assert_eq!(take(&mut alone), Some((1, vec![3], true)));
        assert_eq!(take(&mut alone), Some((1, vec![4], false)), "⌈4 / 4⌉");
        for i in 5..8 {
            assert_eq!(take(&mut alone), Some((1, vec![i], false)));
        }
        assert_eq!(take(&mut alone), None);
        // A job's cap on one request holds.
        let mut queue: VecDeque<(usize, usize)> = (0..100).map(|i| (0, i)).collect();
        let (_, group, _) = next_group(&mut VecDeque::new(), &mut queue, |_| 3, 2).unwrap();
        assert_eq!(group, vec![0, 1, 2]);
    }

    #[test]
    fn dispatch_looks_sooner_at_young_requests_and_every_50_ms_at_old_ones() {
        let ms = Duration::from_millis;
        assert_eq!(dispatch_poll(Duration::ZERO), ms(1));
        assert_eq!(dispatch_poll(ms(100)), ms(5));
        assert_eq!(dispatch_poll(ms(3000)), ms(50));
        assert_eq!(dispatch_poll(Duration::MAX), ms(50));
    }

    #[test]
    fn a_deadline_too_far_to_represent_is_far_future_not_a_panic() {
        let now = Instant::now();
        let year = Duration::from_secs(365 * 24 * 3600);
        assert!(later(now, Duration::MAX) > now + year);
        assert!(later(now, Duration::from_secs_f64(1e17)) > now + year);
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
