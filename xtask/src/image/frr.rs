//! The `frr` appliance: a router made from Debian packages only, the stand-in for a vendor
//! appliance in every test. Its "factory image" is a bookworm root filesystem made with
//! debootstrap (FRR, openssh-server, lldpd, iperf3, ifupdown with isc-dhcp-client, sudo,
//! systemd, Debian's kernel), given the defaults a vendor would ship:
//!
//! - hostname `frr`, the root filesystem on `/dev/vda`, a root login with password `root`
//!   (the first boot logs in with it, and locks it again before powering off);
//! - an initramfs holding only what a virtio VM needs to mount its root (small, so it loads
//!   fast under TCG), and no sound, GPU, media, wireless or InfiniBand modules.
//!
//! Everything an endpoint needs beyond that (user `antidote`, DHCP on eth0, SSH, ospfd, the
//! lesson files) is done by the first boot, through the serial console, from the steps in
//! `vm-profiles/frr.toml`. The disk is made without loop devices or mounts (`mkfs.ext4 -d`),
//! booted with the kernel and initramfs from the root filesystem's /boot, and shipped as a
//! compressed qcow2 with them. This module never runs QEMU itself (see [`super::first_boot`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use vial::config::profile::{Boot, Disk};

use super::debootstrap;
use super::ImageProfile;

/// The appliance's packages (over debootstrap's minbase; Depends are resolved, Recommends not).
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "kmod",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "iputils-ping",
    "traceroute",
    "tcpdump",
    "netbase",
    "procps",
    "less",
    "vim-tiny",
    "openssh-server",
    "sudo",
    "frr",
    "lldpd",
    "iperf3",
];

/// The root password the "factory image" ships with; `vm-profiles/frr.toml` logs in with it.
pub(crate) const FACTORY_ROOT_PASSWORD: &str = "root";

/// Modules the initramfs holds (MODULES=list): what mounting the root disk of a virtio VM takes.
const INITRAMFS_MODULES: &str = "virtio_pci\nvirtio_blk\next4\n";

/// Module directories (under /lib/modules/<version>/) that a router VM never loads.
const PRUNED_MODULES: &[&str] = &[
    "kernel/sound",
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/infiniband",
    "kernel/drivers/net/wireless",
    "kernel/drivers/staging",
    "kernel/drivers/iio",
    "kernel/drivers/comedi",
    "kernel/drivers/bluetooth",
    "kernel/net/bluetooth",
    "kernel/net/mac80211",
    "kernel/net/wireless",
];

/// Paths emptied in the root filesystem: apt's lists and caches (the appliance has no egress).
const PRUNED_PATHS: &[&str] = &["var/cache/apt", "var/lib/apt/lists"];

/// The size of the root filesystem (sparse; the qcow2 holds only what is used).
const DISK_SIZE: &str = "2G";

/// Part of the cache keys: bump when this file changes how the root filesystem is made.
const ROOTFS_VERSION: u32 = 1;

/// Fills `staged`, the build context's directory for the image's files (`images/`), with the
/// kernel, the initramfs and the first-booted disk, under the file names the profile gives them.
pub(super) fn stage(image: &ImageProfile, staged: &Path, rebuild: bool) -> Result<()> {
    let profile = &image.profile;
    let (Some(boot), [disk]) = (&profile.boot, profile.disks.as_slice()) else {
        bail!("{}: the frr recipe needs a [boot] kernel and initrd and exactly one disk", image.path.display());
    };
    let (rootfs, rootfs_stamp) = rootfs(rebuild)?;
    let (kernel, initrd) = boot_files(&rootfs)?;

    let work = super::work_dir("frr");
    let raw = work.join("disk.raw");
    let host_boot = Boot { kernel: kernel.clone(), initrd: Some(initrd.clone()), append: boot.append.clone() };
    let host_disk = Disk { path: raw.clone(), format: "raw".into(), interface: disk.interface.clone() };
    let make_disk = || -> Result<()> {
        let _ = fs::remove_file(&raw);
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args(["-q", "-F", "-L", "root", "-d"]).arg(&rootfs).arg(&raw).arg(DISK_SIZE);
        println!("image: {}", crate::display_cmd(&cmd));
        let status = cmd.status().context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
        ensure!(status.success(), "`{}` failed ({status})", crate::display_cmd(&cmd));
        Ok(())
    };
    let shipped =
        super::first_booted_disk(image, &work, &rootfs_stamp, make_disk, Some(host_boot), host_disk, rebuild)?;

    fs::create_dir_all(staged)?;
    let name = |path: &Path| staged.join(path.file_name().expect("validated profile paths name files"));
    super::link_or_copy(&shipped, &name(&disk.path))?;
    super::link_or_copy(&kernel, &name(&boot.kernel))?;
    let profile_initrd = boot.initrd.as_ref().context("the frr profile needs an initrd")?;
    super::link_or_copy(&initrd, &name(profile_initrd))?;
    Ok(())
}

