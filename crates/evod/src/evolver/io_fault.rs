//! The I/O fault plan of a fault-injection run: `DIR/.evod/io-fault` names
//! the publish step to fail and its errno (`cargo xtask fault`'s disk
//! faults); read at each publish.

use super::*;

/// The I/O fault plan's file name inside the runtime folder `DIR/.evod`.
pub const IO_FAULT_FILE: &str = "io-fault";

/// Reads the I/O fault plan at `path`: one line `STEP ERRNO`, with STEP one
/// of `write`, `fsync`, `rename`, `dirfsync` and ERRNO a name (`ENOSPC`,
/// `EIO`, `EROFS`, `EDQUOT`) or a number. No file means no fault.
pub fn read_io_fault(path: &Path) -> Result<Option<evod_gguf::IoFault>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_io_fault(&text)
        .map(Some)
        .with_context(|| format!("{}: bad fault plan {:?}", path.display(), text.trim()))
}

/// Parses `STEP ERRNO` (see [`read_io_fault`]).
pub fn parse_io_fault(text: &str) -> Result<evod_gguf::IoFault> {
    use evod_gguf::IoFault;
    let mut words = text.split_whitespace();
    let (Some(step), Some(errno), None) = (words.next(), words.next(), words.next()) else {
        anyhow::bail!("expected `STEP ERRNO`, e.g. `write ENOSPC`");
    };
    let errno = match errno.to_ascii_uppercase().as_str() {
        "ENOSPC" => libc::ENOSPC,
        "EIO" => libc::EIO,
        "EROFS" => libc::EROFS,
        "EDQUOT" => libc::EDQUOT,
        n => match n.parse::<i32>() {
            Ok(n) if n > 0 => n,
            _ => {
                anyhow::bail!("unknown errno {errno:?}: use ENOSPC, EIO, EROFS, EDQUOT or a number")
            }
        },
    };
    Ok(match step {
        "write" => IoFault::Write(errno),
        "fsync" => IoFault::Fsync(errno),
        "rename" => IoFault::Rename(errno),
        "dirfsync" => IoFault::DirFsync(errno),
        other => anyhow::bail!("unknown step {other:?}: use write, fsync, rename or dirfsync"),
    })
}
