//! `evod inspect FILE [--json]`: prints a GGUF file's header, metadata (file
//! order) and tensors. Text mode shortens long arrays; `--json` prints
//! everything, machine-readable. A malformed file is a one-line error and
//! exit code 3 (`exit::BAD_INPUT`, through `evod_gguf::GgufError`), and so
//! is a path that is not a regular file (FIFO, folder, device: refused at
//! open, a FIFO never blocks) and a file that shrinks while it is read.
//!
//! Reads with [`GgufReader`] (`pread`), never a memory map: a file
//! truncated or rewritten in place under `inspect` is a clean error, not a
//! SIGBUS.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use evod_gguf::{GgufReader, Value};
use serde_json::{Map, Value as Json, json};

/// Array elements shown in text mode before the rest is elided.
const TEXT_ARRAY_ITEMS: usize = 8;
/// Longest string shown whole in text mode.
const TEXT_STRING_CHARS: usize = 120;

/// Arguments of `evod inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print complete, machine-readable JSON (all values, full arrays).
    #[arg(long)]
    pub json: bool,
}

/// Runs `evod inspect`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Only reads a file the user names: following a link is safe here (the
    // daemon's model path is opened without following).
    let file = GgufReader::open_following(&args.file)?;
    let checksum = file.checksum()?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if args.json {
        serde_json::to_writer_pretty(&mut out, &to_json(&file, checksum))
            .context("writing json")?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &file, checksum)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn write_text(out: &mut impl Write, file: &GgufReader, checksum: u64) -> io::Result<()> {
    writeln!(out, "file: {}", file.path().display())?;
    writeln!(out, "version: {}", file.version())?;
    writeln!(out, "alignment: {}", file.alignment())?;
    writeln!(out, "metadata keys: {}", file.metadata().len())?;
    writeln!(out, "tensors: {}", file.tensors().len())?;
    writeln!(out, "data offset: {}", file.data_offset())?;
    writeln!(out, "file size: {}", file.file_len())?;
    writeln!(out, "checksum (xxh3-64 of tensor data): {checksum:016x}")?;
    writeln!(out)?;
    writeln!(out, "metadata:")?;
    for (key, value) in file.metadata() {
        let mut s = String::new();
        text_value(&mut s, value, true);
        writeln!(out, "  {key}: {} = {s}", type_label(value))?;
    }
    writeln!(out)?;
    writeln!(out, "tensors:")?;
    let width = file
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    if !file.tensors().is_empty() {
        writeln!(
            out,
            "  {:width$}  {:7}  {:24}  {:>12}  {:>12}",
            "name", "type", "shape (ggml order)", "offset", "size"
        )?;
    }
    for t in file.tensors() {
        let shape = format!("{:?}", t.dims);
        writeln!(
            out,
            "  {:width$}  {:7}  {:24}  {:>12}  {:>12}",
            t.name,
            t.ttype.name(),
            shape,
            t.offset,
            t.size
        )?;
    }
    Ok(())
}

fn type_label(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("array[{}; {}]", a.elem_type, a.values.len()),
        other => other.value_type().to_string(),
    }
}

fn text_value(s: &mut String, v: &Value, shorten: bool) {
    use std::fmt::Write as _;
    let _ = match v {
        Value::U8(x) => write!(s, "{x}"),
        Value::I8(x) => write!(s, "{x}"),
        Value::U16(x) => write!(s, "{x}"),
        Value::I16(x) => write!(s, "{x}"),
        Value::U32(x) => write!(s, "{x}"),
        Value::I32(x) => write!(s, "{x}"),
        Value::U64(x) => write!(s, "{x}"),
        Value::I64(x) => write!(s, "{x}"),
        Value::F32(x) => write!(s, "{x}"),
        Value::F64(x) => write!(s, "{x}"),
        Value::Bool(x) => write!(s, "{x}"),
        Value::String(x) => {
            if shorten && x.chars().count() > TEXT_STRING_CHARS {
                let head: String = x.chars().take(TEXT_STRING_CHARS).collect();
                write!(s, "{head:?}… ({} bytes)", x.len())
            } else {
                write!(s, "{x:?}")
            }
        }
        Value::Array(a) => {
            let n = a.values.len();
            let shown = if shorten { n.min(TEXT_ARRAY_ITEMS) } else { n };
            s.push('[');
            for (i, x) in a.values[..shown].iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                text_value(s, x, shorten);
            }
            if shown < n {
                let _ = write!(s, ", … {} more", n - shown);
            }
            s.push(']');
            Ok(())
        }
    };
}

fn to_json(file: &GgufReader, checksum: u64) -> Json {
    let metadata: Vec<Json> = file
        .metadata()
        .iter()
        .map(|(k, v)| json!({ "key": k, "type": v.value_type().name(), "value": json_value(v) }))
        .collect();
    let tensors: Vec<Json> = file
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": t.ttype.name(),
                "type_id": t.ttype.id(),
                "dims": t.dims,
                "n_elements": t.n_elements(),
                "offset": t.offset,
                "absolute_offset": file.data_offset() + t.offset,
                "size": t.size,
            })
        })
        .collect();
    json!({
        "file": file.path().display().to_string(),
        "version": file.version(),
        "alignment": file.alignment(),
        "metadata_count": file.metadata().len(),
        "tensor_count": file.tensors().len(),
        "data_offset": file.data_offset(),
        "file_size": file.file_len(),
        "checksum": format!("{checksum:016x}"),
        "metadata": metadata,
        "tensors": tensors,
    })
}

/// Numbers as JSON numbers (64-bit integers exact); non-finite floats as
/// the strings "nan", "inf", "-inf"; arrays as `{"elem_type", "values"}`.
fn json_value(v: &Value) -> Json {
    let float = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else if x.is_nan() {
            json!("nan")
        } else if x > 0.0 {
            json!("inf")
        } else {
            json!("-inf")
        }
    };
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => float(f64::from(*x)),
        Value::F64(x) => float(*x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => {
            let mut m = Map::new();
            m.insert("elem_type".into(), json!(a.elem_type.name()));
            m.insert(
                "values".into(),
                Json::Array(a.values.iter().map(json_value).collect()),
            );
            Json::Object(m)
        }
    }
}