/// The appliance's root filesystem in `target/image/cache/frr-rootfs`, made when missing or
/// when its inputs changed; returns it with its stamp.
fn rootfs(rebuild: bool) -> Result<(PathBuf, String)> {
    let cache = super::cache_dir();
    let rootfs = cache.join("frr-rootfs");
    let stamp_path = cache.join("frr-rootfs.stamp");
    let stamp = super::stamp(&[
        debootstrap::SUITE.as_bytes(),
        debootstrap::mirror().as_bytes(),
        PACKAGES.join(",").as_bytes(),
        FACTORY_ROOT_PASSWORD.as_bytes(),
        INITRAMFS_MODULES.as_bytes(),
        PRUNED_MODULES.join(",").as_bytes(),
        PRUNED_PATHS.join(",").as_bytes(),
        &ROOTFS_VERSION.to_le_bytes(),
    ]);
    if !rebuild && rootfs.join("bin/sh").exists() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        println!("image: root filesystem {} is up to date", rootfs.display());
        return Ok((rootfs, stamp));
    }
    let _ = fs::remove_file(&stamp_path);
    debootstrap::run(PACKAGES, &rootfs)?;
    factory_defaults(&rootfs)?;
    fs::write(&stamp_path, &stamp)?;
    Ok((rootfs, stamp))
}

/// What the "vendor" ships beyond the packages (see the module docs).
fn factory_defaults(rootfs: &Path) -> Result<()> {
    let write = |path: &str, text: &str| -> Result<()> {
        let path = rootfs.join(path);
        let _ = fs::remove_file(&path);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("etc/hostname", "frr\n")?;
    write("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tfrr\n::1\tlocalhost ip6-localhost ip6-loopback\n")?;
    write("etc/fstab", "# The root filesystem is the kernel's root=/dev/vda.\n/dev/vda\t/\text4\tdefaults\t0\t0\n")?;
    // debootstrap copied the build host's; the appliance's DHCP client writes its own.
    let _ = fs::remove_file(rootfs.join("etc/resolv.conf"));
    chroot(rootfs, &["chpasswd"], Some(&format!("root:{FACTORY_ROOT_PASSWORD}\n")))?;

    let modules = rootfs.join("lib/modules");
    let versions: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    ensure!(versions.len() == 1, "expected one kernel in {}, found {versions:?}", modules.display());
    let version = &versions[0];
    for dir in PRUNED_MODULES {
        let dir = modules.join(version).join(dir);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    chroot(rootfs, &["depmod", "-a", version], None)?;
    write("etc/initramfs-tools/modules", INITRAMFS_MODULES)?;
    let conf = rootfs.join("etc/initramfs-tools/initramfs.conf");
    let text = fs::read_to_string(&conf)?;
    fs::write(&conf, text.replace("MODULES=most", "MODULES=list"))?;
    chroot(rootfs, &["update-initramfs", "-u", "-k", version], None)?;
    for entry in fs::read_dir(rootfs.join("boot"))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".dpkg-bak") || name.ends_with(".new") {
            fs::remove_file(entry.path())?;
        }
    }
    for path in PRUNED_PATHS {
        let path = rootfs.join(path);
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
    }
    Ok(())
}

/// Runs a program of the root filesystem inside it (chroot, no mounts), with `input` on stdin.
fn chroot(rootfs: &Path, args: &[&str], input: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("chroot");
    cmd.arg(rootfs).args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").stdout(Stdio::null());
    cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().with_context(|| format!("running `{}`", crate::display_cmd(&cmd)))?;
    if let Some(input) = input {
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    let status = child.wait()?;
    ensure!(status.success(), "`{}` failed ({status})", crate::display_cmd(&cmd));
    Ok(())
}

/// The kernel and initramfs in the root filesystem's /boot.
fn boot_files(rootfs: &Path) -> Result<(PathBuf, PathBuf)> {
    let boot = rootfs.join("boot");
    let find = |prefix: &str| -> Result<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(&boot)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .collect();
        ensure!(found.len() == 1, "expected one {prefix}* in {}, found {found:?}", boot.display());
        Ok(found.remove(0))
    };
    Ok((find("vmlinuz-")?, find("initrd.img-")?))
}
