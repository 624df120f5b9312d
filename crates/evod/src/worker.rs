//! `evod worker` (hidden role): the untrusted runtime process.
//!
//! Spawned by the supervisor with its shared segment inherited as a
//! descriptor. It maps the published model, builds the network and serves
//! the opcodes of [`evod_wire::protocol`] on both channels of the ring (`Eval`
//! from the evolver, `Control` from the supervisor), keeping its heartbeat
//! and stats current. It may crash at any instruction: the supervisor
//! respawns it and the clients re-send what was in flight.
//!
//! Fault opcodes (and the `evod.fault` model key) are honoured only with
//! `--allow-fault-injection`; without it they are refused with an error reply.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use evod_ring::{Channel, Request, RingError, Role, Scribble, Segment};
use evod_runtime::{Architecture, Model, Task};

use evod_wire::protocol::{self, EvalHeader, ExecHeader, LoadRequest, WorkerInfo, op, status};

/// Arguments of `evod worker`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Descriptor number of the inherited shared-memory segment.
    #[arg(long)]
    pub ring_fd: i32,
    /// Model file to load at start.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Honour fault-injection opcodes and the `evod.fault` model key.
    #[arg(long)]
    pub allow_fault_injection: bool,
    /// Fault injection (needs --allow-fault-injection): a real SIGSEGV on
    /// every `EVAL` (or `EVAL_RECIPES`) candidate whose bytes hash ([`poison_hash`]) to a
    /// multiple of N, a "poison candidate" that crashes the runtime every time.
    #[arg(long, hide = true, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub poison_one_in: Option<u64>,
    /// Start as a standby: map the model, say ready on this inherited
    /// socket and wait to be promoted (the supervisor's warm spare). It is
    /// also the crash-notice link, before and after the promotion.
    #[arg(long, value_name = "FD")]
    pub standby_fd: Option<i32>,
    /// The inherited socket to write a crash notice on
    /// (`evod_wire::notice`) when a fatal signal kills this worker (a
    /// worker started cold; a standby uses its --standby-fd).
    #[arg(long, value_name = "FD", conflicts_with = "standby_fd")]
    pub notice_fd: Option<i32>,
    /// This worker's index (for logs).
    #[arg(long, default_value_t = 0)]
    pub index: u32,
}

/// The model a worker serves: its network and task, with the parameters
/// copied out of the map once (a worker never writes the file).
struct Loaded {
    arch: Architecture,
    task: Task,
    /// The mapped file; parameters are served from the map when they lie
    /// there as contiguous f32 (no copy, so a respawn on a 1 GiB model costs
    /// what it costs on a small one).
    model: Model,
    /// The parameters, gathered (and converted) on first use when they do
    /// not lie in the map as contiguous f32. `EVAL` never needs them (it
    /// scores the candidates it is sent), so a respawned worker answers
    /// without reading the model's data at all.
    owned: std::cell::OnceCell<Vec<f32>>,
    generation: u64,
    /// Checksum of the file, when a `LOAD` asked for it to be verified
    /// (computing it reads the whole file); 0 otherwise.
    checksum: u64,
}

impl Loaded {
    fn params(&self) -> Result<std::borrow::Cow<'_, [f32]>, evod_runtime::RuntimeError> {
        if let Some(v) = self.owned.get() {
            return Ok(std::borrow::Cow::Borrowed(v));
        }
        match self.model.params()? {
            std::borrow::Cow::Borrowed(v) => Ok(std::borrow::Cow::Borrowed(v)),
            std::borrow::Cow::Owned(v) => {
                Ok(std::borrow::Cow::Borrowed(self.owned.get_or_init(|| v)))
            }
        }
    }
}

