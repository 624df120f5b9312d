//! The per-tensor arithmetic of `evod.gguf.mutate` and `evod.gguf.crossover`
//! (the Python side picks the tensors, by name and `only=` glob).
//!
//! Every random draw is a pure function of `(seed, tensor name, index)`:
//! the tensor's stream is `xxh3_64_with_seed(name, seed)`, so a tensor's
//! result does not depend on which other tensors are in the dict or on
//! their order, and the same call gives the same bytes on any machine.
//!
//! - mutation: `out[j] = x[j] + sigma · noise(stream, j)` with
//!   `evod_evolve::noise` (evod's own generator, the one its evolution
//!   uses), one rounded multiply and one rounded add, never fused;
//! - uniform crossover: element `j` comes from `b` when bit `j % 64` of
//!   `splitmix64(stream + (j / 64 + 1) · φ)` is set, else from `a`;
//! - arithmetic crossover: `out[j] = α · a[j] + (1 − α) · b[j]` with one
//!   `α = (splitmix64(stream) >> 40) · 2⁻²⁴` per tensor, in `[0, 1)`, as
//!   the GA's arithmetic crossover blends whole individuals.

use numpy::ndarray::ArrayD;
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::{InputError, ShapeError};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The random stream of tensor `name` under `seed`.
fn stream(seed: u64, name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), seed)
}

/// `x + sigma · noise`, a new float32 array of `x`'s shape (see the module
/// documentation).
#[pyfunction]
pub fn add_noise<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
    sigma: f32,
    seed: u64,
    name: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if !sigma.is_finite() {
        return Err(InputError::new_err(format!("sigma is {sigma}, not finite")));
    }
    let shape = x.as_array().raw_dim();
    // Element j is the j-th in C order, contiguous or not.
    let copy: Vec<f32>;
    let base: &[f32] = match x.as_slice() {
        Ok(slice) => slice,
        Err(_) => {
            copy = x.as_array().iter().copied().collect();
            &copy
        }
    };
    let s = stream(seed, name);
    let out = py.detach(|| {
        let mut out = vec![0.0f32; base.len()];
        evod_evolve::noise::add_scaled(s, 0, sigma, base, &mut out);
        out
    });
    let array = ArrayD::from_shape_vec(shape, out)
        .map_err(|e| ShapeError::new_err(format!("tensor {name}: {e}")))?;
    Ok(array.into_pyarray(py))
}

/// Crossover of one tensor (`kind` is `uniform` or `arithmetic`); `a` and
/// `b` must have the same shape.
#[pyfunction]
pub fn cross<'py>(
    py: Python<'py>,
    a: PyReadonlyArrayDyn<'py, f32>,
    b: PyReadonlyArrayDyn<'py, f32>,
    seed: u64,
    name: &str,
    kind: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    if a.shape() != b.shape() {
        return Err(ShapeError::new_err(format!(
            "tensor {name}: shapes differ, {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let arithmetic = match kind {
        "uniform" => false,
        "arithmetic" => true,
        other => {
            return Err(InputError::new_err(format!(
                "crossover kind {other:?}: expected \"uniform\" or \"arithmetic\""
            )));
        }
    };
    let s = stream(seed, name);
    let shape = a.as_array().raw_dim();
    let (va, vb): (Vec<f32>, Vec<f32>) = (
        a.as_array().iter().copied().collect(),
        b.as_array().iter().copied().collect(),
    );
    let out: Vec<f32> = py.detach(|| {
        if arithmetic {
            let alpha = (splitmix64(s) >> 40) as f32 * (1.0 / 16_777_216.0);
            va.iter()
                .zip(&vb)
                .map(|(&x, &y)| alpha * x + (1.0 - alpha) * y)
                .collect()
        } else {
            va.iter()
                .zip(&vb)
                .enumerate()
                .map(|(j, (&x, &y))| {
                    let word =
                        splitmix64(s.wrapping_add(((j / 64) as u64 + 1).wrapping_mul(GOLDEN)));
                    if word >> (j % 64) & 1 == 1 { y } else { x }
                })
                .collect()
        }
    });
    let array = ArrayD::from_shape_vec(shape, out)
        .map_err(|e| ShapeError::new_err(format!("tensor {name}: {e}")))?;
    Ok(array.into_pyarray(py))
}
