//! `cargo xtask image [--tag TAG]`: builds the evod container image without
//! a registry (nothing is pulled).
//!
//! 1. Compiles the project's own binary statically, with llama.cpp in it
//!    (the `llm` feature, so the one image runs every task and role, the
//!    perplexity task too): glibc with `+crt-static`, libstdc++ from its
//!    archive (evod-llama's `static-stdcxx`, llama-cpp-sys-2's feature of
//!    that name: without it the build script asks for the shared
//!    libstdc++, and `+crt-static` then makes a half-dynamic binary that
//!    crashes at start), `--target x86_64-unknown-linux-gnu` so the flag
//!    does not reach build scripts; the llm shape
//!    (`-p evod -p evod-llama --features evod/llm`) plus that feature,
//!    cached in `target/x86_64-unknown-linux-gnu/release`. Its llama.cpp is
//!    built once for this profile and target (a cold build of its own,
//!    like each profile's), then cached like everything else.
//! 2. Checks that the binary is static (no ELF interpreter, no `NEEDED`
//!    library): `FROM scratch` has no loader and no libraries.
//! 3. Stages a build context in `target/image/context`: the binary without
//!    its debug sections (`objcopy --strip-debug`: 104 MB → 14 MB; the one
//!    in the target folder keeps them, same build id), `docker/rootfs`
//!    (passwd/group naming uid 65532) and an empty state folder template.
//! 4. `docker build -f docker/Dockerfile`: two `FROM scratch` stages whose
//!    runtime stage is the registry `Dockerfile`'s, line for line. The
//!    build stage is labelled `org.evod.stage=build`; the untagged copies
//!    of it that the legacy builder keeps are removed once over an hour
//!    old.
//!
//! `tests/docker.rs` runs this task too (once per test run), so the tests
//! work from `cargo test` alone; Docker's layer cache makes a rebuild of an
//! unchanged binary a no-op.
//!
//! `--label KEY=VALUE` (repeatable) adds labels to the image (the tests
//! label theirs with their checkout: `tests/common/mod.rs`,
//! `docker::prune_stale_test_images`).
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

/// The label of docker/Dockerfile's build stage.
const BUILD_STAGE_LABEL: &str = "org.evod.stage=build";

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

/// The packages and features of the image's build: the llm shape CI and
/// the benchmarks build llama.cpp in (`xtask ci`'s `llm (llama.cpp)` step),
/// so the feature set of `llama-cpp-sys-2` is the one everywhere.
pub const LLM_SHAPE: [&str; 6] = ["-p", "evod", "-p", "evod-llama", "--features", "evod/llm"];

