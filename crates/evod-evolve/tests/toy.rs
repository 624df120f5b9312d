//! The loop on toy fitness functions (sphere, rastrigin): convergence,
//! determinism, resume, validation before evaluation, gate and quarantine.

use evod_evolve::{
    Checkpoint, EvalError, Evaluator, EvolveError, Evolver, EvolverConfig, FnEvaluator,
    ParamLayout, Rejection, StrategyKind, Validator, load_checkpoint, save_checkpoint,
};

fn layout() -> ParamLayout {
    ParamLayout::new(vec![
        ("blk.0.weight".into(), vec![3, 4]),
        ("blk.0.bias".into(), vec![4]),
    ])
    .unwrap()
}

/// −‖x − 0.5‖², maximum 0.
fn sphere(x: &[f32]) -> f64 {
    -x.iter().map(|&v| (f64::from(v) - 0.5).powi(2)).sum::<f64>()
}

/// −rastrigin(x − 0.5) with noise from the seed (so seeds matter).
fn noisy_rastrigin(x: &[f32], seed: u64) -> f64 {
    let r: f64 = x
        .iter()
        .map(|&v| {
            let z = f64::from(v) - 0.5;
            z * z - 10.0 * (2.0 * std::f64::consts::PI * z).cos() + 10.0
        })
        .sum();
    -r + (seed % 1000) as f64 * 1e-4
}

fn config(kind: StrategyKind, seed: u64) -> EvolverConfig {
    EvolverConfig {
        strategy: kind,
        seed,
        population: 16,
        ..EvolverConfig::default()
    }
}

fn run(kind: StrategyKind, seed: u64, gens: u64) -> (Evolver, Vec<Vec<f32>>) {
    let mut ev = Evolver::with_layout(config(kind, seed), layout(), vec![0.0; 16], None).unwrap();
    let mut e = FnEvaluator::new(|x: &[f32], s, _| Some(noisy_rastrigin(x, s)));
    let mut bests = Vec::new();
    for _ in 0..gens {
        ev.step(&mut e).unwrap();
        bests.push(ev.best().0.to_vec());
    }
    (ev, bests)
}

#[test]
fn both_strategies_improve_on_the_sphere() {
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let mut ev = Evolver::with_layout(config(kind, 7), layout(), vec![0.0; 16], None).unwrap();
        let mut e = FnEvaluator::new(|x: &[f32], _, _| Some(sphere(x)));
        let start = sphere(&[0.0; 16]);
        let mut last = f64::NEG_INFINITY;
        for _ in 0..150 {
            last = ev.step(&mut e).unwrap().best_fitness;
        }
        assert!(
            last > start * 0.05,
            "{kind}: best {last} did not improve enough from {start}"
        );
        assert_eq!(ev.generation(), 150);
        assert_eq!(ev.stats().generations, 150);
        assert!(ev.stats().evaluations >= 150 * 16);
    }
}

#[test]
fn same_seed_gives_bit_identical_best_params_and_different_seed_does_not() {
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let (_, a) = run(kind, 42, 25);
        let (_, b) = run(kind, 42, 25);
        let (_, c) = run(kind, 43, 25);
        let bits = |v: &Vec<Vec<f32>>| v.iter().flatten().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{kind}: same seed diverged");
        assert_ne!(
            bits(&a),
            bits(&c),
            "{kind}: different seeds gave the same run"
        );
    }
}

