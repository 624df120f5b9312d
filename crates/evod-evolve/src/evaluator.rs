//! The [`Evaluator`] seam: how the loop gets fitness values, independent of
//! where candidates run (threads in this process, or workers over the ring).

use crate::error::EvalError;
use crate::ga_recipe::GaBatch;
use crate::recipe::{Base, Recipe};

/// What an evaluation is for. Most tasks score both the same way with a
/// different seed (fresh CartPole episodes for the gate); a task with a
/// held-out split (perplexity on a corpus) scores a [`Purpose::Gate`]
/// request on data the evolver never trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Purpose {
    /// A generation's candidates: the fitness the strategy learns from.
    #[default]
    Train,
    /// The publish gate: one candidate, scored on held-out data.
    Gate,
}

impl Purpose {
    /// `train` or `gate`.
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Train => "train",
            Purpose::Gate => "gate",
        }
    }
}

/// Computes the fitness of a batch of candidates.
///
/// Implemented in-process by [`crate::InProcessEvaluator`] and over the
/// shared-memory ring by the evolver process. Every candidate it is given
/// has already passed validation.
pub trait Evaluator {
    /// Fitness of each candidate (flat `f32` parameters, all of the same
    /// length) on the task, with episode seeds derived from `seed` and
    /// `episodes` episodes each (supervised tasks may ignore both).
    ///
    /// Returns one entry per candidate, in order: `Ok(None)` for a
    /// candidate that could not be evaluated (quarantined: it crashed a
    /// worker twice). An `Err` means the whole batch failed.
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError>;

    /// Fitness of each candidate given as a [`Recipe`] against `base` (the
    /// ES mean of the generation; every recipe names its checksum), with
    /// the same contract as [`Evaluator::evaluate`]. ES generations and
    /// their gates come through here.
    ///
    /// The default materialises every candidate (`Recipe::apply_to`) and
    /// calls [`Evaluator::evaluate`], so existing implementors keep
    /// working. An evaluator that can ship recipes (the evolver process: a
    /// few bytes per EVAL over the ring or Redis, the base written once as
    /// a file the workers map) or regenerate them where they run
    /// ([`crate::InProcessEvaluator`]: one buffer per thread) overrides it;
    /// whoever applies a recipe must get exactly the vector
    /// `Recipe::apply_to(base, …)` gives.
    fn evaluate_recipes(
        &mut self,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let candidates = recipes
            .iter()
            .map(|r| r.materialize(base))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EvalError::Failed(e.to_string()))?;
        let refs: Vec<&[f32]> = candidates.iter().map(Vec::as_slice).collect();
        self.evaluate(&refs, seed, episodes)
    }

    /// [`Evaluator::evaluate`] for `purpose`. The evolver calls this; the
    /// default ignores the purpose (the seed already differs), an evaluator
    /// that forwards it to where the task runs (the evolver process puts it
    /// on the wire) overrides it.
    fn evaluate_for(
        &mut self,
        purpose: Purpose,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let _ = purpose;
        self.evaluate(candidates, seed, episodes)
    }

    /// Fitness of a GA generation's candidates (or of its gate), given
    /// both as vectors and as recipes against their parents
    /// ([`GaBatch`]), with the contract of [`Evaluator::evaluate`].
    ///
    /// The default sends the vectors ([`Evaluator::evaluate_for`]); an
    /// evaluator that ships work to other hosts (the coordinator of a
    /// distributed run) overrides it to send the recipes and the parents
    /// they name, where `GaRecipe::apply_to` rebuilds exactly
    /// `batch.children`.
    fn evaluate_ga_for(
        &mut self,
        purpose: Purpose,
        batch: &GaBatch<'_>,
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        self.evaluate_for(purpose, &batch.children, seed, episodes)
    }

    /// [`Evaluator::evaluate_recipes`] for `purpose`, as
    /// [`Evaluator::evaluate_for`].
    fn evaluate_recipes_for(
        &mut self,
        purpose: Purpose,
        base: &Base<'_>,
        recipes: &[Recipe],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        let _ = purpose;
        self.evaluate_recipes(base, recipes, seed, episodes)
    }

    /// Several evaluations of recipes at once, each part against its own
    /// base: one result vector per part, in order, each with the contract
    /// of [`Evaluator::evaluate`] (an `Err` fails them all). An ES
    /// generation that gates every generation sends the gate of the
    /// previous generation's best and its own training candidates this way
    /// (see `Evolver::step`), the gate first.
    ///
    /// The default evaluates the parts one after the other
    /// ([`Evaluator::evaluate_recipes_for`]). An evaluator that can run
    /// them side by side overrides it (the evolver process: each worker
    /// takes the next candidates, of any part, as soon as it is free, so a
    /// gate that costs more than a training candidate does not leave the
    /// other workers idle); it should start the parts in the order given,
    /// which puts the costliest first.
    fn evaluate_recipes_together(
        &mut self,
        parts: &[RecipePart<'_>],
    ) -> Result<Vec<Vec<Option<f64>>>, EvalError> {
        parts
            .iter()
            .map(|p| self.evaluate_recipes_for(p.purpose, &p.base, p.recipes, p.seed, p.episodes))
            .collect()
    }
}

/// One part of [`Evaluator::evaluate_recipes_together`]: recipes scored for
/// one purpose, with one seed and number of episodes.
#[derive(Debug, Clone, Copy)]
pub struct RecipePart<'a> {
    /// What the part is for.
    pub purpose: Purpose,
    /// The vector its recipes apply to.
    pub base: Base<'a>,
    /// Its candidates, against `base`.
    pub recipes: &'a [Recipe],
    /// Episode seed.
    pub seed: u64,
    /// Episodes per candidate.
    pub episodes: u32,
}

/// An [`Evaluator`] made of a closure `(params, seed, episodes) -> fitness`,
/// run sequentially. Handy for tests and for toy fitness functions.
pub struct FnEvaluator<F> {
    f: F,
}

impl<F: FnMut(&[f32], u64, u32) -> Option<f64>> FnEvaluator<F> {
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self { f }
    }
}

impl<F: FnMut(&[f32], u64, u32) -> Option<f64>> Evaluator for FnEvaluator<F> {
    fn evaluate(
        &mut self,
        candidates: &[&[f32]],
        seed: u64,
        episodes: u32,
    ) -> Result<Vec<Option<f64>>, EvalError> {
        Ok(candidates
            .iter()
            .map(|c| (self.f)(c, seed, episodes))
            .collect())
    }
}

/// `splitmix64`: the mixing step used to derive independent seeds.
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Domain of training-evaluation seeds.
pub(crate) const DOMAIN_TRAIN: u64 = 0x7472_6169_6e00_0000; // "train"
/// Domain of gate-evaluation seeds.
pub(crate) const DOMAIN_GATE: u64 = 0x6761_7465_0000_0000; // "gate"
/// Domain of the strategy's generator seed.
pub(crate) const DOMAIN_STRATEGY: u64 = 0x7374_7261_7400_0000; // "strat"

/// The seed of `domain` at `generation` for a run seeded with `seed`.
pub(crate) fn derive_seed(seed: u64, domain: u64, generation: u64) -> u64 {
    splitmix64(splitmix64(seed ^ domain) ^ generation)
}