/// Runs `evod worker` until `SHUTDOWN`, until its epoch is superseded, or
/// until it crashes. With `--standby-fd`, first waits to be promoted (see
/// `evod-supervisor`'s `standby.rs`).
pub fn run(args: Args) -> Result<ExitCode> {
    // First of all: a fatal signal from here on tells the supervisor at
    // once, and an external `kill -SEGV` kills at the first try.
    install_crash_notice(&args)?;
    // A perplexity model is llama.cpp's to score: evod-serve's loop with
    // the llama handler (a build without it answers EVAL with the task's
    // error; `evod run` refuses such a model before starting).
    #[cfg(feature = "llm")]
    if args
        .model
        .as_deref()
        .is_some_and(crate::llm::is_perplexity_model)
    {
        return crate::llm::serve_worker(&args);
    }
    evod_supervisor::set_process_name(if args.standby_fd.is_some() {
        c"evod-standby"
    } else {
        c"evod-worker"
    });
    // SAFETY: `--ring-fd` names the descriptor the supervisor passed for
    // the segment; nothing else in this process owns it, and it is taken
    // over once, here (`attach_inherited` checks it is a sealed memfd first
    // and leaves anything else, stdout say, open).
    let seg = unsafe { Segment::attach_inherited(args.ring_fd) }.with_context(|| {
        format!(
            "attaching the shared segment on descriptor {}",
            args.ring_fd
        )
    })?;
    let mut worker = Worker {
        seg: &seg,
        allow_faults: args.allow_fault_injection,
        poison_one_in: args.poison_one_in.filter(|_| args.allow_fault_injection),
        model: None,
        started: Instant::now(),
        lying: false,
        lying_control: false,
        crash_on_exec: false,
        mute_control: false,
        eval_fails: false,
        bases: evod_serve::RecipeBases::new(),
        buffers: Vec::new(),
        regenerated: Vec::new(),
    };
    let mut preloaded = None;
    if let Some(fd) = args.standby_fd {
        let Some(pre) = stand_by(fd, args.model.as_deref())? else {
            // The supervisor dropped us before promotion.
            return Ok(ExitCode::SUCCESS);
        };
        preloaded = pre;
        evod_supervisor::set_process_name(c"evod-worker");
        worker.started = Instant::now();
    }
    // Claim the server end first: it starts the heartbeat, so a large model
    // being mapped and checked does not look like a hang.
    let mut server = seg
        .server()
        .context("claiming the server end of the ring")?;
    if let Some(path) = &args.model {
        // A crash while installing the model at start is the model's doing,
        // as in a `LOAD`: say so for the supervisor's fallback.
        seg.set_in_service(Some(op::LOAD));
        let loaded = match preloaded {
            // Mapped while standing by, and still the live file.
            Some(pre) if pre.is_current(path) => worker.install(path, pre.model, 0),
            _ => worker.load(path, None, 0),
        };
        seg.set_in_service(None);
        if let Err(e) = loaded {
            eprintln!(
                "evod worker {}: cannot load {}: {e:#}",
                args.index,
                path.display()
            );
        }
    }
    loop {
        let request = match server.recv(Duration::from_millis(500)) {
            Ok(Some((_, request))) => request,
            Ok(None) => continue,
            // Replaced by a newer incarnation: the supervisor no longer
            // wants us; leave quietly.
            Err(RingError::EpochChanged { .. }) => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(e).context("serving the ring"),
        };
        if worker.serve(request)? == Flow::Shutdown {
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// A model mapped by a standby before its promotion, and the identity of
/// the file it was mapped from.
pub(crate) struct Preloaded {
    model: Model,
    /// (dev, ino) of the path, taken *before* opening it: published files
    /// are replaced by rename, never changed in place, so an unchanged
    /// identity at promotion means the mapping is of the live file (a rename
    /// between the stat and the open only causes a needless reload).
    identity: (u64, u64),
}

impl Preloaded {
    fn is_current(&self, path: &Path) -> bool {
        evod_store::file_identity(path).is_some_and(|id| id == self.identity)
    }
}

/// Standby mode: maps the model, says ready on the link (descriptor `fd`)
/// and blocks until the supervisor promotes us (`Ok(Some(_))`, with the
/// model if it could be mapped) or drops us (`Ok(None)`: end of file).
/// Told that a new file is live (`REFRESH`), it maps the file at the
/// model path again if it is not the one mapped, and goes on waiting.
pub(crate) fn stand_by(fd: i32, model: Option<&Path>) -> Result<Option<Option<Preloaded>>> {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;
    evod_supervisor::spawn::check_inherited_fd(fd)
        .with_context(|| format!("standby link on descriptor {fd}"))?;
    // SAFETY: the descriptor is open (checked just above) and was inherited
    // for exactly this purpose: nothing else in this process owns it.
    // Never closed: after the promotion it is the crash-notice link the
    // signal handlers write to (`install_crash_notice`).
    let mut link = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    // A model that cannot be mapped now is tried again (and its error
    // reported) at promotion, as a cold start would.
    let preload = |path: &Path| {
        let identity = evod_store::file_identity(path)?;
        let model = Model::open_for_serving(path).ok()?;
        Some(Preloaded { model, identity })
    };
    let mut preloaded = model.and_then(preload);
    link.write_all(&[evod_wire::standby::READY])
        .context("standby link: cannot say ready")?;
    let mut byte = [0u8; 1];
    loop {
        match link.read(&mut byte) {
            Ok(0) => return Ok(None),
            Ok(_) if byte[0] == evod_wire::standby::GO => return Ok(Some(preloaded)),
            Ok(_) if byte[0] == evod_wire::standby::REFRESH => {
                if let Some(path) = model
                    && !preloaded.as_ref().is_some_and(|p| p.is_current(path))
                {
                    // The old mapping goes first: one model mapped at a time.
                    drop(preloaded.take());
                    preloaded = preload(path);
                }
            }
            Ok(_) => anyhow::bail!("standby link: unexpected byte {:#04x}", byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The supervisor is gone or closed its end abruptly.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e).context("standby link"),
        }
    }
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    Shutdown,
}

struct Worker<'s> {
    seg: &'s Segment,
    allow_faults: bool,
    poison_one_in: Option<u64>,
    model: Option<Loaded>,
    started: Instant,
    /// `FAULT_LIE` was received: EVAL replies are garbage from now on.
    lying: bool,
    /// `FAULT_LIE` with code 1 was received: control replies lie from now on.
    lying_control: bool,
    /// The served model carries `evod.fault = "segv-on-exec"` (fault
    /// injection only): `NEURAL_EXEC` crashes.
    crash_on_exec: bool,
    /// The served model carries `evod.fault = "mute"` (fault injection
    /// only): control requests are dropped unanswered, beats go on.
    mute_control: bool,
    /// The served model carries `evod.fault = "eval-fails"` (fault
    /// injection only): every `EVAL` and `EVAL_RECIPES` is answered
    /// `EVAL_FAILED`.
    eval_fails: bool,
    /// The base of the last `EVAL_RECIPES`, read once per base.
    bases: evod_serve::RecipeBases,
    /// Candidate buffers `EVAL` decodes candidates into, reused from
    /// request to request (one per lockstep candidate).
    buffers: Vec<Vec<f32>>,
    /// The lockstep group `EVAL_RECIPES` regenerates candidates into
    /// (candidate-major), reused from request to request.
    regenerated: Vec<f32>,
}

/// A reply: status and payload bytes.
type Answer = (i32, Vec<u8>);

fn error(status: i32, message: impl std::fmt::Display) -> Answer {
    (status, message.to_string().into_bytes())
}

impl Worker<'_> {
    fn serve(&mut self, request: Request<'_>) -> Result<Flow> {
        let begun = Instant::now();
        let opcode = request.header.opcode;
        self.seg.set_in_service(Some(opcode));
        if self.mute_control && request.channel() == Channel::Control {
            drop(request);
            self.seg.set_in_service(None);
            return Ok(Flow::Continue);
        }
        if self.lying_control && request.channel() == Channel::Control {
            // Every control request is answered with a reply whose payload
            // lies outside the payload area (fault injection: `lie-control`).
            drop(request);
            // SAFETY: the worker touches the segment from this thread only.
            unsafe {
                self.seg
                    .scribble(Scribble::ReplyPayloadOutOfBounds(Channel::Control));
            }
            self.seg.set_in_service(None);
            return Ok(Flow::Continue);
        }
        if op::is_fault(opcode) {
            if !self.allow_faults {
                let answer = error(
                    status::FAULT_REFUSED,
                    format!(
                        "fault opcode {} refused: the worker runs without --allow-fault-injection",
                        op::name(opcode)
                    ),
                );
                return self.finish(request, opcode, begun, answer);
            }
            let code = request
                .payload
                .get(..4)
                .map_or(1, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if opcode == op::FAULT_LIE && code == 1 {
                // From now on, lie to the supervisor (the reader of the
                // control channel), which must notice and replace us.
                self.finish(request, opcode, begun, (status::OK, Vec::new()))?;
                self.lying_control = true;
                return Ok(Flow::Continue);
            }
            if opcode == op::FAULT_LIE {
                // Answer the fault request honestly, then lie on the other
                // channel and keep serving: the evolver must notice and have
                // this worker replaced.
                self.finish(request, opcode, begun, (status::OK, Vec::new()))?;
                // SAFETY: the worker touches the segment from this thread only.
                unsafe {
                    self.seg
                        .scribble(Scribble::ReplyPayloadOutOfBounds(Channel::Eval));
                }
                // And every later EVAL reply is malformed, so the lie is
                // seen even if an honest reply overwrote the scribbled slot.
                self.lying = true;
                return Ok(Flow::Continue);
            }
            if opcode == op::FAULT_NOTICE {
                // A crash notice without a crash (a hostile worker's):
                // answered, then the worker neither dies nor leaves when
                // it is replaced (it ignores its epoch): the supervisor
                // must kill it.
                let answer = match evod_serve::notice::send(libc::SIGSEGV) {
                    Ok(()) => (status::OK, Vec::new()),
                    Err(e) => error(status::BAD_REQUEST, format!("no crash notice sent: {e}")),
                };
                let sent = answer.0 == status::OK;
                self.finish(request, opcode, begun, answer)?;
                if !sent {
                    return Ok(Flow::Continue);
                }
                loop {
                    std::thread::park();
                }
            }
            if opcode == op::FAULT_ALLOC {
                // A real allocation, every page touched, then kept: within
                // the memory limit the worker goes on serving (and answers
                // OK); past it the allocation fails and Rust aborts the
                // process (SIGABRT), as for a runtime's runaway allocation.
                let bytes = (code as usize).saturating_mul(1 << 20);
                let block = vec![1u8; bytes];
                std::hint::black_box(&block);
                std::mem::forget(block);
                return self.finish(request, opcode, begun, (status::OK, Vec::new()));
            }
            drop(request);
            inject_fault(self.seg, opcode, code);
        }
        let answer = match opcode {
            op::PING => (status::OK, Vec::new()),
            op::STATS => (status::OK, protocol::to_bincode(&self.info())),
            op::LOAD => match protocol::from_bincode::<LoadRequest>(request.payload) {
                Err(e) => error(status::BAD_REQUEST, format!("bad LOAD body: {e}")),
                Ok(load) => {
                    let expect = Some(load.generation).filter(|_| load.checksum != 0);
                    match self.load(Path::new(&load.path), expect, load.checksum) {
                        Ok(()) => (status::OK, protocol::to_bincode(&self.info())),
                        Err(e) => error(status::LOAD_FAILED, format!("{e:#}")),
                    }
                }
            },
            op::NEURAL_EXEC if self.crash_on_exec => segfault(),
            // `evod.fault = "slow-exec"` (fault injection only): each
            // `NEURAL_EXEC` takes a second, beating, as behind a long `EVAL`.
            op::NEURAL_EXEC
                if self.allow_faults
                    && self
                        .model
                        .as_ref()
                        .and_then(|m| m.model.file.get("evod.fault"))
                        .and_then(|v| v.as_str())
                        == Some("slow-exec") =>
            {
                for _ in 0..20 {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    self.seg.beat(Role::Worker);
                }
                self.exec(request.payload)
            }
            op::NEURAL_EXEC => self.exec(request.payload),
            op::EVAL if self.lying => (status::OK, b"lie".to_vec()),
            op::EVAL | op::EVAL_RECIPES if self.eval_fails => error(
                status::EVAL_FAILED,
                "evaluation fails (fault injection: evod.fault = \"eval-fails\")",
            ),
            op::EVAL => self.eval(request.payload),
            op::EVAL_RECIPES if self.lying => (status::OK, b"lie".to_vec()),
            op::EVAL_RECIPES => self.eval_recipes(request.payload),
            op::SHUTDOWN => {
                self.finish(request, opcode, begun, (status::OK, Vec::new()))?;
                return Ok(Flow::Shutdown);
            }
            other => error(status::UNKNOWN_OPCODE, format!("unknown opcode {other}")),
        };
        self.finish(request, opcode, begun, answer)
    }

    fn finish(
        &self,
        request: Request<'_>,
        opcode: u32,
        begun: Instant,
        answer: Answer,
    ) -> Result<Flow> {
        let (st, body) = answer;
        match request.reply(st, body.len(), |_, out| out.copy_from_slice(&body)) {
            Ok(()) => {}
            // The client went away or a new epoch began: nobody waits for
            // this reply any more.
            Err(RingError::EpochChanged { .. }) => return Ok(Flow::Shutdown),
            Err(e) => return Err(e).context("replying on the ring"),
        }
        self.seg
            .record_request(opcode, begun.elapsed(), st == status::OK);
        self.seg.set_in_service(None);
        Ok(Flow::Continue)
    }

    fn info(&self) -> WorkerInfo {
        let mut info = WorkerInfo {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            ..WorkerInfo::default()
        };
        if let Some(m) = &self.model {
            info.generation = Some(m.generation);
            info.checksum = m.checksum;
            info.n_params = m.arch.n_params() as u64;
            info.inputs = m.arch.inputs() as u32;
            info.outputs = m.arch.outputs() as u32;
            info.task = m.task.name();
        }
        info
    }

    /// Maps and checks `path`; on success it replaces the served model, on
    /// failure the old one keeps being served.
    fn load(&mut self, path: &Path, generation: Option<u64>, checksum: u64) -> Result<()> {
        // A `LOAD` (a new generation) gets every check, values included; a
        // worker starting on the live model only checks its structure, so a
        // respawn costs the same for any model size.
        // The heartbeat keeps moving while a big model is checked and
        // hashed (a 1 GiB file takes about a second each).
        let beat = || self.seg.beat(Role::Worker);
        let model = Model::open_for_serving(path)?;
        if generation.is_some() || checksum != 0 {
            model.check_values_with(beat)?;
        }
        // `evod.fault = "slow-load"` (fault injection only): a `LOAD` takes
        // two seconds more, beating, as a big model's would (a start-up or
        // promotion load is not slowed).
        if self.allow_faults
            && checksum != 0
            && model.file.get("evod.fault").and_then(|v| v.as_str()) == Some("slow-load")
        {
            for _ in 0..40 {
                std::thread::sleep(std::time::Duration::from_millis(50));
                beat();
            }
        }
        let file_checksum = if checksum != 0 {
            let actual = model.file.checksum_with(beat);
            if actual != checksum {
                anyhow::bail!(
                    "{}: checksum {actual:016x}, expected {checksum:016x}",
                    path.display()
                );
            }
            actual
        } else {
            0
        };
        if let Some(g) = generation
            && g != model.spec.generation
        {
            anyhow::bail!(
                "{}: generation {}, expected {g}",
                path.display(),
                model.spec.generation
            );
        }
        self.install(path, model, file_checksum)
    }

    /// Starts serving an opened and checked `model` (from `path`).
    fn install(&mut self, path: &Path, model: Model, checksum: u64) -> Result<()> {
        if self.allow_faults
            && let Some(fault) = model.file.get("evod.fault").and_then(|v| v.as_str())
        {
            // A generation made to crash the runtime (fallback tests).
            match fault {
                "segv" => inject_fault(self.seg, op::FAULT_SEGV, 0),
                "abort" => inject_fault(self.seg, op::FAULT_ABORT, 0),
                // Keeps beating, never answers a control request again.
                "mute" => {}
                // Loads fine; crashes when it serves (`NEURAL_EXEC`), or
                // fails every evaluation.
                "segv-on-exec" | "eval-fails" | "slow-exec" | "slow-load" => {}
                other => anyhow::bail!("{}: unknown evod.fault {other:?}", path.display()),
            }
        }
        let task: Task = model
            .spec
            .task
            .parse()
            .with_context(|| format!("{}: task {:?}", path.display(), model.spec.task))?;
        task.check_arch(&model.spec.arch)?;
        self.seg.set_model_generation(model.spec.generation);
        self.crash_on_exec = self.allow_faults
            && model.file.get("evod.fault").and_then(|v| v.as_str()) == Some("segv-on-exec");
        self.mute_control = self.allow_faults
            && model.file.get("evod.fault").and_then(|v| v.as_str()) == Some("mute");
        self.eval_fails = self.allow_faults
            && model.file.get("evod.fault").and_then(|v| v.as_str()) == Some("eval-fails");
        let replaced = self.model.replace(Loaded {
            arch: model.spec.arch.clone(),
            task,
            generation: model.spec.generation,
            checksum,
            model,
            owned: std::cell::OnceCell::new(),
        });
        drop_aside(replaced);
        Ok(())
    }

    fn exec(&self, payload: &[u8]) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let (h, inputs) = match ExecHeader::decode(payload) {
            Ok(x) => x,
            Err(e) => return error(status::BAD_REQUEST, format!("bad NEURAL_EXEC body: {e}")),
        };
        if h.inputs as usize != m.arch.inputs() {
            return error(
                status::BAD_REQUEST,
                format!(
                    "{} inputs per row, the network takes {}",
                    h.inputs,
                    m.arch.inputs()
                ),
            );
        }
        let batch = h.batch as usize;
        let mut out = vec![0f32; batch * m.arch.outputs()];
        let mut scratch = evod_runtime::Scratch::new();
        if let Err(e) = m.params().and_then(|params| {
            evod_runtime::forward_batch(&m.arch, &params, &inputs, batch, &mut out, &mut scratch)
        }) {
            return error(status::BAD_REQUEST, e);
        }
        let mut body = vec![0u8; out.len() * 4];
        protocol::write_f32s(&out, &mut body);
        (status::OK, body)
    }

    fn eval(&mut self, payload: &[u8]) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let h = match EvalHeader::decode(payload) {
            Ok(h) => h,
            Err(e) => return error(status::BAD_REQUEST, format!("bad EVAL body: {e}")),
        };
        let n_params = m.arch.n_params();
        if h.params as usize != n_params {
            return error(
                status::EVAL_FAILED,
                format!(
                    "candidates have {} parameters, the model has {n_params}",
                    h.params
                ),
            );
        }
        let task = match (&m.task, h.episodes) {
            (Task::CartPole { .. }, e) if e > 0 => Task::CartPole { episodes: e },
            (t, _) => t.clone(),
        };
        let body = &payload[EvalHeader::SIZE..];
        let n = n_params;
        let arch = m.arch.clone();
        let mut fitness = Vec::with_capacity(h.candidates as usize);
        // Groups of candidates share the runtime's lockstep lanes; the
        // heartbeat is refreshed between groups so a long batch does not
        // look like a hang to the watchdog. Candidates are decoded into
        // buffers reused from request to request.
        let group = eval_group(n).min(h.candidates as usize);
        ensure_buffers(&mut self.buffers, group, n);
        let mut chunks = body.chunks_exact(4 * n).peekable();
        while chunks.peek().is_some() {
            let mut used = 0;
            for (chunk, buf) in chunks.by_ref().take(group).zip(&mut self.buffers) {
                if let Some(every) = self.poison_one_in
                    && poison_hash(chunk).is_multiple_of(every)
                {
                    segfault();
                }
                for (v, b) in buf.iter_mut().zip(chunk.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                used += 1;
            }
            let views: Vec<&[f32]> = self.buffers[..used].iter().map(Vec::as_slice).collect();
            // The runtime ticks every few milliseconds of network work: the
            // heartbeat stays fresh through a long evaluation (a large
            // network, many episodes) while it makes progress, and stops
            // if it hangs.
            let seg = self.seg;
            match task.evaluate_many_with(&arch, &views, h.seed, &mut || seg.beat(Role::Worker)) {
                Ok(f) => fitness.extend(f),
                Err(e) => return error(status::EVAL_FAILED, format!("{e}")),
            }
            self.seg.beat(Role::Worker);
        }
        let mut out = vec![0u8; 8 * fitness.len()];
        protocol::write_f64s(&fitness, &mut out);
        (status::OK, out)
    }
}

/// At least `group` candidate buffers of `n` values in `buffers`.
fn ensure_buffers(buffers: &mut Vec<Vec<f32>>, group: usize, n: usize) {
    if buffers.first().is_some_and(|b| b.len() != n) {
        buffers.clear();
    }
    while buffers.len() < group {
        buffers.push(vec![0.0; n]);
    }
}

/// Candidates evaluated together for a network of `n` parameters: the
/// lockstep group, or two for networks the runtime evaluates one at a time
/// anyway (so a worker holds two candidate buffers, not sixteen: the two
/// halves of an ES pair, regenerated in one pass over their noise).
fn eval_group(n: usize) -> usize {
    if n >= evod_runtime::cartpole::ONE_AT_A_TIME_PARAMS {
        2
    } else {
        EVAL_GROUP
    }
}

impl Worker<'_> {
    /// `EVAL_RECIPES`: decoding, the base (read and verified once per base)
    /// and the regeneration of each candidate are `evod_serve`'s, shared
    /// with every other worker; the candidates are scored in lockstep
    /// groups as `EVAL`'s are.
    fn eval_recipes(&mut self, payload: &[u8]) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let n = m.arch.n_params();
        let body = match evod_serve::decode_recipes(payload, n) {
            Ok(b) => b,
            Err(e) => return error(e.status(), e),
        };
        let task = match (&m.task, body.header.episodes) {
            (Task::CartPole { .. }, e) if e > 0 => Task::CartPole { episodes: e },
            (t, _) => t.clone(),
        };
        let seg = self.seg;
        let base = match self
            .bases
            .base_with(&body, &m.arch, || seg.beat(Role::Worker))
        {
            Ok(b) => b,
            Err(e) => return error(e.status(), e),
        };
        seg.beat(Role::Worker);
        let group = eval_group(n).min(body.recipes.len());
        let mut fitness = Vec::with_capacity(body.recipes.len());
        let mut at = 0;
        while at < body.recipes.len() {
            let recipes = &body.recipes[at..];
            let mut take = group.min(recipes.len());
            if group == 2 && recipes.get(1) != Some(&recipes[0].mirror()) {
                // Groups of two are ES pairs: a lone candidate (the mean,
                // half of a pair split between workers) goes alone.
                take = 1;
            }
            let chunk = &recipes[..take];
            at += take;
            if let Err(e) = evod_serve::regenerate(&base, chunk, &mut self.regenerated, || {
                seg.beat(Role::Worker)
            }) {
                return error(e.status(), e);
            }
            let views: Vec<&[f32]> = self.regenerated.chunks_exact(n).collect();
            if let Some(every) = self.poison_one_in {
                for v in &views {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    if poison_hash(&bytes).is_multiple_of(every) {
                        segfault();
                    }
                }
            }
            let tick = &mut || seg.beat(Role::Worker);
            match task.evaluate_many_with(&m.arch, &views, body.header.seed, tick) {
                Ok(f) => fitness.extend(f),
                Err(e) => return error(status::EVAL_FAILED, format!("{e}")),
            }
            seg.beat(Role::Worker);
        }
        let mut out = vec![0u8; 8 * fitness.len()];
        protocol::write_f64s(&fitness, &mut out);
        (status::OK, out)
    }
}