#[test]
fn checkpointed_dropped_and_resumed_run_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let (full, _) = run(kind, 5, 30);
        let (half, _) = run(kind, 5, 12);
        let path = dir.path().join(format!("{kind}.ckpt"));
        save_checkpoint(&path, &half.checkpoint()).unwrap();
        drop(half);
        let c = load_checkpoint(&path).unwrap();
        assert_eq!(c.generation, 12);
        let mut resumed = Evolver::from_checkpoint_with_layout(c).unwrap();
        let mut e = FnEvaluator::new(|x: &[f32], s, _| Some(noisy_rastrigin(x, s)));
        for _ in 12..30 {
            resumed.step(&mut e).unwrap();
        }
        assert_eq!(
            resumed.checkpoint(),
            full.checkpoint(),
            "{kind}: resumed run differs"
        );
        let bits = |p: &[f32]| p.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(resumed.best().0), bits(full.best().0));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn corrupt_checkpoint_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (ev, _) = run(StrategyKind::Es, 1, 3);
    let path = dir.path().join("c.ckpt");
    save_checkpoint(&path, &ev.checkpoint()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let write = |bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        load_checkpoint(&path)
    };
    assert!(matches!(
        write(&good[..good.len() - 10]),
        Err(EvolveError::Truncated { .. })
    ));
    assert!(matches!(
        write(&good[..20]),
        Err(EvolveError::Truncated { .. })
    ));
    assert!(matches!(
        write(b"garbage garbage garbage garbage garbage"),
        Err(EvolveError::BadMagic { .. })
    ));
    assert!(matches!(write(b""), Err(EvolveError::Truncated { .. })));
    let mut v = good.clone();
    v[8] = 99;
    assert!(matches!(
        write(&v),
        Err(EvolveError::UnsupportedVersion { found: 99, .. })
    ));
    let mut v = good.clone();
    let mid = 32 + (v.len() - 32) / 2;
    v[mid] ^= 0x40;
    assert!(matches!(write(&v), Err(EvolveError::Checksum { .. })));
    let mut v = good.clone();
    v.push(0);
    assert!(matches!(write(&v), Err(EvolveError::Decode { .. })));
    let missing = load_checkpoint(&dir.path().join("nope"));
    assert!(matches!(missing, Err(EvolveError::Io { .. })));
    let msg = write(&good[..20]).unwrap_err().to_string();
    assert!(msg.contains("c.ckpt") && msg.contains("truncated"), "{msg}");
    // And the good bytes still load.
    let c: Checkpoint = write(&good).unwrap();
    assert_eq!(c.generation, 3);
}

/// Records every candidate it is given and checks it is valid.
struct Recorder {
    validator: Validator,
    seen: usize,
    seeds: Vec<u64>,
}

impl Evaluator for Recorder {
    fn evaluate(&mut self, c: &[&[f32]], seed: u64, _: u32) -> Result<Vec<Option<f64>>, EvalError> {
        for x in c {
            self.validator
                .check_static(x)
                .expect("an invalid candidate reached the evaluator");
        }
        self.seen += c.len();
        self.seeds.push(seed);
        Ok(c.iter().map(|x| Some(sphere(x))).collect())
    }
}

fn recorder(cfg: &EvolverConfig) -> Recorder {
    Recorder {
        validator: Validator::new(cfg.validation.clone(), layout(), cfg.scale),
        seen: 0,
        seeds: Vec::new(),
    }
}

#[test]
fn blown_up_sigma_is_rejected_before_the_evaluator() {
    // σ = 3e38: noise overflows f32 to ±inf (NonFinite); σ = 1e6: norms explode.
    for (sigma, nonfinite) in [(3.0e38f32, true), (1.0e6, false)] {
        for kind in [StrategyKind::Ga, StrategyKind::Es] {
            let mut cfg = config(kind, 3);
            cfg.ga.sigma = sigma;
            cfg.ga.sigma_max = f32::MAX;
            cfg.ga.elite = 0;
            cfg.es.sigma = sigma;
            cfg.es.eval_center = false;
            let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.1; 16], None).unwrap();
            let mut rec = recorder(&cfg);
            for _ in 0..3 {
                let r = ev.step(&mut rec).unwrap();
                assert_eq!(r.evaluations, 0);
                assert!(r.rejected >= 16, "{kind}: only {} rejected", r.rejected);
                assert!(r.best_fitness.is_nan());
            }
            assert_eq!(
                rec.seen, 0,
                "{kind} σ={sigma}: rejected candidates reached the evaluator"
            );
            let s = ev.stats();
            if nonfinite {
                assert!(s.rejected_non_finite > 0, "{kind}: {s:?}");
            } else {
                assert!(s.rejected_norm > 0, "{kind}: {s:?}");
            }
            assert_eq!(
                s.rejected,
                s.rejected_non_finite + s.rejected_norm + s.rejected_change
            );
            // The start point is untouched.
            assert_eq!(ev.best().0, &[0.1; 16][..]);
        }
    }
}

