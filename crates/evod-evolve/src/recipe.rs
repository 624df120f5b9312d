//! Candidates as recipes: `(base checksum, noise seed, σ, sign, scale rule)`
//! instead of a parameter vector. Whoever evaluates regenerates the
//! candidate from the recipe against the base it holds, with the same code
//! and the same generator ([`crate::noise`]), so an evaluation request is a
//! few bytes, not megabytes, and the result is bit-identical to what the
//! evolver validated.
//!
//! `Recipe::apply` computes, for every tensor `t` with scale `s_t`
//! ([`ParamLayout::scales`]) and every flat index `i` of `t`:
//!
//! ```text
//! out[i] = base[i] + f32(sign · σ · s_t) · noise(seed, n(i))
//! ```
//!
//! where `n(i)` is the value's noise index: `i` itself, but in a tensor
//! tied to another (a tied control vector, [`crate::TensorSpan::noise_offset`]),
//! which takes that tensor's noise.
//!
//! `sign · σ · s_t` is computed in `f32` in that order (two rounded
//! multiplications); then one rounded multiplication and one rounded
//! addition per value, never fused. With `σ = 0` the candidate is the base.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::layout::{ParamLayout, TensorScale};
use crate::noise;

/// Which half of an antithetic pair a recipe is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Sign {
    /// `base + σ·s·ε`.
    Plus,
    /// `base − σ·s·ε`.
    Minus,
}

impl Sign {
    /// The opposite sign (the other half of an antithetic pair).
    pub fn other(self) -> Self {
        match self {
            Self::Plus => Self::Minus,
            Self::Minus => Self::Plus,
        }
    }

    /// `1.0` or `-1.0`.
    pub fn factor(self) -> f32 {
        match self {
            Self::Plus => 1.0,
            Self::Minus => -1.0,
        }
    }
}

/// How to rebuild one candidate from a base vector. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Recipe {
    /// [`Base::checksum`] of the vector the noise is added to.
    pub base: u64,
    /// Noise stream seed ([`crate::noise`]).
    pub seed: u64,
    /// Noise σ in units of each tensor's scale, as its IEEE bits (so the
    /// recipe is `Eq` and `Hash`); `0` means the base itself.
    pub sigma_bits: u32,
    /// Which half of the antithetic pair.
    pub sign: Sign,
    /// How each tensor's scale is derived from its shape.
    pub scale: TensorScale,
}

/// Why a recipe cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecipeError {
    /// The base the evaluator holds is not the one the recipe was made for.
    #[error("recipe is for base {want:016x}, the base held has checksum {have:016x}")]
    WrongBase {
        /// Checksum the recipe names.
        want: u64,
        /// Checksum of the base held.
        have: u64,
    },
    /// Bytes that are not an encoded recipe.
    #[error("bad recipe encoding: {0}")]
    Encoding(String),
    /// A GA recipe names a parent the evaluator does not hold.
    #[error("recipe names parent {hash:016x}, which is not held")]
    UnknownParent {
        /// The parent's checksum.
        hash: u64,
    },
    /// A GA recipe's σ are for another number of tensors than the layout's.
    #[error("recipe has σ for {recipe} tensors, the network has {layout}")]
    TensorCount {
        /// σ in the recipe.
        recipe: usize,
        /// Tensors of the layout.
        layout: usize,
    },
    /// Base, layout and output lengths differ.
    #[error("lengths differ: layout {layout}, base {base}, output {out}")]
    Length {
        /// Layout's parameter count.
        layout: usize,
        /// Base length.
        base: usize,
        /// Output length.
        out: usize,
    },
}

/// Bytes of an encoded recipe ([`Recipe::to_bytes`]).
pub const RECIPE_BYTES: usize = 22;

impl Recipe {
    /// The wire encoding, little-endian: base checksum (u64), seed (u64),
    /// σ bits (u32), sign (u8: 0 plus, 1 minus), scale rule (u8: 0 unit,
    /// 1 Glorot). For the ring's EVAL payload and Redis.
    pub fn to_bytes(&self) -> [u8; RECIPE_BYTES] {
        let mut out = [0u8; RECIPE_BYTES];
        out[0..8].copy_from_slice(&self.base.to_le_bytes());
        out[8..16].copy_from_slice(&self.seed.to_le_bytes());
        out[16..20].copy_from_slice(&self.sigma_bits.to_le_bytes());
        out[20] = match self.sign {
            Sign::Plus => 0,
            Sign::Minus => 1,
        };
        out[21] = match self.scale {
            TensorScale::Unit => 0,
            TensorScale::Glorot => 1,
        };
        out
    }

