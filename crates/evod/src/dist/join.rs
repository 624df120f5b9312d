//! `evod join URL`: make this host an evaluator of a distributed run — a
//! supervisor with its local isolated workers and, in the evolver's slot,
//! the `evod feeder` role that feeds them tasks from the broker.
//!
//! Before the supervisor starts, the run's model file (which the
//! coordinator publishes when it takes the lease) is fetched and written
//! as `DIR/vectorland.gguf`: the workers need the run's network and task,
//! and every base the host fetches later must fit it. A host may join
//! before the coordinator starts (it waits, saying so) and leave at any
//! time (its leased tasks are taken over by others after the lease).
//! Every other setting is `evod run`'s (flags, `EVOD_*`, the TOML file);
//! the evolution options are the coordinator's business and unused here.
//!
//! A perplexity run's base model and corpus are big and host-local: they
//! never travel through the broker. This host's copies (`--base-model`,
//! `--text`, or the paths the run's vector records) are verified against
//! the checksums the vector records right after the model is fetched
//! (`llm::check_host`), before the supervisor starts and so before any
//! task is taken, and handed to the workers in their environment.

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use evod_broker::{BrokerError, Evaluator as _};

use super::{DistSettings, retry_logged};
use crate::exit;
use crate::run::config;

/// Arguments of `evod join`.
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The run's broker, redis://[user:password@]host:port/db (or
    /// `--broker`, EVOD_BROKER, `broker` in the TOML file).
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// This host's copies of a perplexity run's base model and corpus.
    #[command(flatten, next_help_heading = "Perplexity runs")]
    pub files: crate::llm::HostFiles,
    /// Every `evod run` setting (the evolution options are unused).
    #[command(flatten)]
    pub run: crate::run::Args,
}

/// Runs `evod join`.
pub fn run(mut args: JoinArgs) -> anyhow::Result<ExitCode> {
    super::scrub_broker_env();
    if let Some(url) = args.url.take() {
        args.run.dist.broker = Some(url);
    }
    let file = match &args.run.config {
        Some(path) => config::FileConfig::load(path)?,
        None => config::FileConfig::default(),
    };
    let files = std::mem::take(&mut args.files).or(crate::llm::HostFiles {
        base_model: file.base_model,
        text: file.text,
    })?;
    // SAFETY: no other thread exists yet (nothing started one above).
    unsafe { files.export() };
    let (mut config, _, dist) = config::resolve(args.run)?;
    let settings = DistSettings::from_args(&dist)?.ok_or_else(|| {
        exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "evod join needs the run's broker: evod join redis://HOST:6379/0 (or --broker, EVOD_BROKER)"
            ),
        )
    })?;
    evod_supervisor::control::check_socket_path(&config.control_socket)
        .map_err(|e| exit::with_code(exit::USAGE, e))?;
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating the state folder {}", config.dir.display()))?;
    evod_supervisor::init_logging(config.log_format);
    let mut ids = Vec::new();
    // `docker stop` (SIGTERM to PID 1) ends the wait for the model
    // promptly; the supervisor installs its own handlers afterwards.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        let id = signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))
            .context("installing the stop handler")?;
        ids.push(id);
    }
    let fetched = fetch_model(&settings, &config.model, &stop);
    for id in ids {
        signal_hook::low_level::unregister(id);
    }
    if stop.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::info!("stopped while waiting for the run's model");
        return Ok(ExitCode::SUCCESS);
    }
    fetched?;
    // A perplexity run: this host's base model and corpus are the run's,
    // or it takes no task.
    crate::llm::check_host(&config.model, &files, &settings.run)?;
    // The run's fitness may be the user's program: this host needs it too.
    if config.worker_cmd.is_none() && crate::run::worker_cmd::is_external_model(&config.model) {
        return Err(exit::with_code(
            exit::USAGE,
            anyhow::anyhow!(
                "run {}'s task is external (a fitness evod does not know): \
                 run this host's workers with --worker-cmd \"CMD ARGS\" too",
                settings.run
            ),
        ));
    }
    config.no_evolver = false;
    config.evolver_role = "feeder";
    config.evolver_args = settings.to_args().to_cli_args();
    config.evolver_env = settings.child_env();
    config.evolver_bounded = false;
    config.payload_bytes = crate::evolver::host_payload_bytes(&config.model)?;
    tracing::info!(
        run = %settings.run,
        host = %settings.host,
        "joining run {} on {} as host {} with {} workers",
        settings.run,
        settings.shown_url(),
        settings.host,
        config.workers
    );
    crate::run::supervise(config)
}

/// Waits for the run's model file on the broker and writes it at `path`
/// (atomically; left alone when it is already that file). A broker that
/// refuses us (authentication) is exit 2 naming `--broker`; one that is
/// not reachable is waited for, saying so.
/// `stop` ends the wait (an error).
pub(super) fn fetch_model(
    settings: &DistSettings,
    path: &std::path::Path,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let url = settings.shown_url();
    let mut broker = settings.broker("")?;
    let mut said = false;
    let bytes = loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            anyhow::bail!("stopped while waiting for run {}'s model", settings.run);
        }
        match retry_logged("fetch the run's model", &url, stop, || broker.fetch_model()) {
            Ok(Some(bytes)) => break bytes,
            Ok(None) => {
                if !said {
                    tracing::info!(
                        "waiting for the coordinator of run {} to publish its model on {url}",
                        settings.run
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e @ BrokerError::Server { .. }) => {
                return Err(exit::with_code(
                    exit::USAGE,
                    anyhow::anyhow!("--broker {url}: {e}"),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    };
    if std::fs::read(path).is_ok_and(|have| have == bytes) {
        return Ok(());
    }
    let tmp = path.with_extension("gguf.joining");
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    // Untrusted bytes: they must be a model this build can serve.
    if let Err(e) = evod_runtime::Model::open(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(exit::with_code(
            exit::BAD_INPUT,
            anyhow::anyhow!(
                "the model run {} published on {url} is not usable: {e}",
                settings.run
            ),
        ));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving the run's model to {}", path.display()))?;
    tracing::info!(
        bytes = bytes.len(),
        "wrote run {}'s model to {}",
        settings.run,
        path.display()
    );
    Ok(())
}
