//! The writer: read → write → read round trips, tensor size checks, spec
//! validation, injected I/O faults (target untouched, no temp file) and
//! cleanup of leftovers from killed writers.

use std::path::Path;

use evod_gguf::{
    Array, GgufError, GgufFile, IoFault, IoStep, PublishOptions, TensorSpec, TensorType, Value,
    ValueType, publish, rewrite,
};

fn every_type_metadata() -> Vec<(String, Value)> {
    let s = |k: &str, v: Value| (k.to_owned(), v);
    vec![
        s("general.architecture", Value::String("evod-mlp".into())),
        s("z.u8", Value::U8(250)),
        s("a.i8", Value::I8(-5)),
        s("m.u16", Value::U16(65535)),
        s("m.i16", Value::I16(-32768)),
        s("m.u32", Value::U32(7)),
        s("m.i32", Value::I32(-7)),
        s("m.f32", Value::F32(1.25)),
        s("m.bool", Value::Bool(false)),
        s("m.string", Value::String("ünïcode ✓".into())),
        s("m.u64", Value::U64(u64::MAX)),
        s("m.i64", Value::I64(i64::MIN)),
        s("m.f64", Value::F64(-2.5e300)),
        s(
            "m.arr.str",
            Value::Array(Array {
                elem_type: ValueType::String,
                values: vec![Value::String("a".into()), Value::String(String::new())],
            }),
        ),
        s(
            "m.arr.empty",
            Value::Array(Array {
                elem_type: ValueType::F64,
                values: vec![],
            }),
        ),
        s(
            "m.arr.nested",
            Value::Array(Array {
                elem_type: ValueType::Array,
                values: vec![Value::Array(Array {
                    elem_type: ValueType::I16,
                    values: vec![Value::I16(1), Value::I16(-1)],
                })],
            }),
        ),
    ]
}

fn specs() -> Vec<TensorSpec> {
    let t = |n: &str, dims: &[u64], ttype| TensorSpec {
        name: n.into(),
        dims: dims.to_vec(),
        ttype,
    };
    vec![
        t("blk.0.weight", &[3, 5], TensorType::F32),
        t("blk.0.bias", &[5], TensorType::F16),
        t("q", &[64, 2], TensorType::Q8_0),
        t("blk.1.weight", &[7], TensorType::BF16),
        t("k", &[256], TensorType::Q4_K),
    ]
}

/// Deterministic bytes for tensor `i`.
fn tensor_data(i: usize, len: u64) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn write_sample(path: &Path, opts: &PublishOptions) -> evod_gguf::PublishReport {
    let specs = specs();
    publish(
        path,
        &every_type_metadata(),
        &specs,
        |i, w| {
            let s = &specs[i];
            let len = s.ttype.byte_size(&s.dims).unwrap();
            // Several writes per tensor, as a streaming producer would.
            for chunk in tensor_data(i, len).chunks(7) {
                w.write_all(chunk)?;
            }
            Ok(())
        },
        opts,
    )
    .unwrap()
}

#[test]
fn write_read_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let report = write_sample(&path, &PublishOptions::default());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.metadata(), &every_type_metadata()[..]);
    assert_eq!(report.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(report.checksum, f.checksum());
    for (i, (t, s)) in f.tensors().iter().zip(specs()).enumerate() {
        assert_eq!((&t.name, &t.dims, t.ttype), (&s.name, &s.dims, s.ttype));
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_bytes(t), &tensor_data(i, t.size)[..]);
    }
    assert_eq!(f.file_len() % 32, 0, "the last tensor is padded");
}

#[test]
fn read_write_read_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.gguf");
    let b = dir.path().join("b.gguf");
    write_sample(
        &a,
        &PublishOptions {
            alignment: 64,
            fault: None,
        },
    );
    let fa = GgufFile::open(&a).unwrap();
    assert_eq!(fa.alignment(), 64);
    assert_eq!(fa.metadata()[0].0, "general.alignment");
    let report = rewrite(&fa, &b, |_| {}, &PublishOptions::default()).unwrap();
    let fb = GgufFile::open(&b).unwrap();
    assert_eq!(fa.metadata(), fb.metadata());
    assert_eq!(fa.tensors(), fb.tensors());
    assert_eq!(fb.alignment(), 64);
    assert_eq!(report.checksum, fa.checksum());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn rewrite_with_edit_keeps_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.gguf");
    write_sample(&a, &PublishOptions::default());
    let fa = GgufFile::open(&a).unwrap();
    rewrite(
        &fa,
        &a,
        |m| m.push(("evod.generation".into(), Value::U64(2))),
        &PublishOptions::default(),
    )
    .unwrap();
    let fb = GgufFile::open(&a).unwrap();
    assert_eq!(fb.metadata()[..fa.metadata().len()], *fa.metadata());
    assert_eq!(fb.get("evod.generation").and_then(Value::as_u64), Some(2));
    // The old mapping is still readable after the rename replaced the file.
    assert_eq!(
        fa.tensor_bytes(&fa.tensors()[0]),
        fb.tensor_bytes(&fb.tensors()[0])
    );
}

