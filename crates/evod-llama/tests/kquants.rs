//! evod-gguf's quantizers against the ggml compiled into this crate
//! (`ggml_quantize_chunk` without an importance matrix, which is ggml's
//! `quantize_row_*_ref` for these types), bit for bit on random rows.
//! Only with the `llm` feature.
#![cfg(feature = "llm")]

use evod_gguf::TensorType;
use llama_cpp_sys_2 as sys;

/// Rows of varied magnitude: normal values times a per-row scale, with
/// some zero and some tiny sub-blocks.
fn rows(n_rows: usize, n_per_row: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n_rows * n_per_row);
    for r in 0..n_rows {
        let scale = [1.0, 0.01, 37.0, 1e-4, 3.0][r % 5] as f32;
        for i in 0..n_per_row {
            // Box-Muller.
            let (u, v) = (next().max(1e-300), next());
            let g = ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32;
            let block = i / 32;
            let x = match (r + block) % 11 {
                0 => 0.0,
                1 => g * 1e-9,
                _ => g * scale,
            };
            out.push(x);
        }
    }
    out
}

fn ggml(ttype: sys::ggml_type, values: &[f32], n_per_row: usize) -> Vec<u8> {
    let n_rows = values.len() / n_per_row;
    // SAFETY: pure size queries.
    let row_size = unsafe { sys::ggml_row_size(ttype, n_per_row as i64) };
    let mut dst = vec![0u8; row_size * n_rows];
    // SAFETY: `values` holds n_rows * n_per_row floats; `dst` has room for
    // n_rows rows of this type; no importance matrix.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ttype,
            values.as_ptr(),
            dst.as_mut_ptr().cast(),
            0,
            n_rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    assert_eq!(written, dst.len());
    dst
}

#[test]
fn quantizers_match_compiled_ggml_bit_for_bit() {
    let n_per_row = 512;
    let mut report = Vec::new();
    for (ours, theirs, block_bytes) in [
        (TensorType::Q4_K, sys::GGML_TYPE_Q4_K, 144),
        (TensorType::Q5_K, sys::GGML_TYPE_Q5_K, 176),
        (TensorType::Q6_K, sys::GGML_TYPE_Q6_K, 210),
        (TensorType::Q8_0, sys::GGML_TYPE_Q8_0, 34),
        (TensorType::Q4_0, sys::GGML_TYPE_Q4_0, 18),
        (TensorType::Q4_1, sys::GGML_TYPE_Q4_1, 20),
        (TensorType::Q5_0, sys::GGML_TYPE_Q5_0, 22),
        (TensorType::Q5_1, sys::GGML_TYPE_Q5_1, 24),
    ] {
        let values = rows(40, n_per_row, 0x5eed ^ theirs as u64);
        let a = evod_gguf::quantize(ours, &values).unwrap();
        let b = ggml(theirs, &values, n_per_row);
        assert_eq!(a.len(), b.len(), "{ours}");
        let blocks = a.len() / block_bytes;
        let differing = a
            .chunks(block_bytes)
            .zip(b.chunks(block_bytes))
            .filter(|(x, y)| x != y)
            .count();
        report.push(format!("{ours}: {differing}/{blocks} blocks differ"));
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        report
            .iter()
            .all(|r| r.starts_with(|_: char| true) && r.contains(": 0/")),
        "{report:#?}"
    );
}
