//! Codecs between f32 and ggml's tensor encodings, both ways: F32, F16,
//! BF16, the 32-value blocks Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the 256-value
//! K-quant super-blocks Q4_K, Q5_K, Q6_K.
//!
//! - [`dequantize`] is bit-exact with gguf-py's `gguf.quants.dequantize`
//!   (gguf 0.19), which computes what ggml's `dequantize_row_*` computes, in
//!   the same order of f32 operations (no fused multiply-add).
//! - [`quantize`] for F16, BF16 and the 32-value blocks is bit-exact with
//!   gguf-py's `gguf.quants.quantize` (ggml's `quantize_row_*_ref`); for the
//!   K-quants, which gguf-py cannot quantize, it is ggml's
//!   `quantize_row_q{4,5,6}_K_ref` transcribed operation by operation
//!   (`kquants.rs`).
//! - Bad input is a [`QuantError`], never a panic: a type without a codec,
//!   bytes or values that are not a whole number of blocks, a value that is
//!   not finite, a block whose scale does not fit in f16.
//!
//! `docs/quantization.md` has the layouts, the round-trip properties each
//! type has (and which it lacks, and why) and the measured speeds.

mod float;
mod kquants;
mod legacy;

use crate::types::TensorType;

pub(crate) use float::{f16_to_f32, f32_to_f16};

/// Why a conversion was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// No codec for this type (the i-quants, Q2_K, Q3_K, ...).
    #[error(
        "{0}: no codec for this tensor type (evod converts F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"
    )]
    Unsupported(TensorType),
    /// The encoded bytes are not a whole number of blocks.
    #[error("{ttype}: {len} bytes are not a whole number of {type_size}-byte blocks")]
    BytesNotWholeBlocks {
        /// The type.
        ttype: TensorType,
        /// Bytes given.
        len: usize,
        /// Bytes per block.
        type_size: usize,
    },
    /// The values to quantize are not a whole number of blocks.
    #[error("{ttype}: {len} values are not a whole number of {block_size}-value blocks")]
    ValuesNotWholeBlocks {
        /// The type.
        ttype: TensorType,
        /// Values given.
        len: usize,
        /// Values per block.
        block_size: usize,
    },
    /// A tensor row is not a whole number of blocks (a block would straddle
    /// two rows).
    #[error("{ttype}: a row of {row_len} values is not a multiple of the block size {block_size}")]
    RowNotWholeBlocks {
        /// The type.
        ttype: TensorType,
        /// The row length (`dims[0]`).
        row_len: u64,
        /// Values per block.
        block_size: usize,
    },
    /// A value to quantize into a block type is NaN or infinite (F16 and
    /// BF16 store such values as they are).
    #[error("{ttype}: value {index} is {value}; only finite values can be quantized")]
    NonFinite {
        /// The type.
        ttype: TensorType,
        /// Index of the first such value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A block's values are too large for the type: its scale (or min)
    /// would not fit in an f16.
    #[error(
        "{ttype}: block {block} (values {first}..) is too large for this type: its f16 scale or min would overflow"
    )]
    ScaleOverflow {
        /// The type.
        ttype: TensorType,
        /// Index of the block.
        block: usize,
        /// Index of the block's first value.
        first: usize,
    },
}

/// Every type with a codec, in id order.
pub const CODEC_TYPES: &[TensorType] = &[
    TensorType::F32,
    TensorType::F16,
    TensorType::Q4_0,
    TensorType::Q4_1,
    TensorType::Q5_0,
    TensorType::Q5_1,
    TensorType::Q8_0,
    TensorType::Q4_K,
    TensorType::Q5_K,
    TensorType::Q6_K,
    TensorType::BF16,
];

/// Whether [`dequantize`] and [`quantize`] handle `ttype`.
pub fn has_codec(ttype: TensorType) -> bool {
    CODEC_TYPES.contains(&ttype)
}

/// Decodes one unit (a block, or a run of plain values) into its values.
type Decode = fn(&[u8], &mut [f32]);
/// Encodes one unit; `false` when the block's scale overflowed f16.
type Encode = fn(&[f32], &mut [u8]) -> bool;

/// A type's codec.
#[derive(Clone, Copy)]
struct Codec {
    dec: Decode,
    enc: Encode,
    /// Whether values must be finite (block types; F16/BF16 are casts).
    finite_only: bool,
}

fn codec(ttype: TensorType) -> Result<Codec, QuantError> {
    use TensorType as T;
    let (dec, enc, finite_only): (Decode, Encode, bool) = match ttype {
        T::F32 => (float::dec_f32, float::enc_f32, false),
        T::F16 => (float::dec_f16, float::enc_f16, false),
        T::BF16 => (float::dec_bf16, float::enc_bf16, false),
        T::Q4_0 => (legacy::dec_q4_0, legacy::enc_q4_0, true),
        T::Q4_1 => (legacy::dec_q4_1, legacy::enc_q4_1, true),
        T::Q5_0 => (legacy::dec_q5_0, legacy::enc_q5_0, true),
        T::Q5_1 => (legacy::dec_q5_1, legacy::enc_q5_1, true),
        T::Q8_0 => (legacy::dec_q8_0, legacy::enc_q8_0, true),
        T::Q4_K => (kquants::dec_q4_k, kquants::enc_q4_k, true),
        T::Q5_K => (kquants::dec_q5_k, kquants::enc_q5_k, true),
        T::Q6_K => (kquants::dec_q6_k, kquants::enc_q6_k, true),
        _ => return Err(QuantError::Unsupported(ttype)),
    };
    Ok(Codec {
        dec,
        enc,
        finite_only,
    })
}