#[test]
fn change_bound_rejects_big_jumps_and_lets_small_ones_through() {
    let mut cfg = config(StrategyKind::Ga, 9);
    cfg.ga.sigma = 0.5;
    cfg.ga.sigma_tau = 0.0;
    cfg.validation.max_relative_change = 0.5;
    cfg.validation.max_rms = 1e9;
    let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], None).unwrap();
    let mut rec = recorder(&cfg);
    ev.step(&mut rec).unwrap();
    assert!(ev.stats().rejected_change > 0, "{:?}", ev.stats());
    let v = Validator::new(cfg.validation.clone(), layout(), cfg.scale);
    let parent = vec![0.0f32; 16];
    let mut near = parent.clone();
    near[0] = 0.4;
    assert!(v.check_candidate(&near, &[&parent]).is_ok());
    let mut far = parent.clone();
    far[0] = 3.0;
    assert!(matches!(
        v.check_candidate(&far, &[&parent]),
        Err(Rejection::ChangeTooLarge { .. })
    ));
    // Against the nearer of two parents.
    assert!(v.check_candidate(&far, &[&parent, &far]).is_ok());
    assert!(matches!(
        v.check_candidate(&[0.0; 3], &[]),
        Err(Rejection::ShapeMismatch {
            expected: 16,
            actual: 3
        })
    ));
    let mut nan = parent.clone();
    nan[5] = f32::NAN;
    assert!(matches!(
        v.check_candidate(&nan, &[]),
        Err(Rejection::NonFinite { index: 5, .. })
    ));
}

#[test]
fn common_random_numbers_per_generation_and_fresh_gate_seeds() {
    let mut cfg = config(StrategyKind::Ga, 11);
    cfg.solve_threshold = Some(-1.0);
    let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], None).unwrap();
    let mut rec = recorder(&cfg);
    for g in 0..5 {
        let before = rec.seeds.len();
        ev.step(&mut rec).unwrap();
        assert_eq!(rec.seeds[before], ev.training_seed(g));
    }
    let training: Vec<u64> = (0..5).map(|g| ev.training_seed(g)).collect();
    let mut uniq = training.clone();
    uniq.dedup();
    assert_eq!(uniq.len(), 5);
    assert!((0..5).all(|g| !training.contains(&ev.gate_seed(g))));
}

#[test]
fn publish_needs_margin_gate_and_no_regression() {
    // Gate evaluations (100 episodes) return a lower fitness than training.
    let gate_penalty = |x: &[f32], _s: u64, episodes: u32| {
        Some(if episodes == 100 {
            sphere(x) - 10.0
        } else {
            sphere(x)
        })
    };
    let mut cfg = config(StrategyKind::Ga, 2);
    cfg.solve_threshold = None;
    // Published fitness −5: training best beats it at once, the gate never does.
    let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], Some(-5.0)).unwrap();
    let mut e = FnEvaluator::new(gate_penalty);
    for _ in 0..5 {
        let r = ev.step(&mut e).unwrap();
        assert!(r.publish.is_none());
    }
    assert_eq!(ev.stats().publishes, 0);
    assert_eq!(ev.stats().rejected_regression, 5);
    assert_eq!(ev.stats().gate_evaluations, 5);
    assert_eq!(ev.published().unwrap().1, -5.0);

    // Without a published fitness, the first gated best is published, and
    // then only improvements by more than the margin are gated.
    cfg.publish_margin = 0.5;
    let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], None).unwrap();
    let mut e = FnEvaluator::new(|x: &[f32], _, _| Some(sphere(x)));
    let r = ev.step(&mut e).unwrap();
    let p = r.publish.expect("first generation publishes");
    assert_eq!(p.gate_fitness, Some(p.fitness));
    assert!(!r.solved);
    let mut published = p.fitness;
    for _ in 0..30 {
        let r = ev.step(&mut e).unwrap();
        if let Some(p) = r.publish {
            assert!(p.fitness > published + 0.5);
            published = p.gate_fitness.unwrap();
        }
    }
    assert_eq!(ev.published().unwrap().1, published);

    // A solve threshold: nothing is gated until the training best reaches it.
    cfg.solve_threshold = Some(-0.2);
    cfg.publish_margin = 0.0;
    let mut ev = Evolver::with_layout(cfg, layout(), vec![0.0; 16], None).unwrap();
    let mut solved_at = None;
    for g in 0..200 {
        let r = ev.step(&mut e).unwrap();
        if r.publish.is_some() {
            assert!(r.solved && r.best_fitness >= -0.2);
            solved_at = Some(g);
            break;
        }
    }
    assert!(solved_at.is_some(), "sphere threshold never reached");
    assert_eq!(ev.stats().solved_at_generation, solved_at);
    assert_eq!(ev.stats().gate_evaluations, 1);
}

