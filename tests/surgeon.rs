//! `evod surgeon` as a user runs it: real processes on GGUF files that
//! gguf-py wrote (`tests/py/surgeon.py write`: a llama-like model with F32,
//! F16, Q8_0, Q4_0, Q4_K and Q6_K tensors, tokenizer arrays and the usual
//! `llama.*` keys), outputs read back by gguf-py (`surgeon.py read`) and by
//! `evod inspect --json`.
//!
//! The Python is `EVOD_PYTHON`, else `<workspace>/.venv/bin/python`.
//! With `--features llm` (CI's llm step), `outputs_load_and_run_in_llama_cpp`
//! loads mutated and merged outputs in llama.cpp itself.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{evod, text};
use evod_gguf::{GgufReader, dequantize};
use serde_json::Value as Json;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("EVOD_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.exists(),
        "no python with gguf-py: set EVOD_PYTHON or run `cargo xtask venv` (looked for {})",
        venv.display()
    );
    venv
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/py/surgeon.py")
}

/// Writes fixture `variant` (see `surgeon.py`) into `dir`.
fn fixture(dir: &Path, variant: &str) -> PathBuf {
    let path = dir.join(format!("{variant}.gguf"));
    let out = Command::new(python())
        .arg(script())
        .args(["write", path.to_str().unwrap(), variant])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "surgeon.py write {variant}: {}",
        text(&out.stderr)
    );
    path
}

