//! `evod surgeon`: mutate, merge and diff any GGUF file, quantized or not
//! (user's guide: `docs/surgeon.md`).
//!
//! - `mutate IN -o OUT --sigma S --seed N [--tensors GLOB]… [--relative]
//!   [--skip-unsupported]` (`mutate.rs`)
//! - `merge A B -o OUT --method linear|slerp --t T [--tensors GLOB]…`
//!   (`merge.rs`)
//! - `diff A B [--json]` (`diff.rs`)
//!
//! Every selected tensor goes through `evod_gguf::quant` (dequantize, f32
//! arithmetic in `math.rs`, quantize back to its own type); every other
//! tensor and every metadata key is copied byte for byte, in file order,
//! with the input's alignment. A tensor whose values an operation leaves
//! unchanged (σ = 0, t = 0 or 1, equal bytes in both parents) is copied,
//! never re-quantized, so the K-quants do not drift.
//!
//! Inputs are read with `GgufReader` (`pread`, one tensor at a time), never
//! mapped: a file truncated under the surgeon is a clean error, and memory
//! holds one tensor (bytes, f32 values, new bytes) at a time, never the
//! model. Outputs go through `evod_gguf::publish` (temp file, fsync,
//! rename), so OUT may be IN.
//!
//! Errors are [`SurgeonError`], each naming the file and tensor; exit codes:
//! bad arguments or a pattern 2, malformed or mismatched input 3, a failed
//! write 6; `diff` exits 0 identical, 1 different.

mod diff;
mod glob;
mod math;
mod merge;
mod mutate;

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use evod_gguf::{
    GgufError, GgufReader, PublishOptions, PublishReport, QuantError, TensorInfo, TensorSpec,
    TensorType, Value, publish,
};

use crate::exit;

/// Prefix of the provenance keys the surgeon writes (and replaces).
pub const PROVENANCE_PREFIX: &str = "evod.surgeon.";

/// Arguments of `evod surgeon`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Add seeded Gaussian-like noise to selected tensors, keeping their types.
    Mutate(mutate::Args),
    /// Interpolate two models of one architecture (linear or slerp).
    Merge(merge::Args),
    /// Compare two GGUF files: metadata, tensor list, values (exit 1 if they differ).
    Diff(diff::Args),
}

/// Runs `evod surgeon`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let result = match args.command {
        Command::Mutate(a) => mutate::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Diff(a) => diff::run(a),
    };
    result.map_err(|e| match e {
        // `main` turns a closed stdout into success; it must see the cause.
        SurgeonError::Stdout(io) if io.kind() == io::ErrorKind::BrokenPipe => io.into(),
        e => {
            let code = e.code();
            exit::with_code(code, e)
        }
    })
}

/// Why a surgeon command failed; each names the file, tensor or argument.
#[derive(Debug, thiserror::Error)]
pub enum SurgeonError {
    /// A `--tensors` pattern that cannot be used.
    #[error("--tensors {glob:?}: {problem}")]
    BadGlob {
        /// The pattern.
        glob: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The patterns select no tensor of the file (most likely a typo).
    #[error("--tensors {globs}: matches no tensor in {path}", path = path.display())]
    NoMatch {
        /// The patterns, joined.
        globs: String,
        /// The file.
        path: PathBuf,
    },
    /// The file has no tensors to work on (a vocabulary-only GGUF).
    #[error("{path}: the file has no tensors", path = path.display())]
    NoTensors {
        /// The file.
        path: PathBuf,
    },
    /// A numeric argument out of its range.
    #[error("{flag} {value}: {problem}")]
    BadArg {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A selected tensor of a type without a codec.
    #[error(
        "{path}: tensor {tensor}: type {ttype} has no codec (evod converts F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); leave it out of --tensors or pass --skip-unsupported to copy it unchanged",
        path = path.display()
    )]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its type.
        ttype: TensorType,
    },
    /// A tensor's values could not be converted (NaN into a block type, a
    /// block too large for its type after the change, ...).
    #[error("{path}: tensor {tensor}: {source}", path = path.display())]
    Quant {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The codec's error.
        #[source]
        source: QuantError,
    },
    /// `--relative` on a tensor whose RMS is not finite.
    #[error(
        "{path}: tensor {tensor}: its root mean square is {rms} (the tensor holds NaN or infinity); --relative cannot scale by it",
        path = path.display()
    )]
    NonFiniteRms {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The RMS found.
        rms: f64,
    },
    /// Two models that cannot be merged.
    #[error("cannot merge {a} and {b}: {problem}", a = a.display(), b = b.display())]
    Mismatch {
        /// Model A.
        a: PathBuf,
        /// Model B.
        b: PathBuf,
        /// The first difference found, by name.
        problem: String,
    },
    /// An input that cannot be read or is not a valid GGUF file.
    #[error(transparent)]
    Read(GgufError),
    /// The output could not be written.
    #[error(transparent)]
    Write(GgufError),
    /// The report could not be printed.
    #[error("writing to stdout: {0}")]
    Stdout(#[source] io::Error),
}

