//! `EVAL_RECIPES` on the worker side, for every worker: the built-in
//! `evod worker` and any program that links this crate ([`crate::serve`]).
//!
//! An ES candidate arrives as a 22-byte [`Recipe`] against a base file the
//! evolver wrote (`DIR/state/base/<checksum>.gguf`). Three steps, each its
//! own function so a worker with its own loop uses exactly these:
//!
//! 1. [`decode_recipes`]: the untrusted payload is checked (counts, lengths,
//!    the path, every recipe's encoding) before anything is sized from it;
//! 2. [`RecipeBases::base`]: the base is read and hashed once per base
//!    (mapped, verified against the checksum the request names, copied
//!    out, the map dropped); a missing, unreadable, other-network or
//!    other-checksum file is [`status::WRONG_BASE`], nothing is evaluated
//!    and the base held before stays held;
//! 3. [`regenerate`]: candidates are rebuilt with [`Recipe::apply_to`] into
//!    a buffer the caller reuses from request to request, candidate-major,
//!    so they can be scored as if an `EVAL` had sent them.
//!
//! Every failure is a [`RecipesError`] whose [`RecipesError::status`] is
//! the reply's status.

use std::path::{Path, PathBuf};

use evod_evolve::{Base, ParamLayout, Recipe, RecipeError};
use evod_runtime::{Architecture, Model, RuntimeError};
use evod_wire::protocol::{DecodeError, RECIPE_BYTES, RecipesHeader, status};

/// A decoded `EVAL_RECIPES` body.
#[derive(Debug, Clone, PartialEq)]
pub struct RecipesBody {
    /// The header.
    pub header: RecipesHeader,
    /// The base file the recipes are against.
    pub path: PathBuf,
    /// One recipe per candidate, in order.
    pub recipes: Vec<Recipe>,
}

/// Why an `EVAL_RECIPES` request was not evaluated.
#[derive(Debug, thiserror::Error)]
pub enum RecipesError {
    /// The payload is not an `EVAL_RECIPES` body.
    #[error("bad EVAL_RECIPES body: {0}")]
    Decode(#[from] DecodeError),
    /// A recipe's bytes do not decode.
    #[error("bad recipe {index}: {source}")]
    Recipe {
        /// The candidate's index in the request.
        index: usize,
        /// The decoder's error.
        #[source]
        source: RecipeError,
    },
    /// The request's parameter count is not the served model's.
    #[error("the base has {base} parameters, the model has {model}")]
    Params {
        /// What the request says.
        base: u64,
        /// What the model has.
        model: usize,
    },
    /// The base file cannot be used.
    #[error(transparent)]
    Base(#[from] BaseError),
    /// A recipe names another base than the one the request names.
    #[error("recipe {index}: {source}")]
    WrongBase {
        /// The candidate's index in the request.
        index: usize,
        /// [`RecipeError::WrongBase`].
        #[source]
        source: RecipeError,
    },
}

impl RecipesError {
    /// The reply status for this error: `BAD_REQUEST` for a malformed body,
    /// `EVAL_FAILED` for another model's request, `WRONG_BASE` when the base
    /// cannot be used or a recipe is for another one.
    pub fn status(&self) -> i32 {
        match self {
            Self::Decode(_) | Self::Recipe { .. } => status::BAD_REQUEST,
            Self::Params { .. } => status::EVAL_FAILED,
            Self::Base(_) | Self::WrongBase { .. } => status::WRONG_BASE,
        }
    }
}

/// Why a base file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    /// Missing, unreadable or not a valid model file.
    #[error("cannot read the base {}: {source}", path.display())]
    Read {
        /// The base file.
        path: PathBuf,
        /// The reader's error.
        #[source]
        source: RuntimeError,
    },
    /// A model of another network.
    #[error(
        "the base {} is not of the served network ({base} parameters, the model has {model})",
        path.display()
    )]
    Network {
        /// The base file.
        path: PathBuf,
        /// The base's parameter count.
        base: usize,
        /// The served model's.
        model: usize,
    },
    /// Its parameters do not hash to the checksum the request names.
    #[error(
        "the base {} has checksum {actual:016x}, the request names {want:016x}: \
         refusing to evaluate against the wrong base",
        path.display()
    )]
    Checksum {
        /// The base file.
        path: PathBuf,
        /// [`evod_evolve::checksum`] of its parameters.
        actual: u64,
        /// What the request names.
        want: u64,
    },
    /// The network's layout cannot be built.
    #[error("the layout of the base {}: {message}", path.display())]
    Layout {
        /// The base file.
        path: PathBuf,
        /// The layout's error.
        message: String,
    },
}