/// What gguf-py reads in `path`.
fn py_read(path: &Path) -> Json {
    let out = Command::new(python())
        .arg(script())
        .args(["read", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "surgeon.py read {}: {}",
        path.display(),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// gguf-py's tensors by name.
fn py_tensors(read: &Json) -> BTreeMap<String, Json> {
    read["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t.clone()))
        .collect()
}

/// gguf-py's dequantized values of a tensor.
fn py_values(t: &Json) -> Vec<f32> {
    t["values_f32_bits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
        .collect()
}

fn surgeon(args: &[&str]) -> Output {
    evod().arg("surgeon").args(args).output().unwrap()
}

fn ok(args: &[&str]) -> Output {
    let out = surgeon(args);
    assert!(
        out.status.success(),
        "evod surgeon {args:?}: {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    out
}

/// The arguments of `evod surgeon mutate FROM -o TO --sigma SIGMA --seed
/// SEED MORE...`.
fn mutate<'a>(
    from: &'a Path,
    to: &'a Path,
    sigma: &'a str,
    seed: &'a str,
    more: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "mutate",
        p(from),
        "-o",
        p(to),
        "--sigma",
        sigma,
        "--seed",
        seed,
    ];
    args.extend(more);
    args
}

/// `evod surgeon ARGS`, which must exit with `code`; its output.
fn exits(code: i32, args: &[&str]) -> Output {
    let out = surgeon(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "evod surgeon {args:?}: {}",
        text(&out.stderr)
    );
    out
}

/// Asserts that `stream` (an output's stdout or stderr) contains `words`.
fn says(stream: &[u8], words: &str) {
    let t = text(stream);
    assert!(t.contains(words), "{t}");
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Tensor name → raw bytes, in file order, read by evod's own reader.
fn tensor_bytes(path: &Path) -> Vec<(String, Vec<u8>)> {
    let r = GgufReader::open(path).unwrap();
    r.tensors()
        .iter()
        .map(|t| (t.name.clone(), r.read_tensor(t).unwrap()))
        .collect()
}

/// A tensor's values, dequantized by evod.
fn values(path: &Path, name: &str) -> Vec<f32> {
    let r = GgufReader::open(path).unwrap();
    let t = r.tensor(name).unwrap();
    dequantize(t.ttype, &r.read_tensor(t).unwrap()).unwrap()
}

fn rms_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    (s / a.len() as f64).sqrt()
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

/// `evod inspect --json` of `path`.
fn inspect(path: &Path) -> Json {
    let out = evod()
        .args(["inspect", "--json", p(path)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const SELECTED: [&str; 5] = [
    "blk.0.attn_norm.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.0.ffn_up.weight",
    "blk.0.ffn_down.weight",
];

#[test]
fn mutate_changes_only_the_selected_tensors_and_gguf_py_reads_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let out = dir.path().join("m.gguf");
    let sigma = 0.05f32;
    ok(&mutate(&a, &out, "0.05", "7", &["--tensors", "blk.0.*"]));

    // evod's view: the same tensors in the same order; bytes equal exactly
    // for the unselected ones.
    let (before, after) = (tensor_bytes(&a), tensor_bytes(&out));
    assert_eq!(
        before.iter().map(|t| &t.0).collect::<Vec<_>>(),
        after.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        let selected = SELECTED.contains(&name.as_str());
        assert_eq!(
            x == y,
            !selected,
            "tensor {name}: selected {selected}, bytes equal {}",
            x == y
        );
    }

    // gguf-py's view: metadata (values and types) equal, plus provenance
    // keys at the end; tensors of the same types and shapes.
    let (pa, pm) = (py_read(&a), py_read(&out));
    let meta_a = pa["metadata"].as_array().unwrap();
    let meta_m = pm["metadata"].as_array().unwrap();
    assert_eq!(&meta_m[..meta_a.len()], &meta_a[..]);
    let added: Vec<&str> = meta_m[meta_a.len()..]
        .iter()
        .map(|m| m["key"].as_str().unwrap())
        .collect();
    assert!(
        added.iter().all(|k| k.starts_with("evod.surgeon.")),
        "{added:?}"
    );
    // Byte for byte: the input's key-value section (after the 24-byte
    // header, whose key count grew) starts the output's.
    let kv_end = pa["kv_end"].as_u64().unwrap() as usize;
    let (raw_a, raw_m) = (std::fs::read(&a).unwrap(), std::fs::read(&out).unwrap());
    assert!(kv_end > 1000, "kv_end {kv_end}");
    assert!(
        raw_a[24..kv_end] == raw_m[24..kv_end],
        "metadata bytes differ"
    );
    let seed = meta_m
        .iter()
        .find(|m| m["key"] == "evod.surgeon.seed")
        .unwrap();
    assert_eq!(seed["value"], 7);
    let (ta, tm) = (py_tensors(&pa), py_tensors(&pm));
    for (name, t) in &ta {
        let u = &tm[name];
        assert_eq!(
            (&t["type"], &t["dims"]),
            (&u["type"], &u["dims"]),
            "tensor {name}"
        );
        assert_eq!(
            t["sha256"] == u["sha256"],
            !SELECTED.contains(&name.as_str()),
            "tensor {name} (gguf-py's bytes)"
        );
    }

    // The F32 tensor is exactly x + σ·noise(xxh3(name, seed), j).
    let name = "blk.0.attn_norm.weight";
    let x = py_values(&ta[name]);
    let stream = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 7);
    let mut expected = x.clone();
    evod_evolve::noise::add_scaled_assign(stream, 0, sigma, &mut expected);
    let got = py_values(&tm[name]);
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    // The quantized ones moved by about σ (plus their re-quantization error).
    for name in ["blk.0.attn_q.weight", "blk.0.ffn_up.weight"] {
        let d = rms_diff(&py_values(&ta[name]), &py_values(&tm[name]));
        assert!(
            (0.9 * 0.05..1.1 * 0.05).contains(&d),
            "tensor {name}: rms change {d}"
        );
    }
    for name in ["blk.0.attn_k.weight", "blk.0.ffn_down.weight"] {
        let d = rms_diff(&py_values(&ta[name]), &py_values(&tm[name]));
        assert!(
            (0.5 * 0.05..0.2).contains(&d),
            "tensor {name}: rms change {d}"
        );
    }

    // `evod inspect --json` agrees: same alignment, key order and types.
    let (ia, im) = (inspect(&a), inspect(&out));
    assert_eq!(ia["alignment"], im["alignment"]);
    let keys = |j: &Json| -> Vec<(String, String)> {
        j["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["key"].as_str().unwrap().into(),
                    m["type"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    assert_eq!(keys(&im)[..keys(&ia).len()], keys(&ia)[..]);
    let shapes = |j: &Json| -> Vec<(Json, Json, Json)> {
        j["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].clone(), t["type"].clone(), t["dims"].clone()))
            .collect()
    };
    assert_eq!(shapes(&ia), shapes(&im));
    let provenance = im["metadata"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == "evod.surgeon.input.checksum")
        .unwrap();
    assert_eq!(provenance["value"], ia["checksum"]);
}

#[test]
fn mutate_is_deterministic_and_each_tensor_depends_only_on_seed_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let run = |name: &str, seed: &str, globs: &[&str]| {
        let out = dir.path().join(name);
        let mut args = mutate(&a, &out, "0.1", seed, &[]);
        for g in globs {
            args.extend(["--tensors", g]);
        }
        ok(&args);
        out
    };
    let one = run("1.gguf", "42", &[]);
    let two = run("2.gguf", "42", &[]);
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());

    // Selecting fewer tensors gives those tensors the same bytes.
    let some = run("3.gguf", "42", &["output*", "token_embd.weight"]);
    let (all, part, orig) = (tensor_bytes(&one), tensor_bytes(&some), tensor_bytes(&a));
    for i in 0..all.len() {
        let name = &all[i].0;
        let picked = name.starts_with("output") || name == "token_embd.weight";
        let expected = if picked { &all[i].1 } else { &orig[i].1 };
        assert!(&part[i].1 == expected, "tensor {name}");
    }

    // Another seed moves every tensor elsewhere.
    let other = tensor_bytes(&run("4.gguf", "43", &[]));
    for ((name, x), (_, y)) in all.iter().zip(&other) {
        assert_ne!(x, y, "tensor {name}: seeds 42 and 43 gave the same bytes");
    }
}

#[test]
fn sigma_zero_keeps_every_tensor_byte_and_relative_scales_by_rms() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let zero = dir.path().join("zero.gguf");
    ok(&mutate(&a, &zero, "0", "1", &[]));
    assert_eq!(tensor_bytes(&a), tensor_bytes(&zero));

    // --relative: σ times the tensor's RMS (the F32 tensor, exactly).
    let rel = dir.path().join("rel.gguf");
    ok(&mutate(
        &a,
        &rel,
        "0.01",
        "1",
        &["--relative", "--tensors", "output_norm.weight"],
    ));
    let name = "output_norm.weight";
    let x = values(&a, name);
    let rms = (x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / x.len() as f64).sqrt();
    let mut expected = x.clone();
    let stream = xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), 1);
    evod_evolve::noise::add_scaled_assign(stream, 0, (0.01 * rms) as f32, &mut expected);
    assert_eq!(values(&rel, name), expected);

    // In place: the output may be the input (published atomically).
    let copy = dir.path().join("copy.gguf");
    std::fs::copy(&a, &copy).unwrap();
    ok(&mutate(
        &copy,
        &copy,
        "0.01",
        "1",
        &["--relative", "--tensors", "output_norm.weight"],
    ));
    assert_eq!(tensor_bytes(&copy), tensor_bytes(&rel));
}

#[test]
fn a_tensor_without_codec_is_refused_by_name_or_copied_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let q2k = fixture(dir.path(), "q2k");
    let out = dir.path().join("out.gguf");
    let refused = exits(3, &mutate(&q2k, &out, "0.1", "1", &[]));
    let err = text(&refused.stderr);
    assert!(
        err.contains("tensor blk.1.ffn_gate.weight: type Q2_K has no codec"),
        "{err}"
    );
    assert!(!out.exists(), "a refused mutation wrote {}", out.display());

    let skipped = ok(&mutate(&q2k, &out, "0.1", "1", &["--skip-unsupported"]));
    let err = text(&skipped.stderr);
    assert!(
        err.contains("blk.1.ffn_gate.weight: type Q2_K has no codec, copied unchanged"),
        "{err}"
    );
    let (before, after) = (tensor_bytes(&q2k), tensor_bytes(&out));
    for ((name, x), (_, y)) in before.iter().zip(&after) {
        assert_eq!(x == y, name == "blk.1.ffn_gate.weight", "tensor {name}");
    }
    // gguf-py reads the copied Q2_K tensor as it was.
    let (pq, po) = (py_tensors(&py_read(&q2k)), py_tensors(&py_read(&out)));
    assert_eq!(pq["blk.1.ffn_gate.weight"], po["blk.1.ffn_gate.weight"]);
    // Selecting only codec types needs no flag.
    ok(&mutate(&q2k, &out, "0.1", "1", &["--tensors", "blk.0.*"]));
}

#[test]
fn bad_patterns_and_arguments_exit_2_and_malformed_files_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let out = dir.path().join("out.gguf");
    let cases: [(&[&str], i32, &str); 5] = [
        (
            &["--sigma", "0.1", "--seed", "1", "--tensors", "blk.[0-1"],
            2,
            "--tensors \"blk.[0-1\": unclosed '['",
        ),
        (
            &["--sigma", "0.1", "--seed", "1", "--tensors", "nothing.*"],
            2,
            "--tensors nothing.*: matches no tensor in",
        ),
        (
            &["--sigma", "nan", "--seed", "1"],
            2,
            "--sigma NaN: must be a finite number",
        ),
        (
            &["--sigma=-1", "--seed", "1"],
            2,
            "--sigma -1: must be a finite number ≥ 0",
        ),
        (&["--sigma", "0.1", "--seed", "x"], 2, "invalid value 'x'"),
    ];
    for (extra, code, message) in cases {
        let mut args = vec!["mutate", p(&a), "-o", p(&out)];
        args.extend(extra);
        let r = exits(code, &args);
        says(&r.stderr, message);
    }
    // --relative on a tensor holding NaN: refused by name; diff reports
    // the NaN as a non-finite distance (null in JSON).
    let nan = fixture(dir.path(), "nan");
    let r = exits(3, &mutate(&nan, &out, "0.1", "1", &["--relative"]));
    says(
        &r.stderr,
        "tensor output_norm.weight: its root mean square is NaN",
    );
    let d = exits(1, &["diff", "--json", p(&a), p(&nan)]);
    let j: Json = serde_json::from_slice(&d.stdout).unwrap();
    let changed = j["tensors"]["changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0]["name"], "output_norm.weight");
    assert_eq!(changed[0]["differing_values"], 1);
    assert!(
        changed[0]["rel_l2"].is_null() && changed[0]["max_abs"].is_null(),
        "{changed:?}"
    );

    // A metadata-only file: nothing to mutate (exit 3); diff still works.
    let vocab = fixture(dir.path(), "vocab");
    let r = exits(3, &mutate(&vocab, &out, "0.1", "1", &[]));
    says(&r.stderr, "vocab.gguf: the file has no tensors");
    let d = exits(1, &["diff", p(&vocab), p(&a)]);
    says(&d.stdout, "+ tensor output.weight: Q4_K [256, 8]");

    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0 not really").unwrap();
    for args in [
        mutate(&junk, &out, "0.1", "1", &[]),
        vec!["merge", p(&a), p(&junk), "-o", p(&out), "--t", "0.5"],
        vec!["diff", p(&a), p(&junk)],
        vec!["diff", p(&a), "/nonexistent/x.gguf"],
    ] {
        let r = exits(3, &args);
        says(&r.stderr, ".gguf");
    }
    assert!(!out.exists());
}

#[test]
fn merge_endpoints_are_the_parents_and_the_midpoint_is_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixture(dir.path(), "a"), fixture(dir.path(), "b"));
    let merge = |name: &str, method: &str, t: &str, globs: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "merge",
            p(&a),
            p(&b),
            "-o",
            p(&out),
            "--method",
            method,
            "--t",
            t,
        ];
        for g in globs {
            args.extend(["--tensors", g]);
        }
        ok(&args);
        out
    };
    let (ba, bb) = (tensor_bytes(&a), tensor_bytes(&b));
    for method in ["linear", "slerp"] {
        assert_eq!(
            tensor_bytes(&merge("t0.gguf", method, "0", &[])),
            ba,
            "{method} t=0"
        );
        assert_eq!(
            tensor_bytes(&merge("t1.gguf", method, "1", &[])),
            bb,
            "{method} t=1"
        );
    }

    // Linear midpoint: F32 exactly 0.5a + 0.5b; the quantized tensors
    // within their re-quantization error of it.
    let mid = merge("mid.gguf", "linear", "0.5", &[]);
    let py = py_tensors(&py_read(&mid));
    for (name, bound) in [
        ("output_norm.weight", 0.0),
        ("blk.0.ffn_up.weight", 0.001),
        ("blk.0.attn_q.weight", 0.01),
        ("blk.0.attn_k.weight", 0.12),
        ("blk.0.ffn_down.weight", 0.03),
        ("token_embd.weight", 0.1),
    ] {
        let (va, vb) = (values(&a, name), values(&b, name));
        let want: Vec<f32> = va
            .iter()
            .zip(&vb)
            .map(|(&x, &y)| 0.5 * x + 0.5 * y)
            .collect();
        let got = py_values(&py[name]);
        let rel = rms_diff(&got, &want) / (norm(&want) / (want.len() as f64).sqrt());
        assert!(
            rel <= bound,
            "tensor {name}: relative rms error {rel} > {bound}"
        );
    }

    // Slerp keeps the norm of two independent tensors of equal norm; the
    // linear midpoint shrinks it by about √2.
    let sl = merge("slerp.gguf", "slerp", "0.5", &[]);
    for name in ["blk.1.attn_q.weight", "blk.1.ffn_up.weight"] {
        let n = (norm(&values(&a, name)) + norm(&values(&b, name))) / 2.0;
        let (ns, nl) = (norm(&values(&sl, name)), norm(&values(&mid, name)));
        assert!(
            (ns / n - 1.0).abs() < 0.05,
            "tensor {name}: slerp norm {ns} vs {n}"
        );
        assert!(
            (nl / n - std::f64::consts::FRAC_1_SQRT_2).abs() < 0.05,
            "tensor {name}: linear norm {nl} vs {n}"
        );
    }

    // Only the selected tensors mix; metadata is A's plus provenance.
    let part = merge("part.gguf", "slerp", "0.3", &["output*"]);
    for ((name, x), (_, y)) in ba.iter().zip(&tensor_bytes(&part)) {
        assert_eq!(x == y, !name.starts_with("output"), "tensor {name}");
    }
    let im = inspect(&part);
    let meta = |k: &str| {
        im["metadata"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == k)
            .unwrap_or_else(|| panic!("no key {k}"))["value"]
            .clone()
    };
    assert_eq!(meta("evod.surgeon.method"), "slerp");
    assert_eq!(meta("evod.surgeon.a.checksum"), inspect(&a)["checksum"]);
    assert_eq!(meta("evod.surgeon.b.checksum"), inspect(&b)["checksum"]);
    assert_eq!(meta("general.architecture"), "llama");
    assert!((meta("evod.surgeon.t").as_f64().unwrap() - 0.3).abs() < 1e-7);
}