#[test]
fn quarantined_and_nan_fitness_are_counted_and_the_loop_goes_on() {
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let mut calls = 0u64;
        let mut ev = Evolver::with_layout(config(kind, 4), layout(), vec![0.0; 16], None).unwrap();
        let mut e = FnEvaluator::new(|x: &[f32], _, _| {
            calls += 1;
            match calls % 5 {
                0 => None,
                1 => Some(f64::NAN),
                _ => Some(sphere(x)),
            }
        });
        let mut q = 0;
        for _ in 0..20 {
            let r = ev.step(&mut e).unwrap();
            q += r.quarantined;
            assert!(r.best_fitness.is_finite());
        }
        let s = ev.stats().clone();
        assert!(
            s.invalid_fitness > 0 && q > s.invalid_fitness,
            "{kind}: {s:?}"
        );
        assert_eq!(s.quarantined, q);
    }
}

struct Flaky {
    fail_next: bool,
}

impl Evaluator for Flaky {
    fn evaluate(&mut self, c: &[&[f32]], seed: u64, _: u32) -> Result<Vec<Option<f64>>, EvalError> {
        if std::mem::take(&mut self.fail_next) {
            return Err(EvalError::Unavailable("all workers down".into()));
        }
        Ok(c.iter().map(|x| Some(noisy_rastrigin(x, seed))).collect())
    }
}

#[test]
fn evaluator_error_commits_nothing_and_a_retry_matches_an_unfailed_run() {
    for kind in [StrategyKind::Ga, StrategyKind::Es] {
        let (reference, _) = run(kind, 8, 6);
        let mut ev = Evolver::with_layout(config(kind, 8), layout(), vec![0.0; 16], None).unwrap();
        let mut e = Flaky { fail_next: false };
        for g in 0..6 {
            if g == 3 {
                let before = ev.checkpoint();
                e.fail_next = true;
                let err = ev.step(&mut e).unwrap_err();
                assert!(
                    matches!(err, EvolveError::Eval { generation: 3, .. }),
                    "{err}"
                );
                assert_eq!(ev.checkpoint(), before);
            }
            ev.step(&mut e).unwrap();
        }
        assert_eq!(ev.checkpoint(), reference.checkpoint());
    }
}

