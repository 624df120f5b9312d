//! The `perplexity` task's own metadata: which base model a control vector
//! steers, which corpus it is scored on, how the corpus is split, and the
//! window size. `evod init --task perplexity` writes it ([`PerplexitySpec::
//! metadata`]); the worker and `evod run` read it back
//! ([`PerplexitySpec::from_header`]) and refuse a base model or corpus that
//! changed since ([`PerplexitySpec::check_base`],
//! [`PerplexitySpec::read_corpus`]).
//!
//! The split is by bytes: the corpus's first `heldout_start` bytes train,
//! the rest is held out (the publish gate's). The cut is on a line or word
//! boundary ([`split_point`]). Each part is tokenized on its own and cut
//! into windows of `window` tokens (a last partial window is dropped); a
//! training evaluation scores `train_windows` of them chosen by the
//! generation's seed ([`train_subset`]; 0 = all), the gate scores every
//! held-out window.

use std::io::Read;
use std::path::{Path, PathBuf};

use evod_gguf::{GgufHeader, Value};

use crate::RuntimeError;

/// Metadata keys of the perplexity task (kept across generations: evod's
/// writer carries over keys it does not own).
pub mod keys {
    /// The base model's path (string, absolute).
    pub const BASE_MODEL: &str = "evod.perplexity.base_model";
    /// xxh3-64 of the whole base model file (u64).
    pub const BASE_CHECKSUM: &str = "evod.perplexity.base_checksum";
    /// The corpus's path (string, absolute).
    pub const CORPUS: &str = "evod.perplexity.corpus";
    /// xxh3-64 of the corpus file (u64).
    pub const CORPUS_CHECKSUM: &str = "evod.perplexity.corpus_checksum";
    /// The corpus's size in bytes (u64).
    pub const CORPUS_BYTES: &str = "evod.perplexity.corpus_bytes";
    /// First byte of the held-out part (u64); the bytes before it train.
    pub const HELDOUT_START: &str = "evod.perplexity.heldout_start_byte";
    /// Tokens per window (u32).
    pub const WINDOW: &str = "evod.perplexity.window";
    /// Training windows scored per evaluation, chosen by the seed (u32;
    /// 0 = all).
    pub const TRAIN_WINDOWS: &str = "evod.perplexity.train_windows";
}

/// Smallest window accepted (tokens).
pub const MIN_WINDOW: u32 = 2;
/// Largest window accepted (tokens).
pub const MAX_WINDOW: u32 = 1 << 16;

/// What a perplexity model says about its base model and corpus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerplexitySpec {
    /// The llama.cpp base model the control vector steers.
    pub base_model: PathBuf,
    /// xxh3-64 of the base model file ([`file_checksum`]).
    pub base_checksum: u64,
    /// The corpus.
    pub corpus: PathBuf,
    /// xxh3-64 of the corpus file.
    pub corpus_checksum: u64,
    /// Corpus size in bytes.
    pub corpus_bytes: u64,
    /// First held-out byte.
    pub heldout_start: u64,
    /// Tokens per window.
    pub window: u32,
    /// Training windows per evaluation (0 = all).
    pub train_windows: u32,
}

/// The corpus, read and checked, split in two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corpus {
    /// The training text.
    pub train: String,
    /// The held-out text.
    pub heldout: String,
}