#[test]
fn tensor_f32_converts_supported_types() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.gguf");
    let vals: Vec<f32> = (0..64).map(|i| (i as f32 - 30.0) / 8.0).collect();
    let q8 = evod_gguf::quantize_q8_0(&vals);
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    // Q4_0: scale 0.5, nibbles 0..16 then 16..32 from q = j % 16.
    let mut q4 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q4.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let datas = [f32b, f16, bf16, q8, q4];
    let types = [
        TensorType::F32,
        TensorType::F16,
        TensorType::BF16,
        TensorType::Q8_0,
        TensorType::Q4_0,
    ];
    let specs: Vec<TensorSpec> = types
        .iter()
        .enumerate()
        .map(|(i, &t)| TensorSpec {
            name: format!("t{i}"),
            dims: vec![if t == TensorType::Q4_0 { 32 } else { 64 }],
            ttype: t,
        })
        .collect();
    publish(
        &path,
        &[],
        &specs,
        |i, w| w.write_all(&datas[i]),
        &PublishOptions::default(),
    )
    .unwrap();
    let f = GgufFile::open(&path).unwrap();
    let t = f.tensors();
    let exact = f.tensor_f32(&t[0]).unwrap();
    assert!(
        matches!(exact, std::borrow::Cow::Borrowed(_)),
        "aligned f32 is zero-copy"
    );
    assert_eq!(&exact[..], &vals[..]);
    assert_eq!(
        &f.tensor_f32(&t[1]).unwrap()[..],
        &vals[..],
        "values are exact in f16"
    );
    assert_eq!(
        &f.tensor_f32(&t[2]).unwrap()[..],
        &vals[..],
        "values are exact in bf16"
    );
    let q = f.tensor_f32(&t[3]).unwrap();
    let step = 3.875 / 127.0;
    assert!(
        q.iter().zip(&vals).all(|(a, b)| (a - b).abs() <= step),
        "{q:?}"
    );
    let q4: Vec<f32> = (0..16)
        .map(|j| (j as f32 - 8.0) * 0.5)
        .chain((0..16).map(|j| (7.0 - j as f32) * 0.5))
        .collect();
    assert_eq!(&f.tensor_f32(&t[4]).unwrap()[..], &q4[..]);
}

#[test]
fn unconvertible_type_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.gguf");
    let spec = TensorSpec {
        name: "k".into(),
        dims: vec![256],
        ttype: TensorType::Q2_K,
    };
    publish(
        &path,
        &[],
        &[spec],
        |_, w| w.write_all(&[0; 84]),
        &PublishOptions::default(),
    )
    .unwrap();
    let f = GgufFile::open(&path).unwrap();
    let e = f.tensor_f32(&f.tensors()[0]).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Unconvertible {
                ttype: TensorType::Q2_K,
                ..
            }
        ),
        "{e}"
    );
}

fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

#[test]
fn wrong_tensor_sizes_fail_and_leave_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, b"old").unwrap();
    let spec = TensorSpec {
        name: "t".into(),
        dims: vec![4],
        ttype: TensorType::F32,
    };
    for n in [15usize, 17, 0] {
        let e = publish(
            &path,
            &[],
            std::slice::from_ref(&spec),
            |_, w| w.write_all(&vec![1; n]),
            &PublishOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(e, GgufError::TensorSize { expected: 16, .. }),
            "{n}: {e}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(temp_files(dir.path()).is_empty());
    }
}

#[test]
fn invalid_specs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let t = |dims: &[u64], ttype| TensorSpec {
        name: "t".into(),
        dims: dims.to_vec(),
        ttype,
    };
    let bad_tensors = [
        vec![t(&[1, 1, 1, 1, 1], TensorType::F32)],
        vec![t(&[0], TensorType::F32)],
        vec![t(&[33], TensorType::Q8_0)],
        vec![t(&[1 << 40, 1 << 40], TensorType::F32)],
        vec![t(&[4], TensorType::F32), t(&[4], TensorType::F32)],
    ];
    for tensors in bad_tensors {
        let e = publish(
            &path,
            &[],
            &tensors,
            |_, _| Ok(()),
            &PublishOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(e, GgufError::InvalidSpec { .. }), "{e}");
    }
    let kv = |k: &str, v| vec![(k.to_owned(), v)];
    let bad_meta = [
        kv("general.alignment", Value::U32(3)),
        kv("general.alignment", Value::U64(32)),
        vec![("a".into(), Value::U8(1)), ("a".into(), Value::U8(2))],
        kv(
            "x",
            Value::Array(Array {
                elem_type: ValueType::U8,
                values: vec![Value::I8(1)],
            }),
        ),
    ];
    for meta in bad_meta {
        let e = publish(&path, &meta, &[], |_, _| Ok(()), &PublishOptions::default()).unwrap_err();
        assert!(matches!(e, GgufError::InvalidSpec { .. }), "{e}");
    }
    let e = publish(
        &path,
        &[],
        &[],
        |_, _| Ok(()),
        &PublishOptions {
            alignment: 24,
            fault: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, GgufError::InvalidSpec { .. }), "{e}");
    assert!(!path.exists());
}

