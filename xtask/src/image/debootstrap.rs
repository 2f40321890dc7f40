//! Debian root filesystems made with debootstrap, for the base image and the `frr` appliance.
//! Downloads are kept in `target/image/cache/debs` (debootstrap's `--cache-dir`), so a rebuild
//! fetches nothing that did not change. This module never touches Docker or QEMU.
//!
//! debootstrap runs as root and mounts /proc and /sys inside the target while it configures
//! packages (and unmounts them again); nothing else here mounts anything.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};

/// The Debian release every image is built from.
pub(crate) const SUITE: &str = "bookworm";

/// The Debian mirror: `VIAL_DEBIAN_MIRROR`, else deb.debian.org.
pub(crate) fn mirror() -> String {
    std::env::var("VIAL_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// `debootstrap --variant=minbase --include=<packages> bookworm <target>`, into a fresh
/// `target`. Its output goes to `<target>.log`; a failure shows the end of it.
pub(crate) fn run(packages: &[&str], target: &Path) -> Result<()> {
    let cache = super::cache_dir();
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    // debootstrap instances sharing one --cache-dir would trip over each other's partial files.
    let lock = fs::File::create(cache.join("debootstrap.lock"))?;
    lock.lock().context("locking debootstrap's cache")?;
    if target.exists() {
        fs::remove_dir_all(target).with_context(|| format!("removing the old {}", target.display()))?;
    }
    let log_path = target.with_extension("log");
    let log = fs::File::create(&log_path)?;
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(target)
        .arg(mirror())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("image: {} (log: {})", crate::display_cmd(&cmd), log_path.display());
    let started = std::time::Instant::now();
    let status = cmd.status().context("running debootstrap (apt-get install debootstrap)")?;
    if !status.success() {
        let tail = |path: &Path| {
            let text = fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        };
        anyhow::bail!(
            "debootstrap failed ({status}); the end of {}:\n{}\nthe end of its debootstrap.log:\n{}",
            log_path.display(),
            tail(&log_path),
            tail(&target.join("debootstrap/debootstrap.log"))
        );
    }
    ensure!(target.join("bin/sh").exists(), "debootstrap succeeded but {} has no /bin/sh", target.display());
    println!("image: debootstrap took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
