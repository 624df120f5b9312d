//! `evod report` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod report`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod report`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod report is not built yet")
}
