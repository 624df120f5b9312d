//! Control-vector files in llama.cpp's layout: `general.architecture =
//! "controlvector"`, `controlvector.model_hint` (the base's architecture),
//! `controlvector.layer_count` (i32), and one 1-D F32 tensor `direction.N`
//! of n_embd values per steered layer N >= 1 — what `cvector-generator`
//! writes. Reading applies the rules of llama.cpp's loader
//! (`common_control_vector_load_one`): every tensor is named `direction.N`
//! with N >= 1, F32, 1-D, all of one width; missing layers are zero.

use std::io::Write;
use std::path::Path;

use evod_gguf::{GgufFile, PublishOptions, PublishReport, TensorSpec, TensorType, Value};

use crate::LlamaError;

/// The most values a control vector read from a file may hold (1 GiB of f32).
const MAX_VALUES: usize = 1 << 28;

/// `n_embd * (n_layer - 1)`: layers 1..n_layer-1 (llama.cpp never steers layer 0).
pub(crate) fn cvec_len(n_embd: usize, n_layer: usize) -> usize {
    n_embd * n_layer.saturating_sub(1)
}

/// A control vector read from a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    /// `controlvector.model_hint`, when present (the base's architecture).
    pub model_hint: Option<String>,
    /// `controlvector.layer_count`, when present.
    pub layer_count: Option<i64>,
    /// Width of every direction.
    pub n_embd: usize,
    /// Layer-major values from layer 1: `directions[(N-1)*n_embd..N*n_embd]`
    /// is `direction.N`; as long as the highest layer in the file; missing
    /// layers are zero.
    pub directions: Vec<f32>,
}

impl ControlVector {
    /// The highest layer with a direction slot.
    pub fn max_layer(&self) -> usize {
        self.directions.len().checked_div(self.n_embd).unwrap_or(0)
    }

    /// The vector for a model of `n_embd` x `n_layer`, as
    /// [`crate::BaseModel::set_control_vector`] takes it: exactly
    /// `n_embd * (n_layer - 1)` values, zero-padded. Directions for layers
    /// the model does not have are an error (llama.cpp would silently drop
    /// them). `path` only names the file in errors.
    pub fn for_model(
        &self,
        path: &Path,
        n_embd: usize,
        n_layer: usize,
    ) -> Result<Vec<f32>, LlamaError> {
        let bad = |problem: String| LlamaError::ControlVectorFile {
            path: path.to_owned(),
            problem,
        };
        if self.n_embd != n_embd {
            return Err(bad(format!(
                "directions have {} values, the model's n_embd is {n_embd}",
                self.n_embd
            )));
        }
        if self.max_layer() > n_layer.saturating_sub(1) {
            return Err(bad(format!(
                "it steers layer {}, the model's highest steerable layer is {}",
                self.max_layer(),
                n_layer.saturating_sub(1)
            )));
        }
        let mut v = self.directions.clone();
        v.resize(cvec_len(n_embd, n_layer), 0.0);
        Ok(v)
    }
}