#[test]
fn bad_configs_and_inputs_are_refused() {
    assert_eq!("GA".parse::<StrategyKind>().unwrap(), StrategyKind::Ga);
    assert_eq!("es".parse::<StrategyKind>().unwrap(), StrategyKind::Es);
    assert!(
        "cma"
            .parse::<StrategyKind>()
            .unwrap_err()
            .to_string()
            .contains("cma")
    );
    let bad = |f: &dyn Fn(&mut EvolverConfig)| {
        let mut c = EvolverConfig {
            strategy: StrategyKind::Es,
            ..EvolverConfig::default()
        };
        f(&mut c);
        Evolver::with_layout(c, layout(), vec![0.0; 16], None).unwrap_err()
    };
    assert!(bad(&|c| c.population = 7).to_string().contains("even"));
    assert!(
        bad(&|c| c.es.sigma = f32::NAN)
            .to_string()
            .contains("es.sigma")
    );
    assert!(bad(&|c| c.episodes = 0).to_string().contains("episodes"));
    assert!(
        bad(&|c| c.validation.max_rms = -1.0)
            .to_string()
            .contains("max_rms")
    );
    let e =
        Evolver::with_layout(EvolverConfig::default(), layout(), vec![0.0; 15], None).unwrap_err();
    assert!(e.to_string().contains("initial parameters"), "{e}");
    let mut p = vec![0.0; 16];
    p[2] = f32::INFINITY;
    assert!(Evolver::with_layout(EvolverConfig::default(), layout(), p, None).is_err());
    assert!(ParamLayout::new(vec![]).is_err());
    assert!(ParamLayout::new(vec![("a".into(), vec![0, 3])]).is_err());
}

#[test]
fn checkpoint_with_tampered_state_is_refused() {
    let (ev, _) = run(StrategyKind::Es, 1, 2);
    let mut c = ev.checkpoint();
    if let evod_evolve::StrategyState::Es(s) = &mut c.strategy {
        s.mean[0] = f32::NAN;
    }
    assert!(matches!(
        Evolver::from_checkpoint_with_layout(c),
        Err(EvolveError::InvalidState { .. })
    ));
    let mut c = ev.checkpoint();
    c.config.strategy = StrategyKind::Ga;
    assert!(Evolver::from_checkpoint_with_layout(c).is_err());
}

/// What one `evaluate_recipes_together` call was given: each part's
/// purpose and candidates (materialised).
type Call = Vec<(evod_evolve::Purpose, Vec<Vec<f32>>)>;

/// A task with a held-out split: training scores the sphere, the gate a
/// shifted sphere (other data). Records every call.
#[derive(Default)]
struct HeldOut {
    together: Vec<Call>,
    /// Calls outside `evaluate_recipes_together`.
    other: usize,
    /// Calls (by index) whose training candidates are all quarantined.
    quarantine_training: Vec<usize>,
}

impl HeldOut {
    fn score(purpose: evod_evolve::Purpose, x: &[f32]) -> f64 {
        match purpose {
            evod_evolve::Purpose::Train => sphere(x),
            evod_evolve::Purpose::Gate => sphere(x) - 0.25,
        }
    }
}

impl Evaluator for HeldOut {
    fn evaluate(&mut self, c: &[&[f32]], _: u64, _: u32) -> Result<Vec<Option<f64>>, EvalError> {
        self.other += 1;
        Ok(c.iter().map(|x| Some(sphere(x))).collect())
    }

