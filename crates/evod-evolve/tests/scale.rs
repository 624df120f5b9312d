//! Scale-relative evolution: with the default configuration, networks from
//! 10² to 10⁶ parameters produce candidates that pass validation and
//! improve; ES candidates travel as recipes that any evaluator regenerates
//! bit-identically; a run that cannot progress says why.

use evod_evolve::{
    Base, EvalError, Evaluator, EvolveError, Evolver, EvolverConfig, FnEvaluator,
    InProcessEvaluator, NoProgress, ParamLayout, ProgressGuard, Recipe, RejectionKind, Sign,
    StrategyKind, TensorScale, Validator, load_checkpoint, save_checkpoint,
};
use evod_runtime::{Activation, Architecture, Task, init_params};

fn sine_arch(layers: &[usize]) -> Architecture {
    Architecture::new(layers.to_vec(), Activation::Tanh).unwrap()
}

/// The case: `evod init --task sine --layers 1,512,256,1` (132,609
/// parameters) evolved with the defaults. Before scale-relative bounds every
/// candidate was rejected ("blk.0.weight changed by 4.4e0 … above 4.0").
#[test]
fn sine_1_512_256_1_passes_validation_and_improves_with_defaults() {
    let arch = sine_arch(&[1, 512, 256, 1]);
    assert_eq!(arch.n_params(), 132_609);
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let config = EvolverConfig {
            strategy: kind,
            population: 16,
            seed: 5,
            ..EvolverConfig::default()
        };
        let initial = init_params(&arch, 5);
        let start = Task::Sine.evaluate(&arch, &initial, 0).unwrap();
        let mut ev = Evolver::new(config, &arch, initial, None).unwrap();
        let mut e = InProcessEvaluator::new(Task::Sine, arch.clone(), 2).unwrap();
        let mut best = f64::NEG_INFINITY;
        for g in 0..6 {
            let r = ev.step(&mut e).unwrap();
            assert!(
                ev.no_progress().is_none(),
                "{kind} generation {g}: {:?}",
                ev.no_progress()
            );
            assert!(r.evaluations >= 16, "{kind} generation {g}: {r:?}");
            best = best.max(r.best_fitness);
        }
        let s = ev.stats();
        assert!(
            s.rejected * 10 <= s.evaluations,
            "{kind}: {} rejections for {} evaluations: {s:?}",
            s.rejected,
            s.evaluations
        );
        assert!(
            best > start + 0.02,
            "{kind}: best fitness {best} did not improve on the start {start}"
        );
    }
}

/// A ~10⁶-parameter network (1-1024-1024-1): default candidates pass
/// validation and both strategies climb a linear fitness of every value
/// (cheap, so the test measures the evolution machinery, not a forward
/// pass), then improve the sine task through the in-process evaluator.
#[test]
fn million_parameter_network_evolves_with_defaults() {
    let arch = sine_arch(&[1, 1024, 1024, 1]);
    assert!(arch.n_params() > 1_000_000);
    let initial = init_params(&arch, 1);
    let fitness = |x: &[f32]| -> f64 { x.iter().map(|&a| f64::from(a)).sum::<f64>() };
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let config = EvolverConfig {
            strategy: kind,
            population: 8,
            seed: 9,
            ..EvolverConfig::default()
        };
        let mut ev = Evolver::new(config, &arch, initial.clone(), None).unwrap();
        let mut e = FnEvaluator::new(|x: &[f32], _, _| Some(fitness(x)));
        let start = fitness(&initial);
        let mut best = f64::NEG_INFINITY;
        for _ in 0..3 {
            let r = ev.step(&mut e).unwrap();
            assert_eq!(r.rejected, 0, "{kind}: {:?}", ev.stats());
            best = best.max(r.best_fitness);
        }
        assert!(best > start, "{kind}: {best} ≤ {start}");
    }
    // And on the sine task itself, through the in-process evaluator.
    let start = Task::Sine.evaluate(&arch, &initial, 0).unwrap();
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let config = EvolverConfig {
            strategy: kind,
            population: 8,
            seed: 9,
            ..EvolverConfig::default()
        };
        let mut ev = Evolver::new(config, &arch, initial.clone(), None).unwrap();
        let mut e = InProcessEvaluator::new(Task::Sine, arch.clone(), 2).unwrap();
        let mut best = f64::NEG_INFINITY;
        for _ in 0..3 {
            let r = ev.step(&mut e).unwrap();
            assert_eq!(r.rejected, 0, "{kind}: {:?}", ev.stats());
            best = best.max(r.best_fitness);
        }
        assert!(best > start, "{kind} on sine: {best} ≤ {start}");
    }
}

