//! Model sync: noticing a new file at the model path (`watch_model`) and
//! bringing every worker to it (`sync_workers`: `LOAD`, then a canary
//! `NEURAL_EXEC`, with a backoff per worker).

use super::*;

impl Supervisor {
    /// Brings every running worker to the live file and verifies it there:
    /// a worker that does not serve the live file (a new one was published,
    /// or an earlier `LOAD` failed or timed out) is told to `LOAD` it; one
    /// that serves it unverified gets a canary `NEURAL_EXEC` (all-zero
    /// inputs), whose finite answer marks the live generation good. Only the
    /// supervisor's own knowledge counts: which file the worker was started
    /// on or accepted by `LOAD`, and the reply to its own request (not the
    /// worker-written stats). A worker whose `LOAD` or canary failed or
    /// timed out is left alone for [`SYNC_BACKOFF`], so a busy worker costs
    /// the event loop at most one short wait per second.
    pub(super) fn sync_workers(&mut self) {
        let Some(live) = self.model_seen else {
            return;
        };
        let request = LoadRequest {
            path: self.config.model.to_string_lossy().into_owned(),
            generation: live.generation.unwrap_or(0),
            checksum: live.checksum,
        };
        let path = self.config.model.clone();
        let replaced = || evod_store::file_identity(&path).is_some_and(|id| id != live.id);
        let canary = live
            .inputs
            .filter(|&n| n <= CANARY_MAX_INPUTS)
            .map(|n| vec![0f32; n]);
        let now = Instant::now();
        let generation = live.generation;
        for slot in &mut self.slots {
            let running = slot.running();
            let Some(seg) = &slot.segment else { continue };
            if !running || slot.sync_after.is_some_and(|t| now < t) {
                continue;
            }
            if slot.serving.is_none_or(|s| s.id != live.id) {
                if slot.load_refused == Some(live.id) {
                    // It refused this very file: it will not do better.
                    continue;
                }
                match link::load(seg, &request, LOAD_TIMEOUT) {
                    Ok(_) => {
                        slot.serving = Some(Serving {
                            id: live.id,
                            verified: false,
                        });
                        slot.sync_backoff = SYNC_BACKOFF;
                    }
                    // A newer file took its place before the worker opened
                    // it (the evolver publishes fast): the next tick loads it.
                    Err(e) if replaced() => {
                        tracing::debug!(
                            "{}: LOAD of generation {generation:?} superseded by a newer file: {e}",
                            slot.label()
                        );
                        continue;
                    }
                    Err(e) => {
                        slot.distrust_on(&e);
                        if matches!(e, link::LinkError::Refused { .. }) {
                            slot.load_refused = Some(live.id);
                        }
                        tracing::warn!(
                            "{}: LOAD of generation {generation:?} failed: {e}",
                            slot.label()
                        );
                        slot.back_off(now);
                        continue;
                    }
                }
            }
            // Only a worker known to serve the live file may verify it.
            if slot.serving.is_none_or(|s| s.id != live.id || s.verified) {
                continue;
            }
            let answered = match &canary {
                Some(zeros) => match link::exec(seg, zeros, CANARY_TIMEOUT) {
                    Ok(out) => !out.is_empty() && out.iter().all(|v| v.is_finite()),
                    Err(e) => {
                        tracing::debug!("{}: canary NEURAL_EXEC: {e}", slot.label());
                        slot.distrust_on(&e);
                        if matches!(e, link::LinkError::Refused { .. }) {
                            // No model (its start-up load failed): LOAD it.
                            slot.serving = None;
                        }
                        false
                    }
                },
                // Too many inputs for a canary row: its LOAD is the check.
                None => true,
            };
            if !answered {
                slot.back_off(now);
                continue;
            }
            slot.sync_backoff = SYNC_BACKOFF;
            if let Some(serving) = slot.serving.as_mut() {
                serving.verified = true;
            }
            if self.verified_file != Some(live.id) {
                self.verified_file = Some(live.id);
                tracing::info!(
                    generation = ?generation,
                    "generation {} verified: {} answered the canary NEURAL_EXEC",
                    generation.map_or("-".into(), |g| g.to_string()),
                    slot.label()
                );
            }
            if generation.is_some() {
                self.good_generation = generation;
            }
        }
    }

    /// Identity, generation and checksum of the live model file.
    pub(super) fn read_model_identity(&self) -> Option<LiveModel> {
        let id = evod_store::file_identity(&self.config.model)?;
        if let Some(seen) = self.model_seen
            && seen.id == id
        {
            return Some(seen);
        }
        let (generation, checksum) = evod_store::identify(&self.config.model).ok()?;
        let inputs = evod_runtime::Model::open_for_serving(&self.config.model)
            .ok()
            .map(|m| m.spec.arch.inputs());
        Some(LiveModel {
            id,
            generation,
            checksum,
            inputs,
        })
    }

    /// Notices a new file at the model path ([`Self::sync_workers`] then
    /// loads it into the workers).
    pub(super) fn watch_model(&mut self) {
        let Some(now) = self.read_model_identity() else {
            return;
        };
        if self.model_seen.map(|m| m.id) == Some(now.id) {
            return;
        }
        self.model_seen = Some(now);
        tracing::info!(generation = ?now.generation, "a new model was published: loading it in the workers");
    }
}
