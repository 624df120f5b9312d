//! `evod evolver` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod evolver`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod evolver`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod evolver is not built yet")
}
