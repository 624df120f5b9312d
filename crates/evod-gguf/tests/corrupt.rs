//! Property test: corrupted valid files (bit flips, truncation, rewritten
//! length and count fields, random bytes) never panic the parser and never
//! make it allocate more than a small multiple of the file's size, measured
//! by a counting global allocator. This file holds a single test so that no
//! other test thread allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use evod_gguf::{Array, GgufFile, PublishOptions, TensorSpec, TensorType, Value, ValueType};
use proptest::prelude::*;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes of memory the parser may use per byte of input (a `Value` is 32
/// bytes for a 1-byte `u8` element) plus a fixed allowance.
const PER_BYTE: usize = 48;
const FIXED: usize = 64 * 1024;

/// A valid file with strings, arrays (incl. nested and string arrays),
/// several tensors and a custom alignment.
fn sample() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.gguf");
    let arr = |t, v| {
        Value::Array(Array {
            elem_type: t,
            values: v,
        })
    };
    let meta = vec![
        ("general.alignment".to_owned(), Value::U32(64)),
        ("general.name".to_owned(), Value::String("sample".into())),
        (
            "u8s".to_owned(),
            arr(ValueType::U8, (0..40).map(Value::U8).collect()),
        ),
        (
            "strs".to_owned(),
            arr(
                ValueType::String,
                (0..10).map(|i| Value::String(format!("t{i}"))).collect(),
            ),
        ),
        (
            "nest".to_owned(),
            arr(
                ValueType::Array,
                vec![arr(ValueType::I32, vec![Value::I32(1)])],
            ),
        ),
        ("f".to_owned(), Value::F64(1.5)),
    ];
    let specs = vec![
        TensorSpec {
            name: "a".into(),
            dims: vec![8, 2],
            ttype: TensorType::F32,
        },
        TensorSpec {
            name: "b".into(),
            dims: vec![32],
            ttype: TensorType::Q8_0,
        },
        TensorSpec {
            name: "c".into(),
            dims: vec![3],
            ttype: TensorType::F16,
        },
    ];
    evod_gguf::publish(
        &path,
        &meta,
        &specs,
        |i, w| {
            let s = &specs[i];
            w.write_all(&vec![
                i as u8 + 1;
                s.ttype.byte_size(&s.dims).unwrap() as usize
            ])
        },
        &PublishOptions::default(),
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

/// Parses `bytes`, returning the peak extra memory it used; panics escape.
fn parse_measured(bytes: &[u8]) -> usize {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = GgufFile::parse("fuzz.gguf", bytes);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    if let Ok(h) = &result {
        // Whatever parses must be internally consistent.
        for t in h.tensors() {
            assert!(h.data_offset() + t.offset + t.size <= bytes.len() as u64);
            assert_eq!(h.tensor_bytes_in(bytes, t).len() as u64, t.size);
            let _ = h.tensor_f32_in(bytes, t);
        }
    }
    drop(result);
    peak
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    /// Overwrite 8 bytes at an offset with a chosen u64 (length/count fields).
    Field(usize, u64),
    /// Overwrite 4 bytes (type ids, n_dims).
    Field32(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 63),
        Just(u64::from(u32::MAX)),
        0u64..1024,
        any::<u64>(),
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), big).prop_map(|(i, v)| Mutation::Field(i, v)),
        (any::<usize>(), prop_oneof![0u32..64, any::<u32>()])
            .prop_map(|(i, v)| Mutation::Field32(i, v)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip(i, b) => bytes[i % n] ^= 1 << b,
        Mutation::Truncate(i) => bytes.truncate(i % n),
        Mutation::Field(i, v) => {
            let i = i % n.saturating_sub(8).max(1);
            let end = (i + 8).min(n);
            bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        Mutation::Field32(i, v) => {
            let i = i % n.saturating_sub(4).max(1);
            let end = (i + 4).min(n);
            bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
    }
}

#[test]
fn corrupted_files_never_panic_and_memory_stays_bounded() {
    let valid = sample();
    assert!(parse_measured(&valid) > 0);
    assert!(GgufFile::parse("v", &valid).is_ok());
    // The worst legitimate ratio: one huge u8 array (a 32-byte Value per byte).
    let n = 1u64 << 20;
    let mut big = b"GGUF\x03\0\0\0".to_vec();
    big.extend_from_slice(&0u64.to_le_bytes());
    big.extend_from_slice(&1u64.to_le_bytes());
    big.extend_from_slice(&1u64.to_le_bytes());
    big.push(b'k');
    big.extend_from_slice(&9u32.to_le_bytes());
    big.extend_from_slice(&0u32.to_le_bytes());
    big.extend_from_slice(&n.to_le_bytes());
    big.resize(big.len() + n as usize, 7);
    let peak = parse_measured(&big);
    assert!(peak >= n as usize, "the array was materialised ({peak})");
    assert!(
        peak <= PER_BYTE * big.len() + FIXED,
        "peak {peak} for {} bytes",
        big.len()
    );
    let config = ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(muts in prop::collection::vec(mutation(), 1..6), junk in prop::collection::vec(any::<u8>(), 0..256))| {
        let mut bytes = valid.clone();
        for m in &muts {
            if bytes.is_empty() { break; }
            apply(&mut bytes, m);
        }
        let peak = parse_measured(&bytes);
        prop_assert!(peak <= PER_BYTE * bytes.len() + FIXED, "peak {} for {} bytes", peak, bytes.len());
        // Random bytes behind a valid magic and version.
        let mut raw = b"GGUF\x03\0\0\0".to_vec();
        raw.extend_from_slice(&junk);
        let peak = parse_measured(&raw);
        prop_assert!(peak <= PER_BYTE * raw.len() + FIXED, "peak {} for {} bytes", peak, raw.len());
    });
}
