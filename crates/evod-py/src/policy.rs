//! `evod.Policy`: evod's MLP forward pass (`evod_runtime::forward_batch`,
//! bit-identical to the worker's `NEURAL_EXEC` and to the tasks' networks)
//! for acting in an environment from Python.

use std::path::PathBuf;

use evod_runtime::{Activation, Architecture, Model, Scratch, forward_batch};
use numpy::{
    AllowTypeChange, PyArray1, PyArrayLike1, PyArrayLikeDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyMapping;

use crate::{InputError, ShapeError, runtime_err};

/// A network and its parameters, ready to run.
#[pyclass(module = "evod", frozen)]
pub struct Policy {
    arch: Architecture,
    params: Vec<f32>,
}

/// The parameters in `params`: a flat vector, or a mapping of the
/// architecture's tensors (`blk.N.weight` of shape `(out, in)`,
/// `blk.N.bias` of shape `(out,)`), flattened in the layout's order.
fn gather(arch: &Architecture, params: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    if let Ok(map) = params.cast::<PyMapping>() {
        let mut flat = Vec::with_capacity(arch.n_params());
        for (name, dims) in arch.tensor_specs() {
            let item = map.get_item(&name).map_err(|_| {
                InputError::new_err(format!(
                    "the parameters have no tensor {name:?} (layers {})",
                    arch.layers_string()
                ))
            })?;
            let array: PyReadonlyArrayDyn<'_, f32> = item.extract().map_err(|_| {
                InputError::new_err(format!("tensor {name} is not a float32 array"))
            })?;
            let want: Vec<usize> = dims.iter().rev().map(|&d| d as usize).collect();
            if array.shape() != want.as_slice() {
                return Err(ShapeError::new_err(format!(
                    "tensor {name} has shape {:?}, layers {} need {want:?}",
                    array.shape(),
                    arch.layers_string()
                )));
            }
            flat.extend(array.as_array().iter().copied());
        }
        return Ok(flat);
    }
    let flat: PyArrayLike1<'_, f32, AllowTypeChange> = params.extract().map_err(|_| {
        ShapeError::new_err("params must be a 1-D float array or a mapping of tensors")
    })?;
    Ok(flat.as_array().to_vec())
}

/// numpy's `argmax`: the first NaN if any, else the first maximum.
fn argmax(values: &[f32]) -> usize {
    if let Some(i) = values.iter().position(|v| v.is_nan()) {
        return i;
    }
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

impl Policy {
    /// Runs `rows` inputs of `inputs` (row-major) with the GIL released.
    fn run(&self, py: Python<'_>, inputs: Vec<f32>, rows: usize) -> PyResult<Vec<f32>> {
        py.detach(|| {
            let mut out = vec![0.0f32; rows * self.arch.outputs()];
            forward_batch(
                &self.arch,
                &self.params,
                &inputs,
                rows,
                &mut out,
                &mut Scratch::new(),
            )
            .map(|()| out)
        })
        .map_err(|e| ShapeError::new_err(e.to_string()))
    }
}

#[pymethods]
impl Policy {
    /// `Policy(path_or_gguf_file)` loads an evod model (checked as a worker
    /// checks it); `Policy(layers, params, activation="tanh")` builds one
    /// from layer widths and a flat parameter vector or a mapping of
    /// `blk.N.weight` / `blk.N.bias` tensors.
    #[new]
    #[pyo3(signature = (model_or_arch, params = None, *, activation = "tanh"))]
    fn new(
        py: Python<'_>,
        model_or_arch: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyAny>>,
        activation: &str,
    ) -> PyResult<Policy> {
        let path = if model_or_arch.is_instance_of::<pyo3::types::PyString>()
            || model_or_arch.hasattr("__fspath__")?
        {
            Some(model_or_arch.extract::<PathBuf>()?)
        } else {
            None
        };
        if let Some(path) = path {
            if params.is_some() {
                return Err(InputError::new_err(
                    "params are read from the model file: give a path or layers and params, not both",
                ));
            }
            let model = py.detach(|| Model::open(&path)).map_err(runtime_err)?;
            let params = model.params().map_err(runtime_err)?.into_owned();
            return Ok(Policy {
                arch: model.spec.arch.clone(),
                params,
            });
        }
        let layers: Vec<usize> = model_or_arch.extract().map_err(|_| {
            InputError::new_err("model_or_arch must be a model path, an evod.gguf.GgufFile or a list of layer widths")
        })?;
        let activation: Activation = activation.parse().map_err(runtime_err)?;
        let arch = Architecture::new(layers, activation).map_err(runtime_err)?;
        let Some(params) = params else {
            return Err(InputError::new_err(format!(
                "layers {} need params ({} values)",
                arch.layers_string(),
                arch.n_params()
            )));
        };
        let params = gather(&arch, params)?;
        arch.check_params(&params).map_err(runtime_err)?;
        Ok(Policy { arch, params })
    }

    /// Layer widths, input first.
    #[getter]
    fn layers(&self) -> Vec<usize> {
        self.arch.layers.clone()
    }

    /// The hidden layers' activation (`tanh`, `relu`, `sigmoid`, `identity`).
    #[getter]
    fn activation(&self) -> &'static str {
        self.arch.activation.name()
    }

    /// Input width.
    #[getter]
    fn n_inputs(&self) -> usize {
        self.arch.inputs()
    }

    /// Output width.
    #[getter]
    fn n_outputs(&self) -> usize {
        self.arch.outputs()
    }

    /// A copy of the flat parameter vector.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, &self.params)
    }

    /// The network's outputs: a 1-D observation gives a 1-D float32 array,
    /// a 2-D batch (one row per observation) a 2-D one.
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        obs: PyArrayLikeDyn<'py, f32, AllowTypeChange>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shape = obs.shape().to_vec();
        let data = obs.as_array().iter().copied().collect::<Vec<f32>>();
        let n_out = self.arch.outputs();
        match shape.as_slice() {
            [_] => Ok(PyArray1::from_vec(py, self.run(py, data, 1)?).into_any()),
            [rows, _] => {
                let out = self.run(py, data, *rows)?;
                Ok(PyArray1::from_vec(py, out)
                    .reshape([*rows, n_out])?
                    .into_any())
            }
            _ => Err(ShapeError::new_err(format!(
                "a policy takes a 1-D observation or a 2-D batch, got shape {shape:?}"
            ))),
        }
    }

    /// The index of the largest output for a 1-D observation (numpy's
    /// `argmax`, as evod's CartPole picks its action).
    fn act(&self, py: Python<'_>, obs: PyArrayLike1<'_, f32, AllowTypeChange>) -> PyResult<usize> {
        let out = self.run(py, obs.as_array().to_vec(), 1)?;
        Ok(argmax(&out))
    }

    fn __repr__(&self) -> String {
        format!(
            "evod.Policy(layers={:?}, activation={:?})",
            self.arch.layers,
            self.arch.activation.name()
        )
    }
}
