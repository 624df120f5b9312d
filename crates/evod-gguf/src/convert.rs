//! Tensor bytes to f32: a zero-copy view of aligned little-endian F32 data,
//! conversions for F16, BF16, Q8_0 and Q4_0 (ggml's reference dequantizers).

use std::borrow::Cow;

use half::{bf16, f16};

use crate::types::TensorType;

/// Converts `bytes` of type `ttype` to f32, or `None` for a type this crate
/// does not convert. `bytes.len()` must be a whole number of blocks (the
/// reader guarantees it); a trailing partial block is ignored.
pub fn to_f32(bytes: &[u8], ttype: TensorType) -> Option<Cow<'_, [f32]>> {
    Some(match ttype {
        TensorType::F32 => f32_view(bytes),
        TensorType::F16 => Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        TensorType::BF16 => Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        TensorType::Q8_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 34 * 32);
            for block in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
            Cow::Owned(out)
        }
        TensorType::Q4_0 => {
            let mut out = Vec::with_capacity(bytes.len() / 18 * 32);
            for block in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                let qs = &block[2..];
                // Low nibbles are elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (i32::from(q & 0x0f) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
            Cow::Owned(out)
        }
        _ => return None,
    })
}

#[cfg(target_endian = "little")]
fn f32_view(bytes: &[u8]) -> Cow<'_, [f32]> {
    // SAFETY: every bit pattern is a valid f32, and `align_to` only puts
    // correctly aligned, whole f32s in the middle slice.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    if head.is_empty() && tail.is_empty() {
        Cow::Borrowed(mid)
    } else {
        f32_copy(bytes)
    }
}

#[cfg(not(target_endian = "little"))]
fn f32_view(bytes: &[u8]) -> Cow<'_, [f32]> {
    f32_copy(bytes)
}

fn f32_copy(bytes: &[u8]) -> Cow<'_, [f32]> {
    Cow::Owned(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Quantizes to Q8_0 with ggml's reference rounding (`n` a multiple of 32);
/// used by tests and tools that need quantized fixtures.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| ((v * id).round() as i8) as u8));
    }
    out
}
