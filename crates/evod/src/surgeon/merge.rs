//! `evod surgeon merge A B -o OUT --method linear|slerp --t T
//! [--tensors GLOB]…`: interpolates two models of one architecture.
//!
//! A and B must agree on `general.architecture` and on every tensor's
//! name, shape and type; the first disagreement is refused by name. The
//! output is A with the selected tensors replaced by the mix of A's and
//! B's values (`math::lerp` or `math::slerp`, per tensor), re-quantized
//! to the tensor's type; metadata is A's plus `evod.surgeon.*` provenance.
//! A tensor whose mix is one parent by definition (t = 0, t = 1, equal
//! bytes in A and B) is that parent's bytes, not a re-quantization.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use evod_gguf::{GgufReader, Value, dequantize, quant, quantize};

use super::glob::Selection;
use super::{SurgeonError, math};

/// How two tensors are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// (1 − t)·a + t·b.
    Linear,
    /// Spherical interpolation per tensor; linear for nearly parallel tensors.
    Slerp,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::Slerp => "slerp",
        }
    }
}

/// Arguments of `evod surgeon merge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model A (t = 0): its metadata, tensor order and unselected tensors are kept.
    a: PathBuf,
    /// Model B (t = 1).
    b: PathBuf,
    /// Where to write the result (written atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// Interpolation method.
    #[arg(long, value_enum, default_value = "linear")]
    method: Method,
    /// Weight of B: 0 gives A, 1 gives B (linear also extrapolates; slerp takes 0..=1).
    #[arg(long)]
    t: f32,
    /// Merge only tensors whose name matches this glob (fnmatch); repeatable; default all.
    #[arg(long = "tensors", value_name = "GLOB")]
    tensors: Vec<String>,
}

/// Runs `evod surgeon merge`.
pub fn run(args: Args) -> Result<ExitCode, SurgeonError> {
    let t = args.t;
    if !t.is_finite() || (args.method == Method::Slerp && !(0.0..=1.0).contains(&t)) {
        return Err(SurgeonError::BadArg {
            flag: "--t",
            value: t.to_string(),
            problem: if t.is_finite() {
                "slerp interpolates: t must be within 0..=1"
            } else {
                "must be a finite number"
            },
        });
    }
    let selection = Selection::parse(&args.tensors)?;
    let a = super::open_input(&args.a)?;
    let b = super::open_input(&args.b)?;
    check_compatible(&args, &a, &b)?;
    let picked = super::select(&a, &selection)?;
    for (tensor, _) in a.tensors().iter().zip(&picked).filter(|(_, p)| **p) {
        if !quant::has_codec(tensor.ttype) {
            return Err(SurgeonError::Unsupported {
                path: args.a.clone(),
                tensor: tensor.name.clone(),
                ttype: tensor.ttype,
            });
        }
    }
    let (sum_a, sum_b) = (
        a.checksum().map_err(SurgeonError::Read)?,
        b.checksum().map_err(SurgeonError::Read)?,
    );
    let metadata = super::with_provenance(
        &a,
        vec![
            ("operation", Value::String("merge".into())),
            ("method", Value::String(args.method.name().into())),
            ("t", Value::F32(t)),
            ("a.checksum", super::checksum_value(sum_a)),
            ("b.checksum", super::checksum_value(sum_b)),
            ("tensors", super::patterns_value(selection.patterns())),
        ],
    );
    let in_b: HashMap<&str, usize> = b
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let mut changed = 0;
    let report = super::write_output(&args.output, &a, &metadata, |i, ta| {
        let bytes_a = a.read_tensor(ta).map_err(SurgeonError::Read)?;
        if !picked[i] || t == 0.0 {
            return Ok(bytes_a);
        }
        // Present: check_compatible compared the name sets.
        let tb = &b.tensors()[in_b[ta.name.as_str()]];
        let bytes_b = b.read_tensor(tb).map_err(SurgeonError::Read)?;
        if bytes_a == bytes_b {
            return Ok(bytes_a);
        }
        changed += 1;
        if t == 1.0 {
            return Ok(bytes_b);
        }
        let va = dequantize(ta.ttype, &bytes_a).map_err(super::quant_error(&args.a, &ta.name))?;
        drop(bytes_a);
        let vb = dequantize(tb.ttype, &bytes_b).map_err(super::quant_error(&args.b, &tb.name))?;
        drop(bytes_b);
        let mut mixed = vec![0f32; va.len()];
        match args.method {
            Method::Linear => math::lerp(&va, &vb, t, &mut mixed),
            Method::Slerp => {
                math::slerp(&va, &vb, t, &mut mixed);
            }
        }
        quantize(ta.ttype, &mixed).map_err(super::quant_error(&args.output, &ta.name))
    })?;
    super::print_written(&args.output, &report, changed, a.tensors().len() - changed)?;
    Ok(ExitCode::SUCCESS)
}

/// Refuses A and B unless they have the same architecture and the same
/// tensors (names, shapes, types); the error names the first difference.
fn check_compatible(args: &Args, a: &GgufReader, b: &GgufReader) -> Result<(), SurgeonError> {
    let mismatch = |problem: String| SurgeonError::Mismatch {
        a: args.a.clone(),
        b: args.b.clone(),
        problem,
    };
    let arch = |f: &GgufReader| match f.get("general.architecture") {
        None => "none".to_owned(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(other) => format!("{other:?}"),
    };
    let (arch_a, arch_b) = (arch(a), arch(b));
    if arch_a != arch_b {
        return Err(mismatch(format!(
            "general.architecture: {arch_a} in A, {arch_b} in B"
        )));
    }
    let names_b: HashMap<&str, usize> = b
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    for ta in a.tensors() {
        let Some(&j) = names_b.get(ta.name.as_str()) else {
            return Err(mismatch(format!("tensor {}: in A, not in B", ta.name)));
        };
        let tb = &b.tensors()[j];
        if ta.dims != tb.dims {
            return Err(mismatch(format!(
                "tensor {}: shape {:?} in A, {:?} in B",
                ta.name, ta.dims, tb.dims
            )));
        }
        if ta.ttype != tb.ttype {
            return Err(mismatch(format!(
                "tensor {}: type {} in A, {} in B",
                ta.name, ta.ttype, tb.ttype
            )));
        }
    }
    if let Some(tb) = b.tensors().iter().find(|tb| a.tensor(&tb.name).is_none()) {
        return Err(mismatch(format!("tensor {}: in B, not in A", tb.name)));
    }
    Ok(())
}
