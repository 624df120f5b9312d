//! `evod eval`: scores a model on its task (or another) in this process.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use evod_runtime::{Model, Task, cartpole};

use crate::exit;

/// Arguments of `evod eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model file.
    model: PathBuf,
    /// Task (default: the model's `evod.task`).
    #[arg(long)]
    task: Option<String>,
    /// CartPole episodes.
    #[arg(long, default_value_t = 100)]
    episodes: u32,
    /// Seed: CartPole episode i starts from gymnasium's reset(seed=S+i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `evod eval`.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let bad = |e: evod_runtime::RuntimeError| exit::with_code(exit::BAD_INPUT, e);
    let model = Model::open(&args.model).map_err(bad)?;
    let task_name = args.task.clone().unwrap_or_else(|| model.spec.task.clone());
    let task: Task = task_name.parse().map_err(bad)?;
    let arch = &model.spec.arch;
    task.check_arch(arch).map_err(bad)?;
    let params = model.params().map_err(bad)?;
    let mut out = std::io::stdout().lock();
    match task {
        Task::CartPole { .. } => {
            let returns =
                cartpole::returns(arch, &params, args.seed, args.episodes).map_err(bad)?;
            let mean = if returns.is_empty() {
                0.0
            } else {
                returns.iter().sum::<f64>() / returns.len() as f64
            };
            let solved = args.episodes >= 100 && mean >= cartpole::SOLVED_MEAN_RETURN;
            if args.json {
                let v = serde_json::json!({
                    "model": args.model,
                    "task": task.name(),
                    "seed": args.seed,
                    "episodes": args.episodes,
                    "returns": returns,
                    "mean": mean,
                    "solved": solved,
                });
                writeln!(out, "{v}")?;
            } else {
                for (i, r) in returns.iter().enumerate() {
                    let seed = args.seed.wrapping_add(i as u64);
                    writeln!(out, "episode {i} seed {seed} return {r}")?;
                }
                writeln!(
                    out,
                    "mean {mean} over {} episodes{}",
                    args.episodes,
                    if solved { " (solved: >= 475)" } else { "" }
                )?;
            }
        }
        _ => {
            let fitness = task.evaluate(arch, &params, args.seed).map_err(bad)?;
            let validation = match &task {
                Task::Csv(csv) => Some(csv.validation_score(arch, &params).map_err(bad)?),
                _ => None,
            };
            if args.json {
                let v = serde_json::json!({
                    "model": args.model,
                    "task": task.name(),
                    "fitness": fitness,
                    "validation": validation,
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "task {} fitness {fitness}", task.name())?;
                if let Some(v) = validation {
                    writeln!(out, "validation {v}")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
