//! GA children as recipes: `(parent checksum, [second parent, crossover],
//! [mutation seed, σ per tensor])` instead of a parameter vector. The GA
//! makes every child by applying its recipe ([`GaRecipe::apply`]) to its
//! parents, and whoever evaluates it elsewhere (another host, holding the
//! parents fetched once by checksum) rebuilds it with the same function,
//! so the bits are the ones the evolver validated.
//!
//! `GaRecipe::apply` computes, for every flat index `i` (tensor `t`, scale
//! `s_t` from [`ParamLayout::scales`]):
//!
//! ```text
//! x[i] = a[i]                                    // the first parent
//! x[i] = b[i]           if uniform and coin(cross seed, n(i))   (noise::coin)
//! x[i] = α·a[i] + (1 − α)·b[i]   if arithmetic   (f32, two rounded products, two sums)
//! out[i] = x[i] + f32(σ_t · s_t) · noise(seed, n(i))            if mutated
//! ```
//!
//! `n(i)` is the value's noise index, `i` but in a tied tensor
//! ([`crate::TensorSpan::noise_offset`]), as for ES recipes.
//!
//! An elite copy is a recipe with neither crossover nor mutation: the
//! parent itself.

use serde::{Deserialize, Serialize};

use crate::layout::{ParamLayout, TensorScale};
use crate::noise;
use crate::recipe::RecipeError;

/// How a child mixes its two parents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Blend {
    /// Each value from the second parent where [`noise::coin`]`(seed, i)`
    /// is set, else from the first.
    Uniform {
        /// Coin stream seed.
        seed: u64,
    },
    /// `α·a + (1 − α)·b` for every value, α in `[0, 1]`.
    Arithmetic {
        /// α as its IEEE bits.
        alpha_bits: u32,
    },
}

/// The second parent of a child made by crossover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cross {
    /// Checksum of the second parent.
    pub parent: u64,
    /// How the two are mixed.
    pub blend: Blend,
}

/// The mutation of a child: noise of one seed, one σ per tensor.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mutation {
    /// Noise stream seed ([`crate::noise`]).
    pub seed: u64,
    /// How each tensor's scale is derived from its shape.
    pub scale: TensorScale,
    /// σ of each tensor of the layout, in units of its scale, as IEEE bits.
    pub sigma_bits: Vec<u32>,
}

/// How to rebuild one GA candidate from its parents. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GaRecipe {
    /// Checksum ([`crate::checksum`]) of the first parent.
    pub parent: u64,
    /// The second parent and the crossover, if any.
    pub cross: Option<Cross>,
    /// The mutation, if any (none: an elite copy, or a crossover only).
    pub mutation: Option<Mutation>,
}

/// Form bits of an encoded [`GaRecipe`].
const FORM_UNIFORM: u8 = 1;
const FORM_ARITHMETIC: u8 = 2;
const FORM_MUTATED: u8 = 4;

/// Most tensors a GA recipe may carry a σ for.
pub const MAX_GA_TENSORS: usize = u16::MAX as usize;

impl GaRecipe {
    /// An elite copy of the parent with checksum `parent`.
    pub fn copy_of(parent: u64) -> Self {
        Self {
            parent,
            cross: None,
            mutation: None,
        }
    }