impl PerplexitySpec {
    /// The metadata keys, in [`keys`] order.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        vec![
            (
                keys::BASE_MODEL.into(),
                Value::String(self.base_model.to_string_lossy().into_owned()),
            ),
            (keys::BASE_CHECKSUM.into(), Value::U64(self.base_checksum)),
            (
                keys::CORPUS.into(),
                Value::String(self.corpus.to_string_lossy().into_owned()),
            ),
            (
                keys::CORPUS_CHECKSUM.into(),
                Value::U64(self.corpus_checksum),
            ),
            (keys::CORPUS_BYTES.into(), Value::U64(self.corpus_bytes)),
            (keys::HELDOUT_START.into(), Value::U64(self.heldout_start)),
            (keys::WINDOW.into(), Value::U32(self.window)),
            (keys::TRAIN_WINDOWS.into(), Value::U32(self.train_windows)),
        ]
    }

    /// Reads the keys of the model at `path` (header `h`).
    pub fn from_header(h: &GgufHeader, path: &Path) -> Result<PerplexitySpec, RuntimeError> {
        let bad = |problem: String| RuntimeError::Model {
            path: path.to_owned(),
            problem,
        };
        let get = |key: &str| h.get(key).ok_or_else(|| bad(format!("missing key {key}")));
        let string = |key: &str| -> Result<String, RuntimeError> {
            get(key)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("key {key} is not a string")))
        };
        let uint = |key: &str| -> Result<u64, RuntimeError> {
            get(key)?
                .as_u64()
                .ok_or_else(|| bad(format!("key {key} is not a non-negative integer")))
        };
        let small = |key: &str| -> Result<u32, RuntimeError> {
            u32::try_from(uint(key)?).map_err(|_| bad(format!("key {key} is out of range")))
        };
        let spec = PerplexitySpec {
            base_model: string(keys::BASE_MODEL)?.into(),
            base_checksum: uint(keys::BASE_CHECKSUM)?,
            corpus: string(keys::CORPUS)?.into(),
            corpus_checksum: uint(keys::CORPUS_CHECKSUM)?,
            corpus_bytes: uint(keys::CORPUS_BYTES)?,
            heldout_start: uint(keys::HELDOUT_START)?,
            window: small(keys::WINDOW)?,
            train_windows: small(keys::TRAIN_WINDOWS)?,
        };
        if !(MIN_WINDOW..=MAX_WINDOW).contains(&spec.window) {
            return Err(bad(format!(
                "key {} is {}, expected {MIN_WINDOW} to {MAX_WINDOW}",
                keys::WINDOW,
                spec.window
            )));
        }
        if spec.heldout_start == 0 || spec.heldout_start >= spec.corpus_bytes {
            return Err(bad(format!(
                "key {} is {}, expected inside the corpus's {} bytes",
                keys::HELDOUT_START,
                spec.heldout_start,
                spec.corpus_bytes
            )));
        }
        Ok(spec)
    }

    /// Checks that the base model is the file `evod init` recorded (its
    /// checksum); a changed or missing file is refused by name.
    pub fn check_base(&self) -> Result<(), RuntimeError> {
        let actual = file_checksum(&self.base_model)?;
        if actual != self.base_checksum {
            return Err(RuntimeError::PerplexityInput {
                path: self.base_model.clone(),
                problem: format!(
                    "the base model changed since evod init (checksum {actual:016x}, the model records {:016x})",
                    self.base_checksum
                ),
            });
        }
        Ok(())
    }

    /// Reads the corpus, checks it is the file `evod init` recorded, and
    /// splits it.
    pub fn read_corpus(&self) -> Result<Corpus, RuntimeError> {
        let bytes = std::fs::read(&self.corpus).map_err(|e| RuntimeError::PerplexityInput {
            path: self.corpus.clone(),
            problem: format!("cannot read the corpus: {e}"),
        })?;
        let actual = xxhash_rust::xxh3::xxh3_64(&bytes);
        if actual != self.corpus_checksum || bytes.len() as u64 != self.corpus_bytes {
            return Err(RuntimeError::PerplexityInput {
                path: self.corpus.clone(),
                problem: format!(
                    "the corpus changed since evod init (checksum {actual:016x}, {} bytes; the model records {:016x}, {} bytes)",
                    bytes.len(),
                    self.corpus_checksum,
                    self.corpus_bytes
                ),
            });
        }
        let text = check_text(&self.corpus, bytes)?;
        let cut = usize::try_from(self.heldout_start).unwrap_or(usize::MAX);
        if !text.is_char_boundary(cut) {
            return Err(RuntimeError::PerplexityInput {
                path: self.corpus.clone(),
                problem: format!("held-out start {cut} is not a character boundary"),
            });
        }
        Ok(Corpus {
            train: text[..cut].to_owned(),
            heldout: text[cut..].to_owned(),
        })
    }
}

