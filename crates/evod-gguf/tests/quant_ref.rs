//! evod's codecs against gguf-py 0.19 (`tests/py/quant_ref.py`), bit for
//! bit: quantization of seeded data for F32, F16, BF16 and the 32-value
//! block types; dequantization of every codec type on bytes gguf-py made,
//! on raw random bytes and on K-quant blocks evod's quantizer made; and a
//! GGUF file with a tensor of every codec type, written by evod and read
//! back by gguf-py's `GGUFReader`.

mod common;

use std::path::Path;
use std::process::Command;

use evod_gguf::quant::{CODEC_TYPES, dequantize, quantize};
use evod_gguf::{GgufFile, PublishOptions, TensorSpec, TensorType, Value, publish};
use serde_json::Value as Json;

fn py(args: &[&str]) -> Vec<u8> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/quant_ref.py");
    let out = Command::new(common::python())
        .arg(&script)
        .args(args)
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "quant_ref.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Asserts two f32 slices are equal bit for bit, naming the first
/// difference.
fn assert_bits(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
        panic!(
            "{what}[{i}]: evod {} ({:#010x}) vs gguf-py {} ({:#010x})",
            ours[i],
            ours[i].to_bits(),
            theirs[i],
            theirs[i].to_bits()
        );
    }
}

/// SplitMix64: seeded, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-7), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

#[test]
fn quantize_matches_gguf_py_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    py(&["gen", dir.path().to_str().unwrap()]);
    let read = |name: &str| std::fs::read(dir.path().join(name)).unwrap();
    for name in ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] {
        let t = *TensorType::ALL.iter().find(|t| t.name() == name).unwrap();
        let x = f32s(&read(&format!("{name}.x")));
        let q = read(&format!("{name}.q"));
        let qd = f32s(&read(&format!("{name}.qd")));
        assert!(x.len() >= 32768, "{name}: {} values", x.len());
        let ours = quantize(t, &x).unwrap();
        assert_eq!(ours.len(), q.len(), "{name}: quantized length");
        if let Some(i) = (0..q.len()).find(|&i| ours[i] != q[i]) {
            let bs = t.type_size() as usize;
            let b = i / bs;
            panic!(
                "{name}: byte {i} (block {b}) differs: evod {:02x?} vs gguf-py {:02x?}; input {:?}",
                &ours[b * bs..(b + 1) * bs],
                &q[b * bs..(b + 1) * bs],
                &x[b * t.block_size() as usize..(b + 1) * t.block_size() as usize]
            );
        }
        assert_bits(
            &format!("{name} dequantized"),
            &dequantize(t, &q).unwrap(),
            &qd,
        );
    }
}

/// Random bytes of type `t` whose f16 scales are finite and moderate
/// (`sane`), or entirely random (NaN and infinite scales included).
fn random_blocks(rng: &mut Rng, t: TensorType, n_blocks: usize, sane: bool) -> Vec<u8> {
    let bs = t.type_size() as usize;
    let mut b: Vec<u8> = (0..n_blocks * bs).map(|_| rng.next() as u8).collect();
    if !sane {
        return b;
    }
    // Byte offsets of the f16 scales in each block.
    let scales: &[usize] = match t {
        TensorType::Q4_0 | TensorType::Q5_0 | TensorType::Q8_0 => &[0],
        TensorType::Q4_1 | TensorType::Q5_1 | TensorType::Q4_K | TensorType::Q5_K => &[0, 2],
        TensorType::Q6_K => &[208],
        _ => &[],
    };
    for block in b.chunks_exact_mut(bs) {
        for &o in scales {
            let v = rng.normal() * 10f32.powi((rng.next() % 8) as i32 - 5);
            block[o..o + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
        }
    }
    b
}

#[test]
fn dequantize_matches_gguf_py_on_any_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5eed_0014);
    let mut names = Vec::new();
    let mut inputs = Vec::new();
    for &t in CODEC_TYPES {
        let n_blocks = if t.block_size() == 1 { 65536 } else { 2048 };
        let mut cases = vec![
            ("sane", random_blocks(&mut rng, t, n_blocks, true)),
            ("raw", random_blocks(&mut rng, t, n_blocks, false)),
        ];
        if t.block_size() == 256 {
            // Valid blocks from evod's quantizer, at several magnitudes.
            let x: Vec<f32> = (0..256 * 512)
                .map(|i| rng.normal() * 10f32.powi((i / 256 % 9) - 4))
                .collect();
            cases.push(("ours", quantize(t, &x).unwrap()));
        }
        if t == TensorType::F16 {
            // Every f16 bit pattern.
            let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
            cases.push(("all", all));
        }
        for (case, bytes) in cases {
            let name = format!("{}.{case}", t.name());
            std::fs::write(dir.path().join(format!("{name}.in")), &bytes).unwrap();
            names.push(name);
            inputs.push((t, bytes));
        }
    }
    let mut args = vec!["deq", dir.path().to_str().unwrap()];
    args.extend(names.iter().map(String::as_str));
    py(&args);
    for (name, (t, bytes)) in names.iter().zip(&inputs) {
        let theirs = f32s(&std::fs::read(dir.path().join(format!("{name}.out"))).unwrap());
        assert_bits(name, &dequantize(*t, bytes).unwrap(), &theirs);
    }
}

#[test]
fn gguf_py_reads_a_file_with_every_codec_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("every-type.gguf");
    let mut rng = Rng(0x0ddc_0de5);
    let mut specs = Vec::new();
    let mut datas = Vec::new();
    for &t in CODEC_TYPES {
        // Two rows of two blocks (or 64 values for plain types).
        let row = (t.block_size() * 2).max(64);
        let x: Vec<f32> = (0..row * 2).map(|_| rng.normal() * 3.0).collect();
        specs.push(TensorSpec {
            name: format!("t.{}", t.name().to_lowercase()),
            dims: vec![row, 2],
            ttype: t,
        });
        datas.push(quantize(t, &x).unwrap());
    }
    let meta = vec![(
        "general.architecture".to_owned(),
        Value::String("evod-quant".into()),
    )];
    publish(
        &path,
        &meta,
        &specs,
        |i, w| w.write_all(&datas[i]),
        &PublishOptions::default(),
    )
    .unwrap();

    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let infos: Json = serde_json::from_slice(&py(&[
        "read",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]))
    .unwrap();
    let infos = infos.as_array().unwrap();
    assert_eq!(infos.len(), specs.len());
    let file = GgufFile::open(&path).unwrap();
    for (i, (spec, info)) in specs.iter().zip(infos).enumerate() {
        let what = &spec.name;
        assert_eq!(info["name"], Json::from(spec.name.as_str()));
        assert_eq!(info["type"], Json::from(spec.ttype.name()), "{what}");
        let dims: Vec<u64> = serde_json::from_value(info["dims"].clone()).unwrap();
        assert_eq!(dims, spec.dims, "{what}");
        let raw = std::fs::read(out.join(format!("{i}.raw"))).unwrap();
        assert_eq!(raw, datas[i], "{what}: bytes gguf-py read");
        let theirs = f32s(&std::fs::read(out.join(format!("{i}.f32"))).unwrap());
        assert_bits(what, &dequantize(spec.ttype, &datas[i]).unwrap(), &theirs);
        // evod's reader agrees too.
        let t = file.tensor(what).unwrap();
        assert_bits(what, &file.tensor_f32(t).unwrap(), &theirs);
    }
}
