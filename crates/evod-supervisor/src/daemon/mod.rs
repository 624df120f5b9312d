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
//!
//! This file holds the state (`Supervisor`, `Slot`, `LiveModel`, the
//! timing constants), start-up, the loop and stopping (signals, grace
//! period); the loop's work is in `children` (start, reap, restart, standby
//! promotion, watchdog), `sync` (model file → `LOAD` + canary), `fallback`
//! (crash-loop rollback) and `requests` (control socket).

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

mod children;
mod fallback;
mod requests;
mod sync;

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
            let layout = LayoutConfig {
                payload_bytes: config.payload_bytes,
                ..LayoutConfig::default()
            };
            let segment = Segment::create(&layout)
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
