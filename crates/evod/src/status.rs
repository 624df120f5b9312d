//! Control-socket clients: `evod status`, `exec`, `stop`, `rollback` (not built yet).

use std::process::ExitCode;

/// Arguments of `evod status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {}
/// Arguments of `evod exec`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {}
/// Arguments of `evod stop`.
#[derive(Debug, clap::Args)]
pub struct StopArgs {}
/// Arguments of `evod rollback`.
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {}

/// Runs `evod status`.
pub fn status(_args: StatusArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod status is not built yet")
}
/// Runs `evod exec`.
pub fn exec(_args: ExecArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod exec is not built yet")
}
/// Runs `evod stop`.
pub fn stop(_args: StopArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod stop is not built yet")
}
/// Runs `evod rollback`.
pub fn rollback(_args: RollbackArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("evod rollback is not built yet")
}
