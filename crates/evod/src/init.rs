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
    /// Task: cartpole, xor, sine, csv (needs --data and --target),
    /// external (a fitness evod does not know, computed by the program of
    /// `evod run --worker-cmd`; needs --layers) or perplexity (a llama.cpp
    /// control vector steering --base-model towards --text; docs/llm.md).
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
    /// The llama.cpp base model the control vector steers (with --task
    /// perplexity).
    #[arg(long, value_name = "FILE")]
    base_model: Option<PathBuf>,
    /// The corpus, UTF-8 text (with --task perplexity).
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Share of the corpus held out for the publish gate, never trained on
    /// (with --task perplexity).
    #[arg(long, value_name = "FRACTION", default_value_t = crate::llm::DEFAULT_HELDOUT)]
    heldout: f64,
    /// Tokens per scored window (with --task perplexity).
    #[arg(long, value_name = "TOKENS", default_value_t = crate::llm::DEFAULT_WINDOW)]
    window: u32,
    /// Training windows scored per evaluation, chosen by each generation's
    /// seed; 0 scores them all (with --task perplexity).
    #[arg(long, value_name = "N", default_value_t = crate::llm::DEFAULT_TRAIN_WINDOWS)]
    train_windows: u32,
    /// How the control vector's directions evolve (with --task perplexity,
    /// default per-layer): per-layer, each layer's direction on its own
    /// (n_embd × (n_layer − 1) dimensions), or tied, one direction for every
    /// layer (n_embd dimensions: a search that many times smaller; docs/llm.md).
    #[arg(long, value_enum, value_name = "HOW")]
    directions: Option<crate::llm::Directions>,
    /// Hidden activation: tanh, relu, sigmoid or identity.
    #[arg(long, default_value = "tanh")]
    activation: String,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output model file (its folder is created if missing).
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
    let perplexity = args.task == evod_runtime::task::PERPLEXITY;
    if !perplexity && (args.base_model.is_some() || args.text.is_some()) {
        return Err(usage(anyhow::anyhow!(
            "--base-model and --text only apply to --task perplexity"
        )));
    }
    if perplexity {
        let (Some(base_model), Some(text)) = (&args.base_model, &args.text) else {
            return Err(usage(anyhow::anyhow!(
                "--task perplexity needs --base-model BASE.gguf and --text CORPUS.txt"
            )));
        };
        if args.layers.is_some() || args.data.is_some() || args.target.is_some() {
            return Err(usage(anyhow::anyhow!(
                "--layers, --data and --target do not apply to --task perplexity (the base model sets the vector's shape)"
            )));
        }
        return crate::llm::init(&crate::llm::InitArgs {
            base_model: base_model.clone(),
            text: text.clone(),
            heldout: args.heldout,
            window: args.window,
            train_windows: args.train_windows,
            directions: args.directions.unwrap_or_default(),
            seed: args.seed,
            output: args.output.clone(),
            force: args.force,
        });
    }
    if args.directions.is_some() {
        return Err(usage(anyhow::anyhow!(
            "--directions only applies to --task perplexity (a control vector's directions)"
        )));
    }
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
                "unknown task {other:?} (expected cartpole, xor, sine, csv, external or perplexity)"
            )));
        }
    };
    let activation: Activation = args.activation.parse().map_err(usage)?;
    let arch = match &args.layers {
        Some(s) => Architecture {
            layers: Architecture::parse_layers(s).map_err(usage)?,
            activation,
            family: evod_runtime::Family::Mlp,
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
    create_parent(&args.output)?;
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

/// Creates the folder `output` goes in, as `mkdir -p` would (`evod init -o
/// steer/vectorland.gguf` starts a new run's folder).
pub(crate) fn create_parent(output: &std::path::Path) -> anyhow::Result<()> {
    match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))
            .map_err(|e| exit::with_code(exit::IO, e)),
        _ => Ok(()),
    }
}
