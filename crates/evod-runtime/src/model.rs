//! evod model files: GGUF v3 with the conventions of `docs/model-format.md`.
//!
//! - `general.architecture = "evod-mlp"`, `general.name`;
//! - `evod.layers` (array of u32), `evod.activation`, `evod.task`,
//!   `evod.generation` (u64), `evod.seed` (u64), `evod.strategy`,
//!   `evod.created_unix` (u64), and when known `evod.parent_checksum` (u64;
//!   absent for a first generation) and `evod.fitness` (f64; absent when not
//!   evaluated);
//! - tensors `blk.N.weight` (ggml dims `[in, out]`) and `blk.N.bias`
//!   (`[out]`), written as F32; F16 and BF16 are accepted on load.
//!
//! A model of the `perplexity` task is a llama.cpp control vector instead:
//! `general.architecture = "controlvector"`, `controlvector.model_hint`
//! (the base model's architecture), `controlvector.layer_count` (i32, the
//! number of directions), F32 tensors `direction.1` … `direction.N` of
//! `n_embd` values each and nothing else (llama.cpp's loader refuses any
//! other tensor), with the same `evod.*` keys minus `evod.layers` and
//! `evod.activation` (see [`crate::arch::Family::ControlVector`]).
//!
//! [`Model::open`] checks everything against the architecture the keys
//! describe; [`write_model`] publishes atomically and keeps keys and tensors
//! it does not own from the previous file.

use std::borrow::Cow;
use std::path::Path;

use evod_gguf::{
    Array, GgufFile, GgufHeader, GgufReader, PublishOptions, PublishReport, TensorSpec, TensorType,
    Value, ValueType,
};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use crate::RuntimeError;
use crate::arch::{Activation, Architecture, CONTROL_VECTOR_NAME, Family};

/// Value of `general.architecture` for evod's networks.
pub const ARCHITECTURE_NAME: &str = "evod-mlp";

/// Metadata keys evod owns (written by [`write_model`], replaced on rewrite).
pub mod keys {
    /// `general.architecture` (string, [`super::ARCHITECTURE_NAME`]).
    pub const ARCHITECTURE: &str = "general.architecture";
    /// `general.name` (string).
    pub const NAME: &str = "general.name";
    /// Layer widths, input first (array of u32).
    pub const LAYERS: &str = "evod.layers";
    /// Hidden activation (string).
    pub const ACTIVATION: &str = "evod.activation";
    /// Task string (string).
    pub const TASK: &str = "evod.task";
    /// Generation number (u64).
    pub const GENERATION: &str = "evod.generation";
    /// Checksum of the parent generation's file (u64; absent for none).
    pub const PARENT_CHECKSUM: &str = "evod.parent_checksum";
    /// Fitness on the task (f64; absent when not evaluated).
    pub const FITNESS: &str = "evod.fitness";
    /// Seed of the run or initialisation (u64).
    pub const SEED: &str = "evod.seed";
    /// Strategy that produced the weights (string, `init` for `evod init`).
    pub const STRATEGY: &str = "evod.strategy";
    /// Unix time of writing, seconds (u64).
    pub const CREATED_UNIX: &str = "evod.created_unix";
    /// A control vector's base model architecture (string).
    pub const CVEC_MODEL_HINT: &str = "controlvector.model_hint";
    /// A control vector's direction count (i32).
    pub const CVEC_LAYER_COUNT: &str = "controlvector.layer_count";
    /// A control vector whose directions evolve as one (bool, written only
    /// when true: see [`crate::arch::Family::ControlVector`]).
    pub const CVEC_TIED: &str = "evod.controlvector.tied";

    /// Every key above, in the order written.
    pub const ALL: [&str; 14] = [
        ARCHITECTURE,
        NAME,
        LAYERS,
        ACTIVATION,
        TASK,
        GENERATION,
        PARENT_CHECKSUM,
        FITNESS,
        SEED,
        STRATEGY,
        CREATED_UNIX,
        CVEC_MODEL_HINT,
        CVEC_LAYER_COUNT,
        CVEC_TIED,
    ];
}

