//! Properties of the `quant` codecs that need no reference implementation:
//! typed errors for bad input, error bounds of dequantize(quantize(x)) on
//! random and adversarial data, and which types make quantize(dequantize(q))
//! a fixed point (and which do not).

use evod_gguf::TensorType as T;
use evod_gguf::quant::{CODEC_TYPES, QuantError, check_row, dequantize, has_codec, quantize};

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

const BLOCK_TYPES: [T; 8] = [
    T::Q4_0,
    T::Q4_1,
    T::Q5_0,
    T::Q5_1,
    T::Q8_0,
    T::Q4_K,
    T::Q5_K,
    T::Q6_K,
];

/// The error bound of a round trip: |y - x| <= rel * amax + floor, with
/// amax the largest magnitude in x's 256-value span. `rel` is the format's
/// step relative to its range (measured on normal data, with margin);
/// `floor` is what f16 rounding of a subnormal scale can add: half an f16
/// quantum (2^-25) times the largest scale-level product the format stores.
fn bound(t: T) -> (f32, f32) {
    let q = 2f32.powi(-25);
    match t {
        T::Q4_0 => (0.13, 8.0 * q),
        T::Q4_1 => (0.07, 16.0 * q),
        T::Q5_0 => (0.066, 16.0 * q),
        T::Q5_1 => (0.035, 32.0 * q),
        T::Q8_0 => (0.005, 127.0 * q),
        // 6-bit scale (63) times the largest level, plus the 6-bit min.
        T::Q4_K => (0.1, (63.0 * 15.0 + 63.0) * q),
        T::Q5_K => (0.06, (63.0 * 31.0 + 63.0) * q),
        // 8-bit scale (127) times the largest level magnitude (32).
        T::Q6_K => (0.025, 127.0 * 32.0 * q),
        _ => unreachable!(),
    }
}

/// Asserts the round trip of `x` through `t` stays within [`bound`] and
/// returns the relative RMS error.
fn check_round_trip(t: T, x: &[f32], what: &str) -> f64 {
    let y = dequantize(t, &quantize(t, x).unwrap()).unwrap();
    assert_eq!(y.len(), x.len());
    let (rel, floor) = bound(t);
    let (mut se, mut sx) = (0f64, 0f64);
    for (s, (xb, yb)) in x.chunks(256).zip(y.chunks(256)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let limit = rel * amax + floor;
        for (i, (a, b)) in xb.iter().zip(yb).enumerate() {
            assert!(
                (a - b).abs() <= limit,
                "{t} {what}: value {} was {a}, came back {b}: error {} > {limit} (amax {amax})",
                s * 256 + i,
                (a - b).abs()
            );
            se += f64::from(a - b).powi(2);
            sx += f64::from(*a).powi(2);
        }
    }
    if sx == 0.0 { 0.0 } else { (se / sx).sqrt() }
}

#[test]
fn errors_are_typed_and_name_the_problem() {
    for t in T::ALL.iter().copied().filter(|t| !has_codec(*t)) {
        assert_eq!(dequantize(t, &[]), Err(QuantError::Unsupported(t)));
        assert_eq!(quantize(t, &[]), Err(QuantError::Unsupported(t)));
        assert_eq!(check_row(t, 256), Err(QuantError::Unsupported(t)));
    }
    assert_eq!(CODEC_TYPES.len(), 11);
    let e = dequantize(T::Q4_K, &[0; 145]).unwrap_err();
    assert_eq!(
        e,
        QuantError::BytesNotWholeBlocks {
            ttype: T::Q4_K,
            len: 145,
            type_size: 144
        }
    );
    assert_eq!(
        e.to_string(),
        "Q4_K: 145 bytes are not a whole number of 144-byte blocks"
    );
    assert!(matches!(
        dequantize(T::F32, &[0; 6]),
        Err(QuantError::BytesNotWholeBlocks { len: 6, .. })
    ));
    assert!(matches!(
        dequantize(T::BF16, &[0; 3]),
        Err(QuantError::BytesNotWholeBlocks { .. })
    ));
    let e = quantize(T::Q8_0, &[0.0; 48]).unwrap_err();
    assert_eq!(
        e,
        QuantError::ValuesNotWholeBlocks {
            ttype: T::Q8_0,
            len: 48,
            block_size: 32
        }
    );
    let e = check_row(T::Q6_K, 300).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Q6_K: a row of 300 values is not a multiple of the block size 256"
    );
    assert_eq!(check_row(T::Q6_K, 512), Ok(()));
    assert_eq!(check_row(T::F16, 7), Ok(()));
    // Empty input is zero blocks.
    assert_eq!(quantize(T::Q5_K, &[]), Ok(vec![]));
    assert_eq!(dequantize(T::Q5_K, &[]), Ok(vec![]));
}