    /// The checksums of the parents it names (one or two).
    pub fn parents(&self) -> impl Iterator<Item = u64> + '_ {
        std::iter::once(self.parent).chain(self.cross.map(|c| c.parent))
    }

    /// Appends the wire encoding, little-endian:
    ///
    /// ```text
    /// u8 form (bit 0 uniform, bit 1 arithmetic crossover, bit 2 mutated) | u64 parent
    /// [ u64 second parent | u64 coin seed (uniform) or u32 α bits (arithmetic) ]
    /// [ u8 scale rule (0 unit, 1 Glorot) | u64 seed | u16 tensors | tensors × u32 σ bits ]
    /// ```
    ///
    /// Fails for more than [`MAX_GA_TENSORS`] σ.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), RecipeError> {
        let mut form = 0;
        match self.cross.map(|c| c.blend) {
            Some(Blend::Uniform { .. }) => form |= FORM_UNIFORM,
            Some(Blend::Arithmetic { .. }) => form |= FORM_ARITHMETIC,
            None => {}
        }
        if let Some(m) = &self.mutation {
            if m.sigma_bits.is_empty() || m.sigma_bits.len() > MAX_GA_TENSORS {
                return Err(RecipeError::Encoding(format!(
                    "{} σ, expected 1..={MAX_GA_TENSORS}",
                    m.sigma_bits.len()
                )));
            }
            form |= FORM_MUTATED;
        }
        out.push(form);
        out.extend_from_slice(&self.parent.to_le_bytes());
        if let Some(c) = self.cross {
            out.extend_from_slice(&c.parent.to_le_bytes());
            match c.blend {
                Blend::Uniform { seed } => out.extend_from_slice(&seed.to_le_bytes()),
                Blend::Arithmetic { alpha_bits } => {
                    out.extend_from_slice(&alpha_bits.to_le_bytes())
                }
            }
        }
        if let Some(m) = &self.mutation {
            out.push(match m.scale {
                TensorScale::Unit => 0,
                TensorScale::Glorot => 1,
            });
            out.extend_from_slice(&m.seed.to_le_bytes());
            out.extend_from_slice(&(m.sigma_bits.len() as u16).to_le_bytes());
            for s in &m.sigma_bits {
                out.extend_from_slice(&s.to_le_bytes());
            }
        }
        Ok(())
    }

    /// Decodes one recipe at the start of untrusted `bytes`; returns it and
    /// the bytes it took. Refused with a typed error: too few bytes, unknown
    /// form bits or scale rule, both crossovers, α not in `[0, 1]`, a σ
    /// that is not finite and non-negative, no σ.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), RecipeError> {
        let mut at = 0usize;
        let mut take = |n: usize, what: &str| -> Result<&[u8], RecipeError> {
            let end = at
                .checked_add(n)
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| {
                    RecipeError::Encoding(format!(
                        "truncated at {what} (needs {n} bytes, {} left)",
                        bytes.len().saturating_sub(at)
                    ))
                })?;
            let s = &bytes[at..end];
            at = end;
            Ok(s)
        };
        let u64_of = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let form = take(1, "form")?[0];
        if form & !(FORM_UNIFORM | FORM_ARITHMETIC | FORM_MUTATED) != 0 {
            return Err(RecipeError::Encoding(format!(
                "unknown form bits {form:#04x}"
            )));
        }
        if form & FORM_UNIFORM != 0 && form & FORM_ARITHMETIC != 0 {
            return Err(RecipeError::Encoding(
                "both uniform and arithmetic crossover".into(),
            ));
        }
        let parent = u64_of(take(8, "parent")?);
        let cross = if form & (FORM_UNIFORM | FORM_ARITHMETIC) != 0 {
            let second = u64_of(take(8, "second parent")?);
            let blend = if form & FORM_UNIFORM != 0 {
                Blend::Uniform {
                    seed: u64_of(take(8, "crossover seed")?),
                }
            } else {
                let alpha_bits = u32::from_le_bytes(take(4, "α")?.try_into().expect("4 bytes"));
                let alpha = f32::from_bits(alpha_bits);
                if !(0.0..=1.0).contains(&alpha) {
                    return Err(RecipeError::Encoding(format!(
                        "crossover α {alpha} is not in [0, 1]"
                    )));
                }
                Blend::Arithmetic { alpha_bits }
            };
            Some(Cross {
                parent: second,
                blend,
            })
        } else {
            None
        };
        let mutation = if form & FORM_MUTATED != 0 {
            let scale = match take(1, "scale rule")?[0] {
                0 => TensorScale::Unit,
                1 => TensorScale::Glorot,
                x => return Err(RecipeError::Encoding(format!("unknown scale rule {x}"))),
            };
            let seed = u64_of(take(8, "mutation seed")?);
            let n = u16::from_le_bytes(take(2, "tensor count")?.try_into().expect("2 bytes"));
            if n == 0 {
                return Err(RecipeError::Encoding("a mutation without σ".into()));
            }
            let raw = take(4 * usize::from(n), "σ")?;
            let mut sigma_bits = Vec::with_capacity(usize::from(n));
            for (t, b) in raw.chunks_exact(4).enumerate() {
                let bits = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                let sigma = f32::from_bits(bits);
                if !(sigma.is_finite() && sigma >= 0.0) {
                    return Err(RecipeError::Encoding(format!(
                        "σ {sigma} of tensor {t} is not finite and non-negative"
                    )));
                }
                sigma_bits.push(bits);
            }
            Some(Mutation {
                seed,
                scale,
                sigma_bits,
            })
        } else {
            None
        };
        Ok((
            Self {
                parent,
                cross,
                mutation,
            },
            at,
        ))
    }

    /// Writes the child of `a` (and `b`, the second parent, when the
    /// recipe has a crossover) into `out` (see the module docs). Does not
    /// check the parents' checksums: [`GaRecipe::apply_to`] does.
    pub fn apply(
        &self,
        a: &[f32],
        b: Option<&[f32]>,
        layout: &ParamLayout,
        out: &mut [f32],
    ) -> Result<(), RecipeError> {
        let n = layout.n_params();
        if a.len() != n || out.len() != n || b.is_some_and(|b| b.len() != n) {
            return Err(RecipeError::Length {
                layout: n,
                base: if a.len() != n {
                    a.len()
                } else {
                    b.map_or(a.len(), <[f32]>::len)
                },
                out: out.len(),
            });
        }
        if let Some(m) = &self.mutation
            && m.sigma_bits.len() != layout.tensors().len()
        {
            return Err(RecipeError::TensorCount {
                recipe: m.sigma_bits.len(),
                layout: layout.tensors().len(),
            });
        }
        out.copy_from_slice(a);
        match (self.cross, b) {
            (None, _) => {}
            (Some(c), None) => return Err(RecipeError::UnknownParent { hash: c.parent }),
            (Some(c), Some(b)) => match c.blend {
                Blend::Uniform { seed } => {
                    // Per tensor, at its noise index: tied tensors cross alike.
                    for t in layout.tensors() {
                        let r = t.range();
                        noise::take_where_coin(
                            seed,
                            t.noise_offset as u64,
                            &b[r.clone()],
                            &mut out[r],
                        );
                    }
                }
                Blend::Arithmetic { alpha_bits } => {
                    let alpha = f32::from_bits(alpha_bits);
                    for (x, &y) in out.iter_mut().zip(b) {
                        *x = alpha * *x + (1.0 - alpha) * y;
                    }
                }
            },
        }
        if let Some(m) = &self.mutation {
            let scales = layout.scales(m.scale);
            for ((t, &bits), scale) in layout.tensors().iter().zip(&m.sigma_bits).zip(scales) {
                let factor = f32::from_bits(bits) * scale;
                noise::add_scaled_assign(
                    m.seed,
                    t.noise_offset as u64,
                    factor,
                    &mut out[t.range()],
                );
            }
        }
        Ok(())
    }

    /// [`GaRecipe::apply`] with the parents looked up by checksum in
    /// `parents` ([`RecipeError::UnknownParent`] for one it does not hold).
    pub fn apply_to(&self, parents: &GaParents<'_>, out: &mut [f32]) -> Result<(), RecipeError> {
        let a = parents
            .get(self.parent)
            .ok_or(RecipeError::UnknownParent { hash: self.parent })?;
        let b = match self.cross {
            Some(c) => Some(
                parents
                    .get(c.parent)
                    .ok_or(RecipeError::UnknownParent { hash: c.parent })?,
            ),
            None => None,
        };
        self.apply(a, b, parents.layout(), out)
    }

    /// A new vector holding the child.
    pub fn materialize(&self, parents: &GaParents<'_>) -> Result<Vec<f32>, RecipeError> {
        let mut out = vec![0.0; parents.layout().n_params()];
        self.apply_to(parents, &mut out)?;
        Ok(out)
    }
}