fn toy_layout() -> ParamLayout {
    ParamLayout::new(vec![
        ("blk.0.weight".into(), vec![3, 4]),
        ("blk.0.bias".into(), vec![4]),
    ])
    .unwrap()
}

fn toy_fitness(x: &[f32], seed: u64) -> f64 {
    -x.iter().map(|&v| (f64::from(v) - 0.5).powi(2)).sum::<f64>() + (seed % 7) as f64 * 1e-3
}

/// A remote evaluator: it receives only recipes, holds its own copy of the
/// base (as a worker maps the base file), and regenerates every candidate.
struct RemoteLike {
    layout: ParamLayout,
    recipes_seen: usize,
    vectors_seen: usize,
}

impl Evaluator for RemoteLike {
    fn evaluate(&mut self, c: &[&[f32]], seed: u64, _: u32) -> Result<Vec<Option<f64>>, EvalError> {
        self.vectors_seen += c.len();
        Ok(c.iter().map(|x| Some(toy_fitness(x, seed))).collect())
    }

    fn evaluate_recipes(
        &mut self,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        _: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        // The bytes a worker would receive, and its own mapped copy.
        let mapped = base.params().to_vec();
        let mine = Base::new(&mapped, &self.layout).unwrap();
        let mut buf = vec![0.0; mapped.len()];
        let mut out = Vec::new();
        for r in recipes {
            assert_eq!(r.base, mine.checksum());
            r.apply_to(&mine, &mut buf).unwrap();
            out.push(Some(toy_fitness(&buf, seed)));
            self.recipes_seen += 1;
        }
        Ok(out)
    }
}

#[test]
fn es_candidates_travel_as_recipes_and_remote_regeneration_is_bit_identical() {
    let config = EvolverConfig {
        strategy: StrategyKind::Es,
        population: 16,
        seed: 21,
        solve_threshold: Some(-0.5),
        ..EvolverConfig::default()
    };
    let start = vec![0.1f32; 16];
    let mut local =
        Evolver::with_layout(config.clone(), toy_layout(), start.clone(), None).unwrap();
    let mut remote = Evolver::with_layout(config, toy_layout(), start, None).unwrap();
    let mut fe = FnEvaluator::new(|x: &[f32], s, _| Some(toy_fitness(x, s)));
    let mut re = RemoteLike {
        layout: toy_layout(),
        recipes_seen: 0,
        vectors_seen: 0,
    };
    for g in 0..12 {
        let a = local.step(&mut fe).unwrap();
        let b = remote.step(&mut re).unwrap();
        assert_eq!(a, b, "generation {g}");
    }
    assert_eq!(local.checkpoint(), remote.checkpoint());
    assert_eq!(re.vectors_seen, 0, "ES sent full vectors");
    assert!(re.recipes_seen >= 12 * 17, "{}", re.recipes_seen);
}

#[test]
fn recipe_is_mean_plus_signed_scaled_noise_and_refuses_a_wrong_base() {
    let layout = toy_layout();
    let base_params: Vec<f32> = (0..16).map(|i| i as f32 * 0.01).collect();
    let base = Base::new(&base_params, &layout).unwrap();
    let plus = Recipe::new(base.checksum(), 77, 0.5, Sign::Plus, TensorScale::Glorot);
    let minus = Recipe {
        sign: Sign::Minus,
        ..plus
    };
    let p = plus.materialize(&base).unwrap();
    let m = minus.materialize(&base).unwrap();
    let scales = layout.scales(TensorScale::Glorot);
    assert_eq!(scales[0], (2.0f32 / 7.0).sqrt());
    // The bias takes its weight's scale.
    assert_eq!(scales[1], scales[0]);
    let lone = ParamLayout::new(vec![("b".into(), vec![4])]).unwrap();
    assert_eq!(lone.scales(TensorScale::Glorot), [(2.0f32 / 5.0).sqrt()]);
    assert_eq!(layout.scales(TensorScale::Unit), [1.0, 1.0]);
    for t in layout.tensors().iter().zip(&scales) {
        let (span, &s) = t;
        for i in span.range() {
            let e = evod_evolve::noise::at(77, i as u64);
            assert_eq!(p[i].to_bits(), (base_params[i] + 0.5 * s * e).to_bits());
            assert_eq!(m[i].to_bits(), (base_params[i] + -0.5 * s * e).to_bits());
        }
    }
    assert_eq!(
        Recipe::center(base.checksum(), TensorScale::Glorot)
            .materialize(&base)
            .unwrap(),
        base_params
    );
    let other = vec![0.0f32; 16];
    let wrong = Base::new(&other, &layout).unwrap();
    assert!(matches!(
        plus.materialize(&wrong),
        Err(evod_evolve::RecipeError::WrongBase { .. })
    ));
}

