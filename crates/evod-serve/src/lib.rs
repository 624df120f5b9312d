//! The worker side of the evod ring, as a library: any program that links
//! it (the `evod` Python package's `evod.serve`) is a runtime worker the
//! supervisor spawns, watches and restarts like any other, and the evolver
//! cannot tell which one answers. The built-in `evod worker` keeps a loop
//! of its own but takes its `EVAL_RECIPES` handling from [`recipes`].
//!
//! [`attach`] takes the inherited segment ([`ring_fd`] finds its number in
//! `--ring-fd N` or `EVOD_RING_FD`); [`serve`] claims the server end,
//! installs the model (`--model`/`EVOD_MODEL`, then every `LOAD`) and
//! answers `PING`, `STATS`, `LOAD`, `EVAL`, `NEURAL_EXEC` and `SHUTDOWN`
//! (the formats of [`evod_wire::protocol`]), and `EVAL_RECIPES`, until
//! `SHUTDOWN` or until the supervisor starts a new epoch. What the program brings is a [`Handler`]:
//! the fitness of a batch of candidates (`eval`), and optionally its own
//! `load` hook and forward pass (`exec`; the default is evod's MLP).
//!
//! Heartbeat: the loop beats while it waits for a request and after every
//! request; during an `EVAL` the handler beats by calling
//! [`EvalRequest::beat`] between candidates (progress, not time: a handler
//! stuck in one candidate stops beating and the supervisor's watchdog ends
//! the process within `--heartbeat-timeout`). There is deliberately no
//! beating thread: it would keep a hung fitness alive.
//!
//! Fault opcodes are refused ([`status::FAULT_REFUSED`]): a user's program
//! is never a fault-injection target.
//!
//! The `EVAL` body is decoded in one place, [`decode_eval`]. The recipe
//! form, `EVAL_RECIPES` (ES candidates as recipes against a base file the
//! evolver wrote), is handled by the [`recipes`] module for every worker,
//! this loop and the built-in `evod worker` alike: the loop regenerates the
//! candidates and hands them to [`Handler::eval`] exactly as an `EVAL` of
//! the same vectors would, so a handler does not know which form was sent.
//!
//! Crash notice: [`notice::install`] (given [`WorkerArgs::notice_fd`])
//! makes a fatal signal write one byte to the supervisor before the
//! process dies of it, so a worker's replacement takes over before the
//! kernel has torn the dead one's memory down ([`evod_wire::notice`]).
#![deny(missing_docs)]

pub mod notice;
pub mod recipes;

pub use evod_evolve::Purpose;
pub use recipes::{BaseError, RecipeBases, RecipesBody, RecipesError, decode_recipes, regenerate};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evod_ring::{Request, RingError, Role, Segment};
use evod_runtime::{Architecture, Model, RuntimeError, Scratch, forward_batch};
use evod_wire::protocol::{self, EvalHeader, ExecHeader, LoadRequest, WorkerInfo, op, status};

/// Bytes of regenerated candidates an `EVAL_RECIPES` hands to the handler
/// at once: a request of many candidates of a large model reaches
/// [`Handler::eval`] as several calls of at most this much (and at least
/// one candidate), so a worker's memory does not grow with the batch.
pub const RECIPE_GROUP_BYTES: usize = 64 << 20;

/// Environment variable holding the ring descriptor (as `--ring-fd`).
pub const RING_FD_VAR: &str = "EVOD_RING_FD";
/// Environment variable holding the model path (as `--model`).
pub const MODEL_VAR: &str = "EVOD_MODEL";

/// Errors that end the serve loop (a bad request is answered, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No ring descriptor was given.
    #[error(
        "no ring descriptor: this program is a worker the evod supervisor starts \
         (`evod run --worker-cmd ...`), which passes --ring-fd N and {RING_FD_VAR}"
    )]
    NoRingFd,
    /// The ring descriptor is not a number.
    #[error("bad ring descriptor {value:?} in {origin}: expected a descriptor number")]
    BadRingFd {
        /// `--ring-fd` or `EVOD_RING_FD`.
        origin: &'static str,
        /// What was given.
        value: String,
    },
    /// The segment could not be attached or claimed, or the ring broke.
    #[error("{what}: {source}")]
    Ring {
        /// What was being done.
        what: String,
        /// The ring's error.
        #[source]
        source: RingError,
    },
    /// The descriptor was already taken by an earlier [`attach`] in this
    /// process.
    #[error("the ring descriptor {0} was already attached in this process")]
    AlreadyAttached(i32),
}

