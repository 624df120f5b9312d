//! `evod feeder` (hidden role): an evaluator host's stand-in for the
//! evolver. Spawned by the supervisor of `evod join` in the evolver's slot
//! (same supervision: respawned if it dies), with every worker's segment
//! inherited, it feeds the workers tasks from the broker through an
//! [`EvalHost`] until SIGTERM. The broker URL comes in `EVOD_BROKER`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use evod_broker::BrokerError;
use evod_evolve::ParamLayout;
use evod_runtime::Model;

use super::{DistArgs, DistSettings, EvalHost};
use crate::evolver::{MODEL_FILE, RingEvaluator};

/// Exit code of a feeder whose model is stale (the supervisor restarts it).
const MODEL_STALE_EXIT: u8 = 3;

/// Arguments of `evod feeder`.
#[derive(Debug, clap::Args)]
pub struct FeederArgs {
    /// The host's state folder (its model: the run's network).
    #[arg(long)]
    pub dir: PathBuf,
    /// Descriptor numbers of the workers' inherited segments, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ring_fds: Vec<i32>,
    /// The supervisor's control socket (to have a misbehaving worker replaced).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Passed by a supervisor run with --allow-fault-injection (unused here).
    #[arg(long, hide = true)]
    pub allow_fault_injection: bool,
    /// The distributed-run options.
    #[command(flatten)]
    pub dist: DistArgs,
}

/// Runs `evod feeder` until SIGTERM (exit 0).
pub fn run(args: FeederArgs) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the stop handler")?;
    }
    // `evod wake` (SIGHUP) means nothing here; it must not end us.
    signal_hook::flag::register(
        signal_hook::consts::SIGHUP,
        Arc::new(AtomicBool::new(false)),
    )
    .context("installing the SIGHUP handler")?;
    evod_supervisor::set_process_name(c"evod-feeder");
    evod_supervisor::init_logging(match std::env::var("EVOD_LOG_FORMAT").as_deref() {
        Ok("json") => evod_supervisor::LogFormat::Json,
        _ => evod_supervisor::LogFormat::Human,
    });
    let settings = DistSettings::from_args(&args.dist)?
        .context("evod feeder needs the broker URL in EVOD_BROKER")?;
    let segments = crate::evolver::attach_segments(&args.ring_fds)?;
    let model_path = args.dir.join(MODEL_FILE);
    // The run's model as the coordinator has it now (a feeder restarted
    // after a base that did not fit its model file gets the new one).
    super::join::fetch_model(&settings, &model_path, &stop)?;
    // A llama.cpp worker beats between decode batches: waited for as the
    // coordinator's evolver waits for its own (`llm::PEER_TIMEOUT`).
    let client_config = if crate::llm::is_perplexity_model(&model_path) {
        evod_ring::ClientConfig {
            peer_timeout: crate::llm::PEER_TIMEOUT,
            ..evod_ring::ClientConfig::default()
        }
    } else {
        evod_ring::ClientConfig::default()
    };
    let clients = segments
        .iter()
        .map(|s| {
            s.client_with(evod_ring::Channel::Eval, client_config)
                .context("claiming the evaluation channel")
        })
        .collect::<Result<Vec<_>>>()?;
    let model = Model::open(&model_path)?;
    let layout = ParamLayout::from_architecture(&model.spec.arch)
        .with_context(|| format!("the network of {}", model_path.display()))?;
    let mut ring = RingEvaluator::new(&segments, clients)
        .with_recipes(args.dir.join("state").join("base"), model.spec.clone());
    ring.stop = Arc::clone(&stop);
    ring.control_socket = args.control_socket.clone();
    let model_hash = xxhash_rust::xxh3::xxh3_64(
        &std::fs::read(&model_path).with_context(|| format!("reading {}", model_path.display()))?,
    );
    let mut host = EvalHost::start(
        &settings,
        layout,
        model_hash,
        super::coordinator::spec_hash(&model.spec),
        segments.len() as u32,
        Arc::clone(&stop),
    )?;
    let url = settings.shown_url();
    tracing::info!(
        run = %settings.run,
        host = %settings.host,
        workers = segments.len(),
        "evaluating tasks of run {} from {url}",
        settings.run
    );
    let mut backoff = evod_broker::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut failing = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if host.model_stale {
            // Restarted by the supervisor: it fetches the run's model again.
            tracing::error!(
                "this host's model does not fit the run's bases: restarting the feeder to fetch the run's model again"
            );
            return Ok(ExitCode::from(MODEL_STALE_EXIT));
        }
        match host.serve(&mut ring, Duration::from_secs(1)) {
            Ok(_) => {
                if failing > 0 {
                    tracing::info!("broker {url}: reachable again");
                    failing = 0;
                }
                backoff.reset();
            }
            // A stop interrupts a blocking read: not a broker problem.
            Err(_) if stop.load(Ordering::Relaxed) => break,
            Err(e) => {
                failing += 1;
                let delay = backoff.next_delay();
                if failing <= 3 || failing.is_multiple_of(10) {
                    match e {
                        BrokerError::Unavailable { .. } => {
                            tracing::warn!("broker {url}: {e}; retrying in {delay:?}")
                        }
                        _ => tracing::error!("broker {url}: {e}; retrying in {delay:?}"),
                    }
                }
                std::thread::sleep(delay);
            }
        }
    }
    tracing::info!(
        recorded = host.recorded,
        "feeder stopping ({} results recorded by this host)",
        host.recorded
    );
    Ok(ExitCode::SUCCESS)
}
