//! The children's lifecycle: the slots' workers and evolver (start, reap,
//! restart with the policy's backoff, the heartbeat watchdog), each
//! worker's warm standby (start, retry, promotion) and the crash notices
//! (a worker that says it is dying is killed and replaced at once; its
//! reap only records how it ended).
//!
//! Each death is counted once, whichever way it is learnt:
//!
//! - reaped without a notice (SIGKILL, OOM, `exit`, a notice that came
//!   late or never): `on_exit` does everything, from the exit status;
//! - noticed: `on_notice` moves the worker to `retired` and does the
//!   death's accounting at once (the restart policy and its backoff, the
//!   fallback's blame from the supervisor's own facts, the recovery
//!   clock, the replacement: `count_death`, shared with `on_exit`), so
//!   its standby is promoted before the kernel has torn it down;
//!   [`NOTICE_GRACE`] later, unless it is reaped or dying by then
//!   (`reap::is_exiting`), it is SIGKILLed (`kill_retired_due`: ours and
//!   not reaped, so its pid cannot have been reused): a worker that sent
//!   the notice without dying. Its reap, whatever the status (the
//!   notified signal, another one, or that SIGKILL), goes to
//!   `on_retired_exit`, which logs it, counts it in `evod_restarts_total`
//!   by its real cause and puts it in the slot's `last_exit` — and
//!   restarts nothing;
//! - a notice for a worker already reaped, or from a process that is not
//!   its slot's current worker (a standby, a replaced worker), matches no
//!   slot's token and is ignored.