#[test]
fn es_resumed_from_a_checkpoint_ends_bit_identical() {
    let config = EvolverConfig {
        strategy: StrategyKind::Es,
        population: 12,
        seed: 4,
        ..EvolverConfig::default()
    };
    let start = vec![0.0f32; 16];
    let mut e = FnEvaluator::new(|x: &[f32], s, _| Some(toy_fitness(x, s)));
    let mut whole =
        Evolver::with_layout(config.clone(), toy_layout(), start.clone(), None).unwrap();
    for _ in 0..10 {
        whole.step(&mut e).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt");
    let mut first = Evolver::with_layout(config, toy_layout(), start, None).unwrap();
    for _ in 0..4 {
        first.step(&mut e).unwrap();
    }
    save_checkpoint(&path, &first.checkpoint()).unwrap();
    drop(first);
    let mut resumed =
        Evolver::from_checkpoint_with_layout(load_checkpoint(&path).unwrap()).unwrap();
    for _ in 4..10 {
        resumed.step(&mut e).unwrap();
    }
    assert_eq!(resumed.checkpoint(), whole.checkpoint());
}

#[test]
fn every_candidate_rejected_is_reported_and_the_guard_gives_up() {
    let mut config = EvolverConfig {
        population: 8,
        seed: 2,
        ..EvolverConfig::default()
    };
    config.validation.max_relative_change = 1e-6;
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        config.strategy = kind;
        let mut ev =
            Evolver::with_layout(config.clone(), toy_layout(), vec![0.1; 16], None).unwrap();
        let mut e = FnEvaluator::new(|x: &[f32], s, _| Some(toy_fitness(x, s)));
        let mut guard = ProgressGuard::new(3);
        let mut steps = 0;
        let err = loop {
            ev.step(&mut e).unwrap();
            steps += 1;
            match ev.no_progress() {
                Some(NoProgress::AllRejected { dominant, .. }) => {
                    assert_eq!(*dominant, RejectionKind::ChangeTooLarge)
                }
                other => panic!("{kind}: {other:?}"),
            }
            if let Err(err) = guard.observe(&ev) {
                break err;
            }
            assert!(steps < 3, "{kind}: the guard did not stop the run");
        };
        assert_eq!(steps, 3, "{kind}");
        assert!(
            matches!(err, EvolveError::NoProgress { generations: 3, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("rejected") && msg.contains("ChangeTooLarge"),
            "{msg}"
        );
    }
}

#[test]
fn every_evaluation_failing_is_reported_and_progress_resets_the_guard() {
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let config = EvolverConfig {
            strategy: kind,
            population: 8,
            ..EvolverConfig::default()
        };
        let mut ev = Evolver::with_layout(config, toy_layout(), vec![0.1; 16], None).unwrap();
        let mut broken = FnEvaluator::new(|_: &[f32], _, _| None);
        let mut fine = FnEvaluator::new(|x: &[f32], s, _| Some(toy_fitness(x, s)));
        let mut guard = ProgressGuard::new(2);
        ev.step(&mut broken).unwrap();
        assert!(
            matches!(ev.no_progress(), Some(NoProgress::AllFailed { .. })),
            "{kind}: {:?}",
            ev.no_progress()
        );
        guard.observe(&ev).unwrap();
        ev.step(&mut fine).unwrap();
        assert_eq!(ev.no_progress(), None);
        guard.observe(&ev).unwrap();
        assert_eq!(guard.useless(), 0);
        ev.step(&mut broken).unwrap();
        guard.observe(&ev).unwrap();
        let err = guard.observe(&ev).unwrap_err();
        assert!(err.to_string().contains("every evaluation failed"), "{err}");
    }
    // Whole-batch evaluator errors count too.
    let mut guard = ProgressGuard::new(2);
    let e = EvolveError::Eval {
        generation: 0,
        source: EvalError::Unavailable("no worker".into()),
    };
    guard.observe_error(&e).unwrap();
    let err = guard.observe_error(&e).unwrap_err();
    assert!(err.to_string().contains("no worker"), "{err}");
}

#[test]
fn bounds_are_per_element_and_scale_relative() {
    // The same relative perturbation passes for a tensor of 12 and one of
    // 10⁶ values; the same RMS blow-up fails for both.
    for n in [4u64, 1000] {
        let layout = ParamLayout::new(vec![("w".into(), vec![n, n])]).unwrap();
        let s = TensorScale::Glorot.of(&[n, n]);
        let v = Validator::new(Default::default(), layout, TensorScale::Glorot);
        let len = (n * n) as usize;
        let parent: Vec<f32> = (0..len)
            .map(|i| s * evod_evolve::noise::at(1, i as u64) * 1.7)
            .collect();
        let child: Vec<f32> = parent
            .iter()
            .enumerate()
            .map(|(i, &p)| p + 2.0 * s * evod_evolve::noise::at(2, i as u64))
            .collect();
        v.check_candidate(&child, &[&parent]).unwrap();
        let blown: Vec<f32> = parent.iter().map(|&p| p * 200.0).collect();
        assert!(matches!(
            v.check_static(&blown),
            Err(evod_evolve::Rejection::NormTooLarge { .. })
        ));
        let far: Vec<f32> = parent.iter().map(|&p| p * 6.0).collect();
        assert!(matches!(
            v.check_candidate(&far, &[&parent]),
            Err(evod_evolve::Rejection::ChangeTooLarge { .. })
        ));
    }
}

#[test]
fn in_process_evaluator_regenerates_recipes_to_the_same_fitness() {
    for (task, arch) in [
        (Task::Sine, sine_arch(&[1, 32, 16, 1])),
        (Task::CartPole { episodes: 1 }, sine_arch(&[4, 16, 2])),
    ] {
        let layout = ParamLayout::from_architecture(&arch).unwrap();
        let params = init_params(&arch, 3);
        let base = Base::new(&params, &layout).unwrap();
        let recipes: Vec<Recipe> = (0..5u64)
            .flat_map(|seed| {
                [Sign::Plus, Sign::Minus]
                    .map(|sign| Recipe::new(base.checksum(), seed, 0.7, sign, TensorScale::Glorot))
            })
            .collect();
        let vectors: Vec<Vec<f32>> = recipes
            .iter()
            .map(|r| r.materialize(&base).unwrap())
            .collect();
        let refs: Vec<&[f32]> = vectors.iter().map(Vec::as_slice).collect();
        let mut e = InProcessEvaluator::new(task.clone(), arch.clone(), 3).unwrap();
        let want = e.evaluate(&refs, 8, 7).unwrap();
        assert_eq!(
            e.evaluate_recipes(&base, &recipes, 8, 7).unwrap(),
            want,
            "{task}"
        );
        // One candidate split into episode ranges across the threads.
        let one = e.evaluate(&refs[3..4], 8, 7).unwrap();
        assert_eq!(
            e.evaluate_recipes(&base, &recipes[3..4], 8, 7).unwrap(),
            one,
            "{task}"
        );
    }
}

#[test]
fn a_version_1_checkpoint_is_refused_with_a_clear_error() {
    let ev =
        Evolver::with_layout(EvolverConfig::default(), toy_layout(), vec![0.0; 16], None).unwrap();
    let mut bytes = evod_evolve::encode_checkpoint(&ev.checkpoint()).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let err = evod_evolve::decode_checkpoint(std::path::Path::new("old.ckpt"), &bytes).unwrap_err();
    assert!(
        matches!(
            err,
            EvolveError::UnsupportedVersion {
                found: 1,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("old.ckpt"), "{err}");
}

#[test]
fn recipes_round_trip_through_22_bytes_and_bad_bytes_are_refused() {
    let r = Recipe::new(
        0xDEAD_BEEF_0123_4567,
        99,
        0.6,
        Sign::Minus,
        TensorScale::Glorot,
    );
    let bytes = r.to_bytes();
    assert_eq!(bytes.len(), evod_evolve::RECIPE_BYTES);
    assert_eq!(Recipe::from_bytes(&bytes).unwrap(), r);
    let center = Recipe::center(7, TensorScale::Unit);
    assert_eq!(Recipe::from_bytes(&center.to_bytes()).unwrap(), center);
    let refused = |b: &[u8]| {
        matches!(
            Recipe::from_bytes(b),
            Err(evod_evolve::RecipeError::Encoding(_))
        )
    };
    assert!(refused(&bytes[..21]));
    let mut bad = bytes;
    bad[20] = 2;
    assert!(refused(&bad));
    let mut bad = bytes;
    bad[21] = 9;
    assert!(refused(&bad));
    let mut bad = bytes;
    bad[16..20].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
    assert!(refused(&bad));
}