/// Plain types (one value per "block") are processed this many values at a
/// time, so the per-call cost of the codec table stays out of the inner loop.
const FLOAT_CHUNK: usize = 1024;

/// Values and bytes per call of the codec.
fn unit(ttype: TensorType) -> (usize, usize) {
    let (bs, ts) = (ttype.block_size() as usize, ttype.type_size() as usize);
    if bs == 1 {
        (FLOAT_CHUNK, FLOAT_CHUNK * ts)
    } else {
        (bs, ts)
    }
}

/// Decodes `bytes` of type `ttype` to f32 values, bit for bit what gguf-py
/// 0.19's `gguf.quants.dequantize` returns. `bytes` must be a whole number
/// of blocks.
pub fn dequantize(ttype: TensorType, bytes: &[u8]) -> Result<Vec<f32>, QuantError> {
    let c = codec(ttype)?;
    let type_size = ttype.type_size() as usize;
    if !bytes.len().is_multiple_of(type_size) {
        return Err(QuantError::BytesNotWholeBlocks {
            ttype,
            len: bytes.len(),
            type_size,
        });
    }
    let n = bytes.len() / type_size * ttype.block_size() as usize;
    let mut out = vec![0f32; n];
    let (bs, ts) = unit(ttype);
    let mut src = bytes.chunks_exact(ts);
    let mut dst = out.chunks_exact_mut(bs);
    for (b, o) in (&mut src).zip(&mut dst) {
        (c.dec)(b, o);
    }
    // Only plain types have a shorter last chunk.
    let (b, o) = (src.remainder(), dst.into_remainder());
    if !b.is_empty() {
        (c.dec)(b, o);
    }
    Ok(out)
}

/// Encodes `values` as `ttype`. For F16, BF16 and the 32-value block types
/// this is bit for bit gguf-py 0.19's `gguf.quants.quantize` (ggml's
/// reference quantizers); for the K-quants it is ggml's
/// `quantize_row_q*_K_ref`. `values.len()` must be a whole number of blocks
/// (and, for a tensor, each row too: see [`check_row`]); block types take
/// finite values only.
pub fn quantize(ttype: TensorType, values: &[f32]) -> Result<Vec<u8>, QuantError> {
    let c = codec(ttype)?;
    let block_size = ttype.block_size() as usize;
    if !values.len().is_multiple_of(block_size) {
        return Err(QuantError::ValuesNotWholeBlocks {
            ttype,
            len: values.len(),
            block_size,
        });
    }
    if c.finite_only
        && let Some(index) = values.iter().position(|v| !v.is_finite())
    {
        return Err(QuantError::NonFinite {
            ttype,
            index,
            value: values[index],
        });
    }
    let mut out = vec![0u8; values.len() / block_size * ttype.type_size() as usize];
    let (bs, ts) = unit(ttype);
    // Blocks are independent: large inputs are split over threads, each
    // part encoded exactly as it would be alone.
    let units = values.len().div_ceil(bs);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(values.len() / PARALLEL_MIN_VALUES)
        .max(1);
    let per = units.div_ceil(threads);
    let first_error = if threads == 1 {
        encode(&c, values, &mut out, bs, ts, 0).err()
    } else {
        std::thread::scope(|scope| {
            let parts: Vec<_> = values
                .chunks(per * bs)
                .zip(out.chunks_mut(per * ts))
                .enumerate()
                .map(|(i, (v, o))| scope.spawn(move || encode(&c, v, o, bs, ts, i * per)))
                .collect();
            // Joined in order: the first failing part has the first bad block.
            parts
                .into_iter()
                .map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .find_map(Result::err)
        })
    };
    match first_error {
        Some(block) => Err(QuantError::ScaleOverflow {
            ttype,
            block,
            first: block * bs,
        }),
        None => Ok(out),
    }
}

/// Inputs below this many values are quantized on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 18;

/// Encodes `values` into `out` unit by unit; `Err(block)` names the first
/// block (counted from `first_unit`) whose scale overflowed.
fn encode(
    c: &Codec,
    values: &[f32],
    out: &mut [u8],
    bs: usize,
    ts: usize,
    first_unit: usize,
) -> Result<(), usize> {
    let mut src = values.chunks_exact(bs);
    let mut dst = out.chunks_exact_mut(ts);
    for (i, (v, o)) in (&mut src).zip(&mut dst).enumerate() {
        if !(c.enc)(v, o) {
            return Err(first_unit + i);
        }
    }
    let (v, o) = (src.remainder(), dst.into_remainder());
    if !v.is_empty() {
        (c.enc)(v, o);
    }
    Ok(())
}

/// Checks that a tensor whose rows have `row_len` values (`dims[0]`) can be
/// stored as `ttype`: the type has a codec and a row is a whole number of
/// blocks.
pub fn check_row(ttype: TensorType, row_len: u64) -> Result<(), QuantError> {
    codec(ttype)?;
    let block_size = ttype.block_size() as usize;
    if !row_len.is_multiple_of(block_size as u64) {
        return Err(QuantError::RowNotWholeBlocks {
            ttype,
            row_len,
            block_size,
        });
    }
    Ok(())
}

/// Reads the little-endian f16 at `b[i..i + 2]` as f32.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// Writes `v` as a little-endian f16 at `b[i..i + 2]`; `false` if it is not
/// finite there.
#[inline(always)]
fn put_f16(b: &mut [u8], i: usize, v: f32) -> bool {
    let h = f32_to_f16(v);
    b[i..i + 2].copy_from_slice(&h.to_le_bytes());
    h & 0x7c00 != 0x7c00
}
