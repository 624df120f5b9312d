//! GGUF v3 for evod: a validating reader over a read-only memory map and a
//! streaming writer that publishes atomically.
//!
//! - [`GgufFile::open`] maps a file and validates every field (counts,
//!   lengths, types, dims, sizes, alignment, tensor placement) before anything
//!   is used; every failure is a [`GgufError::Parse`] naming the file, the
//!   byte offset and the problem ([`ParseErrorKind`]). The parser never
//!   panics and allocates at most a small multiple of the file's size.
//! - [`GgufReader::open`] (and [`GgufHeader::read`]) read the same header
//!   with `pread` instead of a map, and [`GgufReader::checksum`] streams the
//!   data section: a file truncated or rewritten in place meanwhile is a
//!   [`GgufError::ShortRead`], never a SIGBUS. Trusted processes (the
//!   supervisor, `evod inspect`) use this; workers use the zero-copy map.
//!   The header read is capped at [`MAX_HEADER`] (256 MiB;
//!   [`GgufError::HeaderTooLarge`]).
//! - Both refuse anything but a regular file at open
//!   ([`GgufError::NotRegular`]; a FIFO without a writer never blocks).
//! - [`publish`] streams tensors from a callback into a temporary file beside
//!   the target, then fsync, rename, folder fsync: the target is always the
//!   old or the new complete file.
//! - [`quant`] converts tensor data between f32 and F16, BF16, Q4_0, Q4_1,
//!   Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K, both ways, bit-exact with
//!   gguf-py's dequantizer and ggml's reference quantizers.
//! - [`rewrite`] copies a file keeping every key, type, order and tensor byte.
#![deny(missing_docs)]

mod convert;
mod error;
mod open;
pub mod quant;
mod read;
mod stream;
mod types;
mod write;

pub use convert::{quantize_q8_0, to_f32};
pub use error::{FileKind, GgufError, IoStep, ParseErrorKind};
pub use quant::{QuantError, dequantize, quantize};
pub use read::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufFile, GgufHeader, MAGIC, MAX_ARRAY_DEPTH, MAX_DIMS,
};
pub use stream::{GgufReader, MAX_HEADER};
pub use types::{Array, TensorInfo, TensorType, TypeIdError, Value, ValueType};
pub use write::{
    IoFault, PublishOptions, PublishReport, TensorSpec, WRITE_VERSION, publish, rewrite,
    temp_prefix,
};