/// Decodes an untrusted `EVAL_RECIPES` payload for a model of `n_params`
/// parameters. The one place an `EVAL_RECIPES` body is read: the header's
/// counts and lengths are checked against the payload before the recipe
/// list is allocated, and every recipe is decoded (σ finite and
/// non-negative, known sign and scale rule).
pub fn decode_recipes(payload: &[u8], n_params: usize) -> Result<RecipesBody, RecipesError> {
    let (header, path, body) = RecipesHeader::decode(payload)?;
    if header.params as usize != n_params {
        return Err(RecipesError::Params {
            base: header.params.into(),
            model: n_params,
        });
    }
    let recipes = body
        .chunks_exact(RECIPE_BYTES)
        .enumerate()
        .map(|(index, b)| {
            Recipe::from_bytes(b).map_err(|source| RecipesError::Recipe { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecipesBody {
        header,
        path: PathBuf::from(path),
        recipes,
    })
}

/// The base a worker holds: the last one an `EVAL_RECIPES` named, read and
/// verified once (the evolver names one base per generation, so every
/// request of a generation after the first costs no I/O).
#[derive(Debug, Default)]
pub struct RecipeBases {
    held: Option<HeldBase>,
}

#[derive(Debug)]
struct HeldBase {
    path: PathBuf,
    /// The parameters hash to this (verified when they were read).
    checksum: u64,
    params: Vec<f32>,
    layout: ParamLayout,
}

impl RecipeBases {
    /// Holds no base yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The path and checksum of the base held, if any.
    pub fn held(&self) -> Option<(&Path, u64)> {
        self.held.as_ref().map(|b| (b.path.as_path(), b.checksum))
    }

    /// The base `body` names, for a model of network `arch`: the one held
    /// if it is the same file and checksum, else read from the file and
    /// verified. A request that is refused (a missing, unreadable,
    /// other-network or other-checksum file) leaves the held base as it
    /// was: everything that can refuse it is checked before the held base
    /// is let go, and the held one is dropped before the new one is copied
    /// out, so a worker never holds two.
    pub fn base(
        &mut self,
        body: &RecipesBody,
        arch: &Architecture,
    ) -> Result<Base<'_>, RecipesError> {
        self.base_with(body, arch, || {})
    }

    /// [`RecipeBases::base`], calling `beat` while a new base is verified
    /// and copied out (every few million values), so a worker reading a big
    /// base from a cold disk keeps its heartbeat fresh.
    pub fn base_with(
        &mut self,
        body: &RecipesBody,
        arch: &Architecture,
        mut beat: impl FnMut(),
    ) -> Result<Base<'_>, RecipesError> {
        let want = body.header.base;
        let current = self
            .held
            .as_ref()
            .is_some_and(|b| b.checksum == want && b.path == body.path);
        if !current {
            let checked = check_base(&body.path, arch, want, &mut beat)?;
            self.held = None;
            self.held = Some(copy_base(&body.path, checked, want, &mut beat)?);
        }
        let held = self.held.as_ref().expect("held just above");
        // Hashed once, when it was read (lengths checked then too).
        Base::with_checksum(&held.params, &held.layout, held.checksum).map_err(|e| {
            RecipesError::Base(BaseError::Layout {
                path: held.path.clone(),
                message: e.to_string(),
            })
        })
    }
}

/// A base file that passed every check, not copied out yet.
struct CheckedBase {
    model: Model,
    layout: ParamLayout,
}

/// Opens the base file at `path` (a GGUF of `arch`, written by the evolver)
/// and checks, through its mapping, that its parameters hash to `checksum`.
/// The file is mapped only until it is copied out ([`copy_base`]): a
/// worker may die of SIGBUS if somebody truncates it meanwhile, which its
/// supervisor survives.
fn check_base(
    path: &Path,
    arch: &Architecture,
    checksum: u64,
    beat: &mut dyn FnMut(),
) -> Result<CheckedBase, BaseError> {
    let read = |source| BaseError::Read {
        path: path.to_owned(),
        source,
    };
    let model = Model::open_for_serving(path).map_err(read)?;
    if model.spec.arch != *arch {
        return Err(BaseError::Network {
            path: path.to_owned(),
            base: model.spec.arch.n_params(),
            model: arch.n_params(),
        });
    }
    let layout = ParamLayout::from_architecture(arch).map_err(|e| BaseError::Layout {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    beat();
    let actual = evod_evolve::checksum_with(&model.params().map_err(read)?, &mut *beat);
    if actual != checksum {
        return Err(BaseError::Checksum {
            path: path.to_owned(),
            actual,
            want: checksum,
        });
    }
    Ok(CheckedBase { model, layout })
}

/// Copies a checked base's parameters out and drops its mapping. The copy
/// is hashed again: a file rewritten in place since [`check_base`] (never
/// an evolver's doing: it publishes by rename) is refused, not held.
fn copy_base(
    path: &Path,
    checked: CheckedBase,
    checksum: u64,
    beat: &mut dyn FnMut(),
) -> Result<HeldBase, BaseError> {
    let CheckedBase { model, layout } = checked;
    let params = {
        let mapped = model.params().map_err(|source| BaseError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut params = Vec::with_capacity(mapped.len());
        for chunk in mapped.chunks(evod_evolve::CHECKSUM_TICK) {
            params.extend_from_slice(chunk);
            beat();
        }
        params
    };
    drop(model);
    let actual = evod_evolve::checksum_with(&params, &mut *beat);
    if actual != checksum {
        return Err(BaseError::Checksum {
            path: path.to_owned(),
            actual,
            want: checksum,
        });
    }
    Ok(HeldBase {
        path: path.to_owned(),
        checksum,
        params,
        layout,
    })
}

/// Rebuilds the candidates of `recipes` against `base` into `out`,
/// candidate-major (`recipes.len()` × the base's length; `out`'s capacity
/// is kept from call to call), calling `beat` after each candidate. The two
/// halves of an antithetic pair next to each other are rebuilt in one pass
/// over their noise ([`Recipe::apply_pair_to`], the same bits). A recipe
/// for another base is refused ([`RecipesError::WrongBase`]) and is never
/// applied to this one.
pub fn regenerate(
    base: &Base<'_>,
    recipes: &[Recipe],
    out: &mut Vec<f32>,
    mut beat: impl FnMut(),
) -> Result<(), RecipesError> {
    let n = base.params().len();
    out.resize(recipes.len() * n, 0.0);
    let mut bufs = out.chunks_exact_mut(n.max(1));
    let mut index = 0;
    while index < recipes.len() {
        let recipe = &recipes[index];
        let buf = bufs.next().expect("one buffer per recipe");
        // The two halves of an antithetic pair side by side (as ES sends
        // them) share one pass over the noise.
        if recipes.get(index + 1) == Some(&recipe.mirror()) {
            let mirror = bufs.next().expect("one buffer per recipe");
            recipe
                .apply_pair_to(base, buf, mirror)
                .map_err(|source| RecipesError::WrongBase { index, source })?;
            // One beat per candidate, as for a lone one.
            beat();
            index += 2;
        } else {
            recipe
                .apply_to(base, buf)
                .map_err(|source| RecipesError::WrongBase { index, source })?;
            index += 1;
        }
        beat();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use evod_evolve::{Sign, TensorScale};
    use evod_runtime::{Activation, ModelSpec, init_params, write_model};

    fn body(h: RecipesHeader, path: &str, recipes: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; h.request_len()];
        h.encode(path.as_bytes(), recipes, &mut out);
        out
    }

    #[test]
    fn bodies_decode_or_name_the_problem_with_its_status() {
        let r = Recipe::new(0xfeed, 3, 0.5, Sign::Minus, TensorScale::Glorot);
        let h = RecipesHeader {
            candidates: 2,
            params: 10,
            seed: 4,
            episodes: 0,
            path_len: 7,
            base: 0xfeed,
            flags: 0,
        };
        let bytes = [
            r.to_bytes(),
            Recipe::center(0xfeed, TensorScale::Unit).to_bytes(),
        ]
        .concat();
        let b = decode_recipes(&body(h, "/b.gguf", &bytes), 10).unwrap();
        assert_eq!(b.path, Path::new("/b.gguf"));
        assert_eq!(b.recipes[0], r);
        assert_eq!(b.header, h);

        let e = decode_recipes(&body(h, "/b.gguf", &bytes), 11).unwrap_err();
        assert_eq!(e.status(), status::EVAL_FAILED);
        assert_eq!(
            e.to_string(),
            "the base has 10 parameters, the model has 11"
        );

        let mut bad = bytes.clone();
        bad[RECIPE_BYTES + 20] = 9;
        let e = decode_recipes(&body(h, "/b.gguf", &bad), 10).unwrap_err();
        assert_eq!(e.status(), status::BAD_REQUEST);
        assert_eq!(
            e.to_string(),
            "bad recipe 1: bad recipe encoding: unknown sign 9"
        );

        let full = body(h, "/b.gguf", &bytes);
        let e = decode_recipes(&full[..full.len() - 1], 10).unwrap_err();
        assert_eq!(e.status(), status::BAD_REQUEST);
        assert!(e.to_string().starts_with("bad EVAL_RECIPES body: "), "{e}");
    }

    /// Reading a big base beats along the way (a worker on a cold disk must
    /// not be taken for a hung one), and verifies it with the same checksum.
    #[test]
    fn reading_a_big_base_beats_along_the_way() {
        let dir = tempfile::tempdir().unwrap();
        // 4-2048-2048-2: about 4.2M parameters, more than one tick's worth.
        let arch = Architecture::new(vec![4, 2048, 2048, 2], Activation::Tanh).unwrap();
        let params = vec![0.5f32; arch.n_params()];
        let path = dir.path().join("base.gguf");
        write_model(
            &path,
            &ModelSpec::new(arch.clone(), "external".into(), 0),
            &params,
            None,
        )
        .unwrap();
        let want = evod_evolve::checksum(&params);
        let mut ticks = 0;
        assert_eq!(evod_evolve::checksum_with(&params, || ticks += 1), want);
        assert!(ticks >= 1, "{ticks} ticks hashing {} values", params.len());
        let body = RecipesBody {
            header: RecipesHeader {
                candidates: 1,
                params: arch.n_params() as u32,
                seed: 0,
                episodes: 0,
                path_len: 1,
                base: want,
                flags: 0,
            },
            path: path.clone(),
            recipes: vec![Recipe::new(want, 1, 0.1, Sign::Plus, TensorScale::Glorot)],
        };
        let mut beats = 0;
        let mut bases = RecipeBases::new();
        let base = bases.base_with(&body, &arch, || beats += 1).unwrap();
        assert_eq!(base.checksum(), want);
        assert!(beats >= 3, "{beats} beats reading {} values", params.len());
    }

    #[test]
    fn a_base_is_read_once_verified_and_regenerates_the_evolvers_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let arch = Architecture::new(vec![3, 4, 2], Activation::Tanh).unwrap();
        let params = init_params(&arch, 5);
        let path = dir.path().join("base.gguf");
        let spec = ModelSpec::new(arch.clone(), "external".into(), 0);
        write_model(&path, &spec, &params, None).unwrap();
        let layout = ParamLayout::from_architecture(&arch).unwrap();
        let truth = Base::new(&params, &layout).unwrap();
        let recipes = [
            Recipe::new(truth.checksum(), 7, 0.1, Sign::Plus, TensorScale::Glorot),
            Recipe::new(truth.checksum(), 7, 0.1, Sign::Minus, TensorScale::Glorot),
        ];
        let req = |base: u64, path: &Path| RecipesBody {
            header: RecipesHeader {
                candidates: 2,
                params: arch.n_params() as u32,
                seed: 0,
                episodes: 0,
                path_len: 1,
                base,
                flags: 0,
            },
            path: path.to_owned(),
            recipes: recipes.to_vec(),
        };

        let mut bases = RecipeBases::new();
        let mut out = Vec::new();
        let base = bases.base(&req(truth.checksum(), &path), &arch).unwrap();
        let mut beats = 0;
        regenerate(&base, &recipes, &mut out, || beats += 1).unwrap();
        assert_eq!(beats, 2);
        let want: Vec<f32> = [
            recipes[0].materialize(&truth).unwrap(),
            recipes[1].materialize(&truth).unwrap(),
        ]
        .concat();
        assert_eq!(out, want);
        assert_eq!(bases.held(), Some((path.as_path(), truth.checksum())));

        // Held: a request for the same base reads nothing (the file is gone).
        std::fs::rename(&path, dir.path().join("moved.gguf")).unwrap();
        assert!(bases.base(&req(truth.checksum(), &path), &arch).is_ok());

        // Another checksum: the file is read again, and is missing.
        let e = bases.base(&req(1, &path), &arch).unwrap_err();
        assert_eq!(e.status(), status::WRONG_BASE);
        assert!(e.to_string().contains("base.gguf"), "{e}");
        // Refused: the base held before is held still.
        assert_eq!(bases.held(), Some((path.as_path(), truth.checksum())));
        // Present, but another checksum than the request names.
        let moved = dir.path().join("moved.gguf");
        let e = bases.base(&req(1, &moved), &arch).unwrap_err();
        assert_eq!(e.status(), status::WRONG_BASE);
        assert!(e.to_string().contains("wrong base"), "{e}");
        // Another network.
        let other = Architecture::new(vec![3, 5, 2], Activation::Tanh).unwrap();
        let e = bases
            .base(&req(truth.checksum(), &moved), &other)
            .unwrap_err();
        assert!(
            matches!(e, RecipesError::Base(BaseError::Network { .. })),
            "{e}"
        );
        // After three refusals, the held base still serves its requests
        // without a read (its file is still gone from `path`).
        assert_eq!(bases.held(), Some((path.as_path(), truth.checksum())));
        let base = bases.base(&req(truth.checksum(), &path), &arch).unwrap();
        assert_eq!(base.checksum(), truth.checksum());
        regenerate(&base, &recipes, &mut out, || {}).unwrap();
        assert_eq!(out, want);

        // A recipe for another base than the one held is not applied.
        let base = bases.base(&req(truth.checksum(), &moved), &arch).unwrap();
        let stray = [Recipe::new(2, 7, 0.1, Sign::Plus, TensorScale::Glorot)];
        let e = regenerate(&base, &stray, &mut out, || {}).unwrap_err();
        assert_eq!(e.status(), status::WRONG_BASE);
        assert!(
            e.to_string().starts_with("recipe 0: recipe is for base"),
            "{e}"
        );
    }
}