    fn evaluate_recipes_together(
        &mut self,
        parts: &[evod_evolve::RecipePart<'_>],
    ) -> Result<Vec<Vec<Option<f64>>>, EvalError> {
        let call: Call = parts
            .iter()
            .map(|p| {
                let xs = p
                    .recipes
                    .iter()
                    .map(|r| r.materialize(&p.base).unwrap())
                    .collect();
                (p.purpose, xs)
            })
            .collect();
        let lost = self.quarantine_training.contains(&self.together.len());
        let out = call
            .iter()
            .map(|(purpose, xs)| {
                xs.iter()
                    .map(|x| (*purpose == Gate || !lost).then(|| Self::score(*purpose, x)))
                    .collect()
            })
            .collect();
        self.together.push(call);
        Ok(out)
    }
}

use evod_evolve::Purpose::Gate;

fn es_mean(ev: &Evolver) -> Vec<f32> {
    match ev.checkpoint().strategy {
        evod_evolve::StrategyState::Es(s) => s.mean,
        evod_evolve::StrategyState::Ga(_) => unreachable!("an ES run"),
    }
}

/// ES with a held-out gate (the perplexity task) gates the previous
/// generation's best in the same evaluator call as its training batch, and
/// first, instead of gating its own best afterwards; the mean is not
/// scored on training, and a best already published is not gated again. A
/// run checkpointed and resumed gates and publishes exactly what the
/// uninterrupted run does.
#[test]
fn es_with_a_held_out_gate_gates_the_previous_best_beside_the_training_batch() {
    use evod_evolve::Purpose::Train;
    let cfg = config(StrategyKind::Es, 3);
    let start = |cfg: &EvolverConfig| {
        let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], None).unwrap();
        ev.set_gate_every_generation(true);
        // As the daemon does: the start vector's held-out fitness first.
        ev.adopt_initial_fitness(HeldOut::score(Gate, &[0.0; 16]))
            .unwrap();
        ev
    };
    let mut ev = start(&cfg);
    let mut e = HeldOut::default();
    let mut published = ev.published().unwrap().1;
    let mut publishes = Vec::new();
    for g in 0..30u64 {
        let mean = es_mean(&ev);
        let (prev_best, prev_fitness) = (ev.best().0.to_vec(), ev.best().1);
        let gated = g > 0 && ev.published().unwrap().0 != prev_best.as_slice();
        let report = ev.step(&mut e).unwrap();
        let call = e.together.last().unwrap();
        let train = &call.last().unwrap();
        assert_eq!(train.0, Train);
        assert_eq!(
            train.1.len(),
            cfg.population,
            "generation {g}: the mean is not trained on"
        );
        assert!(!train.1.contains(&mean));
        if gated {
            assert_eq!(call.len(), 2, "generation {g}");
            assert_eq!(
                call[0],
                (Gate, vec![prev_best.clone()]),
                "generation {g}: the previous best"
            );
        } else {
            assert_eq!(call.len(), 1, "generation {g}: nothing new to gate");
            assert!(report.publish.is_none());
        }
        if let Some(p) = &report.publish {
            assert_eq!(
                p.params, prev_best,
                "generation {g}: a publish is the gated best"
            );
            let gate = HeldOut::score(Gate, &prev_best);
            assert_eq!((p.fitness, p.gate_fitness), (prev_fitness, Some(gate)));
            assert!(
                gate >= published,
                "generation {g}: a publish never regresses"
            );
            published = gate;
            assert_eq!(ev.published().unwrap(), (prev_best.as_slice(), gate));
            publishes.push((g, p.params.clone()));
        }
    }
    assert_eq!(e.other, 0, "no separate gate or training call");
    assert!(publishes.len() >= 3, "the sphere improves: {publishes:?}");
    let gated = e.together.iter().filter(|c| c.len() == 2).count() as u64;
    let s = ev.stats().clone();
    assert_eq!(s.gate_evaluations, gated);
    assert_eq!(s.quarantined, 0);
    assert_eq!(s.publishes, publishes.len() as u64);
    assert_eq!(
        s.evaluations,
        30 * cfg.population as u64 + gated,
        "every training candidate and every gate counted once"
    );

    // Checkpointed at generation 11, dropped, resumed: the same publishes.
    let (resumed, again) =
        publishes_resumed_at(start(&cfg), 11, 30, |e| e.set_gate_every_generation(true));
    assert_eq!(resumed, publishes);
    assert_eq!(again.stats(), &s);
}

/// Runs `ev` on a fresh [`HeldOut`] for `generations`, checkpointed to a
/// file, dropped and resumed (then `setup`, the settings a checkpoint does
/// not keep) at generation `at`: the publishes and the resumed evolver.
fn publishes_resumed_at(
    mut ev: Evolver,
    at: u64,
    generations: u64,
    setup: impl Fn(&mut Evolver),
) -> (Vec<(u64, Vec<f32>)>, Evolver) {
    let mut e = HeldOut::default();
    let mut publishes = Vec::new();
    for g in 0..generations {
        if g == at {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ckpt.bin");
            save_checkpoint(&path, &ev.checkpoint()).unwrap();
            ev = Evolver::from_checkpoint_with_layout(load_checkpoint(&path).unwrap()).unwrap();
            setup(&mut ev);
        }
        if let Some(p) = ev.step(&mut e).unwrap().publish {
            publishes.push((g, p.params));
        }
    }
    (publishes, ev)
}

