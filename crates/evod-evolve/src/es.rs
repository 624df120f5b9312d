//! OpenAI-ES (Salimans et al. 2017): antithetic perturbations of a mean,
//! centered-rank fitness shaping, an Adam step on the estimated gradient,
//! L2 weight decay — all in units of each tensor's scale.
//!
//! A candidate is a [`Recipe`]: `mean ± σ·s_t·ε(seed)` with `ε` from
//! [`crate::noise`] and `s_t` the tensor's scale. `ask` draws one noise seed
//! per pair from the strategy's generator and validates both halves with one
//! reused buffer; `tell` regenerates the noise from the seeds. Memory per
//! generation is O(n), not O(population × n).
//!
//! State between generations is the mean, σ and the Adam moments. A pair
//! whose either half fails validation, or is quarantined, is left out of
//! the gradient; an update that would make the mean itself invalid is
//! refused and the state stays as it was.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{EsConfig, EvolverConfig};
use crate::layout::ParamLayout;
use crate::noise;
use crate::recipe::{Recipe, Sign, checksum};
use crate::validate::{Rejection, Validator};

/// ES state saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsState {
    /// The search distribution's mean.
    pub mean: Vec<f32>,
    /// Current noise σ (in units of each tensor's scale).
    pub sigma: f32,
    /// Adam first moment (scaled coordinates).
    pub m: Vec<f64>,
    /// Adam second moment (scaled coordinates).
    pub v: Vec<f64>,
    /// Adam step count.
    pub t: u64,
}

/// Candidates of one ES generation, not yet evaluated.
pub(crate) struct EsAsk {
    /// Checksum of the mean the recipes apply to.
    pub base: u64,
    /// Candidates in evaluation order: the mean first (if evaluated), then
    /// `+ε, −ε` of each kept pair.
    pub recipes: Vec<Recipe>,
    /// Noise seed of each kept pair.
    pub seeds: Vec<u64>,
    /// Whether `recipes[0]` is the mean.
    pub with_center: bool,
}

/// Centered ranks in [−0.5, 0.5] (ties broken by position, deterministic).
fn centered_ranks(values: &[f64]) -> Vec<f64> {
    let n = values.len();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut out = vec![0.0; n];
    if n == 1 {
        return out;
    }
    for (rank, &i) in idx.iter().enumerate() {
        out[i] = rank as f64 / (n - 1) as f64 - 0.5;
    }
    out
}

