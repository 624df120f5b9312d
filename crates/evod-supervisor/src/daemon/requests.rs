//! Control-socket requests: `status`, `exec`, `stop`, `rollback`,
//! `wake`, `recycle`, `fault`.

use super::*;

impl Supervisor {
    pub(super) fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::ok(self.status()),
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                self.begin_stop(exit::OK);
                Response::ok("stopping")
            }
            Request::Exec { inputs } => self.exec(&inputs),
            Request::Wake => self.wake_evolver(),
            Request::Fault { worker, kind } => self.inject_fault(worker, &kind),
            Request::Recycle {
                worker,
                epoch,
                reason,
            } => self.recycle(worker, epoch, &reason),
            Request::Rollback { to } => {
                let to = match to {
                    Some(g) => Some(g),
                    None => self
                        .read_model_identity()
                        .and_then(|m| m.generation)
                        .and_then(|live| {
                            evod_store::previous_generation(&self.config.dir, live, None)
                        }),
                };
                let Some(to) = to else {
                    return Response::error(format!(
                        "no earlier generation in {}",
                        evod_store::history_dir(&self.config.dir).display()
                    ));
                };
                match self.roll_back(to, None) {
                    Ok(g) => Response::ok(serde_json::json!({ "generation": g })),
                    Err(e) => Response::error(chain(&e)),
                }
            }
        }
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

    /// Sends a fault opcode to worker `index` (`evod fault`).
    pub(super) fn inject_fault(&mut self, index: usize, kind: &str) -> Response {
        if !self.config.allow_fault_injection {
            return Response::error(
                "fault injection is off: the daemon was started without --allow-fault-injection",
            );
        }
        let (opcode, code) = match evod_wire::fault::parse_kind(kind) {
            Ok(x) => x,
            Err(e) => return Response::error(e.to_string()),
        };
        let Some(slot) = self
            .slots
            .iter()
            .find(|s| s.kind == Kind::Worker && s.index == index)
        else {
            return Response::error(format!("no worker {index}"));
        };
        let (Some(seg), Some(child), true) = (&slot.segment, &slot.child, slot.running()) else {
            return Response::error(format!("worker {index} is not running"));
        };
        tracing::warn!(
            pid = child.pid().as_raw(),
            "injecting fault {kind:?} into worker {index}"
        );
        match link::send_only(seg, opcode, &code.to_le_bytes()) {
            Ok(()) => Response::ok(serde_json::json!({
                "worker": index,
                "pid": child.pid().as_raw(),
                "kind": kind,
            })),
            Err(e) => Response::error(format!("worker {index}: {e}")),
        }
    }

    pub(super) fn exec(&mut self, inputs: &[f32]) -> Response {
        if inputs.is_empty() || inputs.len() > 1 << 16 {
            return Response::error(format!("expected 1 to 65536 inputs, got {}", inputs.len()));
        }
        let workers: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].kind == Kind::Worker && self.slots[i].running())
            .collect();
        if workers.is_empty() {
            return Response::error("no worker is running");
        }
        let i = workers[self.next_exec % workers.len()];
        self.next_exec = self.next_exec.wrapping_add(1);
        let slot = &mut self.slots[i];
        let seg = slot.segment.as_ref().expect("workers have segments");
        let start = Instant::now();
        match link::exec(seg, inputs, EXEC_TIMEOUT) {
            Ok(outputs) => Response::ok(serde_json::json!({
                "outputs": outputs,
                "worker": slot.index,
                "latency_us": start.elapsed().as_secs_f64() * 1e6,
            })),
            Err(e) => {
                slot.distrust_on(&e);
                Response::error(format!("{}: {e}", slot.label()))
            }
        }
    }

    pub(super) fn status(&mut self) -> StatusReport {
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let timeout = self.config.heartbeat_timeout;
        let mut healthy = !stopping;
        let mut children = Vec::new();
        for slot in &mut self.slots {
            let running = slot.running();
            let mut row = ChildStatus {
                role: slot.kind.name().into(),
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
            };
            if let Some(standby) = slot.standby.as_mut() {
                row.standby_pid = Some(standby.child().pid().as_raw() as u32);
                row.standby_ready = Some(standby.poll_ready());
            }
            let mut ping_error = None;
            if let Some(seg) = &slot.segment {
                row.epoch = Some(seg.trusted_epoch());
                let stats = seg.stats();
                row.generation = (stats.model_generation != 0).then_some(stats.model_generation);
                row.heartbeat_age_s = Some(seg.beat_age(Role::Worker).as_secs_f64());
                if running && !stopping {
                    slot.ping = match link::ping(seg, PING_TIMEOUT) {
                        Ok(rtt) => Some(rtt),
                        Err(e) => {
                            ping_error = Some(e);
                            None
                        }
                    };
                }
                row.ping_us = slot.ping.map(|d| d.as_secs_f64() * 1e6);
                row.stats = Some(stats_json(&stats));
                if !running || slot.ping.is_none() || seg.beat_age(Role::Worker) > timeout {
                    healthy = false;
                }
            } else if !running && !slot.done {
                healthy = false;
            }
            if let Some(e) = ping_error {
                slot.distrust_on(&e);
            }
            children.push(row);
        }
        let live_model = self.read_model_identity();
        // A live model file that cannot be read as a model cannot be served
        // (a worker that restarts now cannot load it): unhealthy.
        healthy &= live_model.is_some();
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
        "worker_uptime_s": s.uptime.map(|u| u.as_secs_f64()),
    })
}
