//! `evod init`: writes a new seeded generation-0 model for a task.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use evod_runtime::csv::{CsvKind, CsvTask};
use evod_runtime::task::CSV_SPLIT_SEED;
use evod_runtime::{Activation, Architecture, ModelSpec, Task, init_params, write_model};

use crate::exit;

/// Arguments of `evod init`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Task: cartpole, xor, sine, csv (needs --data and --target) or
    /// external (a fitness evod does not know, computed by the program of
    /// `evod run --worker-cmd`; needs --layers).
    #[arg(long, default_value = "cartpole")]
    task: String,
    /// CSV data file (with --task csv).
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// Target column name of the CSV file (with --task csv).
    #[arg(long, value_name = "COLUMN")]
    target: Option<String>,
    /// CSV task kind: auto, regression or classification (with --task csv).
    #[arg(long, default_value = "auto")]
    kind: String,
    /// Layer widths, input first (default: task inputs,16,task outputs).
    #[arg(long, value_name = "N,N,...")]
    layers: Option<String>,
    /// Hidden activation: tanh, relu, sigmoid or identity.
    #[arg(long, default_value = "tanh")]
    activation: String,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output model file.
    #[arg(short = 'o', long = "output", default_value = "vectorland.gguf")]
    output: PathBuf,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

fn usage(error: impl Into<anyhow::Error>) -> anyhow::Error {
    exit::with_code(exit::USAGE, error)
}

/// Runs `evod init`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let task = match args.task.as_str() {
        "csv" => {
            let (Some(data), Some(target)) = (&args.data, &args.target) else {
                return Err(usage(anyhow::anyhow!(
                    "--task csv needs --data FILE and --target COLUMN"
                )));
            };
            let kind = CsvKind::parse(&args.kind).ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "unknown --kind {:?} (expected auto, regression or classification)",
                    args.kind
                ))
            })?;
            // The model records the absolute path so that it evaluates from
            // any working directory.
            let data = std::fs::canonicalize(data)
                .with_context(|| format!("cannot read {}", data.display()))
                .map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
            let csv = CsvTask::load(&data, target, kind, CSV_SPLIT_SEED)
                .map_err(|e| exit::with_code(exit::BAD_INPUT, e))?;
            Task::Csv(Arc::new(csv))
        }
        "external" => {
            if args.layers.is_none() {
                return Err(usage(anyhow::anyhow!(
                    "--task external needs --layers N,N,... (evod does not know its inputs and outputs)"
                )));
            }
            if args.data.is_some() || args.target.is_some() {
                return Err(usage(anyhow::anyhow!(
                    "--data and --target only apply to --task csv"
                )));
            }
            Task::External
        }
        name @ ("cartpole" | "xor" | "sine") => {
            if args.data.is_some() || args.target.is_some() {
                return Err(usage(anyhow::anyhow!(
                    "--data and --target only apply to --task csv"
                )));
            }
            name.parse().map_err(usage)?
        }
        other => {
            return Err(usage(anyhow::anyhow!(
                "unknown task {other:?} (expected cartpole, xor, sine, csv or external)"
            )));
        }
    };
    let activation: Activation = args.activation.parse().map_err(usage)?;
    let arch = match &args.layers {
        Some(s) => Architecture {
            layers: Architecture::parse_layers(s).map_err(usage)?,
            activation,
        },
        None => task.default_arch(activation),
    };
    task.check_arch(&arch).map_err(usage)?;

    if args.output.exists() && !args.force {
        return Err(exit::with_code(
            exit::FAILURE,
            anyhow::anyhow!(
                "{} already exists (use --force to overwrite)",
                args.output.display()
            ),
        ));
    }
    let params = init_params(&arch, args.seed);
    let spec = ModelSpec::new(arch, task.name(), args.seed);
    let report = write_model(&args.output, &spec, &params, None)
        .map_err(|e| exit::with_code(exit::IO, e))
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({} {}, {} parameters, {} bytes, checksum {:016x})",
        args.output.display(),
        spec.task,
        spec.arch,
        params.len(),
        report.bytes,
        report.checksum
    );
    Ok(ExitCode::SUCCESS)
}
