//! Fault kinds, as `evod fault --kind` and the control socket's `fault`
//! request name them, and the fault opcode each one sends to a worker.

use crate::protocol::op;

/// A fault kind that names no fault; the message says which and lists the
/// kinds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFaultKind(String);

/// The fault opcode and its u32 argument for a fault `kind`
/// (`segv`, `abort`, `hang`, `scribble`, `lie`, `lie-control`, `alloc`,
/// `alloc:MiB`, `exit`, `exit:N`, `notice`).
pub fn parse_kind(kind: &str) -> Result<(u32, u32), BadFaultKind> {
    Ok(match kind {
        "segv" => (op::FAULT_SEGV, 0),
        "abort" => (op::FAULT_ABORT, 0),
        "hang" => (op::FAULT_HANG, 0),
        "scribble" => (op::FAULT_SCRIBBLE, 0),
        "lie" => (op::FAULT_LIE, 0),
        "lie-control" => (op::FAULT_LIE, 1),
        "alloc" => (op::FAULT_ALLOC, 1024),
        "exit" => (op::FAULT_EXIT, 1),
        "notice" => (op::FAULT_NOTICE, 0),
        other if other.starts_with("alloc:") => match other["alloc:".len()..].parse::<u32>() {
            Ok(mib) if mib > 0 => (op::FAULT_ALLOC, mib),
            _ => {
                return Err(BadFaultKind(format!(
                    "bad fault kind {other:?}: alloc:N takes a size in MiB, 1 or more"
                )));
            }
        },
        other => match other.strip_prefix("exit:").map(str::parse::<u8>) {
            Some(Ok(n)) => (op::FAULT_EXIT, u32::from(n)),
            Some(Err(_)) => {
                return Err(BadFaultKind(format!(
                    "bad fault kind {other:?}: the exit code must be 0 to 255"
                )));
            }
            None => {
                return Err(BadFaultKind(format!(
                    "unknown fault kind {other:?}: use segv, abort, hang, scribble, lie, lie-control, alloc[:MiB], exit, exit:N or notice"
                )));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_to_opcodes_and_bad_ones_are_named() {
        assert_eq!(parse_kind("segv"), Ok((op::FAULT_SEGV, 0)));
        assert_eq!(parse_kind("hang"), Ok((op::FAULT_HANG, 0)));
        assert_eq!(parse_kind("exit"), Ok((op::FAULT_EXIT, 1)));
        assert_eq!(parse_kind("exit:42"), Ok((op::FAULT_EXIT, 42)));
        assert!(
            parse_kind("exit:300")
                .unwrap_err()
                .to_string()
                .contains("0 to 255")
        );
        assert!(
            parse_kind("melt")
                .unwrap_err()
                .to_string()
                .contains("\"melt\"")
        );
    }
}
