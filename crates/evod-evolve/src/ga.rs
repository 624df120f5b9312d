//! Genetic algorithm: elitism, truncation or tournament selection, uniform
//! or arithmetic crossover, mutation with a self-adapted σ per tensor and
//! individual, in units of the tensor's scale, the noise drawn from
//! [`crate::noise`] with one seed per child.
//!
//! State between generations is the evaluated population; a generation
//! sorts it by fitness, copies the elite unchanged (they are re-evaluated
//! with the new generation's episode seeds, so a lucky evaluation does not
//! survive forever), and breeds the rest.
//!
//! Every candidate, elite copies included, is made from a [`GaRecipe`]
//! (parents by checksum, crossover, mutation seed and σ per tensor) by
//! [`GaRecipe::apply`]: the one function another host runs to rebuild it,
//! so a distributed run evaluates the very bits this process validated.

use rand::{Rng, RngExt};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::config::{Crossover, EvolverConfig, GaConfig, Selection};
use crate::ga_recipe::{Blend, Cross, GaRecipe, Mutation};
use crate::layout::{ParamLayout, TensorScale};
use crate::recipe::checksum;
use crate::validate::{Rejection, Validator};

/// One member of the GA population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Individual {
    /// Flat parameters.
    pub params: Vec<f32>,
    /// Mutation σ of each tensor, in units of the tensor's scale.
    pub sigmas: Vec<f32>,
    /// Training fitness of the generation it was last evaluated in (`None`
    /// before its first evaluation).
    pub fitness: Option<f64>,
}

/// GA state saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GaState {
    /// The last evaluated population (at the start: the initial individual).
    pub population: Vec<Individual>,
}

/// Candidates of one GA generation, not yet evaluated.
pub(crate) struct GaAsk {
    /// The elite copies first, then the new children.
    pub children: Vec<Individual>,
    /// The recipe of each of `children` (same order).
    pub recipes: Vec<GaRecipe>,
    /// How many of `children` are elite copies.
    pub elites: usize,
    /// (population index, checksum) of every member a recipe names.
    pub parents: Vec<(usize, u64)>,
}

impl GaState {
    /// The start state: one individual, the initial parameters.
    pub(crate) fn new(
        initial: Vec<f32>,
        fitness: Option<f64>,
        layout: &ParamLayout,
        ga: &GaConfig,
    ) -> Self {
        let sigmas = vec![ga.sigma; layout.tensors().len()];
        Self {
            population: vec![Individual {
                params: initial,
                sigmas,
                fitness,
            }],
        }
    }

    /// Population indices ordered best first (unevaluated last, stable).
    fn ranked(&self) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.population.len()).collect();
        idx.sort_by(|&a, &b| {
            let fa = self.population[a].fitness.unwrap_or(f64::NEG_INFINITY);
            let fb = self.population[b].fitness.unwrap_or(f64::NEG_INFINITY);
            fb.total_cmp(&fa)
        });
        idx
    }

    fn pick(&self, ranked: &[usize], selection: Selection, rng: &mut ChaCha8Rng) -> usize {
        match selection {
            Selection::Truncation { fraction } => {
                let k = ((ranked.len() as f64 * fraction).ceil() as usize).clamp(1, ranked.len());
                ranked[rng.random_range(0..k)]
            }
            Selection::Tournament { size } => {
                // The rank position is the comparison key: lower is fitter.
                let mut best = rng.random_range(0..ranked.len());
                for _ in 1..size {
                    best = best.min(rng.random_range(0..ranked.len()));
                }
                ranked[best]
            }
        }
    }

    /// Breeds the next generation's candidates; every returned child passed
    /// `validator` against its parents. Rejections are appended to `rejected`.
    pub(crate) fn ask(
        &self,
        config: &EvolverConfig,
        layout: &ParamLayout,
        validator: &Validator,
        rng: &mut ChaCha8Rng,
        rejected: &mut Vec<Rejection>,
    ) -> GaAsk {
        let ga = &config.ga;
        let ranked = self.ranked();
        let mut children = Vec::with_capacity(config.population);
        let mut recipes = Vec::with_capacity(config.population);
        // Each member's checksum, once, only for members a recipe names.
        let mut hashes: Vec<Option<u64>> = vec![None; self.population.len()];
        let mut hash =
            |i: usize| *hashes[i].get_or_insert_with(|| checksum(&self.population[i].params));
        for &i in ranked.iter().take(ga.elite) {
            let p = &self.population[i];
            match validator.check_static(&p.params) {
                Ok(()) => {
                    children.push(Individual {
                        params: p.params.clone(),
                        sigmas: p.sigmas.clone(),
                        fitness: None,
                    });
                    recipes.push(GaRecipe::copy_of(hash(i)));
                }
                Err(r) => rejected.push(r),
            }
        }
        let elites = children.len();
        let slots = config.population.saturating_sub(elites);
        // Every member's tensor norms, once: a parent has many children.
        let norms: Vec<Vec<f64>> = self
            .population
            .iter()
            .map(|p| validator.tensor_norms(&p.params))
            .collect();
        for _ in 0..slots {
            for _attempt in 0..=ga.max_resample {
                let ia = self.pick(&ranked, ga.selection, rng);
                let ib = if ga.crossover != Crossover::None && rng.random_bool(ga.crossover_rate) {
                    Some(self.pick(&ranked, ga.selection, rng))
                } else {
                    None
                };
                let a = (&self.population[ia], hash(ia));
                let b = ib.map(|i| (&self.population[i], hash(i)));
                let (child, recipe) = breed(a, b, ga, layout, config.scale, rng);
                let mut parents: Vec<(&[f32], &[f64])> = vec![(&a.0.params, &norms[ia])];
                if let Some(i) = ib {
                    parents.push((&self.population[i].params, &norms[i]));
                }
                match validator.check_candidate_with(&child.params, &parents) {
                    Ok(()) => {
                        children.push(child);
                        recipes.push(recipe);
                        break;
                    }
                    Err(r) => rejected.push(r),
                }
            }
        }
        let named: Vec<u64> = recipes.iter().flat_map(GaRecipe::parents).collect();
        let parents = hashes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.filter(|h| named.contains(h)).map(|h| (i, h)))
            .collect();
        GaAsk {
            children,
            recipes,
            elites,
            parents,
        }
    }

    /// Takes the evaluated children as the new population. Children without
    /// a fitness (quarantined) are dropped; if none has one, the old
    /// population stays.
    pub(crate) fn tell(&mut self, ask: GaAsk, fitness: &[Option<f64>]) {
        let population: Vec<Individual> = ask
            .children
            .into_iter()
            .zip(fitness)
            .filter_map(|(mut c, f)| {
                c.fitness = Some((*f)?);
                Some(c)
            })
            .collect();
        if !population.is_empty() {
            self.population = population;
        }
    }
}

