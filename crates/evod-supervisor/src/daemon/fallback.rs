//! The fallback: workers that crash right after a new generation roll the
//! model back (`maybe_fall_back`); `roll_back` stops the evolver, restores
//! the generation through `evod_store::restore` and restarts it.

use super::*;

impl Supervisor {
    /// Counts a worker's end against the live generation when it is the
    /// generation's doing: the worker served the live file (it started on
    /// it or accepted its `LOAD`) and had not answered a canary on it, no
    /// worker has verified that generation, and it died loading the model
    /// or running it (`LOAD`, `NEURAL_EXEC`; the start-up load counts as a
    /// `LOAD`), whatever its uptime. A death in `EVAL` is a candidate's
    /// (`EVAL` scores the candidates it is sent, not the live weights), left
    /// to the evolver's quarantine. Past `fallback_after` such ends, rolls
    /// back.
    pub(super) fn maybe_fall_back(&mut self, serving: Option<Serving>, in_service: Option<u32>) {
        // The file as of the last tick, if it is still the live one (a
        // stat; the recovery path reads no model file). Changed since: the
        // death cannot be pinned on either file.
        let Some(LiveModel {
            id,
            generation: Some(live),
            ..
        }) = self.model_seen
        else {
            return;
        };
        let now_id = evod_store::file_identity(&self.config.model);
        if now_id != Some(id) {
            return;
        }
        let blamed = match in_service {
            // A LOAD (the supervisor sends them all) and the start-up
            // load all read the live path.
            Some(op::LOAD) => true,
            // NEURAL_EXEC runs what the worker serves.
            Some(op::NEURAL_EXEC) => serving.is_some_and(|s| s.id == id && !s.verified),
            _ => false,
        };
        if !blamed || self.verified_file == Some(id) || self.good_generation == Some(live) {
            return;
        }
        let count = self.crashes_after_new.entry(live).or_insert(0);
        *count += 1;
        if *count < self.config.fallback_after {
            return;
        }
        let to = evod_store::previous_generation(&self.config.dir, live, self.good_generation);
        let Some(to) = to else {
            tracing::error!(
                "workers crash-loop on generation {live} and no earlier generation is in {}",
                evod_store::history_dir(&self.config.dir).display()
            );
            return;
        };
        tracing::error!(
            "workers crash-loop right after generation {live}: rolling back to generation {to}"
        );
        if let Err(e) = self.roll_back(to, Some(live)) {
            tracing::error!("rollback failed: {}", chain(&e));
        }
    }

    /// Restores generation `to`; `quarantine` names a bad generation to set aside.
    pub(super) fn roll_back(
        &mut self,
        to: u64,
        quarantine: Option<u64>,
    ) -> Result<u64, evod_store::StoreError> {
        // One writer at a time: the evolver is stopped (killing it at any
        // instant is safe by design) and restarted afterwards.
        let evolver = self.slots.iter().position(|s| s.kind == Kind::Evolver);
        if let Some(i) = evolver
            && let Some(child) = self.slots[i].child.as_mut()
        {
            child.kill_and_reap();
        }
        let result = evod_store::restore(&self.config.dir, &self.config.model, to, quarantine);
        if let Some(i) = evolver
            && !self.slots[i].done
            && matches!(self.phase, Phase::Running)
        {
            self.slots[i].restart_at = Some(Instant::now());
        }
        let generation = result?;
        self.rollbacks += 1;
        if let Some(bad) = quarantine {
            self.crashes_after_new.remove(&bad);
        }
        // Workers in backoff restart at once on the restored model.
        for slot in &mut self.slots {
            if slot.kind == Kind::Worker && slot.restart_at.is_some() {
                slot.restart_at = Some(Instant::now());
            }
        }
        tracing::info!("generation {generation} restored");
        Ok(generation)
    }
}
