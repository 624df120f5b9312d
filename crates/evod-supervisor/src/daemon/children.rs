//! The children's lifecycle: the slots' workers and evolver (start, reap,
//! restart with the policy's backoff, the heartbeat watchdog) and each
//! worker's warm standby (start, retry, promotion).

use super::*;

impl Supervisor {
    pub(super) fn reap(&mut self) {
        for (pid, reason) in reap::reap_all() {
            match self.slots.iter().position(|s| {
                s.child
                    .as_ref()
                    .is_some_and(|c| c.pid() == pid && c.exited().is_none())
            }) {
                Some(i) => self.on_exit(i, reason),
                None => match self.slots.iter().position(|s| {
                    s.standby
                        .as_ref()
                        .is_some_and(|sb| sb.child().pid() == pid && sb.child().exited().is_none())
                }) {
                    Some(i) => self.on_standby_exit(i, reason),
                    None => tracing::debug!(pid = pid.as_raw(), "reaped an orphan: {reason}"),
                },
            }
        }
    }

    pub(super) fn on_exit(&mut self, i: usize, reason: ExitReason) {
        let now = Instant::now();
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let slot = &mut self.slots[i];
        let child = slot
            .child
            .as_mut()
            .expect("on_exit is called for a live child");
        child.set_exited(reason);
        let pid = child.pid().as_raw();
        let uptime = now.duration_since(child.started());
        let mut words = reason.to_string();
        let cause = crate::metrics::cause(&reason, slot.kill_cause.as_deref());
        if let Some(cause) = slot.kill_cause.take() {
            words = format!("{words} ({cause})");
        }
        // Killed for lying (recycle, corrupt control channel, mute): whatever
        // it was doing, the model is not to blame.
        let blameless = std::mem::take(&mut slot.blameless_kill);
        slot.last_exit = Some(words.clone());
        slot.ping = None;
        if stopping {
            tracing::info!(pid, "{} {words}", slot.label());
            return;
        }
        if std::mem::take(&mut slot.planned_stop) {
            // Stopped for a rollback: started again once it is done.
            tracing::info!(pid, "{} {words}", slot.label());
            return;
        }
        if slot.kind == Kind::Evolver
            && matches!(reason, ExitReason::Exited { code } if code == i32::from(exit::NO_PROGRESS))
        {
            // The evolver said why it cannot progress; restarting it would
            // only repeat that.
            slot.done = true;
            tracing::error!(pid, "evolver cannot make progress; stopping");
            self.begin_stop(exit::NO_PROGRESS);
            return;
        }
        if slot.kind == Kind::Evolver && reason.success() {
            slot.done = true;
            // A bounded run (`--generations N`, `--until-solved`) ends the
            // daemon with the evolver: the job is done.
            if self.config.evolver_bounded {
                tracing::info!(pid, "evolver finished its bounded run; stopping");
                self.begin_stop(exit::OK);
            } else {
                tracing::info!(
                    pid,
                    "evolver finished (exited with code 0); workers keep serving"
                );
            }
            return;
        }
        tracing::warn!(
            pid,
            uptime_s = uptime.as_secs_f64(),
            "{} {words}",
            slot.label()
        );
        self.metrics.restarted(slot.kind.name(), cause);
        let decision = slot.tracker.on_exit(&self.config.policy, uptime, now);
        let label = slot.label();
        let kind = slot.kind;
        let serving = slot.serving.take();
        slot.sync_after = None;
        // What the supervisor itself knows it was doing with this worker
        // when it died (its own jobs of this epoch; never the
        // worker-written "in service" word).
        let epoch = slot.segment.as_ref().map(|s| s.trusted_epoch());
        let ours = |p: &&Pending| Some(p.epoch) == epoch;
        let sent_fault = slot
            .jobs
            .iter()
            .filter(ours)
            .any(|p| matches!(p.purpose, Purpose::Fault(..)));
        let syncing = slot.jobs.iter().filter(ours).find_map(|p| match p.purpose {
            Purpose::Load(k) | Purpose::Canary(k) => Some(k),
            _ => None,
        });
        // The worker-written word may only acquit: a worker that says it
        // died in an EVAL (a candidate's doing, left to the evolver's
        // quarantine) is not counted against the model; a word saying
        // anything else convicts nothing.
        let said_eval = slot
            .segment
            .as_ref()
            .and_then(|s| s.stats().in_service)
            .is_some_and(op::is_evaluation);
        let facts = DeathFacts {
            serving,
            syncing: if sent_fault { None } else { syncing },
            never_answered: !slot.answered && !sent_fault,
            said_eval,
        };
        match decision {
            Decision::RestartAfter(delay) => {
                if !delay.is_zero() {
                    tracing::info!(
                        "restarting {label} in {delay:?} (crash {} in a row within 1 s of start)",
                        self.slots[i].tracker.quick_crashes()
                    );
                }
                self.slots[i].restart_at = Some(later(now, delay));
                if kind == Kind::Worker {
                    self.slots[i].died_at = Some(now);
                }
            }
            Decision::GiveUp { restarts, period } => {
                let message = format!(
                    "{label} ended {restarts} times within {period:?} (last: {words}); \
                     giving up (raise --restart-intensity or use --on-give-up backoff)"
                );
                tracing::error!("{message}");
                self.give_up = Some(message);
                self.begin_stop(exit::GAVE_UP);
                return;
            }
        }
        if kind == Kind::Worker && !blameless {
            self.maybe_fall_back(facts);
        }
    }

