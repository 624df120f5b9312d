//! One test per malformed-input class (docs/gguf-validation.md), each from
//! hand-built bytes, asserting the specific error and where it points.
//! Every case is also read from a file with [`GgufReader`] (`pread`, no map),
//! which must give the same header or the same error at the same offset.

mod common;

use common::Bytes;
use evod_gguf::{GgufError, GgufFile, GgufHeader, GgufReader, ParseErrorKind as K};

fn parse(b: &Bytes) -> Result<GgufHeader, GgufError> {
    let parsed = GgufFile::parse("hand.gguf", &b.0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hand.gguf");
    std::fs::write(&path, &b.0).unwrap();
    let read = GgufReader::open(&path).map(GgufReader::into_header);
    match (&parsed, &read) {
        (Ok(p), Ok(r)) => assert_eq!(common::header_view(p), common::header_view(r)),
        (
            Err(GgufError::Parse { kind, offset, .. }),
            Err(GgufError::Parse {
                kind: k2,
                offset: o2,
                file,
            }),
        ) => {
            assert_eq!((kind, offset), (k2, o2), "map and read disagree");
            assert_eq!(file, &path.display().to_string());
        }
        _ => panic!("map and read disagree: {parsed:?} vs {read:?}"),
    }
    parsed
}

/// The parse error's kind and offset; fails the test if parsing succeeded.
fn kind(b: &Bytes) -> (K, u64) {
    match parse(b) {
        Err(GgufError::Parse { kind, offset, file }) => {
            assert_eq!(file, "hand.gguf");
            (kind, offset)
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

/// A valid file: one key, one 4x2 F32 tensor.
fn valid() -> Bytes {
    Bytes::header(1, 1)
        .kv_str("general.architecture", "evod")
        .tensor("w", &[4, 2], 0, 0)
        .pad(32)
        .zeros(32)
}

#[test]
fn valid_baseline_parses() {
    let h = parse(&valid()).unwrap();
    assert_eq!(h.tensors()[0].size, 32);
    assert_eq!(h.data_offset() % 32, 0);
    assert_eq!(
        h.get("general.architecture").unwrap().as_str(),
        Some("evod")
    );
}

#[test]
fn bad_magic() {
    let b = Bytes::new().raw(b"GGML").u32(3).u64(0).u64(0);
    assert!(matches!(kind(&b), (K::BadMagic { found }, 0) if &found == b"GGML"));
}

#[test]
fn unsupported_versions() {
    for v in [0u32, 1, 4, 0x0300_0000] {
        let b = Bytes::new().raw(b"GGUF").u32(v).u64(0).u64(0);
        assert_eq!(kind(&b), (K::UnsupportedVersion { version: v }, 4));
    }
}

#[test]
fn version_2_is_read() {
    let b = Bytes::new()
        .raw(b"GGUF")
        .u32(2)
        .u64(0)
        .u64(1)
        .kv_u32("a", 1);
    assert_eq!(parse(&b).unwrap().version(), 2);
}

#[test]
fn every_truncation_is_an_error() {
    let full = valid();
    for len in 0..full.0.len() {
        let b = Bytes(full.0[..len].to_vec());
        assert!(parse(&b).is_err(), "prefix of {len} bytes parsed");
    }
    let (k, _) = kind(&Bytes(full.0[..10].to_vec()));
    assert!(
        matches!(
            k,
            K::Truncated {
                what: "tensor count",
                ..
            }
        ),
        "{k:?}"
    );
}

#[test]
fn kv_only_file_without_padding_is_valid() {
    let b = Bytes::header(0, 1).kv_str("general.name", "abc");
    assert_ne!(b.0.len() % 32, 0);
    let h = parse(&b).unwrap();
    assert!(h.data_offset() > b.0.len() as u64);
    assert_eq!(h.data_range().len(), 0);
}

#[test]
fn huge_tensor_count() {
    let b = Bytes::header(u64::MAX, 0);
    assert!(matches!(kind(&b), (K::HugeCount { what: "tensor", .. }, 8)));
    // Negative when read as i64 by other parsers.
    let b = Bytes::header(1 << 63, 0);
    assert!(matches!(kind(&b), (K::HugeCount { what: "tensor", .. }, 8)));
}

#[test]
fn huge_kv_count() {
    let b = Bytes::header(0, 1 << 40).kv_u32("a", 1);
    assert!(matches!(
        kind(&b),
        (
            K::HugeCount {
                what: "metadata key",
                ..
            },
            16
        )
    ));
}

#[test]
fn string_length_past_end() {
    let b = Bytes::header(0, 1).u64(100).raw(b"abcdefgh");
    assert!(matches!(
        kind(&b),
        (
            K::StringTooLong {
                len: 100,
                remaining: 8
            },
            24
        )
    ));
}

#[test]
fn string_length_huge() {
    let b = Bytes::header(0, 1)
        .str("k")
        .u32(8)
        .u64(u64::MAX)
        .raw(b"xyz");
    assert!(matches!(
        kind(&b),
        (K::StringTooLong { len: u64::MAX, .. }, 37)
    ));
}

#[test]
fn array_length_past_end_or_huge() {
    for len in [5u64, u64::MAX, 1 << 62] {
        // Array of u32, 2 elements present.
        let b = Bytes::header(0, 1)
            .str("k")
            .u32(9)
            .u32(4)
            .u64(len)
            .u32(1)
            .u32(2);
        let (k, off) = kind(&b);
        assert!(
            matches!(k, K::ArrayTooLong { len: l, .. } if l == len),
            "{k:?}"
        );
        assert_eq!(off, 24 + 9 + 4 + 4);
    }
    // Strings need at least 8 bytes each.
    let b = Bytes::header(0, 1)
        .str("k")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("")
        .str("");
    assert!(matches!(kind(&b).0, K::ArrayTooLong { len: 3, .. }));
}

#[test]
fn arrays_nested_too_deep() {
    let mut b = Bytes::header(0, 1).str("k").u32(9);
    for _ in 0..20 {
        b = b.u32(9).u64(1);
    }
    b = b.u32(4).u64(0);
    assert!(matches!(kind(&b).0, K::NestingTooDeep { .. }));
}

#[test]
fn nested_arrays_within_limit_parse() {
    let b = Bytes::header(0, 1)
        .str("k")
        .u32(9)
        .u32(9)
        .u64(2)
        .u32(4)
        .u64(1)
        .u32(7)
        .u32(8)
        .u64(1)
        .str("x");
    let h = parse(&b).unwrap();
    let a = h.get("k").unwrap().as_array().unwrap();
    assert_eq!(a.values.len(), 2);
    assert_eq!(
        a.values[1].as_array().unwrap().values[0].as_str(),
        Some("x")
    );
}

#[test]
fn unknown_value_type() {
    let b = Bytes::header(0, 1).str("k").u32(13).u32(0);
    assert_eq!(kind(&b), (K::UnknownValueType { id: 13 }, 33));
}

#[test]
fn bad_bool_byte() {
    let b = Bytes::header(0, 1).str("k").u32(7).u8(2);
    assert_eq!(kind(&b), (K::BadBool { byte: 2 }, 37));
}

#[test]
fn invalid_utf8_in_key_value_and_tensor_name() {
    let bad = [b'a', 0xff, b'b'];
    let b = Bytes::header(0, 1).u64(3).raw(&bad).u32(4).u32(1);
    assert_eq!(
        kind(&b),
        (
            K::InvalidUtf8 {
                what: "metadata key"
            },
            33
        )
    );
    let b = Bytes::header(0, 1).str("k").u32(8).u64(3).raw(&bad);
    assert_eq!(
        kind(&b).0,
        K::InvalidUtf8 {
            what: "string value"
        }
    );
    let b = Bytes::header(1, 0)
        .u64(3)
        .raw(&bad)
        .u32(1)
        .u64(1)
        .u32(0)
        .u64(0);
    assert_eq!(
        kind(&b).0,
        K::InvalidUtf8 {
            what: "tensor name"
        }
    );
}

#[test]
fn duplicate_key() {
    let b = Bytes::header(0, 2).kv_u32("a.b", 1).kv_u32("a.b", 2);
    let first_len = 8 + 3 + 4 + 4;
    assert_eq!(
        kind(&b),
        (K::DuplicateKey { key: "a.b".into() }, 24 + first_len)
    );
}

#[test]
fn alignment_zero_or_not_power_of_two() {
    for a in [0u32, 3, 48] {
        let b = Bytes::header(0, 1).kv_u32("general.alignment", a);
        assert_eq!(kind(&b).0, K::AlignmentValue { value: a.into() });
    }
    let b = Bytes::header(0, 1).kv_u32("general.alignment", 64);
    assert_eq!(parse(&b).unwrap().alignment(), 64);
}

#[test]
fn alignment_wrong_type() {
    let b = Bytes::header(0, 1).str("general.alignment").u32(10).u64(32);
    assert_eq!(
        kind(&b).0,
        K::AlignmentType {
            found: evod_gguf::ValueType::U64
        }
    );
    let b = Bytes::header(0, 1).kv_str("general.alignment", "32");
    assert!(matches!(kind(&b).0, K::AlignmentType { .. }));
}

#[test]
fn more_than_four_dims() {
    let b = Bytes::header(1, 0)
        .tensor("t", &[1, 1, 1, 1, 1], 0, 0)
        .pad(32)
        .zeros(32);
    assert_eq!(
        kind(&b),
        (
            K::TooManyDims {
                tensor: "t".into(),
                n_dims: 5
            },
            33
        )
    );
}

#[test]
fn zero_dim() {
    let b = Bytes::header(1, 0)
        .tensor("t", &[4, 0], 0, 0)
        .pad(32)
        .zeros(32);
    assert_eq!(
        kind(&b).0,
        K::BadDim {
            tensor: "t".into(),
            axis: 1,
            value: 0
        }
    );
}

#[test]
fn negative_dim() {
    let b = Bytes::header(1, 0).tensor("t", &[u64::MAX], 0, 0).pad(32);
    assert!(matches!(kind(&b).0, K::BadDim { axis: 0, .. }));
}

#[test]
fn element_count_overflow() {
    let b = Bytes::header(1, 0)
        .tensor("t", &[1 << 32, 1 << 32], 0, 0)
        .pad(32);
    assert!(matches!(kind(&b).0, K::SizeOverflow { .. }));
}

#[test]
fn byte_size_overflow() {
    // 2^62 f32 elements fit an i64 count but not an i64 byte size.
    let b = Bytes::header(1, 0)
        .tensor("t", &[1 << 31, 1 << 31], 0, 0)
        .pad(32);
    assert!(matches!(kind(&b).0, K::SizeOverflow { .. }));
}

#[test]
fn partial_quant_block() {
    let b = Bytes::header(1, 0)
        .tensor("q", &[33], 8, 0)
        .pad(32)
        .zeros(64);
    assert!(matches!(
        kind(&b).0,
        K::PartialBlock {
            dim0: 33,
            block: 32,
            ..
        }
    ));
}

#[test]
fn unknown_tensor_type() {
    let b = Bytes::header(1, 0)
        .tensor("t", &[4], 99, 0)
        .pad(32)
        .zeros(32);
    assert_eq!(
        kind(&b).0,
        K::UnknownTensorType {
            tensor: "t".into(),
            id: 99
        }
    );
}

#[test]
fn removed_tensor_types() {
    for (id, name) in [
        (4u32, "Q4_2"),
        (5, "Q4_3"),
        (31, "Q4_0_4_4"),
        (38, "IQ4_NL_8_8"),
    ] {
        let b = Bytes::header(1, 0)
            .tensor("t", &[32], id, 0)
            .pad(32)
            .zeros(64);
        assert_eq!(
            kind(&b).0,
            K::RemovedTensorType {
                tensor: "t".into(),
                id,
                name
            }
        );
    }
}

#[test]
fn every_known_tensor_type_parses() {
    for &t in evod_gguf::TensorType::ALL {
        let dims = [t.block_size() * 2, 3];
        let size = (t.type_size() * 6) as usize;
        let b = Bytes::header(1, 0)
            .tensor("t", &dims, t.id(), 0)
            .pad(32)
            .zeros(size);
        let h = parse(&b).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(h.tensors()[0].size, size as u64, "{t}");
    }
}

#[test]
fn duplicate_tensor_name() {
    let b = Bytes::header(2, 0)
        .tensor("t", &[8], 0, 0)
        .tensor("t", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    assert_eq!(kind(&b).0, K::DuplicateTensor { tensor: "t".into() });
}

#[test]
fn misaligned_tensor() {
    let b = Bytes::header(1, 0)
        .tensor("t", &[4], 0, 4)
        .pad(32)
        .zeros(64);
    assert_eq!(
        kind(&b).0,
        K::Misaligned {
            tensor: "t".into(),
            offset: 4,
            alignment: 32
        }
    );
}

#[test]
fn tensor_out_of_file() {
    // Data section holds 16 bytes; the tensor needs 32.
    let b = Bytes::header(1, 0)
        .tensor("t", &[8], 0, 0)
        .pad(32)
        .zeros(16);
    assert!(matches!(
        kind(&b),
        (
            K::OutOfFile {
                start: 0,
                end: 32,
                data_len: 16,
                ..
            },
            24
        )
    ));
    // Offset far past the end, and offset + size overflowing.
    for off in [1 << 40, u64::MAX - 31] {
        let b = Bytes::header(1, 0)
            .tensor("t", &[8], 0, off)
            .pad(32)
            .zeros(32);
        assert!(matches!(kind(&b).0, K::OutOfFile { .. }));
    }
    // Tensors declared but the file ends before the (padded) data section.
    let b = Bytes::header(1, 0).tensor("t", &[8], 0, 0);
    assert!(matches!(kind(&b).0, K::OutOfFile { data_len: 0, .. }));
}

#[test]
fn overlapping_tensors() {
    let b = Bytes::header(2, 0)
        .tensor("a", &[16], 0, 0)
        .tensor("b", &[8], 0, 32)
        .pad(32)
        .zeros(64);
    assert_eq!(
        kind(&b).0,
        K::Overlap {
            tensor: "b".into(),
            other: "a".into()
        }
    );
}

#[test]
fn error_message_names_file_offset_and_problem() {
    let b = Bytes::header(0, 2).kv_u32("x", 1).kv_u32("x", 2);
    let msg = parse(&b).unwrap_err().to_string();
    assert_eq!(msg, "hand.gguf: byte 41: duplicate metadata key \"x\"");
}

#[test]
fn open_reports_missing_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let e = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(e, GgufError::Open { .. }), "{e}");
    assert!(e.to_string().contains("nope.gguf"));
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let e = GgufFile::open(&empty).unwrap_err();
    assert!(
        matches!(
            e,
            GgufError::Parse {
                offset: 0,
                kind: K::Truncated { what: "magic", .. },
                ..
            }
        ),
        "{e}"
    );
}
