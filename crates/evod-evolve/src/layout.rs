//! The shape of a flat parameter vector: which tensor owns which range.
//!
//! Candidates travel as one flat `f32` vector; the strategies (per-tensor σ)
//! and the validator (per-tensor norm and change bounds) need to know where
//! each tensor starts and ends. [`ParamLayout`] is built from the runtime's
//! `Architecture::tensor_specs()` (name and shape of every tensor, in the
//! order they are laid out in the flat vector).

use serde::{Deserialize, Serialize};

use crate::error::EvolveError;
use crate::rt;

/// One tensor of the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpan {
    /// Tensor name, e.g. `blk.0.weight`.
    pub name: String,
    /// Tensor shape (GGUF order).
    pub shape: Vec<u64>,
    /// Index of its first element in the flat vector.
    pub offset: usize,
    /// Number of elements.
    pub len: usize,
    /// Index of the noise its first element takes: value `j` of the tensor
    /// gets noise `noise_offset + j` of a mutation's stream. It is `offset`
    /// (every value its own noise) but in tensors tied to an earlier one of
    /// the same shape, which take that tensor's noise and so move alike
    /// ([`ParamLayout::from_architecture`]: a tied control vector).
    pub noise_offset: usize,
}

impl TensorSpan {
    /// The range of the flat vector this tensor occupies.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// The tensors of a flat parameter vector, in order, without gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    tensors: Vec<TensorSpan>,
    total: usize,
}

impl ParamLayout {
    /// Builds a layout from `(name, shape)` pairs laid out back to back.
    ///
    /// Fails when there are no tensors, a tensor has no elements, or the
    /// element count overflows.
    pub fn new(specs: Vec<(String, Vec<u64>)>) -> Result<Self, EvolveError> {
        if specs.is_empty() {
            return Err(EvolveError::Layout(
                "parameter layout has no tensors".into(),
            ));
        }
        let mut tensors = Vec::with_capacity(specs.len());
        let mut offset = 0usize;
        for (name, shape) in specs {
            let mut len = 1usize;
            for &d in &shape {
                len = usize::try_from(d)
                    .ok()
                    .and_then(|d| len.checked_mul(d))
                    .ok_or_else(|| {
                        EvolveError::Layout(format!(
                            "tensor {name} has an overflowing shape {shape:?}"
                        ))
                    })?;
            }
            if len == 0 || shape.is_empty() {
                return Err(EvolveError::Layout(format!(
                    "tensor {name} has no elements (shape {shape:?})"
                )));
            }
            tensors.push(TensorSpan {
                name,
                shape,
                offset,
                len,
                noise_offset: offset,
            });
            offset = offset
                .checked_add(len)
                .ok_or_else(|| EvolveError::Layout("parameter count overflows".into()))?;
        }
        Ok(Self {
            tensors,
            total: offset,
        })
    }

    /// A layout of the runtime architecture's tensors. The directions of a
    /// tied control vector ([`rt::Architecture::tied_directions`]) all take
    /// the first one's noise (`noise_offset` 0).
    pub fn from_architecture(arch: &rt::Architecture) -> Result<Self, EvolveError> {
        let mut layout = Self::new(arch.tensor_specs())?;
        if layout.total != arch.n_params() {
            return Err(EvolveError::Layout(format!(
                "architecture tensor specs hold {} values but n_params() is {}",
                layout.total,
                arch.n_params()
            )));
        }
        if arch.tied_directions() {
            for t in &mut layout.tensors {
                t.noise_offset = 0;
            }
        }
        Ok(layout)
    }

    /// The tensor whose noise tensor `k` takes, when it is tied to
    /// another (its `noise_offset` is that tensor's `offset`).
    pub fn tied_to(&self, k: usize) -> Option<usize> {
        let t = self.tensors.get(k)?;
        if t.noise_offset == t.offset {
            return None;
        }
        self.tensors.iter().position(|u| u.offset == t.noise_offset)
    }

    /// Whether some tensor takes another's noise (a tied control vector).
    pub fn has_tied_noise(&self) -> bool {
        self.tensors.iter().any(|t| t.noise_offset != t.offset)
    }

    /// The noise index of every value of `range` (a range of the flat
    /// vector), as `(noise start, sub-range of `range`)` runs, in order:
    /// one run per tensor the range crosses.
    pub(crate) fn noise_runs(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
        // The first tensor ending after range.start.
        let first = self
            .tensors
            .partition_point(|t| t.offset + t.len <= range.start);
        self.tensors[first..]
            .iter()
            .take_while(move |t| t.offset < range.end)
            .map(move |t| {
                let (a, b) = (t.offset.max(range.start), (t.offset + t.len).min(range.end));
                (t.noise_offset + (a - t.offset), a..b)
            })
    }

    /// The tensors, in flat order.
    pub fn tensors(&self) -> &[TensorSpan] {
        &self.tensors
    }

    /// Total number of parameters.
    pub fn n_params(&self) -> usize {
        self.total
    }

    /// `(name, shape)` pairs, as `Architecture::tensor_specs()` returns them.
    pub fn specs(&self) -> Vec<(String, Vec<u64>)> {
        self.tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect()
    }
}