#[test]
fn non_finite_values_are_refused_by_block_types() {
    for t in BLOCK_TYPES {
        let n = t.block_size() as usize * 2;
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = vec![0.5f32; n];
            x[n - 3] = bad;
            let e = quantize(t, &x).unwrap_err();
            assert!(
                matches!(e, QuantError::NonFinite { ttype, index, value }
                    if ttype == t && index == n - 3 && value.to_bits() == bad.to_bits()),
                "{t}: {e}"
            );
        }
    }
    // F16 and BF16 are casts: NaN and infinities are stored as such.
    for t in [T::F16, T::BF16] {
        let y = dequantize(t, &quantize(t, &[f32::NAN, f32::INFINITY, -1e30]).unwrap()).unwrap();
        assert!(y[0].is_nan() && y[1] == f32::INFINITY, "{t}: {y:?}");
    }
    let y = dequantize(T::F16, &quantize(T::F16, &[-1e30]).unwrap()).unwrap();
    assert_eq!(
        y,
        [f32::NEG_INFINITY],
        "F16 overflows to infinity as numpy does"
    );
}

#[test]
fn values_too_large_for_the_f16_scales_are_refused() {
    // Just over each type's limit (its f16 scale or min would be infinite)
    // and far beyond it; the second block is the culprit.
    let cases: [(T, &[f32]); 8] = [
        (T::Q4_0, &[6e5, 1e9, 3e38]),
        (T::Q4_1, &[-7e4, 1e7, 3e38]),
        (T::Q5_0, &[1.1e6, 1e9]),
        (T::Q5_1, &[-7e4, 7e4, 3e38]),
        (T::Q8_0, &[8.4e6, 1e12]),
        (T::Q4_K, &[7e7, -4.2e6, 1e12, 3e38]),
        (T::Q5_K, &[1.4e8, -4.2e6, 1e12, 3e38]),
        (T::Q6_K, &[3e8, 1e12, 3e38]),
    ];
    for (t, values) in cases {
        let bs = t.block_size() as usize;
        for &v in values {
            let mut x: Vec<f32> = (0..2 * bs).map(|i| (i % 7) as f32 - 3.0).collect();
            x[bs..].iter_mut().for_each(|x| *x = v);
            let e = quantize(t, &x).unwrap_err();
            assert!(
                matches!(e, QuantError::ScaleOverflow { ttype, block: 1, first } if ttype == t && first == bs),
                "{t} at {v}: {e}"
            );
        }
    }
    // The largest magnitudes below the limits still work.
    let ok: [(T, f32); 8] = [
        (T::Q4_0, 5e5),
        (T::Q4_1, 6.5e4),
        (T::Q5_0, 1e6),
        (T::Q5_1, 6.5e4),
        (T::Q8_0, 8e6),
        (T::Q4_K, 4e6),
        (T::Q5_K, 4e6),
        (T::Q6_K, 2e8),
    ];
    let mut rng = Rng(3);
    for (t, amax) in ok {
        let x: Vec<f32> = (0..1024).map(|_| (rng.unit() * 2.0 - 1.0) * amax).collect();
        check_round_trip(t, &x, &format!("near the limit {amax}"));
        // Positive values only have no min to store: K-quants take more.
        if matches!(t, T::Q4_K | T::Q5_K) {
            let x: Vec<f32> = (0..1024).map(|_| rng.unit() * amax * 10.0).collect();
            check_round_trip(t, &x, &format!("positive up to {}", amax * 10.0));
        }
    }
}

#[test]
fn round_trip_error_is_bounded_on_random_data() {
    // Relative RMS error on normal data, per type: what the format gives
    // (ggml's own figures are of the same order).
    let rms_limit = |t: T| match t {
        T::Q4_0 => 0.095,
        T::Q4_1 => 0.085,
        T::Q5_0 => 0.047,
        T::Q5_1 => 0.042,
        T::Q8_0 => 0.006,
        T::Q4_K => 0.078,
        T::Q5_K => 0.04,
        T::Q6_K => 0.02,
        _ => unreachable!(),
    };
    let mut rng = Rng(14);
    for t in BLOCK_TYPES {
        for scale in [1e-2f32, 1.0, 1e2, 1e4] {
            let x: Vec<f32> = (0..256 * 128).map(|_| rng.normal() * scale).collect();
            let rms = check_round_trip(t, &x, &format!("normal * {scale}"));
            assert!(
                rms <= rms_limit(t),
                "{t} at {scale}: relative RMS error {rms}"
            );
            let x: Vec<f32> = (0..256 * 32)
                .map(|_| (rng.unit() * 3.0 - 1.0) * scale)
                .collect();
            check_round_trip(t, &x, &format!("uniform * {scale}"));
        }
    }
}

