//! `cargo xtask setup`: installs what building and testing vial needs on a Debian machine
//! (the packages, the musl target), and says exactly what is missing when it cannot install.
//! Every other command that needs the packages calls it first, so the README's two commands
//! work on a fresh machine.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages, each with a file that proves it is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("qemu-utils", "/usr/bin/qemu-img"),
    ("linux-image-amd64", "/usr/share/doc/linux-image-amd64"),
    ("busybox-static", "/bin/busybox"),
    ("xz-utils", "/usr/bin/xz"),
    ("iproute2", "/usr/sbin/ip"),
    ("util-linux", "/usr/bin/unshare"),
    ("curl", "/usr/bin/curl"),
    // The data-plane part of `cargo xtask bench`.
    ("iperf3", "/usr/bin/iperf3"),
    ("ethtool", "/usr/sbin/ethtool"),
    // Endpoint images (cargo xtask image) and their tests.
    ("docker.io", "/usr/sbin/dockerd"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    ("e2fsprogs", "/usr/sbin/mkfs.ext4"),
    ("openssh-client", "/usr/bin/ssh"),
    ("sshpass", "/usr/bin/sshpass"),
    // `cargo xtask lint` (and the shellcheck part of `cargo xtask test`).
    ("shellcheck", "/usr/bin/shellcheck"),
];

/// Debian's pip for `/usr/bin/python3` (python3-pip): it fetches the PyPI wheels of the
/// plain-container images (`image::wheels`); without it, `python3` on the PATH must have pip.
pub(crate) const DEBIAN_PIP: &str = "/usr/lib/python3/dist-packages/pip";

/// Whether some Python can run `-m pip`: Debian's (a look at its files), else `python3` on
/// the PATH (pyenv and the like), asked only when Debian's is missing.
fn pip_installed() -> bool {
    std::path::Path::new(DEBIAN_PIP).is_dir()
        || Command::new("python3")
            .args(["-m", "pip", "--version"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

fn installed(package: &str, proof: &str) -> bool {
    let ok = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"));
    ok && std::path::Path::new(proof).exists()
}

/// The distribution's codename (`bookworm`), from /etc/os-release.
fn codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).map(|v| v.trim_matches('"').to_string())
}

/// Installs the missing packages (as root) or fails naming them.
pub(crate) fn run() -> Result<()> {
    let mut missing: Vec<String> = PACKAGES
        .iter()
        .filter(|(package, proof)| !installed(package, proof))
        .map(|(package, _)| package.to_string())
        .collect();
    if !pip_installed() {
        missing.push("python3-pip".into());
    }
    // QEMU's tools and emulator must come from one release: some machine images carry a
    // newer qemu-utils (from backports) that refuses to coexist with the release's
    // qemu-system, so install both from the release itself.
    if missing.iter().any(|p| p == "qemu-system-x86") {
        if let Some(codename) = codename() {
            missing.retain(|p| p != "qemu-utils");
            missing.push(format!("qemu-utils/{codename}"));
        }
    }
    if !missing.is_empty() {
        let list = missing.join(" ");
        if !is_root() {
            bail!("missing Debian packages; run as root: apt-get install -y --no-install-recommends {list}");
        }
        println!("installing: {list}");
        let status = Command::new("apt-get").args(["update", "-qq"]).status().context("running apt-get update")?;
        if !status.success() {
            bail!("apt-get update failed");
        }
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "--allow-downgrades"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?;
        if !status.success() {
            bail!("apt-get install {list} failed");
        }
    }
    Ok(())
}

fn is_root() -> bool {
    // The effective uid from /proc: xtask keeps to std and anyhow.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}
