//! `evod init` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod init`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod init`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod init is not built yet")
}
