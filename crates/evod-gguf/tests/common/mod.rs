//! Helpers shared by the evod-gguf integration tests: a byte builder for
//! hand-made files, the Python interpreter lookup, JSON views of values in
//! gguf-py's naming.
#![allow(dead_code)]

use std::path::PathBuf;

use evod_gguf::{Value, ValueType};

/// Little-endian byte builder for hand-made GGUF files.
#[derive(Default, Clone)]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    pub fn new() -> Bytes {
        Bytes::default()
    }
    pub fn raw(mut self, b: &[u8]) -> Bytes {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u8(self, v: u8) -> Bytes {
        self.raw(&[v])
    }
    pub fn u32(self, v: u32) -> Bytes {
        self.raw(&v.to_le_bytes())
    }
    pub fn u64(self, v: u64) -> Bytes {
        self.raw(&v.to_le_bytes())
    }
    pub fn str(self, s: &str) -> Bytes {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// Magic, version 3, counts.
    pub fn header(n_tensors: u64, n_kv: u64) -> Bytes {
        Bytes::new().raw(b"GGUF").u32(3).u64(n_tensors).u64(n_kv)
    }
    pub fn kv_u32(self, key: &str, v: u32) -> Bytes {
        self.str(key).u32(4).u32(v)
    }
    pub fn kv_str(self, key: &str, v: &str) -> Bytes {
        self.str(key).u32(8).str(v)
    }
    /// A tensor info: name, dims, type id, offset.
    pub fn tensor(self, name: &str, dims: &[u64], ttype: u32, offset: u64) -> Bytes {
        let mut b = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            b = b.u64(d);
        }
        b.u32(ttype).u64(offset)
    }
    /// Zero padding to a multiple of `align`.
    pub fn pad(mut self, align: usize) -> Bytes {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    pub fn zeros(mut self, n: usize) -> Bytes {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// Everything a header says except its name, for comparing two parses of
/// the same bytes (map and `pread`).
pub fn header_view(h: &evod_gguf::GgufHeader) -> String {
    format!(
        "v{} align {} data@{} len {} meta {:?} tensors {:?}",
        h.version(),
        h.alignment(),
        h.data_offset(),
        h.file_len(),
        h.metadata(),
        h.tensors()
    )
}

/// The Python with gguf-py: `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EVOD_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no python with gguf-py: set EVOD_PYTHON or run `cargo xtask venv` (looked for {})",
        venv.display()
    );
    venv
}

/// gguf-py's lower-case name of a value type.
pub fn py_type(t: ValueType) -> &'static str {
    match t {
        ValueType::U8 => "uint8",
        ValueType::I8 => "int8",
        ValueType::U16 => "uint16",
        ValueType::I16 => "int16",
        ValueType::U32 => "uint32",
        ValueType::I32 => "int32",
        ValueType::F32 => "float32",
        ValueType::Bool => "bool",
        ValueType::String => "string",
        ValueType::Array => "array",
        ValueType::U64 => "uint64",
        ValueType::I64 => "int64",
        ValueType::F64 => "float64",
    }
}

/// A value in the JSON form the Python scripts use.
pub fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        // f32 widened exactly, as numpy's float32 -> Python float does.
        Value::F32(x) => json!(f64::from(*x)),
        Value::F64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => json!({
            "elem_type": py_type(a.elem_type),
            "values": a.values.iter().map(value_json).collect::<Vec<_>>(),
        }),
    }
}

/// Metadata as `[[key, type, value], ...]`.
pub fn metadata_json(meta: &[(String, Value)]) -> serde_json::Value {
    serde_json::Value::Array(
        meta.iter()
            .map(|(k, v)| serde_json::json!([k, py_type(v.value_type()), value_json(v)]))
            .collect(),
    )
}