#[test]
fn round_trip_error_is_bounded_on_adversarial_data() {
    let mut rng = Rng(7);
    for t in BLOCK_TYPES {
        // All zero (either sign) comes back exactly zero.
        for z in [0.0f32, -0.0] {
            let y = dequantize(t, &quantize(t, &[z; 512]).unwrap()).unwrap();
            assert!(y.iter().all(|v| *v == 0.0), "{t}: zeros came back {y:?}");
        }
        // Constants: exactly representable ones come back exact for the
        // types with a min; every one within the bound.
        for c in [1.0f32, -1.0, 0.37, -5.25, 1000.0, 1e-7, -3e-30] {
            check_round_trip(t, &[c; 512], &format!("constant {c}"));
        }
        // Tiny magnitudes, down to f32 subnormals: the scales go subnormal
        // in f16 or to zero, the error stays under the floor.
        for scale in [1e-4f32, 1e-5, 1e-6, 1e-8, 1e-20, 1e-40] {
            let x: Vec<f32> = (0..1024).map(|_| rng.normal() * scale).collect();
            check_round_trip(t, &x, &format!("tiny {scale}"));
        }
        // One outlier per block among small values, at either sign.
        let mut x: Vec<f32> = (0..2048).map(|_| rng.normal() * 1e-3).collect();
        for (i, v) in x.iter_mut().enumerate().step_by(97) {
            *v = if i % 2 == 0 { 50.0 } else { -50.0 };
        }
        check_round_trip(t, &x, "outliers");
        // Ties of largest magnitude with both signs; one-sided blocks.
        let x: Vec<f32> = (0..1024)
            .map(|i| match i % 32 {
                0 => 2.0,
                1 => -2.0,
                _ => rng.normal() * 0.5,
            })
            .collect();
        check_round_trip(t, &x, "ties");
        let x: Vec<f32> = (0..1024).map(|_| rng.normal().abs() + 100.0).collect();
        check_round_trip(t, &x, "all positive, offset");
        let x: Vec<f32> = (0..1024).map(|_| -rng.normal().abs() - 0.001).collect();
        check_round_trip(t, &x, "all negative");
    }
    // Exactly representable constants are exact where the format has a min.
    for t in [T::Q4_1, T::Q5_1] {
        let y = dequantize(t, &quantize(t, &[-5.25; 64]).unwrap()).unwrap();
        assert!(y.iter().all(|v| *v == -5.25), "{t}: {y:?}");
    }
}

/// How many blocks of `q` (encoded `t`) change when dequantized and
/// quantized again.
fn moved_blocks(t: T, q: &[u8]) -> usize {
    let again = quantize(t, &dequantize(t, q).unwrap()).unwrap();
    let ts = t.type_size() as usize;
    q.chunks(ts)
        .zip(again.chunks(ts))
        .filter(|(a, b)| a != b)
        .count()
}

