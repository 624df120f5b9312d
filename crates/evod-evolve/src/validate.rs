//! Validation (the seed document's CTRM) of candidates and publishes.
//!
//! A candidate is checked before it reaches any evaluator: every value
//! finite, the length of the layout, every tensor's L2 norm within
//! `max_rms · s · √n`, and every tensor's change against the parent it was
//! derived from within `max_relative_change` (relative to
//! `max(‖parent‖, change_floor · s · √n)`), where `s` is the tensor's scale
//! and `n` its size: the bounds are per element and scale-relative, so the
//! defaults hold from 10² to 10⁷ parameters. A publish is checked again (finite,
//! shape, norm) and must not regress the published fitness. Each failure is
//! a [`Rejection`]; the evolver logs it with `tracing` and counts it by
//! [`RejectionKind`] in [`crate::EvolveStats`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::ValidationConfig;
use crate::layout::{ParamLayout, SUM_LANES, SumSq, TensorScale, l2, l2_and_diff};
use crate::noise;
use crate::recipe::Recipe;

/// Why a candidate or a publish was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum Rejection {
    /// A value is NaN or infinite.
    #[error("value {index} is not finite ({value})")]
    NonFinite {
        /// Flat index of the first non-finite value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The vector does not have the layout's length.
    #[error("has {actual} values, the layout has {expected}")]
    ShapeMismatch {
        /// Layout length.
        expected: usize,
        /// Candidate length.
        actual: usize,
    },
    /// A tensor's L2 norm is above the bound.
    #[error("tensor {tensor} has norm {norm:.4e}, above the bound {max:.4e}")]
    NormTooLarge {
        /// Tensor name.
        tensor: String,
        /// Its L2 norm.
        norm: f64,
        /// The bound.
        max: f64,
    },
    /// A tensor moved too far from its parent in one generation.
    #[error(
        "tensor {tensor} changed by {relative:.4e} relative to its parent, above the bound {max:.4e}"
    )]
    ChangeTooLarge {
        /// Tensor name.
        tensor: String,
        /// `‖child − parent‖ / max(‖parent‖, change_floor · s · √n)`.
        relative: f64,
        /// The bound.
        max: f64,
    },
    /// The gate fitness is below the currently published fitness.
    #[error("gate fitness {gate} is below the published fitness {published}")]
    FitnessRegression {
        /// Gate fitness of the candidate.
        gate: f64,
        /// Fitness of the published model.
        published: f64,
    },
}

/// The counter a [`Rejection`] increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectionKind {
    /// [`Rejection::NonFinite`].
    NonFinite,
    /// [`Rejection::ShapeMismatch`].
    ShapeMismatch,
    /// [`Rejection::NormTooLarge`].
    NormTooLarge,
    /// [`Rejection::ChangeTooLarge`].
    ChangeTooLarge,
    /// [`Rejection::FitnessRegression`].
    FitnessRegression,
}

impl Rejection {
    /// The counter this rejection increments.
    pub fn kind(&self) -> RejectionKind {
        match self {
            Self::NonFinite { .. } => RejectionKind::NonFinite,
            Self::ShapeMismatch { .. } => RejectionKind::ShapeMismatch,
            Self::NormTooLarge { .. } => RejectionKind::NormTooLarge,
            Self::ChangeTooLarge { .. } => RejectionKind::ChangeTooLarge,
            Self::FitnessRegression { .. } => RejectionKind::FitnessRegression,
        }
    }
}

/// Checks candidates against a layout and a [`ValidationConfig`].
#[derive(Debug, Clone)]
pub struct Validator {
    config: ValidationConfig,
    layout: ParamLayout,
    /// Per tensor: `s · √n`, the norm of a tensor whose RMS is its scale.
    unit_norms: Vec<f64>,
}

impl Validator {
    /// A validator for vectors of `layout` whose tensors' scales follow
    /// `scale`.
    pub fn new(config: ValidationConfig, layout: ParamLayout, scale: TensorScale) -> Self {
        let unit_norms = layout
            .tensors()
            .iter()
            .zip(layout.scales(scale))
            .map(|(t, s)| f64::from(s) * (t.len as f64).sqrt())
            .collect();
        Self {
            config,
            layout,
            unit_norms,
        }
    }

