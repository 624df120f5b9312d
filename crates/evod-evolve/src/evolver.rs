//! The generation loop: one [`Evolver::step`] is one metabolism cycle —
//! sample, validate, evaluate, update, and gate a publish — against any
//! [`Evaluator`].
//!
//! A step is a transaction: if the evaluator fails, nothing (generator,
//! strategy, counters) has changed and the step may simply be retried.
//! All randomness comes from `config.seed`: the strategy's ChaCha8 stream,
//! and the episode seeds of generation `g`, derived from `(seed, g)` and
//! shared by every candidate of the generation (common random numbers).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, RngState, StrategyState};
use crate::config::{EvolverConfig, StrategyKind};
use crate::error::EvalError;
use crate::error::EvolveError;
use crate::es::EsState;
use crate::evaluator::{
    DOMAIN_GATE, DOMAIN_STRATEGY, DOMAIN_TRAIN, Evaluator, Purpose, RecipePart, derive_seed,
};
use crate::ga::GaState;
use crate::ga_recipe::{GaBatch, GaParents, GaRecipe};
use crate::layout::ParamLayout;
use crate::progress::NoProgress;
use crate::recipe::{Base, Recipe};
use crate::rt;
use crate::validate::{Rejection, RejectionKind, Validator};

/// Counters of a run, saved in checkpoints and shown by `evod status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvolveStats {
    /// Generations completed.
    pub generations: u64,
    /// Candidate evaluations asked of the evaluator (training and gate).
    pub evaluations: u64,
    /// Episodes those evaluations ran (evaluations × episodes).
    pub episodes: u64,
    /// Rejections of every kind.
    pub rejected: u64,
    /// Rejections: non-finite values.
    pub rejected_non_finite: u64,
    /// Rejections: wrong length.
    pub rejected_shape: u64,
    /// Rejections: tensor norm above the bound.
    pub rejected_norm: u64,
    /// Rejections: per-generation change above the bound.
    pub rejected_change: u64,
    /// Rejections at publish: gate fitness below the published fitness.
    pub rejected_regression: u64,
    /// Candidates the evaluator could not evaluate (quarantined).
    pub quarantined: u64,
    /// Fitness values the evaluator returned as NaN or infinite (treated as
    /// quarantined).
    pub invalid_fitness: u64,
    /// Gate evaluations run.
    pub gate_evaluations: u64,
    /// Gate evaluations below the solve threshold.
    pub gate_failures: u64,
    /// Candidates published.
    pub publishes: u64,
    /// First generation whose gate reached the solve threshold.
    pub solved_at_generation: Option<u64>,
}

impl EvolveStats {
    fn count(&mut self, r: &Rejection) {
        self.rejected += 1;
        match r.kind() {
            RejectionKind::NonFinite => self.rejected_non_finite += 1,
            RejectionKind::ShapeMismatch => self.rejected_shape += 1,
            RejectionKind::NormTooLarge => self.rejected_norm += 1,
            RejectionKind::ChangeTooLarge => self.rejected_change += 1,
            RejectionKind::FitnessRegression => self.rejected_regression += 1,
        }
    }
}

/// A candidate that passed the margin, the gate and validation: the caller
/// writes it to the model file.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishCandidate {
    /// Flat parameters.
    pub params: Vec<f32>,
    /// Its training fitness, in the generation that scored it: this one,
    /// or the previous one when the gate runs beside training (ES gating
    /// every generation: see [`Evolver::step`]).
    pub fitness: f64,
    /// Its mean over `gate_episodes` fresh episodes.
    pub gate_fitness: Option<f64>,
}

/// What one [`Evolver::step`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationReport {
    /// The generation this report is about (0 for the first step).
    pub generation: u64,
    /// Best training fitness of the generation (NaN if nothing was evaluated).
    pub best_fitness: f64,
    /// Mean training fitness of the generation (NaN if nothing was evaluated).
    pub mean_fitness: f64,
    /// Candidates sent to the evaluator this generation (gate included).
    pub evaluations: u64,
    /// Candidates rejected by validation this generation.
    pub rejected: u64,
    /// Candidates the evaluator could not evaluate this generation.
    pub quarantined: u64,
    /// Set when this generation produced a candidate to publish.
    pub publish: Option<PublishCandidate>,
    /// The gate reached the solve threshold this generation.
    pub solved: bool,
}