/// Runs the task with its command-line arguments.
pub fn run_task(args: &[String]) -> Result<()> {
    let mut tag = None;
    let mut redis = false;
    let mut labels = Vec::new();
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
            "--label" => {
                let label = it
                    .next()
                    .context("--label needs a value, e.g. --label org.example.key=value")?;
                if label.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                    bail!("cargo xtask image: --label {label:?} is not KEY=VALUE");
                }
                labels.push(label.clone());
            }
            other => {
                bail!(
                    "cargo xtask image: unknown argument {other:?} (expected --tag TAG, --redis, --label KEY=VALUE)"
                )
            }
        }
    }
    if redis {
        build_redis(tag.as_deref().unwrap_or(REDIS_TAG), &labels)
    } else {
        build(tag.as_deref().unwrap_or(DEFAULT_TAG), &labels)
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

/// `--label LABEL` for each of `labels`.
fn label_args(labels: &[String]) -> Vec<&str> {
    labels
        .iter()
        .flat_map(|l| ["--label", l.as_str()])
        .collect()
}

/// Builds the static binary and the image `tag`, with `labels`
/// (`KEY=VALUE`).
pub fn build(tag: &str, labels: &[String]) -> Result<()> {
    let root = root();
    let target_dir = crate::target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = std::time::Instant::now();
    run(Command::new(&cargo)
        .current_dir(&root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--locked"])
        .args(LLM_SHAPE)
        .args(["--features", "evod-llama/static-stdcxx", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir))?;
    let compiled = started.elapsed();
    let binary = target_dir.join(TARGET).join("release/evod");
    check_static(&binary)?;
    let context = target_dir.join("image/context");
    stage(&root, &binary, &context)?;
    let started = std::time::Instant::now();
    run(Command::new("docker")
        .args(["build", "--quiet", "--tag", tag])
        .args(label_args(labels))
        .arg("--file")
        .arg(root.join("docker/Dockerfile"))
        .arg(&context))?;
    // Docker's legacy builder keeps the build stage as an untagged image
    // per binary; those an earlier build left (over an hour old, so never
    // a concurrent build's) go.
    let _ = Command::new("docker")
        .args(["image", "prune", "--force", "--filter"])
        .arg(format!("label={BUILD_STAGE_LABEL}"))
        .args(["--filter", "until=1h"])
        .output();
    let size = std::fs::metadata(&binary)?.len();
    eprintln!(
        "xtask image: built {tag} from {} ({:.1} MB, static, with llama.cpp): cargo {:.1}s, docker build {:.1}s",
        binary.display(),
        size as f64 / 1e6,
        compiled.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Fails unless the ELF file `binary` is static: no program interpreter
/// (`PT_INTERP`) and no `DT_NEEDED` library, so it runs in an empty image.
fn check_static(binary: &Path) -> Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let (interp, needed) = elf_dynamic_needs(&bytes)
        .with_context(|| format!("{}: not a 64-bit little-endian ELF file", binary.display()))?;
    if interp || !needed.is_empty() {
        bail!(
            "{} is not static (interpreter: {interp}, needed libraries: {needed:?}): \
             the image is FROM scratch, with no loader and no libraries",
            binary.display()
        );
    }
    Ok(())
}

/// Whether a 64-bit little-endian ELF image has a `PT_INTERP` segment, and
/// the `DT_NEEDED` names of its dynamic section. `None` if it is not one.
fn elf_dynamic_needs(b: &[u8]) -> Option<(bool, Vec<String>)> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB.
    if b.get(..4)? != b"\x7fELF" || b.get(4)? != &2 || b.get(5)? != &1 {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PT_LOAD: u32 = 1;
    let mut interp = false;
    let mut dynamic = None;
    let mut loads = Vec::new();
    for k in 0..phnum {
        let ph = phoff + k * phentsize;
        match u32_at(ph)? {
            PT_INTERP => interp = true,
            // (file offset, size)
            PT_DYNAMIC => dynamic = Some((u64_at(ph + 8)?, u64_at(ph + 0x20)?)),
            // (vaddr, file offset, file size)
            PT_LOAD => loads.push((u64_at(ph + 0x10)?, u64_at(ph + 8)?, u64_at(ph + 0x20)?)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Some((interp, Vec::new()));
    };
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    let mut strtab = None;
    let mut offsets = Vec::new();
    let dyn_off = usize::try_from(dyn_off).ok()?;
    for k in 0..usize::try_from(dyn_size / 16).ok()? {
        let tag = u64_at(dyn_off + 16 * k)?;
        let val = u64_at(dyn_off + 16 * k + 8)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => offsets.push(val),
            DT_STRTAB => strtab = Some(val),
            _ => {}
        }
    }
    let mut needed = Vec::new();
    if let Some(addr) = strtab {
        // The string table's address, mapped to a file offset by its segment.
        let (vaddr, off, _) = loads
            .iter()
            .copied()
            .find(|&(v, _, size)| addr >= v && addr < v + size)?;
        let base = usize::try_from(addr - vaddr + off).ok()?;
        for o in offsets {
            let at = base + usize::try_from(o).ok()?;
            let end = at + b.get(at..)?.iter().position(|&c| c == 0)?;
            needed.push(String::from_utf8_lossy(&b[at..end]).into_owned());
        }
    } else if !offsets.is_empty() {
        return None;
    }
    Some((interp, needed))
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
    // Without its debug sections (llama.cpp's alone are ~60 MB); symbols
    // stay, so backtraces name functions. The binary in the target folder
    // keeps them, with the same build id, to symbolize against.
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(context.join("evod")))
    .context("objcopy (binutils) strips the image's copy of the binary")?;
    Ok(())
}

/// Builds the Redis image `tag` from this machine's `redis-server` (see the
/// module docs). Nothing is pulled; a missing binary or library is an error
/// naming it.
pub fn build_redis(tag: &str, labels: &[String]) -> Result<()> {
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
        .args(label_args(labels))
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

#[cfg(test)]
mod tests {
    use super::elf_dynamic_needs;

    #[test]
    fn a_dynamic_executable_shows_its_interpreter_and_libraries() {
        // This test binary: linked dynamically against glibc.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let (interp, needed) = elf_dynamic_needs(&exe).expect("an ELF file");
        assert!(interp);
        assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
    }

    #[test]
    fn what_is_not_a_64_bit_elf_file_is_refused() {
        assert_eq!(elf_dynamic_needs(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(elf_dynamic_needs(b"\x7fELF"), None);
        let mut exe = std::fs::read("/proc/self/exe").unwrap();
        exe[4] = 1; // ELFCLASS32
        assert_eq!(elf_dynamic_needs(&exe), None);
        // Cut short inside the program headers.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(elf_dynamic_needs(&exe[..0x48]), None);
    }
}
