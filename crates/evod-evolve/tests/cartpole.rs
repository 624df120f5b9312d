//! The loop on the real task: CartPole-v1 through `evod_runtime`.

use evod_evolve::{
    Evaluator, EvolveError, Evolver, EvolverConfig, InProcessEvaluator, StrategyKind,
    load_checkpoint, save_checkpoint, solve_in_process,
};
use evod_runtime::{Activation, Architecture, Task, cartpole, init_params};

fn arch() -> Architecture {
    Architecture {
        layers: vec![4, 16, 2],
        activation: Activation::Tanh,
        family: evod_runtime::Family::Mlp,
    }
}

#[test]
fn default_config_solves_cartpole_through_the_100_episode_gate() {
    let r = solve_in_process(
        EvolverConfig {
            seed: 1,
            ..EvolverConfig::default()
        },
        &arch(),
        Task::CartPole { episodes: 1 },
        300,
    )
    .unwrap();
    assert!(
        r.solved,
        "not solved in {} generations (best {})",
        r.generations, r.fitness
    );
    assert!(r.fitness >= 475.0);
    // Re-judged independently on 100 other episodes.
    let again = cartpole::mean_return(&arch(), &r.params, 12_345, 100).unwrap();
    assert!(
        again >= 400.0,
        "solution scores only {again} on other seeds"
    );
}

#[test]
fn es_improves_cartpole() {
    let config = EvolverConfig {
        strategy: StrategyKind::Es,
        seed: 3,
        ..EvolverConfig::default()
    };
    let mut ev = Evolver::new(config, &arch(), init_params(&arch(), 3), None).unwrap();
    let mut e = InProcessEvaluator::new(Task::CartPole { episodes: 1 }, arch(), 2).unwrap();
    let first = ev.step(&mut e).unwrap().mean_fitness;
    let mut last = first;
    for _ in 0..15 {
        last = ev.step(&mut e).unwrap().mean_fitness;
    }
    assert!(
        last > first + 20.0,
        "es mean return went from {first} to {last}"
    );
}

#[test]
fn cartpole_run_is_reproducible_and_resumable_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let config = EvolverConfig {
            strategy: kind,
            seed: 9,
            population: 16,
            ..EvolverConfig::default()
        };
        let run = |gens: u64, threads: usize| {
            let mut ev =
                Evolver::new(config.clone(), &arch(), init_params(&arch(), 9), None).unwrap();
            let mut e =
                InProcessEvaluator::new(Task::CartPole { episodes: 1 }, arch(), threads).unwrap();
            for _ in 0..gens {
                ev.step(&mut e).unwrap();
            }
            ev
        };
        let full = run(8, 2);
        // Thread count does not change results.
        assert_eq!(run(8, 1).checkpoint(), full.checkpoint(), "{kind}");
        let path = dir.path().join("ckpt");
        save_checkpoint(&path, &run(3, 2).checkpoint()).unwrap();
        let mut resumed =
            Evolver::from_checkpoint(load_checkpoint(&path).unwrap(), &arch()).unwrap();
        let mut e = InProcessEvaluator::new(Task::CartPole { episodes: 1 }, arch(), 2).unwrap();
        for _ in 3..8 {
            resumed.step(&mut e).unwrap();
        }
        assert_eq!(resumed.checkpoint(), full.checkpoint(), "{kind}");
        // The checkpoint refuses another architecture.
        let other = Architecture {
            layers: vec![4, 8, 2],
            activation: Activation::Tanh,
            family: evod_runtime::Family::Mlp,
        };
        let err = Evolver::from_checkpoint(load_checkpoint(&path).unwrap(), &other).unwrap_err();
        assert!(matches!(err, EvolveError::CheckpointMismatch(_)), "{err}");
    }
}

#[test]
fn in_process_evaluator_matches_the_runtime_and_splits_the_gate() {
    let (a, p) = cartpole::balancing_policy();
    let mut e = InProcessEvaluator::new(Task::CartPole { episodes: 1 }, a.clone(), 2).unwrap();
    let zeros = vec![0.0f32; a.n_params()];
    let got = e.evaluate(&[&p, &zeros], 77, 7).unwrap();
    assert_eq!(got[0], Some(cartpole::mean_return(&a, &p, 77, 7).unwrap()));
    assert_eq!(
        got[1],
        Some(cartpole::mean_return(&a, &zeros, 77, 7).unwrap())
    );
    // One candidate over 2 threads: episodes split, same mean.
    let gate = e.evaluate(&[&zeros], 5, 100).unwrap();
    assert_eq!(
        gate[0],
        Some(cartpole::mean_return(&a, &zeros, 5, 100).unwrap())
    );
    // Supervised tasks ignore seed and episodes.
    let xa = Architecture {
        layers: vec![2, 4, 1],
        activation: Activation::Tanh,
        family: evod_runtime::Family::Mlp,
    };
    let xp = init_params(&xa, 1);
    let mut x = InProcessEvaluator::new(Task::Xor, xa.clone(), 2).unwrap();
    assert_eq!(
        x.evaluate(&[&xp], 1, 3).unwrap()[0],
        Some(Task::Xor.evaluate(&xa, &xp, 0).unwrap())
    );
    // An architecture that does not fit the task is refused.
    assert!(InProcessEvaluator::new(Task::Xor, a, 1).is_err());
}