    /// The layout candidates must have.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Shape, finiteness and per-tensor norm: what any vector must pass.
    pub fn check_static(&self, params: &[f32]) -> Result<(), Rejection> {
        if params.len() != self.layout.n_params() {
            return Err(Rejection::ShapeMismatch {
                expected: self.layout.n_params(),
                actual: params.len(),
            });
        }
        if let Some(index) = params.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::NonFinite {
                index,
                value: params[index],
            });
        }
        for (t, unit) in self.layout.tensors().iter().zip(&self.unit_norms) {
            let norm = l2(&params[t.range()]);
            let max = self.config.max_rms * unit;
            if norm > max {
                return Err(Rejection::NormTooLarge {
                    tensor: t.name.clone(),
                    norm,
                    max,
                });
            }
        }
        Ok(())
    }

    /// Everything a candidate must pass before evaluation. `parents` are
    /// the vectors it was derived from (already valid); the change bound
    /// holds against the nearest of them, tensor by tensor. With no parents
    /// only the static checks apply.
    pub fn check_candidate(&self, params: &[f32], parents: &[&[f32]]) -> Result<(), Rejection> {
        let mut with_norms = Vec::with_capacity(parents.len());
        for p in parents {
            if p.len() != self.layout.n_params() {
                self.check_static(params)?;
                return Err(Rejection::ShapeMismatch {
                    expected: self.layout.n_params(),
                    actual: p.len(),
                });
            }
            with_norms.push((*p, self.tensor_norms(p)));
        }
        let refs: Vec<(&[f32], &[f64])> =
            with_norms.iter().map(|(p, n)| (*p, n.as_slice())).collect();
        self.check_candidate_with(params, &refs)
    }

    /// The L2 norm of every tensor of `params` (which has the layout's
    /// length), for [`Validator::check_candidate_with`].
    pub(crate) fn tensor_norms(&self, params: &[f32]) -> Vec<f64> {
        self.layout
            .tensors()
            .iter()
            .map(|t| l2(&params[t.range()]))
            .collect()
    }

    /// [`Validator::check_candidate`] with each parent's tensor norms
    /// computed once by the caller (a parent has many children). One pass
    /// over each tensor computes its norm and its distance to one parent;
    /// the result, and which rejection is reported, are those of the static
    /// checks followed by the change bound.
    pub(crate) fn check_candidate_with(
        &self,
        params: &[f32],
        parents: &[(&[f32], &[f64])],
    ) -> Result<(), Rejection> {
        if params.len() != self.layout.n_params() {
            return Err(Rejection::ShapeMismatch {
                expected: self.layout.n_params(),
                actual: params.len(),
            });
        }
        if let Some(index) = params.iter().position(|v| !v.is_finite()) {
            return Err(Rejection::NonFinite {
                index,
                value: params[index],
            });
        }
        let tensors = self.layout.tensors();
        // Per tensor: (norm, smallest relative change over the parents).
        let mut measured = Vec::with_capacity(tensors.len());
        for (k, (t, unit)) in tensors.iter().zip(&self.unit_norms).enumerate() {
            let floor = self.config.change_floor * unit;
            let child = &params[t.range()];
            let mut norm = None;
            let mut best = f64::INFINITY;
            for (p, norms) in parents {
                let (n, d) = l2_and_diff(child, &p[t.range()]);
                norm = Some(n);
                best = best.min(d / norms[k].max(floor));
            }
            measured.push((norm.unwrap_or_else(|| l2(child)), best));
        }
        for ((t, unit), &(norm, _)) in tensors.iter().zip(&self.unit_norms).zip(&measured) {
            let max = self.config.max_rms * unit;
            if norm > max {
                return Err(Rejection::NormTooLarge {
                    tensor: t.name.clone(),
                    norm,
                    max,
                });
            }
        }
        for (t, &(_, relative)) in tensors.iter().zip(&measured) {
            if relative > self.config.max_relative_change {
                return Err(Rejection::ChangeTooLarge {
                    tensor: t.name.clone(),
                    relative,
                    max: self.config.max_relative_change,
                });
            }
        }
        Ok(())
    }

    /// [`Validator::check_candidate_with`] of both halves of an antithetic
    /// pair, `plus` and its mirror (same base, seed, σ and scale, the other
    /// sign), against their one `parent` (the base, whose tensor norms are
    /// `parent_norms`), without building either vector: one pass over the
    /// noise computes, per value, `p = k_t · ε` once and both candidates'
    /// values `parent + p` and `parent − p` — bit for bit what
    /// [`Recipe::apply`] gives for each (`−k_t · ε` is exactly `−(k_t · ε)`,
    /// and `x + (−p)` is `x − p`) — and feeds them to the same sums in the
    /// same order. So the results, and which rejection is reported, are
    /// exactly those of applying each recipe and checking it.
    pub(crate) fn check_antithetic(
        &self,
        parent: &[f32],
        parent_norms: &[f64],
        plus: &Recipe,
    ) -> [Result<(), Rejection>; 2] {
        let n = self.layout.n_params();
        if parent.len() != n || plus.sigma() == 0.0 {
            // Not the fast path's case: apply and check each half.
            let mut buf = vec![0.0f32; parent.len()];
            let parents: [(&[f32], &[f64]); 1] = [(parent, parent_norms)];
            return [plus.sign, plus.sign.other()].map(|sign| {
                let r = Recipe { sign, ..*plus };
                match r.apply(parent, &self.layout, &mut buf) {
                    Ok(()) => self.check_candidate_with(&buf, &parents),
                    Err(_) => Err(Rejection::ShapeMismatch {
                        expected: n,
                        actual: parent.len(),
                    }),
                }
            });
        }
        let tensors = self.layout.tensors();
        let factors = plus.factors(&self.layout);
        let mut eps = [0.0f32; CHUNK];
        let mut kids = [[0.0f32; CHUNK]; 2];
        // Per half, per tensor: (norm², distance² to the parent).
        let mut sums = [
            Vec::with_capacity(tensors.len()),
            Vec::with_capacity(tensors.len()),
        ];
        for (t, &k) in tensors.iter().zip(&factors) {
            let mut acc = [[SumSq::default(); 2]; 2];
            let mut at = t.offset;
            while at < t.offset + t.len {
                let len = CHUNK.min(t.offset + t.len - at);
                let base = &parent[at..at + len];
                noise::fill(
                    plus.seed,
                    (t.noise_offset + (at - t.offset)) as u64,
                    &mut eps[..len],
                );
                pair_chunk(k, base, &eps[..len], &mut kids, &mut acc);
                at += len;
            }
            for (h, a) in acc.iter().enumerate() {
                sums[h].push((a[0].total(), a[1].total()));
            }
        }
        [0, 1].map(|h| {
            let sign = if h == 0 { plus.sign } else { plus.sign.other() };
            if sums[h]
                .iter()
                .any(|(a, d)| !(a.is_finite() && d.is_finite()))
            {
                // A value is NaN or infinite (its square is; a finite f32
                // squared is finite in f64): report the first one, as the
                // static check does.
                let mut buf = vec![0.0f32; n];
                let r = Recipe { sign, ..*plus };
                if r.apply(parent, &self.layout, &mut buf).is_ok()
                    && let Some(index) = buf.iter().position(|v| !v.is_finite())
                {
                    return Err(Rejection::NonFinite {
                        index,
                        value: buf[index],
                    });
                }
            }
            for ((t, unit), &(a, _)) in tensors.iter().zip(&self.unit_norms).zip(&sums[h]) {
                let norm = a.sqrt();
                let max = self.config.max_rms * unit;
                if norm > max {
                    return Err(Rejection::NormTooLarge {
                        tensor: t.name.clone(),
                        norm,
                        max,
                    });
                }
            }
            for (k, ((t, unit), &(_, d))) in tensors
                .iter()
                .zip(&self.unit_norms)
                .zip(&sums[h])
                .enumerate()
            {
                let floor = self.config.change_floor * unit;
                let relative = f64::INFINITY.min(d.sqrt() / parent_norms[k].max(floor));
                if relative > self.config.max_relative_change {
                    return Err(Rejection::ChangeTooLarge {
                        tensor: t.name.clone(),
                        relative,
                        max: self.config.max_relative_change,
                    });
                }
            }
            Ok(())
        })
    }

    /// What a publish must pass: the static checks, a finite gate fitness,
    /// and no regression below the published fitness (if any).
    pub fn check_publish(
        &self,
        params: &[f32],
        gate: f64,
        published: Option<f64>,
    ) -> Result<(), Rejection> {
        self.check_static(params)?;
        let floor = published.unwrap_or(f64::NEG_INFINITY);
        if gate.is_nan() || gate < floor {
            return Err(Rejection::FitnessRegression {
                gate,
                published: floor,
            });
        }
        Ok(())
    }
}

