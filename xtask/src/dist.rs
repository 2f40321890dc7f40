//! `cargo xtask dist`: build `target/dist/vial`, a fully static x86_64 binary.
//!
//! vial runs as PID 1 of a container whose image may contain nothing but vial and QEMU, so
//! it must not need a dynamic loader or a libc from the image. We build against musl and
//! then check the ELF ourselves instead of trusting the target name: a stray
//! `-C target-feature=-crt-static` in someone's RUSTFLAGS would otherwise ship a binary that
//! fails in the container with a baffling "no such file or directory".

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cargo_target_dir, display_cmd, project_root, run_cmd};

pub(crate) const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the static `vial` binary, copies it to `target/dist/vial` and returns that path.
pub(crate) fn run() -> Result<PathBuf> {
    ensure_musl_target()?;

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Only `--bin vial`: other binaries of the package (e.g. a future `vialctl`) run on
    // the host, not in the container, and need not be static.
    let args = ["build", "--release", "--target", MUSL_TARGET, "-p", "vial", "--bin", "vial"];
    run_cmd(&cargo, &args).context("building vial for the dist failed; see the compiler output above")?;

    let built = cargo_target_dir().join(MUSL_TARGET).join("release").join("vial");
    ensure!(
        built.is_file(),
        "cargo reported success but {} does not exist; is `build.target-dir` set in a cargo \
         config? Set CARGO_TARGET_DIR instead so xtask can find the binary",
        built.display()
    );
    // Check before copying so that target/dist never holds a binary that would not run.
    check_static(&built)?;

    let dist_dir = project_root().join("target").join("dist");
    fs::create_dir_all(&dist_dir).with_context(|| format!("creating {}", dist_dir.display()))?;
    let out = dist_dir.join("vial");
    // Copy to a temporary name and rename: copying over a vial that is currently running
    // (e.g. under a test) fails with ETXTBSY, replacing the directory entry does not.
    // One temporary name per process: tests build images side by side, each running this.
    let tmp = dist_dir.join(format!(".vial.tmp.{}", std::process::id()));
    fs::copy(&built, &tmp).with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;

    let size = fs::metadata(&out).with_context(|| format!("reading {}", out.display()))?.len();
    println!("{} ({size} bytes, {:.1} MiB, static)", out.display(), size as f64 / (1024.0 * 1024.0));
    Ok(out)
}

/// Makes sure the Rust standard library for the musl target is installed, installing it
/// with rustup once if it is not.
fn ensure_musl_target() -> Result<()> {
    if musl_target_installed()? {
        return Ok(());
    }
    eprintln!("the {MUSL_TARGET} target is not installed; running `rustup target add {MUSL_TARGET}`");
    run_cmd("rustup", &["target", "add", MUSL_TARGET]).with_context(|| {
        format!(
            "the Rust standard library for {MUSL_TARGET} is missing and installing it failed; \
             install it yourself (`rustup target add {MUSL_TARGET}`, or your distribution's \
             rust-std package for musl) and rerun `cargo xtask dist`"
        )
    })?;
    ensure!(
        musl_target_installed()?,
        "`rustup target add {MUSL_TARGET}` succeeded but the target is still not in rustc's \
         sysroot; is `rustc` on PATH a different toolchain than the one cargo uses?"
    );
    Ok(())
}

/// Looks in rustc's sysroot rather than asking rustup, so this also works with toolchains
/// not managed by rustup (e.g. Debian's rustc with libstd-rust-dev for musl).
fn musl_target_installed() -> Result<bool> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["--print", "sysroot"]).current_dir(project_root());
    let output = cmd.output().with_context(|| format!("could not run `{}`", display_cmd(&cmd)))?;
    ensure!(
        output.status.success(),
        "`{}` failed ({}): {}",
        display_cmd(&cmd),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let sysroot = String::from_utf8(output.stdout).context("rustc printed a non-UTF-8 sysroot")?;
    Ok(Path::new(sysroot.trim()).join("lib/rustlib").join(MUSL_TARGET).join("lib").is_dir())
}

/// Fails unless `path` is an x86_64 ELF executable without a PT_INTERP program header,
/// i.e. one the kernel can start without a dynamic loader.
pub(crate) fn check_static(path: &Path) -> Result<()> {
    if let Some(interp) = elf_interpreter(path)? {
        bail!(
            "{} is dynamically linked (it asks for the loader {interp}), but it must run in a \
             container without a libc. Build it with `--target {MUSL_TARGET}` and make sure \
             RUSTFLAGS does not contain `-C target-feature=-crt-static`",
            path.display()
        );
    }
    Ok(())
}

/// Returns the program interpreter an ELF file asks for (the contents of its PT_INTERP
/// program header), or `None` if it has none, i.e. it is a static (or static-pie)
/// executable.
pub(crate) fn elf_interpreter(path: &Path) -> Result<Option<String>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_interpreter(&bytes).with_context(|| format!("{} is not an x86_64 ELF executable", path.display()))
}

