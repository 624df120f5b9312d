//! The 32-value block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: ggml's
//! `dequantize_row_*` and `quantize_row_*_ref`, in gguf-py 0.19's reading
//! where the two differ (the first of equal largest magnitudes sets a Q4_0 or
//! Q5_0 scale's sign; quantized levels are clamped to the type's range).
//!
//! Layouts (bytes): Q4_0 `d:f16, qs[16]`; Q4_1 `d:f16, m:f16, qs[16]`;
//! Q5_0 `d:f16, qh:u32, qs[16]`; Q5_1 `d:f16, m:f16, qh:u32, qs[16]`;
//! Q8_0 `d:f16, qs:i8[32]`. In `qs`, byte j holds element j in its low
//! nibble and element j + 16 in its high nibble; bit j of `qh` is bit 4 of
//! element j.

use super::{f16_at, put_f16};

/// The first value of largest magnitude (numpy's `argmax` of `abs`).
#[inline(always)]
fn signed_absmax(v: &[f32]) -> f32 {
    let mut max = v[0];
    let mut amax = v[0].abs();
    for &x in &v[1..] {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    max
}

#[inline(always)]
fn min_max(v: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &x in v {
        if x < min {
            min = x;
        }
        if x > max {
            max = x;
        }
    }
    (min, max)
}

#[inline(always)]
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

pub(super) fn dec_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = d * (i32::from(q & 0x0f) - 8) as f32;
        hi[j] = d * (i32::from(q >> 4) - 8) as f32;
    }
}

pub(super) fn enc_q4_0(v: &[f32], out: &mut [u8]) -> bool {
    let max = signed_absmax(v);
    let d = max / -8.0;
    let id = inverse(d);
    let ok = put_f16(out, 0, d);
    for j in 0..16 {
        let q0 = ((v[j] * id + 8.5) as u8).min(15);
        let q1 = ((v[j + 16] * id + 8.5) as u8).min(15);
        out[2 + j] = q0 | (q1 << 4);
    }
    ok
}

pub(super) fn dec_q4_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = d * f32::from(q & 0x0f) + m;
        hi[j] = d * f32::from(q >> 4) + m;
    }
}

pub(super) fn enc_q4_1(v: &[f32], out: &mut [u8]) -> bool {
    let (min, max) = min_max(v);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    let ok = put_f16(out, 0, d) & put_f16(out, 2, min);
    for j in 0..16 {
        let q0 = (((v[j] - min) * id + 0.5) as u8).min(15);
        let q1 = (((v[j + 16] - min) * id + 0.5) as u8).min(15);
        out[4 + j] = q0 | (q1 << 4);
    }
    ok
}

#[inline(always)]
fn qh_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

pub(super) fn dec_q5_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = qh_at(b, 2);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[6..22].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = d * ((u32::from(q & 0x0f) | h0) as i32 - 16) as f32;
        hi[j] = d * ((u32::from(q >> 4) | h1) as i32 - 16) as f32;
    }
}

pub(super) fn enc_q5_0(v: &[f32], out: &mut [u8]) -> bool {
    let max = signed_absmax(v);
    let d = max / -16.0;
    let id = inverse(d);
    let ok = put_f16(out, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((v[j] * id + 16.5) as u8).min(31);
        let q1 = ((v[j + 16] * id + 16.5) as u8).min(31);
        out[6 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + 16);
    }
    out[2..6].copy_from_slice(&qh.to_le_bytes());
    ok
}

pub(super) fn dec_q5_1(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = qh_at(b, 4);
    let (lo, hi) = out.split_at_mut(16);
    for (j, &q) in b[8..24].iter().enumerate() {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        lo[j] = d * (u32::from(q & 0x0f) | h0) as f32 + m;
        hi[j] = d * (u32::from(q >> 4) | h1) as f32 + m;
    }
}

pub(super) fn enc_q5_1(v: &[f32], out: &mut [u8]) -> bool {
    let (min, max) = min_max(v);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    let ok = put_f16(out, 0, d) & put_f16(out, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = (((v[j] - min) * id + 0.5) as u8).min(31);
        let q1 = (((v[j + 16] - min) * id + 0.5) as u8).min(31);
        out[8 + j] = (q0 & 0x0f) | ((q1 & 0x0f) << 4);
        qh |= u32::from(q0 >> 4) << j;
        qh |= u32::from(q1 >> 4) << (j + 16);
    }
    out[4..8].copy_from_slice(&qh.to_le_bytes());
    ok
}

pub(super) fn dec_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

pub(super) fn enc_q8_0(v: &[f32], out: &mut [u8]) -> bool {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let ok = put_f16(out, 0, d);
    for (o, &x) in out[2..34].iter_mut().zip(v) {
        // `round` rounds halves away from zero, as ggml's `roundf`.
        *o = ((x * id).round() as i8) as u8;
    }
    ok
}
