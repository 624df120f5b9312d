//! Helpers shared by the process-level tests in this folder: the `evod`
//! command with a clean environment, output as text, and the children of a
//! process by role (read from `/proc`).

#![allow(dead_code)] // Each test file uses a different subset.

use std::process::Command;

/// `evod` (the binary under test) without the caller's `EVOD_*` settings.
pub fn evod() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evod"));
    cmd.env_remove("EVOD_DIR")
        .env_remove("EVOD_CONTROL_SOCKET")
        .env("NO_COLOR", "1");
    cmd
}

/// Bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Live (not zombie) children of `pid` whose process name (`comm`, as in
/// `ps -o comm`) is `name`.
pub fn children_named(pid: u32, name: &str) -> Vec<u32> {
    live_children(pid)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// Live (not zombie) children of `pid`.
fn live_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(after) = stat.rsplit_once(") ").map(|x| x.1) else {
            continue;
        };
        let mut fields = after.split(' ');
        let state = fields.next().unwrap_or("");
        let ppid: u32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid == pid && state != "Z" {
            out.push(p);
        }
    }
    out
}

/// Live (not zombie) children of `pid` whose first argument is `role`
/// (`worker`, `evolver`). A warm standby (`evod worker --standby-fd`, named
/// `evod-standby` until promoted) is not counted as a worker.
pub fn children_with_role(pid: u32, role: &str) -> Vec<u32> {
    live_children(pid)
        .into_iter()
        .filter(|p| {
            let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline.split(|&b| b == 0).map(text).collect();
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            let standby = args.iter().any(|a| a == "--standby-fd") && comm.trim() != "evod-worker";
            args.get(1).is_some_and(|a| a == role) && !standby
        })
        .collect()
}
