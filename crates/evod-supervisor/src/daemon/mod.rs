//! The supervisor's event loop (`evod run`).
//!
//! One thread owns all state: the children, their shared segments and
//! restart trackers. Helper threads feed it through one channel of
//! [`Event`]s: the signal thread (signal-hook: SIGCHLD, SIGTERM, SIGINT,
//! SIGQUIT, SIGHUP), the control-socket thread, one link thread per worker
//! slot (`link::LinkThread`: every call on the worker's control channel),
//! the crash-notice thread (`notice::NoticeThread`: a worker dying of a
//! fatal signal says so before the kernel has torn it down), the standby
//! spawner (`standby::Spawner`: forks each warm standby and waits for its
//! `exec`, 1–5 ms on a busy machine that a status request or a recovery
//! would otherwise wait behind), and short-lived threads that identify a new model file (header and full
//! checksum through `GgufReader`) and restore a generation for a rollback.
//! The loop wakes on an event or on its next timer (a pending restart, the
//! watchdog tick, the grace deadline), so an idle daemon sleeps.
//!
//! Nothing on the loop waits on a worker or reads a model file: it sends
//! jobs and handles their answers; it watches the model file with a `stat`
//! (dev, ino, size, mtime); it kills children and lets the SIGCHLD path
//! reap them. The only bounded waits are at the very end (the grace period
//! over: one second for the SIGKILLed children to be reaped).
//!
//! Children are spawned only from this thread and the spawner's:
//! `PR_SET_PDEATHSIG` fires when the thread that forked a child ends, and
//! both live as long as the children (the spawner is dropped last). Cold
//! starts of a worker or the evolver stay on the loop (a control request
//! arriving meanwhile waits for the `exec`, a few ms): with warm standbys
//! (the default) a recovery has none.
//!
//! This file holds the state (`Supervisor`, `Slot`, `LiveModel`, the
//! timing constants), start-up, the loop and stopping (signals, grace
//! period); the loop's work is in `children` (start, reap, restart, standby
//! promotion, watchdog), `sync` (model file → `LOAD` + canary), `fallback`
//! (crash-loop rollback) and `requests` (control socket).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use evod_ring::{LayoutConfig, Role, Segment};
use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM};

use crate::SupervisorError;
use crate::config::{Config, UNANSWERED_IN_ROW};
use crate::control::{ControlServer, Incoming};
use crate::exit_code as exit;
use crate::janitor::Janitor;
use crate::link;
use crate::notice::{self, NoticeThread};
use crate::policy::{Decision, RestartTracker, doubled, later};
use crate::reap::{self, ExitReason};
use crate::spawn::{self, Child, ChildSpec};
use crate::standby::{self, Spawner, Standby};
use evod_wire::control::{ChildStatus, Request, Response, StatusReport};
use evod_wire::protocol::{LoadRequest, op};

mod children;
mod fallback;
mod observe;
mod requests;
mod sync;

use fallback::DeathFacts;

/// How often the loop checks heartbeats and the model file when idle.
const TICK: Duration = Duration::from_millis(200);
/// How often an idle worker is PINGed in the background (`status` shows
/// the last round trip; a PING waits up to `--eval-timeout`, as a worker
/// answers only after the `EVAL` it is busy with).
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long a worker's link may take to deliver its `SHUTDOWN` before the
/// worker is sent SIGTERM instead.
const SHUTDOWN_PATIENCE: Duration = Duration::from_millis(500);
/// At the very end (grace period over, or a second signal): how long the
/// SIGKILLed children may take to be reaped.
const FINAL_REAP: Duration = Duration::from_secs(1);
/// First delay before replacing a standby that ended on its own; doubles
/// per such end, up to [`STANDBY_RETRY_MAX`], and resets once one is ready.
const STANDBY_RETRY: Duration = Duration::from_millis(500);
const STANDBY_RETRY_MAX: Duration = Duration::from_secs(30);
/// After a worker's death, its slot's next standby is started once the
/// replacement has answered on the live model (plus
/// [`STANDBY_AFTER_RECOVERY`]), or at the first tick this long after the
/// death if it has not answered by then.
const STANDBY_AFTER_DEATH: Duration = TICK;
/// How long after a recovery the slot's next standby is started. A
/// standby's start (fork, `exec` of the binary, mapping and checking the
/// model) takes a core for a few ms; started at the replacement's first
/// answer it competed with everything right after a crash (the
/// replacement's first requests, control requests, the dying worker's
/// teardown): with 2 cores, status calls in that window took 2–5 ms
/// instead of 0.2 ms (`cargo xtask bench recovery_load`, docs/benchmarks.md).
/// A second crash within this window finds no standby and starts cold
/// (2–3 ms), as one does while a new standby is still mapping its model.
const STANDBY_AFTER_RECOVERY: Duration = Duration::from_millis(50);
/// A worker that sent a crash notice is replaced at once but SIGKILLed
/// only this long after, and only if it is not dying of its own signal by
/// then: killed at once, it would often die of the supervisor's SIGKILL
/// instead (sending the notice wakes the supervisor, which may run before
/// the worker's handler has returned), and its real exit status would be
/// lost. A worker that sent the notice without dying is killed then.
const NOTICE_GRACE: Duration = Duration::from_millis(100);

