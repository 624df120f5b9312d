//! `evod surgeon diff A B [--json]`: what differs between two GGUF files.
//!
//! Header (version, alignment), metadata keys added, removed or changed
//! (type or value, floats compared by bits), tensors added or removed,
//! shape or type changes, and for every tensor in both: identical bytes, or
//! the values' distance (dequantized: relative L2, max abs, count of
//! differing values; types without a codec: "bytes differ"). Exit 0 when
//! identical, 1 when different, 2 or more on an error (like `diff`).
//! Tensor data offsets, key order and tensor order are not compared: two
//! files with the same keys and tensors laid out differently are the same
//! model.

use std::collections::HashMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use evod_gguf::{GgufReader, TensorInfo, Value, dequantize, quant};
use serde_json::{Value as Json, json};

use super::{SurgeonError, math};

/// Arguments of `evod surgeon diff`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The first file.
    a: PathBuf,
    /// The second file.
    b: PathBuf,
    /// Print the differences as JSON.
    #[arg(long)]
    json: bool,
}

/// One tensor present in both files whose bytes differ.
struct Changed<'a> {
    a: &'a TensorInfo,
    b: &'a TensorInfo,
    /// The values' distance, when both types have a codec and the shapes agree.
    distance: Option<math::Distance>,
}

/// Everything that differs.
struct Report<'a> {
    header: Vec<(&'static str, u64, u64)>,
    meta_added: Vec<&'a (String, Value)>,
    meta_removed: Vec<&'a (String, Value)>,
    meta_changed: Vec<(&'a (String, Value), &'a Value)>,
    added: Vec<&'a TensorInfo>,
    removed: Vec<&'a TensorInfo>,
    changed: Vec<Changed<'a>>,
    identical_tensors: usize,
}

impl Report<'_> {
    fn identical(&self) -> bool {
        self.header.is_empty()
            && self.meta_added.is_empty()
            && self.meta_removed.is_empty()
            && self.meta_changed.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
    }
}

