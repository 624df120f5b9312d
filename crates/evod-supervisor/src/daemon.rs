//! The supervisor's event loop (`evod run`).
//!
//! One thread owns all state: the children, their shared segments and
//! restart trackers. Two helper threads feed it through one channel of
//! [`Event`]s: the signal thread (signal-hook: SIGCHLD, SIGTERM, SIGINT,
//! SIGQUIT, SIGHUP) and the control-socket thread. The loop wakes on an
//! event or on its next timer (a pending restart, the watchdog tick, the
//! grace deadline), so an idle daemon sleeps.
//!
//! Children are spawned only from this thread: `PR_SET_PDEATHSIG` fires when
//! the thread that forked a child ends, and this thread lives as long as the
//! process.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use evod_ring::{LayoutConfig, Role, Segment};
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM};

use crate::SupervisorError;
use crate::config::Config;
use crate::control::{ControlServer, Incoming};
use crate::exit_code as exit;
use crate::janitor::Janitor;
use crate::link;
use crate::policy::{Decision, RestartTracker};
use crate::reap::{self, ExitReason};
use crate::spawn::{self, Child, ChildSpec};
use crate::standby::Standby;
use evod_wire::control::{ChildStatus, Request, Response, StatusReport};
use evod_wire::protocol::{LoadRequest, op};

/// How often the loop checks heartbeats and the model file when idle.
const TICK: Duration = Duration::from_millis(200);
/// Deadline of a status PING.
const PING_TIMEOUT: Duration = Duration::from_millis(250);
/// Deadline of a `NEURAL_EXEC` from `evod exec`.
const EXEC_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of a `LOAD` of a newly published generation.
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);
/// First delay before replacing a standby that ended on its own; doubles
/// per such end, up to [`STANDBY_RETRY_MAX`], and resets once one is ready.
const STANDBY_RETRY: Duration = Duration::from_millis(500);
const STANDBY_RETRY_MAX: Duration = Duration::from_secs(30);

/// What wakes the loop.
#[derive(Debug)]
pub enum Event {
    /// A signal arrived.
    Signal(i32),
    /// A control-socket request.
    Control(Incoming),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Worker,
    Evolver,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Worker => "worker",
            Kind::Evolver => "evolver",
        }
    }
}

/// Identity of the live model file.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LiveModel {
    /// (dev, ino): published files are replaced by rename, never rewritten.
    id: (u64, u64),
    generation: Option<u64>,
    checksum: u64,
    /// The network's input count (for the canary), if the file parses as a
    /// model.
    inputs: Option<usize>,
}

/// What the supervisor knows a worker serves: the file it was started on or
/// told to `LOAD` (and that it accepted), and whether it has answered a
/// canary `NEURAL_EXEC` on it.
#[derive(Debug, Clone, Copy)]
struct Serving {
    /// (dev, ino) of the file.
    id: (u64, u64),
    verified: bool,
}

