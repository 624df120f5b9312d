//! Typed errors. A parse error names the file, the byte offset and the
//! problem; an I/O error names the path and the step that failed.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::types::{TensorType, ValueType};

/// Errors from reading or writing GGUF files.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file is malformed.
    #[error("{file}: byte {offset}: {kind}")]
    Parse {
        /// The file (as given by the caller).
        file: String,
        /// Byte offset in the file where the problem was found.
        offset: u64,
        /// What is wrong.
        kind: ParseErrorKind,
    },
    /// The file could not be opened, measured or mapped.
    #[error("cannot read {path}: {source}", path = path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The model path's final component is a symbolic link, which
    /// [`crate::GgufFile::open`] refuses to follow (`O_NOFOLLOW`).
    #[error(
        "{path} is a symbolic link; evod does not follow links for model files",
        path = path.display()
    )]
    Symlink {
        /// The path as given.
        path: PathBuf,
    },
    /// The path names something other than a regular file (a FIFO, a
    /// folder, a device, a socket). Refused at open, before any read, so a
    /// FIFO without a writer never blocks.
    #[error("{path} {kind}, not a regular file; a GGUF model must be a regular file", path = path.display())]
    NotRegular {
        /// The path as given.
        path: PathBuf,
        /// What it is.
        kind: FileKind,
    },
    /// The file ended before the length it had when opened: it was
    /// truncated or rewritten in place while being read. Only the read
    /// path ([`crate::GgufReader`]) reports this; a memory map would die of
    /// SIGBUS instead.
    #[error(
        "{path} changed while being read: it ends at byte {offset}, {expected} bytes were expected (truncated or rewritten in place)",
        path = path.display()
    )]
    ShortRead {
        /// The file.
        path: PathBuf,
        /// Where the read came up short.
        offset: u64,
        /// The file's length when it was opened.
        expected: u64,
    },
    /// The header (metadata and tensor infos) goes on past the reader's
    /// cap ([`crate::MAX_HEADER`] by default): refused before reading more,
    /// so a hostile header cannot make a trusted process allocate up to the
    /// file's size.
    #[error(
        "{path}: the header (metadata and tensor infos) is larger than {limit} bytes, the most evod reads",
        path = path.display()
    )]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// The cap, in bytes.
        limit: u64,
    },
    /// A publish step failed.
    #[error("cannot publish {path}: {step} failed: {source}", path = path.display())]
    Io {
        /// The target file.
        path: PathBuf,
        /// The step that failed.
        step: IoStep,
        /// The OS error.
        source: io::Error,
    },
    /// The metadata or tensor list handed to the writer is not writable.
    #[error("cannot publish {path}: {problem}", path = path.display())]
    InvalidSpec {
        /// The target file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The tensor callback wrote a different number of bytes than declared.
    #[error(
        "cannot publish {path}: tensor {tensor} needs {expected} bytes but {written} were written",
        path = path.display()
    )]
    TensorSize {
        /// The target file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Declared size in bytes.
        expected: u64,
        /// Bytes the callback wrote (or tried to write).
        written: u64,
    },
    /// A tensor's type cannot be converted to f32 by this crate.
    #[error("{file}: tensor {tensor}: cannot convert {ttype} to f32")]
    Unconvertible {
        /// The file.
        file: String,
        /// The tensor's name.
        tensor: String,
        /// Its type.
        ttype: TensorType,
    },
}

/// What a path that is not a regular file is, named in
/// [`GgufError::NotRegular`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A folder.
    Directory,
    /// A named pipe.
    Fifo,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A Unix socket.
    Socket,
    /// A symbolic link (only when opened with `O_PATH`; kept for
    /// completeness).
    Symlink,
    /// Anything else `fstat` reports.
    Other,
}

impl FileKind {
    /// The kind of a `st_mode`; `None` for a regular file.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => return None,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFLNK => FileKind::Symlink,
            _ => FileKind::Other,
        })
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "is a directory",
            FileKind::Fifo => "is a FIFO",
            FileKind::CharDevice => "is a character device",
            FileKind::BlockDevice => "is a block device",
            FileKind::Socket => "is a socket",
            FileKind::Symlink => "is a symbolic link",
            FileKind::Other => "is not a file",
        })
    }
}

/// A publish step, named in I/O errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStep {
    /// Opening the target's folder (it does not exist, say).
    Folder,
    /// Removing leftover temporary files.
    Cleanup,
    /// Creating the temporary file.
    Create,
    /// Writing the temporary file.
    Write,
    /// fsync of the temporary file.
    Fsync,
    /// Renaming the temporary file over the target.
    Rename,
    /// fsync of the target's folder (the rename has happened).
    DirFsync,
}

impl fmt::Display for IoStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoStep::Folder => "opening its folder",
            IoStep::Cleanup => "removing leftover temporary files",
            IoStep::Create => "creating the temporary file",
            IoStep::Write => "write",
            IoStep::Fsync => "fsync",
            IoStep::Rename => "rename",
            IoStep::DirFsync => "folder fsync (the new file is in place but may not be durable)",
        })
    }
}