use std::os::unix::net::UnixStream;

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
                    None => match self.retired.iter().position(|r| r.child.pid() == pid) {
                        Some(k) => self.on_retired_exit(k, reason),
                        None => {
                            tracing::debug!(pid = pid.as_raw(), "reaped an orphan: {reason}");
                            // Perhaps a standby that died before the
                            // spawner's report came (`on_standby_spawned`).
                            if self.slots.iter().any(|s| s.standby_spawning.is_some()) {
                                self.orphans.push((pid, reason, Instant::now()));
                            }
                        }
                    },
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
        slot.last_death = Some(child.pid());
        slot.notice = None;
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
        self.count_death(i, now, uptime, &words, blameless);
    }

    /// The accounting of slot `i`'s child's death, reaped or noticed, once
    /// each: the restart policy (backoff, intensity), the recovery clock,
    /// the replacement's start time and the fallback's blame from the
    /// supervisor's own facts (read before the epoch is bumped).
    fn count_death(
        &mut self,
        i: usize,
        now: Instant,
        uptime: Duration,
        words: &str,
        blameless: bool,
    ) {
        let slot = &mut self.slots[i];
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

    /// A worker's link carried a crash notice. From the slot's current,
    /// unreaped worker: retire it (SIGKILLed [`NOTICE_GRACE`] later if it
    /// is not dying by then), count its death now and let its replacement
    /// start (the standby is promoted at once when the policy allows an
    /// immediate restart), without waiting for the kernel to tear the
    /// process down and send SIGCHLD. From anything else: ignored.
    pub(super) fn on_notice(&mut self, notice: notice::Notice) {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.notice == Some(notice.token))
        else {
            tracing::debug!(
                token = notice.token,
                "a crash notice from a process that is not a slot's current worker: ignored"
            );
            return;
        };
        let stopping = !matches!(self.phase, Phase::Running);
        let slot = &mut self.slots[i];
        slot.notice = None;
        if stopping || !slot.running() {
            // Stopping (the SIGCHLD path records the end), or reaped already.
            return;
        }
        let name = match notice.signal {
            0 => "no known signal",
            s => reap::signal_name(s),
        };
        let now = Instant::now();
        let child = slot.child.take().expect("a running slot has a child");
        let pid = child.pid();
        let uptime = now.duration_since(child.started());
        let words = format!("crash notice: {name} (exit status not reaped yet)");
        slot.last_exit = Some(words.clone());
        slot.last_death = Some(pid);
        slot.ping = None;
        let kill_cause = slot.kill_cause.take();
        let blameless = std::mem::take(&mut slot.blameless_kill);
        tracing::warn!(
            pid = pid.as_raw(),
            uptime_s = uptime.as_secs_f64(),
            "{} sent a crash notice ({name}): replaced without waiting for its reap",
            slot.label()
        );
        // Already being killed for something else: nothing to add.
        let kill_at = kill_cause.is_none().then(|| later(now, NOTICE_GRACE));
        self.retired.push(Retired {
            slot: i,
            child,
            noticed: notice.signal,
            kill_cause,
            kill_at,
        });
        self.count_death(i, now, uptime, &words, blameless);
    }

    /// A worker killed after its crash notice was reaped: its death was
    /// counted then; now its exit status is logged, counted in
    /// `evod_restarts_total` by its real cause and, if it is still the
    /// slot's last death, shown as its `last_exit`. Nothing is restarted.
    fn on_retired_exit(&mut self, k: usize, reason: ExitReason) {
        let mut retired = self.retired.swap_remove(k);
        retired.child.set_exited(reason);
        let pid = retired.child.pid();
        let name = match retired.noticed {
            0 => "no known signal",
            s => reap::signal_name(s),
        };
        let kill_cause = retired.kill_cause;
        let words = match &kill_cause {
            Some(cause) => format!("{reason} ({cause})"),
            None => format!("{reason} (after its crash notice, {name})"),
        };
        let slot = &mut self.slots[retired.slot];
        tracing::info!(pid = pid.as_raw(), "{} {words}", slot.label());
        self.metrics.restarted(
            slot.kind.name(),
            crate::metrics::cause(&reason, kill_cause.as_deref()),
        );
        if slot.last_death == Some(pid) {
            slot.last_exit = Some(words);
        }
    }

    /// SIGKILLs each retired worker whose [`NOTICE_GRACE`] is over, unless
    /// it is dying already (a worker that sent its crash notice and did not
    /// die: hostile or wrong).
    pub(super) fn kill_retired_due(&mut self, now: Instant) {
        for retired in &mut self.retired {
            if retired.kill_at.is_none_or(|at| at > now) {
                continue;
            }
            retired.kill_at = None;
            // Not reaped (it is still in `retired`): the pid is this
            // process's, a zombie or not.
            let pid = retired.child.pid();
            if reap::is_exiting(pid) {
                continue;
            }
            let name = match retired.noticed {
                0 => "no known signal",
                s => reap::signal_name(s),
            };
            tracing::error!(
                pid = pid.as_raw(),
                "{} sent a crash notice ({name}) {NOTICE_GRACE:?} ago and is still running: killing it",
                self.slots[retired.slot].label()
            );
            retired.kill_cause = Some(format!("crash notice ({name}) without dying of it"));
            retired.child.kill();
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
        slot.standby_at = Some(later(Instant::now(), delay));
        tracing::warn!(
            pid,
            "standby of {} {reason}; starting another in {delay:?}",
            slot.label()
        );
    }

    /// Asks the spawner for a standby for worker slot `i` if it should have
    /// one and has none (nor one on the way). The fork and `exec` happen
    /// on the spawner's thread; the standby arrives as
    /// [`Event::Standby`] ([`Self::on_standby_spawned`]).
    pub(super) fn ensure_standby(&mut self, i: usize) {
        if !self.config.standby
            || self.slots[i].kind != Kind::Worker
            || !matches!(self.phase, Phase::Running)
            || self.slots[i].standby.is_some()
            || self.slots[i].standby_spawning.is_some()
            || self.slots[i].standby_at.is_some()
        {
            return;
        }
        let spec = self.spec(i);
        let token = self.next_standby;
        self.next_standby += 1;
        let hold = Box::new(self.slots[i].segment.clone());
        match self.spawner.request(i, token, None, spec, hold) {
            Ok(()) => self.slots[i].standby_spawning = Some((token, Instant::now())),
            // Its thread is gone (it cannot end while the supervisor runs):
            // started here instead.
            Err(spec) => {
                tracing::warn!("the standby spawner is gone: starting the standby on the loop");
                let result = Standby::spawn(None, &spec);
                self.adopt_standby(i, result);
            }
        }
    }

    /// A standby the spawner started for slot `i` (or failed to start).
    pub(super) fn on_standby_spawned(&mut self, spawned: standby::Spawned) {
        let i = spawned.slot;
        let Some((token, asked)) = self.slots[i].standby_spawning else {
            return;
        };
        if token != spawned.token {
            return;
        }
        self.slots[i].standby_spawning = None;
        let mut result = spawned.result;
        if let Ok(standby) = &mut result {
            // Dead and reaped before this report came: the reap took it
            // for an orphan (it was not the slot's yet).
            if let Some(reason) = take_orphan(&mut self.orphans, standby.child().pid(), asked) {
                standby.child_mut().set_exited(reason);
            }
        }
        if self.slots.iter().all(|s| s.standby_spawning.is_none()) {
            self.orphans.clear();
        }
        self.adopt_standby(i, result);
    }

    /// Makes `result` slot `i`'s standby; on an error, or a standby that
    /// has already ended, tries again later with the standby backoff.
    fn adopt_standby(&mut self, i: usize, result: std::io::Result<Standby>) {
        let running = matches!(self.phase, Phase::Running);
        let slot = &mut self.slots[i];
        match result {
            Ok(standby) if !running || slot.standby.is_some() => {
                // Stopping: not wanted. Killed without waiting: kept as the
                // slot's standby, the SIGCHLD path reaps it (or the slot's
                // `Child` drop at the end); if the slot has one already,
                // forgotten, and reaped as an orphan.
                standby.child().kill();
                if slot.standby.is_none() {
                    slot.standby = Some(standby);
                } else {
                    std::mem::forget(standby);
                }
            }
            Ok(mut standby) => {
                let pid = standby.child().pid().as_raw();
                let ended = standby.child().exited();
                tracing::debug!(pid, "standby of {} started", slot.label());
                // Started before a newer file was published, it may have
                // mapped the older one: it checks (one `stat` if not).
                standby.refresh();
                slot.standby = Some(standby);
                if let Some(reason) = ended {
                    self.on_standby_exit(i, reason);
                }
            }
            Err(_) if !running => {}
            Err(e) => {
                let delay = slot.standby_backoff;
                slot.standby_backoff = doubled(delay, STANDBY_RETRY_MAX);
                slot.standby_at = Some(later(Instant::now(), delay));
                tracing::warn!(
                    "cannot start a standby for {}: {e}; trying again in {delay:?}",
                    slot.label()
                );
            }
        }
    }

    pub(super) fn start_due(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].standby_at.is_some_and(|at| at <= now) {
                self.slots[i].standby_at = None;
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
    /// the recovery path: after a death, only [`STANDBY_AFTER_RECOVERY`]
    /// after the replacement has answered (or [`STANDBY_AFTER_DEATH`]
    /// after the death if it has not answered by then).
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
    /// standby is started [`STANDBY_AFTER_RECOVERY`] later.
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
        let due = later(at, STANDBY_AFTER_RECOVERY);
        slot.standby_at = Some(slot.standby_at.map_or(due, |t| t.max(due)));
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
        slot.notice = None;
        if let Some(standby) = slot.standby.take() {
            let pid = standby.child().pid().as_raw();
            match standby.promote() {
                Ok((child, link)) => {
                    tracing::info!(
                        pid,
                        epoch = slot.segment.as_ref().map(|s| s.epoch()),
                        "{} started (standby promoted)",
                        slot.label()
                    );
                    slot.child = Some(child);
                    // Its link stays open: the crash-notice channel.
                    slot.notice = watch_link(&self.notices, &mut self.next_notice, link);
                    return;
                }
                Err(e) => tracing::warn!(
                    pid,
                    "cannot promote the standby of {} ({e}); starting one cold",
                    slot.label()
                ),
            }
        }
        // A worker started cold gets a link of its own for its crash
        // notice (`--notice-fd N`; a user's program only `EVOD_NOTICE_FD`,
        // so its arguments stay what they were).
        let mut spec = spec;
        let mut env_notice = Vec::new();
        let link = match slot.kind {
            Kind::Worker => match UnixStream::pair() {
                Ok((ours, theirs)) => {
                    let fd = theirs.as_raw_fd();
                    spec.keep_fds.push(fd);
                    if self.config.worker_cmd.is_none() {
                        spec.args.push("--notice-fd".into());
                        spec.args.push(fd.to_string().into());
                    }
                    env_notice.push((
                        evod_wire::notice::NOTICE_FD_VAR.into(),
                        fd.to_string().into(),
                    ));
                    Some((ours, theirs))
                }
                Err(e) => {
                    tracing::warn!(
                        "no crash-notice link for {} ({e}): its death is learnt from SIGCHLD",
                        slot.label()
                    );
                    None
                }
            },
            Kind::Evolver => None,
        };
        let spawned = match &self.config.worker_cmd {
            Some(argv) if slot.kind == Kind::Worker => {
                let mut env = user_env(&spec, &self.config.model);
                env.extend(env_notice);
                spawn::spawn_command(argv, &env, &spec)
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
                if let Some((ours, theirs)) = link {
                    // The child has its own copy; ours must go, so that its
                    // end is the only one left.
                    drop(theirs);
                    slot.notice = watch_link(&self.notices, &mut self.next_notice, ours);
                }
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

/// Takes from `orphans` (children reaped that matched no slot: pid, how
/// it ended, when) the end of the standby `pid` asked of the spawner at
/// `asked`. Only what was reaped after the request can be that child (a
/// pid reaped earlier was someone else's, whatever its number).
fn take_orphan(
    orphans: &mut Vec<(nix::unistd::Pid, ExitReason, Instant)>,
    pid: nix::unistd::Pid,
    asked: Instant,
) -> Option<ExitReason> {
    let k = orphans
        .iter()
        .position(|&(p, _, at)| p == pid && at >= asked)?;
    Some(orphans.swap_remove(k).1)
}

/// Hands the supervisor's end of a worker's link to the notice thread under
/// a new token; the token, or `None` (logged) if it could not be watched.
fn watch_link(notices: &NoticeThread, next: &mut u64, link: UnixStream) -> Option<u64> {
    let token = *next;
    *next += 1;
    match notices.watch(token, link) {
        Ok(()) => Some(token),
        Err(e) => {
            tracing::warn!(
                "cannot watch a worker's crash-notice link ({e}): its death is learnt from SIGCHLD"
            );
            None
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
            standby_spawning: None,
            standby_at: None,
            standby_backoff: STANDBY_RETRY,
            serving: None,
            sync_after: None,
            sync_backoff: SYNC_BACKOFF,
            load_refused: None,
            blameless_kill: false,
            died_at: None,
            recoveries: 0,
            last_recovery: None,
            notice: None,
            last_death: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_reaped_as_an_orphan_is_matched_by_pid_and_only_after_its_request() {
        let pid = nix::unistd::Pid::from_raw;
        let t0 = Instant::now();
        let asked = t0 + Duration::from_millis(5);
        let killed = ExitReason::Signaled {
            signal: 9,
            core_dumped: false,
        };
        let exited = ExitReason::Exited { code: 3 };
        let mut orphans = vec![
            // The same number, reaped before the request: another process.
            (pid(40), killed, t0),
            (pid(41), exited, asked + Duration::from_millis(1)),
            (pid(40), exited, asked + Duration::from_millis(2)),
        ];
        assert_eq!(take_orphan(&mut orphans, pid(40), asked), Some(exited));
        assert_eq!(orphans.len(), 2);
        // Taken once.
        assert_eq!(take_orphan(&mut orphans, pid(40), asked), None);
        assert_eq!(take_orphan(&mut orphans, pid(42), asked), None);
        assert_eq!(take_orphan(&mut orphans, pid(41), asked), Some(exited));
        assert_eq!(orphans, vec![(pid(40), killed, t0)]);
    }
}