/// Crossover (when `b` is given), then σ self-adaptation and mutation: the
/// draws from `rng` make the child's [`GaRecipe`], which [`GaRecipe::apply`]
/// turns into its parameters. `a` and `b` come with their checksums.
fn breed(
    a: (&Individual, u64),
    b: Option<(&Individual, u64)>,
    ga: &GaConfig,
    layout: &ParamLayout,
    scale: TensorScale,
    rng: &mut ChaCha8Rng,
) -> (Individual, GaRecipe) {
    let mut sigmas = a.0.sigmas.clone();
    let mut cross = None;
    if let Some((b, hb)) = b {
        match ga.crossover {
            Crossover::None => {}
            Crossover::Uniform => {
                // The values' coins come from one seed (a counter-based
                // stream another host regenerates); the σ's from `rng`.
                let seed = rng.next_u64();
                for (s, &t) in sigmas.iter_mut().zip(&b.sigmas) {
                    if rng.random_bool(0.5) {
                        *s = t;
                    }
                }
                cross = Some(Cross {
                    parent: hb,
                    blend: Blend::Uniform { seed },
                });
            }
            Crossover::Arithmetic => {
                let alpha: f32 = rng.random();
                for (s, &t) in sigmas.iter_mut().zip(&b.sigmas) {
                    *s = alpha * *s + (1.0 - alpha) * t;
                }
                cross = Some(Cross {
                    parent: hb,
                    blend: Blend::Arithmetic {
                        alpha_bits: alpha.to_bits(),
                    },
                });
            }
        }
    }
    let seed = rng.next_u64();
    for s in sigmas.iter_mut() {
        if ga.sigma_tau > 0.0 {
            let n: f32 = rng.sample(StandardNormal);
            *s *= (ga.sigma_tau * n).exp();
        }
        *s = s.clamp(ga.sigma_min, ga.sigma_max);
    }
    // A tensor tied to another (a tied control vector) mutates with that
    // tensor's σ, so that the same noise moves both alike.
    for k in 0..sigmas.len() {
        if let Some(j) = layout.tied_to(k) {
            sigmas[k] = sigmas[j];
        }
    }
    let recipe = GaRecipe {
        parent: a.1,
        cross,
        mutation: Some(Mutation {
            seed,
            scale,
            sigma_bits: sigmas.iter().map(|s| s.to_bits()).collect(),
        }),
    };
    let mut params = vec![0.0; layout.n_params()];
    recipe
        .apply(
            &a.0.params,
            b.filter(|_| cross.is_some())
                .map(|(b, _)| b.params.as_slice()),
            layout,
            &mut params,
        )
        .expect("population members and σ have the layout's shape");
    (
        Individual {
            params,
            sigmas,
            fitness: None,
        },
        recipe,
    )
}

#[cfg(test)]
mod tests {
    use super::{GaState, Individual};

    #[test]
    fn a_quarantined_candidate_ranks_after_every_scored_one() {
        // A non-finite fitness (a NaN perplexity, which a worker sends as
        // −∞) reaches the GA as `None`: `Evolver::evaluate` quarantines it.
        let ind = |fitness| Individual {
            params: Vec::new(),
            sigmas: Vec::new(),
            fitness,
        };
        let s = GaState {
            population: vec![
                ind(Some(-3.0)),
                ind(None),
                ind(Some(-1.0)),
                ind(Some(f64::MIN)),
                ind(None),
            ],
        };
        // Best first; the quarantined last, in their original order.
        assert_eq!(s.ranked(), vec![2, 0, 3, 1, 4]);
    }
}