/// Where the worker's inputs come from: the command line's `--ring-fd N`,
/// `--model PATH` and `--notice-fd N` (also `--ring-fd=N`), else
/// `EVOD_RING_FD`, `EVOD_MODEL` and `EVOD_NOTICE_FD`. Other arguments are
/// the program's own and are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerArgs {
    /// The inherited segment's descriptor.
    pub ring_fd: i32,
    /// The model to load at start.
    pub model: Option<PathBuf>,
    /// The link to write a crash notice on ([`notice::install`]); `None`
    /// when the supervisor gave none (or gave something that is not a
    /// descriptor number).
    pub notice_fd: Option<i32>,
}

/// Reads [`WorkerArgs`] from `args` (without the program name) and the
/// environment.
pub fn worker_args(args: &[String]) -> Result<WorkerArgs, ServeError> {
    let flag = |name: &str| -> Option<String> {
        let eq = format!("{name}=");
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == name {
                return it.next().cloned();
            }
            if let Some(v) = a.strip_prefix(&eq) {
                return Some(v.to_owned());
            }
        }
        None
    };
    let (origin, value) = match flag("--ring-fd") {
        Some(v) => ("--ring-fd", v),
        None => match std::env::var(RING_FD_VAR) {
            Ok(v) => (RING_FD_VAR, v),
            Err(_) => return Err(ServeError::NoRingFd),
        },
    };
    let ring_fd = value
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|&fd| fd >= 0)
        .ok_or(ServeError::BadRingFd { origin, value })?;
    let model = flag("--model")
        .or_else(|| std::env::var(MODEL_VAR).ok())
        .filter(|m| !m.is_empty())
        .map(PathBuf::from);
    let notice_fd = flag("--notice-fd")
        .or_else(|| std::env::var(evod_wire::notice::NOTICE_FD_VAR).ok())
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|&fd| fd > 2);
    Ok(WorkerArgs {
        ring_fd,
        model,
        notice_fd,
    })
}

/// Attaches the inherited segment on `fd` (checked to be a sealed memfd
/// first; anything else is an error and is left open).
///
/// # Safety
///
/// Descriptor `fd` must not be owned by anything else in this process: it
/// was inherited for exactly this purpose and is taken over once (a second
/// call with the same number in one process is refused, but another owner
/// of the number cannot be detected).
pub unsafe fn attach(fd: i32) -> Result<Segment, ServeError> {
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return Err(ServeError::AlreadyAttached(fd));
    }
    // SAFETY: forwarded from the caller's promise that `fd` is ours alone.
    unsafe { Segment::attach_inherited(fd) }.map_err(|source| ServeError::Ring {
        what: format!("attaching the shared segment on descriptor {fd}"),
        source,
    })
}

/// The model being served: its network, metadata and parameters.
pub struct ServedModel {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The mapped, checked model.
    pub model: Model,
    /// Checksum of the file when a `LOAD` asked for it to be verified; 0
    /// otherwise.
    pub checksum: u64,
}

impl ServedModel {
    /// The network.
    pub fn arch(&self) -> &Architecture {
        &self.model.spec.arch
    }
    /// The model's task string (`evod.task`).
    pub fn task(&self) -> &str {
        &self.model.spec.task
    }
    /// The model's generation.
    pub fn generation(&self) -> u64 {
        self.model.spec.generation
    }
}

