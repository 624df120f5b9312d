//! `evod run` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `evod run`.
pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod run is not built yet")
}
