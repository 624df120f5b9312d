//! OpenAI-ES (Salimans et al. 2017): antithetic Gaussian perturbations of a
//! mean, centered-rank fitness shaping, an Adam step on the estimated
//! gradient, L2 weight decay.
//!
//! State between generations is the mean, σ and the Adam moments. A pair
//! whose either half fails validation, or is quarantined, is left out of
//! the gradient; an update that would make the mean itself invalid is
//! refused and the state stays as it was.

use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::config::{EsConfig, EvolverConfig};
use crate::validate::{Rejection, Validator};

/// ES state saved in checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EsState {
    /// The search distribution's mean.
    pub mean: Vec<f32>,
    /// Current noise σ.
    pub sigma: f32,
    /// Adam first moment.
    pub m: Vec<f64>,
    /// Adam second moment.
    pub v: Vec<f64>,
    /// Adam step count.
    pub t: u64,
}

/// Candidates of one ES generation, not yet evaluated.
pub(crate) struct EsAsk {
    /// Candidates in evaluation order: the mean first (if evaluated), then
    /// `+ε, −ε` of each kept pair.
    pub candidates: Vec<Vec<f32>>,
    /// Noise of each kept pair.
    pub noise: Vec<Vec<f32>>,
    /// Whether `candidates[0]` is the mean.
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

    /// Samples `population / 2` antithetic pairs; pairs with a rejected half
    /// are dropped (their rejections appended to `rejected`).
    pub(crate) fn ask(
        &self,
        config: &EvolverConfig,
        validator: &Validator,
        rng: &mut ChaCha8Rng,
        rejected: &mut Vec<Rejection>,
    ) -> EsAsk {
        let n = self.mean.len();
        let pairs = config.population / 2;
        let mut candidates = Vec::with_capacity(config.population + 1);
        let mut noise = Vec::with_capacity(pairs);
        let with_center = config.es.eval_center && validator.check_static(&self.mean).is_ok();
        if with_center {
            candidates.push(self.mean.clone());
        }
        let parent: [&[f32]; 1] = [&self.mean];
        for _ in 0..pairs {
            let eps: Vec<f32> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
            let plus: Vec<f32> = self
                .mean
                .iter()
                .zip(&eps)
                .map(|(&m, &e)| m + self.sigma * e)
                .collect();
            let minus: Vec<f32> = self
                .mean
                .iter()
                .zip(&eps)
                .map(|(&m, &e)| m - self.sigma * e)
                .collect();
            let a = validator.check_candidate(&plus, &parent);
            let b = validator.check_candidate(&minus, &parent);
            match (a, b) {
                (Ok(()), Ok(())) => {
                    candidates.push(plus);
                    candidates.push(minus);
                    noise.push(eps);
                }
                (a, b) => rejected.extend(a.err().into_iter().chain(b.err())),
            }
        }
        EsAsk {
            candidates,
            noise,
            with_center,
        }
    }

    /// Adam step on the centered-rank gradient of the evaluated pairs.
    /// Returns the rejection if the new mean would be invalid (state kept).
    pub(crate) fn tell(
        &mut self,
        ask: &EsAsk,
        fitness: &[Option<f64>],
        es: &EsConfig,
        validator: &Validator,
    ) -> Result<(), Rejection> {
        let off = usize::from(ask.with_center);
        let mut kept: Vec<(usize, f64, f64)> = Vec::new();
        for (p, _) in ask.noise.iter().enumerate() {
            if let (Some(Some(fp)), Some(Some(fm))) =
                (fitness.get(off + 2 * p), fitness.get(off + 2 * p + 1))
            {
                kept.push((p, *fp, *fm));
            }
        }
        if kept.is_empty() {
            return Ok(());
        }
        let values: Vec<f64> = kept.iter().flat_map(|&(_, a, b)| [a, b]).collect();
        let ranks = centered_ranks(&values);
        let n = self.mean.len();
        let mut grad = vec![0.0f64; n];
        for (k, &(p, _, _)) in kept.iter().enumerate() {
            let w = ranks[2 * k] - ranks[2 * k + 1];
            for (g, &e) in grad.iter_mut().zip(&ask.noise[p]) {
                *g += w * f64::from(e);
            }
        }
        let scale = 1.0 / (2.0 * kept.len() as f64 * f64::from(self.sigma));
        let t = self.t + 1;
        let mut m = self.m.clone();
        let mut v = self.v.clone();
        let mut mean = self.mean.clone();
        let bc1 = 1.0 - es.beta1.powf(t as f64);
        let bc2 = 1.0 - es.beta2.powf(t as f64);
        for i in 0..n {
            // Ascent direction: fitness gradient minus the L2 decay pull.
            let g = grad[i] * scale - es.weight_decay * f64::from(mean[i]);
            m[i] = es.beta1 * m[i] + (1.0 - es.beta1) * g;
            v[i] = es.beta2 * v[i] + (1.0 - es.beta2) * g * g;
            let step = es.learning_rate * (m[i] / bc1) / ((v[i] / bc2).sqrt() + es.adam_eps);
            mean[i] = (f64::from(mean[i]) + step) as f32;
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
