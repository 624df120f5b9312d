//! The plain float types: F32 (little-endian copy), F16 (numpy's
//! conversions: round to nearest even, NaN payloads kept) and BF16 (ggml's
//! `ggml_compute_fp32_to_bf16`, as gguf-py transcribes it).

use std::sync::OnceLock;

use half::f16;

/// f16 bits to f32 as numpy converts them: exact, NaN payload kept as is
/// (no quiet bit forced).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    if h & 0x7c00 == 0x7c00 && h & 0x03ff != 0 {
        return f32::from_bits(((h & 0x8000) << 16) | 0x7f80_0000 | ((h & 0x03ff) << 13));
    }
    f16::from_bits(h as u16).to_f32()
}

/// f32 to f16 bits as numpy's `astype(np.float16)`: round to nearest even,
/// overflow to infinity; a NaN keeps the top 10 payload bits (at least one
/// set, so it stays a NaN).
#[inline(always)]
pub(crate) fn f32_to_f16(v: f32) -> u16 {
    if v.is_nan() {
        let f = v.to_bits();
        let sign = ((f >> 16) & 0x8000) as u16;
        let mut h = 0x7c00 | ((f & 0x007f_ffff) >> 13) as u16;
        if h == 0x7c00 {
            h += 1;
        }
        return sign | h;
    }
    f16::from_f32(v).to_bits()
}

/// Every f16 bit pattern as f32 (256 KiB, built on first use).
fn f16_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(f16_to_f32).collect())
}

pub(super) fn dec_f32(b: &[u8], out: &mut [f32]) {
    for (c, o) in b.chunks_exact(4).zip(out) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(super) fn enc_f32(v: &[f32], out: &mut [u8]) -> bool {
    for (x, o) in v.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    true
}

pub(super) fn dec_f16(b: &[u8], out: &mut [f32]) {
    let t = f16_table();
    for (c, o) in b.chunks_exact(2).zip(out) {
        *o = t[usize::from(u16::from_le_bytes([c[0], c[1]]))];
    }
}

pub(super) fn enc_f16(v: &[f32], out: &mut [u8]) -> bool {
    for (x, o) in v.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_f16(*x).to_le_bytes());
    }
    true
}

pub(super) fn dec_bf16(b: &[u8], out: &mut [f32]) {
    for (c, o) in b.chunks_exact(2).zip(out) {
        *o = f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16);
    }
}

/// ggml's `ggml_compute_fp32_to_bf16`: a NaN is made quiet (top 16 bits
/// kept, bit 22 set), anything else rounds to nearest even (overflowing to
/// infinity).
#[inline(always)]
pub(crate) fn f32_to_bf16(v: f32) -> u16 {
    let n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        return ((n >> 16) | 64) as u16;
    }
    ((u64::from(n) + (0x7fff + u64::from((n >> 16) & 1))) >> 16) as u16
}

pub(super) fn enc_bf16(v: &[f32], out: &mut [u8]) -> bool {
    for (x, o) in v.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&f32_to_bf16(*x).to_le_bytes());
    }
    true
}
