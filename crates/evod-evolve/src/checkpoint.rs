//! Checkpoints: the whole state of an [`crate::Evolver`] in one file, saved
//! atomically, loaded with typed errors for every way the file can be bad.
//!
//! File format (version [`CHECKPOINT_VERSION`]), little-endian:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `EVODCKPT` |
//! | 8..12 | format version (u32) |
//! | 12..16 | reserved, 0 |
//! | 16..24 | payload length in bytes (u64) |
//! | 24..32 | xxh3-64 of the payload (u64) |
//! | 32.. | payload: [`Checkpoint`] encoded by bincode 2.0.1 (serde, standard configuration) |
//!
//! The generator is rand_chacha's `ChaCha8Rng`, saved as its seed, stream
//! and word position ([`RngState`]), so a resumed run draws exactly the
//! numbers the uninterrupted run would have drawn.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::EvolverConfig;
use crate::error::EvolveError;
use crate::es::EsState;
use crate::evolver::{EvolveStats, Scored};
use crate::ga::GaState;

/// The checkpoint format version this build writes and reads.
pub const CHECKPOINT_VERSION: u32 = 2;
/// The first eight bytes of every checkpoint file.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"EVODCKPT";
const HEADER_LEN: usize = 32;
/// Largest payload accepted (and the bincode decode limit).
const MAX_PAYLOAD: usize = 1 << 30;

/// State of the `ChaCha8Rng` generator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte key.
    pub seed: [u8; 32],
    /// The stream (nonce).
    pub stream: u64,
    /// Position in the stream, in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    /// The state of `rng`.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    /// A generator in exactly this state.
    pub fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

/// Strategy-specific state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StrategyState {
    /// Genetic algorithm: the evaluated population with per-tensor σ.
    Ga(GaState),
    /// OpenAI-ES: mean, σ, Adam moments and step count.
    Es(EsState),
}

/// Everything an [`crate::Evolver`] needs to continue exactly where it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The configuration of the run (seed included).
    pub config: EvolverConfig,
    /// `(name, shape)` of every tensor of the parameter vector.
    pub tensors: Vec<(String, Vec<u64>)>,
    /// The next generation to run.
    pub generation: u64,
    /// The strategy's generator.
    pub rng: RngState,
    /// The strategy's state.
    pub strategy: StrategyState,
    /// Best of the last generation.
    pub best: Scored,
    /// Last published parameters and gate fitness.
    pub published: Option<Scored>,
    /// Counters.
    pub stats: EvolveStats,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EvolveError + '_ {
    move |source| EvolveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes a checkpoint into the file format above.
pub fn encode_checkpoint(c: &Checkpoint) -> Result<Vec<u8>, EvolveError> {
    let payload = bincode::serde::encode_to_vec(c, bincode::config::standard())
        .map_err(|e| EvolveError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes the file format above; `path` only names the file in errors.
pub fn decode_checkpoint(path: &Path, bytes: &[u8]) -> Result<Checkpoint, EvolveError> {
    let p = || path.to_path_buf();
    let have = bytes.len().min(CHECKPOINT_MAGIC.len());
    if bytes[..have] != CHECKPOINT_MAGIC[..have] {
        return Err(EvolveError::BadMagic { path: p() });
    }
    if bytes.len() < HEADER_LEN {
        return Err(EvolveError::Truncated {
            path: p(),
            len: bytes.len() as u64,
            expected: HEADER_LEN as u64,
        });
    }
    let u32_at =
        |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4-byte slice"));
    let u64_at =
        |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8-byte slice"));
    let version = u32_at(8);
    if version != CHECKPOINT_VERSION {
        return Err(EvolveError::UnsupportedVersion {
            path: p(),
            found: version,
            supported: CHECKPOINT_VERSION,
        });
    }
    let payload_len = u64_at(16);
    let expected = (HEADER_LEN as u64).saturating_add(payload_len);
    if (bytes.len() as u64) < expected {
        return Err(EvolveError::Truncated {
            path: p(),
            len: bytes.len() as u64,
            expected,
        });
    }
    if (bytes.len() as u64) > expected {
        return Err(EvolveError::Decode {
            path: p(),
            reason: format!("{} bytes after the payload", bytes.len() as u64 - expected),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if xxhash_rust::xxh3::xxh3_64(payload) != u64_at(24) {
        return Err(EvolveError::Checksum { path: p() });
    }
    let config = bincode::config::standard().with_limit::<MAX_PAYLOAD>();
    let (c, used): (Checkpoint, usize) = bincode::serde::decode_from_slice(payload, config)
        .map_err(|e| EvolveError::Decode {
            path: p(),
            reason: e.to_string(),
        })?;
    if used != payload.len() {
        return Err(EvolveError::Decode {
            path: p(),
            reason: format!("{} bytes left undecoded", payload.len() - used),
        });
    }
    Ok(c)
}

/// Writes `c` to `path` atomically: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory. `path` is always
/// either the old complete checkpoint or the new one.
pub fn save_checkpoint(path: &Path, c: &Checkpoint) -> Result<(), EvolveError> {
    let bytes = encode_checkpoint(c)?;
    let name = path
        .file_name()
        .ok_or_else(|| EvolveError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads and decodes a checkpoint file, with a typed error for a missing,
/// truncated, garbage, corrupt or future-version file.
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint, EvolveError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > (HEADER_LEN + MAX_PAYLOAD) as u64 {
        return Err(EvolveError::Decode {
            path: path.to_path_buf(),
            reason: format!("{len} bytes is too large"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut bytes).map_err(io_err(path))?;
    decode_checkpoint(path, &bytes)
}