/// How the scale of each tensor — the unit its mutation σ, ES noise and
/// validation bounds are expressed in — is derived from its shape.
///
/// The scale depends on the shape only, so every evaluator that knows the
/// architecture derives the same value, bit for bit (one IEEE division and
/// one square root, both correctly rounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TensorScale {
    /// Every tensor has scale 1: σ and bounds are absolute (evod before
    /// scale-relative evolution).
    Unit,
    /// The Glorot (Xavier) standard deviation `√(2 / (fan_in + fan_out))`
    /// — exactly the RMS of `evod_runtime::init_params`'s weights. A shape
    /// `[d0, d1, …]` has `fan_in = d0`, `fan_out = d1·d2·…`. In a layout
    /// ([`ParamLayout::scales`]) a 1-D tensor right after a tensor of two or
    /// more dimensions whose `fan_out` is its length — a bias after its
    /// weight — takes that tensor's scale; any other 1-D shape `[n]` counts
    /// as `[1, n]`.
    Glorot,
}

impl TensorScale {
    /// The scale of a tensor of `shape` on its own (a bias's scale also
    /// depends on the tensor before it: see [`ParamLayout::scales`]).
    pub fn of(self, shape: &[u64]) -> f32 {
        match self {
            Self::Unit => 1.0,
            Self::Glorot => {
                let (fan_in, fan_out) = match shape {
                    [] => (1, 1),
                    [n] => (1, *n),
                    [d0, rest @ ..] => (*d0, rest.iter().product::<u64>()),
                };
                // Exact in f32 up to 2^24; beyond, rounding is still the
                // same everywhere.
                let fans = (fan_in.saturating_add(fan_out)) as f32;
                (2.0 / fans).sqrt()
            }
        }
    }
}

impl ParamLayout {
    /// The scale of every tensor under `rule`, in layout order: a 1-D
    /// tensor right after a tensor of two or more dimensions whose trailing
    /// dimensions multiply to its length (a bias after its weight) takes
    /// that tensor's scale; every other tensor gets [`TensorScale::of`] its
    /// shape.
    pub fn scales(&self, rule: TensorScale) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(self.tensors.len());
        for (k, t) in self.tensors.iter().enumerate() {
            let prev = k.checked_sub(1).map(|p| &self.tensors[p]);
            let s = match (t.shape.as_slice(), prev) {
                ([n], Some(w))
                    if w.shape.len() >= 2 && w.shape[1..].iter().product::<u64>() == *n =>
                {
                    out[k - 1]
                }
                _ => rule.of(&t.shape),
            };
            out.push(s);
        }
        out
    }
}

/// Partial sums of [`SumSq`]: value `i` of a tensor goes to partial
/// `i % SUM_LANES`.
pub(crate) const SUM_LANES: usize = 4;

/// Sums of squares in `f64` in a fixed order, whatever the CPU or thread
/// count: value `i` of a tensor is added to partial sum `i % 4` in index
/// order, and the total is `(s0 + s1) + (s2 + s3)`. Four independent
/// partial sums let the additions overlap (one chain of 10^6 dependent
/// additions waits on each one's latency); the order is part of the
/// validation's definition, the same in every check.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SumSq([f64; SUM_LANES]);

impl SumSq {
    /// Adds `x²` for each value of `xs`, the first going to partial `0`
    /// (callers feed a tensor in chunks whose lengths are multiples of
    /// [`SUM_LANES`], but for the last).
    #[inline(always)]
    pub(crate) fn add(&mut self, xs: &[f32]) {
        let mut chunks = xs.chunks_exact(SUM_LANES);
        for c in chunks.by_ref() {
            for (s, &x) in self.0.iter_mut().zip(c) {
                let x = f64::from(x);
                *s += x * x;
            }
        }
        for (l, &x) in chunks.remainder().iter().enumerate() {
            let x = f64::from(x);
            self.0[l] += x * x;
        }
    }

    /// Adds `(a − b)²` (each side widened to `f64` first) for each pair of
    /// values, in the lanes [`SumSq::add`] uses.
    #[inline(always)]
    pub(crate) fn add_diff(&mut self, a: &[f32], b: &[f32]) {
        let mut ca = a.chunks_exact(SUM_LANES);
        let mut cb = b.chunks_exact(SUM_LANES);
        for (x, y) in ca.by_ref().zip(cb.by_ref()) {
            for ((s, &x), &y) in self.0.iter_mut().zip(x).zip(y) {
                let d = f64::from(x) - f64::from(y);
                *s += d * d;
            }
        }
        for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
            let d = f64::from(x) - f64::from(y);
            self.0[l] += d * d;
        }
    }

    /// The total, `(s0 + s1) + (s2 + s3)`.
    #[inline(always)]
    pub(crate) fn total(&self) -> f64 {
        (self.0[0] + self.0[1]) + (self.0[2] + self.0[3])
    }
}

/// L2 norm of a slice: the square root of its [`SumSq`] (deterministic).
pub(crate) fn l2(xs: &[f32]) -> f64 {
    let mut s = SumSq::default();
    s.add(xs);
    s.total().sqrt()
}

/// `(‖a‖, ‖a − b‖)` in one pass, each a [`SumSq`] (the same values as two
/// separate passes).
pub(crate) fn l2_and_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut sa, mut sd) = (SumSq::default(), SumSq::default());
    sa.add(a);
    sd.add_diff(a, b);
    (sa.total().sqrt(), sd.total().sqrt())
}