/// The parents GA recipes name, by checksum, with their layout.
#[derive(Debug, Clone)]
pub struct GaParents<'a> {
    layout: &'a ParamLayout,
    members: Vec<(u64, &'a [f32])>,
}

impl<'a> GaParents<'a> {
    /// No parents yet, of `layout`.
    pub fn new(layout: &'a ParamLayout) -> Self {
        Self {
            layout,
            members: Vec::new(),
        }
    }

    /// Adds `params` under `checksum`, which the caller computed or
    /// verified ([`crate::checksum`] of them): nothing is hashed here. A
    /// checksum held already is kept as it is.
    pub fn insert(&mut self, checksum: u64, params: &'a [f32]) {
        if self.get(checksum).is_none() {
            self.members.push((checksum, params));
        }
    }

    /// The parent with this checksum.
    pub fn get(&self, checksum: u64) -> Option<&'a [f32]> {
        self.members
            .iter()
            .find(|(h, _)| *h == checksum)
            .map(|(_, p)| *p)
    }

    /// Every parent held, with its checksum, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [f32])> + '_ {
        self.members.iter().copied()
    }

    /// The layout.
    pub fn layout(&self) -> &'a ParamLayout {
        self.layout
    }
}

/// A GA generation's candidates as the evaluator gets them
/// ([`crate::Evaluator::evaluate_ga_for`]): each child both as its recipe
/// and as the vector the evolver built (and validated) with it, so an
/// evaluator in this process sends the vectors and one that ships the
/// work elsewhere sends the recipes and the parents they name.
#[derive(Debug, Clone)]
pub struct GaBatch<'a> {
    /// The parents the recipes name.
    pub parents: GaParents<'a>,
    /// One recipe per candidate.
    pub recipes: &'a [GaRecipe],
    /// `recipes[i]` applied to `parents`, for every `i`.
    pub children: Vec<&'a [f32]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum;

    fn layout() -> ParamLayout {
        ParamLayout::new(vec![
            ("blk.0.weight".into(), vec![5, 30]),
            ("blk.0.bias".into(), vec![30]),
            ("blk.1.weight".into(), vec![30, 2]),
        ])
        .unwrap()
    }

    fn recipes(a: u64, b: u64, n_tensors: usize) -> Vec<GaRecipe> {
        let m = |seed| {
            Some(Mutation {
                seed,
                scale: TensorScale::Glorot,
                sigma_bits: (0..n_tensors).map(|t| (0.3 + t as f32).to_bits()).collect(),
            })
        };
        vec![
            GaRecipe::copy_of(a),
            GaRecipe {
                parent: a,
                cross: None,
                mutation: m(7),
            },
            GaRecipe {
                parent: a,
                cross: Some(Cross {
                    parent: b,
                    blend: Blend::Uniform { seed: 11 },
                }),
                mutation: m(8),
            },
            GaRecipe {
                parent: b,
                cross: Some(Cross {
                    parent: a,
                    blend: Blend::Arithmetic {
                        alpha_bits: 0.25f32.to_bits(),
                    },
                }),
                mutation: None,
            },
        ]
    }

    /// The noise index of flat value `i`, from the layout's spans.
    fn noise_index(layout: &ParamLayout, i: usize) -> u64 {
        let t = layout
            .tensors()
            .iter()
            .find(|t| t.range().contains(&i))
            .expect("i is inside the layout");
        (t.noise_offset + (i - t.offset)) as u64
    }

    /// What a recipe makes, written out value by value from the
    /// documented operations (not through `apply`): the first parent,
    /// crossed (uniform: the second parent's value where
    /// `noise::coin(seed, i)` is set; arithmetic: `α·x + (1 − α)·y`), then
    /// `σ_t · scale_t · noise::at(seed, i)` added to each value of tensor
    /// `t`, one rounded multiplication and one rounded addition each.
    fn reference(r: &GaRecipe, a: &[f32], b: &[f32], ha: u64, layout: &ParamLayout) -> Vec<f32> {
        let pick = |h: u64| if h == ha { a } else { b };
        let x = pick(r.parent);
        let mut out: Vec<f32> = match r.cross {
            None => x.to_vec(),
            Some(c) => {
                let y = pick(c.parent);
                (0..x.len())
                    .map(|i| match c.blend {
                        Blend::Uniform { seed } => {
                            if noise::coin(seed, noise_index(layout, i)) {
                                y[i]
                            } else {
                                x[i]
                            }
                        }
                        Blend::Arithmetic { alpha_bits } => {
                            let alpha = f32::from_bits(alpha_bits);
                            alpha * x[i] + (1.0 - alpha) * y[i]
                        }
                    })
                    .collect()
            }
        };
        if let Some(m) = &r.mutation {
            let scales = layout.scales(m.scale);
            for (t, span) in layout.tensors().iter().enumerate() {
                let factor = f32::from_bits(m.sigma_bits[t]) * scales[t];
                for i in span.range() {
                    let step = factor * noise::at(m.seed, noise_index(layout, i));
                    out[i] += step;
                }
            }
        }
        out
    }

    #[test]
    fn recipes_round_trip_and_rebuild_the_same_bits() {
        // An MLP, and a tied control vector (every direction at direction
        // 1's noise indices).
        let tied = ParamLayout::from_architecture(
            &crate::rt::Architecture::control_vector(12, 3, "llama")
                .unwrap()
                .with_tied_directions(true),
        )
        .unwrap();
        for layout in [layout(), tied] {
            round_trip(&layout);
        }
    }

    fn round_trip(layout: &ParamLayout) {
        let n = layout.n_params();
        let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
        let (ha, hb) = (checksum(&a), checksum(&b));
        let mut parents = GaParents::new(layout);
        parents.insert(ha, &a);
        parents.insert(hb, &b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for r in recipes(ha, hb, layout.tensors().len()) {
            let mut bytes = Vec::new();
            r.encode_into(&mut bytes).unwrap();
            bytes.push(0xAB);
            let (back, used) = GaRecipe::decode(&bytes).unwrap();
            assert_eq!(back, r);
            assert_eq!(used, bytes.len() - 1);
            let child = back.materialize(&parents).unwrap();
            // Parent order: the recipe's first parent is `parent`.
            let first = if r.parent == ha { &a } else { &b };
            assert_eq!(bits(&child), bits(&reference(&r, &a, &b, ha, layout)));
            if r.cross.is_none() && r.mutation.is_none() {
                assert_eq!(bits(&child), bits(first));
            } else {
                assert_ne!(bits(&child), bits(first));
            }
            // Every truncation is refused, never a panic.
            for len in 0..bytes.len() - 1 {
                assert!(GaRecipe::decode(&bytes[..len]).is_err(), "prefix {len}");
            }
        }
    }

    #[test]
    fn bad_recipes_are_refused_by_name() {
        let layout = layout();
        let n = layout.n_params();
        let a = vec![0.5f32; n];
        let ha = checksum(&a);
        let mut parents = GaParents::new(&layout);
        parents.insert(ha, &a);
        let rs = recipes(ha, 99, layout.tensors().len());
        // An unknown second parent.
        let e = rs[2].materialize(&parents).unwrap_err();
        assert_eq!(e, RecipeError::UnknownParent { hash: 99 });
        assert!(e.to_string().contains("0000000000000063"), "{e}");
        // σ for another number of tensors.
        let mut wrong = rs[1].clone();
        wrong.mutation.as_mut().unwrap().sigma_bits.pop();
        assert!(matches!(
            wrong.materialize(&parents),
            Err(RecipeError::TensorCount {
                recipe: 2,
                layout: 3
            })
        ));
        let mut bytes = Vec::new();
        rs[1].encode_into(&mut bytes).unwrap();
        // σ NaN (form, parent, scale, seed, count, then the first σ).
        let at = 1 + 8 + 1 + 8 + 2;
        let mut nan = bytes.clone();
        nan[at..at + 4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        let e = GaRecipe::decode(&nan).unwrap_err();
        assert!(e.to_string().contains("σ NaN of tensor 0"), "{e}");
        let mut neg = bytes.clone();
        neg[at..at + 4].copy_from_slice(&(-1.0f32).to_bits().to_le_bytes());
        assert!(GaRecipe::decode(&neg).is_err());
        let mut form = bytes.clone();
        form[0] = 0x80;
        assert!(
            GaRecipe::decode(&form)
                .unwrap_err()
                .to_string()
                .contains("unknown form bits")
        );
        form[0] = FORM_UNIFORM | FORM_ARITHMETIC;
        assert!(GaRecipe::decode(&form).is_err());
        let mut alpha = Vec::new();
        rs[3].encode_into(&mut alpha).unwrap();
        alpha[17..21].copy_from_slice(&1.5f32.to_bits().to_le_bytes());
        assert!(
            GaRecipe::decode(&alpha)
                .unwrap_err()
                .to_string()
                .contains("α 1.5")
        );
    }
}