/// One `EVAL` request, decoded: `candidates` parameter vectors of
/// `n_params` values each, laid end to end in `params`. An `EVAL_RECIPES`
/// request arrives as one or more of these, its candidates regenerated
/// (in order, at most [`RECIPE_GROUP_BYTES`] of them at a time).
pub struct EvalRequest<'a> {
    /// Candidate count.
    pub candidates: usize,
    /// Parameters per candidate.
    pub n_params: usize,
    /// All candidates' parameters, candidate-major.
    pub params: &'a [f32],
    /// The task seed the evolver chose (same seed for every candidate).
    pub seed: u64,
    /// Episodes per candidate the evolver asks for; 0 means the task's own
    /// default.
    pub episodes: u32,
    /// What the evaluation is for: [`Purpose::Gate`] is the publish gate,
    /// which a task with a held-out split scores on it (the wire's
    /// [`evod_wire::eval_flags::GATE`]).
    pub purpose: Purpose,
    seg: &'a Segment,
}

impl EvalRequest<'_> {
    /// Candidate `i`'s parameters.
    pub fn candidate(&self, i: usize) -> &[f32] {
        &self.params[i * self.n_params..(i + 1) * self.n_params]
    }
    /// Beats the worker heartbeat: call it between candidates (or from a
    /// long candidate's own progress), never from a timer.
    pub fn beat(&self) {
        self.seg.beat(Role::Worker);
    }
    /// Counts `n` tokens decoded for this request in the worker's stats
    /// block, under its purpose (a language-model task's throughput: the
    /// supervisor sums them into `evod_worker_tokens_total{purpose}`).
    pub fn count_tokens(&self, n: u64) {
        let purpose = match self.purpose {
            Purpose::Train => evod_ring::TokenPurpose::Train,
            Purpose::Gate => evod_ring::TokenPurpose::Gate,
        };
        self.seg.add_tokens(purpose, n);
    }
}

/// What a worker program brings to the loop. Errors are messages: the
/// request is answered with them (`EVAL_FAILED` for `eval`, `BAD_REQUEST`
/// for `exec`, `LOAD_FAILED` for `load`) and the worker serves on.
pub trait Handler {
    /// A model was installed (at start or by a `LOAD`), before it is
    /// served; an error refuses it (the previous one is kept).
    fn load(&mut self, model: &ServedModel) -> Result<(), String> {
        let _ = model;
        Ok(())
    }

    /// The fitness of every candidate of `request` (higher is better), one
    /// value per candidate, in order.
    fn eval(&mut self, model: &ServedModel, request: &EvalRequest<'_>) -> Result<Vec<f64>, String>;

    /// The network's outputs for `batch` rows of inputs (row-major). The
    /// default is evod's MLP forward pass on the model's parameters.
    fn exec(
        &mut self,
        model: &ServedModel,
        inputs: &[f32],
        batch: usize,
    ) -> Result<Vec<f32>, String> {
        let arch = model.arch();
        let params = model.model.params().map_err(|e| e.to_string())?;
        let mut out = vec![0f32; batch * arch.outputs()];
        forward_batch(arch, &params, inputs, batch, &mut out, &mut Scratch::new())
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A `SHUTDOWN` was answered.
    Shutdown,
    /// The supervisor started a new epoch on the segment: this worker was
    /// replaced (or its client went away) and must leave.
    Superseded,
}

/// A decoded `EVAL` body: the header and the candidates' parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalBody {
    /// The header.
    pub header: EvalHeader,
    /// `candidates * params` values.
    pub params: Vec<f32>,
}

/// Decodes an untrusted `EVAL` payload for a model of `n_params`
/// parameters. The one place an `EVAL` body is read.
pub fn decode_eval(payload: &[u8], n_params: usize) -> Result<EvalBody, (i32, String)> {
    let header = EvalHeader::decode(payload)
        .map_err(|e| (status::BAD_REQUEST, format!("bad EVAL body: {e}")))?;
    if header.params as usize != n_params {
        return Err((
            status::EVAL_FAILED,
            format!(
                "candidates have {} parameters, the model has {n_params}",
                header.params
            ),
        ));
    }
    Ok(EvalBody {
        header,
        params: protocol::read_f32s(&payload[EvalHeader::SIZE..]),
    })
}

/// Serves the ring on `seg` with `handler` until `SHUTDOWN` or a new epoch.
/// `model` is installed first (a failure is reported on stderr and the
/// worker starts without a model, answering `NO_MODEL` until a `LOAD`).
pub fn serve<H: Handler>(
    seg: &Segment,
    model: Option<&Path>,
    handler: &mut H,
) -> Result<Exit, ServeError> {
    // Claim first: it starts the heartbeat, so loading a large model does
    // not look like a hang.
    let mut server = seg.server().map_err(|source| ServeError::Ring {
        what: "claiming the server end of the ring".into(),
        source,
    })?;
    let mut worker = Worker {
        seg,
        model: None,
        started: Instant::now(),
        bases: RecipeBases::new(),
        regenerated: Vec::new(),
    };
    if let Some(path) = model {
        seg.set_in_service(Some(op::LOAD));
        if let Err(e) = worker.load(path, None, 0, handler) {
            eprintln!("evod worker: cannot load {}: {e}", path.display());
        }
        seg.set_in_service(None);
    }
    loop {
        let request = match server.recv(Duration::from_millis(500)) {
            Ok(Some((_, request))) => request,
            Ok(None) => continue,
            Err(RingError::EpochChanged { .. }) => return Ok(Exit::Superseded),
            Err(source) => {
                return Err(ServeError::Ring {
                    what: "serving the ring".into(),
                    source,
                });
            }
        };
        match worker.serve(request, handler)? {
            Some(exit) => return Ok(exit),
            None => seg.beat(Role::Worker),
        }
    }
}

struct Worker<'s> {
    seg: &'s Segment,
    model: Option<ServedModel>,
    started: Instant,
    /// The base of the last `EVAL_RECIPES`.
    bases: RecipeBases,
    /// Candidates regenerated from recipes, reused from request to request.
    regenerated: Vec<f32>,
}

