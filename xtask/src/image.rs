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
//!
//! `cargo xtask image --redis [--tag TAG]` builds the broker's image
//! (`evod-redis:local` by default) the same way, for `deploy/compose.yaml`,
//! `tests/docker_dist.rs` and `cargo xtask bench dist`: Debian's
//! `redis-server` and `redis-cli` installed on this machine, with the shared
//! libraries `ldd` lists, copied into a `FROM scratch` root filesystem
//! (`docker/redis.Dockerfile`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// The image tag built when none is given.
pub const DEFAULT_TAG: &str = "evod:local";

/// The Redis image's tag when none is given (`--redis`).
pub const REDIS_TAG: &str = "evod-redis:local";

/// The binaries of the Redis image, from Debian's `redis-server` and
/// `redis-tools` packages (`redis-server` is a symlink there: its target is
/// copied under this name, the name Redis picks its mode by).
const REDIS_BINARIES: &[&str] = &["/usr/bin/redis-server", "/usr/bin/redis-cli"];

/// The Redis image's user (`redis`, not root) and its data folder.
const REDIS_UID: u32 = 6379;

/// The only target installed on our machines; a static glibc build of it
/// runs in an empty (`scratch`) image.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Runs the task with its command-line arguments.
pub fn run_task(args: &[String]) -> Result<()> {
    let mut tag = None;
    let mut redis = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--tag" => {
                tag = Some(
                    it.next()
                        .context("--tag needs a value, e.g. --tag evod:local")?
                        .clone(),
                );
            }
            "--redis" => redis = true,
            other => {
                bail!("cargo xtask image: unknown argument {other:?} (expected --tag TAG, --redis)")
            }
        }
    }
    if redis {
        build_redis(tag.as_deref().unwrap_or(REDIS_TAG))
    } else {
        build(tag.as_deref().unwrap_or(DEFAULT_TAG))
    }
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

/// Builds the Redis image `tag` from this machine's `redis-server` (see the
/// module docs). Nothing is pulled; a missing binary or library is an error
/// naming it.
pub fn build_redis(tag: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let root = root();
    let context = crate::target_dir().join("image/redis-context");
    if context.exists() {
        std::fs::remove_dir_all(&context)
            .with_context(|| format!("removing the old context {}", context.display()))?;
    }
    let rootfs = context.join("rootfs");
    let mut files = std::collections::BTreeSet::new();
    for binary in REDIS_BINARIES {
        let path = Path::new(binary);
        if !path.exists() {
            bail!(
                "{binary} not found: install Debian's redis-server package \
                 (apt-get install redis-server) to build the Redis image"
            );
        }
        files.insert(path.to_path_buf());
        files.extend(shared_libraries(path)?);
    }
    for file in &files {
        let dest = rootfs.join(file.strip_prefix("/").expect("absolute path"));
        std::fs::create_dir_all(dest.parent().expect("a file has a folder"))?;
        // Follows symlinks: the file's bytes under the name asked for.
        std::fs::copy(file, &dest)
            .with_context(|| format!("copying {} into the Redis image", file.display()))?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/:/sbin/nologin\nredis:x:{REDIS_UID}:{REDIS_UID}:redis:/data:/sbin/nologin\n"
        ),
    )?;
    std::fs::write(
        etc.join("group"),
        format!("root:x:0:\nredis:x:{REDIS_UID}:\n"),
    )?;
    let data = context.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    let version = Command::new(REDIS_BINARIES[0])
        .arg("--version")
        .output()
        .context("running redis-server --version")?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    run(Command::new("docker")
        .args(["build", "--quiet", "--tag", tag, "--label"])
        .arg(format!("org.opencontainers.image.version={version}"))
        .arg("--file")
        .arg(root.join("docker/redis.Dockerfile"))
        .arg(&context))?;
    eprintln!("xtask image: built {tag} from {version}");
    Ok(())
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`,
/// by the absolute paths the loader finds them at.
fn shared_libraries(binary: &Path) -> Result<Vec<std::path::PathBuf>> {
    let o = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    if !o.status.success() {
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // `libx.so.1 => /lib/…/libx.so.1 (0x…)`, `/lib64/ld-linux….so.2 (0x…)`
        // or the kernel's `linux-vdso.so.1 (0x…)` (no file).
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd {}: {} not found", binary.display(), name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(std::path::PathBuf::from(path));
        }
    }
    if libs.is_empty() {
        bail!("ldd {} listed no libraries", binary.display());
    }
    Ok(libs)
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
