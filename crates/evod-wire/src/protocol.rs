//! The worker protocol: opcodes, status codes and payload formats carried
//! over `evod_ring` channels.
//!
//! The ring moves bytes; this module says what they mean. Every decoder here
//! treats its input as untrusted (it came out of shared memory written by a
//! worker that may be broken or hostile): lengths are checked before use and
//! a bad payload is an error, never a panic.
//!
//! Payload formats (all little-endian):
//! - `PING`: empty request; reply is empty.
//! - `STATS`: empty request; reply is a bincode [`WorkerInfo`].
//! - `LOAD`: bincode [`LoadRequest`]; reply is a bincode [`WorkerInfo`].
//! - `NEURAL_EXEC`: [`ExecHeader`] (16 bytes) then `batch * inputs` f32; reply
//!   is `batch * outputs` f32.
//! - `EVAL`: [`EvalHeader`] (32 bytes) then `candidates * params` f32; reply
//!   is `candidates` f64 fitness values.
//! - `EVAL_RECIPES`: [`RecipesHeader`] (48 bytes), then the base file's path
//!   (`path_len` bytes of UTF-8), then `candidates` recipes of
//!   [`RECIPE_BYTES`] each (`evod_evolve::Recipe::to_bytes`); reply is
//!   `candidates` f64 fitness values. The worker maps the base file once per
//!   base, checks that its parameters hash to `base` and answers
//!   [`status::WRONG_BASE`] otherwise; each candidate is regenerated from its
//!   recipe against that base. A request is about 70 + 22 bytes per
//!   candidate, whatever the model's size.
//! - `SHUTDOWN`: empty; the worker replies then exits 0.
//! - Fault opcodes: refused with [`status::FAULT_REFUSED`] unless the worker
//!   runs with `--allow-fault-injection`. `FAULT_EXIT` carries a u32 code.
//!
//! A reply with a non-zero status carries a UTF-8 error message as payload.
//!
//! Revision 2 (issue 14): `EvalHeader::flags` and the `flags` word of
//! [`RecipesHeader`] (its bytes 32..36, zero in revision 1) say what the
//! evaluation is for ([`eval_flags`]): bit 0 set is the publish gate, scored
//! on held-out data where the task has any. A revision-1 sender writes zero
//! there (training), which revision 2 reads the same way; a request with an
//! unknown bit is refused (`BAD_REQUEST`), so a newer sender cannot be
//! misread by an older reader of this revision.

use serde::{Deserialize, Serialize};

/// Opcodes.
pub mod op {
    /// Liveness round trip.
    pub const PING: u32 = 1;
    /// Worker-side information (model generation, checksum, pid, uptime).
    pub const STATS: u32 = 2;
    /// Map and validate a model file, then serve it.
    pub const LOAD: u32 = 3;
    /// Run the live model on a batch of inputs.
    pub const NEURAL_EXEC: u32 = 4;
    /// Fitness of a batch of candidate parameter vectors on the model's task.
    pub const EVAL: u32 = 5;
    /// Reply, then exit 0.
    pub const SHUTDOWN: u32 = 6;
    /// Fitness of a batch of candidates given as recipes against a base
    /// file the worker maps ([`super::RecipesHeader`]).
    pub const EVAL_RECIPES: u32 = 7;
    /// Fault injection: a real invalid-memory write (SIGSEGV).
    pub const FAULT_SEGV: u32 = 100;
    /// Fault injection: `abort()` (SIGABRT).
    pub const FAULT_ABORT: u32 = 101;
    /// Fault injection: stop serving and stop the heartbeat, forever.
    pub const FAULT_HANG: u32 = 102;
    /// Fault injection: write garbage over the shared segment.
    pub const FAULT_SCRIBBLE: u32 = 103;
    /// Fault injection: `exit(n)`, n in the payload as u32.
    pub const FAULT_EXIT: u32 = 104;
    /// Fault injection: publish a lying reply (payload outside the payload
    /// area) on the `Eval` channel and keep running, as a runtime that
    /// corrupts its shared memory without crashing would; with code 1,
    /// answer every later control-channel request with such a reply.
    pub const FAULT_LIE: u32 = 105;
    /// Fault injection: allocate (and touch) n MiB, n in the payload as u32,
    /// as a runtime with a runaway allocation would; past the worker's
    /// memory limit the allocation fails and the worker aborts.
    pub const FAULT_ALLOC: u32 = 106;
    /// Fault injection: write a crash notice ([`crate::notice`], SIGSEGV)
    /// on the worker's link, answer, then neither die nor leave when
    /// replaced (stop serving, ignore the epoch), as a hostile worker
    /// would: the supervisor must replace it and kill it, once.
    pub const FAULT_NOTICE: u32 = 107;