/// What is wrong with a malformed file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseErrorKind {
    /// The file ends before a field.
    #[error("truncated: {what} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The first four bytes are not `GGUF`.
    #[error("bad magic {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A version other than 2 or 3.
    #[error("unsupported gguf version {version} (2 and 3 are read)")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// A count that the rest of the file cannot hold.
    #[error("{what} count {count} is impossible: the {remaining} bytes left hold at most {max}")]
    HugeCount {
        /// What is counted (`tensor`, `metadata key`).
        what: &'static str,
        /// The count found.
        count: u64,
        /// Bytes left after the count.
        remaining: u64,
        /// The most that could fit.
        max: u64,
    },
    /// A string longer than the rest of the file.
    #[error("string length {len} runs past the end of the file ({remaining} bytes left)")]
    StringTooLong {
        /// Declared length.
        len: u64,
        /// Bytes left.
        remaining: u64,
    },
    /// An array longer than the rest of the file can hold.
    #[error(
        "array of {len} {elem_type} values runs past the end of the file ({remaining} bytes left)"
    )]
    ArrayTooLong {
        /// Declared element count.
        len: u64,
        /// Element type.
        elem_type: ValueType,
        /// Bytes left.
        remaining: u64,
    },
    /// Arrays nested deeper than [`crate::MAX_ARRAY_DEPTH`].
    #[error("arrays nested deeper than {max} levels")]
    NestingTooDeep {
        /// The limit.
        max: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what} is not valid utf-8")]
    InvalidUtf8 {
        /// Which string (`metadata key`, `string value`, `tensor name`).
        what: &'static str,
    },
    /// A metadata value type id that is not 0..=12.
    #[error("unknown metadata value type {id}")]
    UnknownValueType {
        /// The id found.
        id: u32,
    },
    /// A boolean byte other than 0 or 1.
    #[error("boolean byte {byte} is neither 0 nor 1")]
    BadBool {
        /// The byte found.
        byte: u8,
    },
    /// The same metadata key twice.
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// `general.alignment` is not a `u32`.
    #[error("general.alignment has type {found}, expected u32")]
    AlignmentType {
        /// The type found.
        found: ValueType,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment {value} is not a power of two")]
    AlignmentValue {
        /// The value found.
        value: u64,
    },
    /// More than 4 dimensions.
    #[error("tensor {tensor:?} has {n_dims} dimensions (at most 4)")]
    TooManyDims {
        /// The tensor.
        tensor: String,
        /// Dimensions declared.
        n_dims: u32,
    },
    /// A dimension of zero, or beyond `i64::MAX`.
    #[error("tensor {tensor:?} dimension {axis} is {value}")]
    BadDim {
        /// The tensor.
        tensor: String,
        /// Which dimension.
        axis: usize,
        /// Its value.
        value: u64,
    },
    /// Element count or byte size overflows.
    #[error("tensor {tensor:?} dims {dims:?} overflow its element count or byte size")]
    SizeOverflow {
        /// The tensor.
        tensor: String,
        /// Its dims.
        dims: Vec<u64>,
    },
    /// `dims[0]` is not a whole number of quantization blocks.
    #[error(
        "tensor {tensor:?} row length {dim0} is not a multiple of the {ttype} block size {block}"
    )]
    PartialBlock {
        /// The tensor.
        tensor: String,
        /// Its first dimension.
        dim0: u64,
        /// Its type.
        ttype: TensorType,
        /// The block size.
        block: u64,
    },
    /// A tensor type id that is not known.
    #[error("tensor {tensor:?} has unknown type id {id}")]
    UnknownTensorType {
        /// The tensor.
        tensor: String,
        /// The id found.
        id: u32,
    },
    /// A tensor type id that ggml has removed.
    #[error("tensor {tensor:?} has removed type id {id} ({name})")]
    RemovedTensorType {
        /// The tensor.
        tensor: String,
        /// The id found.
        id: u32,
        /// The type's old name.
        name: &'static str,
    },
    /// The same tensor name twice.
    #[error("duplicate tensor name {tensor:?}")]
    DuplicateTensor {
        /// The name.
        tensor: String,
    },
    /// A tensor offset that is not a multiple of the alignment.
    #[error("tensor {tensor:?} offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// The tensor.
        tensor: String,
        /// Its offset in the data section.
        offset: u64,
        /// The alignment.
        alignment: u64,
    },
    /// Tensor data past the end of the file.
    #[error(
        "tensor {tensor:?} data [{start}, {end}) of the data section runs past the end of the file (data section is {data_len} bytes)"
    )]
    OutOfFile {
        /// The tensor.
        tensor: String,
        /// First byte, relative to the data section.
        start: u64,
        /// One past the last byte (saturating).
        end: u64,
        /// Length of the data section in the file.
        data_len: u64,
    },
    /// Two tensors share bytes.
    #[error("tensor {tensor:?} data overlaps tensor {other:?}")]
    Overlap {
        /// The later tensor.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
}