    /// A standby ended before it was promoted (killed by someone, or it
    /// could not start): replace it later, backing off if it keeps ending.
    pub(super) fn on_standby_exit(&mut self, i: usize, reason: ExitReason) {
        let slot = &mut self.slots[i];
        let Some(mut standby) = slot.standby.take() else {
            return;
        };
        standby.child_mut().set_exited(reason);
        let pid = standby.child().pid().as_raw();
        drop(standby);
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        self.metrics
            .restarted("standby", crate::metrics::cause(&reason, None));
        let delay = slot.standby_backoff;
        slot.standby_backoff = doubled(delay, STANDBY_RETRY_MAX);
        slot.standby_retry = Some(later(Instant::now(), delay));
        tracing::warn!(
            pid,
            "standby of {} {reason}; starting another in {delay:?}",
            slot.label()
        );
    }

    /// Starts a standby for worker slot `i` if it should have one and has none.
    pub(super) fn ensure_standby(&mut self, i: usize) {
        if !self.config.standby
            || self.slots[i].kind != Kind::Worker
            || !matches!(self.phase, Phase::Running)
            || self.slots[i].standby.is_some()
            || self.slots[i].standby_retry.is_some()
        {
            return;
        }
        let spec = self.spec(i);
        let slot = &mut self.slots[i];
        match Standby::spawn(None, &spec) {
            Ok(standby) => {
                tracing::debug!(
                    pid = standby.child().pid().as_raw(),
                    "standby of {} started",
                    slot.label()
                );
                slot.standby = Some(standby);
            }
            Err(e) => {
                let delay = slot.standby_backoff;
                slot.standby_backoff = doubled(delay, STANDBY_RETRY_MAX);
                slot.standby_retry = Some(later(Instant::now(), delay));
                tracing::warn!(
                    "cannot start a standby for {}: {e}; trying again in {delay:?}",
                    slot.label()
                );
            }
        }
    }

