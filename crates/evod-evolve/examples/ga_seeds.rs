//! GA generations to solve CartPole-v1 (4-16-2 tanh, defaults) over seeds 0..96.
use evod_evolve::{EvolverConfig, solve_in_process};
use evod_runtime::{Activation, Architecture, Task};
fn main() {
    let arch = Architecture {
        layers: vec![4, 16, 2],
        activation: Activation::Tanh,
        family: evod_runtime::Family::Mlp,
    };
    let config = EvolverConfig::default();
    let mut g = Vec::new();
    for seed in 0..96u64 {
        let c = EvolverConfig {
            seed,
            ..config.clone()
        };
        let r = solve_in_process(
            c,
            &arch,
            Task::CartPole {
                episodes: config.episodes,
            },
            300,
        )
        .expect("solve");
        assert!(r.solved, "seed {seed} unsolved");
        g.push(r.generations as f64);
    }
    let mean = g.iter().sum::<f64>() / g.len() as f64;
    g.sort_by(f64::total_cmp);
    println!(
        "ga seeds 0-95: mean {mean:.2} generations, median {}",
        (g[47] + g[48]) / 2.0
    );
}