/// FNV-1a (64-bit) of a candidate's little-endian bytes: the content rule
/// of `--poison-one-in` (deterministic, so a poisoned candidate crashes
/// every worker it is sent to).
pub fn poison_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Candidates evaluated together (CartPole runs 8 episodes in lockstep).
const EVAL_GROUP: usize = 16;

/// Carries out a fault opcode; never returns.
fn inject_fault(seg: &Segment, opcode: u32, code: u32) -> ! {
    match opcode {
        op::FAULT_SEGV => segfault(),
        op::FAULT_ABORT => std::process::abort(),
        op::FAULT_EXIT => std::process::exit(code as i32),
        op::FAULT_HANG => loop {
            // Stop serving and stop beating: the watchdog must notice.
            std::thread::park();
        },
        op::FAULT_SCRIBBLE => {
            // SAFETY: the worker touches the segment from this thread only,
            // and exits right after.
            unsafe {
                seg.scribble(Scribble::RandomBytes {
                    seed: u64::from(code) | 0x5eed,
                });
            }
            // Then die, as a scribbling runtime would: the supervisor must
            // rebuild the segment state for the next incarnation.
            std::process::exit(70);
        }
        // `op::is_fault` admits only the opcodes above.
        _ => std::process::abort(),
    }
}

/// Drops a replaced model on a thread of its own: unmapping a big file and
/// freeing its gathered parameters (about half a second per GiB of 4 KiB
/// pages here) must not hold up the `LOAD` reply or the heartbeat (the
/// supervisor takes a worker silent for 500 ms for a dead one). Inline if
/// no thread can be started.
fn drop_aside(model: Option<Loaded>) {
    let Some(model) = model else { return };
    // On failure the closure, and the model with it, is dropped right here.
    let spawned = std::thread::Builder::new()
        .name("drop-model".into())
        .spawn(move || drop(model));
    if let Err(e) = spawned {
        eprintln!("evod worker: no thread to drop the replaced model on ({e}): dropped inline");
    }
}