/// What a model file says about its network and history.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The network.
    pub arch: Architecture,
    /// Task string (`cartpole`, `xor`, `sine`, `csv:<path>:<target>[:<kind>]`).
    pub task: String,
    /// Generation number, 0 for `evod init`.
    pub generation: u64,
    /// Checksum ([`GgufFile::checksum`]) of the parent generation's file.
    pub parent_checksum: Option<u64>,
    /// Fitness on the task, when evaluated.
    pub fitness: Option<f64>,
    /// Seed of the initialisation or run.
    pub seed: u64,
    /// Strategy that produced the weights (`init`, `ga`, `openai-es`, …).
    pub strategy: String,
    /// `general.name`.
    pub name: String,
    /// Unix time the file was written (seconds).
    pub created_unix: u64,
}

impl ModelSpec {
    /// A generation-0 spec from `evod init`: strategy `init`, name
    /// `evod <task> <layers>`, created now.
    pub fn new(arch: Architecture, task: String, seed: u64) -> ModelSpec {
        let name = format!("evod {task} {}", arch.layers_string());
        ModelSpec {
            arch,
            task,
            generation: 0,
            parent_checksum: None,
            fitness: None,
            seed,
            strategy: "init".into(),
            name,
            created_unix: now_unix(),
        }
    }

    /// The spec's metadata keys, in [`keys::ALL`] order.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        if let Family::ControlVector {
            directions,
            model_hint,
            tied,
            ..
        } = &self.arch.family
        {
            let mut m = vec![
                (
                    keys::ARCHITECTURE.into(),
                    Value::String(CONTROL_VECTOR_NAME.into()),
                ),
                (keys::NAME.into(), Value::String(self.name.clone())),
                (
                    keys::CVEC_MODEL_HINT.into(),
                    Value::String(model_hint.clone()),
                ),
                (
                    keys::CVEC_LAYER_COUNT.into(),
                    Value::I32(i32::try_from(*directions).unwrap_or(i32::MAX)),
                ),
                (keys::TASK.into(), Value::String(self.task.clone())),
                (keys::GENERATION.into(), Value::U64(self.generation)),
            ];
            self.push_history(&mut m);
            if *tied {
                m.push((keys::CVEC_TIED.into(), Value::Bool(true)));
            }
            return m;
        }
        let mut m = vec![
            (
                keys::ARCHITECTURE.into(),
                Value::String(ARCHITECTURE_NAME.into()),
            ),
            (keys::NAME.into(), Value::String(self.name.clone())),
            (
                keys::LAYERS.into(),
                Value::Array(Array {
                    elem_type: ValueType::U32,
                    values: self
                        .arch
                        .layers
                        .iter()
                        .map(|&w| Value::U32(w as u32))
                        .collect(),
                }),
            ),
            (
                keys::ACTIVATION.into(),
                Value::String(self.arch.activation.name().into()),
            ),
            (keys::TASK.into(), Value::String(self.task.clone())),
            (keys::GENERATION.into(), Value::U64(self.generation)),
        ];
        self.push_history(&mut m);
        m
    }

    /// The keys after `evod.generation`, in [`keys::ALL`] order.
    fn push_history(&self, m: &mut Vec<(String, Value)>) {
        if let Some(c) = self.parent_checksum {
            m.push((keys::PARENT_CHECKSUM.into(), Value::U64(c)));
        }
        if let Some(f) = self.fitness {
            m.push((keys::FITNESS.into(), Value::F64(f)));
        }
        m.push((keys::SEED.into(), Value::U64(self.seed)));
        m.push((keys::STRATEGY.into(), Value::String(self.strategy.clone())));
        m.push((keys::CREATED_UNIX.into(), Value::U64(self.created_unix)));
    }

    /// Reads the spec from a file's metadata.
    pub fn from_file(file: &GgufFile) -> Result<ModelSpec, RuntimeError> {
        Self::from_header(file, file.path())
    }

    /// Reads the spec from the metadata of a header read from `path`
    /// (mapped or read with `evod_gguf::GgufReader`).
    pub fn from_header(file: &GgufHeader, path: &Path) -> Result<ModelSpec, RuntimeError> {
        let bad = |problem: String| RuntimeError::Model {
            path: path.to_owned(),
            problem,
        };
        let get = |key: &str| {
            file.get(key)
                .ok_or_else(|| bad(format!("missing key {key}")))
        };
        let string = |key: &str| -> Result<String, RuntimeError> {
            get(key)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(format!("key {key} is not a string")))
        };
        let uint = |key: &str| -> Result<u64, RuntimeError> {
            get(key)?
                .as_u64()
                .ok_or_else(|| bad(format!("key {key} is not a non-negative integer")))
        };
        let optional = |key: &str| file.get(key).is_some();

        let family = string(keys::ARCHITECTURE)?;
        let arch = if family == CONTROL_VECTOR_NAME {
            control_vector_arch(file, path)?
        } else if family == ARCHITECTURE_NAME {
            mlp_arch(file, path)?
        } else {
            return Err(bad(format!(
                "general.architecture is {family:?}, expected {ARCHITECTURE_NAME:?} or {CONTROL_VECTOR_NAME:?}"
            )));
        };
        let fitness = if optional(keys::FITNESS) {
            Some(
                get(keys::FITNESS)?
                    .as_f64()
                    .ok_or_else(|| bad(format!("key {} is not a number", keys::FITNESS)))?,
            )
        } else {
            None
        };
        Ok(ModelSpec {
            arch,
            task: string(keys::TASK)?,
            generation: uint(keys::GENERATION)?,
            parent_checksum: if optional(keys::PARENT_CHECKSUM) {
                Some(uint(keys::PARENT_CHECKSUM)?)
            } else {
                None
            },
            fitness,
            seed: uint(keys::SEED)?,
            strategy: string(keys::STRATEGY)?,
            name: if optional(keys::NAME) {
                string(keys::NAME)?
            } else {
                String::new()
            },
            created_unix: if optional(keys::CREATED_UNIX) {
                uint(keys::CREATED_UNIX)?
            } else {
                0
            },
        })
    }
}