/// A reply: status and payload.
type Answer = (i32, Vec<u8>);

fn error(status: i32, message: impl std::fmt::Display) -> Answer {
    (status, message.to_string().into_bytes())
}

impl Worker<'_> {
    /// Answers one request; `Some` when the loop is to end.
    fn serve<H: Handler>(
        &mut self,
        request: Request<'_>,
        handler: &mut H,
    ) -> Result<Option<Exit>, ServeError> {
        let begun = Instant::now();
        let opcode = request.header.opcode;
        self.seg.set_in_service(Some(opcode));
        let answer = match opcode {
            _ if op::is_fault(opcode) => error(
                status::FAULT_REFUSED,
                format!(
                    "fault opcode {} refused: this worker is a user's program",
                    op::name(opcode)
                ),
            ),
            op::PING | op::SHUTDOWN => (status::OK, Vec::new()),
            op::STATS => (status::OK, protocol::to_bincode(&self.info())),
            op::LOAD => match protocol::from_bincode::<LoadRequest>(request.payload) {
                Err(e) => error(status::BAD_REQUEST, format!("bad LOAD body: {e}")),
                Ok(load) => {
                    let expect = Some(load.generation).filter(|_| load.checksum != 0);
                    match self.load(Path::new(&load.path), expect, load.checksum, handler) {
                        Ok(()) => (status::OK, protocol::to_bincode(&self.info())),
                        Err(e) => error(status::LOAD_FAILED, e),
                    }
                }
            },
            op::NEURAL_EXEC => self.exec(request.payload, handler),
            op::EVAL => self.eval(request.payload, handler),
            op::EVAL_RECIPES => self.eval_recipes(request.payload, handler),
            other => error(status::UNKNOWN_OPCODE, format!("unknown opcode {other}")),
        };
        let (st, body) = answer;
        match request.reply(st, body.len(), |_, out| out.copy_from_slice(&body)) {
            Ok(()) => {}
            Err(RingError::EpochChanged { .. }) => return Ok(Some(Exit::Superseded)),
            Err(source) => {
                return Err(ServeError::Ring {
                    what: "replying on the ring".into(),
                    source,
                });
            }
        }
        self.seg
            .record_request(opcode, begun.elapsed(), st == status::OK);
        self.seg.set_in_service(None);
        Ok((opcode == op::SHUTDOWN).then_some(Exit::Shutdown))
    }

    fn info(&self) -> WorkerInfo {
        let mut info = WorkerInfo {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            ..WorkerInfo::default()
        };
        if let Some(m) = &self.model {
            info.generation = Some(m.generation());
            info.checksum = m.checksum;
            info.n_params = m.arch().n_params() as u64;
            info.inputs = m.arch().inputs() as u32;
            info.outputs = m.arch().outputs() as u32;
            info.task = m.task().to_owned();
        }
        info
    }

    /// Maps and checks `path` (every value too when a `LOAD` names a
    /// generation or checksum, as the built-in worker does); on success the
    /// handler sees it and it replaces the served model.
    fn load<H: Handler>(
        &mut self,
        path: &Path,
        generation: Option<u64>,
        checksum: u64,
        handler: &mut H,
    ) -> Result<(), String> {
        let opened = if generation.is_some() || checksum != 0 {
            Model::open(path)
        } else {
            Model::open_for_serving(path)
        };
        let model = opened.map_err(|e: RuntimeError| e.to_string())?;
        if checksum != 0 {
            let actual = model.file.checksum();
            if actual != checksum {
                return Err(format!(
                    "{}: checksum {actual:016x}, expected {checksum:016x}",
                    path.display()
                ));
            }
        }
        if let Some(g) = generation
            && g != model.spec.generation
        {
            return Err(format!(
                "{}: generation {}, expected {g}",
                path.display(),
                model.spec.generation
            ));
        }
        let served = ServedModel {
            path: path.to_owned(),
            model,
            checksum,
        };
        handler.load(&served)?;
        self.seg.set_model_generation(served.generation());
        self.model = Some(served);
        Ok(())
    }

    fn exec<H: Handler>(&self, payload: &[u8], handler: &mut H) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let (h, inputs) = match ExecHeader::decode(payload) {
            Ok(x) => x,
            Err(e) => return error(status::BAD_REQUEST, format!("bad NEURAL_EXEC body: {e}")),
        };
        if h.inputs as usize != m.arch().inputs() {
            return error(
                status::BAD_REQUEST,
                format!(
                    "{} inputs per row, the network takes {}",
                    h.inputs,
                    m.arch().inputs()
                ),
            );
        }
        let batch = h.batch as usize;
        match handler.exec(m, &inputs, batch) {
            Ok(out) if out.len() == batch * m.arch().outputs() => {
                let mut body = vec![0u8; out.len() * 4];
                protocol::write_f32s(&out, &mut body);
                (status::OK, body)
            }
            Ok(out) => error(
                status::BAD_REQUEST,
                format!(
                    "the worker's forward pass gave {} values, expected {}",
                    out.len(),
                    batch * m.arch().outputs()
                ),
            ),
            Err(e) => error(status::BAD_REQUEST, e),
        }
    }

    fn eval<H: Handler>(&self, payload: &[u8], handler: &mut H) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let body = match decode_eval(payload, m.arch().n_params()) {
            Ok(b) => b,
            Err((st, message)) => return error(st, message),
        };
        let request = EvalRequest {
            candidates: body.header.candidates as usize,
            n_params: body.header.params as usize,
            params: &body.params,
            seed: body.header.seed,
            episodes: body.header.episodes,
            purpose: purpose_of(body.header.flags),
            seg: self.seg,
        };
        match score(handler, m, &request) {
            Ok(fitness) => fitness_reply(&fitness),
            Err(answer) => answer,
        }
    }

    /// `EVAL_RECIPES`: the base read and verified once per base, the
    /// candidates regenerated into a reused buffer and scored by the
    /// handler in groups of at most [`RECIPE_GROUP_BYTES`].
    fn eval_recipes<H: Handler>(&mut self, payload: &[u8], handler: &mut H) -> Answer {
        let Some(m) = &self.model else {
            return error(status::NO_MODEL, "no model loaded");
        };
        let n = m.arch().n_params();
        let body = match decode_recipes(payload, n) {
            Ok(b) => b,
            Err(e) => return error(e.status(), e),
        };
        let seg = self.seg;
        let base = match self
            .bases
            .base_with(&body, m.arch(), || seg.beat(Role::Worker))
        {
            Ok(b) => b,
            Err(e) => return error(e.status(), e),
        };
        seg.beat(Role::Worker);
        let group = (RECIPE_GROUP_BYTES / (4 * n.max(1))).clamp(1, body.recipes.len());
        let mut fitness = Vec::with_capacity(body.recipes.len());
        for chunk in body.recipes.chunks(group) {
            if let Err(e) = regenerate(&base, chunk, &mut self.regenerated, || {
                seg.beat(Role::Worker)
            }) {
                return error(e.status(), e);
            }
            let request = EvalRequest {
                candidates: chunk.len(),
                n_params: n,
                params: &self.regenerated,
                seed: body.header.seed,
                episodes: body.header.episodes,
                purpose: purpose_of(body.header.flags),
                seg,
            };
            match score(handler, m, &request) {
                Ok(f) => fitness.extend(f),
                Err(answer) => return answer,
            }
        }
        fitness_reply(&fitness)
    }
}