    /// Whether `op` scores candidates (`EVAL` or `EVAL_RECIPES`): a worker
    /// that dies in one is a candidate's doing, left to the evolver's
    /// quarantine, not the live model's.
    pub fn is_evaluation(op: u32) -> bool {
        matches!(op, EVAL | EVAL_RECIPES)
    }

    /// The opcode's name, for logs and stats.
    pub fn name(op: u32) -> &'static str {
        match op {
            PING => "PING",
            STATS => "STATS",
            LOAD => "LOAD",
            NEURAL_EXEC => "NEURAL_EXEC",
            EVAL => "EVAL",
            SHUTDOWN => "SHUTDOWN",
            EVAL_RECIPES => "EVAL_RECIPES",
            FAULT_SEGV => "FAULT_SEGV",
            FAULT_ABORT => "FAULT_ABORT",
            FAULT_HANG => "FAULT_HANG",
            FAULT_SCRIBBLE => "FAULT_SCRIBBLE",
            FAULT_EXIT => "FAULT_EXIT",
            FAULT_LIE => "FAULT_LIE",
            FAULT_ALLOC => "FAULT_ALLOC",
            FAULT_NOTICE => "FAULT_NOTICE",
            _ => "UNKNOWN",
        }
    }

    /// Whether `op` is a fault-injection opcode.
    pub fn is_fault(op: u32) -> bool {
        (FAULT_SEGV..=FAULT_NOTICE).contains(&op)
    }
}

/// Reply status codes.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// The request payload was malformed.
    pub const BAD_REQUEST: i32 = 1;
    /// `LOAD` failed; the worker keeps serving its previous model.
    pub const LOAD_FAILED: i32 = 2;
    /// No model is loaded yet.
    pub const NO_MODEL: i32 = 3;
    /// A fault opcode without `--allow-fault-injection`.
    pub const FAULT_REFUSED: i32 = 4;
    /// Evaluation failed (e.g. candidate size does not match the model).
    pub const EVAL_FAILED: i32 = 5;
    /// Unknown opcode.
    pub const UNKNOWN_OPCODE: i32 = 6;
    /// `EVAL_RECIPES`: the base file cannot be mapped, or its parameters do
    /// not hash to the checksum the request names; nothing was evaluated.
    pub const WRONG_BASE: i32 = 7;
}

/// `LOAD` request body (bincode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadRequest {
    /// Model file to map.
    pub path: String,
    /// Generation the sender expects the file to hold (`evod.generation`).
    pub generation: u64,
    /// Checksum the sender expects (`GgufFile::checksum`); 0 accepts any.
    pub checksum: u64,
}

/// What a worker reports about itself (`STATS` and `LOAD` replies, bincode).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The worker's pid.
    pub pid: u32,
    /// Generation of the loaded model, if any.
    pub generation: Option<u64>,
    /// Checksum of the loaded model.
    pub checksum: u64,
    /// Parameter count of the loaded model.
    pub n_params: u64,
    /// Network input size.
    pub inputs: u32,
    /// Network output size.
    pub outputs: u32,
    /// Task name of the loaded model.
    pub task: String,
    /// Seconds since the worker started.
    pub uptime_s: f64,
}

/// Errors decoding a payload.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload is shorter or longer than its header says.
    #[error("payload of {got} bytes, expected {want}")]
    Length {
        /// Bytes present.
        got: usize,
        /// Bytes the header implies.
        want: usize,
    },
    /// A field is out of range.
    #[error("bad field {field}: {value}")]
    Field {
        /// Field name.
        field: &'static str,
        /// Offending value.
        value: u64,
    },
    /// bincode failed.
    #[error("bad bincode body: {0}")]
    Bincode(String),
}