/// The MLP an `evod-mlp` file's keys describe.
fn mlp_arch(file: &GgufHeader, path: &Path) -> Result<Architecture, RuntimeError> {
    let bad = |problem: String| RuntimeError::Model {
        path: path.to_owned(),
        problem,
    };
    let get = |key: &str| {
        file.get(key)
            .ok_or_else(|| bad(format!("missing key {key}")))
    };
    let string = |key: &str| -> Result<String, RuntimeError> {
        get(key)?
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("key {key} is not a string")))
    };
    let Some(layers) = get(keys::LAYERS)?.as_array() else {
        return Err(bad(format!("key {} is not an array", keys::LAYERS)));
    };
    let layers = layers
        .values
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|w| usize::try_from(w).ok())
                .ok_or_else(|| bad(format!("{} holds {v:?}, not a layer width", keys::LAYERS)))
        })
        .collect::<Result<Vec<usize>, _>>()?;
    let activation: Activation = string(keys::ACTIVATION)?
        .parse()
        .map_err(|e: RuntimeError| bad(e.to_string()))?;
    let arch = Architecture {
        layers,
        activation,
        family: crate::arch::Family::Mlp,
    };
    arch.validate().map_err(|e| bad(e.to_string()))?;
    Ok(arch)
}

/// The control vector a `controlvector` file describes: the direction
/// count from `controlvector.layer_count`, the width from `direction.1`,
/// the base model from `controlvector.model_hint`.
fn control_vector_arch(file: &GgufHeader, path: &Path) -> Result<Architecture, RuntimeError> {
    let bad = |problem: String| RuntimeError::Model {
        path: path.to_owned(),
        problem,
    };
    let hint = file
        .get(keys::CVEC_MODEL_HINT)
        .ok_or_else(|| bad(format!("missing key {}", keys::CVEC_MODEL_HINT)))?
        .as_str()
        .ok_or_else(|| bad(format!("key {} is not a string", keys::CVEC_MODEL_HINT)))?
        .to_owned();
    let directions = file
        .get(keys::CVEC_LAYER_COUNT)
        .ok_or_else(|| bad(format!("missing key {}", keys::CVEC_LAYER_COUNT)))?
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            bad(format!(
                "key {} is not a non-negative integer",
                keys::CVEC_LAYER_COUNT
            ))
        })?;
    let first = file
        .tensor("direction.1")
        .ok_or_else(|| bad("missing tensor direction.1".into()))?;
    let n_embd = match first.dims.as_slice() {
        [w] => usize::try_from(*w).map_err(|_| bad(format!("direction.1 width {w}")))?,
        dims => {
            return Err(bad(format!(
                "tensor direction.1 has dims {dims:?}, a control vector direction is 1-D"
            )));
        }
    };
    let tied = match file.get(keys::CVEC_TIED) {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad(format!("key {} is not a bool", keys::CVEC_TIED)))?,
    };
    Architecture::control_vector(n_embd, directions, &hint)
        .map(|a| a.with_tied_directions(tied))
        .map_err(|e| bad(e.to_string()))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// True for the tensor names evod owns: `blk.<integer>.weight|bias`.
