//! `evod.gguf`'s native part: [`GgufFile`] (evod's validating reader over a
//! read-only map) and [`publish`] (evod's atomic writer).
//!
//! Shapes: a numpy array's shape is the GGUF dims reversed (ggml's `dims[0]`
//! varies fastest, numpy's last axis does), as the `gguf` package does.
//! Tensors come out as float32: a view of the map for an aligned F32 tensor
//! (read-only, kept alive by the array's base, the file object), a copy for
//! every type `evod_gguf::to_f32` decodes (F16, BF16, Q8_0, Q4_0 today; a
//! codec added there appears here with no change). Any other type is a
//! `GgufError` naming the tensor; its bytes are still there with `raw`.
//!
//! Metadata types travel as strings (`u8` … `f64`, `bool`, `string`,
//! `array[T]`, as `evod inspect` and gguf-py name them): [`GgufFile::types`]
//! reads them, [`publish`] takes one per key (the Python side infers those
//! the caller does not give).

use std::borrow::Cow;
use std::path::PathBuf;

use evod_gguf::{Array, PublishOptions, TensorSpec, TensorType, Value, ValueType};
use numpy::ndarray::{ArrayD, ArrayViewD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::{InputError, gguf_err};

/// A validated GGUF file, mapped read-only.
///
/// The map is sound while nobody truncates or rewrites the file in place;
/// evod's writer never does (it renames a new file over the old one, and
/// the old inode stays mapped), but another program may, and then reading
/// a tensor kills the process with SIGBUS (see `GgufFile::open` in
/// `evod-gguf`).
#[pyclass(module = "evod.gguf", frozen, name = "_GgufFile")]
pub struct GgufFile {
    file: evod_gguf::GgufFile,
}

fn value_type_name(v: &Value) -> String {
    match v {
        Value::Array(a) => match a.values.first() {
            Some(first) => format!("array[{}]", value_type_name(first)),
            None => format!("array[{}]", a.elem_type.name()),
        },
        other => other.value_type().name().to_owned(),
    }
}

fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::U8(x) => x.into_pyobject(py)?.into_any(),
        Value::I8(x) => x.into_pyobject(py)?.into_any(),
        Value::U16(x) => x.into_pyobject(py)?.into_any(),
        Value::I16(x) => x.into_pyobject(py)?.into_any(),
        Value::U32(x) => x.into_pyobject(py)?.into_any(),
        Value::I32(x) => x.into_pyobject(py)?.into_any(),
        Value::U64(x) => x.into_pyobject(py)?.into_any(),
        Value::I64(x) => x.into_pyobject(py)?.into_any(),
        Value::F32(x) => f64::from(*x).into_pyobject(py)?.into_any(),
        Value::F64(x) => x.into_pyobject(py)?.into_any(),
        Value::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        Value::String(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => {
            let items = a
                .values
                .iter()
                .map(|v| value_to_py(py, v))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any()
        }
    })
}

fn tensor_type(name: &str) -> PyResult<TensorType> {
    TensorType::ALL
        .iter()
        .copied()
        .find(|t| t.name() == name)
        .ok_or_else(|| InputError::new_err(format!("unknown tensor type {name:?}")))
}