/// Reads a control-vector file, refusing what llama.cpp's loader refuses
/// (and NaN/infinite values, which llama.cpp would take).
pub fn read_control_vector(path: &Path) -> Result<ControlVector, LlamaError> {
    let file = GgufFile::open(path)?;
    let bad = |problem: String| LlamaError::ControlVectorFile {
        path: path.to_owned(),
        problem,
    };
    let model_hint = file
        .get("controlvector.model_hint")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let layer_count = file
        .get("controlvector.layer_count")
        .and_then(|v| v.as_i64());
    if file.tensors().is_empty() {
        return Err(bad("it has no direction tensors".into()));
    }
    let mut n_embd: Option<usize> = None;
    let mut directions: Vec<f32> = Vec::new();
    for t in file.tensors() {
        let layer = t
            .name
            .strip_prefix("direction.")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                bad(format!(
                    "tensor {:?} is not named direction.N with a layer number N",
                    t.name
                ))
            })?;
        if layer == 0 {
            return Err(bad(
                "tensor direction.0: layer 0 is never steered (directions start at 1)".into(),
            ));
        }
        if t.ttype != TensorType::F32 {
            return Err(bad(format!("tensor {} is {}, not F32", t.name, t.ttype)));
        }
        if t.dims.len() != 1 {
            return Err(bad(format!(
                "tensor {} has {} dimensions, not 1",
                t.name,
                t.dims.len()
            )));
        }
        let width = t.dims[0] as usize;
        match n_embd {
            None if width == 0 => return Err(bad(format!("tensor {} is empty", t.name))),
            None => n_embd = Some(width),
            Some(w) if w != width => {
                return Err(bad(format!(
                    "tensor {} has {width} values, the first direction has {w}",
                    t.name
                )));
            }
            Some(_) => {}
        }
        let values = file.tensor_f32(t)?;
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(bad(format!("tensor {} value {i} is {v}", t.name)));
        }
        let need = width
            .checked_mul(layer)
            .ok_or_else(|| bad(format!("tensor {}: layer number too large", t.name)))?;
        if need > directions.len() {
            // The file is mapped and validated: `need` is at most the
            // layer number times a real tensor's width, and the layer number
            // is refused below when absurd.
            if layer > 1 << 16 {
                return Err(bad(format!(
                    "tensor {}: layer number {layer} is absurd",
                    t.name
                )));
            }
            // A small file may name a high layer of a wide tensor: bound
            // what it makes us allocate (2^28 values = 1 GiB, far beyond any
            // model's n_embd × layers) instead of aborting on allocation.
            if need > MAX_VALUES {
                return Err(bad(format!(
                    "tensor {}: direction.{layer} of width {width} needs {need} values, more than {MAX_VALUES}",
                    t.name
                )));
            }
            directions.resize(need, 0.0);
        }
        let dst = &mut directions[(layer - 1) * width..layer * width];
        for (d, s) in dst.iter_mut().zip(values.iter()) {
            *d += *s;
        }
    }
    Ok(ControlVector {
        model_hint,
        layer_count,
        n_embd: n_embd.unwrap_or(0),
        directions,
    })
}

/// Writes `cvec` (layer-major from layer 1, `n_embd` per layer) atomically
/// at `path` in llama.cpp's control-vector layout: `general.architecture =
/// "controlvector"`, `controlvector.model_hint = model_hint`,
/// `controlvector.layer_count` (i32, number of directions), then `extra`
/// metadata keys, and F32 tensors `direction.1 ..`.
pub fn write_control_vector(
    path: &Path,
    model_hint: &str,
    n_embd: usize,
    cvec: &[f32],
    extra: &[(String, Value)],
) -> Result<PublishReport, LlamaError> {
    let bad = |problem: String| LlamaError::ControlVectorFile {
        path: path.to_owned(),
        problem,
    };
    if n_embd == 0 || cvec.is_empty() || !cvec.len().is_multiple_of(n_embd) {
        return Err(bad(format!(
            "{} values are not a whole number of {n_embd}-wide directions",
            cvec.len()
        )));
    }
    if let Some((i, v)) = cvec.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(bad(format!("value {i} is {v}")));
    }
    let layers = cvec.len() / n_embd;
    let layer_count = i32::try_from(layers).map_err(|_| bad(format!("{layers} layers")))?;
    let mut metadata = vec![
        (
            "general.architecture".to_owned(),
            Value::String("controlvector".into()),
        ),
        (
            "controlvector.model_hint".to_owned(),
            Value::String(model_hint.to_owned()),
        ),
        (
            "controlvector.layer_count".to_owned(),
            Value::I32(layer_count),
        ),
    ];
    metadata.extend(extra.iter().cloned());
    let specs: Vec<TensorSpec> = (1..=layers)
        .map(|l| TensorSpec {
            name: format!("direction.{l}"),
            dims: vec![n_embd as u64],
            ttype: TensorType::F32,
        })
        .collect();
    let report = evod_gguf::publish(
        path,
        &metadata,
        &specs,
        |i, sink: &mut dyn Write| {
            let mut buf = Vec::with_capacity(n_embd * 4);
            for v in &cvec[i * n_embd..(i + 1) * n_embd] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            sink.write_all(&buf)
        },
        &PublishOptions::default(),
    )?;
    Ok(report)
}