/// Deadline of a canary `NEURAL_EXEC`. Short: the call blocks the event
/// loop, and a worker busy with a long `EVAL` answers later (the canary is
/// then tried again after [`SYNC_BACKOFF`]).
const CANARY_TIMEOUT: Duration = Duration::from_millis(100);
/// After a `LOAD` or canary that failed or timed out, the worker is left
/// alone this long before the next try, doubling per failure in a row up to
/// [`SYNC_BACKOFF_MAX`] (a `LOAD` waits up to [`LOAD_TIMEOUT`] on the event
/// loop).
const SYNC_BACKOFF: Duration = Duration::from_secs(1);
const SYNC_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Largest canary input row (the ring's payload area is larger; a network
/// with more inputs is verified by its `LOAD` alone).
const CANARY_MAX_INPUTS: usize = 1 << 16;

/// One supervised child position (its current incarnation and history).
struct Slot {
    kind: Kind,
    index: usize,
    child: Option<Child>,
    tracker: RestartTracker,
    restarts: u64,
    last_exit: Option<String>,
    restart_at: Option<Instant>,
    /// Why the supervisor killed the current incarnation, if it did.
    kill_cause: Option<String>,
    /// Finished for good (the evolver exited 0).
    done: bool,
    segment: Option<Segment>,
    ping: Option<Duration>,
    /// The warm spare promoted when this worker dies (workers only).
    standby: Option<Standby>,
    /// When to start a standby again after one ended on its own.
    standby_retry: Option<Instant>,
    standby_backoff: Duration,
    /// The model this worker serves, as far as the supervisor knows.
    serving: Option<Serving>,
    /// No `LOAD` or canary to this worker before then (after a failure).
    sync_after: Option<Instant>,
    /// The next backoff after a failed or timed-out `LOAD` or canary
    /// (doubles up to [`SYNC_BACKOFF_MAX`]).
    sync_backoff: Duration,
    /// A file this worker refused to `LOAD` (not asked again).
    load_refused: Option<(u64, u64)>,
    /// The supervisor killed the current incarnation for breaking the
    /// protocol (not counted against the model by the fallback).
    blameless_kill: bool,
}

impl Slot {
    fn label(&self) -> String {
        format!("{} {}", self.kind.name(), self.index)
    }

    /// Leaves this worker alone (no `LOAD`, no canary) for the current
    /// backoff, and doubles it.
    fn back_off(&mut self, now: Instant) {
        self.sync_after = Some(now + self.sync_backoff);
        self.sync_backoff = (self.sync_backoff * 2).min(SYNC_BACKOFF_MAX);
    }

    /// After a failed call on this worker's control channel: a worker that
    /// broke the protocol there (corrupt ring state, a reply that does not
    /// decode) is not trusted again: SIGKILL, then the usual restart. Other
    /// errors (timeout, refusal, peer lost) are left to the caller.
    fn distrust_on(&mut self, e: &link::LinkError) {
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

    fn running(&self) -> bool {
        self.child.as_ref().is_some_and(|c| c.exited().is_none())
    }
}

enum Phase {
    Running,
    Stopping { deadline: Instant, code: u8 },
}

struct Supervisor {
    config: Config,
    slots: Vec<Slot>,
    phase: Phase,
    started: Instant,
    /// The model file last seen.
    model_seen: Option<LiveModel>,
    /// Newest generation a worker served healthily: it loaded it (at start
    /// or by `LOAD`) and answered the supervisor's canary `NEURAL_EXEC` on it.
    good_generation: Option<u64>,
    /// (dev, ino) of the last file a worker verified.
    verified_file: Option<(u64, u64)>,
    /// Worker ends blamed on each not-yet-verified generation (see
    /// `maybe_fall_back`).
    crashes_after_new: HashMap<u64, u32>,
    rollbacks: u64,
    next_exec: usize,
    give_up: Option<String>,
}

/// Runs the supervisor until it stops; returns the process exit code.
///
/// The caller sets up logging first ([`crate::init_logging`]) and must not
/// have started a thread (the environment is written, and children are
/// forked from this one).
pub fn run(config: Config) -> Result<u8, SupervisorError> {
    // Children log in the same format: they read it from the environment.
    // SAFETY: no thread has been started yet in this process (the caller
    // promises it; the janitor and signal threads start below), so nothing
    // reads the environment concurrently.
    unsafe {
        std::env::set_var("EVOD_LOG_FORMAT", config.log_format.as_str());
    }
    let model_generation = check_model(&config.model)?;
    // SAFETY: nothing has started a thread yet (logging set-up does not).
    let mut janitor = unsafe { Janitor::start() }.map_err(|source| SupervisorError::Setup {
        what: "cannot fork the janitor process",
        source,
    })?;
    if let Err(e) = reap::become_subreaper() {
        tracing::warn!("cannot become a child subreaper ({e}); orphans of children are not reaped");
    }
    let (tx, rx) = mpsc::channel::<Event>();
    let mut signals =
        signal_hook::iterator::Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP]).map_err(
            |source| SupervisorError::Setup {
                what: "cannot install signal handlers",
                source,
            },
        )?;
    let signal_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal_tx.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        })
        .map_err(|source| SupervisorError::Setup {
            what: "cannot start the signal thread",
            source,
        })?;
    let server = ControlServer::start(&config.control_socket, tx, Event::Control)?;
    janitor
        .watch(server.path(), server.inode())
        .map_err(|source| SupervisorError::Setup {
            what: "cannot brief the janitor",
            source,
        })?;
    tracing::info!(
        pid = std::process::id(),
        dir = %config.dir.display(),
        model = %config.model.display(),
        generation = ?model_generation,
        workers = config.workers,
        socket = %server.path().display(),
        janitor = janitor.pid().as_raw(),
        "evod supervisor starting"
    );
    let mut sup = Supervisor::new(config)?;
    let code = sup.event_loop(&rx);
    drop(sup);
    drop(server);
    code
}