/// The handler's fitness for `request`, checked (one value per candidate;
/// NaN ranks last, as the built-in tasks report it), or the error answer.
fn score<H: Handler>(
    handler: &mut H,
    model: &ServedModel,
    request: &EvalRequest<'_>,
) -> Result<Vec<f64>, Answer> {
    match handler.eval(model, request) {
        Ok(fitness) if fitness.len() == request.candidates => Ok(fitness
            .into_iter()
            .map(|f| if f.is_nan() { f64::NEG_INFINITY } else { f })
            .collect()),
        Ok(fitness) => Err(error(
            status::EVAL_FAILED,
            format!(
                "the fitness gave {} values for {} candidates",
                fitness.len(),
                request.candidates
            ),
        )),
        Err(e) => Err(error(status::EVAL_FAILED, e)),
    }
}

/// The purpose a request's `flags` word names (decoding refused unknown
/// bits).
pub fn purpose_of(flags: u32) -> Purpose {
    if flags & evod_wire::eval_flags::GATE != 0 {
        Purpose::Gate
    } else {
        Purpose::Train
    }
}

fn fitness_reply(fitness: &[f64]) -> Answer {
    let mut out = vec![0u8; 8 * fitness.len()];
    protocol::write_f64s(fitness, &mut out);
    (status::OK, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn worker_args_take_the_flags_in_either_form_and_ignore_the_rest() {
        let a = worker_args(&args(&[
            "fit.py",
            "--ring-fd",
            "7",
            "--model",
            "/m.gguf",
            "x",
            "--notice-fd",
            "8",
        ]))
        .unwrap();
        assert_eq!(
            a,
            WorkerArgs {
                ring_fd: 7,
                model: Some(PathBuf::from("/m.gguf")),
                notice_fd: Some(8),
            }
        );
        let a = worker_args(&args(&["--ring-fd=9", "--model=/n.gguf"])).unwrap();
        assert_eq!((a.ring_fd, a.model.unwrap()), (9, PathBuf::from("/n.gguf")));
        for bad in [
            &["--ring-fd", "x"][..],
            &["--ring-fd", "-3"],
            &["--ring-fd="],
        ] {
            let e = worker_args(&args(bad)).unwrap_err();
            assert!(
                matches!(
                    e,
                    ServeError::BadRingFd {
                        origin: "--ring-fd",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn eval_bodies_decode_or_name_the_problem() {
        let h = EvalHeader {
            candidates: 2,
            params: 3,
            seed: 11,
            episodes: 4,
            flags: 0,
            reserved: 0,
        };
        let values = [1.0f32, 2.0, 3.0, -1.0, -2.0, -3.0];
        let mut buf = vec![0u8; h.request_len()];
        h.encode(&mut buf);
        protocol::write_f32s(&values, &mut buf[EvalHeader::SIZE..]);
        let body = decode_eval(&buf, 3).unwrap();
        assert_eq!(body.header, h);
        assert_eq!(body.params, values);
        let (st, msg) = decode_eval(&buf, 4).unwrap_err();
        assert_eq!(st, status::EVAL_FAILED);
        assert_eq!(msg, "candidates have 3 parameters, the model has 4");
        let (st, msg) = decode_eval(&buf[..buf.len() - 4], 3).unwrap_err();
        assert_eq!(st, status::BAD_REQUEST);
        assert!(msg.starts_with("bad EVAL body: payload of"), "{msg}");
    }
}