/// Bits of the `flags` word of [`EvalHeader`] and [`RecipesHeader`].
pub mod eval_flags {
    /// The request is the publish gate: score on held-out data.
    pub const GATE: u32 = 1;
    /// Every bit this revision knows.
    pub const KNOWN: u32 = GATE;

    /// The flags of an evaluation that is (`true`) or is not the gate.
    pub fn of_gate(gate: bool) -> u32 {
        if gate { GATE } else { 0 }
    }
}

/// Checks a request's `flags` word: unknown bits are refused.
fn check_flags(flags: u32) -> Result<(), DecodeError> {
    if flags & !eval_flags::KNOWN != 0 {
        return Err(DecodeError::Field {
            field: "flags (unknown bits)",
            value: flags.into(),
        });
    }
    Ok(())
}

/// Largest batch or candidate count accepted in one request.
pub const MAX_BATCH: u32 = 1 << 16;

/// `NEURAL_EXEC` request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecHeader {
    /// Number of input rows.
    pub batch: u32,
    /// Values per input row (must equal the network's input size).
    pub inputs: u32,
}

/// `EVAL` request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalHeader {
    /// Number of candidate vectors that follow.
    pub candidates: u32,
    /// Parameters per candidate (must equal the model's parameter count).
    pub params: u32,
    /// Task seed: episode `i` of CartPole starts from `seed + i`.
    pub seed: u64,
    /// Episodes (CartPole) per candidate; 0 means the task's default.
    pub episodes: u32,
    /// [`eval_flags`]: [`eval_flags::GATE`] for the publish gate.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u64,
}

impl ExecHeader {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Writes the header followed by `inputs` into `out` (exactly `SIZE + 4 * inputs.len()` bytes).
    pub fn encode(&self, inputs: &[f32], out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.batch.to_le_bytes());
        out[4..8].copy_from_slice(&self.inputs.to_le_bytes());
        out[8..16].fill(0);
        write_f32s(inputs, &mut out[Self::SIZE..]);
    }

    /// Parses an untrusted request; returns the header and its f32 body.
    pub fn decode(bytes: &[u8]) -> Result<(ExecHeader, Vec<f32>), DecodeError> {
        let head = bytes.get(..Self::SIZE).ok_or(DecodeError::Length {
            got: bytes.len(),
            want: Self::SIZE,
        })?;
        let h = ExecHeader {
            batch: u32_at(head, 0),
            inputs: u32_at(head, 4),
        };
        if h.batch == 0 || h.batch > MAX_BATCH {
            return Err(DecodeError::Field {
                field: "batch",
                value: h.batch.into(),
            });
        }
        let want = Self::SIZE + 4 * h.batch as usize * h.inputs as usize;
        if bytes.len() != want {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want,
            });
        }
        Ok((h, read_f32s(&bytes[Self::SIZE..])))
    }
}

impl EvalHeader {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Total request size for this header.
    pub fn request_len(&self) -> usize {
        Self::SIZE + 4 * self.candidates as usize * self.params as usize
    }

    /// Writes the header into the first [`Self::SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.candidates.to_le_bytes());
        out[4..8].copy_from_slice(&self.params.to_le_bytes());
        out[8..16].copy_from_slice(&self.seed.to_le_bytes());
        out[16..20].copy_from_slice(&self.episodes.to_le_bytes());
        out[20..24].copy_from_slice(&self.flags.to_le_bytes());
        out[24..32].copy_from_slice(&self.reserved.to_le_bytes());
    }

    /// Parses an untrusted request header and checks the body length.
    pub fn decode(bytes: &[u8]) -> Result<EvalHeader, DecodeError> {
        let head = bytes.get(..Self::SIZE).ok_or(DecodeError::Length {
            got: bytes.len(),
            want: Self::SIZE,
        })?;
        let h = EvalHeader {
            candidates: u32_at(head, 0),
            params: u32_at(head, 4),
            seed: u64_at(head, 8),
            episodes: u32_at(head, 16),
            flags: u32_at(head, 20),
            reserved: u64_at(head, 24),
        };
        if h.candidates == 0 || h.candidates > MAX_BATCH {
            return Err(DecodeError::Field {
                field: "candidates",
                value: h.candidates.into(),
            });
        }
        check_flags(h.flags)?;
        let want = h.request_len();
        if bytes.len() != want {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want,
            });
        }
        Ok(h)
    }
}