/// A real invalid-memory write: maps one page with no access and stores to
/// it, so the kernel delivers SIGSEGV exactly as for a runtime bug.
fn segfault() -> ! {
    // SAFETY: mmap with a null hint, a length of one page and
    // MAP_PRIVATE|MAP_ANONYMOUS has no preconditions; the result is checked.
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        // Could not even map a page: die with SIGSEGV by raising it.
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(libc::SIGSEGV) };
    } else {
        // SAFETY: deliberately not sound to complete: the page is mapped
        // PROT_NONE, so this store faults before any memory is changed and
        // the default SIGSEGV action ends the process. Nothing observes a
        // written value; that is the point of the fault opcode.
        unsafe { std::ptr::write_volatile(page.cast::<u64>(), 0xdead) };
    }
    std::process::abort()
}

/// Installs the crash-notice handlers (`evod_serve::notice`) on the
/// worker's link: `--notice-fd` for a worker started cold, `--standby-fd`
/// for a standby (the same socket carries the notice after the promotion),
/// none when run by hand. They also make a worker die of the first
/// SIGSEGV or SIGBUS sent from outside (chaos tools, `docker kill -s
/// SEGV`): Rust's own stack-overflow handler returns from a signal that is
/// not a fault, so without them the first one was survived. A stack
/// overflow still gets Rust's message (then SIGABRT).
pub(crate) fn install_crash_notice(args: &Args) -> Result<()> {
    let fd = args.notice_fd.or(args.standby_fd);
    // SAFETY: the descriptor (`install` checks it is a socket) was passed
    // for this link alone and is never closed in this process
    // (`stand_by` keeps the standby's open); nothing else installs handlers
    // for the fatal signals.
    unsafe { evod_serve::notice::install(fd) }.context("installing the crash-notice handlers")
}
