//! Model sync and the answers of the link threads: noticing a new or
//! changed file at the model path (`watch_model`: a `stat` on the loop,
//! identification off it), bringing every worker to it (`sync_workers`:
//! `LOAD`, then a canary `NEURAL_EXEC`, with a backoff per worker), the
//! background PINGs, and what each answer means (`on_link_done`).

use super::*;

impl Supervisor {
    /// Sends every running worker the job it needs, if its link is idle: a
    /// worker that does not serve the live file (a new one was published,
    /// or an earlier `LOAD` failed or timed out) is told to `LOAD` it; one
    /// that serves it unverified gets a canary `NEURAL_EXEC` (all-zero
    /// inputs), whose finite answer marks the live generation good; an
    /// idle one is PINGed every [`PING_EVERY`]. Only the supervisor's own
    /// knowledge counts: which file the worker was started on or accepted
    /// by `LOAD`, and the reply to its own request (not the worker-written
    /// stats). A worker whose `LOAD` or canary failed or timed out is left
    /// alone for its backoff.
    pub(super) fn sync_workers(&mut self) {
        let live = self.live_model();
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let slot = &self.slots[i];
            if slot.segment.is_none() || !slot.running() || !slot.jobs.is_empty() {
                continue;
            }
            let due = slot.sync_after.is_none_or(|t| now >= t);
            if let Some(live) = live
                && due
            {
                if slot.serving.is_none_or(|s| s.id != live.id) {
                    if slot.load_refused != Some(live.id) {
                        let request = LoadRequest {
                            path: self.config.model.to_string_lossy().into_owned(),
                            generation: live.generation.unwrap_or(0),
                            checksum: live.checksum,
                        };
                        let timeout = self.config.sync_load_timeout(live.id.size);
                        self.submit(i, Purpose::Load(live.id), link::Job::Load(request), timeout);
                        continue;
                    }
                } else if slot.serving.is_some_and(|s| !s.verified) {
                    match live.inputs.filter(|&n| n <= CANARY_MAX_INPUTS) {
                        Some(n) => {
                            self.submit(
                                i,
                                Purpose::Canary(live.id),
                                link::Job::Exec(vec![0f32; n]),
                                self.config.canary_timeout(),
                            );
                            continue;
                        }
                        // Too many inputs for a canary row: its LOAD is the check.
                        None => {
                            self.mark_verified(i, live);
                            continue;
                        }
                    }
                }
            }
            if self.slots[i].next_ping.is_none_or(|t| now >= t) {
                self.slots[i].next_ping = Some(later(now, PING_EVERY));
                self.submit(i, Purpose::Ping, link::Job::Ping, self.config.eval_timeout);
            }
        }
    }

    /// Worker slot `i` answered the canary on `live` (or loaded a file too
    /// wide for one).
    fn mark_verified(&mut self, i: usize, live: LiveModel) {
        let slot = &mut self.slots[i];
        slot.sync_backoff = SYNC_BACKOFF;
        match slot.serving.as_mut() {
            Some(serving) if serving.id == live.id => serving.verified = true,
            _ => return,
        }
        let label = slot.label();
        if self.verified_file != Some(live.id) {
            self.verified_file = Some(live.id);
            tracing::info!(
                generation = ?live.generation,
                "generation {} verified: {label} answered the canary NEURAL_EXEC",
                live.generation.map_or("-".into(), |g| g.to_string()),
            );
        }
        if live.generation.is_some() {
            self.good_generation = live.generation;
        }
    }

    /// A job on worker slot `i`'s control channel finished. A user's
    /// request is answered whatever the epoch; the rest counts only if the
    /// worker it was sent to is still the slot's current incarnation.
    pub(super) fn on_link_done(&mut self, i: usize, done: link::Done) {
        let now = Instant::now();
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        let Some(pos) = slot.jobs.iter().position(|p| p.id == done.tag.id) else {
            return;
        };
        let pending = slot.jobs.remove(pos).expect("position is in range");
        let label = slot.label();
        let current = slot.running()
            && slot
                .segment
                .as_ref()
                .is_some_and(|s| s.trusted_epoch() == done.tag.epoch);
        let pid = slot.child.as_ref().map(|c| c.pid().as_raw());
        let link::Done {
            outcome, finished, ..
        } = done;
        // What the worker's answer says about its liveness (a fault or a
        // SHUTDOWN is sent without waiting for an answer).
        let asked = !matches!(pending.purpose, Purpose::Fault(..) | Purpose::Shutdown);
        let answered = current && asked && outcome.error().is_none();
        if current && asked {
            match outcome.error() {
                None => {
                    slot.answered = true;
                    slot.unanswered = 0;
                    slot.unanswered_since = None;
                }
                Some(e) if link::is_timeout(e) => {
                    if slot.unanswered == 0 {
                        slot.unanswered_since = Some(now);
                    }
                    slot.unanswered += 1;
                }
                Some(e) => slot.distrust_on(e),
            }
        }
        match (pending.purpose, outcome) {
            (Purpose::Exec(reply), link::Outcome::Exec(result, took)) => {
                let response = match result {
                    Ok(outputs) => Response::ok(serde_json::json!({
                        "outputs": outputs,
                        "worker": slot.index,
                        "latency_us": took.as_secs_f64() * 1e6,
                    })),
                    // The worker serves one request at a time: say so when
                    // it was still busy with an EVAL (its own hint).
                    Err(e)
                        if link::is_timeout(&e)
                            && slot
                                .segment
                                .as_ref()
                                .and_then(|s| s.stats().in_service)
                                .is_some_and(op::is_evaluation) =>
                    {
                        Response::error(format!(
                            "{label} is busy evaluating (an EVAL may take up to {:?}); \
                             the NEURAL_EXEC was not served within --exec-timeout {:?}: {e}",
                            self.config.eval_timeout, self.config.exec_timeout
                        ))
                    }
                    Err(e) => Response::error(format!("{label}: {e}")),
                };
                let _ = reply.send(response);
            }
            (Purpose::Fault(reply, kind), link::Outcome::Sent(result)) => {
                let response = match result {
                    Ok(()) => Response::ok(serde_json::json!({
                        "worker": slot.index,
                        "pid": pid,
                        "kind": kind,
                    })),
                    Err(e) => Response::error(format!("worker {}: {e}", slot.index)),
                };
                let _ = reply.send(response);
            }
            (Purpose::Shutdown, link::Outcome::Sent(Ok(()))) => slot.sigterm_at = None,
            (Purpose::Shutdown, link::Outcome::Sent(Err(_))) => {
                // Could not ask: a signal does it.
                slot.sigterm_at = None;
                if let Some(child) = slot.child.as_ref().filter(|_| current) {
                    let _ = child.signal(Signal::SIGTERM);
                }
            }
            _ if !current || !matches!(self.phase, Phase::Running) => {}
            (Purpose::Ping, link::Outcome::Ping(Ok(rtt))) => slot.ping = Some((rtt, now)),
            (Purpose::Load(key), link::Outcome::Load(result)) => match result {
                Ok(_) => {
                    slot.serving = Some(Serving {
                        id: key,
                        verified: false,
                    });
                    slot.sync_backoff = SYNC_BACKOFF;
                }
                // A newer file took its place before the worker opened it
                // (the evolver publishes fast): the next tick loads that.
                Err(e) if self.model_key != Some(key) => {
                    tracing::debug!("{label}: LOAD superseded by a newer file: {e}");
                }
                Err(e) => {
                    if matches!(e, link::LinkError::Refused { .. }) {
                        slot.load_refused = Some(key);
                    }
                    tracing::warn!("{label}: LOAD of the live model failed: {e}");
                    slot.back_off(now);
                }
            },
            (Purpose::Canary(key), link::Outcome::Exec(result, took)) => {
                let answered = match result {
                    Ok(out) => {
                        // A round trip like a PING's (status shows one as
                        // soon as the worker is verified).
                        slot.ping = Some((took, now));
                        !out.is_empty() && out.iter().all(|v| v.is_finite())
                    }
                    Err(e) => {
                        tracing::debug!("{label}: canary NEURAL_EXEC: {e}");
                        if matches!(e, link::LinkError::Refused { .. }) {
                            // No model (its start-up load failed): LOAD it.
                            slot.serving = None;
                        }
                        false
                    }
                };
                if !answered {
                    slot.back_off(now);
                } else if let Some(live) = self.live_model().filter(|m| m.id == key) {
                    self.mark_verified(i, live);
                }
            }
            _ => {}
        }
        // After the answer was taken in (a `LOAD`'s sets what it serves).
        if answered && matches!(self.phase, Phase::Running) {
            self.note_answer(i, finished);
        }
    }

    /// Notices a new or changed file at the model path with a `stat`, and
    /// has it identified off the loop ([`Self::on_identified`]).
    pub(super) fn watch_model(&mut self) {
        let key = stat_key(&self.config.model);
        if key == self.model_key {
            return;
        }
        self.model_key = key;
        self.start_identify();
    }

    fn start_identify(&mut self) {
        if self.identifying || self.model_key.is_none() {
            return;
        }
        let path = self.config.model.clone();
        let tx = self.tx.clone();
        let key = self.model_key;
        let started = std::thread::Builder::new()
            .name("identify".into())
            .spawn(move || {
                let result = identify(&path);
                let _ = tx.send(Event::Identified(ModelReport { key, result }));
            });
        match started {
            Ok(_) => self.identifying = true,
            Err(e) => tracing::warn!("cannot start a thread to identify the model: {e}"),
        }
    }

    pub(super) fn on_identified(&mut self, report: ModelReport) {
        self.identifying = false;
        if report.key != self.model_key {
            // Changed again meanwhile: identify what is there now.
            self.start_identify();
            return;
        }
        match report.result {
            Ok(model) if model.id == report.key.unwrap_or(model.id) => {
                if Some(model.id) != self.model_key {
                    self.start_identify();
                    return;
                }
                self.model_error = None;
                self.model_seen = Some(model);
                tracing::info!(
                    generation = ?model.generation,
                    "a new model was published: loading it in the workers"
                );
                // A standby maps it now, not when it is promoted (a crash
                // during the workers' `LOAD` would otherwise make the
                // replacement map and check it on the recovery path).
                for slot in &mut self.slots {
                    if let Some(standby) = slot.standby.as_mut() {
                        standby.refresh();
                    }
                }
            }
            Ok(_) => self.start_identify(),
            Err(e) => {
                let Some(key) = self.model_key else { return };
                if self.model_error.as_ref().is_none_or(|(k, _)| *k != key) {
                    tracing::error!(
                        "the live model {} cannot be served: {e}",
                        self.config.model.display()
                    );
                    self.model_error = Some((key, e));
                }
            }
        }
    }
}
