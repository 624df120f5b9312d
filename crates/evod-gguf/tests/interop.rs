//! Interop with gguf-py (the `gguf` package, 0.19), both ways: files evod
//! writes are read by gguf-py with identical metadata and tensor values, and
//! files gguf-py writes (every scalar type, arrays, F32/F16/BF16/Q8_0/Q4_0,
//! alignment 64) are read by evod with the values gguf-py wrote.

mod common;

use std::path::Path;
use std::process::Command;

use evod_gguf::{
    Array, GgufFile, PublishOptions, TensorSpec, TensorType, Value, ValueType, publish,
};
use serde_json::Value as Json;

fn py(script: &str, args: &[&Path]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let out = Command::new(common::python())
        .arg(&script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A tensor as evod reads it: name, type name, dims, values.
type Tensor = (String, String, Vec<u64>, Vec<f32>);

/// evod's view of a file in the scripts' JSON form.
fn evod_json(f: &GgufFile) -> (Json, Vec<Tensor>) {
    let tensors = f
        .tensors()
        .iter()
        .map(|t| {
            let v = f.tensor_f32(t).unwrap().into_owned();
            (t.name.clone(), t.ttype.name().to_owned(), t.dims.clone(), v)
        })
        .collect();
    (common::metadata_json(f.metadata()), tensors)
}

fn assert_tensors_match(evod: &[Tensor], py: &Json) {
    let py = py.as_array().unwrap();
    assert_eq!(evod.len(), py.len());
    for ((name, ttype, dims, values), p) in evod.iter().zip(py) {
        assert_eq!(p["name"], Json::from(name.as_str()));
        assert_eq!(p["type"], Json::from(ttype.as_str()), "{name}");
        let pdims: Vec<u64> = serde_json::from_value(p["dims"].clone()).unwrap();
        assert_eq!(&pdims, dims, "{name}");
        // Every value is an f32 (gguf-py's dequantized output is f32 too).
        let pvals: Vec<f32> = serde_json::from_value(p["values"].clone()).unwrap();
        assert_eq!(pvals.len(), values.len(), "{name}");
        for (i, (a, b)) in values.iter().zip(&pvals).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}[{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn gguf_py_reads_what_evod_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evod.gguf");
    let arr = |t, v| {
        Value::Array(Array {
            elem_type: t,
            values: v,
        })
    };
    let meta: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String("evod-mlp".into()),
        ),
        ("evod.u8".into(), Value::U8(9)),
        ("evod.i8".into(), Value::I8(-9)),
        ("evod.u16".into(), Value::U16(900)),
        ("evod.i16".into(), Value::I16(-900)),
        ("evod.u32".into(), Value::U32(90000)),
        ("evod.i32".into(), Value::I32(-90000)),
        ("evod.f32".into(), Value::F32(0.1)),
        ("evod.bool".into(), Value::Bool(true)),
        ("evod.string".into(), Value::String("tänh".into())),
        ("evod.u64".into(), Value::U64(u64::MAX)),
        ("evod.i64".into(), Value::I64(i64::MIN)),
        ("evod.f64".into(), Value::F64(0.1)),
        (
            "evod.layers".into(),
            arr(
                ValueType::U32,
                vec![Value::U32(4), Value::U32(16), Value::U32(2)],
            ),
        ),
        (
            "evod.names".into(),
            arr(
                ValueType::String,
                vec![Value::String("a".into()), Value::String("é".into())],
            ),
        ),
        (
            "evod.fit".into(),
            arr(ValueType::F64, vec![Value::F64(-1.5), Value::F64(2.0)]),
        ),
    ];
    let w0: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
    let b0: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 2.0).collect();
    let q: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).cos() * 3.0).collect();
    let datas: Vec<Vec<u8>> = vec![
        w0.iter().flat_map(|v| v.to_le_bytes()).collect(),
        b0.iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        b0.iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        evod_gguf::quantize_q8_0(&q),
    ];
    let spec = |n: &str, dims: &[u64], ttype| TensorSpec {
        name: n.into(),
        dims: dims.to_vec(),
        ttype,
    };
    let specs = vec![
        spec("blk.0.weight", &[4, 16], TensorType::F32),
        spec("blk.0.bias", &[16], TensorType::F16),
        spec("blk.1.bias", &[16], TensorType::BF16),
        spec("blk.1.weight", &[32, 2], TensorType::Q8_0),
    ];
    publish(
        &path,
        &meta,
        &specs,
        |i, w| w.write_all(&datas[i]),
        &PublishOptions::default(),
    )
    .unwrap();

    let dumped: Json = serde_json::from_slice(&py("dump_gguf.py", &[&path])).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let (meta_json, tensors) = evod_json(&f);
    assert_eq!(dumped["metadata"], meta_json);
    assert_eq!(dumped["alignment"], Json::from(32));
    assert_tensors_match(&tensors, &dumped["tensors"]);
}

#[test]
fn evod_reads_what_gguf_py_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("py.gguf");
    let sidecar = dir.path().join("py.json");
    py("write_gguf.py", &[&path, &sidecar]);
    let expected: Json = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment(), 64);
    let (meta_json, tensors) = evod_json(&f);
    assert_eq!(meta_json, expected["metadata"]);
    assert_tensors_match(&tensors, &expected["tensors"]);
    for t in f.tensors() {
        assert_eq!((f.data_offset() + t.offset) % 64, 0);
    }
    // And gguf-py agrees with evod about its own file after evod rewrites it.
    let copy = dir.path().join("copy.gguf");
    evod_gguf::rewrite(&f, &copy, |_| {}, &PublishOptions::default()).unwrap();
    let dumped: Json = serde_json::from_slice(&py("dump_gguf.py", &[&copy])).unwrap();
    assert_eq!(dumped["metadata"], expected["metadata"]);
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&copy).unwrap());
}
