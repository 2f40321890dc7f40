//! The base every endpoint image is built `FROM`: `vial/base:bookworm`, a Debian bookworm
//! root filesystem made offline with `debootstrap --variant=minbase` plus QEMU (emulator and
//! `qemu-img`, which `vial` uses for disk overlays), imported with `docker import`. No
//! registry is needed; a user who has one names their own base with `--base`.
//!
//! Recommends are not installed (debootstrap resolves Depends only), and documentation,
//! translations and apt's lists are removed: the image runs QEMU, nothing else, as the user
//! `vial-qemu`, which the base adds. This module never builds an endpoint image.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use super::debootstrap;
use crate::docker;

/// The tag of the offline base.
pub(crate) const IMAGE: &str = "vial/base:bookworm";

/// What the base holds besides minbase. qemu-system-x86 and qemu-utils come from the same
/// suite in one resolution, so their versions match (checked after the install too).
const PACKAGES: &[&str] = &["qemu-system-x86", "qemu-utils"];

/// Part of the cache key: bump when this file changes how the base is assembled.
const BASE_VERSION: u32 = 2;

/// The label holding the cache key on the image itself.
const STAMP_LABEL: &str = "vial.base.stamp";

/// Paths removed from the root filesystem before import: nothing at run time reads them.
const PRUNE: &[&str] = &[
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    // debootstrap copies the build host's; Docker provides its own at run time.
    "etc/hostname",
    "etc/resolv.conf",
    "etc/hosts",
];

/// Makes sure the base image exists and matches this file's recipe; returns its tag.
pub(crate) fn ensure(rebuild: bool) -> Result<String> {
    let stamp = super::stamp(&[
        debootstrap::SUITE.as_bytes(),
        debootstrap::mirror().as_bytes(),
        PACKAGES.join(",").as_bytes(),
        &BASE_VERSION.to_le_bytes(),
    ]);
    let label = format!("{{{{index .Config.Labels \"{STAMP_LABEL}\"}}}}");
    let current = docker::inspect_image(IMAGE, &label);
    if !rebuild && current.as_deref() == Some(stamp.as_str()) {
        println!("image: base {IMAGE} is up to date");
        return Ok(IMAGE.into());
    }
    // Two builds that both miss the base must not both debootstrap it.
    let cache = super::cache_dir();
    fs::create_dir_all(&cache)?;
    let lock = fs::File::create(cache.join("base.lock"))?;
    lock.lock().context("locking the base image build")?;
    if !rebuild && docker::inspect_image(IMAGE, &label).as_deref() == Some(stamp.as_str()) {
        return Ok(IMAGE.into());
    }

    println!("image: building the base {IMAGE} offline (debootstrap {} + {})", debootstrap::SUITE, PACKAGES.join(" "));
    let rootfs = cache.join("base-rootfs");
    debootstrap::run(PACKAGES, &rootfs)?;
    check_qemu_versions(&rootfs)?;
    add_qemu_user(&rootfs)?;
    prune(&rootfs)?;
    import(&rootfs, &stamp)?;
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    Ok(IMAGE.into())
}

/// Adds the unprivileged user QEMU runs as (vial's `machine.user = "auto"`): a system user
/// with no home and no login.
fn add_qemu_user(rootfs: &Path) -> Result<()> {
    let user = vial::config::QemuUser::DEFAULT;
    let status = Command::new("chroot")
        .arg(rootfs)
        .args(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent"])
        .args(["--shell", "/usr/sbin/nologin", user])
        .status()
        .context("running useradd in the base's root filesystem")?;
    ensure!(status.success(), "useradd {user} in {} failed ({status})", rootfs.display());
    Ok(())
}

/// `tar -c rootfs | docker import - IMAGE`, with the stamp as a label.
fn import(rootfs: &Path, stamp: &str) -> Result<()> {
    let changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        format!("LABEL {STAMP_LABEL}={stamp}"),
        "LABEL org.opencontainers.image.title=\"vial base (Debian bookworm + QEMU)\"".to_string(),
    ];
    import_rootfs(rootfs, IMAGE, &changes)?;
    let size = docker::inspect_image(IMAGE, "{{.Size}}").unwrap_or_default();
    println!("image: base {IMAGE} imported ({} MB)", size.parse::<u64>().unwrap_or(0) / 1_000_000);
    Ok(())
}

/// Empties [`PRUNE`] in `rootfs`: documentation, translations, apt's lists and the build
/// host's name and resolver, which an image never needs.
pub(super) fn prune(rootfs: &Path) -> Result<()> {
    for path in PRUNE {
        let path = rootfs.join(path);
        if path.is_dir() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            fs::create_dir(&path)?;
        } else if path.exists() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `tar -c rootfs | docker import --change C... - tag`: a root filesystem as an image,
/// without a registry or a build step.
pub(super) fn import_rootfs(rootfs: &Path, tag: &str, changes: &[String]) -> Result<()> {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        // The container runtime mounts its own /dev, /proc and /sys.
        .args(["--numeric-owner", "--exclude=./dev/*", "--exclude=./proc/*", "--exclude=./sys/*", "-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let mut import = Command::new("docker");
    import.arg("import");
    for change in changes {
        import.args(["--change", change]);
    }
    let status = import
        .args(["-", tag])
        .stdin(tar.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .status()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    ensure!(tar_status.success(), "tar of {} failed ({tar_status})", rootfs.display());
    ensure!(status.success(), "docker import of {} failed ({status})", rootfs.display());
    Ok(())
}

/// QEMU's emulator and tools from different releases refuse to be installed together on some
/// machines and misbehave on others; the base must hold one version of both.
fn check_qemu_versions(rootfs: &Path) -> Result<()> {
    let status = fs::read_to_string(rootfs.join("var/lib/dpkg/status")).context("reading the base's dpkg status")?;
    let version = |package: &str| {
        status.split("\n\n").find_map(|stanza| {
            let mut lines = stanza.lines();
            (lines.next() == Some(&format!("Package: {package}")))
                .then(|| stanza.lines().find_map(|l| l.strip_prefix("Version: ")).map(String::from))
                .flatten()
        })
    };
    match (version("qemu-system-x86"), version("qemu-utils")) {
        (Some(a), Some(b)) if a == b => Ok(()),
        (a, b) => bail!("the base holds qemu-system-x86 {a:?} and qemu-utils {b:?}; they must be one version"),
    }
}