impl EsState {
    /// The start state: the mean at the initial parameters.
    pub(crate) fn new(initial: Vec<f32>, es: &EsConfig) -> Self {
        let n = initial.len();
        Self {
            mean: initial,
            sigma: es.sigma,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// Samples `population / 2` antithetic pairs as recipes against the
    /// mean; pairs with a rejected half are dropped (their rejections
    /// appended to `rejected`).
    pub(crate) fn ask(
        &self,
        config: &EvolverConfig,
        layout: &ParamLayout,
        validator: &Validator,
        rng: &mut ChaCha8Rng,
        rejected: &mut Vec<Rejection>,
    ) -> EsAsk {
        let pairs = config.population / 2;
        let base = checksum(&self.mean);
        let mut recipes = Vec::with_capacity(config.population + 1);
        let mut seeds = Vec::with_capacity(pairs);
        let with_center = config.es.eval_center && validator.check_static(&self.mean).is_ok();
        if with_center {
            recipes.push(Recipe::center(base, config.scale));
        }
        let norms = validator.tensor_norms(&self.mean);
        let parent: [(&[f32], &[f64]); 1] = [(&self.mean, &norms)];
        let mut buf = vec![0.0f32; self.mean.len()];
        for _ in 0..pairs {
            let seed = rng.next_u64();
            let plus = Recipe::new(base, seed, self.sigma, Sign::Plus, config.scale);
            let minus = Recipe::new(base, seed, self.sigma, Sign::Minus, config.scale);
            let mut check = |r: &Recipe| {
                r.apply(&self.mean, layout, &mut buf)
                    .expect("the mean has the layout's length");
                validator.check_candidate_with(&buf, &parent)
            };
            let a = check(&plus);
            let b = check(&minus);
            match (a, b) {
                (Ok(()), Ok(())) => {
                    recipes.push(plus);
                    recipes.push(minus);
                    seeds.push(seed);
                }
                (a, b) => rejected.extend(a.err().into_iter().chain(b.err())),
            }
        }
        EsAsk {
            base,
            recipes,
            seeds,
            with_center,
        }
    }

    /// Adam step (in scaled coordinates) on the centered-rank gradient of
    /// the evaluated pairs, the noise regenerated from the pairs' seeds.
    /// Returns the rejection if the new mean would be invalid (state kept).
    pub(crate) fn tell(
        &mut self,
        ask: &EsAsk,
        fitness: &[Option<f64>],
        config: &EvolverConfig,
        layout: &ParamLayout,
        validator: &Validator,
    ) -> Result<(), Rejection> {
        let es = &config.es;
        let off = usize::from(ask.with_center);
        let mut kept: Vec<(u64, f64, f64)> = Vec::new();
        for (p, &seed) in ask.seeds.iter().enumerate() {
            if let (Some(Some(fp)), Some(Some(fm))) =
                (fitness.get(off + 2 * p), fitness.get(off + 2 * p + 1))
            {
                kept.push((seed, *fp, *fm));
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        let values: Vec<f64> = kept.iter().flat_map(|&(_, a, b)| [a, b]).collect();
        let ranks = centered_ranks(&values);
        let n = self.mean.len();
        // Gradient in scaled coordinates z (θ = θ₀ + s·z): the noise index
        // of a value is its flat index (tensors are contiguous from 0).
        let mut grad = vec![0.0f64; n];
        for (k, &(seed, _, _)) in kept.iter().enumerate() {
            let w = ranks[2 * k] - ranks[2 * k + 1];
            noise::accumulate(seed, 0, w, &mut grad);
        }
        let gscale = 1.0 / (2.0 * kept.len() as f64 * f64::from(self.sigma));
        let t = self.t + 1;
        let mut m = self.m.clone();
        let mut v = self.v.clone();
        let mut mean = self.mean.clone();
        let bc1 = 1.0 - es.beta1.powf(t as f64);
        let bc2 = 1.0 - es.beta2.powf(t as f64);
        for (span, s) in layout.tensors().iter().zip(layout.scales(config.scale)) {
            let s = f64::from(s);
            for i in span.range() {
                // Ascent direction: fitness gradient minus the gradient of
                // the L2 penalty ½·wd·θ², both with respect to z (∂θ/∂z = s),
                // so their ratio is the one in θ, whatever the scale.
                let g = grad[i] * gscale - es.weight_decay * f64::from(mean[i]) * s;
                m[i] = es.beta1 * m[i] + (1.0 - es.beta1) * g;
                v[i] = es.beta2 * v[i] + (1.0 - es.beta2) * g * g;
                let step = es.learning_rate * (m[i] / bc1) / ((v[i] / bc2).sqrt() + es.adam_eps);
                mean[i] = (f64::from(mean[i]) + s * step) as f32;
            }
        }
        validator.check_candidate(&mean, &[&self.mean])?;
        self.mean = mean;
        self.m = m;
        self.v = v;
        self.t = t;
        self.sigma = (self.sigma * es.sigma_decay).max(es.sigma_min);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::centered_ranks;

    #[test]
    fn centered_ranks_span_minus_half_to_half_by_order() {
        let r = centered_ranks(&[3.0, -1.0, 10.0, 0.5]);
        let want = [1.0 / 6.0, -0.5, 0.5, -1.0 / 6.0];
        assert!(
            r.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{r:?}"
        );
        assert_eq!(centered_ranks(&[7.0]), vec![0.0]);
    }
}