/// Validates the model at start; a missing or malformed file is an error
/// (the binary exits 3). Returns its generation.
fn check_model(model: &std::path::Path) -> Result<Option<u64>, SupervisorError> {
    if !model.exists() {
        return Err(SupervisorError::NoModel(model.to_owned()));
    }
    let file = evod_gguf::GgufFile::open(model)?;
    Ok(evod_store::generation_of(&file))
}

impl Supervisor {
    fn new(config: Config) -> Result<Supervisor, SupervisorError> {
        let mut slots = Vec::new();
        for index in 0..config.workers {
            let segment = Segment::create(&LayoutConfig::default())
                .map_err(|source| SupervisorError::Segment { index, source })?;
            slots.push(Slot::new(Kind::Worker, index, Some(segment)));
        }
        if !config.no_evolver {
            slots.push(Slot::new(Kind::Evolver, 0, None));
        }
        let mut sup = Supervisor {
            config,
            slots,
            phase: Phase::Running,
            started: Instant::now(),
            model_seen: None,
            good_generation: None,
            verified_file: None,
            crashes_after_new: HashMap::new(),
            rollbacks: 0,
            next_exec: 0,
            give_up: None,
        };
        sup.model_seen = sup.read_model_identity();
        for i in 0..sup.slots.len() {
            sup.start(i);
        }
        Ok(sup)
    }