#[test]
fn merge_refuses_other_shapes_and_architectures_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let out = dir.path().join("out.gguf");
    for (variant, message) in [
        (
            "shape",
            "tensor blk.0.attn_q.weight: shape [64, 64] in A, [64, 32] in B",
        ),
        (
            "arch",
            "general.architecture: \"llama\" in A, \"qwen2\" in B",
        ),
        ("q2k", "tensor blk.1.ffn_gate.weight: in B, not in A"),
    ] {
        let other = fixture(dir.path(), variant);
        let r = exits(3, &["merge", p(&a), p(&other), "-o", p(&out), "--t", "0.5"]);
        let err = text(&r.stderr);
        assert!(
            err.contains("cannot merge") && err.contains(message),
            "{variant}: {err}"
        );
        assert!(!out.exists());
    }
    exits(
        2,
        &[
            "merge",
            p(&a),
            p(&a),
            "-o",
            p(&out),
            "--method",
            "slerp",
            "--t",
            "1.5",
        ],
    );
}

#[test]
fn diff_exits_0_for_identical_files_and_1_listing_exactly_the_mutated_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let a = fixture(dir.path(), "a");
    let same = exits(0, &["diff", p(&a), p(&a)]);
    says(&same.stdout, "identical: ");

    let m = dir.path().join("m.gguf");
    ok(&mutate(&a, &m, "0.02", "5", &["--tensors", "blk.0.*"]));
    let d = exits(1, &["diff", "--json", p(&a), p(&m)]);
    let j: Json = serde_json::from_slice(&d.stdout).unwrap();
    assert_eq!(j["identical"], false);
    let changed: Vec<&str> = j["tensors"]["changed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(changed, SELECTED);
    assert_eq!(j["tensors"]["identical"], 8);
    for t in j["tensors"]["changed"].as_array().unwrap() {
        let rel = t["rel_l2"].as_f64().unwrap();
        assert!(rel > 0.0 && rel < 0.2, "{t}");
    }
    let added: Vec<&str> = j["metadata"]["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert!(
        !added.is_empty() && added.iter().all(|k| k.starts_with("evod.surgeon.")),
        "{added:?}"
    );
    assert!(j["metadata"]["removed"].as_array().unwrap().is_empty());
    assert!(j["tensors"]["added"].as_array().unwrap().is_empty());

    // Text mode says the same; shapes and added tensors are named.
    let t = text(&surgeon(&["diff", p(&a), p(&m)]).stdout);
    for name in SELECTED {
        assert!(t.contains(&format!("~ tensor {name}: ")), "{t}");
    }
    let shape = fixture(dir.path(), "shape");
    let s = exits(1, &["diff", p(&a), p(&shape)]);
    says(
        &s.stdout,
        "~ tensor blk.0.attn_q.weight: Q8_0 [64, 64] -> Q8_0 [64, 32]: shapes differ",
    );
    let q2k = fixture(dir.path(), "q2k");
    let s = exits(1, &["diff", p(&a), p(&q2k)]);
    says(&s.stdout, "+ tensor blk.1.ffn_gate.weight: Q2_K [256, 4]");
}

