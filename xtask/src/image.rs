//! `cargo xtask image [--tag TAG]`: builds the evod container image without
//! a registry (nothing is pulled).
//!
//! 1. Compiles the project's own binary statically (glibc with
//!    `+crt-static`, `--target x86_64-unknown-linux-gnu` so the flag does not
//!    reach build scripts), cached in `target/x86_64-unknown-linux-gnu/release`.
//! 2. Stages a build context in `target/image/context`: the binary,
//!    `docker/rootfs` (passwd/group naming uid 65532) and an empty state
//!    folder template.
//! 3. `docker build -f docker/Dockerfile`: two `FROM scratch` stages whose
//!    runtime stage is the registry `Dockerfile`'s, line for line.
//!
//! `tests/docker.rs` runs this task too (once per test run), so the tests
//! work from `cargo test` alone; Docker's layer cache makes a rebuild of an
//! unchanged binary a no-op.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// The image tag built when none is given.
pub const DEFAULT_TAG: &str = "evod:local";

/// The only target installed on our machines; a static glibc build of it
/// runs in an empty (`scratch`) image.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Runs the task with its command-line arguments.
pub fn run_task(args: &[String]) -> Result<()> {
    let mut tag = DEFAULT_TAG.to_owned();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--tag" => {
                tag = it
                    .next()
                    .context("--tag needs a value, e.g. --tag evod:local")?
                    .clone();
            }
            other => bail!("cargo xtask image: unknown argument {other:?} (expected --tag TAG)"),
        }
    }
    build(&tag)
}

/// `Ok` if a Docker engine answers `docker info`, else why not.
pub fn engine() -> std::result::Result<(), String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "docker info failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("docker info failed: {e}")),
    }
}

/// Builds the static binary and the image `tag`.
pub fn build(tag: &str) -> Result<()> {
    let root = root();
    let target_dir = crate::target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(&cargo)
        .current_dir(&root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "evod",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir))?;
    let binary = target_dir.join(TARGET).join("release/evod");
    let context = target_dir.join("image/context");
    stage(&root, &binary, &context)?;
    run(Command::new("docker")
        .args(["build", "--quiet", "--tag", tag, "--file"])
        .arg(root.join("docker/Dockerfile"))
        .arg(&context))?;
    eprintln!("xtask image: built {tag} from {}", binary.display());
    Ok(())
}

/// Writes the build context `docker/Dockerfile` expects into `context`.
fn stage(root: &Path, binary: &Path, context: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if context.exists() {
        std::fs::remove_dir_all(context)
            .with_context(|| format!("removing the old context {}", context.display()))?;
    }
    let state = context.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    copy_tree(&root.join("docker/rootfs"), &context.join("rootfs"))?;
    std::fs::copy(binary, context.join("evod"))
        .with_context(|| format!("copying {}", binary.display()))?;
    Ok(())
}

/// Copies the folder `from` to `to`, recursively (files and folders only).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}