/// A gated best that nothing newer replaces (the next generation scored
/// nothing: every training candidate quarantined) is not gated again.
#[test]
fn a_gated_best_with_nothing_newer_is_not_gated_again() {
    let mut ev =
        Evolver::with_layout(config(StrategyKind::Es, 5), layout(), vec![0.0; 16], None).unwrap();
    ev.set_gate_every_generation(true);
    ev.adopt_initial_fitness(0.0).unwrap(); // unbeatable: no publish
    let mut e = HeldOut {
        quarantine_training: vec![1, 2],
        ..HeldOut::default()
    };
    let parts = |e: &HeldOut| e.together.iter().map(Vec::len).collect::<Vec<_>>();
    ev.step(&mut e).unwrap(); // scores a best
    ev.step(&mut e).unwrap(); // gates it; training all quarantined
    assert_eq!(ev.stats().gate_evaluations, 1);
    assert_eq!(ev.stats().quarantined, 16);
    ev.step(&mut e).unwrap(); // nothing new to gate; quarantined again
    ev.step(&mut e).unwrap(); // nothing new to gate; a new best
    ev.step(&mut e).unwrap(); // gates the new best
    assert_eq!(parts(&e), vec![1, 2, 1, 1, 2]);
    assert_eq!(ev.stats().gate_evaluations, 2);
    assert_eq!(ev.stats().publishes, 0);
}

/// Gating the mean (`GateCandidate::Mean`, `evod run --gate-candidate mean`):
/// every generation gates the mean its own training candidates are drawn
/// around, in the same evaluator call and first; a publish is that mean,
/// with the generation's mean training fitness and the mean's gate
/// fitness; the published mean is not gated again. A run checkpointed and
/// resumed publishes exactly what the uninterrupted run does.
#[test]
fn es_gating_the_mean_gates_each_new_mean_beside_its_own_training_batch() {
    use evod_evolve::GateCandidate;
    use evod_evolve::Purpose::Train;
    let cfg = config(StrategyKind::Es, 3);
    let start = |cfg: &EvolverConfig| {
        let mut ev = Evolver::with_layout(cfg.clone(), layout(), vec![0.0; 16], None).unwrap();
        ev.set_gate_every_generation(true);
        ev.set_gate_candidate(GateCandidate::Mean);
        ev.adopt_initial_fitness(HeldOut::score(Gate, &[0.0; 16]))
            .unwrap();
        ev
    };
    let mut ev = start(&cfg);
    assert_eq!(ev.gate_candidate(), GateCandidate::Mean);
    let mut e = HeldOut::default();
    let mut publishes = Vec::new();
    let mut published = ev.published().unwrap().1;
    for g in 0..30u64 {
        let mean = es_mean(&ev);
        let gated = ev.published().unwrap().0 != mean.as_slice();
        let report = ev.step(&mut e).unwrap();
        let call = e.together.last().unwrap();
        let train = call.last().unwrap();
        assert_eq!(train.0, Train);
        assert_eq!(train.1.len(), cfg.population, "generation {g}");
        assert!(
            !train.1.contains(&mean),
            "generation {g}: the mean is not trained on"
        );
        if gated {
            assert_eq!(call.len(), 2, "generation {g}");
            assert_eq!(
                call[0],
                (Gate, vec![mean.clone()]),
                "generation {g}: the mean"
            );
        } else {
            assert_eq!(
                call.len(),
                1,
                "generation {g}: the mean is the published vector"
            );
            assert!(report.publish.is_none());
        }
        if let Some(p) = &report.publish {
            assert_eq!(
                p.params, mean,
                "generation {g}: a publish is the gated mean"
            );
            let gate = HeldOut::score(Gate, &mean);
            assert_eq!(
                (p.fitness, p.gate_fitness),
                (report.mean_fitness, Some(gate))
            );
            assert!(
                gate >= published,
                "generation {g}: a publish never regresses"
            );
            published = gate;
            assert_eq!(ev.published().unwrap(), (mean.as_slice(), gate));
            publishes.push((g, p.params.clone()));
        }
    }
    assert!(
        publishes.len() >= 5,
        "the sphere's mean improves: {publishes:?}"
    );
    let gated = e.together.iter().filter(|c| c.len() == 2).count() as u64;
    assert_eq!(
        gated, 29,
        "every generation after the first gates a new mean"
    );
    assert_eq!(ev.stats().gate_evaluations, gated);
    assert_eq!(ev.stats().publishes, publishes.len() as u64);
    // The sphere is the training and the gate's landscape: the gated mean
    // ends better than the best-gating run's published vector.
    let mut by_best = start(&cfg);
    by_best.set_gate_candidate(GateCandidate::Best);
    let mut e3 = HeldOut::default();
    for _ in 0..30 {
        by_best.step(&mut e3).unwrap();
    }
    assert!(
        ev.published().unwrap().1 > by_best.published().unwrap().1,
        "mean {} against best {}",
        ev.published().unwrap().1,
        by_best.published().unwrap().1
    );

    let (resumed, again) = publishes_resumed_at(start(&cfg), 11, 30, |e| {
        e.set_gate_every_generation(true);
        e.set_gate_candidate(GateCandidate::Mean);
    });
    assert_eq!(resumed, publishes);
    assert_eq!(again.stats(), ev.stats());
}