/// The parsing half of [`elf_interpreter`], on bytes so that tests can feed it anything.
///
/// Only the fields needed to walk the program headers are read; layouts are from the
/// System V gABI (ELF64, little endian, which is all an x86_64 binary can be).
fn parse_interpreter(b: &[u8]) -> Result<Option<String>> {
    const EM_X86_64: u16 = 62;
    const PT_INTERP: u32 = 3;
    const PN_XNUM: u16 = 0xffff;

    let field = |off: u64, len: u64| -> Result<&[u8]> {
        let end = off.checked_add(len).filter(|&end| end <= b.len() as u64);
        match end {
            Some(end) => Ok(&b[off as usize..end as usize]),
            None => bail!("truncated: needs bytes {off}..{off}+{len}, file has {}", b.len()),
        }
    };
    let u16_at = |off: u64| -> Result<u16> { Ok(u16::from_le_bytes(field(off, 2)?.try_into()?)) };
    let u32_at = |off: u64| -> Result<u32> { Ok(u32::from_le_bytes(field(off, 4)?.try_into()?)) };
    let u64_at = |off: u64| -> Result<u64> { Ok(u64::from_le_bytes(field(off, 8)?.try_into()?)) };

    ensure!(field(0, 4)? == b"\x7fELF", "no ELF magic");
    ensure!(field(4, 1)?[0] == 2, "not a 64-bit ELF file (EI_CLASS is not ELFCLASS64)");
    ensure!(field(5, 1)?[0] == 1, "not a little-endian ELF file");
    let machine = u16_at(0x12)?;
    ensure!(machine == EM_X86_64, "built for ELF machine {machine}, not x86_64 ({EM_X86_64})");

    let phoff = u64_at(0x20)?;
    let phentsize = u64::from(u16_at(0x36)?);
    let phnum = u16_at(0x38)?;
    // PN_XNUM means the real count is in section header 0; no executable linked by a
    // normal toolchain has 65535 program headers, so refuse rather than guess.
    ensure!(phnum != PN_XNUM, "more than 65534 program headers (PN_XNUM) are not supported");
    ensure!(phentsize >= 56, "program header entries are {phentsize} bytes, ELF64 needs 56");

    for i in 0..u64::from(phnum) {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? != PT_INTERP {
            continue;
        }
        // Elf64_Phdr: p_type u32, p_flags u32, p_offset u64, p_vaddr, p_paddr, p_filesz.
        let offset = u64_at(ph + 8)?;
        let filesz = u64_at(ph + 32)?;
        let interp = field(offset, filesz)?;
        let interp = interp.split(|&c| c == 0).next().unwrap_or_default();
        return Ok(Some(String::from_utf8_lossy(interp).into_owned()));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian's busybox-static ships a statically linked /bin/busybox; `cargo xtask guest`
    /// needs that package anyway, so it is on every machine that builds vial.
    #[test]
    fn busybox_static_has_no_interpreter() {
        let interp = elf_interpreter(Path::new("/bin/busybox"))
            .expect("/bin/busybox should be readable (apt-get install busybox-static)");
        assert_eq!(interp, None);
        check_static(Path::new("/bin/busybox")).unwrap();
    }

    #[test]
    fn ls_is_dynamic() {
        let interp = elf_interpreter(Path::new("/bin/ls")).unwrap();
        assert_eq!(interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        let err = check_static(Path::new("/bin/ls")).unwrap_err().to_string();
        assert!(err.contains("/bin/ls is dynamically linked"), "{err}");
        assert!(err.contains("/lib64/ld-linux-x86-64.so.2"), "{err}");
    }

    #[test]
    fn not_elf_is_an_error() {
        let err = format!("{:#}", elf_interpreter(Path::new("/etc/hostname")).unwrap_err());
        assert!(err.contains("/etc/hostname is not an x86_64 ELF executable"), "{err}");
        assert!(parse_interpreter(b"").is_err());
        assert!(parse_interpreter(b"\x7fELF").is_err());
    }

    /// A minimal hand-made ELF64 header with one program header, so the parser is also
    /// tested on input that does not depend on the host's files.
    fn synthetic_elf(p_type: u32, interp: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // ELFDATA2LSB
        b[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        b[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        b[64 + 32..64 + 40].copy_from_slice(&(interp.len() as u64).to_le_bytes()); // p_filesz
        b.extend_from_slice(interp);
        b
    }

    #[test]
    fn synthetic_headers() {
        assert_eq!(parse_interpreter(&synthetic_elf(1, b"")).unwrap(), None);
        assert_eq!(
            parse_interpreter(&synthetic_elf(3, b"/lib/ld-musl-x86_64.so.1\0")).unwrap().as_deref(),
            Some("/lib/ld-musl-x86_64.so.1")
        );
        // An interpreter string pointing past the end of the file is reported, not a panic.
        let mut truncated = synthetic_elf(3, b"/lib/ld.so\0");
        truncated.truncate(125);
        assert!(parse_interpreter(&truncated).is_err());
        // Not x86_64.
        let mut arm = synthetic_elf(1, b"");
        arm[0x12..0x14].copy_from_slice(&183u16.to_le_bytes());
        assert!(parse_interpreter(&arm).is_err());
    }
}