/// What wakes the loop.
#[derive(Debug)]
pub enum Event {
    /// A signal arrived.
    Signal(i32),
    /// A control-socket request.
    Control(Incoming),
    /// A job on worker slot `.0`'s control channel finished.
    Link(usize, link::Done),
    /// A model file was identified (off the loop).
    Identified(ModelReport),
    /// A rollback's restore finished (off the loop).
    Restored(RestoreReport),
    /// A worker's crash notice (`notice.rs`).
    Notice(notice::Notice),
    /// A standby started (or failed to) on the spawner's thread.
    Standby(standby::Spawned),
}

/// What an identification thread found at the model path.
#[derive(Debug)]
pub struct ModelReport {
    key: Option<FileKey>,
    result: Result<LiveModel, String>,
}

/// What a rollback's restore came to.
#[derive(Debug)]
pub struct RestoreReport {
    result: Result<u64, String>,
}

/// What the loop's `stat` of the model file says: a published file is a
/// new (dev, ino); a file rewritten or truncated in place keeps them but
/// changes size or mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

/// A `stat` of `path` (symlinks followed), if it exists.
fn stat_key(path: &Path) -> Option<FileKey> {
    std::fs::metadata(path).ok().map(|m| FileKey {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// What a job on a worker's control channel is for.
#[derive(Debug)]
enum Purpose {
    /// Bring the worker to this file.
    Load(FileKey),
    /// Verify the worker serves this file.
    Canary(FileKey),
    /// Background liveness and round trip.
    Ping,
    /// `evod exec`: answer the client.
    Exec(mpsc::Sender<Response>),
    /// `evod fault`: answer the client.
    Fault(mpsc::Sender<Response>, String),
    /// A graceful stop.
    Shutdown,
}

/// A job sent to a slot's link thread and not answered yet.
#[derive(Debug)]
struct Pending {
    id: u64,
    epoch: u64,
    purpose: Purpose,
}

/// Which generation a rollback restores (resolved off the loop: it reads
/// the history's headers).
#[derive(Debug, Clone, Copy)]
enum RollbackTo {
    /// This one.
    Exact(u64),
    /// `good` if the history holds it, else the newest one older than
    /// `live` (`None`: the live file's generation, read then).
    Before {
        live: Option<u64>,
        good: Option<u64>,
    },
}

/// A rollback under way: the evolver is stopped first (killed, then
/// reaped by the SIGCHLD path), then `evod_store::restore` runs off the
/// loop, then the evolver is started again.
#[derive(Debug)]
struct PendingRollback {
    to: RollbackTo,
    quarantine: Option<u64>,
    reply: Option<mpsc::Sender<Response>>,
    restoring: bool,
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
    /// The `stat` it was identified under.
    id: FileKey,
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
    /// The file, as a `stat` saw it.
    id: FileKey,
    verified: bool,
}

/// After a `LOAD` or canary that failed or timed out, the worker is left
/// alone this long before the next try, doubling per failure in a row up to
/// [`SYNC_BACKOFF_MAX`].
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
    segment: Option<Arc<Segment>>,
    /// The thread that makes every call on this worker's control channel.
    link: Option<link::LinkThread>,
    /// Jobs sent to it, oldest (the one it runs) first.
    jobs: VecDeque<Pending>,
    /// Last PING round trip of this incarnation, and when it came.
    ping: Option<(Duration, Instant)>,
    /// No background PING before then.
    next_ping: Option<Instant>,
    /// The supervisor's requests this incarnation left unanswered in a row
    /// (timeouts), and when the first of them timed out.
    unanswered: u32,
    unanswered_since: Option<Instant>,
    /// This incarnation answered one of the supervisor's requests.
    answered: bool,
    /// Stopping: SIGTERM then, unless its `SHUTDOWN` was delivered.
    sigterm_at: Option<Instant>,
    /// The supervisor stopped this incarnation on purpose (the evolver,
    /// for a rollback): its end is not a crash.
    planned_stop: bool,
    /// The warm spare promoted when this worker dies (workers only).
    standby: Option<Standby>,
    /// A standby asked of the spawner and not delivered yet: its token,
    /// and when it was asked.
    standby_spawning: Option<(u64, Instant)>,
    /// When to start the slot's next standby: [`STANDBY_AFTER_RECOVERY`]
    /// after a recovery, or after the backoff when one ended on its own or
    /// could not start. None is started before then.
    standby_at: Option<Instant>,
    standby_backoff: Duration,
    /// The model this worker serves, as far as the supervisor knows.
    serving: Option<Serving>,
    /// No `LOAD` or canary to this worker before then (after a failure).
    sync_after: Option<Instant>,
    /// The next backoff after a failed or timed-out `LOAD` or canary
    /// (doubles up to [`SYNC_BACKOFF_MAX`]).
    sync_backoff: Duration,
    /// A file this worker refused to `LOAD` (not asked again).
    load_refused: Option<FileKey>,
    /// The supervisor killed the current incarnation for breaking the
    /// protocol (not counted against the model by the fallback).
    blameless_kill: bool,
    /// When the reaper collected this slot's worker that died unasked: a
    /// recovery is under way until its replacement answers a request
    /// while serving the live model (workers only).
    died_at: Option<Instant>,
    /// Recoveries completed, and the last one's length (death reaped or
    /// noticed → the replacement's first answer on the live model).
    recoveries: u64,
    last_recovery: Option<Duration>,
    /// The token the current worker's link is watched under for its
    /// crash notice (`notice.rs`), if it has one.
    notice: Option<u64>,
    /// The worker whose end `last_exit` describes (a noticed death is
    /// described again once it is reaped).
    last_death: Option<nix::unistd::Pid>,
}

/// A worker killed after its crash notice and not reaped yet: it is no
/// longer its slot's child (its replacement may already serve), and its
/// reap only records how it ended.
struct Retired {
    slot: usize,
    child: Child,
    /// The signal its notice named.
    noticed: i32,
    /// Why the supervisor killed it, if it did.
    kill_cause: Option<String>,
    /// When to SIGKILL it unless it is dying by then ([`NOTICE_GRACE`]).
    kill_at: Option<Instant>,
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
    /// The model file as last identified (it is the live one if its
    /// `id` is `model_key`).
    model_seen: Option<LiveModel>,
    /// The model file's `stat` at the last tick.
    model_key: Option<FileKey>,
    /// An identification thread is running.
    identifying: bool,
    /// The last identification of `model_key` failed (said once per file).
    model_error: Option<(FileKey, String)>,
    /// Where helper threads send their answers.
    tx: mpsc::Sender<Event>,
    /// Id of the next job sent to a link thread.
    next_job: u64,
    rollback: Option<PendingRollback>,
    /// Newest generation a worker served healthily: it loaded it (at start
    /// or by `LOAD`) and answered the supervisor's canary `NEURAL_EXEC` on it.
    good_generation: Option<u64>,
    /// The last file a worker verified.
    verified_file: Option<FileKey>,
    /// Worker ends blamed on each not-yet-verified generation (see
    /// `maybe_fall_back`).
    crashes_after_new: HashMap<u64, u32>,
    rollbacks: u64,
    /// What `/metrics` and the probes serve (`observe.rs`).
    metrics: crate::metrics::Metrics,
    next_exec: usize,
    give_up: Option<String>,
    /// Reads the workers' crash notices.
    notices: NoticeThread,
    /// Token of the next link handed to `notices` (never reused).
    next_notice: u64,
    /// Workers killed after their crash notice, not reaped yet.
    retired: Vec<Retired>,
    /// Token of the next standby asked of `spawner` (never reused).
    next_standby: u64,
    /// Children reaped that matched nothing, while a standby was being
    /// started: one of them may be that standby, dead before its report
    /// arrived. Its pid, how it ended, when it was reaped.
    orphans: Vec<(nix::unistd::Pid, ExitReason, Instant)>,
    /// Starts standbys off the loop. Declared last so that it is dropped
    /// last: its thread is every standby's parent (see [`Spawner`]).
    spawner: Spawner,
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
    // Before the control socket: a taken port leaves nothing behind.
    let metrics = crate::metrics::Metrics::new(
        (!config.no_evolver).then(|| evod_wire::rest::marker(&config.dir)),
    );
    let metrics_server = match config.metrics_addr {
        Some(addr) => Some(metrics.serve(addr)?),
        None => None,
    };
    let server = ControlServer::start(&config.control_socket, tx.clone(), Event::Control)?;
    janitor
        .watch(server.created())
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
    if let Some(m) = &metrics_server {
        tracing::info!(
            "serving /metrics, /healthz and /readyz on http://{}",
            m.addr()
        );
    }
    let mut sup = match Supervisor::new(config, tx, metrics) {
        Ok(sup) => sup,
        Err(e) => {
            janitor.disarm();
            return Err(e);
        }
    };
    let code = sup.event_loop(&rx);
    // Requests that came after the loop's last turn are answered here, and
    // the queue is closed before the server waits for its answers to be
    // written: a reply sender left in the queue would keep a client
    // waiting (the `stop` of `evod stop` seeing end of file) until the
    // server gave up.
    answer_queued(&rx);
    drop(rx);
    drop(sup);
    // A clean stop: the janitor must not act on the socket's path later.
    janitor.disarm();
    drop(server);
    drop(metrics_server);
    code
}

/// Answers every control request still queued once the loop has ended: a
/// `stop` is what is happening ("stopping"), anything else is refused.
/// Other events are dropped.
fn answer_queued(rx: &mpsc::Receiver<Event>) {
    while let Ok(event) = rx.try_recv() {
        if let Event::Control(incoming) = event {
            let response = match incoming.request {
                Request::Stop => Response::ok("stopping"),
                _ => Response::error("the daemon is stopping"),
            };
            let _ = incoming.reply.send(response);
        }
    }
}

/// Validates the model at start; a missing or malformed file is an error
/// (the binary exits 3). Returns its generation.
fn check_model(model: &std::path::Path) -> Result<Option<u64>, SupervisorError> {
    if !model.exists() {
        return Err(SupervisorError::NoModel(model.to_owned()));
    }
    // Read with pread, never mapped (see `identify`).
    let file = evod_gguf::GgufReader::open(model)?;
    Ok(file
        .get(evod_store::GENERATION_KEY)
        .and_then(|v| v.as_u64()))
}

impl Supervisor {
    fn new(
        config: Config,
        tx: mpsc::Sender<Event>,
        metrics: crate::metrics::Metrics,
    ) -> Result<Supervisor, SupervisorError> {
        let mut slots = Vec::new();
        for index in 0..config.workers {
            let segment = Arc::new(
                Segment::create(&LayoutConfig {
                    payload_bytes: config.payload_bytes,
                    ..LayoutConfig::default()
                })
                .map_err(|source| SupervisorError::Segment { index, source })?,
            );
            let mut slot = Slot::new(Kind::Worker, index, Some(segment.clone()));
            let link = link::LinkThread::start(
                format!("link-{index}"),
                segment,
                config.heartbeat_timeout,
                tx.clone(),
                move |done| Event::Link(index, done),
            )
            .map_err(|source| SupervisorError::Setup {
                what: "cannot start a link thread",
                source,
            })?;
            slot.link = Some(link);
            slots.push(slot);
        }
        if !config.no_evolver {
            slots.push(Slot::new(Kind::Evolver, 0, None));
        }
        let notices = NoticeThread::start(tx.clone(), Event::Notice).map_err(|source| {
            SupervisorError::Setup {
                what: "cannot start the crash-notice thread",
                source,
            }
        })?;
        let spawner = Spawner::start(tx.clone(), Event::Standby).map_err(|source| {
            SupervisorError::Setup {
                what: "cannot start the standby spawner thread",
                source,
            }
        })?;
        let mut sup = Supervisor {
            config,
            slots,
            phase: Phase::Running,
            started: Instant::now(),
            model_seen: None,
            model_key: None,
            identifying: false,
            model_error: None,
            tx,
            next_job: 0,
            rollback: None,
            good_generation: None,
            verified_file: None,
            crashes_after_new: HashMap::new(),
            rollbacks: 0,
            metrics,
            next_exec: 0,
            give_up: None,
            notices,
            next_notice: 0,
            retired: Vec::new(),
            next_standby: 0,
            orphans: Vec::new(),
            spawner,
        };
        // Before the loop runs: identified here, on this thread.
        sup.model_key = stat_key(&sup.config.model);
        sup.model_seen = identify(&sup.config.model).ok();
        for i in 0..sup.slots.len() {
            sup.start(i);
        }
        Ok(sup)
    }

    fn event_loop(&mut self, rx: &mpsc::Receiver<Event>) -> Result<u8, SupervisorError> {
        let mut next_tick = later(Instant::now(), TICK);
        loop {
            let now = Instant::now();
            let mut wake = next_tick;
            for slot in &self.slots {
                for at in [slot.restart_at, slot.standby_at, slot.sigterm_at]
                    .into_iter()
                    .flatten()
                {
                    wake = wake.min(at);
                }
            }
            for at in self.retired.iter().filter_map(|r| r.kill_at) {
                wake = wake.min(at);
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
                    if let Some(response) = self.on_request(incoming.request, &incoming.reply) {
                        let _ = incoming.reply.send(response);
                    }
                }
                Ok(Event::Link(i, done)) => {
                    self.observe_link(&done);
                    self.on_link_done(i, done);
                }
                Ok(Event::Identified(report)) => self.on_identified(report),
                Ok(Event::Restored(report)) => self.on_restored(report),
                Ok(Event::Notice(notice)) => self.on_notice(notice),
                Ok(Event::Standby(spawned)) => self.on_standby_spawned(spawned),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(SupervisorError::ThreadsGone);
                }
            }
            let now = Instant::now();
            self.kill_retired_due(now);
            self.advance_rollback();
            if now >= next_tick {
                next_tick = later(now, TICK);
                self.reap();
                if matches!(self.phase, Phase::Running) {
                    self.standbys_after_death(now);
                    self.watchdog();
                    self.watch_model();
                    self.sync_workers();
                }
            }
            // Before `start_due`: a dead worker's last stats are read
            // before its slot's epoch is bumped.
            self.refresh_metrics();
            match self.phase {
                Phase::Running => self.start_due(now),
                Phase::Stopping { deadline, code } => {
                    for slot in &mut self.slots {
                        if slot.sigterm_at.is_some_and(|at| at <= now) {
                            slot.sigterm_at = None;
                            if let Some(child) =
                                slot.child.as_ref().filter(|c| c.exited().is_none())
                            {
                                let _ = child.signal(Signal::SIGTERM);
                            }
                        }
                    }
                    // A restore under way is waited for (within the grace
                    // period): cut short, the rollback could be undone.
                    if self.slots.iter().all(|s| !s.running())
                        && self.retired.is_empty()
                        && !self.restoring()
                    {
                        tracing::info!("all children stopped");
                        return self.finish(code);
                    }
                    if now >= deadline {
                        if self.restoring() {
                            tracing::warn!(
                                "grace period over with a rollback's restore still running"
                            );
                        }
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

    /// The live model: identified, and its file unchanged since.
    fn live_model(&self) -> Option<LiveModel> {
        self.model_seen.filter(|m| Some(m.id) == self.model_key)
    }

    /// Sends `job` to worker slot `i`'s link thread. False if it has none.
    fn submit(&mut self, i: usize, purpose: Purpose, job: link::Job, timeout: Duration) -> bool {
        self.submit_until(i, purpose, job, timeout, None)
    }

    /// [`Self::submit`], with a time after which the job is not started
    /// (answered [`link::LinkError::Expired`]).
    fn submit_until(
        &mut self,
        i: usize,
        purpose: Purpose,
        job: link::Job,
        timeout: Duration,
        expires: Option<Instant>,
    ) -> bool {
        let id = self.next_job;
        self.next_job += 1;
        let slot = &mut self.slots[i];
        let (Some(seg), Some(thread)) = (&slot.segment, &slot.link) else {
            return false;
        };
        let tag = link::Tag {
            id,
            epoch: seg.trusted_epoch(),
        };
        if !thread.submit(tag, job, timeout, expires) {
            return false;
        }
        slot.jobs.push_back(Pending {
            id,
            epoch: tag.epoch,
            purpose,
        });
        true
    }

    fn finish(&mut self, code: u8) -> Result<u8, SupervisorError> {
        match self.give_up.take() {
            Some(message) => Err(SupervisorError::GaveUp(message)),
            None => Ok(code),
        }
    }

    /// SIGTERM/SIGINT/SIGQUIT: graceful stop; a second one stops at once.
    /// SIGHUP wakes a resting evolver (as `evod wake` does).
    fn on_stop_signal(&mut self, signal: i32) -> Option<u8> {
        let name = reap::signal_name(signal);
        if signal == SIGHUP {
            tracing::info!("received {name}: waking the evolver");
            let _ = self.wake_evolver();
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
            deadline: later(Instant::now(), self.config.grace_period),
            code,
        };
        self.cancel_unstarted_rollback();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            slot.restart_at = None;
            // A standby has nothing to save: killed (the SIGCHLD path reaps).
            if let Some(standby) = &slot.standby {
                standby.child().kill();
            }
            slot.standby_at = None;
            if !slot.running() {
                continue;
            }
            // SHUTDOWN through the link (after the call it is making, if
            // any); a worker that has not taken it within SHUTDOWN_PATIENCE
            // (its link is held by a call it does not answer), or the
            // evolver, gets SIGTERM.
            let queued = slot.segment.is_some()
                && self.submit(
                    i,
                    Purpose::Shutdown,
                    link::Job::Send {
                        opcode: op::SHUTDOWN,
                        payload: Vec::new(),
                    },
                    Duration::ZERO,
                );
            if queued {
                self.slots[i].sigterm_at = Some(later(Instant::now(), SHUTDOWN_PATIENCE));
            } else if let Some(child) = &self.slots[i].child {
                let _ = child.signal(Signal::SIGTERM);
            }
        }
    }

    /// SIGKILLs every child and standby, then reaps them for at most
    /// [`FINAL_REAP`] (the end of the process: nothing else to do) and
    /// names any left.
    fn kill_all(&mut self) {
        for slot in &mut self.slots {
            slot.restart_at = None;
            slot.standby_at = None;
            if let Some(standby) = &slot.standby {
                standby.child().kill();
            }
            if let Some(child) = &slot.child {
                child.kill();
            }
        }
        for retired in &self.retired {
            retired.child.kill();
        }
        let deadline = Instant::now() + FINAL_REAP;
        loop {
            self.reap();
            let left: Vec<String> = self
                .slots
                .iter()
                .filter(|s| s.running())
                .map(|s| s.label())
                .chain(self.retired.iter().map(|r| {
                    format!(
                        "{} (pid {}, replaced after its crash notice)",
                        self.slots[r.slot].label(),
                        r.child.pid()
                    )
                }))
                .collect();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "{} not reaped {FINAL_REAP:?} after SIGKILL; leaving them",
                    left.join(", ")
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Children first (their Drop kills and reaps), then segments.
        self.retired.clear();
        for slot in &mut self.slots {
            slot.standby = None;
            slot.child = None;
        }
    }
}

/// Reads the model file at `path` the way a trusted process must (pread
/// through `GgufReader`, never a mapping someone can truncate): header,
/// generation, full checksum, and the network's input count. Runs off the
/// loop (except once at start-up).
fn identify(path: &Path) -> Result<LiveModel, String> {
    let before = stat_key(path).ok_or_else(|| format!("no model at {}", path.display()))?;
    let reader = evod_gguf::GgufReader::open(path).map_err(|e| chain(&e))?;
    let generation = reader
        .get(evod_store::GENERATION_KEY)
        .and_then(|v| v.as_u64());
    let checksum = reader.checksum().map_err(|e| chain(&e))?;
    let inputs = reader
        .get(evod_runtime::model::keys::LAYERS)
        .and_then(|v| v.as_array())
        .and_then(|a| a.values.first())
        .and_then(|v| v.as_u64())
        .and_then(|n| usize::try_from(n).ok());
    // Replaced or rewritten while being read: what was read is not a
    // file anyone will see again; the next tick identifies the new one.
    if stat_key(path) != Some(before) {
        return Err(format!("{} changed while being read", path.display()));
    }
    Ok(LiveModel {
        id: before,
        generation,
        checksum,
        inputs,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Incoming;

    #[test]
    fn requests_queued_after_the_loop_are_answered() {
        let (tx, rx) = mpsc::channel::<Event>();
        let mut replies = Vec::new();
        for request in [Request::Stop, Request::Status] {
            let (reply, answer) = mpsc::channel();
            tx.send(Event::Control(Incoming { request, reply }))
                .expect("queue open");
            replies.push(answer);
        }
        tx.send(Event::Signal(SIGCHLD)).expect("queue open");
        answer_queued(&rx);
        let stop = replies[0].try_recv().expect("stop answered");
        assert!(stop.ok, "stop: {stop:?}");
        let status = replies[1].try_recv().expect("status answered");
        assert!(!status.ok, "status: {status:?}");
        assert!(
            status.error.as_deref().unwrap_or("").contains("stopping"),
            "status: {status:?}"
        );
        assert!(rx.try_recv().is_err(), "the queue is empty");
    }
}