/// Runs `evod surgeon diff`: exit 0 identical, 1 different.
pub fn run(args: Args) -> Result<ExitCode, SurgeonError> {
    let a = super::open_input(&args.a)?;
    let b = super::open_input(&args.b)?;
    let report = compare(&a, &b)?;
    let mut out = BufWriter::new(io::stdout().lock());
    if args.json {
        serde_json::to_writer_pretty(&mut out, &to_json(&report))
            .map_err(|e| SurgeonError::Stdout(e.into()))?;
        writeln!(out).map_err(SurgeonError::Stdout)?;
    } else {
        write_text(&mut out, &report, &a, &b).map_err(SurgeonError::Stdout)?;
    }
    out.flush().map_err(SurgeonError::Stdout)?;
    Ok(if report.identical() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn compare<'a>(a: &'a GgufReader, b: &'a GgufReader) -> Result<Report<'a>, SurgeonError> {
    let mut header = Vec::new();
    if a.version() != b.version() {
        header.push(("version", u64::from(a.version()), u64::from(b.version())));
    }
    if a.alignment() != b.alignment() {
        header.push(("alignment", a.alignment(), b.alignment()));
    }

    let meta_b: HashMap<&str, &(String, Value)> =
        b.metadata().iter().map(|kv| (kv.0.as_str(), kv)).collect();
    let mut meta_removed = Vec::new();
    let mut meta_changed = Vec::new();
    for kv in a.metadata() {
        match meta_b.get(kv.0.as_str()) {
            None => meta_removed.push(kv),
            Some((_, vb)) if !same_value(&kv.1, vb) => meta_changed.push((kv, vb)),
            Some(_) => {}
        }
    }
    let meta_added = b
        .metadata()
        .iter()
        .filter(|(k, _)| a.get(k).is_none())
        .collect();

    let mut removed = Vec::new();
    let mut changed = Vec::new();
    let mut identical_tensors = 0;
    for ta in a.tensors() {
        let Some(tb) = b.tensor(&ta.name) else {
            removed.push(ta);
            continue;
        };
        let same_layout = ta.dims == tb.dims && ta.ttype == tb.ttype;
        let distance = if ta.dims != tb.dims {
            None
        } else {
            let bytes_a = a.read_tensor(ta).map_err(SurgeonError::Read)?;
            let bytes_b = b.read_tensor(tb).map_err(SurgeonError::Read)?;
            if same_layout && bytes_a == bytes_b {
                identical_tensors += 1;
                continue;
            }
            if quant::has_codec(ta.ttype) && quant::has_codec(tb.ttype) {
                let va = dequantize(ta.ttype, &bytes_a)
                    .map_err(super::quant_error(a.path(), &ta.name))?;
                drop(bytes_a);
                let vb = dequantize(tb.ttype, &bytes_b)
                    .map_err(super::quant_error(b.path(), &tb.name))?;
                Some(math::distance(&va, &vb))
            } else {
                None
            }
        };
        changed.push(Changed {
            a: ta,
            b: tb,
            distance,
        });
    }
    let added = b
        .tensors()
        .iter()
        .filter(|t| a.tensor(&t.name).is_none())
        .collect();
    Ok(Report {
        header,
        meta_added,
        meta_removed,
        meta_changed,
        added,
        removed,
        changed,
        identical_tensors,
    })
}

/// Equal type and value; floats by bits (a NaN equals itself, 0.0 is not
/// -0.0), arrays element by element with their element type.
fn same_value(x: &Value, y: &Value) -> bool {
    match (x, y) {
        (Value::F32(p), Value::F32(q)) => p.to_bits() == q.to_bits(),
        (Value::F64(p), Value::F64(q)) => p.to_bits() == q.to_bits(),
        (Value::Array(p), Value::Array(q)) => {
            p.elem_type == q.elem_type
                && p.values.len() == q.values.len()
                && p.values
                    .iter()
                    .zip(&q.values)
                    .all(|(u, v)| same_value(u, v))
        }
        _ => x == y,
    }
}

/// A value in a few words: scalars as they are, long strings cut, arrays by
/// type and length.
fn short(v: &Value) -> String {
    match v {
        Value::Array(arr) => format!("array[{}; {}]", arr.elem_type, arr.values.len()),
        Value::String(s) if s.chars().count() > 60 => {
            let head: String = s.chars().take(60).collect();
            format!("string = {head:?}… ({} bytes)", s.len())
        }
        Value::String(s) => format!("string = {s:?}"),
        other => {
            let text = format!("{other:?}");
            // `U32(7)` → `u32 = 7`.
            let inner = text
                .split_once('(')
                .and_then(|(_, r)| r.strip_suffix(')'))
                .unwrap_or(&text);
            format!("{} = {inner}", other.value_type())
        }
    }
}

fn tensor_text(t: &TensorInfo) -> String {
    format!("{} {:?}", t.ttype, t.dims)
}

fn write_text(
    out: &mut impl Write,
    r: &Report<'_>,
    a: &GgufReader,
    b: &GgufReader,
) -> io::Result<()> {
    writeln!(out, "--- {}", a.path().display())?;
    writeln!(out, "+++ {}", b.path().display())?;
    for (what, x, y) in &r.header {
        writeln!(out, "~ {what}: {x} -> {y}")?;
    }
    for (k, v) in &r.meta_removed {
        writeln!(out, "- metadata {k}: {}", short(v))?;
    }
    for (k, v) in &r.meta_added {
        writeln!(out, "+ metadata {k}: {}", short(v))?;
    }
    for ((k, va), vb) in &r.meta_changed {
        writeln!(out, "~ metadata {k}: {} -> {}", short(va), short(vb))?;
    }
    for t in &r.removed {
        writeln!(out, "- tensor {}: {}", t.name, tensor_text(t))?;
    }
    for t in &r.added {
        writeln!(out, "+ tensor {}: {}", t.name, tensor_text(t))?;
    }
    for c in &r.changed {
        let layout = if c.a.dims == c.b.dims && c.a.ttype == c.b.ttype {
            tensor_text(c.a)
        } else {
            format!("{} -> {}", tensor_text(c.a), tensor_text(c.b))
        };
        let values = match c.distance {
            Some(d) => format!(
                "{} of {} values differ, relative L2 {:.3e}, max abs {:.3e}",
                d.differing,
                c.a.n_elements(),
                d.rel_l2,
                d.max_abs
            ),
            None if c.a.dims != c.b.dims => "shapes differ".to_owned(),
            None => "bytes differ (no codec to compare values)".to_owned(),
        };
        writeln!(out, "~ tensor {}: {layout}: {values}", c.a.name)?;
    }
    let metadata = r.meta_added.len() + r.meta_removed.len() + r.meta_changed.len();
    let tensors = r.added.len() + r.removed.len() + r.changed.len();
    if r.identical() {
        writeln!(
            out,
            "identical: {} metadata keys, {} tensors",
            a.metadata().len(),
            r.identical_tensors
        )
    } else {
        writeln!(
            out,
            "different: {metadata} metadata keys, {tensors} tensors ({} identical)",
            r.identical_tensors
        )
    }
}

fn tensor_json(t: &TensorInfo) -> Json {
    json!({ "name": t.name, "type": t.ttype.name(), "dims": t.dims })
}

fn to_json(r: &Report<'_>) -> Json {
    let key = |(k, v): &&(String, Value)| json!({ "key": k, "type": v.value_type().name() });
    json!({
        "identical": r.identical(),
        "header": r.header.iter().map(|(what, x, y)| json!({ "field": what, "a": x, "b": y })).collect::<Vec<_>>(),
        "metadata": {
            "added": r.meta_added.iter().map(key).collect::<Vec<_>>(),
            "removed": r.meta_removed.iter().map(key).collect::<Vec<_>>(),
            "changed": r.meta_changed.iter().map(|((k, va), vb)| json!({
                "key": k, "type_a": va.value_type().name(), "type_b": vb.value_type().name(),
            })).collect::<Vec<_>>(),
        },
        "tensors": {
            "added": r.added.iter().map(|t| tensor_json(t)).collect::<Vec<_>>(),
            "removed": r.removed.iter().map(|t| tensor_json(t)).collect::<Vec<_>>(),
            "changed": r.changed.iter().map(|c| {
                let mut o = json!({
                    "name": c.a.name,
                    "type_a": c.a.ttype.name(), "type_b": c.b.ttype.name(),
                    "dims_a": c.a.dims, "dims_b": c.b.dims,
                });
                if let Some(d) = c.distance {
                    o["differing_values"] = json!(d.differing);
                    // NaN and infinity are null in JSON.
                    o["rel_l2"] = json!(d.rel_l2);
                    o["max_abs"] = json!(d.max_abs);
                }
                o
            }).collect::<Vec<_>>(),
            "identical": r.identical_tensors,
        },
    })
}
