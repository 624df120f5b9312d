//! The fallback: workers that crash right after a new generation roll the
//! model back (`maybe_fall_back`); `roll_back` stops the evolver, restores
//! the generation through `evod_store::restore` off the loop, and restarts
//! the evolver once the restore reports back.

use super::*;

/// What the supervisor itself knows about a worker that died: nothing the
/// worker wrote (a dying liar can write anything into the segment).
#[derive(Debug, Clone, Copy)]
pub(super) struct DeathFacts {
    /// The file it served, as far as the supervisor knows.
    pub(super) serving: Option<Serving>,
    /// A `LOAD` or canary of this file the supervisor had sent it was
    /// outstanding.
    pub(super) syncing: Option<FileKey>,
    /// It had not answered any of the supervisor's requests since it
    /// started (so it died in its start-up load, or while serving the
    /// first thing it was asked).
    pub(super) never_answered: bool,
    /// The worker-written "in service" word said `EVAL`. Untrusted, so it
    /// can only acquit: a liar can at worst spare a bad generation the
    /// rollback (it is still restarted, within the restart intensity),
    /// never get a good one quarantined.
    pub(super) said_eval: bool,
}

impl DeathFacts {
    /// Whether this death counts against the file `live`: the supervisor's
    /// `LOAD` or canary of it was outstanding, or the worker served it
    /// unverified and never answered; and the worker did not say `EVAL`.
    pub(super) fn blame(&self, live: FileKey) -> bool {
        let ours = self.syncing == Some(live)
            || (self.never_answered && self.serving.is_some_and(|s| s.id == live && !s.verified));
        ours && !self.said_eval
    }
}

impl Supervisor {
    /// Counts a worker's end against the live generation when it is the
    /// generation's doing, judged on the supervisor's own facts only: no
    /// worker has verified that generation, and the worker died while a
    /// `LOAD` or canary of the live file the supervisor sent it was
    /// outstanding, or it served the live file unverified and died before
    /// it ever answered (the start-up load counts as a `LOAD`). A death
    /// after a fault the supervisor sent is not counted, nor one the worker
    /// says was in an `EVAL` (a candidate's, left to the evolver's
    /// quarantine; see [`DeathFacts::said_eval`]). Past
    /// `fallback_after` such ends, rolls back.
    pub(super) fn maybe_fall_back(&mut self, facts: DeathFacts) {
        // The file as identified, if it is still the live one (a stat; the
        // recovery path reads no model file). Changed since: the death
        // cannot be pinned on either file.
        let Some(LiveModel {
            id,
            generation: Some(live),
            ..
        }) = self.live_model()
        else {
            return;
        };
        if stat_key(&self.config.model) != Some(id) {
            return;
        }
        if !facts.blame(id) || self.verified_file == Some(id) || self.good_generation == Some(live)
        {
            return;
        }
        let count = self.crashes_after_new.entry(live).or_insert(0);
        *count += 1;
        if *count < self.config.fallback_after || self.rollback.is_some() {
            return;
        }
        tracing::error!("workers crash-loop right after generation {live}: rolling back");
        let to = RollbackTo::Before {
            live: Some(live),
            good: self.good_generation,
        };
        self.roll_back(to, Some(live), None);
    }

