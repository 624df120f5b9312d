//! evod model files against gguf-py (the `gguf` package on PyPI): files
//! gguf-py writes (F32, F16, BF16 blocks; keys and tensors evod does not
//! own) load and rewrite correctly, and gguf-py reads what evod writes.
//!
//! The interpreter is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`
//! (made by `cargo xtask venv`); without either the tests fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use evod_gguf::{GgufError, GgufFile, TensorType, Value, ValueType};
use evod_runtime::model::{is_block_tensor, keys};
use evod_runtime::{
    Activation, Architecture, Mlp, Model, ModelSpec, RuntimeError, Scratch, cartpole,
    forward_batch, init_params, write_model,
};
use serde_json::{Value as Json, json};

fn python() -> PathBuf {
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

fn model_gguf_py(args: &[&Path]) -> Vec<u8> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/model_gguf.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "model_gguf.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes a model with gguf-py; returns the block values as gguf-py stored
/// them (f32, in evod's flat order).
fn gguf_py_write(
    dir: &Path,
    file: &str,
    spec: &ModelSpec,
    params: &[f32],
    blk_type: &str,
    extras: bool,
) -> (PathBuf, Vec<f32>) {
    let mut j = json!({
        "layers": spec.arch.layers,
        "activation": spec.arch.activation.name(),
        "task": spec.task,
        "generation": spec.generation,
        "seed": spec.seed,
        "strategy": spec.strategy,
        "params_bits": params.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        "blk_type": blk_type,
        "extras": extras,
    });
    if let Some(f) = spec.fitness {
        j["fitness"] = json!(f);
    }
    let spec_path = dir.join(format!("{file}.spec.json"));
    let sidecar = dir.join(format!("{file}.stored.json"));
    let path = dir.join(file);
    std::fs::write(&spec_path, j.to_string()).unwrap();
    model_gguf_py(&[Path::new("write"), &spec_path, &path, &sidecar]);
    let stored: Json = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    let stored = stored["params_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| f32::from_bits(u32::try_from(b.as_u64().unwrap()).unwrap()))
        .collect();
    (path, stored)
}

fn gguf_py_dump(path: &Path) -> Json {
    serde_json::from_slice(&model_gguf_py(&[Path::new("dump"), path])).unwrap()
}

fn spec(layers: Vec<usize>, activation: Activation) -> ModelSpec {
    let arch = Architecture::new(layers, activation).unwrap();
    let mut s = ModelSpec::new(arch, "cartpole".into(), 42);
    s.generation = 3;
    s.strategy = "ga".into();
    s.fitness = Some(17.25);
    s
}

/// Parameters with a spread of magnitudes, many not representable in F16
/// or BF16 (so conversion visibly rounds).
fn params_for(arch: &Architecture, salt: u64) -> Vec<f32> {
    init_params(arch, salt)
        .iter()
        .enumerate()
        .map(|(i, w)| w + (i as f32) * 1.000_123e-3)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn gguf_py_type(t: ValueType) -> &'static str {
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

/// A metadata value as gguf-py's dump prints it.
fn gguf_py_value(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(f64::from(*x)),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Array(a) => json!({
            "elem_type": gguf_py_type(a.elem_type),
            "values": a.values.iter().map(gguf_py_value).collect::<Vec<_>>(),
        }),
    }
}

fn foreign_keys(f: &GgufFile) -> Vec<(String, Value)> {
    f.metadata()
        .iter()
        .filter(|(k, _)| !keys::ALL.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// (name, type, dims, bytes) of every tensor evod does not own, in order.
fn foreign_tensors(f: &GgufFile) -> Vec<(String, TensorType, Vec<u64>, Vec<u8>)> {
    f.tensors()
        .iter()
        .filter(|t| !is_block_tensor(&t.name))
        .map(|t| {
            (
                t.name.clone(),
                t.ttype,
                t.dims.clone(),
                f.tensor_bytes(t).to_vec(),
            )
        })
        .collect()
}

#[test]
fn rewrite_keeps_foreign_keys_and_tensors_and_updates_evod_keys() {
    let dir = tempfile::tempdir().unwrap();
    let old_spec = spec(vec![4, 8, 2], Activation::Tanh);
    let old_params = params_for(&old_spec.arch, 1);
    let (path, _) = gguf_py_write(dir.path(), "m.gguf", &old_spec, &old_params, "BF16", true);

    let old = GgufFile::open(&path).unwrap();
    let old_model = Model::open(&path).unwrap();
    assert_eq!(old_model.spec.fitness, Some(17.25));
    let kept_keys = foreign_keys(&old);
    let kept_tensors = foreign_tensors(&old);
    // The fixture really holds what the test is about.
    let names: Vec<&str> = kept_keys.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "general.alignment",
            "user.note",
            "user.count",
            "user.offset",
            "user.flag",
            "user.scale",
            "user.big",
            "user.ratio",
            "user.tags",
            "user.ids",
            "evod.user_comment"
        ]
    );
    let types: Vec<(&str, TensorType)> = kept_tensors
        .iter()
        .map(|(n, t, _, _)| (n.as_str(), *t))
        .collect();
    assert_eq!(
        types,
        [
            ("token_embd.weight", TensorType::F16),
            ("blk.0.scale", TensorType::F32),
            ("output.q8", TensorType::Q8_0)
        ]
    );
    assert_eq!(old.alignment(), 64);

    // Next generation, published over the same path (the daemon's case).
    let mut new_spec = old_spec.clone();
    new_spec.generation = 4;
    new_spec.parent_checksum = Some(old.checksum());
    new_spec.fitness = None;
    new_spec.strategy = "openai-es".into();
    new_spec.name = "evod cartpole 4-8-2".into();
    let new_params = params_for(&new_spec.arch, 2);
    write_model(&path, &new_spec, &new_params, Some(&old)).unwrap();

    let new = GgufFile::open(&path).unwrap();
    assert_eq!(
        foreign_keys(&new),
        kept_keys,
        "foreign keys: order, type, value"
    );
    assert_eq!(foreign_tensors(&new), kept_tensors, "foreign tensors");
    assert_eq!(new.alignment(), 64);
    // evod's keys are exactly the new spec's, first, in their order; the
    // stale evod.fitness is gone.
    let own: Vec<(String, Value)> = new
        .metadata()
        .iter()
        .filter(|(k, _)| keys::ALL.contains(&k.as_str()))
        .cloned()
        .collect();
    assert_eq!(own, new_spec.metadata());
    assert_eq!(&new.metadata()[..own.len()], own.as_slice());
    assert!(new.get(keys::FITNESS).is_none());
    let model = Model::from_file(new).unwrap();
    assert_eq!(model.spec, new_spec);
    for t in model
        .file
        .tensors()
        .iter()
        .filter(|t| is_block_tensor(&t.name))
    {
        assert_eq!(t.ttype, TensorType::F32, "{}", t.name);
    }
    assert_eq!(bits(&model.params().unwrap()), bits(&new_params));

    // gguf-py agrees about the kept tensors' values.
    let dump = gguf_py_dump(&path);
    let q8 = dump["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "output.q8")
        .unwrap();
    let ours = model
        .file
        .tensor_f32(model.file.tensor("output.q8").unwrap())
        .unwrap();
    assert_eq!(q8["bits"], json!(bits(&ours)));
    let py_keys: Vec<&str> = dump["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    let our_keys: Vec<&str> = model
        .file
        .metadata()
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(py_keys, our_keys);
    assert_eq!(dump["alignment"], 64);
}

#[test]
fn f16_and_bf16_models_load_as_converted_values() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(vec![4, 16, 2], Activation::Tanh);
    let params = params_for(&spec.arch, 5);
    for (ttype, name, convert) in [
        (
            TensorType::F16,
            "F16",
            (|x| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (TensorType::BF16, "BF16", |x| {
            half::bf16::from_f32(x).to_f32()
        }),
    ] {
        let (path, stored) = gguf_py_write(
            dir.path(),
            &format!("{name}.gguf"),
            &spec,
            &params,
            name,
            false,
        );
        let model = Model::open(&path).unwrap();
        for t in model.file.tensors() {
            assert_eq!(t.ttype, ttype, "{}", t.name);
        }
        let loaded = model.params().unwrap();
        assert_eq!(
            bits(&loaded),
            bits(&stored),
            "{name}: values gguf-py stored"
        );
        let converted: Vec<f32> = params.iter().map(|&x| convert(x)).collect();
        assert_eq!(bits(&loaded), bits(&converted), "{name}: rounding");
        assert_ne!(bits(&loaded), bits(&params), "{name}: nothing was rounded");

        // The forward pass runs on the converted values.
        let inputs: Vec<f32> = (0..40).map(|i| (i as f32 - 20.0) / 9.0).collect();
        let mut out = vec![0.0; 20];
        forward_batch(
            &spec.arch,
            &loaded,
            &inputs,
            10,
            &mut out,
            &mut Scratch::new(),
        )
        .unwrap();
        let mut want = vec![0.0; 20];
        forward_batch(
            &spec.arch,
            &converted,
            &inputs,
            10,
            &mut want,
            &mut Scratch::new(),
        )
        .unwrap();
        assert_eq!(bits(&out), bits(&want));
        assert!(out.iter().any(|&y| y != 0.0));
        let mut mlp = Mlp::new(&spec.arch, &loaded).unwrap();
        assert_eq!(bits(mlp.forward(&inputs[..4])), bits(&want[..2]));
        assert_eq!(
            cartpole::returns(&spec.arch, &loaded, 0, 5).unwrap(),
            cartpole::returns(&spec.arch, &converted, 0, 5).unwrap()
        );
    }
}

#[test]
fn gguf_py_reads_evod_models() {
    let dir = tempfile::tempdir().unwrap();
    // 4-16-2 (blocks back to back) and 3-5-1 relu (padding between blocks).
    for (layers, act) in [
        (vec![4, 16, 2], Activation::Tanh),
        (vec![3, 5, 1], Activation::Relu),
    ] {
        let mut spec = spec(layers, act);
        spec.parent_checksum = Some(u64::MAX - 5);
        spec.fitness = Some(487.25);
        let params = params_for(&spec.arch, 9);
        let path = dir
            .path()
            .join(format!("{}.gguf", spec.arch.layers_string()));
        write_model(&path, &spec, &params, None).unwrap();

        let dump = gguf_py_dump(&path);
        let want_meta: Vec<Json> = spec
            .metadata()
            .iter()
            .map(|(k, v)| json!([k, gguf_py_type(v.value_type()), gguf_py_value(v)]))
            .collect();
        assert_eq!(dump["metadata"], json!(want_meta));
        assert_eq!(
            dump["metadata"][0],
            json!(["general.architecture", "string", "evod-mlp"])
        );
        assert_eq!(
            dump["metadata"][2],
            json!(["evod.layers", "array", {"elem_type": "uint32", "values": spec.arch.layers}])
        );
        let tensors = dump["tensors"].as_array().unwrap();
        let specs = spec.arch.tensor_specs();
        assert_eq!(tensors.len(), specs.len());
        for ((t, (name, dims)), (at, len)) in
            tensors.iter().zip(&specs).zip(spec.arch.tensor_ranges())
        {
            assert_eq!(t["name"], json!(name));
            assert_eq!(t["type"], "F32");
            assert_eq!(t["dims"], json!(dims), "{name}: ggml dims [in, out]");
            assert_eq!(t["bits"], json!(bits(&params[at..at + len])), "{name}");
        }
    }
}

#[test]
fn model_open_refuses_a_symlinked_model() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(vec![4, 2], Activation::Identity);
    let real = dir.path().join("real.gguf");
    write_model(&real, &spec, &params_for(&spec.arch, 3), None).unwrap();
    let link = dir.path().join("model.gguf");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    match Model::open(&link) {
        Err(RuntimeError::Gguf(GgufError::Symlink { path })) => assert_eq!(path, link),
        other => panic!("expected a symlink error, got {other:?}"),
    }
    assert!(Model::open(&real).is_ok());
}
