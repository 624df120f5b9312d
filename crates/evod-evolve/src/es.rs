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
    /// The mean itself is evaluated first when `eval_center` is set (and
    /// it is valid).
    pub(crate) fn ask(
        &self,
        config: &EvolverConfig,
        eval_center: bool,
        validator: &Validator,
        rng: &mut ChaCha8Rng,
        rejected: &mut Vec<Rejection>,
    ) -> EsAsk {
        let pairs = config.population / 2;
        let base = checksum(&self.mean);
        let mut recipes = Vec::with_capacity(config.population + 1);
        let mut seeds_kept = Vec::with_capacity(pairs);
        let with_center = eval_center && validator.check_static(&self.mean).is_ok();
        if with_center {
            recipes.push(Recipe::center(base, config.scale));
        }
        let norms = validator.tensor_norms(&self.mean);
        // Seeds drawn in pair order, then each pair validated in one pass
        // over its noise (`Validator::check_antithetic`: exactly what
        // applying and checking each half gives), pairs spread over the
        // cores and put back in order.
        let seeds: Vec<u64> = (0..pairs).map(|_| rng.next_u64()).collect();
        let threads = crate::par::threads_for(pairs, pairs.saturating_mul(self.mean.len()));
        let checked = crate::par::map(pairs, threads, |p| {
            let plus = Recipe::new(base, seeds[p], self.sigma, Sign::Plus, config.scale);
            validator.check_antithetic(&self.mean, &norms, &plus)
        });
        for (seed, [a, b]) in seeds.into_iter().zip(checked) {
            match (a, b) {
                (Ok(()), Ok(())) => {
                    recipes.push(Recipe::new(
                        base,
                        seed,
                        self.sigma,
                        Sign::Plus,
                        config.scale,
                    ));
                    recipes.push(Recipe::new(
                        base,
                        seed,
                        self.sigma,
                        Sign::Minus,
                        config.scale,
                    ));
                    seeds_kept.push(seed);
                }
                (a, b) => rejected.extend(a.err().into_iter().chain(b.err())),
            }
        }
        EsAsk {
            base,
            recipes,
            seeds: seeds_kept,
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
        let weights: Vec<(u64, f64)> = kept
            .iter()
            .enumerate()
            .map(|(k, &(seed, _, _))| (seed, ranks[2 * k] - ranks[2 * k + 1]))
            .collect();
        let gscale = 1.0 / (2.0 * kept.len() as f64 * f64::from(self.sigma));
        let t = self.t + 1;
        let bc1 = 1.0 - es.beta1.powf(t as f64);
        let bc2 = 1.0 - es.beta2.powf(t as f64);
        // The scale of every value's tensor, per span of the layout.
        let spans: Vec<(usize, usize, f64)> = layout
            .tensors()
            .iter()
            .zip(layout.scales(config.scale))
            .map(|(span, s)| (span.offset, span.offset + span.len, f64::from(s)))
            .collect();
        // Values in blocks: each block's gradient is summed over the pairs
        // in pair order (the order of one pass per pair over the whole
        // vector), in a buffer that stays in the cache, and the Adam step
        // follows at once. Blocks are independent, so they are spread over
        // the cores; every value is computed by the same code whatever
        // thread runs it.
        const BLOCK: usize = 1 << 14;
        let blocks = n.div_ceil(BLOCK);
        let threads = crate::par::threads_for(blocks, n.saturating_mul(weights.len().max(1)));
        let mut m = vec![0.0f64; n];
        let mut v = vec![0.0f64; n];
        let mut mean = vec![0.0f32; n];
        let parts: Vec<(&mut [f64], &mut [f64], &mut [f32])> = m
            .chunks_mut(BLOCK)
            .zip(v.chunks_mut(BLOCK))
            .zip(mean.chunks_mut(BLOCK))
            .map(|((m, v), x)| (m, v, x))
            .collect();
        crate::par::for_each(parts, threads, |b, (m_out, v_out, mean_out)| {
            let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
            // Gradient in scaled coordinates z (θ = θ₀ + s·z): the noise
            // index of a value is its flat index, but in a tensor that
            // takes another's noise (`TensorSpan::noise_offset`).
            let mut grad = vec![0.0f64; hi - lo];
            for &(seed, w) in &weights {
                for (at, r) in layout.noise_runs(lo..hi) {
                    noise::accumulate(seed, at as u64, w, &mut grad[r.start - lo..r.end - lo]);
                }
            }
            for &(start, end, s) in &spans {
                let (a, b) = (start.max(lo), end.min(hi));
                if a < b {
                    let step = AdamStep {
                        es,
                        gscale,
                        bc1,
                        bc2,
                        s,
                    };
                    let r = a - lo..b - lo;
                    adam(
                        &step,
                        &grad[r.clone()],
                        (&self.mean[a..b], &self.m[a..b], &self.v[a..b]),
                        (
                            &mut mean_out[r.clone()],
                            &mut m_out[r.clone()],
                            &mut v_out[r],
                        ),
                    );
                }
            }
        });
        validator.check_candidate(&mean, &[&self.mean])?;
        self.mean = mean;
        self.m = m;
        self.v = v;
        self.t = t;
        self.sigma = (self.sigma * es.sigma_decay).max(es.sigma_min);
        Ok(())
    }
}

/// The constants of one Adam step over one tensor's values.
struct AdamStep<'a> {
    es: &'a EsConfig,
    /// `1 / (2 · pairs · σ)`.
    gscale: f64,
    /// Bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    bc1: f64,
    bc2: f64,
    /// The tensor's scale.
    s: f64,
}

multiversioned! {
    /// The Adam step of values with gradient sums `grad` and state `(mean,
    /// m, v)`: the new state into `out`.
    fn adam(
        c: &AdamStep<'_>,
        grad: &[f64],
        state: (&[f32], &[f64], &[f64]),
        out: (&mut [f32], &mut [f64], &mut [f64])
    ) {
        let es = c.es;
        let (mean, m, v) = state;
        let (mean_out, m_out, v_out) = out;
        for (i, &g) in grad.iter().enumerate() {
            let x = f64::from(mean[i]);
            // Ascent direction: fitness gradient minus the gradient of the
            // L2 penalty ½·wd·θ², both with respect to z (∂θ/∂z = s), so
            // their ratio is the one in θ, whatever the scale.
            let g = g * c.gscale - es.weight_decay * x * c.s;
            let mi = es.beta1 * m[i] + (1.0 - es.beta1) * g;
            let vi = es.beta2 * v[i] + (1.0 - es.beta2) * g * g;
            let step = es.learning_rate * (mi / c.bc1) / ((vi / c.bc2).sqrt() + es.adam_eps);
            m_out[i] = mi;
            v_out[i] = vi;
            mean_out[i] = (x + c.s * step) as f32;
        }
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
