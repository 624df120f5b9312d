//! A tied control vector (`evod init --directions tied`): every direction
//! takes the first one's noise, so every candidate of either strategy, the
//! ES mean and a resumed run keep the directions equal, and the search
//! still improves; a per-layer vector's candidates differ per direction.

use std::sync::{Arc, Mutex};

use evod_evolve::{
    Evolver, EvolverConfig, FnEvaluator, ParamLayout, StrategyKind, load_checkpoint,
    save_checkpoint,
};
use evod_runtime::Architecture;

const N_EMBD: usize = 6;
const DIRECTIONS: usize = 4;

fn arch(tied: bool) -> Architecture {
    Architecture::control_vector(N_EMBD, DIRECTIONS, "llama")
        .unwrap()
        .with_tied_directions(tied)
}

/// The per-coordinate target every direction is pulled towards.
fn target(j: usize) -> f64 {
    0.02 * (j as f64 + 1.0) * if j.is_multiple_of(2) { 1.0 } else { -1.0 }
}

/// −Σ over directions of ‖d − target‖²: maximum 0, at tied directions.
fn fitness(x: &[f32]) -> f64 {
    -x.chunks(N_EMBD)
        .flat_map(|d| {
            d.iter()
                .enumerate()
                .map(|(j, &v)| (f64::from(v) - target(j)).powi(2))
        })
        .sum::<f64>()
}

fn tied_up(x: &[f32]) -> bool {
    x.chunks(N_EMBD).all(|d| d == &x[..N_EMBD])
}

fn config(kind: StrategyKind) -> EvolverConfig {
    let mut c = EvolverConfig {
        strategy: kind,
        seed: 11,
        population: 8,
        ..EvolverConfig::default()
    };
    // Steps the size of the targets (a direction's scale is √(2/7)).
    c.es.sigma = 0.05;
    c.es.learning_rate = 0.02;
    c.ga.sigma = 0.05;
    c
}

/// Runs `gens` generations; returns the evolver, and how many candidates
/// were evaluated and how many of them had equal directions.
fn run(kind: StrategyKind, tied: bool, gens: u64) -> (Evolver, usize, usize) {
    let mut ev = Evolver::new(
        config(kind),
        &arch(tied),
        vec![0.0; N_EMBD * DIRECTIONS],
        None,
    )
    .unwrap();
    let seen = Arc::new(Mutex::new((0usize, 0usize)));
    let s = Arc::clone(&seen);
    let mut e = FnEvaluator::new(move |x: &[f32], _, _| {
        let mut s = s.lock().unwrap();
        s.0 += 1;
        s.1 += usize::from(tied_up(x));
        Some(fitness(x))
    });
    for _ in 0..gens {
        ev.step(&mut e).unwrap();
    }
    let (n, t) = *seen.lock().unwrap();
    (ev, n, t)
}

#[test]
fn a_tied_layout_gives_every_direction_the_first_ones_noise() {
    let tied = ParamLayout::from_architecture(&arch(true)).unwrap();
    assert!(tied.has_tied_noise());
    for (k, t) in tied.tensors().iter().enumerate() {
        assert_eq!(t.name, format!("direction.{}", k + 1));
        assert_eq!((t.offset, t.noise_offset), (k * N_EMBD, 0));
    }
    let own = ParamLayout::from_architecture(&arch(false)).unwrap();
    assert!(!own.has_tied_noise());
    assert!(own.tensors().iter().all(|t| t.noise_offset == t.offset));
}

#[test]
fn every_candidate_of_a_tied_vector_has_equal_directions_and_the_search_improves() {
    for kind in [StrategyKind::Es, StrategyKind::Ga] {
        let start = fitness(&[0.0; N_EMBD * DIRECTIONS]);
        let (ev, n, t) = run(kind, true, 60);
        assert!(n >= 60 * 8, "{kind}: only {n} candidates evaluated");
        assert_eq!(
            t,
            n,
            "{kind}: {} of {n} candidates had unequal directions",
            n - t
        );
        let (best, f) = ev.best();
        assert!(tied_up(best), "{kind}: the best has unequal directions");
        assert!(
            f > start * 0.5,
            "{kind}: best {f} did not improve enough from {start}"
        );
    }
    // The peer: per-layer directions each take their own noise.
    for kind in [StrategyKind::Es, StrategyKind::Ga] {
        let (_, n, t) = run(kind, false, 5);
        assert!(
            t < n / 2,
            "{kind}: {t} of {n} per-layer candidates were tied"
        );
    }
}

#[test]
fn a_resumed_tied_run_stays_tied_and_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [StrategyKind::Es, StrategyKind::Ga] {
        let (full, _, _) = run(kind, true, 30);
        let (half, _, _) = run(kind, true, 12);
        let path = dir.path().join(format!("{kind}.ckpt"));
        save_checkpoint(&path, &half.checkpoint()).unwrap();
        drop(half);
        // The checkpoint names the tensors; the architecture says they are
        // tied.
        let mut resumed =
            Evolver::from_checkpoint(load_checkpoint(&path).unwrap(), &arch(true)).unwrap();
        let mut e = FnEvaluator::new(move |x: &[f32], _, _| {
            assert!(
                tied_up(x),
                "{kind}: a resumed run made unequal directions: {x:?}"
            );
            Some(fitness(x))
        });
        for _ in 12..30 {
            resumed.step(&mut e).unwrap();
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(resumed.best().0),
            bits(full.best().0),
            "{kind}: the resumed run diverged"
        );
    }
}