    /// Decodes [`Recipe::to_bytes`]; untrusted bytes get a typed error (wrong
    /// length, unknown sign or scale, σ not finite or negative).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RecipeError> {
        let b: &[u8; RECIPE_BYTES] = bytes.try_into().map_err(|_| {
            RecipeError::Encoding(format!("{} bytes, expected {RECIPE_BYTES}", bytes.len()))
        })?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let sigma_bits = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
        let sigma = f32::from_bits(sigma_bits);
        if !(sigma.is_finite() && sigma >= 0.0) {
            return Err(RecipeError::Encoding(format!(
                "σ {sigma} is not finite and non-negative"
            )));
        }
        let sign = match b[20] {
            0 => Sign::Plus,
            1 => Sign::Minus,
            x => return Err(RecipeError::Encoding(format!("unknown sign {x}"))),
        };
        let scale = match b[21] {
            0 => TensorScale::Unit,
            1 => TensorScale::Glorot,
            x => return Err(RecipeError::Encoding(format!("unknown scale rule {x}"))),
        };
        Ok(Self {
            base: u64_at(0),
            seed: u64_at(8),
            sigma_bits,
            sign,
            scale,
        })
    }

    /// A recipe with σ given as an `f32`.
    pub fn new(base: u64, seed: u64, sigma: f32, sign: Sign, scale: TensorScale) -> Self {
        Self {
            base,
            seed,
            sigma_bits: sigma.to_bits(),
            sign,
            scale,
        }
    }

    /// The base itself (σ = 0).
    pub fn center(base: u64, scale: TensorScale) -> Self {
        Self::new(base, 0, 0.0, Sign::Plus, scale)
    }

    /// σ.
    pub fn sigma(&self) -> f32 {
        f32::from_bits(self.sigma_bits)
    }

    /// Writes the candidate into `out` (see the module docs). Does not
    /// check the base's checksum: [`Recipe::apply_to`] does.
    pub fn apply(
        &self,
        base: &[f32],
        layout: &ParamLayout,
        out: &mut [f32],
    ) -> Result<(), RecipeError> {
        if base.len() != layout.n_params() || out.len() != layout.n_params() {
            return Err(RecipeError::Length {
                layout: layout.n_params(),
                base: base.len(),
                out: out.len(),
            });
        }
        let sigma = self.sigma();
        if sigma == 0.0 {
            out.copy_from_slice(base);
            return Ok(());
        }
        for (t, s) in layout.tensors().iter().zip(self.factors(layout)) {
            let r = t.range();
            noise::add_scaled(
                self.seed,
                t.noise_offset as u64,
                s,
                &base[r.clone()],
                &mut out[r],
            );
        }
        Ok(())
    }

    /// The factor of each tensor of `layout`: `sign · σ · s_t` in `f32`,
    /// in that order (what [`Recipe::apply`] multiplies the noise by).
    pub(crate) fn factors(&self, layout: &ParamLayout) -> Vec<f32> {
        let sigma = self.sigma();
        layout
            .scales(self.scale)
            .into_iter()
            .map(|scale| self.sign.factor() * sigma * scale)
            .collect()
    }

    /// The other half of this recipe's antithetic pair (the opposite
    /// sign, all else equal).
    pub fn mirror(&self) -> Recipe {
        Recipe {
            sign: self.sign.other(),
            ..*self
        }
    }

    /// [`Recipe::apply_to`] of this recipe into `out` and of its
    /// [`Recipe::mirror`] into `mirror_out`, in one pass over the noise:
    /// the same bits as two calls, for about the cost of one.
    pub fn apply_pair_to(
        &self,
        base: &Base<'_>,
        out: &mut [f32],
        mirror_out: &mut [f32],
    ) -> Result<(), RecipeError> {
        if self.base != base.checksum() {
            return Err(RecipeError::WrongBase {
                want: self.base,
                have: base.checksum(),
            });
        }
        let (params, layout) = (base.params(), base.layout());
        let n = layout.n_params();
        if params.len() != n || out.len() != n || mirror_out.len() != n {
            return Err(RecipeError::Length {
                layout: n,
                base: params.len(),
                out: if out.len() != n {
                    out.len()
                } else {
                    mirror_out.len()
                },
            });
        }
        if self.sigma() == 0.0 {
            out.copy_from_slice(params);
            mirror_out.copy_from_slice(params);
            return Ok(());
        }
        for (t, s) in layout.tensors().iter().zip(self.factors(layout)) {
            let r = t.range();
            noise::add_scaled_pair(
                self.seed,
                t.noise_offset as u64,
                s,
                &params[r.clone()],
                &mut out[r.clone()],
                &mut mirror_out[r],
            );
        }
        Ok(())
    }

    /// [`Recipe::apply`] against `base`, after checking that it is the base
    /// this recipe was made for.
    pub fn apply_to(&self, base: &Base<'_>, out: &mut [f32]) -> Result<(), RecipeError> {
        if self.base != base.checksum() {
            return Err(RecipeError::WrongBase {
                want: self.base,
                have: base.checksum(),
            });
        }
        self.apply(base.params(), base.layout(), out)
    }

    /// A new vector holding the candidate.
    pub fn materialize(&self, base: &Base<'_>) -> Result<Vec<f32>, RecipeError> {
        let mut out = vec![0.0; base.params().len()];
        self.apply_to(base, &mut out)?;
        Ok(out)
    }
}