#[test]
fn quantize_of_dequantize_is_a_fixed_point_for_the_32_value_types() {
    // For Q4_0, Q5_0 the level 0 (value -8d or -16d) is the unique largest
    // magnitude, so re-quantizing finds the same d; for Q4_1, Q5_1 the
    // levels 0 and the top one are present, so the same min and d; for Q8_0
    // a level ±127 is present. Holds for every block the quantizer makes
    // whose f16 scale did not round to zero.
    let mut rng = Rng(21);
    for t in [T::Q4_0, T::Q4_1, T::Q5_0, T::Q5_1, T::Q8_0] {
        for scale in [1e-3f32, 1e-1, 1.0, 10.0, 1e3] {
            let x: Vec<f32> = (0..32 * 1024)
                .map(|i| match i / 8192 {
                    0 => rng.normal(),
                    1 => rng.unit(),
                    2 => rng.normal().abs() + 3.0,
                    _ => -rng.unit() * 0.1 - 2.0,
                } * scale)
                .collect();
            let q = quantize(t, &x).unwrap();
            assert_eq!(moved_blocks(t, &q), 0, "{t} at {scale}");
        }
        // A large offset with a small spread (f32 rounds the dequantized
        // values more coarsely than the levels) still comes back.
        let x: Vec<f32> = (0..32 * 256)
            .map(|i| 1000.0 + 0.01 * (((i * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        assert_eq!(moved_blocks(t, &quantize(t, &x).unwrap()), 0, "{t} offset");
        // Not every byte string is a fixed point: a block the quantizer
        // would not make (scale 1, min 1, levels 6, 7, 22, 23 or 103: no
        // extreme level) moves.
        let mut raw = vec![0x67u8; t.type_size() as usize];
        let scales = if matches!(t, T::Q4_1 | T::Q5_1) { 4 } else { 2 };
        raw[..scales].copy_from_slice(&[0x00, 0x3c, 0x00, 0x3c][..scales]);
        assert_eq!(moved_blocks(t, &raw), 1, "{t}: {raw:02x?}");
    }
    // F32 and F16 keep every bit pattern; BF16 every one but signalling NaNs
    // (made quiet, as ggml does).
    let all16: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
    assert_eq!(
        quantize(T::F16, &dequantize(T::F16, &all16).unwrap()),
        Ok(all16.clone())
    );
    let bf = quantize(T::BF16, &dequantize(T::BF16, &all16).unwrap()).unwrap();
    for h in 0..=u16::MAX {
        let back = u16::from_le_bytes([bf[2 * h as usize], bf[2 * h as usize + 1]]);
        let snan = h & 0x7f80 == 0x7f80 && h & 0x7f != 0 && h & 0x40 == 0;
        if snan {
            assert_eq!(back, h | 0x40, "{h:#06x}");
        } else {
            assert_eq!(back, h, "{h:#06x}");
        }
    }
    let f: Vec<u8> = (0..4096u32)
        .flat_map(|i| (i.wrapping_mul(0x9e37_79b9)).to_le_bytes())
        .collect();
    assert_eq!(quantize(T::F32, &dequantize(T::F32, &f).unwrap()), Ok(f));
}

#[test]
fn k_quants_are_not_fixed_points_but_stay_within_their_bound() {
    // make_qkx2_quants / make_qx_quants re-fit the scales (and mins) by
    // least squares over a grid of trial scales, and the 6- or 8-bit
    // sub-block scales are re-quantized against the new largest one: the
    // fit to values already on a grid can pick another grid. Requantizing
    // then moves values by at most the format's error bound.
    let mut rng = Rng(33);
    let x: Vec<f32> = (0..256 * 512)
        .map(|i| match i / (256 * 128) {
            0 => rng.normal(),
            1 => rng.normal().abs() + 5.0,
            2 => rng.unit() * 2.0 - 0.3,
            _ => rng.normal() * (1.0 + (i % 256) as f32),
        })
        .collect();
    for t in [T::Q4_K, T::Q5_K, T::Q6_K] {
        let q = quantize(t, &x).unwrap();
        let moved = moved_blocks(t, &q);
        assert!(moved > 0, "{t}: every block was a fixed point");
        let y = dequantize(t, &q).unwrap();
        check_round_trip(t, &y, "requantized");
    }
}

#[test]
fn large_inputs_split_over_threads_encode_as_one() {
    // Past 2^18 values `quantize` splits the blocks over threads; the bytes
    // are those of quantizing each piece alone, and an overflow names the
    // first bad block of the whole input.
    let mut rng = Rng(99);
    for t in [T::Q4_K, T::Q8_0, T::F16] {
        let x: Vec<f32> = (0..(1 << 19) + 256 * 3).map(|_| rng.normal()).collect();
        let whole = quantize(t, &x).unwrap();
        let cut = 256 * 1000;
        let mut pieces = quantize(t, &x[..cut]).unwrap();
        pieces.extend(quantize(t, &x[cut..]).unwrap());
        assert!(whole == pieces, "{t}: threaded bytes differ");
    }
    let mut x: Vec<f32> = (0..1 << 19).map(|_| rng.normal()).collect();
    let (late, early) = ((1 << 19) - 100, 1000);
    x[late] = 1e9;
    x[early] = -1e9;
    assert_eq!(
        quantize(T::Q4_0, &x),
        Err(QuantError::ScaleOverflow {
            ttype: T::Q4_0,
            block: early / 32,
            first: early / 32 * 32
        })
    );
}
