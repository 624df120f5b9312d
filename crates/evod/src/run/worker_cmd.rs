//! `--worker-cmd` (`EVOD_WORKER_CMD`, TOML `worker_cmd`): the user's worker
//! program, checked before anything starts.
//!
//! The value is split into words as a POSIX shell would split it (quotes
//! and backslashes; `shlex`), but no shell runs it: no expansion, no
//! redirection, nothing a value from a file or variable could inject. The
//! program (the first word) is looked up on `PATH` unless it contains a
//! `/`, and must be an executable file; the resolved path is what every
//! worker slot runs, so a later change of `PATH` or working folder does not
//! change it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::settings::SettingError;

/// Whether the model at `path` is of the `external` task, read with the
/// trusted reader (`pread`, no map). A file that cannot be read says no:
/// the supervisor reports it with its own error.
pub fn is_external_model(path: &Path) -> bool {
    evod_gguf::GgufHeader::read(path).is_ok_and(|h| {
        h.get("evod.task").and_then(|v| v.as_str()) == Some(evod_runtime::task::EXTERNAL)
    })
}

/// Splits and resolves `value`, given by `origin` (named in an error).
pub fn resolve(value: &str, origin: &str) -> Result<Vec<OsString>, SettingError> {
    let bad = |expected: String| SettingError {
        origin: origin.to_owned(),
        value: format!("{value:?}"),
        expected,
    };
    let words =
        shlex::split(value).ok_or_else(|| bad("a command line with balanced quotes".into()))?;
    let Some(program) = words.first() else {
        return Err(bad("a program and its arguments".into()));
    };
    let path = find_program(Path::new(program)).map_err(bad)?;
    let mut argv = vec![path.into_os_string()];
    argv.extend(words[1..].iter().map(OsString::from));
    Ok(argv)
}

/// The executable `program` names: itself (made absolute) when it contains
/// a `/`, else the first match on `PATH`.
fn find_program(program: &Path) -> Result<PathBuf, String> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        let path = std::path::absolute(program).map_err(|e| format!("a program path ({e})"))?;
        return check_executable(&path).map(|()| path);
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if check_executable(&candidate).is_ok() {
            return Ok(std::path::absolute(&candidate).unwrap_or(candidate));
        }
    }
    Err(format!(
        "a program found on PATH ({} is not there)",
        program.display()
    ))
}

fn check_executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("an executable program ({}: {e})", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "an executable program ({} is not a file)",
            path.display()
        ));
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("a program path without NUL ({})", path.display()))?;
    // SAFETY: access(2) reads the NUL-terminated string `c` owns, valid for
    // the call; it has no other preconditions.
    if unsafe { libc::access(c.as_ptr(), libc::X_OK) } != 0 {
        return Err(format!(
            "an executable program ({} is not executable)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_a_shell_and_resolves_on_path() {
        let argv = resolve("sh -c 'echo \"a b\"' x", "--worker-cmd").unwrap();
        assert!(Path::new(&argv[0]).is_absolute(), "{argv:?}");
        assert!(argv[0].to_str().unwrap().ends_with("/sh"), "{argv:?}");
        assert_eq!(&argv[1..], ["-c", "echo \"a b\"", "x"]);
    }

    #[test]
    fn bad_values_name_the_setting_and_the_problem() {
        let e = resolve("", "--worker-cmd").unwrap_err();
        assert_eq!(e.origin, "--worker-cmd");
        assert!(e.expected.contains("a program"), "{e}");
        let e = resolve("python3 'unbalanced", "--worker-cmd").unwrap_err();
        assert!(e.expected.contains("balanced quotes"), "{e}");
        let e = resolve("no-such-program-evod-xyz a", "EVOD_WORKER_CMD").unwrap_err();
        assert!(e.to_string().contains("not there"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("fit.py");
        std::fs::write(&plain, "print()").unwrap();
        let e = resolve(plain.to_str().unwrap(), "--worker-cmd").unwrap_err();
        assert!(e.to_string().contains("is not executable"), "{e}");
        let e = resolve(dir.path().to_str().unwrap(), "--worker-cmd").unwrap_err();
        assert!(e.to_string().contains("is not a file"), "{e}");
    }
}