multiversioned! {
    /// One chunk of [`Validator::check_antithetic`]: both halves' values
    /// `base ± k·ε` into `kids`, and their sums (`acc[half][0]`: squares,
    /// `acc[half][1]`: squared distances to `base`).
    fn pair_chunk(
        k: f32,
        base: &[f32],
        eps: &[f32],
        kids: &mut [[f32; CHUNK]; 2],
        acc: &mut [[SumSq; 2]; 2]
    ) {
        let len = base.len();
        let [kp, km] = kids;
        for (((&b, &e), cp), cm) in base.iter().zip(eps).zip(kp.iter_mut()).zip(km.iter_mut()) {
            let p = k * e;
            *cp = b + p;
            *cm = b - p;
        }
        for (h, kid) in kids.iter().enumerate() {
            acc[h][0].add(&kid[..len]);
            acc[h][1].add_diff(&kid[..len], base);
        }
    }
}

/// Values per chunk of [`Validator::check_antithetic`]: a multiple of
/// [`SUM_LANES`], so each value lands in the partial sum it would in one
/// pass over its tensor.
const CHUNK: usize = 256 * SUM_LANES;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Sign;

    /// Both halves of a pair checked in one pass give exactly what applying
    /// each recipe and checking it gives: passes, and every kind of
    /// rejection with the same numbers.
    #[test]
    fn antithetic_check_equals_apply_and_check() {
        let layout = ParamLayout::new(vec![
            ("blk.0.weight".into(), vec![37, 1500]),
            ("blk.0.bias".into(), vec![1500]),
            ("blk.1.weight".into(), vec![1500, 3]),
            ("blk.1.bias".into(), vec![3]),
        ])
        .unwrap();
        let n = layout.n_params();
        let parent: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 5000.0)
            .collect();
        let glorot = TensorScale::Glorot;
        let cases: [(f32, TensorScale, f64, f64); 5] = [
            (0.5, glorot, 100.0, 4.0),                 // passes
            (40.0, glorot, 100.0, 4.0),                // change too large
            (0.5, glorot, 100.0, 1e-6),                // the same, small bound
            (3.0, glorot, 0.5, 1e9),                   // norm too large
            (f32::MAX, TensorScale::Unit, 100.0, 4.0), // infinite values
        ];
        let mut kinds = Vec::new();
        for (sigma, scale, max_rms, max_relative_change) in cases {
            let config = ValidationConfig {
                max_rms,
                max_relative_change,
                change_floor: 1.0,
            };
            let v = Validator::new(config, layout.clone(), scale);
            let norms = v.tensor_norms(&parent);
            let plus = Recipe::new(7, 42, sigma, Sign::Plus, scale);
            let got = v.check_antithetic(&parent, &norms, &plus);
            let mut buf = vec![0.0f32; n];
            for (h, sign) in [Sign::Plus, Sign::Minus].into_iter().enumerate() {
                Recipe { sign, ..plus }
                    .apply(&parent, &layout, &mut buf)
                    .unwrap();
                let want = v.check_candidate_with(&buf, &[(&parent, &norms)]);
                assert_eq!(got[h], want, "σ {sigma}, half {h}");
                kinds.push(want.err().map(|r| r.kind()));
            }
        }
        // The cases cover a pass and each kind the pair check decides.
        for k in [
            None,
            Some(RejectionKind::ChangeTooLarge),
            Some(RejectionKind::NormTooLarge),
            Some(RejectionKind::NonFinite),
        ] {
            assert!(kinds.contains(&k), "{k:?} not covered: {kinds:?}");
        }
    }
}
