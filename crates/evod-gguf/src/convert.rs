//! Tensor bytes to f32 for the reader: a zero-copy view of aligned
//! little-endian F32 data, every other type with a codec through
//! [`crate::quant`].

use std::borrow::Cow;

use crate::quant;
use crate::types::TensorType;

/// Converts `bytes` of type `ttype` to f32, or `None` for a type without a
/// codec (see [`crate::quant`]). `bytes.len()` should be a whole number of
/// blocks (the reader guarantees it); a trailing partial block is ignored.
pub fn to_f32(bytes: &[u8], ttype: TensorType) -> Option<Cow<'_, [f32]>> {
    if ttype == TensorType::F32 {
        return Some(f32_view(bytes));
    }
    let whole = bytes.len() - bytes.len() % ttype.type_size() as usize;
    quant::dequantize(ttype, &bytes[..whole])
        .ok()
        .map(Cow::Owned)
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

/// Quantizes to Q8_0 with ggml's reference rounding (`n` a multiple of 32;
/// a trailing partial block is ignored); used by tests and tools that need
/// quantized fixtures. Non-finite values or a scale beyond f16 give an empty
/// vector: [`crate::quant::quantize`] says why.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let whole = values.len() - values.len() % 32;
    quant::quantize(TensorType::Q8_0, &values[..whole]).unwrap_or_default()
}