/// The checksum recipes name a base by: xxh3-64 of the parameters'
/// little-endian `f32` bytes.
pub fn checksum(params: &[f32]) -> u64 {
    checksum_with(params, || {})
}

/// [`checksum`], calling `tick` after every [`CHECKSUM_TICK`] values (a
/// worker beats its heartbeat from it while it verifies a big base). The
/// same value.
pub fn checksum_with(params: &[f32], mut tick: impl FnMut()) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = [0u8; 4096];
    for (k, chunk) in params.chunks(buf.len() / 4).enumerate() {
        for (b, v) in buf.chunks_exact_mut(4).zip(chunk) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        h.update(&buf[..chunk.len() * 4]);
        if (k + 1) % (CHECKSUM_TICK / 1024) == 0 {
            tick();
        }
    }
    h.digest()
}

/// Values hashed between two ticks of [`checksum_with`].
pub const CHECKSUM_TICK: usize = 4 << 20;

/// A base vector recipes are applied to: its parameters, its layout and its
/// checksum (computed once).
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    params: &'a [f32],
    layout: &'a ParamLayout,
    checksum: u64,
}

impl<'a> Base<'a> {
    /// A base of `params` laid out as `layout` (checksum computed here).
    /// Fails when the lengths differ.
    pub fn new(params: &'a [f32], layout: &'a ParamLayout) -> Result<Self, RecipeError> {
        if params.len() != layout.n_params() {
            return Err(RecipeError::Length {
                layout: layout.n_params(),
                base: params.len(),
                out: params.len(),
            });
        }
        Ok(Self {
            params,
            layout,
            checksum: checksum(params),
        })
    }

    /// A base of `params` laid out as `layout`, whose [`checksum`] the
    /// caller already knows (it verified it when it read them): nothing is
    /// hashed, so a base held across requests costs nothing per request.
    /// A wrong `checksum` makes recipes for this base be applied to other
    /// parameters. Fails when the lengths differ.
    pub fn with_checksum(
        params: &'a [f32],
        layout: &'a ParamLayout,
        checksum: u64,
    ) -> Result<Self, RecipeError> {
        if params.len() != layout.n_params() {
            return Err(RecipeError::Length {
                layout: layout.n_params(),
                base: params.len(),
                out: params.len(),
            });
        }
        Ok(Self {
            params,
            layout,
            checksum,
        })
    }

    /// The parameters.
    pub fn params(&self) -> &'a [f32] {
        self.params
    }

    /// Their layout.
    pub fn layout(&self) -> &'a ParamLayout {
        self.layout
    }

    /// [`checksum`] of the parameters.
    pub fn checksum(&self) -> u64 {
        self.checksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base whose checksum its holder verified is not hashed again: the
    /// checksum given is the one it has (a wrong one would show), and the
    /// lengths are still checked.
    #[test]
    fn a_base_with_a_known_checksum_is_not_hashed_again() {
        let arch =
            evod_runtime::Architecture::new(vec![3, 4, 2], evod_runtime::Activation::Tanh).unwrap();
        let layout = ParamLayout::from_architecture(&arch).unwrap();
        let params = vec![0.25f32; layout.n_params()];
        let hashed = Base::new(&params, &layout).unwrap();
        assert_eq!(hashed.checksum(), checksum(&params));
        let known = Base::with_checksum(&params, &layout, 0x1234).unwrap();
        assert_eq!(
            known.checksum(),
            0x1234,
            "with_checksum hashed the parameters"
        );
        let short = Base::with_checksum(&params[1..], &layout, 0x1234);
        assert!(matches!(short, Err(RecipeError::Length { .. })));
    }

    #[test]
    fn a_pair_applied_together_equals_each_applied_alone() {
        let layout = ParamLayout::new(vec![
            ("blk.0.weight".into(), vec![13, 700]),
            ("blk.0.bias".into(), vec![700]),
            ("blk.1.weight".into(), vec![700, 2]),
        ])
        .unwrap();
        let n = layout.n_params();
        let params: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 300.0)
            .collect();
        let base = Base::new(&params, &layout).unwrap();
        for (sigma, sign) in [(0.7, Sign::Plus), (0.7, Sign::Minus), (0.0, Sign::Plus)] {
            let r = Recipe::new(base.checksum(), 99, sigma, sign, TensorScale::Glorot);
            assert_eq!(r.mirror().sign, sign.other());
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            r.apply_pair_to(&base, &mut a, &mut b).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&r.materialize(&base).unwrap()));
            assert_eq!(bits(&b), bits(&r.mirror().materialize(&base).unwrap()));
        }
        let wrong = Recipe::new(1, 99, 0.7, Sign::Plus, TensorScale::Glorot);
        let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
        assert!(matches!(
            wrong.apply_pair_to(&base, &mut a, &mut b),
            Err(RecipeError::WrongBase { .. })
        ));
    }
}