    fn event_loop(&mut self, rx: &mpsc::Receiver<Event>) -> Result<u8, SupervisorError> {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            let mut wake = next_tick;
            for slot in &self.slots {
                for at in [slot.restart_at, slot.standby_retry].into_iter().flatten() {
                    wake = wake.min(at);
                }
            }
            if let Phase::Stopping { deadline, .. } = self.phase {
                wake = wake.min(deadline);
            }
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(Event::Signal(SIGCHLD)) => self.reap(),
                Ok(Event::Signal(signal)) => {
                    if let Some(code) = self.on_stop_signal(signal) {
                        return Ok(code);
                    }
                }
                Ok(Event::Control(incoming)) => {
                    let response = self.on_request(incoming.request);
                    let _ = incoming.reply.send(response);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SupervisorError::ThreadsGone);
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.reap();
                if matches!(self.phase, Phase::Running) {
                    self.watchdog();
                    self.watch_model();
                    self.sync_workers();
                }
            }
            match self.phase {
                Phase::Running => self.start_due(now),
                Phase::Stopping { deadline, code } => {
                    if self.slots.iter().all(|s| !s.running()) {
                        tracing::info!("all children stopped");
                        return self.finish(code);
                    }
                    if now >= deadline {
                        tracing::warn!(
                            "grace period of {:?} over: killing the remaining children",
                            self.config.grace_period
                        );
                        self.kill_all();
                        return self.finish(code);
                    }
                }
            }
        }
    }

    fn finish(&mut self, code: u8) -> Result<u8, SupervisorError> {
        match self.give_up.take() {
            Some(message) => Err(SupervisorError::GaveUp(message)),
            None => Ok(code),
        }
    }

    /// SIGTERM/SIGINT/SIGQUIT: graceful stop; a second one stops at once.
    /// SIGHUP is logged and ignored.
    fn on_stop_signal(&mut self, signal: i32) -> Option<u8> {
        let name = reap::signal_name(signal);
        if signal == SIGHUP {
            tracing::info!("received {name}: ignored (there is nothing to reload)");
            return None;
        }
        match self.phase {
            Phase::Running => {
                tracing::info!(
                    "received {name}: stopping gracefully (grace period {:?}; send it again to stop at once)",
                    self.config.grace_period
                );
                self.begin_stop(exit::OK);
                None
            }
            Phase::Stopping { .. } => {
                tracing::warn!("received {name} again: killing every child now");
                self.kill_all();
                Some(128u8.saturating_add(signal as u8))
            }
        }
    }

    fn begin_stop(&mut self, code: u8) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        self.phase = Phase::Stopping {
            deadline: Instant::now() + self.config.grace_period,
            code,
        };
        for slot in &mut self.slots {
            slot.restart_at = None;
            // A standby has nothing to save: killed and reaped now.
            slot.standby = None;
            slot.standby_retry = None;
            let Some(child) = slot.child.as_ref().filter(|c| c.exited().is_none()) else {
                continue;
            };
            let asked = match &slot.segment {
                Some(seg) => link::send_only(seg, op::SHUTDOWN, &[]).is_ok(),
                None => false,
            };
            if !asked {
                let _ = child.signal(Signal::SIGTERM);
            }
        }
    }

    fn kill_all(&mut self) {
        for slot in &mut self.slots {
            slot.restart_at = None;
            slot.standby = None;
            slot.standby_retry = None;
            if let Some(child) = slot.child.as_mut() {
                child.kill_and_reap();
            }
        }
        self.reap();
    }

    fn reap(&mut self) {
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

    fn on_exit(&mut self, i: usize, reason: ExitReason) {
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
        if let Some(cause) = slot.kill_cause.take() {
            words = format!("{words} ({cause})");
        }
        // Killed for lying (recycle, corrupt control channel): whatever it
        // was doing, the model is not to blame.
        let blameless = std::mem::take(&mut slot.blameless_kill);
        slot.last_exit = Some(words.clone());
        slot.ping = None;
        if stopping {
            tracing::info!(pid, "{} {words}", slot.label());
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
        let decision = slot.tracker.on_exit(&self.config.policy, uptime, now);
        let label = slot.label();
        let kind = slot.kind;
        let serving = slot.serving.take();
        slot.sync_after = None;
        // What it was doing when it died (read before the epoch bump resets
        // the stats; worker-written, so it only steers the blame below).
        let in_service = slot.segment.as_ref().and_then(|s| s.stats().in_service);
        match decision {
            Decision::RestartAfter(delay) => {
                if !delay.is_zero() {
                    tracing::info!(
                        "restarting {label} in {delay:?} (crash {} in a row within 1 s of start)",
                        self.slots[i].tracker.quick_crashes()
                    );
                }
                self.slots[i].restart_at = Some(now + delay);
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
            self.maybe_fall_back(serving, in_service);
        }
    }

    /// A standby ended before it was promoted (killed by someone, or it
    /// could not start): replace it later, backing off if it keeps ending.
    fn on_standby_exit(&mut self, i: usize, reason: ExitReason) {
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
        let delay = slot.standby_backoff;
        slot.standby_backoff = (delay * 2).min(STANDBY_RETRY_MAX);
        slot.standby_retry = Some(Instant::now() + delay);
        tracing::warn!(
            pid,
            "standby of {} {reason}; starting another in {delay:?}",
            slot.label()
        );
    }

    /// Starts a standby for worker slot `i` if it should have one and has none.
    fn ensure_standby(&mut self, i: usize) {
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
                slot.standby_backoff = (delay * 2).min(STANDBY_RETRY_MAX);
                slot.standby_retry = Some(Instant::now() + delay);
                tracing::warn!(
                    "cannot start a standby for {}: {e}; trying again in {delay:?}",
                    slot.label()
                );
            }
        }
    }

    /// Counts a worker's end against the live generation when it is the
    /// generation's doing: the worker served the live file (it started on
    /// it or accepted its `LOAD`) and had not answered a canary on it, no
    /// worker has verified that generation, and it died loading the model
    /// or running it (`LOAD`, `NEURAL_EXEC`; the start-up load counts as a
    /// `LOAD`), whatever its uptime. A death in `EVAL` is a candidate's
    /// (`EVAL` scores the candidates it is sent, not the live weights), left
    /// to the evolver's quarantine. Past `fallback_after` such ends, rolls
    /// back.
    fn maybe_fall_back(&mut self, serving: Option<Serving>, in_service: Option<u32>) {
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
    fn roll_back(
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

    fn start_due(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.slots[i].standby_retry.is_some_and(|at| at <= now) {
                self.slots[i].standby_retry = None;
                self.ensure_standby(i);
            }
            if self.slots[i].restart_at.is_some_and(|at| at <= now) {
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
    /// its standby if it has a live one, else starts cold. Then a worker
    /// slot gets a new standby (off the recovery path).
    fn start(&mut self, i: usize) {
        self.start_child(i);
        self.ensure_standby(i);
    }

    fn start_child(&mut self, i: usize) {
        let spec = self.spec(i);
        // A worker maps the live file when it starts (a promoted standby
        // re-checks it): note its identity first (a stat, nothing more on
        // the recovery path), so that a file published meanwhile is the
        // newer one and gets a `LOAD` at the next tick.
        let id = evod_store::file_identity(&self.config.model);
        let slot = &mut self.slots[i];
        slot.sync_after = None;
        slot.sync_backoff = SYNC_BACKOFF;
        slot.load_refused = None;
        slot.serving = id.filter(|_| slot.kind == Kind::Worker).map(|id| Serving {
            id,
            verified: false,
        });
        if let Some(old) = slot.child.as_mut() {
            old.kill_and_reap();
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
        match spawn::spawn(&spec) {
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
                            Some(Instant::now() + delay.max(Duration::from_millis(100)))
                    }
                    Decision::GiveUp { .. } => {
                        self.give_up = Some(format!("cannot start {}: {e}", slot.label()));
                        self.begin_stop(exit::GAVE_UP);
                    }
                }
            }
        }
    }

    fn spec(&self, i: usize) -> ChildSpec {
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
                if self.config.allow_fault_injection {
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
                    role: "evolver",
                    args,
                    keep_fds: fds,
                    harden: true,
                    memory_limit: None,
                }
            }
        }
    }

    /// Kills workers whose heartbeat stalled; notes generations served healthily.
    fn watchdog(&mut self) {
        let timeout = self.config.heartbeat_timeout;
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
        }
    }

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
    fn sync_workers(&mut self) {
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
    fn read_model_identity(&self) -> Option<LiveModel> {
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
    fn watch_model(&mut self) {
        let Some(now) = self.read_model_identity() else {
            return;
        };
        if self.model_seen.map(|m| m.id) == Some(now.id) {
            return;
        }
        self.model_seen = Some(now);
        tracing::info!(generation = ?now.generation, "a new model was published: loading it in the workers");
    }

    fn on_request(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::ok(self.status()),
            Request::Stop => {
                tracing::info!("stop requested on the control socket");
                self.begin_stop(exit::OK);
                Response::ok("stopping")
            }
            Request::Exec { inputs } => self.exec(&inputs),
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
    fn recycle(&mut self, index: usize, epoch: u64, reason: &str) -> Response {
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

    /// Sends a fault opcode to worker `index` (`evod fault`).
    fn inject_fault(&mut self, index: usize, kind: &str) -> Response {
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

    fn exec(&mut self, inputs: &[f32]) -> Response {
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

    fn status(&mut self) -> StatusReport {
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
        let live = self.read_model_identity().and_then(|m| m.generation);
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

impl Slot {
    fn new(kind: Kind, index: usize, segment: Option<Segment>) -> Slot {
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
            ping: None,
            standby: None,
            standby_retry: None,
            standby_backoff: STANDBY_RETRY,
            serving: None,
            sync_after: None,
            sync_backoff: SYNC_BACKOFF,
            load_refused: None,
            blameless_kill: false,
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Children first (their Drop kills and reaps), then segments.
        for slot in &mut self.slots {
            slot.standby = None;
            slot.child = None;
        }
    }
}

/// An error and its causes on one line, `a: b: c` (as `anyhow` prints
/// `{:#}`).
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}
