//! `evod inspect` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod inspect`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod inspect is not built yet")
}
