//! `evod worker` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod worker`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod worker`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod worker is not built yet")
}