#[pymethods]
impl GgufFile {
    /// Opens and validates `path` (following a symbolic link).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<GgufFile> {
        let file = py
            .detach(|| evod_gguf::GgufFile::open_following(&path))
            .map_err(gguf_err)?;
        Ok(GgufFile { file })
    }

    /// The path opened.
    #[getter]
    fn path(&self) -> PathBuf {
        self.file.path().to_owned()
    }

    /// The GGUF version (2 or 3).
    #[getter]
    fn version(&self) -> u32 {
        self.file.version()
    }

    /// The data alignment in bytes.
    #[getter]
    fn alignment(&self) -> u64 {
        self.file.alignment()
    }

    /// xxh3-64 of the tensor data section: the model's identity, as evod
    /// logs it.
    #[getter]
    fn checksum(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.file.checksum())
    }

    /// Metadata as a dict in file order (ints, floats, bools, strings,
    /// lists).
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.file.metadata() {
            dict.set_item(key, value_to_py(py, value)?)?;
        }
        Ok(dict)
    }

    /// Each metadata key's GGUF type (`u32`, `string`, `array[u32]`, …).
    #[getter]
    fn types<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for (key, value) in self.file.metadata() {
            dict.set_item(key, value_type_name(value))?;
        }
        Ok(dict)
    }

    /// Tensor names in file order.
    #[getter]
    fn tensor_names(&self) -> Vec<String> {
        self.file.tensors().iter().map(|t| t.name.clone()).collect()
    }

    /// `(type, dims)` of a tensor: its ggml type name and its dims in GGUF
    /// order (`dims[0]` fastest; the numpy shape is the reverse).
    fn tensor_info(&self, name: &str) -> PyResult<(String, Vec<u64>)> {
        let t = self.info(name)?;
        Ok((t.ttype.name().to_owned(), t.dims.clone()))
    }

    /// A tensor as a float32 array: a read-only view of the map for F32,
    /// a dequantized copy for the other types evod decodes.
    fn tensor<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let t = this.info(name)?;
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        let shape_err = |e: numpy::ndarray::ShapeError| {
            crate::GgufError::new_err(format!("tensor {name}: {e}"))
        };
        // Dequantizing a big tensor takes a while: without the GIL.
        match py.detach(|| this.file.tensor_f32(t)).map_err(gguf_err)? {
            Cow::Borrowed(values) => {
                let view = ArrayViewD::from_shape(IxDyn(&shape), values).map_err(shape_err)?;
                // SAFETY: `values` points into the map owned by `this`,
                // which is frozen (the map is never replaced) and becomes the
                // array's base object, so it outlives the array; the map is
                // private and read-only, and the array is made read-only
                // before it is returned.
                let array = unsafe { PyArrayDyn::borrow_from_array(&view, slf.clone().into_any()) };
                let kwargs = PyDict::new(py);
                kwargs.set_item("write", false)?;
                array.call_method("setflags", (), Some(&kwargs))?;
                Ok(array.into_any())
            }
            Cow::Owned(values) => {
                let array = ArrayD::from_shape_vec(IxDyn(&shape), values).map_err(shape_err)?;
                Ok(array.into_pyarray(py).into_any())
            }
        }
    }

    /// A tensor's stored bytes as a read-only uint8 view of the map (any
    /// type, quantized ones included).
    fn raw<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let t = this.info(name)?;
        let bytes = this.file.tensor_bytes(t);
        let view = numpy::ndarray::ArrayView1::from(bytes);
        // SAFETY: as in `tensor`: the bytes live in the map `this` owns,
        // `this` is the array's base, and the array is made read-only.
        let array = unsafe { numpy::PyArray1::borrow_from_array(&view, slf.clone().into_any()) };
        let kwargs = PyDict::new(py);
        kwargs.set_item("write", false)?;
        array.call_method("setflags", (), Some(&kwargs))?;
        Ok(array.into_any())
    }

    fn __repr__(&self) -> String {
        format!(
            "evod.gguf._GgufFile({:?}, {} keys, {} tensors)",
            self.file.path().display().to_string(),
            self.file.metadata().len(),
            self.file.tensors().len()
        )
    }
}

impl GgufFile {
    fn info(&self, name: &str) -> PyResult<&evod_gguf::TensorInfo> {
        self.file.tensor(name).ok_or_else(|| {
            InputError::new_err(format!(
                "{} has no tensor {name:?}",
                self.file.path().display()
            ))
        })
    }
}

/// A metadata type: a scalar or an array of a type.
enum Ty {
    Scalar(ValueType),
    Array(Box<Ty>),
}

fn parse_ty(s: &str) -> Option<Ty> {
    if let Some(inner) = s.strip_prefix("array[").and_then(|r| r.strip_suffix(']')) {
        return Some(Ty::Array(Box::new(parse_ty(inner)?)));
    }
    (0..=12)
        .filter_map(ValueType::from_id)
        .find(|t| t.name() == s)
        .map(Ty::Scalar)
}