/// A parameter vector with its fitness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// Flat parameters.
    pub params: Vec<f32>,
    /// Fitness (training fitness for `best`, gate fitness for `published`).
    pub fitness: f64,
}

#[derive(Debug, Clone)]
enum Strategy {
    Ga(GaState),
    Es(EsState),
}

/// The evolution loop's state. See the module documentation.
#[derive(Debug, Clone)]
pub struct Evolver {
    config: EvolverConfig,
    layout: ParamLayout,
    validator: Validator,
    generation: u64,
    rng: ChaCha8Rng,
    strategy: Strategy,
    best: Scored,
    published: Option<Scored>,
    stats: EvolveStats,
    /// Why the last step did nothing (not checkpointed).
    no_progress: Option<NoProgress>,
    /// Gate every generation's best, whatever its training fitness (not
    /// checkpointed: the caller sets it from the task at every start).
    gate_every_generation: bool,
    /// What ES gates beside training (not checkpointed, like
    /// `gate_every_generation`).
    gate_candidate: GateCandidate,
    /// Checksum of the last ES mean sent to the gate (mean gating): an
    /// unchanged mean is not gated again. Not checkpointed: a resumed run
    /// may gate an unchanged mean once more, which only happens when the
    /// last update was refused.
    gated_mean: Option<u64>,
}

/// Which candidate ES sends to the publish gate when the gate runs beside
/// training ([`Evolver::set_gate_every_generation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateCandidate {
    /// The previous generation's best-scoring perturbed candidate.
    #[default]
    Best,
    /// The search distribution's mean: the estimate ES actually improves
    /// (Salimans et al. evaluate and return θ, not a sample), free of the
    /// σ-sized perturbation and of the selection on one training draw that
    /// made a sample the best. On the perplexity task it published a
    /// worse held-out perplexity than `Best` in the same time
    /// (docs/llm.md), so it is not the daemon's default.
    Mean,
}

/// What one generation sends to the evaluator.
enum Batch<'a> {
    /// GA children: vectors and their recipes against their parents.
    Ga(GaBatch<'a>),
    /// Recipes against a base (ES).
    Recipes(Base<'a>, &'a [Recipe]),
}

impl<'a> Batch<'a> {
    fn len(&self) -> usize {
        match self {
            Self::Ga(b) => b.children.len(),
            Self::Recipes(_, r) => r.len(),
        }
    }

    /// Candidate `i` as a vector.
    fn params(&self, i: usize) -> Vec<f32> {
        match self {
            Self::Ga(b) => b.children[i].to_vec(),
            Self::Recipes(base, r) => r[i]
                .materialize(base)
                .expect("recipes are made against this base"),
        }
    }

    /// Candidate `i` alone.
    fn one(&self, i: usize) -> Batch<'a> {
        match self {
            Self::Ga(b) => {
                let recipes: &'a [GaRecipe] = b.recipes;
                Batch::Ga(GaBatch {
                    parents: b.parents.clone(),
                    recipes: std::slice::from_ref(&recipes[i]),
                    children: vec![b.children[i]],
                })
            }
            Self::Recipes(base, r) => {
                let r: &'a [Recipe] = r;
                Batch::Recipes(*base, std::slice::from_ref(&r[i]))
            }
        }
    }

    fn send(
        &self,
        ev: &mut dyn Evaluator,
        purpose: Purpose,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        match self {
            Self::Ga(b) => ev.evaluate_ga_for(purpose, b, seed, episodes),
            Self::Recipes(base, r) => ev.evaluate_recipes_for(purpose, base, r, seed, episodes),
        }
    }
}

impl Evolver {
    /// Starts a run at `initial_params` (e.g. the model file's tensors),
    /// whose published fitness is `initial_fitness` (from the model's
    /// metadata; `None` when it has none).
    pub fn new(
        config: EvolverConfig,
        arch: &rt::Architecture,
        initial_params: Vec<f32>,
        initial_fitness: Option<f64>,
    ) -> Result<Self, EvolveError> {
        Self::with_layout(
            config,
            ParamLayout::from_architecture(arch)?,
            initial_params,
            initial_fitness,
        )
    }