impl SurgeonError {
    /// The process exit code for this error (`exit.rs`).
    pub fn code(&self) -> u8 {
        match self {
            SurgeonError::BadGlob { .. }
            | SurgeonError::NoMatch { .. }
            | SurgeonError::BadArg { .. } => exit::USAGE,
            SurgeonError::Unsupported { .. }
            | SurgeonError::Quant { .. }
            | SurgeonError::NonFiniteRms { .. }
            | SurgeonError::NoTensors { .. }
            | SurgeonError::Mismatch { .. }
            | SurgeonError::Read(_) => exit::BAD_INPUT,
            SurgeonError::Write(_) | SurgeonError::Stdout(_) => exit::IO,
        }
    }
}

/// Opens an input for reading (`pread`, following a final symlink: the
/// user names it).
fn open_input(path: &Path) -> Result<GgufReader, SurgeonError> {
    GgufReader::open_following(path).map_err(SurgeonError::Read)
}

/// `input`'s metadata without earlier surgeon provenance, then `provenance`
/// (each key prefixed with [`PROVENANCE_PREFIX`]).
fn with_provenance(input: &GgufReader, provenance: Vec<(&str, Value)>) -> Vec<(String, Value)> {
    let mut metadata: Vec<(String, Value)> = input
        .metadata()
        .iter()
        .filter(|(k, _)| !k.starts_with(PROVENANCE_PREFIX))
        .cloned()
        .collect();
    metadata.extend(
        provenance
            .into_iter()
            .map(|(k, v)| (format!("{PROVENANCE_PREFIX}{k}"), v)),
    );
    metadata
}

/// A checksum as the metadata stores it: 16 hex digits.
fn checksum_value(sum: u64) -> Value {
    Value::String(format!("{sum:016x}"))
}

/// The patterns as a string array value.
fn patterns_value(patterns: Vec<String>) -> Value {
    Value::Array(evod_gguf::Array {
        elem_type: evod_gguf::ValueType::String,
        values: patterns.into_iter().map(Value::String).collect(),
    })
}

/// Publishes `out` with `metadata` and `like`'s tensors (names, dims,
/// types, order, alignment), each tensor's bytes from `tensor(index,
/// info)`: streamed one tensor at a time. The first error of `tensor` is
/// returned as it is (the temporary file is removed and `out` untouched).
fn write_output(
    out: &Path,
    like: &GgufReader,
    metadata: &[(String, Value)],
    mut tensor: impl FnMut(usize, &TensorInfo) -> Result<Vec<u8>, SurgeonError>,
) -> Result<PublishReport, SurgeonError> {
    let specs: Vec<TensorSpec> = like.tensors().iter().map(TensorSpec::from).collect();
    let opts = PublishOptions {
        alignment: like.alignment(),
        ..PublishOptions::default()
    };
    let mut failed = None;
    let result = publish(
        out,
        metadata,
        &specs,
        |i, w| match tensor(i, &like.tensors()[i]) {
            Ok(bytes) => w.write_all(&bytes),
            Err(e) => {
                failed = Some(e);
                Err(io::Error::other("tensor failed"))
            }
        },
        &opts,
    );
    match (result, failed) {
        (_, Some(e)) => Err(e),
        (Ok(report), None) => Ok(report),
        (Err(e), None) => Err(SurgeonError::Write(e)),
    }
}

/// Which of `file`'s tensors `selection` picks; [`SurgeonError::NoMatch`]
/// if none.
fn select(file: &GgufReader, selection: &glob::Selection) -> Result<Vec<bool>, SurgeonError> {
    if file.tensors().is_empty() {
        return Err(SurgeonError::NoTensors {
            path: file.path().to_owned(),
        });
    }
    let picked: Vec<bool> = file
        .tensors()
        .iter()
        .map(|t| selection.selects(&t.name))
        .collect();
    if !picked.contains(&true) {
        return Err(SurgeonError::NoMatch {
            globs: selection.patterns().join(" "),
            path: file.path().to_owned(),
        });
    }
    Ok(picked)
}

/// A codec error about `tensor` of `path`.
fn quant_error(path: &Path, tensor: &str) -> impl FnOnce(QuantError) -> SurgeonError {
    let (path, tensor) = (path.to_owned(), tensor.to_owned());
    move |source| SurgeonError::Quant {
        path,
        tensor,
        source,
    }
}

/// Prints the one-line result of a command that wrote `out`.
fn print_written(
    out: &Path,
    report: &PublishReport,
    changed: usize,
    copied: usize,
) -> Result<(), SurgeonError> {
    let mut stdout = io::stdout().lock();
    writeln!(
        stdout,
        "wrote {} ({} bytes, checksum {:016x}): {changed} tensors changed, {copied} copied",
        out.display(),
        report.bytes,
        report.checksum
    )
    .map_err(SurgeonError::Stdout)
}