    pub(super) fn start_due(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].standby_retry.is_some_and(|at| at <= now) {
                self.slots[i].standby_retry = None;
                self.ensure_standby(i);
            }
            // The evolver waits for a rollback under way to finish.
            let held = self.slots[i].kind == Kind::Evolver && self.rollback.is_some();
            if !held && self.slots[i].restart_at.is_some_and(|at| at <= now) {
                self.slots[i].restart_at = None;
                self.slots[i].restarts += 1;
                if let Some(seg) = &self.slots[i].segment {
                    seg.bump_epoch();
                }
                self.start(i);
            }
        }
    }

    /// Starts slot `i`'s child for the current epoch: a worker slot promotes
    /// its standby if it has a live one, else starts cold, and is sent a
    /// `PING` at once (its first answer ends a recovery: see
    /// [`Self::note_answer`]). Then a worker slot gets a new standby, off
    /// the recovery path: after a death, only once the replacement has
    /// answered (or [`STANDBY_AFTER_DEATH`] later).
    pub(super) fn start(&mut self, i: usize) {
        self.start_child(i);
        if self.slots[i].kind == Kind::Worker && self.slots[i].running() {
            self.slots[i].next_ping = Some(later(Instant::now(), PING_EVERY));
            self.submit(i, Purpose::Ping, link::Job::Ping, self.config.eval_timeout);
        }
        if self.slots[i].died_at.is_none() {
            self.ensure_standby(i);
        }
    }

    /// At a tick: a worker slot whose replacement has not answered
    /// [`STANDBY_AFTER_DEATH`] after the death gets its standby anyway.
    pub(super) fn standbys_after_death(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            let waited = self.slots[i]
                .died_at
                .is_none_or(|t| now.saturating_duration_since(t) >= STANDBY_AFTER_DEATH);
            if waited {
                self.ensure_standby(i);
            }
        }
    }

    /// Worker slot `i`'s current incarnation answered one of the
    /// supervisor's requests; the reply was taken at `at`. If the slot is
    /// recovering from a death and the worker serves the live model (as
    /// far as the supervisor knows: the file it was started on or
    /// accepted by `LOAD`), the recovery is over: its length (death reaped
    /// → this answer) goes to `status` and `/metrics`, and the slot's next
    /// standby is started.
    pub(super) fn note_answer(&mut self, i: usize, at: Instant) {
        let live = self.live_model().map(|m| m.id);
        let slot = &mut self.slots[i];
        let Some(died) = slot.died_at else { return };
        if live.is_none() || slot.serving.map(|s| s.id) != live {
            return;
        }
        slot.died_at = None;
        let took = at.saturating_duration_since(died);
        slot.last_recovery = Some(took);
        slot.recoveries += 1;
        tracing::info!(
            pid = slot.child.as_ref().map(|c| c.pid().as_raw()),
            "{} serving the live model again {:.0} µs after its worker died",
            slot.label(),
            took.as_secs_f64() * 1e6
        );
        self.metrics.recovered(took);
        self.ensure_standby(i);
    }

    pub(super) fn start_child(&mut self, i: usize) {
        let spec = self.spec(i);
        // A worker maps the live file when it starts (a promoted standby
        // re-checks it): note its identity first (a stat, nothing more on
        // the recovery path), so that a file published meanwhile is the
        // newer one and gets a `LOAD` at the next tick.
        let id = stat_key(&self.config.model);
        let slot = &mut self.slots[i];
        slot.sync_after = None;
        slot.sync_backoff = SYNC_BACKOFF;
        slot.load_refused = None;
        slot.unanswered = 0;
        slot.unanswered_since = None;
        slot.answered = false;
        slot.planned_stop = false;
        slot.next_ping = None;
        slot.serving = id.filter(|_| slot.kind == Kind::Worker).map(|id| Serving {
            id,
            verified: false,
        });
        if let Some(old) = slot.child.take() {
            // Always reaped already (a restart follows the reap); were it
            // not, it is killed and its end, reaped later, is an orphan's.
            if old.exited().is_none() {
                old.kill();
                std::mem::forget(old);
            }
        }
        if let Some(standby) = slot.standby.take() {
            let pid = standby.child().pid().as_raw();
            match standby.promote() {
                Ok(child) => {
                    tracing::info!(
                        pid,
                        epoch = slot.segment.as_ref().map(|s| s.epoch()),
                        "{} started (standby promoted)",
                        slot.label()
                    );
                    slot.child = Some(child);
                    return;
                }
                Err(e) => tracing::warn!(
                    pid,
                    "cannot promote the standby of {} ({e}); starting one cold",
                    slot.label()
                ),
            }
        }
        let spawned = match &self.config.worker_cmd {
            Some(argv) if slot.kind == Kind::Worker => {
                spawn::spawn_command(argv, &user_env(&spec, &self.config.model), &spec)
            }
            _ if slot.kind == Kind::Evolver && !self.config.evolver_env.is_empty() => {
                spawn::spawn_with_env(&spec, &self.config.evolver_env)
            }
            _ => spawn::spawn(&spec),
        };
        match spawned {
            Ok(child) => {
                tracing::info!(
                    pid = child.pid().as_raw(),
                    epoch = slot.segment.as_ref().map(|s| s.epoch()),
                    "{} started",
                    slot.label()
                );
                slot.child = Some(child);
            }
            Err(e) => {
                tracing::error!("cannot start {}: {e}", slot.label());
                slot.last_exit = Some(format!("could not be started: {e}"));
                let decision =
                    slot.tracker
                        .on_exit(&self.config.policy, Duration::ZERO, Instant::now());
                match decision {
                    Decision::RestartAfter(delay) => {
                        slot.restart_at =
                            Some(later(Instant::now(), delay.max(Duration::from_millis(100))))
                    }
                    Decision::GiveUp { .. } => {
                        self.give_up = Some(format!("cannot start {}: {e}", slot.label()));
                        self.begin_stop(exit::GAVE_UP);
                    }
                }
            }
        }
    }

    pub(super) fn spec(&self, i: usize) -> ChildSpec {
        let slot = &self.slots[i];
        match slot.kind {
            Kind::Worker => {
                let fd = slot
                    .segment
                    .as_ref()
                    .expect("workers have segments")
                    .fd()
                    .as_raw_fd();
                let mut args: Vec<OsString> = vec![
                    "--ring-fd".into(),
                    fd.to_string().into(),
                    "--model".into(),
                    self.config.model.clone().into(),
                ];
                // A user's program (`--worker-cmd`) is never a fault target.
                if self.config.allow_fault_injection && self.config.worker_cmd.is_none() {
                    args.push("--allow-fault-injection".into());
                    if let Some(n) = self.config.poison_one_in {
                        args.push("--poison-one-in".into());
                        args.push(n.to_string().into());
                    }
                }
                ChildSpec {
                    role: "worker",
                    args,
                    keep_fds: vec![fd],
                    harden: true,
                    memory_limit: self.config.worker_memory_limit,
                    block_sighup: false,
                }
            }
            Kind::Evolver => {
                let fds: Vec<i32> = self
                    .slots
                    .iter()
                    .filter_map(|s| s.segment.as_ref().map(|seg| seg.fd().as_raw_fd()))
                    .collect();
                let list = fds
                    .iter()
                    .map(|fd| fd.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let mut args: Vec<OsString> = vec![
                    "--dir".into(),
                    self.config.dir.clone().into(),
                    "--ring-fds".into(),
                    list.into(),
                    "--control-socket".into(),
                    self.config.control_socket.clone().into(),
                ];
                if self.config.allow_fault_injection {
                    args.push("--allow-fault-injection".into());
                }
                args.extend(self.config.evolver_args.iter().cloned());
                ChildSpec {
                    role: self.config.evolver_role,
                    args,
                    keep_fds: fds,
                    harden: true,
                    memory_limit: None,
                    // `evod wake` right after a restart must not find it
                    // without its handler (see `ChildSpec::block_sighup`).
                    block_sighup: true,
                }
            }
        }
    }

    /// Kills workers whose heartbeat stalled, and workers that beat but
    /// leave the supervisor's requests unanswered ([`UNANSWERED_IN_ROW`]
    /// timeouts in a row over at least `--eval-timeout`).
    pub(super) fn watchdog(&mut self) {
        let timeout = self.config.heartbeat_timeout;
        let patience = self.config.eval_timeout;
        let now = Instant::now();
        for slot in &mut self.slots {
            if let Some(standby) = slot.standby.as_mut()
                && standby.poll_ready()
            {
                slot.standby_backoff = STANDBY_RETRY;
            }
            let (Some(seg), Some(child)) = (&slot.segment, &slot.child) else {
                continue;
            };
            if child.exited().is_some() {
                continue;
            }
            seg.beat(Role::Supervisor);
            let age = seg.beat_age(Role::Worker);
            if age > timeout && slot.kill_cause.is_none() {
                tracing::error!(
                    pid = child.pid().as_raw(),
                    "{} missed its heartbeat for {:.1}s (timeout {:?}): killing it",
                    slot.label(),
                    age.as_secs_f64(),
                    timeout
                );
                slot.kill_cause = Some(format!("heartbeat stalled for {:.1}s", age.as_secs_f64()));
                let _ = child.signal(Signal::SIGKILL);
                continue;
            }
            if slot.unanswered >= UNANSWERED_IN_ROW
                && let Some(since) = slot.unanswered_since
                && now.saturating_duration_since(since) >= patience
                && slot.kill_cause.is_none()
            {
                let over = now.saturating_duration_since(since).as_secs_f64();
                tracing::error!(
                    pid = child.pid().as_raw(),
                    "{} beats but answered none of the supervisor's last {} requests ({over:.1}s): killing it",
                    slot.label(),
                    slot.unanswered,
                );
                slot.kill_cause = Some(format!(
                    "unresponsive: answered none of the supervisor's last {} requests in {over:.1}s",
                    slot.unanswered
                ));
                slot.blameless_kill = true;
                let _ = child.signal(Signal::SIGKILL);
            }
        }
    }
}