/// A gated mean that did not move (its generation scored nothing: every
/// training candidate quarantined, so no update) is not gated again.
#[test]
fn a_gated_mean_that_did_not_move_is_not_gated_again() {
    let mut ev =
        Evolver::with_layout(config(StrategyKind::Es, 5), layout(), vec![0.0; 16], None).unwrap();
    ev.set_gate_every_generation(true);
    ev.set_gate_candidate(evod_evolve::GateCandidate::Mean);
    ev.adopt_initial_fitness(0.0).unwrap(); // unbeatable: no publish
    let mut e = HeldOut {
        quarantine_training: vec![1, 2],
        ..HeldOut::default()
    };
    let parts = |e: &HeldOut| e.together.iter().map(Vec::len).collect::<Vec<_>>();
    ev.step(&mut e).unwrap(); // the mean is the published start: not gated
    let moved = es_mean(&ev);
    ev.step(&mut e).unwrap(); // gates the new mean; training all quarantined
    assert_eq!(es_mean(&ev), moved, "nothing scored: the mean stays");
    ev.step(&mut e).unwrap(); // the same mean: not gated; quarantined again
    ev.step(&mut e).unwrap(); // not gated; scored, the mean moves
    ev.step(&mut e).unwrap(); // gates the new mean
    assert_eq!(parts(&e), vec![1, 2, 1, 1, 2]);
    assert_eq!(ev.stats().gate_evaluations, 2);
    assert_eq!(ev.stats().publishes, 0);
}

/// A run started afresh from a file at generation N numbers on from N;
/// once a generation has run its numbering is fixed.
#[test]
fn a_run_started_at_a_generation_numbers_on_from_it() {
    let mut ev = Evolver::with_layout(
        config(StrategyKind::Es, 3),
        layout(),
        vec![0.0; 16],
        Some(-4.0),
    )
    .unwrap();
    ev.start_at_generation(7).unwrap();
    assert_eq!(ev.generation(), 7);
    let mut e = FnEvaluator::new(|x: &[f32], _, _| Some(sphere(x)));
    let report = ev.step(&mut e).unwrap();
    assert_eq!((report.generation, ev.generation()), (7, 8));
    assert_eq!(ev.stats().generations, 1);
    assert!(ev.start_at_generation(20).is_err());
    assert_eq!(ev.generation(), 8);
    // Without a published fitness, the start's own is adopted before the
    // first generation only.
    let mut fresh =
        Evolver::with_layout(config(StrategyKind::Es, 3), layout(), vec![0.0; 16], None).unwrap();
    fresh.start_at_generation(5).unwrap();
    fresh.adopt_initial_fitness(-4.0).unwrap();
    assert!(fresh.adopt_initial_fitness(-3.0).is_err());
}