#[test]
fn injected_faults_leave_old_file_and_no_temp() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let old = write_sample(&path, &PublishOptions::default());
    let old_bytes = std::fs::read(&path).unwrap();
    let cases = [
        (IoFault::Write(libc::ENOSPC), IoStep::Write, libc::ENOSPC),
        (IoFault::Fsync(libc::EIO), IoStep::Fsync, libc::EIO),
        (IoFault::Rename(libc::EIO), IoStep::Rename, libc::EIO),
    ];
    for (fault, step, errno) in cases {
        let meta = vec![("new".to_owned(), Value::Bool(true))];
        let e = publish(
            &path,
            &meta,
            &[],
            |_, _| Ok(()),
            &PublishOptions {
                alignment: 32,
                fault: Some(fault),
            },
        )
        .unwrap_err();
        match &e {
            GgufError::Io {
                step: s,
                source,
                path: p,
            } => {
                assert_eq!(*s, step);
                assert_eq!(source.raw_os_error(), Some(errno));
                assert_eq!(p, &path);
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("m.gguf") && msg.contains(&step.to_string()),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), old_bytes, "{fault:?}");
        assert!(temp_files(dir.path()).is_empty(), "{fault:?}");
    }
    assert_eq!(GgufFile::open(&path).unwrap().checksum(), old.checksum);
    // A folder fsync failure comes after the rename: the new file is in place.
    let meta = vec![("new".to_owned(), Value::Bool(true))];
    let e = publish(
        &path,
        &meta,
        &[],
        |_, _| Ok(()),
        &PublishOptions {
            alignment: 32,
            fault: Some(IoFault::DirFsync(libc::EIO)),
        },
    )
    .unwrap_err();
    assert!(matches!(
        e,
        GgufError::Io {
            step: IoStep::DirFsync,
            ..
        }
    ));
    assert!(GgufFile::open(&path).unwrap().get("new").is_some());
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn a_missing_or_non_folder_parent_is_named_as_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_folder = dir.path().join("plain");
    std::fs::write(&not_a_folder, b"x").unwrap();
    for (target, errno) in [
        (dir.path().join("missing/m.gguf"), libc::ENOENT),
        (not_a_folder.join("m.gguf"), libc::ENOTDIR),
    ] {
        let e = write_sample_result(&target).unwrap_err();
        match &e {
            GgufError::Io { step, source, path } => {
                assert_eq!(*step, IoStep::Folder, "{e}");
                assert_eq!(source.raw_os_error(), Some(errno), "{e}");
                assert_eq!(path, &target);
            }
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("m.gguf") && msg.contains("opening its folder"),
            "{msg}"
        );
        assert!(!target.exists());
    }
    // Nothing was created on the way.
    assert!(!dir.path().join("missing").exists());
    assert_eq!(std::fs::read(&not_a_folder).unwrap(), b"x");
}

fn write_sample_result(path: &Path) -> Result<evod_gguf::PublishReport, GgufError> {
    publish(path, &[], &[], |_, _| Ok(()), &PublishOptions::default())
}

#[test]
fn failing_producer_leaves_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    std::fs::write(&path, b"old").unwrap();
    let spec = TensorSpec {
        name: "t".into(),
        dims: vec![1024],
        ttype: TensorType::F32,
    };
    let e = publish(
        &path,
        &[],
        &[spec],
        |_, w| {
            w.write_all(&[0; 100])?;
            Err(std::io::Error::other("source went away"))
        },
        &PublishOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Io {
                step: IoStep::Write,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    assert!(temp_files(dir.path()).is_empty());
}

#[test]
fn leftovers_from_killed_writers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    for name in [".m.gguf.tmp.1234.0", ".m.gguf.tmp.99.7"] {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    // Another model's temp files are not ours to remove.
    std::fs::write(dir.path().join(".other.gguf.tmp.1.0"), b"x").unwrap();
    publish(&path, &[], &[], |_, _| Ok(()), &PublishOptions::default()).unwrap();
    assert_eq!(
        temp_files(dir.path()),
        vec![".other.gguf.tmp.1.0".to_owned()]
    );
    assert_eq!(GgufFile::open(&path).unwrap().tensors().len(), 0);
}
