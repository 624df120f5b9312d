//! `evod eval` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod eval`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod eval`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod eval is not built yet")
}