/// The environment of a user's worker program: the ring descriptor and the
/// model, as `--ring-fd` and `--model` also say.
fn user_env(spec: &ChildSpec, model: &std::path::Path) -> Vec<(OsString, OsString)> {
    let fd = spec.keep_fds.first().map_or(-1, |fd| *fd);
    vec![
        ("EVOD_RING_FD".into(), fd.to_string().into()),
        ("EVOD_MODEL".into(), model.into()),
    ]
}

impl Slot {
    pub(super) fn label(&self) -> String {
        format!("{} {}", self.kind.name(), self.index)
    }

    /// Leaves this worker alone (no `LOAD`, no canary) for the current
    /// backoff, and doubles it.
    pub(super) fn back_off(&mut self, now: Instant) {
        self.sync_after = Some(later(now, self.sync_backoff));
        self.sync_backoff = doubled(self.sync_backoff, SYNC_BACKOFF_MAX);
    }

    /// After a failed call on this worker's control channel: a worker that
    /// broke the protocol there (corrupt ring state, a reply that does not
    /// decode) is not trusted again: SIGKILL, then the usual restart. Other
    /// errors (timeout, refusal, peer lost) are left to the caller.
    pub(super) fn distrust_on(&mut self, e: &link::LinkError) {
        let broke = matches!(
            e,
            link::LinkError::Ring(
                evod_ring::RingError::PeerCorrupt { .. } | evod_ring::RingError::Protocol { .. }
            ) | link::LinkError::BadReply { .. }
        );
        let Some(child) = self.child.as_ref().filter(|c| c.exited().is_none()) else {
            return;
        };
        // A zombie ended by itself (a scribbler exits after scribbling):
        // its own exit status says what happened.
        if !broke || self.kill_cause.is_some() || reap::is_zombie(child.pid()) {
            return;
        }
        tracing::error!(
            pid = child.pid().as_raw(),
            "{} broke the protocol on its control channel ({e}): killing it",
            self.label()
        );
        self.kill_cause = Some(format!("its control channel is corrupt: {e}"));
        self.blameless_kill = true;
        let _ = child.signal(Signal::SIGKILL);
    }

    pub(super) fn running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| c.exited().is_none())
    }
}

impl Slot {
    pub(super) fn new(kind: Kind, index: usize, segment: Option<Arc<Segment>>) -> Slot {
        Slot {
            kind,
            index,
            child: None,
            tracker: RestartTracker::default(),
            restarts: 0,
            last_exit: None,
            restart_at: None,
            kill_cause: None,
            done: false,
            segment,
            link: None,
            jobs: VecDeque::new(),
            ping: None,
            next_ping: None,
            unanswered: 0,
            unanswered_since: None,
            answered: false,
            sigterm_at: None,
            planned_stop: false,
            standby: None,
            standby_retry: None,
            standby_backoff: STANDBY_RETRY,
            serving: None,
            sync_after: None,
            sync_backoff: SYNC_BACKOFF,
            load_refused: None,
            blameless_kill: false,
            died_at: None,
            recoveries: 0,
            last_recovery: None,
        }
    }
}
