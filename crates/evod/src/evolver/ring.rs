//! [`RingEvaluator`]: the `evod_evolve::Evaluator` over the workers' `Eval`
//! channels (batches in flight on every worker, lost batches split and
//! re-sent, misbehaving workers reported for recycling, stats polled for the
//! pulse).

use super::*;

/// Evaluates candidates on the workers through their `Eval` channels: one
/// batched `EVAL` per worker in flight at once, re-sent after a worker is
/// lost; a candidate that kills a worker twice is quarantined.
pub struct RingEvaluator<'s> {
    pub(super) segments: &'s [Segment],
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
