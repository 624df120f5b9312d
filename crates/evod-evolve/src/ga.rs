//! Genetic algorithm: elitism, truncation or tournament selection, uniform
//! or arithmetic crossover, mutation with a self-adapted σ per tensor and
//! individual, in units of the tensor's scale, the noise drawn from
//! [`crate::noise`] with one seed per child.
//!
//! State between generations is the evaluated population; a generation
//! sorts it by fitness, copies the elite unchanged (they are re-evaluated
//! with the new generation's episode seeds, so a lucky evaluation does not
//! survive forever), and breeds the rest.

use rand::{Rng, RngExt};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::config::{Crossover, EvolverConfig, GaConfig, Selection};
use crate::layout::ParamLayout;
use crate::noise;
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
    /// How many of `children` are elite copies.
    pub elites: usize,
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
        let scales = layout.scales(config.scale);
        let mut children = Vec::with_capacity(config.population);
        for &i in ranked.iter().take(ga.elite) {
            let p = &self.population[i];
            match validator.check_static(&p.params) {
                Ok(()) => children.push(Individual {
                    params: p.params.clone(),
                    sigmas: p.sigmas.clone(),
                    fitness: None,
                }),
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
                let a = &self.population[ia];
                let b = ib.map(|i| &self.population[i]);
                let child = breed(a, b, ga, layout, &scales, rng);
                let mut parents: Vec<(&[f32], &[f64])> = vec![(&a.params, &norms[ia])];
                if let Some(i) = ib {
                    parents.push((&self.population[i].params, &norms[i]));
                }
                match validator.check_candidate_with(&child.params, &parents) {
                    Ok(()) => {
                        children.push(child);
                        break;
                    }
                    Err(r) => rejected.push(r),
                }
            }
        }
        GaAsk { children, elites }
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

/// Crossover (when `b` is given), then σ self-adaptation and mutation.
fn breed(
    a: &Individual,
    b: Option<&Individual>,
    ga: &GaConfig,
    layout: &ParamLayout,
    scales: &[f32],
    rng: &mut ChaCha8Rng,
) -> Individual {
    let mut params = a.params.clone();
    let mut sigmas = a.sigmas.clone();
    if let Some(b) = b {
        match ga.crossover {
            Crossover::None => {}
            Crossover::Uniform => {
                for (x, &y) in params.iter_mut().zip(&b.params) {
                    if rng.random_bool(0.5) {
                        *x = y;
                    }
                }
                for (s, &t) in sigmas.iter_mut().zip(&b.sigmas) {
                    if rng.random_bool(0.5) {
                        *s = t;
                    }
                }
            }
            Crossover::Arithmetic => {
                let alpha: f32 = rng.random();
                for (x, &y) in params.iter_mut().zip(&b.params) {
                    *x = alpha * *x + (1.0 - alpha) * y;
                }
                for (s, &t) in sigmas.iter_mut().zip(&b.sigmas) {
                    *s = alpha * *s + (1.0 - alpha) * t;
                }
            }
        }
    }
    let seed = rng.next_u64();
    for ((t, s), &scale) in layout.tensors().iter().zip(sigmas.iter_mut()).zip(scales) {
        if ga.sigma_tau > 0.0 {
            let n: f32 = rng.sample(StandardNormal);
            *s *= (ga.sigma_tau * n).exp();
        }
        *s = s.clamp(ga.sigma_min, ga.sigma_max);
        noise::add_scaled_assign(seed, t.offset as u64, *s * scale, &mut params[t.range()]);
    }
    Individual {
        params,
        sigmas,
        fitness: None,
    }
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