/// A corpus's bytes as text: refused (naming `path`) when empty, not UTF-8
/// or only whitespace.
pub fn check_text(path: &Path, bytes: Vec<u8>) -> Result<String, RuntimeError> {
    let bad = |problem: String| RuntimeError::PerplexityInput {
        path: path.to_owned(),
        problem,
    };
    if bytes.is_empty() {
        return Err(bad("the corpus is empty".into()));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        bad(format!(
            "the corpus is not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(bad("the corpus holds only whitespace".into()));
    }
    Ok(text)
}

/// xxh3-64 of the whole file at `path`, streamed.
pub fn file_checksum(path: &Path) -> Result<u64, RuntimeError> {
    let bad = |e: std::io::Error| RuntimeError::PerplexityInput {
        path: path.to_owned(),
        problem: format!("cannot read: {e}"),
    };
    let mut f = std::fs::File::open(path).map_err(bad)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(bad)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.digest())
}

/// Where to cut `text` so that about `heldout` (0..1) of it is held out:
/// the first line break (else whitespace, else character boundary) at or
/// after `(1 − heldout) · len`. `None` when the cut leaves either part
/// empty.
pub fn split_point(text: &str, heldout: f64) -> Option<usize> {
    let len = text.len();
    let target = ((1.0 - heldout) * len as f64).floor() as usize;
    let mut target = target.clamp(1, len.saturating_sub(1).max(1)).min(len);
    while !text.is_char_boundary(target) {
        target += 1;
    }
    let after = |pred: &dyn Fn(char) -> bool| {
        text[target..]
            .char_indices()
            .find(|&(_, c)| pred(c))
            .map(|(i, c)| target + i + c.len_utf8())
    };
    let cut = after(&|c| c == '\n')
        .filter(|&c| c - target <= len / 10)
        .or_else(|| after(&char::is_whitespace))
        .or_else(|| (target..=len).find(|&i| text.is_char_boundary(i)))?;
    (cut > 0 && cut < len && !text[cut..].trim().is_empty()).then_some(cut)
}

/// Full windows of `window` tokens in `n_tokens` tokens.
pub fn windows(n_tokens: usize, window: u32) -> usize {
    n_tokens / window.max(1) as usize
}

/// Which of `n` training windows an evaluation with `seed` scores: all of
/// them when `k` is 0 or at least `n`, else `k` distinct ones in increasing
/// order, chosen by a seeded partial Fisher–Yates (splitmix64). Every
/// candidate of a generation gets the same seed, hence the same windows.
pub fn train_subset(n: usize, k: u32, seed: u64) -> Vec<usize> {
    let k = k as usize;
    if k == 0 || k >= n {
        return (0..n).collect();
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut state = seed;
    for i in 0..k {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let j = i + (z % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut out = idx[..k].to_vec();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_on_a_boundary_and_leaves_both_parts() {
        // A line break within a tenth of the text after the target wins…
        let text = "one two three four five\n".repeat(10);
        let cut = split_point(&text, 0.3).unwrap();
        assert!(text[..cut].ends_with('\n'), "{cut}");
        assert!(!text[cut..].trim().is_empty());
        // … else the next whitespace.
        let text = "one two three\nfour five six\nseven eight nine\nten\n";
        let cut = split_point(text, 0.3).unwrap();
        assert_eq!(&text[cut - 6..cut], "eight ", "{cut}");
        assert_eq!(split_point("x", 0.5), None);
        let utf8 = "ééééééééééé";
        let cut = split_point(utf8, 0.5).unwrap();
        assert!(utf8.is_char_boundary(cut));
    }

    #[test]
    fn the_subset_is_seeded_distinct_and_sorted() {
        assert_eq!(train_subset(5, 0, 1), vec![0, 1, 2, 3, 4]);
        assert_eq!(train_subset(5, 9, 1), vec![0, 1, 2, 3, 4]);
        let a = train_subset(100, 10, 7);
        assert_eq!(a, train_subset(100, 10, 7));
        assert_ne!(a, train_subset(100, 10, 8));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_bad_corpus_is_refused_by_name() {
        let p = Path::new("/c.txt");
        for (bytes, want) in [
            (vec![], "empty"),
            (vec![b'a', 0xff, b'b'], "not UTF-8"),
            (b" \n\t".to_vec(), "whitespace"),
        ] {
            let e = check_text(p, bytes).unwrap_err().to_string();
            assert!(e.contains("/c.txt") && e.contains(want), "{e}");
        }
    }
}
