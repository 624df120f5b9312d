//! What the loop tells `crate::metrics`: readiness ("a verified model can
//! be served", the one definition `status` uses too), the children's
//! counts, the workers' stats blocks, the round trips of its own link
//! calls, and the evolver's reports. Nothing here blocks: atomics and
//! short in-memory locks (see `metrics`).

use super::*;

impl Supervisor {
    /// `Ok` when the daemon can serve: not stopping, the live model
    /// identified (it parses and its checksum reads), and at least one
    /// running worker verified on that exact file (it loaded it and
    /// answered the canary). Else why not, in words (`/readyz` says it).
    pub(super) fn readiness(&self) -> Result<(), String> {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return Err("stopping".into());
        }
        let Some(live) = self.live_model() else {
            return Err(match &self.model_error {
                Some((key, e)) if Some(*key) == self.model_key => {
                    format!("the live model cannot be served: {e}")
                }
                _ => format!(
                    "the model file {} is new or changed and not identified yet",
                    self.config.model.display()
                ),
            });
        };
        let verified = self
            .slots
            .iter()
            .any(|s| s.running() && s.serving.is_some_and(|v| v.id == live.id && v.verified));
        if verified {
            Ok(())
        } else {
            Err(format!(
                "no running worker is verified on the live model (generation {})",
                live.generation.map_or("-".into(), |g| g.to_string())
            ))
        }
    }

    /// Publishes the loop's facts to the metrics (every loop iteration;
    /// cheap).
    pub(super) fn refresh_metrics(&mut self) {
        let readiness = self.readiness();
        let live = self.live_model();
        let mut running = 0;
        let mut ready = 0;
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(seg) = &slot.segment else { continue };
            if slot.running() {
                running += 1;
                if live.is_some_and(|m| slot.serving.is_some_and(|v| v.id == m.id && v.verified)) {
                    ready += 1;
                }
            }
            self.metrics
                .worker_stats(i, seg.trusted_epoch(), &seg.stats(), |o| op::name(o as u32));
        }
        self.metrics.set_workers(running, ready);
        self.metrics
            .set_generations(live.and_then(|m| m.generation), self.good_generation);
        self.metrics.set_rollbacks(self.rollbacks);
        self.metrics.set_evolver_running(
            self.slots
                .iter()
                .any(|s| s.kind == Kind::Evolver && s.running()),
        );
        self.metrics.set_readiness(readiness);
    }

    /// The round trip of one of the supervisor's own calls on a worker's
    /// control channel (a `SHUTDOWN` or fault is sent without an answer:
    /// not a round trip). A job that was never sent (its client's deadline
    /// passed while it waited, or the worker it was meant for was
    /// replaced) is no failed request: it is counted as not sent, with why.
    pub(super) fn observe_link(&self, done: &link::Done) {
        record_link(&self.metrics, done);
    }

    /// `Request::Report`: the evolver's counters, kept (and served) until
    /// the next one, also if the evolver dies.
    pub(super) fn on_evolver_report(&mut self, report: evod_wire::EvolverReport) -> Response {
        self.metrics.evolver_report(report);
        Response::ok("kept")
    }
}

/// [`Supervisor::observe_link`]'s accounting.
fn record_link(metrics: &crate::metrics::Metrics, done: &link::Done) {
    let (opcode, ok) = match &done.outcome {
        link::Outcome::Ping(r) => ("PING", r.is_ok()),
        link::Outcome::Load(r) => ("LOAD", r.is_ok()),
        link::Outcome::Exec(r, _) => ("NEURAL_EXEC", r.is_ok()),
        link::Outcome::Sent(_) => return,
    };
    match done.outcome.error() {
        Some(link::LinkError::Expired { .. }) => metrics.not_sent(opcode, "expired"),
        Some(link::LinkError::Stale { .. }) => metrics.not_sent(opcode, "stale"),
        _ => metrics.request(opcode, ok.then_some(done.took)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn done(outcome: link::Outcome) -> link::Done {
        link::Done {
            tag: link::Tag { id: 1, epoch: 1 },
            outcome,
            took: Duration::from_micros(80),
            finished: Instant::now(),
        }
    }

    /// An `exec` whose client gave up before it was sent is counted as
    /// expired, not as a failed `NEURAL_EXEC`; a real failure still is one.
    #[test]
    fn an_expired_exec_is_counted_as_not_sent_not_as_a_failure() {
        let metrics = crate::metrics::Metrics::new(None);
        let expired = link::LinkError::Expired {
            waited: Duration::from_secs(11),
        };
        record_link(
            &metrics,
            &done(link::Outcome::Exec(Err(expired), Duration::ZERO)),
        );
        let text = metrics.encode();
        assert!(
            text.contains(
                "evod_worker_requests_not_sent_total{opcode=\"NEURAL_EXEC\",reason=\"expired\"} 1"
            ),
            "{text}"
        );
        assert!(
            !text.contains("evod_worker_request_failures_total{opcode=\"NEURAL_EXEC\"}"),
            "{text}"
        );
        let lost = link::LinkError::Ring(evod_ring::RingError::Timeout);
        record_link(
            &metrics,
            &done(link::Outcome::Exec(Err(lost), Duration::ZERO)),
        );
        let text = metrics.encode();
        assert!(
            text.contains("evod_worker_request_failures_total{opcode=\"NEURAL_EXEC\"} 1"),
            "{text}"
        );
    }
}