    /// Starts restoring generation `to`; `quarantine` names a bad
    /// generation to set aside; `reply` (a control client) gets the
    /// outcome. One writer at a time: the evolver is stopped first
    /// (SIGKILL: killing it at any instant is safe by design; the SIGCHLD
    /// path reaps it), the restore runs once it is gone
    /// ([`Self::advance_rollback`]).
    pub(super) fn roll_back(
        &mut self,
        to: RollbackTo,
        quarantine: Option<u64>,
        reply: Option<mpsc::Sender<Response>>,
    ) {
        if self.rollback.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(Response::error("a rollback is already under way"));
            }
            return;
        }
        // A rollback started now could be cut short by the exit, and the
        // evolver would not be restarted to honour it.
        if matches!(self.phase, Phase::Stopping { .. }) {
            tracing::warn!("not rolling back: the daemon is stopping");
            if let Some(reply) = reply {
                let _ = reply.send(Response::error(
                    "the daemon is stopping: no rollback is started",
                ));
            }
            return;
        }
        if let Some(slot) = self.slots.iter_mut().find(|s| s.kind == Kind::Evolver)
            && let Some(child) = slot.child.as_ref().filter(|c| c.exited().is_none())
        {
            child.kill();
            slot.planned_stop = true;
            slot.kill_cause = Some("stopped for a rollback".into());
        }
        self.rollback = Some(PendingRollback {
            to,
            quarantine,
            reply,
            restoring: false,
        });
        self.advance_rollback();
    }

    /// Runs the restore of the rollback under way once the evolver is gone.
    pub(super) fn advance_rollback(&mut self) {
        let evolver_running = self
            .slots
            .iter()
            .any(|s| s.kind == Kind::Evolver && s.running());
        let Some(pending) = self.rollback.as_mut().filter(|r| !r.restoring) else {
            return;
        };
        if evolver_running {
            return;
        }
        // `begin_stop` cancels a rollback whose restore has not started.
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        let (dir, model) = (self.config.dir.clone(), self.config.model.clone());
        let (to, quarantine) = (pending.to, pending.quarantine);
        let tx = self.tx.clone();
        let started = std::thread::Builder::new()
            .name("restore".into())
            .spawn(move || {
                let result = restore(&dir, &model, to, quarantine);
                let _ = tx.send(Event::Restored(RestoreReport { result }));
            });
        match started {
            Ok(_) => pending.restoring = true,
            Err(e) => {
                let pending = self.rollback.take().expect("checked above");
                tracing::error!("rollback failed: cannot start the restore thread: {e}");
                if let Some(reply) = pending.reply {
                    let _ = reply.send(Response::error(format!(
                        "cannot start the restore thread: {e}"
                    )));
                }
                self.restart_evolver();
            }
        }
    }

    /// The restore finished: restart the evolver, answer the client.
    pub(super) fn on_restored(&mut self, report: RestoreReport) {
        let Some(pending) = self.rollback.take() else {
            return;
        };
        self.restart_evolver();
        let response = match report.result {
            Ok(generation) => {
                self.rollbacks += 1;
                if let Some(bad) = pending.quarantine {
                    self.crashes_after_new.remove(&bad);
                }
                // Workers in backoff restart at once on the restored model.
                let now = Instant::now();
                for slot in &mut self.slots {
                    if slot.kind == Kind::Worker && slot.restart_at.is_some() {
                        slot.restart_at = Some(now);
                    }
                }
                tracing::info!("generation {generation} restored");
                Response::ok(serde_json::json!({ "generation": generation }))
            }
            Err(e) => {
                tracing::error!("rollback failed: {e}");
                Response::error(e)
            }
        };
        if let Some(reply) = pending.reply {
            let _ = reply.send(response);
        }
    }

    /// Stopping: a rollback whose restore has not started is cancelled
    /// (its client told so); one restoring is waited for (the loop exits
    /// only once it reports back, or at the grace deadline).
    pub(super) fn cancel_unstarted_rollback(&mut self) {
        if self.rollback.as_ref().is_some_and(|r| !r.restoring) {
            let pending = self.rollback.take().expect("checked above");
            tracing::warn!("the daemon is stopping: the rollback not started yet is cancelled");
            if let Some(reply) = pending.reply {
                let _ = reply.send(Response::error(
                    "the daemon is stopping: the rollback was cancelled before its restore started",
                ));
            }
        }
    }

    /// A restore is running (off the loop): the process must not exit
    /// before it reports back, unless the grace period is over.
    pub(super) fn restoring(&self) -> bool {
        self.rollback.as_ref().is_some_and(|r| r.restoring)
    }

    fn restart_evolver(&mut self) {
        let running = matches!(self.phase, Phase::Running);
        if let Some(slot) = self.slots.iter_mut().find(|s| s.kind == Kind::Evolver)
            && !slot.done
            && !slot.running()
            && running
        {
            slot.restart_at = Some(Instant::now());
        }
    }
}

/// The restore thread's work: resolves `to` (reading the history's
/// headers, and the live file's with `GgufReader` if needed) and restores
/// it.
fn restore(
    dir: &Path,
    model: &Path,
    to: RollbackTo,
    quarantine: Option<u64>,
) -> Result<u64, String> {
    let to = match to {
        RollbackTo::Exact(g) => g,
        RollbackTo::Before { live, good } => live
            .or_else(|| identify(model).ok().and_then(|m| m.generation))
            .and_then(|live| evod_store::previous_generation(dir, live, good))
            .ok_or_else(|| {
                format!(
                    "no earlier generation in {}",
                    evod_store::history_dir(dir).display()
                )
            })?,
    };
    match quarantine {
        Some(bad) => tracing::error!(
            "rolling back to generation {to} (generation {bad} crash-loops the workers)"
        ),
        None => tracing::info!("rolling back to generation {to}"),
    }
    evod_store::restore(dir, model, to, quarantine).map_err(|e| chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: FileKey = FileKey {
        dev: 1,
        ino: 2,
        size: 3,
        mtime: (4, 5),
    };
    const OLD: FileKey = FileKey {
        dev: 1,
        ino: 9,
        size: 3,
        mtime: (4, 5),
    };

    fn facts() -> DeathFacts {
        DeathFacts {
            serving: Some(Serving {
                id: LIVE,
                verified: false,
            }),
            syncing: None,
            never_answered: false,
            said_eval: false,
        }
    }

    #[test]
    fn a_death_is_blamed_on_the_model_only_on_the_supervisors_facts() {
        // A worker that answered since its start and died with nothing of
        // ours outstanding: whatever it wrote in the shared "in service"
        // word (a forged LOAD), the model is not blamed; the word is not
        // even an input.
        assert!(!facts().blame(LIVE));
        // Died while our LOAD or canary of the live file was outstanding.
        let syncing = DeathFacts {
            syncing: Some(LIVE),
            ..facts()
        };
        assert!(syncing.blame(LIVE));
        // ... of an older file: not this one's doing.
        assert!(
            !DeathFacts {
                syncing: Some(OLD),
                ..facts()
            }
            .blame(LIVE)
        );
        // Died in its start-up load (never answered, on the live file).
        let start = DeathFacts {
            never_answered: true,
            ..facts()
        };
        assert!(start.blame(LIVE));
        // ... but it had verified it: not the model.
        assert!(
            !DeathFacts {
                serving: Some(Serving {
                    id: LIVE,
                    verified: true
                }),
                ..start
            }
            .blame(LIVE)
        );
        // The worker's word may only acquit.
        assert!(
            !DeathFacts {
                said_eval: true,
                ..syncing
            }
            .blame(LIVE)
        );
    }
}
