//! `evod surgeon mutate IN -o OUT --sigma S --seed N [--tensors GLOB]…
//! [--relative] [--skip-unsupported]`: seeded noise on the selected
//! tensors, each re-quantized to its own type.
//!
//! Per selected tensor: dequantize, `x[j] += scale · noise(stream, j)` with
//! `evod_evolve::noise` (stream = `xxh3_64_with_seed(name, seed)`, so a
//! tensor's noise does not depend on the others or their order; `scale` is
//! σ, or σ·RMS(tensor) with `--relative`), quantize back. A scale of 0
//! leaves the tensor's bytes as they are. Same arguments, same bytes.

use std::path::PathBuf;
use std::process::ExitCode;

use evod_gguf::{Value, dequantize, quant, quantize};

use super::glob::Selection;
use super::{SurgeonError, math};

/// Arguments of `evod surgeon mutate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The GGUF file to mutate.
    input: PathBuf,
    /// Where to write the result (may be the input: written atomically).
    #[arg(short, long)]
    output: PathBuf,
    /// Noise standard deviation (absolute, or relative to each tensor's RMS with --relative).
    #[arg(long)]
    sigma: f32,
    /// Noise seed: the same seed gives the same bytes.
    #[arg(long)]
    seed: u64,
    /// Mutate only tensors whose name matches this glob (fnmatch: `*`, `?`, `[a-z]`); repeatable; default all.
    #[arg(long = "tensors", value_name = "GLOB")]
    tensors: Vec<String>,
    /// Scale σ by each tensor's root mean square.
    #[arg(long)]
    relative: bool,
    /// Copy selected tensors of a type without a codec unchanged (and say so) instead of refusing.
    #[arg(long)]
    skip_unsupported: bool,
}

/// Runs `evod surgeon mutate`.
pub fn run(args: Args) -> Result<ExitCode, SurgeonError> {
    if !args.sigma.is_finite() || args.sigma < 0.0 {
        return Err(SurgeonError::BadArg {
            flag: "--sigma",
            value: args.sigma.to_string(),
            problem: "must be a finite number ≥ 0",
        });
    }
    let selection = Selection::parse(&args.tensors)?;
    let input = super::open_input(&args.input)?;
    let mut picked = super::select(&input, &selection)?;
    for (t, pick) in input.tensors().iter().zip(&mut picked) {
        if *pick && !quant::has_codec(t.ttype) {
            if !args.skip_unsupported {
                return Err(SurgeonError::Unsupported {
                    path: args.input.clone(),
                    tensor: t.name.clone(),
                    ttype: t.ttype,
                });
            }
            eprintln!(
                "evod: {}: tensor {}: type {} has no codec, copied unchanged",
                args.input.display(),
                t.name,
                t.ttype
            );
            *pick = false;
        }
    }
    let checksum = input.checksum().map_err(SurgeonError::Read)?;
    let metadata = super::with_provenance(
        &input,
        vec![
            ("operation", Value::String("mutate".into())),
            ("input.checksum", super::checksum_value(checksum)),
            ("seed", Value::U64(args.seed)),
            ("sigma", Value::F32(args.sigma)),
            ("relative", Value::Bool(args.relative)),
            ("tensors", super::patterns_value(selection.patterns())),
        ],
    );
    let mut changed = 0;
    let report = super::write_output(&args.output, &input, &metadata, |i, t| {
        let bytes = input.read_tensor(t).map_err(SurgeonError::Read)?;
        if !picked[i] {
            return Ok(bytes);
        }
        let mut values =
            dequantize(t.ttype, &bytes).map_err(super::quant_error(&args.input, &t.name))?;
        let scale = if args.relative {
            let rms = math::rms(&values);
            if !rms.is_finite() {
                return Err(SurgeonError::NonFiniteRms {
                    path: args.input.clone(),
                    tensor: t.name.clone(),
                    rms,
                });
            }
            (f64::from(args.sigma) * rms) as f32
        } else {
            args.sigma
        };
        if scale == 0.0 {
            return Ok(bytes);
        }
        drop(bytes);
        evod_evolve::noise::add_scaled_assign(
            math::stream(args.seed, &t.name),
            0,
            scale,
            &mut values,
        );
        changed += 1;
        quantize(t.ttype, &values).map_err(super::quant_error(&args.input, &t.name))
    })?;
    super::print_written(
        &args.output,
        &report,
        changed,
        input.tensors().len() - changed,
    )?;
    Ok(ExitCode::SUCCESS)
}
