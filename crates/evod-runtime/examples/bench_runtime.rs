//! `cargo xtask bench runtime`: CartPole-v1 steps per second with a 4-16-2
//! tanh policy on one core, against gymnasium + a numpy MLP measured in the
//! same run. Writes the JSON given as the only argument.
//!
//! The policy is [`evod_runtime::cartpole::balancing_policy`], so every
//! episode runs the full 500 steps. Each figure is the median of several
//! timed repeats. Three evod figures:
//!
//! - `cartpole_steps_per_s` (headline): [`run_episodes`], 8 episodes in
//!   lockstep, one `MlpLanes` reused for 2000 episodes per repeat (also per
//!   second of the thread's CPU time, `cartpole_steps_per_cpu_s`, which
//!   other tenants of a shared machine disturb less);
//! - `cartpole_eval5_steps_per_s`: the daemon's per-candidate path,
//!   [`mean_return`] over `CARTPOLE_EPISODES` (5) episodes, building the
//!   `Mlp` for each candidate;
//! - `cartpole_batch64_steps_per_s`: [`mean_returns`] over 64 candidates
//!   x 5 episodes per call (`Task::evaluate_many`), the lanes spread over
//!   candidates;
//! - `cartpole_sequential_steps_per_s`: [`run_episode`], one episode at a
//!   time (latency-bound: forward pass and physics form one chain).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use evod_runtime::cartpole::{
    balancing_policy, mean_return, mean_returns, run_episode, run_episodes,
};
use evod_runtime::mlp::{Mlp, MlpLanes};
use evod_runtime::task::CARTPOLE_EPISODES;

const REPEATS: usize = 7;
const EPISODES_PER_REPEAT: u64 = 2000;
const PEER_SECONDS: f64 = 2.0;
const PEER_REPEATS: usize = 3;
const BATCH: usize = 64;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time of the calling thread: unlike wall time, not inflated when
/// other processes share the core.
fn thread_cpu_seconds() -> Result<f64, nix::Error> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)?;
    Ok(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

fn python() -> PathBuf {
    std::env::var_os("EVOD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_path = std::env::args()
        .nth(1)
        .ok_or("usage: bench_runtime OUTPUT.json")?;
    let (arch, params) = balancing_policy();

    // evod: one core, full-length episodes.
    let mut lanes = MlpLanes::new(&arch, &params)?;
    let mut seed = 0u64;
    // Warm-up.
    run_episodes(&mut lanes, seed, 100, |_, s| {
        std::hint::black_box(s);
    })?;
    let mut figures = Vec::new();
    let mut cpu_figures = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        let cpu_start = thread_cpu_seconds()?;
        let mut steps = 0u64;
        run_episodes(
            &mut lanes,
            std::hint::black_box(seed),
            EPISODES_PER_REPEAT as u32,
            |_, s| steps += u64::from(s),
        )?;
        seed += EPISODES_PER_REPEAT;
        figures.push(steps as f64 / start.elapsed().as_secs_f64());
        cpu_figures.push(steps as f64 / (thread_cpu_seconds()? - cpu_start));
    }
    let evod = median(figures.clone());
    let evod_cpu = median(cpu_figures.clone());
    eprintln!(
        "evod cartpole, 8 episodes in lockstep: {evod:.0} steps/s, {evod_cpu:.0} per CPU second (median of {REPEATS})"
    );

    let mut eval_figures = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        let mut steps = 0.0;
        for _ in 0..EPISODES_PER_REPEAT / u64::from(CARTPOLE_EPISODES) {
            let mean = mean_return(
                &arch,
                &params,
                std::hint::black_box(seed),
                CARTPOLE_EPISODES,
            )?;
            steps += mean * f64::from(CARTPOLE_EPISODES);
            seed += u64::from(CARTPOLE_EPISODES);
        }
        eval_figures.push(steps / start.elapsed().as_secs_f64());
    }
    let eval5 = median(eval_figures.clone());
    eprintln!("evod cartpole, {CARTPOLE_EPISODES}-episode evaluations: {eval5:.0} steps/s");

    // The worker's batch: 64 candidates x 5 episodes in one call.
    let batch: Vec<&[f32]> = vec![&params; BATCH];
    let mut batch_figures = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        let mut steps = 0.0;
        for _ in 0..EPISODES_PER_REPEAT / (BATCH as u64 * u64::from(CARTPOLE_EPISODES)) {
            let means = mean_returns(&arch, &batch, std::hint::black_box(seed), CARTPOLE_EPISODES)?;
            steps += means.iter().sum::<f64>() * f64::from(CARTPOLE_EPISODES);
            seed += u64::from(CARTPOLE_EPISODES);
        }
        batch_figures.push(steps / start.elapsed().as_secs_f64());
    }
    let batch64 = median(batch_figures.clone());
    eprintln!(
        "evod cartpole, batches of {BATCH} candidates x {CARTPOLE_EPISODES} episodes: {batch64:.0} steps/s"
    );

    let mut policy = Mlp::new(&arch, &params)?;
    let mut seq_figures = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        let mut steps = 0u64;
        for _ in 0..EPISODES_PER_REPEAT {
            steps += u64::from(run_episode(&mut policy, std::hint::black_box(seed)));
            seed += 1;
        }
        seq_figures.push(steps as f64 / start.elapsed().as_secs_f64());
    }
    let sequential = median(seq_figures.clone());
    eprintln!("evod cartpole, one episode at a time: {sequential:.0} steps/s");

    // gymnasium + numpy, same policy.
    let dir = std::env::temp_dir().join(format!("evod-bench-runtime-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let weights = dir.join("weights.json");
    std::fs::write(
        &weights,
        serde_json::json!({"layers": arch.layers, "params": params}).to_string(),
    )?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/gymnasium_bench.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&weights)
        .arg(PEER_SECONDS.to_string())
        .arg(PEER_REPEATS.to_string())
        .output()?;
    std::fs::remove_dir_all(&dir)?;
    if !out.status.success() {
        return Err(format!(
            "gymnasium benchmark failed (run `cargo xtask venv`?): {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let peer: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let peer_figures: Vec<f64> = peer["steps_per_s"]
        .as_array()
        .ok_or("peer printed no steps_per_s")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    let gym = median(peer_figures.clone());
    eprintln!(
        "gymnasium + numpy: {gym:.0} steps/s; ratio {:.1}x",
        evod / gym
    );

    let report = serde_json::json!({
        "cartpole_steps_per_s": evod,
        "cartpole_steps_per_s_samples": figures,
        "cartpole_steps_per_cpu_s": evod_cpu,
        "cartpole_steps_per_cpu_s_samples": cpu_figures,
        "cartpole_eval5_steps_per_s": eval5,
        "cartpole_eval5_steps_per_s_samples": eval_figures,
        "cartpole_batch64_steps_per_s": batch64,
        "cartpole_batch64_steps_per_s_samples": batch_figures,
        "cartpole_sequential_steps_per_s": sequential,
        "cartpole_sequential_steps_per_s_samples": seq_figures,
        "gymnasium_steps_per_s": gym,
        "gymnasium_steps_per_s_samples": peer_figures,
        "ratio_vs_gymnasium": evod / gym,
        "policy": "4-16-2 tanh, balancing_policy (every episode 500 steps)",
        // TODO(worker): EVAL through the ring, 114-weight policies in
        // batches of 64; measured by the worker's benchmark, not here.
        "eval_candidates_per_s": null,
    });
    std::fs::write(&out_path, serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