/// Bytes of one encoded recipe in an `EVAL_RECIPES` request (the length of
/// `evod_evolve::Recipe::to_bytes`).
pub const RECIPE_BYTES: usize = 22;

/// Longest base-file path accepted in an `EVAL_RECIPES` request.
pub const MAX_BASE_PATH: u32 = 4096;

/// `EVAL_RECIPES` request header (48 bytes, little-endian): candidates
/// (u32), params (u32), seed (u64), episodes (u32), path_len (u32), base
/// (u64), flags (u32, [`eval_flags`]; zero in revision 1), 12 reserved
/// zero bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipesHeader {
    /// Number of recipes that follow the path.
    pub candidates: u32,
    /// Parameters of the base (must equal the model's parameter count).
    pub params: u32,
    /// Task seed, as in [`EvalHeader::seed`].
    pub seed: u64,
    /// Episodes per candidate; 0 means the task's default.
    pub episodes: u32,
    /// Bytes of the base file's path that follow the header.
    pub path_len: u32,
    /// Checksum of the base parameters (`evod_evolve::recipe::checksum`).
    pub base: u64,
    /// [`eval_flags`]: [`eval_flags::GATE`] for the publish gate.
    pub flags: u32,
}

impl RecipesHeader {
    /// Encoded size.
    pub const SIZE: usize = 48;

    /// Total request size for this header.
    pub fn request_len(&self) -> usize {
        Self::SIZE + self.path_len as usize + RECIPE_BYTES * self.candidates as usize
    }

    /// Writes the header, `path` and the `recipes` (each [`RECIPE_BYTES`]
    /// long, concatenated) into `out`, exactly [`Self::request_len`] bytes.
    pub fn encode(&self, path: &[u8], recipes: &[u8], out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.candidates.to_le_bytes());
        out[4..8].copy_from_slice(&self.params.to_le_bytes());
        out[8..16].copy_from_slice(&self.seed.to_le_bytes());
        out[16..20].copy_from_slice(&self.episodes.to_le_bytes());
        out[20..24].copy_from_slice(&self.path_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.base.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..48].fill(0);
        let at = Self::SIZE + path.len();
        out[Self::SIZE..at].copy_from_slice(path);
        out[at..at + recipes.len()].copy_from_slice(recipes);
    }

    /// Parses an untrusted request: the header, the base path and the
    /// recipes' bytes. Counts and lengths are checked before anything is
    /// sized from them; the path must be UTF-8.
    pub fn decode(bytes: &[u8]) -> Result<(RecipesHeader, &str, &[u8]), DecodeError> {
        let head = bytes.get(..Self::SIZE).ok_or(DecodeError::Length {
            got: bytes.len(),
            want: Self::SIZE,
        })?;
        let h = RecipesHeader {
            candidates: u32_at(head, 0),
            params: u32_at(head, 4),
            seed: u64_at(head, 8),
            episodes: u32_at(head, 16),
            path_len: u32_at(head, 20),
            base: u64_at(head, 24),
            flags: u32_at(head, 32),
        };
        check_flags(h.flags)?;
        if h.candidates == 0 || h.candidates > MAX_BATCH {
            return Err(DecodeError::Field {
                field: "candidates",
                value: h.candidates.into(),
            });
        }
        if h.path_len == 0 || h.path_len > MAX_BASE_PATH {
            return Err(DecodeError::Field {
                field: "path_len",
                value: h.path_len.into(),
            });
        }
        let want = h.request_len();
        if bytes.len() != want {
            return Err(DecodeError::Length {
                got: bytes.len(),
                want,
            });
        }
        let end = Self::SIZE + h.path_len as usize;
        let path =
            std::str::from_utf8(&bytes[Self::SIZE..end]).map_err(|e| DecodeError::Field {
                field: "path (not UTF-8)",
                value: e.valid_up_to() as u64,
            })?;
        Ok((h, path, &bytes[end..]))
    }
}