/// The surgeon's outputs load and run in llama.cpp (the evod-llama
/// runtime, `--features llm`): mutate and slerp-merge of a tiny llama that
/// gguf-py writes (`crates/evod-llama/tests/py/tiny_llama.py`) in F32 and
/// in Q8_0, and of a Q4_K copy that evod-gguf's codec quantizes.
#[cfg(feature = "llm")]
#[test]
fn outputs_load_and_run_in_llama_cpp() {
    use evod_gguf::{GgufFile, PublishOptions, TensorSpec, TensorType, publish, quantize};
    use evod_llama::{BaseModel, LlamaOptions};

    let dir = tempfile::tempdir().unwrap();
    let tiny = |name: &str, args: &[&str]| {
        let path = dir.path().join(name);
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../evod-llama/tests/py/tiny_llama.py");
        let out = Command::new(python())
            .arg(script)
            .arg("write")
            .arg(&path)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "tiny_llama.py: {}", text(&out.stderr));
        path
    };
    let f32_model = tiny("f32.gguf", &[]);
    let q8_model = tiny("q8.gguf", &["--type", "Q8_0"]);
    // Q4_K rows are 256 values: a wider model, its matrices requantized.
    let wide = tiny(
        "wide.gguf",
        &["--n-embd", "256", "--n-ff", "256", "--layers", "2"],
    );
    let q4k_model = dir.path().join("q4k.gguf");
    {
        let src = GgufFile::open(&wide).unwrap();
        let specs: Vec<TensorSpec> = src
            .tensors()
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ttype: if t.dims.len() == 2 {
                    TensorType::Q4_K
                } else {
                    t.ttype
                },
            })
            .collect();
        publish(
            &q4k_model,
            src.metadata(),
            &specs,
            |i, sink| {
                let t = &src.tensors()[i];
                let values = src.tensor_f32(t).unwrap();
                let bytes = if specs[i].ttype == TensorType::Q4_K {
                    quantize(TensorType::Q4_K, &values).unwrap()
                } else {
                    src.tensor_bytes(t).to_vec()
                };
                sink.write_all(&bytes)
            },
            &PublishOptions::default(),
        )
        .unwrap();
    }

    let text_in = "the theater at the inn, a thin hen ran in the rain, then the hen ate.";
    let opts = LlamaOptions {
        n_ctx: 128,
        ..LlamaOptions::default()
    };
    let score = |path: &Path| {
        let mut m = BaseModel::load(path, &opts)
            .unwrap_or_else(|e| panic!("llama.cpp refused {}: {e}", path.display()));
        let toks = m.tokenize(text_in).unwrap();
        let nll = m.nll(&toks, 64, &mut || {}).unwrap();
        assert!(
            nll.sum.is_finite() && nll.count > 10,
            "{}: {nll:?}",
            path.display()
        );
        nll.sum
    };
    for base in [&f32_model, &q8_model, &q4k_model] {
        let stem = base.file_stem().unwrap().to_str().unwrap();
        let mutated = dir.path().join(format!("{stem}-mut.gguf"));
        ok(&mutate(
            base,
            &mutated,
            "0.05",
            "3",
            &["--tensors", "blk.*"],
        ));
        let merged = dir.path().join(format!("{stem}-merge.gguf"));
        ok(&[
            "merge",
            p(base),
            p(&mutated),
            "-o",
            p(&merged),
            "--method",
            "slerp",
            "--t",
            "0.5",
        ]);
        let (b, m, g) = (score(base), score(&mutated), score(&merged));
        eprintln!("{stem}: nll base {b} mutated {m} merged {g}");
        assert_ne!(
            b, m,
            "{stem}: the mutation changed nothing llama.cpp computes"
        );
        assert_ne!(m, g, "{stem}: the merge is the mutated model");
    }
}