pub fn is_block_tensor(name: &str) -> bool {
    name.strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(n, kind)| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && matches!(kind, "weight" | "bias")
        })
}

/// Reads a model's spec and flat parameters (evod's order, converted to
/// f32) with `pread`, never mapping the file: for trusted processes (the
/// supervisor, the model store) that must not die of SIGBUS when someone
/// truncates the file in place (a file that shrinks meanwhile is a
/// [`RuntimeError::Gguf`] `ShortRead`). Checks what the parameters depend
/// on: the evod keys, every block tensor present with the architecture's
/// element count and a convertible type. Values are not checked for
/// finiteness (see [`Model::open_for_serving`]).
pub fn read_params(path: &Path) -> Result<(ModelSpec, Vec<f32>), RuntimeError> {
    let reader = GgufReader::open(path)?;
    let spec = ModelSpec::from_header(reader.header(), path)?;
    let bad = |problem: String| RuntimeError::Model {
        path: path.to_owned(),
        problem,
    };
    let mut params = Vec::with_capacity(spec.arch.n_params());
    for (name, dims) in spec.arch.tensor_specs() {
        let info = reader
            .header()
            .tensor(&name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        let want: u64 = dims.iter().product();
        let bytes = reader.read_tensor(info)?;
        let values = evod_gguf::dequantize(info.ttype, &bytes)
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        if values.len() as u64 != want {
            return Err(bad(format!(
                "tensor {name} holds {} values, the architecture needs {want}",
                values.len()
            )));
        }
        params.extend_from_slice(&values);
    }
    Ok((spec, params))
}

/// An opened, checked model: the spec and the mapped file.
#[derive(Debug)]
pub struct Model {
    /// What the metadata says.
    pub spec: ModelSpec,
    /// The mapped file.
    pub file: GgufFile,
}

impl Model {
    /// Opens `path` and checks it: valid GGUF, evod keys present and typed,
    /// every `blk.N` tensor present with the architecture's dims and an F32,
    /// F16 or BF16 type, no extra `blk.N` tensor, every value finite.
    pub fn open(path: &Path) -> Result<Model, RuntimeError> {
        let file = GgufFile::open(path)?;
        Model::from_file(file)
    }

    /// Opens `path` for serving: every check of [`Model::open`] but the scan
    /// of every value for finiteness, so that it costs the same for a 1 GiB
    /// model as for a small one (the file is mapped, not read). A worker
    /// respawned on the live model uses this; the values of a published
    /// file were checked by the evolver before it published them, and a
    /// non-finite value can only make fitness `-inf`, never touch memory
    /// out of bounds.
    pub fn open_for_serving(path: &Path) -> Result<Model, RuntimeError> {
        let file = GgufFile::open(path)?;
        let spec = ModelSpec::from_file(&file)?;
        let model = Model { spec, file };
        model.check_structure()?;
        Ok(model)
    }

    /// Checks an already opened file (see [`Model::open`]).
    pub fn from_file(file: GgufFile) -> Result<Model, RuntimeError> {
        let spec = ModelSpec::from_file(&file)?;
        let model = Model { spec, file };
        model.check_structure()?;
        model.check_values()?;
        Ok(model)
    }

    /// Tensors present, with the architecture's dims and a loadable type;
    /// no stray block tensor.
    fn check_structure(&self) -> Result<(), RuntimeError> {
        let model = self;
        let bad = |problem: String| RuntimeError::Model {
            path: model.file.path().to_owned(),
            problem,
        };
        let specs = model.spec.arch.tensor_specs();
        for (name, dims) in &specs {
            let Some(t) = model.file.tensor(name) else {
                return Err(bad(format!("missing tensor {name}")));
            };
            if &t.dims != dims {
                return Err(bad(format!(
                    "tensor {name} has dims {:?}, layers {} need {dims:?} (ggml order: [in, out])",
                    t.dims,
                    model.spec.arch.layers_string()
                )));
            }
            if !matches!(
                t.ttype,
                TensorType::F32 | TensorType::F16 | TensorType::BF16
            ) {
                return Err(bad(format!(
                    "tensor {name} has type {}, expected F32, F16 or BF16",
                    t.ttype
                )));
            }
        }
        if !model.spec.arch.is_mlp() {
            // llama.cpp's control-vector loader refuses a file with any
            // tensor but F32 `direction.N` (N ≥ 1).
            if let Some(t) =
                model.file.tensors().iter().find(|t| {
                    t.ttype != TensorType::F32 || !specs.iter().any(|(n, _)| *n == t.name)
                })
            {
                return Err(bad(format!(
                    "tensor {} ({}): a control vector holds only the F32 tensors direction.1 to direction.{} (llama.cpp refuses any other)",
                    t.name,
                    t.ttype,
                    specs.len()
                )));
            }
        }
        if let Some(extra) = model
            .file
            .tensors()
            .iter()
            .find(|t| is_block_tensor(&t.name) && !specs.iter().any(|(n, _)| *n == t.name))
        {
            return Err(bad(format!(
                "tensor {} is not part of a network with layers {}",
                extra.name,
                model.spec.arch.layers_string()
            )));
        }
        Ok(())
    }

    /// Every parameter is finite.
    fn check_values(&self) -> Result<(), RuntimeError> {
        self.check_values_with(|| {})
    }

    /// The value check of [`Model::open`] (every parameter finite), for a
    /// model opened with [`Model::open_for_serving`]; calls `tick` every few
    /// million values, so a worker checking a 1 GiB model keeps beating.
    pub fn check_values_with(&self, mut tick: impl FnMut()) -> Result<(), RuntimeError> {
        let bad = |problem: String| RuntimeError::Model {
            path: self.file.path().to_owned(),
            problem,
        };
        const CHUNK: usize = 4 << 20;
        // Tensor by tensor, each read in place (F32) or converted on its
        // own: never the whole parameter vector gathered at once (a copy of
        // a 1 GiB model made without a tick left a worker silent for half
        // a second, past the supervisor's peer timeout).
        for (name, _) in self.spec.arch.tensor_specs() {
            let info = self
                .file
                .tensor(&name)
                .ok_or_else(|| bad(format!("missing tensor {name}")))?;
            let values = self.file.tensor_f32(info)?;
            for (k, chunk) in values.chunks(CHUNK).enumerate() {
                if let Some(j) = chunk.iter().position(|v| !v.is_finite()) {
                    return Err(bad(format!(
                        "tensor {name} element {} is {}, not finite",
                        k * CHUNK + j,
                        chunk[j]
                    )));
                }
                tick();
            }
        }
        Ok(())
    }

    /// The model's file.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The flat parameter vector (layout in [`crate::arch`]). Borrowed from
    /// the memory map when every block tensor is F32 and they lie back to
    /// back in order (true of files [`write_model`] writes whenever every
    /// tensor but the last fills whole alignment units, e.g. 4-16-2); else
    /// gathered into a new vector, converting F16/BF16.
    pub fn params(&self) -> Result<Cow<'_, [f32]>, RuntimeError> {
        let infos = self
            .spec
            .arch
            .tensor_specs()
            .into_iter()
            .map(|(name, _)| {
                self.file.tensor(&name).ok_or_else(|| RuntimeError::Model {
                    path: self.file.path().to_owned(),
                    problem: format!("missing tensor {name}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let contiguous = infos.iter().all(|t| t.ttype == TensorType::F32)
            && infos
                .windows(2)
                .all(|w| w[0].offset.checked_add(w[0].size) == Some(w[1].offset));
        if let (true, [first, .., last]) = (contiguous, infos.as_slice()) {
            {
                let a = self.file.tensor_bytes(first).as_ptr_range();
                let b = self.file.tensor_bytes(last).as_ptr_range();
                let bytes = self.file.bytes();
                let base = bytes.as_ptr() as usize;
                let (start, end) = (a.start as usize - base, b.end as usize - base);
                if let Some(view) = f32_view(&bytes[start..end]) {
                    return Ok(Cow::Borrowed(view));
                }
            }
        }
        let mut out = Vec::with_capacity(self.spec.arch.n_params());
        advise_huge_pages(&out);
        for t in infos {
            out.extend_from_slice(&self.file.tensor_f32(t)?);
        }
        Ok(Cow::Owned(out))
    }
}

/// Asks the kernel to back the (not yet touched) capacity of a big vector
/// with transparent huge pages where it can (`MADV_HUGEPAGE`; a no-op
/// below 4 MiB, or where THP is off). A gathered 1 GiB parameter copy is
/// then 512 pages instead of 262,144: filled faster, and freed in about a
/// millisecond instead of about half a second, which is what a worker's
/// `LOAD` (dropping the model it replaces) and its death (before the
/// supervisor's SIGCHLD) wait for.
fn advise_huge_pages(v: &Vec<f32>) {
    const HUGE: usize = 2 << 20;
    let bytes = v.capacity() * std::mem::size_of::<f32>();
    if bytes < 2 * HUGE {
        return;
    }
    let start = v.as_ptr() as usize;
    let (from, to) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
    if to > from {
        // SAFETY: [from, to) lies inside the vector's own allocation;
        // MADV_HUGEPAGE only changes how the kernel backs those pages (their
        // contents, none written yet, are unaffected), and its failure (no
        // THP in this kernel) is harmless, so the result is ignored.
        unsafe {
            libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE);
        }
    }
}

/// `bytes` as little-endian f32 values, when it is 4-byte aligned and a
/// whole number of values on a little-endian machine.
fn f32_view(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32 and `align_to` only returns a
    // middle part that is correctly aligned for f32 and lies within `bytes`;
    // the borrow keeps the mapping alive.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// Publishes a model atomically at `target` (temporary file, fsync, rename,
/// folder fsync): `spec`'s keys, then every other key of `keep_from` in its
/// order; `params` as F32 block tensors, then every tensor of `keep_from`
/// that is not a `blk.N.weight|bias` tensor, bytes and type unchanged.
pub fn write_model(
    target: &Path,
    spec: &ModelSpec,
    params: &[f32],
    keep_from: Option<&GgufFile>,
) -> Result<PublishReport, RuntimeError> {
    write_model_with(target, spec, params, keep_from, &PublishOptions::default())
}

/// [`write_model`] with publish options: `opts.fault` injects an I/O error
/// at one step (the daemon's fault-injection tests). The alignment is taken
/// from `opts` unless `keep_from` is given, whose alignment is kept.
pub fn write_model_with(
    target: &Path,
    spec: &ModelSpec,
    params: &[f32],
    keep_from: Option<&GgufFile>,
    opts: &PublishOptions,
) -> Result<PublishReport, RuntimeError> {
    spec.arch.validate()?;
    spec.arch.check_params(params)?;
    let mut metadata = spec.metadata();
    let mut tensors: Vec<TensorSpec> = spec
        .arch
        .tensor_specs()
        .into_iter()
        .map(|(name, dims)| TensorSpec {
            name,
            dims,
            ttype: TensorType::F32,
        })
        .collect();
    let own_tensors = tensors.len();
    let mut kept = Vec::new();
    let mut opts = opts.clone();
    if let Some(old) = keep_from {
        metadata.extend(
            old.metadata()
                .iter()
                .filter(|(k, _)| !keys::ALL.contains(&k.as_str()))
                .cloned(),
        );
        opts.alignment = old.alignment();
        // A control vector keeps no foreign tensor: llama.cpp's loader
        // would refuse the file.
        let keep_tensors = spec.arch.is_mlp();
        for t in old
            .tensors()
            .iter()
            .filter(|t| keep_tensors && !spec.arch.owns_tensor_name(&t.name))
        {
            tensors.push(TensorSpec::from(t));
            kept.push(t);
        }
    }
    let ranges = spec.arch.tensor_ranges();
    let report = evod_gguf::publish(
        target,
        &metadata,
        &tensors,
        |i, w| {
            if i < own_tensors {
                let (at, len) = ranges[i];
                let mut buf = Vec::with_capacity(len * 4);
                for v in &params[at..at + len] {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
                w.write_all(&buf)
            } else {
                // Kept tensors exist only when `keep_from` is Some.
                match (keep_from, kept.get(i - own_tensors)) {
                    (Some(file), Some(t)) => w.write_all(file.tensor_bytes(t)),
                    _ => Err(std::io::Error::other("tensor index out of range")),
                }
            }
        },
        &opts,
    )?;
    Ok(report)
}

/// Seeded initial parameters: `ChaCha8Rng::seed_from_u64(seed)`; weights of
/// each block drawn in flat-vector order from the Glorot (Xavier) uniform
/// range `±sqrt(6 / (in + out))` as `limit * (2u - 1)` with
/// `u = (next_u32() >> 8) * 2^-24`; biases 0.
pub fn init_params(arch: &Architecture, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = Vec::with_capacity(arch.n_params());
    for w in arch.layers.windows(2) {
        let (li, lo) = (w[0], w[1]);
        let limit = (6.0 / (li + lo) as f64).sqrt() as f32;
        for _ in 0..li * lo {
            let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
            params.push(limit * (2.0 * u - 1.0));
        }
        params.extend(std::iter::repeat_n(0.0, lo));
    }
    params
}