    /// [`Evolver::new`] for any parameter layout.
    pub fn with_layout(
        config: EvolverConfig,
        layout: ParamLayout,
        initial_params: Vec<f32>,
        initial_fitness: Option<f64>,
    ) -> Result<Self, EvolveError> {
        config.check()?;
        let validator = Validator::new(config.validation.clone(), layout.clone(), config.scale);
        validator
            .check_static(&initial_params)
            .map_err(|r| EvolveError::InvalidState {
                what: "initial parameters".into(),
                reason: r.to_string(),
            })?;
        if let Some(f) = initial_fitness
            && !f.is_finite()
        {
            return Err(EvolveError::InvalidState {
                what: "initial fitness".into(),
                reason: format!("{f} is not finite"),
            });
        }
        let strategy = match config.strategy {
            StrategyKind::Ga => Strategy::Ga(GaState::new(
                initial_params.clone(),
                initial_fitness,
                &layout,
                &config.ga,
            )),
            StrategyKind::Es => Strategy::Es(EsState::new(initial_params.clone(), &config.es)),
        };
        let rng = ChaCha8Rng::seed_from_u64(derive_seed(config.seed, DOMAIN_STRATEGY, 0));
        let published = initial_fitness.map(|f| Scored {
            params: initial_params.clone(),
            fitness: f,
        });
        let best = Scored {
            params: initial_params,
            fitness: initial_fitness.unwrap_or(f64::NEG_INFINITY),
        };
        Ok(Self {
            config,
            layout,
            validator,
            generation: 0,
            rng,
            strategy,
            best,
            published,
            stats: EvolveStats::default(),
            no_progress: None,
            gate_every_generation: false,
            gate_candidate: GateCandidate::Best,
            gated_mean: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EvolverConfig {
        &self.config
    }

    /// The parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// The next generation to run (= generations completed).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Counters.
    pub fn stats(&self) -> &EvolveStats {
        &self.stats
    }

    /// The fittest candidate of the last evaluated generation and its
    /// training fitness (before the first step: the initial parameters and
    /// their published fitness, or −∞).
    pub fn best(&self) -> (&[f32], f64) {
        (&self.best.params, self.best.fitness)
    }

    /// The last published parameters and their gate fitness (at the start:
    /// the initial parameters, if they came with a fitness).
    pub fn published(&self) -> Option<(&[f32], f64)> {
        self.published
            .as_ref()
            .map(|p| (p.params.as_slice(), p.fitness))
    }

    /// Why the last [`Evolver::step`] made no progress: every new candidate
    /// rejected, or every one sent failed to evaluate; `None` when it did
    /// (or before the first step). Feed it to a [`crate::ProgressGuard`].
    pub fn no_progress(&self) -> Option<&NoProgress> {
        self.no_progress.as_ref()
    }

    /// ES gating every generation: the gate runs beside the training batch
    /// (see [`Self::step`]).
    fn gate_beside_training(&self) -> bool {
        self.gate_every_generation && matches!(self.strategy, Strategy::Es(_))
    }

    /// Gates every generation's best, whatever its training fitness, when
    /// `on` (default off: only a best that beats the published fitness by
    /// `publish_margin` is gated). For a task whose gate scores other data
    /// than training (perplexity: a held-out part of the corpus), training
    /// and gate fitness are not comparable, so the pre-gate filter would
    /// compare apples with pears; the gate itself still has to beat the
    /// published gate fitness. Under ES the gate of a generation's best
    /// runs beside the next generation's training batch, and the mean is
    /// not scored on training (see [`Self::step`]). Not part of a
    /// checkpoint: set it at every start.
    pub fn set_gate_every_generation(&mut self, on: bool) {
        self.gate_every_generation = on;
    }

    /// What ES gates beside training ([`GateCandidate`]; default
    /// [`GateCandidate::Best`]); no effect otherwise. With
    /// [`GateCandidate::Mean`], each generation gates the mean its
    /// candidates are drawn around, in the same evaluator call; a publish
    /// carries the generation's mean training fitness (the ES estimate of
    /// the fitness around that mean). Not part of a checkpoint: set it at
    /// every start.
    pub fn set_gate_candidate(&mut self, candidate: GateCandidate) {
        self.gate_candidate = candidate;
    }

    /// Numbers a new run's generations from `generation` instead of 0: a
    /// run started afresh from a model file that is already at
    /// `generation` (its options changed, so its checkpoint does not
    /// apply) continues the file's numbering, and its first publish is
    /// `generation + 1`. Refused once a generation has run.
    pub fn start_at_generation(&mut self, generation: u64) -> Result<(), EvolveError> {
        if self.stats.generations != 0 {
            return Err(EvolveError::InvalidState {
                what: "start generation".into(),
                reason: format!("{} generations have already run", self.stats.generations),
            });
        }
        self.generation = generation;
        Ok(())
    }

    /// What ES gates beside training.
    pub fn gate_candidate(&self) -> GateCandidate {
        self.gate_candidate
    }

    /// Adopts `fitness` as the published fitness of the initial parameters
    /// of a run that has none yet (generation 0, nothing published): the
    /// caller measured it with the gate (e.g. the base model's held-out
    /// perplexity), so the first publish must beat it. Refused otherwise,
    /// or for a non-finite value.
    pub fn adopt_initial_fitness(&mut self, fitness: f64) -> Result<(), EvolveError> {
        if self.stats.generations != 0 || self.published.is_some() || !fitness.is_finite() {
            return Err(EvolveError::InvalidState {
                what: "initial fitness".into(),
                reason: format!(
                    "{fitness} cannot be adopted at generation {} (published: {})",
                    self.generation,
                    self.published.is_some()
                ),
            });
        }
        self.published = Some(Scored {
            params: self.best.params.clone(),
            fitness,
        });
        Ok(())
    }

    /// The episode seed every candidate of `generation` is evaluated with.
    pub fn training_seed(&self, generation: u64) -> u64 {
        derive_seed(self.config.seed, DOMAIN_TRAIN, generation)
    }

    /// The seed of `generation`'s publish gate (fresh: never a training seed
    /// by construction of the derivation domains).
    pub fn gate_seed(&self, generation: u64) -> u64 {
        derive_seed(self.config.seed, DOMAIN_GATE, generation)
    }

    /// Runs one generation against `ev`. On an evaluator error nothing is
    /// committed.
    ///
    /// ES gating every generation ([`Self::set_gate_every_generation`])
    /// sends the gate of the previous generation's best ([`Self::best`])
    /// and this generation's training candidates in one
    /// [`Evaluator::evaluate_recipes_together`] call, the gate first, and
    /// publishes that best (its training fitness from its own generation)
    /// if it passes; otherwise the generation's best is gated after its
    /// batch.
    pub fn step(&mut self, ev: &mut dyn Evaluator) -> Result<GenerationReport, EvolveError> {
        let generation = self.generation;
        let mut rng = self.rng.clone();
        let mut rejections = Vec::new();
        enum Ask {
            Ga(crate::ga::GaAsk),
            Es(crate::es::EsAsk),
        }
        let ask = match &self.strategy {
            Strategy::Ga(s) => Ask::Ga(s.ask(
                &self.config,
                &self.layout,
                &self.validator,
                &mut rng,
                &mut rejections,
            )),
            Strategy::Es(s) => Ask::Es(s.ask(
                &self.config,
                self.config.es.eval_center && !self.gate_beside_training(),
                &self.validator,
                &mut rng,
                &mut rejections,
            )),
        };
        let (candidates, first_offspring) = match (&ask, &self.strategy) {
            (Ask::Ga(a), Strategy::Ga(s)) => {
                let mut parents = GaParents::new(&self.layout);
                for &(i, hash) in &a.parents {
                    parents.insert(hash, &s.population[i].params);
                }
                let batch = GaBatch {
                    parents,
                    recipes: &a.recipes,
                    children: a.children.iter().map(|c| c.params.as_slice()).collect(),
                };
                (Batch::Ga(batch), a.elites)
            }
            (Ask::Es(a), Strategy::Es(s)) => {
                let base = Base::new(&s.mean, &self.layout).expect("the mean has the layout");
                debug_assert_eq!(base.checksum(), a.base);
                (Batch::Recipes(base, &a.recipes), usize::from(a.with_center))
            }
            _ => unreachable!("ask is built from the strategy"),
        };
        let ask_rejections = rejections.clone();
        for r in &rejections {
            tracing::debug!(generation, rejection = %r, "candidate rejected");
        }

        let mut stats = self.stats.clone();
        for r in &rejections {
            stats.count(r);
        }
        let at_generation = |e| match e {
            EvolveError::Eval { source, .. } => EvolveError::Eval { generation, source },
            e => e,
        };
        // ES on a task that gates every generation (a held-out split)
        // gates the previous generation's best beside this generation's
        // training batch, instead of this generation's best after it: the
        // gate's candidate is then known before anything is scored, so both
        // go to the evaluator at once, and a gate that costs more than a
        // training candidate does not leave workers idle. The candidate
        // travels as the centre recipe of its own base; it is `self.best`,
        // which checkpoints keep, so a resumed run gates what the
        // uninterrupted one would have. The mean is not scored on training
        // in this mode (`ask` above), and a best already published is not
        // gated again.
        //
        // With `GateCandidate::Mean` the gated vector is the mean this
        // generation's candidates are drawn around (the training batch's
        // own base), unless it is the published vector or was gated
        // already (an update was refused and the mean did not move).
        let beside = self.gate_beside_training() && matches!(&candidates, Batch::Recipes(..));
        let threshold = self.config.solve_threshold;
        let gate_target: Option<&[f32]> = match (&self.strategy, self.gate_candidate) {
            _ if !beside => None,
            (Strategy::Es(s), GateCandidate::Mean) => Some(&s.mean),
            _ => Some(&self.best.params),
        };
        let gate_mean = beside && self.gate_candidate == GateCandidate::Mean;
        // The mean is the training batch's base: its checksum is known.
        let target_sum = match (&candidates, gate_mean) {
            (Batch::Recipes(base, _), true) => Some(base.checksum()),
            _ => None,
        };
        let pending = match gate_target {
            None => false,
            Some(target) => {
                let fresh = if gate_mean {
                    self.gated_mean != target_sum
                } else {
                    self.best.fitness.is_finite()
                        && threshold.is_none_or(|t| self.best.fitness >= t)
                };
                fresh && self.published.as_ref().is_none_or(|p| p.params != target)
            }
        };
        let (fitness, pending_gate) = if candidates.len() == 0 && !pending {
            (Vec::new(), None)
        } else if let (true, Batch::Recipes(base, recipes), Some(target)) =
            (beside, &candidates, gate_target)
        {
            // The mean gates against the training batch's own base.
            let gate_base = if gate_mean {
                *base
            } else {
                Base::new(target, &self.layout).map_err(|e| EvolveError::InvalidState {
                    what: "the best vector".into(),
                    reason: e.to_string(),
                })?
            };
            let gate_recipe = [Recipe::center(gate_base.checksum(), self.config.scale)];
            let mut parts = Vec::with_capacity(2);
            if pending {
                parts.push(RecipePart {
                    purpose: Purpose::Gate,
                    base: gate_base,
                    recipes: &gate_recipe,
                    seed: self.gate_seed(generation),
                    episodes: self.config.gate_episodes,
                });
            }
            parts.push(RecipePart {
                purpose: Purpose::Train,
                base: *base,
                recipes,
                seed: self.training_seed(generation),
                episodes: self.config.episodes,
            });
            let mut out = self
                .evaluate_together(ev, &parts, &mut stats)
                .map_err(at_generation)?;
            let train = out.pop().expect("one result per part");
            let gate = out.pop().map(|g| g[0]);
            if gate.is_some() {
                stats.gate_evaluations += 1;
            }
            (train, gate)
        } else {
            let fitness = self
                .evaluate(
                    ev,
                    Purpose::Train,
                    &candidates,
                    self.training_seed(generation),
                    self.config.episodes,
                    &mut stats,
                )
                .map_err(at_generation)?;
            (fitness, None)
        };
        // Training candidates, as when the gate runs after the batch (a
        // gate that could not be scored is not published, not counted).
        let quarantined = fitness.iter().filter(|f| f.is_none()).count() as u64;

        let mut best: Option<(usize, f64)> = None;
        let (mut sum, mut n) = (0.0, 0usize);
        for (i, f) in fitness.iter().enumerate() {
            if let Some(f) = *f {
                sum += f;
                n += 1;
                if best.is_none_or(|(_, b)| f > b) {
                    best = Some((i, f));
                }
            }
        }
        let (best_fitness, mean_fitness) = match best {
            Some((_, b)) => (b, sum / n as f64),
            None => (f64::NAN, f64::NAN),
        };

        // Publish gate: the previous best gated above, or this
        // generation's best, gated now if it may be published. `gated`:
        // the candidate's index in this generation (`None`: the previous
        // best), its training fitness and its gate fitness.
        let gated: Option<(Option<usize>, f64, Option<f64>)> = if beside {
            // The mean's training fitness: the generation's mean, the ES
            // estimate of the fitness around it.
            let f = if gate_mean {
                mean_fitness
            } else {
                self.best.fitness
            };
            pending_gate.map(|g| (None, f, g))
        } else if let Some((i, f)) = best {
            let floor = self
                .published
                .as_ref()
                .map_or(f64::NEG_INFINITY, |p| p.fitness);
            if (self.gate_every_generation || f > floor + self.config.publish_margin)
                && threshold.is_none_or(|t| f >= t)
            {
                let gate = self
                    .evaluate(
                        ev,
                        Purpose::Gate,
                        &candidates.one(i),
                        self.gate_seed(generation),
                        self.config.gate_episodes,
                        &mut stats,
                    )
                    .map_err(at_generation)?;
                stats.gate_evaluations += 1;
                Some((Some(i), f, gate.first().copied().flatten()))
            } else {
                None
            }
        } else {
            None
        };
        let mut publish = None;
        let mut published_index = None;
        let mut solved = false;
        let mut new_published = None;
        if let Some((i, f, Some(g))) = gated {
            if threshold.is_none_or(|t| g >= t) {
                solved = threshold.is_some();
                let params = match (i, gate_target) {
                    (Some(i), _) => candidates.params(i),
                    (None, Some(target)) => target.to_vec(),
                    (None, None) => unreachable!("a gate beside training has a target"),
                };
                match self.validator.check_publish(
                    &params,
                    g,
                    self.published.as_ref().map(|p| p.fitness),
                ) {
                    Ok(()) => {
                        stats.publishes += 1;
                        tracing::info!(
                            generation,
                            fitness = f,
                            gate = g,
                            "candidate passed the gate"
                        );
                        new_published = Some(Scored {
                            params: params.clone(),
                            fitness: g,
                        });
                        publish = Some(PublishCandidate {
                            params,
                            fitness: f,
                            gate_fitness: Some(g),
                        });
                        published_index = i;
                    }
                    Err(r) => {
                        tracing::debug!(generation, rejection = %r, "publish rejected");
                        stats.count(&r);
                        rejections.push(r);
                    }
                }
            } else {
                stats.gate_failures += 1;
                tracing::debug!(
                    generation,
                    fitness = f,
                    gate = g,
                    "candidate failed the gate"
                );
            }
        }
        let new_best = best.map(|(i, f)| Scored {
            params: match &publish {
                Some(p) if published_index == Some(i) => p.params.clone(),
                _ => candidates.params(i),
            },
            fitness: f,
        });
        let offspring = candidates.len().saturating_sub(first_offspring);
        let no_progress = if offspring == 0 {
            dominant(&ask_rejections)
        } else if fitness[first_offspring..].iter().all(Option::is_none) {
            Some(NoProgress::AllFailed {
                failed: offspring as u64,
            })
        } else {
            None
        };
        if let Some(np) = &no_progress {
            tracing::warn!(generation, reason = %np, "generation made no progress");
        }
        drop(candidates);

        // Commit.
        match (&mut self.strategy, ask) {
            (Strategy::Ga(s), Ask::Ga(a)) => s.tell(a, &fitness),
            (Strategy::Es(s), Ask::Es(a)) => {
                if let Err(r) = s.tell(&a, &fitness, &self.config, &self.layout, &self.validator) {
                    tracing::debug!(generation, rejection = %r, "es update rejected");
                    stats.count(&r);
                    rejections.push(r);
                }
            }
            _ => unreachable!("ask is built from the strategy it is told to"),
        }
        if solved && stats.solved_at_generation.is_none() {
            stats.solved_at_generation = Some(generation);
        }
        stats.generations += 1;
        stats.quarantined += quarantined;
        let evaluations = stats.evaluations - self.stats.evaluations;
        self.stats = stats;
        self.rng = rng;
        match new_best {
            Some(b) => self.best = b,
            // Nothing scored this generation (every pair rejected or
            // quarantined): the best stays, but once gated it is not gated
            // again (the gate is deterministic for a held-out task, and a
            // quarantined one would crash workers again).
            None if pending_gate.is_some() && !gate_mean => self.best.fitness = f64::NEG_INFINITY,
            None => {}
        }
        if let Some(p) = new_published {
            self.published = Some(p);
        }
        if gate_mean && pending_gate.is_some() {
            self.gated_mean = target_sum;
        }
        self.generation += 1;
        self.no_progress = no_progress;
        Ok(GenerationReport {
            generation,
            best_fitness,
            mean_fitness,
            evaluations,
            rejected: rejections.len() as u64,
            quarantined,
            publish,
            solved,
        })
    }

    /// Sends `candidates` to `ev`, checks the contract, counts, and maps
    /// non-finite fitness to `None`.
    fn evaluate(
        &self,
        ev: &mut dyn Evaluator,
        purpose: Purpose,
        candidates: &Batch<'_>,
        seed: u64,
        episodes: u32,
        stats: &mut EvolveStats,
    ) -> Result<Vec<Option<f64>>, EvolveError> {
        let out = candidates
            .send(ev, purpose, seed, episodes)
            .map_err(|source| self.eval_error(source))?;
        contract(candidates.len(), out.len())?;
        stats.evaluations += candidates.len() as u64;
        stats.episodes += candidates.len() as u64 * u64::from(episodes);
        Ok(finite_or_quarantined(out, stats))
    }

    /// [`Self::evaluate`] of several parts at once
    /// ([`Evaluator::evaluate_recipes_together`]).
    fn evaluate_together(
        &self,
        ev: &mut dyn Evaluator,
        parts: &[RecipePart<'_>],
        stats: &mut EvolveStats,
    ) -> Result<Vec<Vec<Option<f64>>>, EvolveError> {
        let out = ev
            .evaluate_recipes_together(parts)
            .map_err(|source| self.eval_error(source))?;
        contract(parts.len(), out.len())?;
        for (part, values) in parts.iter().zip(&out) {
            contract(part.recipes.len(), values.len())?;
        }
        Ok(parts
            .iter()
            .zip(out)
            .map(|(part, values)| {
                let n = part.recipes.len() as u64;
                stats.evaluations += n;
                stats.episodes += n * u64::from(part.episodes);
                finite_or_quarantined(values, stats)
            })
            .collect())
    }

    /// The whole state, for [`crate::save_checkpoint`].
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            config: self.config.clone(),
            tensors: self.layout.specs(),
            generation: self.generation,
            rng: RngState::of(&self.rng),
            strategy: match &self.strategy {
                Strategy::Ga(s) => StrategyState::Ga(s.clone()),
                Strategy::Es(s) => StrategyState::Es(s.clone()),
            },
            best: self.best.clone(),
            published: self.published.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Resumes from a checkpoint, checking it against `arch`.
    pub fn from_checkpoint(c: Checkpoint, arch: &rt::Architecture) -> Result<Self, EvolveError> {
        let layout = ParamLayout::from_architecture(arch)?;
        if c.tensors != layout.specs() {
            return Err(EvolveError::CheckpointMismatch(format!(
                "checkpoint tensors {:?} differ from the architecture's {:?}",
                c.tensors,
                layout.specs()
            )));
        }
        Self::resume(c, layout)
    }

    /// Resumes from a checkpoint with the layout it records (its tensors,
    /// each with its own noise: a checkpoint does not say which tensors an
    /// architecture ties, [`Evolver::from_checkpoint`] does). Every vector
    /// in it is validated: a checkpoint is a file, and files are untrusted.
    pub fn from_checkpoint_with_layout(c: Checkpoint) -> Result<Self, EvolveError> {
        let layout = ParamLayout::new(c.tensors.clone())?;
        Self::resume(c, layout)
    }

    /// Resumes from `c` with `layout` (whose specs are `c.tensors`).
    fn resume(c: Checkpoint, layout: ParamLayout) -> Result<Self, EvolveError> {
        c.config.check()?;
        let validator = Validator::new(c.config.validation.clone(), layout.clone(), c.config.scale);
        let bad = |what: &str, reason: String| EvolveError::InvalidState {
            what: format!("checkpoint {what}"),
            reason,
        };
        let check = |what: &str, p: &[f32]| {
            validator
                .check_static(p)
                .map_err(|r| bad(what, r.to_string()))
        };
        let n_tensors = layout.tensors().len();
        let strategy = match (c.config.strategy, c.strategy) {
            (StrategyKind::Ga, StrategyState::Ga(s)) => {
                if s.population.is_empty() {
                    return Err(bad("ga population", "is empty".into()));
                }
                for ind in &s.population {
                    check("ga individual", &ind.params)?;
                    if ind.sigmas.len() != n_tensors
                        || ind.sigmas.iter().any(|s| !(s.is_finite() && *s > 0.0))
                    {
                        return Err(bad("ga individual", "has invalid per-tensor sigmas".into()));
                    }
                    if ind.fitness.is_some_and(|f| !f.is_finite()) {
                        return Err(bad("ga individual", "has a non-finite fitness".into()));
                    }
                }
                Strategy::Ga(s)
            }
            (StrategyKind::Es, StrategyState::Es(s)) => {
                check("es mean", &s.mean)?;
                let n = layout.n_params();
                if s.m.len() != n || s.v.len() != n {
                    return Err(bad(
                        "es adam moments",
                        format!("have lengths {} and {}, expected {n}", s.m.len(), s.v.len()),
                    ));
                }
                if s.m.iter().chain(&s.v).any(|x| !x.is_finite()) || s.v.iter().any(|&x| x < 0.0) {
                    return Err(bad(
                        "es adam moments",
                        "are not finite (or a second moment is negative)".into(),
                    ));
                }
                if !(s.sigma.is_finite() && s.sigma > 0.0) {
                    return Err(bad(
                        "es sigma",
                        format!("{} is not finite and positive", s.sigma),
                    ));
                }
                Strategy::Es(s)
            }
            (kind, _) => {
                return Err(bad(
                    "strategy",
                    format!("state does not match the configured strategy {kind}"),
                ));
            }
        };
        check("best", &c.best.params)?;
        if let Some(p) = &c.published {
            check("published", &p.params)?;
            if !p.fitness.is_finite() {
                return Err(bad(
                    "published fitness",
                    format!("{} is not finite", p.fitness),
                ));
            }
        }
        Ok(Self {
            rng: c.rng.restore(),
            config: c.config,
            layout,
            validator,
            generation: c.generation,
            strategy,
            best: c.best,
            published: c.published,
            stats: c.stats,
            no_progress: None,
            gate_every_generation: false,
            gate_candidate: GateCandidate::Best,
            gated_mean: None,
        })
    }
}

/// [`NoProgress::AllRejected`] with the most frequent kind among
/// `rejections` (ties: the kind seen first), or `None` if there are none.
fn dominant(rejections: &[Rejection]) -> Option<NoProgress> {
    let mut counts: Vec<(RejectionKind, u64, &Rejection)> = Vec::new();
    for r in rejections {
        match counts.iter_mut().find(|(k, _, _)| *k == r.kind()) {
            Some(c) => c.1 += 1,
            None => counts.push((r.kind(), 1, r)),
        }
    }
    let mut best: Option<&(RejectionKind, u64, &Rejection)> = None;
    for c in &counts {
        if best.is_none_or(|b| c.1 > b.1) {
            best = Some(c);
        }
    }
    best.map(|&(dominant, _, example)| NoProgress::AllRejected {
        rejected: rejections.len() as u64,
        dominant,
        example: example.to_string(),
    })
}

impl Evolver {
    /// An evaluator's error, at this generation.
    fn eval_error(&self, source: EvalError) -> EvolveError {
        EvolveError::Eval {
            generation: self.generation,
            source,
        }
    }
}

/// The evaluator's answer has one value per candidate sent.
fn contract(expected: usize, got: usize) -> Result<(), EvolveError> {
    if expected == got {
        return Ok(());
    }
    Err(EvolveError::EvaluatorContract { expected, got })
}

/// Non-finite fitness values as `None` (quarantined), counted.
fn finite_or_quarantined(out: Vec<Option<f64>>, stats: &mut EvolveStats) -> Vec<Option<f64>> {
    out.into_iter()
        .map(|f| match f {
            Some(f) if !f.is_finite() => {
                tracing::warn!(
                    fitness = f,
                    "evaluator returned a non-finite fitness, treated as quarantined"
                );
                stats.invalid_fitness += 1;
                None
            }
            f => f,
        })
        .collect()
}