fn to_value(obj: &Bound<'_, PyAny>, ty: &Ty, key: &str) -> PyResult<Value> {
    let bad = |what: &str| {
        InputError::new_err(format!(
            "metadata key {key:?}: {} is not {what}",
            obj.repr()
                .map_or_else(|_| "the value".into(), |r| r.to_string())
        ))
    };
    macro_rules! int {
        ($t:ty, $v:ident, $name:literal) => {
            Value::$v(obj.extract::<$t>().map_err(|_| bad($name))?)
        };
    }
    Ok(match ty {
        Ty::Scalar(ValueType::U8) => int!(u8, U8, "a u8"),
        Ty::Scalar(ValueType::I8) => int!(i8, I8, "an i8"),
        Ty::Scalar(ValueType::U16) => int!(u16, U16, "a u16"),
        Ty::Scalar(ValueType::I16) => int!(i16, I16, "an i16"),
        Ty::Scalar(ValueType::U32) => int!(u32, U32, "a u32"),
        Ty::Scalar(ValueType::I32) => int!(i32, I32, "an i32"),
        Ty::Scalar(ValueType::U64) => int!(u64, U64, "a u64"),
        Ty::Scalar(ValueType::I64) => int!(i64, I64, "an i64"),
        Ty::Scalar(ValueType::F32) => {
            Value::F32(obj.extract::<f64>().map_err(|_| bad("an f32"))? as f32)
        }
        Ty::Scalar(ValueType::F64) => Value::F64(obj.extract::<f64>().map_err(|_| bad("an f64"))?),
        Ty::Scalar(ValueType::Bool) => {
            Value::Bool(obj.extract::<bool>().map_err(|_| bad("a bool"))?)
        }
        Ty::Scalar(ValueType::String) => {
            Value::String(obj.extract::<String>().map_err(|_| bad("a string"))?)
        }
        Ty::Scalar(ValueType::Array) => return Err(bad("typed (write array[T])")),
        Ty::Array(inner) => {
            let elem_type = match inner.as_ref() {
                Ty::Scalar(t) => *t,
                Ty::Array(_) => ValueType::Array,
            };
            let values = obj
                .try_iter()
                .map_err(|_| bad("a sequence"))?
                .map(|item| to_value(&item?, inner, key))
                .collect::<PyResult<Vec<_>>>()?;
            Value::Array(Array { elem_type, values })
        }
    })
}

/// Publishes a GGUF v3 file atomically through evod's writer.
///
/// `metadata` is `[(key, type, value)]` in order; `tensors` is
/// `[(name, ggml type, dims in GGUF order, bytes as a 1-D uint8 array)]`.
/// Returns `(bytes written, checksum)`.
#[pyfunction]
#[pyo3(signature = (path, metadata, tensors, alignment = 32))]
pub fn publish(
    py: Python<'_>,
    path: PathBuf,
    metadata: Vec<(String, String, Bound<'_, PyAny>)>,
    tensors: Vec<(String, String, Vec<u64>, PyReadonlyArray1<'_, u8>)>,
    alignment: u64,
) -> PyResult<(u64, u64)> {
    let meta = metadata
        .iter()
        .map(|(key, ty, obj)| {
            let t = parse_ty(ty).ok_or_else(|| {
                InputError::new_err(format!("metadata key {key:?}: unknown GGUF type {ty:?}"))
            })?;
            Ok((key.clone(), to_value(obj, &t, key)?))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut specs = Vec::with_capacity(tensors.len());
    let mut data: Vec<&[u8]> = Vec::with_capacity(tensors.len());
    for (name, ttype, dims, bytes) in &tensors {
        specs.push(TensorSpec {
            name: name.clone(),
            dims: dims.clone(),
            ttype: tensor_type(ttype)?,
        });
        if !bytes.is_contiguous() {
            return Err(InputError::new_err(format!(
                "tensor {name}: bytes are not contiguous"
            )));
        }
        data.push(
            bytes
                .as_slice()
                .map_err(|e| InputError::new_err(format!("tensor {name}: {e}")))?,
        );
    }
    let opts = PublishOptions {
        alignment,
        ..PublishOptions::default()
    };
    let report = py
        .detach(|| evod_gguf::publish(&path, &meta, &specs, |i, w| w.write_all(data[i]), &opts))
        .map_err(gguf_err)?;
    Ok((report.bytes, report.checksum))
}
