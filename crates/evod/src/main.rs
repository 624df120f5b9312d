//! `evod`: the evolution daemon's single binary.
//!
//! User-facing subcommands (`run`, `join`, `status`, `exec`, `inspect`, `init`, `eval`,
//! `rollback`, `stop`, `report`, `surgeon`) and the hidden role subcommands that the
//! supervisor spawns from its own executable (`worker`, `evolver`, `feeder`). Each
//! subcommand lives in its own module with its own clap `Args`.

mod dist;
mod eval;
mod evolver;
mod exit;
mod fault;
mod init;
mod inspect;
mod llm;
mod report;
mod run;
mod status;
mod surgeon;
mod worker;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Evolution daemon: keeps a neural network in a GGUF file and improves it
/// with evolution strategies, evaluating candidates in isolated workers.
#[derive(Debug, Parser)]
#[command(name = "evod", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon in the foreground (supervisor; container entrypoint).
    Run(Box<run::Args>),
    /// Evaluate for a distributed run: this host's workers take tasks from the broker
    /// (a perplexity run: with this host's copies of its base model and corpus,
    /// --base-model and --text).
    Join(Box<dist::join::JoinArgs>),
    /// Show the running daemon's children, model and stats.
    Status(status::StatusArgs),
    /// Run the live model on one input through the daemon's runtime.
    Exec(status::ExecArgs),
    /// Ask the running daemon to stop gracefully.
    Stop(status::StopArgs),
    /// Restore an earlier generation of the model.
    Rollback(status::RollbackArgs),
    /// Wake a converged (resting) evolver: evolve again.
    Wake(status::WakeArgs),
    /// Print a GGUF file's header, metadata and tensors.
    Inspect(inspect::Args),
    /// Create a new seeded model file for a task.
    Init(init::Args),
    /// Evaluate a model on its task in this process.
    Eval(eval::Args),
    /// Plot fitness over generations from a run's history.
    Report(report::Args),
    /// Mutate, merge or diff any GGUF file (quantized tensors included).
    Surgeon(surgeon::Args),
    /// Runtime worker role (spawned by `evod run`).
    #[command(hide = true)]
    Worker(worker::Args),
    /// Evolver role (spawned by `evod run`).
    #[command(hide = true)]
    Evolver(evolver::Args),
    /// Evaluator host role (spawned by `evod join` in the evolver's place).
    #[command(hide = true)]
    Feeder(dist::feeder::FeederArgs),
    /// Inject a fault into a worker of a daemon run with --allow-fault-injection.
    #[command(hide = true)]
    Fault(fault::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::Join(args) => dist::join::run(*args),
        Command::Feeder(args) => dist::feeder::run(args),
        Command::Status(args) => status::status(args),
        Command::Exec(args) => status::exec(args),
        Command::Stop(args) => status::stop(args),
        Command::Rollback(args) => status::rollback(args),
        Command::Wake(args) => status::wake(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Init(args) => init::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Report(args) => report::run(args),
        Command::Surgeon(args) => surgeon::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Evolver(args) => evolver::run(args),
        Command::Fault(args) => fault::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            // A closed stdout (`evod inspect f | head`) is not a failure.
            if error.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            let _ = writeln!(std::io::stderr(), "evod: error: {}", exit::render(&error));
            exit::exit(exit::code_for(&error))
        }
    }
}