/// Writes `values` as little-endian f32 into `out` (which must be `4 * values.len()` long).
pub fn write_f32s(values: &[f32], out: &mut [u8]) {
    for (chunk, v) in out.chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// Reads little-endian f32 values; a trailing partial value is ignored.
pub fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Writes `values` as little-endian f64 into `out`.
pub fn write_f64s(values: &[f64], out: &mut [u8]) {
    for (chunk, v) in out.chunks_exact_mut(8).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// Reads exactly `n` little-endian f64 values from an untrusted reply.
pub fn read_f64s(bytes: &[u8], n: usize) -> Result<Vec<f64>, DecodeError> {
    if bytes.len() != 8 * n {
        return Err(DecodeError::Length {
            got: bytes.len(),
            want: 8 * n,
        });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
        .collect())
}

/// Encodes a small structured body with bincode's standard configuration.
pub fn to_bincode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("bincode encoding of an in-memory value cannot fail")
}

/// Decodes an untrusted bincode body; trailing bytes are an error.
pub fn from_bincode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, DecodeError> {
    let config = bincode::config::standard().with_limit::<{ 1 << 20 }>();
    let (value, used) = bincode::serde::decode_from_slice(bytes, config)
        .map_err(|e| DecodeError::Bincode(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Length {
            got: bytes.len(),
            want: used,
        });
    }
    Ok(value)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Sends one request on `client` and waits for the reply to that request
/// (see [`receive_id`]).
pub fn exchange(
    client: &mut evod_ring::Client<'_>,
    opcode: u32,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
    deadline: std::time::Instant,
) -> Result<(i32, Vec<u8>), evod_ring::RingError> {
    let id = client.send(opcode, 0, len, fill)?;
    receive_id(client, id, deadline)
}

/// Receives replies on `client` until the one to request `id`, and returns
/// its status and payload: a late reply to an earlier request that was given
/// up on (a timeout, a batch abandoned on an error, a fault or `SHUTDOWN`
/// sent without waiting) is dropped, never taken for this one. The payload
/// is copied out of the shared segment before anything decodes it, so a
/// worker rewriting it meanwhile cannot change what is checked.
pub fn receive_id(
    client: &mut evod_ring::Client<'_>,
    id: u64,
    deadline: std::time::Instant,
) -> Result<(i32, Vec<u8>), evod_ring::RingError> {
    loop {
        let reply = client.recv(deadline)?;
        if reply.request_id() == id {
            return Ok((reply.status(), reply.payload.to_vec()));
        }
        tracing::debug!(
            expected = id,
            got = reply.request_id(),
            "dropping a late reply to an abandoned request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both evaluation opcodes acquit a dead worker (the supervisor's blame
    /// rule); no other opcode does. Regression: `EVAL_RECIPES` (ES) was
    /// counted against the live model.
    #[test]
    fn both_evaluation_opcodes_and_only_they_are_evaluations() {
        assert!(op::is_evaluation(op::EVAL));
        assert!(op::is_evaluation(op::EVAL_RECIPES));
        for other in [op::PING, op::STATS, op::LOAD, op::NEURAL_EXEC, op::SHUTDOWN] {
            assert!(!op::is_evaluation(other), "{}", op::name(other));
        }
    }

    #[test]
    fn eval_header_round_trips_and_rejects_bad_lengths() {
        let h = EvalHeader {
            candidates: 2,
            params: 3,
            seed: 7,
            episodes: 5,
            flags: 0,
            reserved: 0,
        };
        let mut buf = vec![0u8; h.request_len()];
        h.encode(&mut buf);
        assert_eq!(EvalHeader::decode(&buf).unwrap(), h);
        assert!(matches!(
            EvalHeader::decode(&buf[..buf.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        buf[0..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            EvalHeader::decode(&buf),
            Err(DecodeError::Field {
                field: "candidates",
                ..
            })
        ));
    }

    #[test]
    fn recipes_header_round_trips_and_refuses_bad_counts_before_allocating() {
        let h = RecipesHeader {
            candidates: 2,
            params: 1000,
            seed: 9,
            episodes: 3,
            path_len: 5,
            base: 0xfeed,
            flags: 0,
        };
        let recipes = [7u8; 2 * RECIPE_BYTES];
        let mut buf = vec![0u8; h.request_len()];
        h.encode(b"/a/b1", &recipes, &mut buf);
        let (got, path, body) = RecipesHeader::decode(&buf).unwrap();
        assert_eq!((got, path, body), (h, "/a/b1", &recipes[..]));
        assert!(matches!(
            RecipesHeader::decode(&buf[..buf.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RecipesHeader::decode(&bad),
            Err(DecodeError::Field {
                field: "candidates",
                ..
            })
        ));
        let mut bad = buf.clone();
        bad[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RecipesHeader::decode(&bad),
            Err(DecodeError::Field {
                field: "path_len",
                ..
            })
        ));
        let mut bad = buf.clone();
        bad[RecipesHeader::SIZE] = 0xff;
        assert!(RecipesHeader::decode(&bad).is_err());
        assert!(RecipesHeader::decode(&buf[..10]).is_err());
    }

    /// Revision 2: the gate bit travels in both headers, a revision-1
    /// request (zero there) reads as training, and an unknown bit is
    /// refused by name.
    #[test]
    fn the_gate_flag_round_trips_and_unknown_flags_are_refused() {
        let e = EvalHeader {
            candidates: 1,
            params: 2,
            seed: 3,
            episodes: 0,
            flags: eval_flags::GATE,
            reserved: 0,
        };
        let mut buf = vec![0u8; e.request_len()];
        e.encode(&mut buf);
        assert_eq!(EvalHeader::decode(&buf).unwrap().flags, eval_flags::GATE);
        buf[20..24].copy_from_slice(&6u32.to_le_bytes());
        assert!(matches!(
            EvalHeader::decode(&buf),
            Err(DecodeError::Field { field, value: 6 }) if field.starts_with("flags")
        ));
        let r = RecipesHeader {
            candidates: 1,
            params: 10,
            seed: 1,
            episodes: 0,
            path_len: 2,
            base: 1,
            flags: eval_flags::GATE,
        };
        let mut buf = vec![0u8; r.request_len()];
        r.encode(b"/b", &[1u8; RECIPE_BYTES], &mut buf);
        assert_eq!(
            RecipesHeader::decode(&buf).unwrap().0.flags,
            eval_flags::GATE
        );
        buf[32..36].fill(0);
        assert_eq!(RecipesHeader::decode(&buf).unwrap().0.flags, 0);
        buf[32..36].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        assert!(matches!(
            RecipesHeader::decode(&buf),
            Err(DecodeError::Field { field, .. }) if field.starts_with("flags")
        ));
        assert_eq!(eval_flags::of_gate(true), eval_flags::GATE);
        assert_eq!(eval_flags::of_gate(false), 0);
    }

    #[test]
    fn exec_header_round_trips() {
        let h = ExecHeader {
            batch: 2,
            inputs: 2,
        };
        let xs = [0.5f32, -1.0, 2.0, 3.5];
        let mut buf = vec![0u8; ExecHeader::SIZE + 16];
        h.encode(&xs, &mut buf);
        let (got, values) = ExecHeader::decode(&buf).unwrap();
        assert_eq!(got, h);
        assert_eq!(values, xs);
        // A hostile batch size that would overflow is refused, not allocated.
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ExecHeader::decode(&buf).is_err());
    }

    #[test]
    fn bincode_bodies_reject_garbage() {
        let info = WorkerInfo {
            pid: 7,
            generation: Some(3),
            task: "cartpole".into(),
            ..Default::default()
        };
        let bytes = to_bincode(&info);
        assert_eq!(from_bincode::<WorkerInfo>(&bytes).unwrap(), info);
        assert!(from_bincode::<WorkerInfo>(&bytes[..bytes.len() - 1]).is_err());
        assert!(from_bincode::<LoadRequest>(&[0xff; 64]).is_err());
    }
}
