//! The evolver's own cost of one ES generation, without any evaluation:
//! ask (draw and validate the pairs), the evaluator call (an evaluator that
//! takes the recipes and returns a fitness at once) and tell (the gradient
//! and the Adam update), for a 4-H-H-2 network, on this process's cores.
//!
//! Usage: `cargo run --release -p evod-evolve --example bench_es_generation
//! [H] [GENERATIONS]` (default 1000 and 12); prints the median and the
//! fastest generation, wall and CPU time of the process.

use std::time::Instant;

use evod_evolve::{Base, EvalError, Evaluator, Evolver, EvolverConfig, Recipe, StrategyKind};
use evod_runtime::{Activation, Architecture};

/// Fitness from the recipe alone: enough for ranks, no work.
struct Instant0;

impl Evaluator for Instant0 {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        _seed: u64,
        _episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        Ok(candidates.iter().map(|c| Some(f64::from(c[0]))).collect())
    }

    fn evaluate_recipes(
        &mut self,
        _base: &Base<'_>,
        recipes: &[Recipe],
        _seed: u64,
        _episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        Ok(recipes
            .iter()
            .map(|r| Some((r.seed % 1000) as f64 + r.sign.factor() as f64))
            .collect())
    }
}

/// CPU time of this process (all threads), seconds.
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime: fields 14 and 15, i.e. 11 and 12 after the state.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn main() {
    let h: usize = std::env::args()
        .nth(1)
        .map_or(1000, |s| s.parse().expect("H"));
    let gens: usize = std::env::args()
        .nth(2)
        .map_or(12, |s| s.parse().expect("generations"));
    let arch = Architecture::new(vec![4, h, h, 2], Activation::Tanh).expect("arch");
    let params = evod_runtime::init_params(&arch, 0);
    let config = EvolverConfig {
        strategy: StrategyKind::Es,
        solve_threshold: Some(1e9),
        ..EvolverConfig::default()
    };
    let mut evolver = Evolver::new(config, &arch, params, None).expect("evolver");
    let mut times = Vec::new();
    let (c0, w0) = (cpu(), Instant::now());
    for _ in 0..gens {
        let t = Instant::now();
        evolver.step(&mut Instant0).expect("step");
        times.push(t.elapsed().as_secs_f64());
    }
    let (cpu_s, wall_s) = (cpu() - c0, w0.elapsed().as_secs_f64());
    times.sort_by(f64::total_cmp);
    println!(
        "4-{h}-{h}-2 ({} params), ES population 48: generation median {:.1} ms, fastest {:.1} ms; CPU {:.1} ms per generation ({} threads available); rejected {}",
        arch.n_params(),
        times[times.len() / 2] * 1e3,
        times[0] * 1e3,
        cpu_s / gens as f64 * 1e3,
        std::thread::available_parallelism().map_or(1, usize::from),
        evolver.stats().rejected,
    );
    let _ = wall_s;
}
