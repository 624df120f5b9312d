//! Control-socket requests: `status`, `exec`, `stop`, `rollback`,
//! `wake`, `recycle`, `fault`.

use super::*;

impl Supervisor {
    /// Handles one request. `None`: the answer comes later on `reply` (a
    /// call on a worker, a rollback), so the loop never waits for it.
    pub(super) fn on_request(
        &mut self,
        request: Request,
        reply: &mpsc::Sender<Response>,
    ) -> Option<Response> {
        Some(match request {
            Request::Status => Response::ok(self.status()),
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                self.begin_stop(exit::OK);
                Response::ok("stopping")
            }
            Request::Exec { inputs } => return self.exec(inputs, reply),
            Request::Wake => self.wake_evolver(),
            Request::Fault { worker, kind } => return self.inject_fault(worker, kind, reply),
            Request::Recycle {
                worker,
                epoch,
                reason,
            } => self.recycle(worker, epoch, &reason),
            Request::Report { report } => self.on_evolver_report(report),
            Request::Rollback { to } => {
                let to = match to {
                    Some(g) => RollbackTo::Exact(g),
                    None => RollbackTo::Before {
                        live: None,
                        good: None,
                    },
                };
                self.roll_back(to, None, Some(reply.clone()));
                return None;
            }
        })
    }

    /// Kills worker `index` so that it is replaced (the evolver asks when the
    /// worker corrupts its ring but keeps running). The exit is handled like
    /// any other: logged with `reason`, counted by the restart policy.
    pub(super) fn recycle(&mut self, index: usize, epoch: u64, reason: &str) -> Response {
        let Some(slot) = self
            .slots
            .iter_mut()
            .find(|s| s.kind == Kind::Worker && s.index == index)
        else {
            return Response::error(format!("no worker {index}"));
        };
        // The owner's own count, which a worker cannot overwrite (the
        // shared word it can). An older epoch: that incarnation ended and was
        // replaced meanwhile (a scribbler exits by itself), and the new one
        // did nothing wrong. Any other value (the current one, or one a
        // liar forged into the shared word) means this incarnation.
        let now = slot.segment.as_ref().map(|s| s.trusted_epoch());
        if now.is_some_and(|now| epoch < now) {
            return Response::ok(serde_json::json!({
                "worker": index,
                "already_replaced": true,
                "epoch": now,
            }));
        }
        let Some(child) = slot.child.as_ref().filter(|c| c.exited().is_none()) else {
            return Response::error(format!("worker {index} is not running"));
        };
        let pid = child.pid().as_raw();
        // A zombie ended by itself: its exit status tells why.
        if slot.kill_cause.is_none() && !reap::is_zombie(child.pid()) {
            let reason: String = reason.chars().take(200).collect();
            tracing::error!(pid, "recycling worker {index}: {reason}");
            slot.kill_cause = Some(format!("recycled: {reason}"));
            slot.blameless_kill = true;
            let _ = child.signal(Signal::SIGKILL);
        }
        Response::ok(serde_json::json!({ "worker": index, "pid": pid }))
    }

    /// Wakes a resting evolver (`evod wake`, SIGHUP): sends it SIGHUP; an
    /// evolver that is not resting ignores it.
    pub(super) fn wake_evolver(&mut self) -> Response {
        let evolver = self.slots.iter().find(|s| s.kind == Kind::Evolver);
        let Some(child) = evolver.and_then(|s| s.child.as_ref().filter(|c| c.exited().is_none()))
        else {
            return Response::error("no evolver is running");
        };
        tracing::info!(pid = child.pid().as_raw(), "waking the evolver (SIGHUP)");
        match child.signal(Signal::SIGHUP) {
            Ok(()) => Response::ok(serde_json::json!({ "evolver": child.pid().as_raw() })),
            Err(e) => Response::error(format!("cannot signal the evolver: {e}")),
        }
    }

    /// Sends a fault opcode to worker `index` (`evod fault`), through its
    /// link thread.
    pub(super) fn inject_fault(
        &mut self,
        index: usize,
        kind: String,
        reply: &mpsc::Sender<Response>,
    ) -> Option<Response> {
        if !self.config.allow_fault_injection {
            return Some(Response::error(
                "fault injection is off: the daemon was started without --allow-fault-injection",
            ));
        }
        let (opcode, code) = match evod_wire::fault::parse_kind(&kind) {
            Ok(x) => x,
            Err(e) => return Some(Response::error(e.to_string())),
        };
        let Some(i) = self
            .slots
            .iter()
            .position(|s| s.kind == Kind::Worker && s.index == index)
        else {
            return Some(Response::error(format!("no worker {index}")));
        };
        let (Some(child), true) = (&self.slots[i].child, self.slots[i].running()) else {
            return Some(Response::error(format!("worker {index} is not running")));
        };
        tracing::warn!(
            pid = child.pid().as_raw(),
            "injecting fault {kind:?} into worker {index}"
        );
        let job = link::Job::Send {
            opcode,
            payload: code.to_le_bytes().to_vec(),
        };
        if self.submit(i, Purpose::Fault(reply.clone(), kind), job, Duration::ZERO) {
            None
        } else {
            Some(Response::error(format!("worker {index}: its link is gone")))
        }
    }

    /// `evod exec`: one row on a running worker (the one with the fewest
    /// jobs queued, round robin among equals), answered when it replies.
    pub(super) fn exec(
        &mut self,
        inputs: Vec<f32>,
        reply: &mpsc::Sender<Response>,
    ) -> Option<Response> {
        if inputs.is_empty() || inputs.len() > 1 << 16 {
            return Some(Response::error(format!(
                "expected 1 to 65536 inputs, got {}",
                inputs.len()
            )));
        }
        let workers: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].kind == Kind::Worker && self.slots[i].running())
            .collect();
        if workers.is_empty() {
            return Some(Response::error("no worker is running"));
        }
        let n = workers.len();
        let start = self.next_exec;
        self.next_exec = self.next_exec.wrapping_add(1);
        let i = (0..n)
            .map(|k| workers[(start + k) % n])
            .min_by_key(|&i| self.slots[i].jobs.len())
            .expect("at least one worker");
        let timeout = self.config.exec_timeout;
        // Not started within its own deadline, or once its client has
        // given up: dropped by the link thread rather than run (a slow
        // worker would pile up rows that hold off LOAD and the canary).
        let expires = later(
            Instant::now(),
            timeout.min(evod_wire::control::REQUEST_DEADLINE),
        );
        if self.submit_until(
            i,
            Purpose::Exec(reply.clone()),
            link::Job::Exec(inputs),
            timeout,
            Some(expires),
        ) {
            None
        } else {
            Some(Response::error(format!(
                "{}: its link is gone",
                self.slots[i].label()
            )))
        }
    }

    /// The daemon's state from what the loop already knows (no call on a
    /// worker, no model file read). Healthy means "can serve": not
    /// stopping, the live model identified (it parses and its checksum
    /// reads), and at least one running worker verified on that exact
    /// file (it loaded it and answered the canary).
    pub(super) fn status(&mut self) -> StatusReport {
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let live_model = self.live_model();
        let healthy = self.readiness().is_ok();
        let mut children = Vec::new();
        for slot in &mut self.slots {
            let running = slot.running();
            let mut row = ChildStatus {
                role: match slot.kind {
                    Kind::Evolver => self.config.evolver_role.into(),
                    kind => kind.name().into(),
                },
                index: slot.index,
                state: if running {
                    "running".into()
                } else if slot.done {
                    "finished".into()
                } else if slot.restart_at.is_some() {
                    "restarting".into()
                } else {
                    "stopped".into()
                },
                pid: slot
                    .child
                    .as_ref()
                    .filter(|_| running)
                    .map(|c| c.pid().as_raw() as u32),
                uptime_s: slot
                    .child
                    .as_ref()
                    .filter(|_| running)
                    .map(|c| c.started().elapsed().as_secs_f64()),
                restarts: slot.restarts,
                last_exit: slot.last_exit.clone(),
                epoch: None,
                generation: None,
                ping_us: None,
                heartbeat_age_s: None,
                stats: None,
                standby_pid: None,
                standby_ready: None,
                recoveries: slot.recoveries,
                last_recovery_us: slot.last_recovery.map(|d| d.as_secs_f64() * 1e6),
            };
            if let Some(standby) = slot.standby.as_mut() {
                row.standby_pid = Some(standby.child().pid().as_raw() as u32);
                row.standby_ready = Some(standby.poll_ready());
            }
            if let Some(seg) = &slot.segment {
                row.epoch = Some(seg.trusted_epoch());
                let stats = seg.stats();
                row.generation = (stats.model_generation != 0).then_some(stats.model_generation);
                row.heartbeat_age_s = Some(seg.beat_age(Role::Worker).as_secs_f64());
                // The last background PING of this incarnation.
                row.ping_us = slot.ping.map(|(d, _)| d.as_secs_f64() * 1e6);
                row.stats = Some(stats_json(&stats));
            }
            children.push(row);
        }
        let live = live_model.and_then(|m| m.generation);
        StatusReport {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            dir: self.config.dir.display().to_string(),
            model: self.config.model.display().to_string(),
            generation: live,
            stopping,
            healthy,
            rollbacks: self.rollbacks,
            good_generation: self.good_generation,
            children,
            // The marker of a running evolver only (a stale one may stay
            // behind a stopped or killed evolver).
            converged: self
                .slots
                .iter()
                .any(|s| s.kind == Kind::Evolver && s.running())
                .then(|| evod_wire::rest::read(&self.config.dir))
                .flatten(),
            hosts: self.metrics.evolver_hosts(),
        }
    }
}

fn stats_json(s: &evod_ring::StatsSnapshot) -> serde_json::Value {
    let per_opcode: serde_json::Map<String, serde_json::Value> = s
        .requests_per_opcode
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(o, n)| (op::name(o as u32).to_owned(), (*n).into()))
        .collect();
    serde_json::json!({
        "requests": per_opcode,
        "requests_other_opcodes": s.requests_other_opcodes,
        "errors": s.errors,
        "last_service_us": s.last_service.as_secs_f64() * 1e6,
        "max_service_us": s.max_service.as_secs_f64() * 1e6,
        "model_generation": s.model_generation,
        // Worker-written: what it says it is serving now (shown only).
        "in_service": s.in_service.map(op::name),
        "worker_uptime_s": s.uptime.map(|u| u.as_secs_f64()),
    })
}
