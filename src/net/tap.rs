//! The descriptors QEMU's data NICs use: a TAP made through `/dev/net/tun`, the character
//! device of a macvtap, and `/dev/vhost-net`. This file opens devices and makes device nodes;
//! it never configures an interface (that is `plumb`'s, over netlink).
//!
//! Every descriptor carries `IFF_VNET_HDR`: each frame read or written is prefixed by a
//! `struct virtio_net_hdr` (10 bytes until QEMU sets 12). QEMU 7.2 given `-netdev tap,fd=N`
//! probes the descriptor with `TUNGETIFF` and uses the header only when the flag is there
//! (`vnet_hdr=on` is refused together with `fd=`); with it, a virtio-net guest gets checksum
//! and segmentation offloads (`TUNSETOFFLOAD`). Seen with strace on QEMU 7.2: with the flag,
//! `TUNSETVNETHDRSZ` and `TUNSETOFFLOAD` succeed; without it, `TUNSETVNETHDRSZ` fails with
//! EINVAL and QEMU carries on without offloads. macvtap descriptors have the flag from the
//! start (drivers/net/tap.c sets it on open).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use tracing::debug;

use crate::sys;

/// `IFF_TAP` (linux/if_tun.h): Ethernet frames, not IP packets.
const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`: no 4-byte packet information before each frame.
const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`: a virtio-net header before each frame (see the module docs).
pub const IFF_VNET_HDR: i16 = 0x4000;

/// Where device nodes for macvtaps are made when `/dev` has none: containers have no udev,
/// so `/dev/tapN` does not appear by itself. The node is made, opened and unlinked at once,
/// so nothing stays behind and a stale node can never point at a later macvtap's minor.
pub const DEV_DIR: &str = "/run/vial/dev";

/// Why a descriptor could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun (run the container with --device /dev/net/tun)")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` failed.
    #[error("cannot create tap {name}")]
    CreateTap {
        /// The TAP's name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// The macvtap's device number could not be read from sysfs.
    #[error("cannot read the device number of macvtap {ifindex} from {path}")]
    MacvtapDevice {
        /// The macvtap's interface index.
        ifindex: u32,
        /// The sysfs file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Making the device node failed.
    #[error("cannot make device node {path}")]
    MakeNode {
        /// The node.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Opening the macvtap's device node failed.
    #[error(
        "cannot open macvtap device {path}: a container needs a device cgroup rule for macvtap's \
         devices, here --device-cgroup-rule='c {major}:* rwm' (macvtap's major number on this host, \
         from /proc/devices)"
    )]
    OpenMacvtap {
        /// The node.
        path: PathBuf,
        /// Its major number (allocated at boot; macvtap's line in `/proc/devices`).
        major: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Creates the TAP `name` and returns the only descriptor attached to it (`IFF_TAP |
/// IFF_NO_PI | IFF_VNET_HDR`, close-on-exec, blocking). The TAP is not persistent: it exists
/// exactly as long as a descriptor to it is open (tuntap.rst), so once `vial` hands the
/// descriptor to QEMU and both have closed it, the TAP is gone and nothing leaks.
pub fn create_tap(name: &str) -> Result<OwnedFd, TapError> {
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(TapError::OpenTun)?;
    let fd = OwnedFd::from(tun);
    debug!(name, "TUNSETIFF IFF_TAP|IFF_NO_PI|IFF_VNET_HDR");
    let given = sys::tun_set_iff(fd.as_fd(), name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        .map_err(|source| TapError::CreateTap { name: name.into(), source })?;
    debug_assert_eq!(given, name);
    Ok(fd)
}

/// Reads `major:minor` from a sysfs `dev` file.
fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Opens the character device of the macvtap with interface index `ifindex` (in the calling
/// thread's network namespace). Uses `/dev/tap<ifindex>` when it exists with the right device
/// number (hosts with udev); otherwise makes a node under `DEV_DIR`, opens it and unlinks it.
/// The device number comes from sysfs, which must be mounted from the caller's network
/// namespace (it is in a container; minors are allocated apart from interface indexes).
pub fn open_macvtap(ifindex: u32) -> Result<OwnedFd, TapError> {
    let sysfs = PathBuf::from(format!("/sys/class/macvtap/tap{ifindex}/dev"));
    let (major, minor) = std::fs::read_to_string(&sysfs)
        .and_then(|text| parse_dev(&text).ok_or_else(|| io::Error::other(format!("unexpected content {text:?}"))))
        .map_err(|source| TapError::MacvtapDevice { ifindex, path: sysfs.clone(), source })?;
    let rdev = makedev(major, minor);
    let open = |path: &Path| {
        debug!(path = %path.display(), major, minor, "opening macvtap device");
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
            .map(OwnedFd::from)
            .map_err(|source| TapError::OpenMacvtap { path: path.into(), major, source })
    };

    let in_dev = PathBuf::from(format!("/dev/tap{ifindex}"));
    if let Ok(meta) = std::fs::metadata(&in_dev) {
        if meta.file_type().is_char_device() && meta.rdev() == rdev {
            return open(&in_dev);
        }
    }

    // A unique name per call: several namespaces (tests) or restarts may need one at once.
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let node = Path::new(DEV_DIR).join(format!(
        "tap{ifindex}.{}.{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(DEV_DIR)
        .map_err(|source| TapError::MakeNode { path: node.clone(), source })?;
    debug!(path = %node.display(), major, minor, "mknod");
    mknod(&node, SFlag::S_IFCHR, Mode::from_bits_truncate(0o600), rdev)
        .map_err(|err| TapError::MakeNode { path: node.clone(), source: err.into() })?;
    let opened = open(&node);
    if let Err(err) = std::fs::remove_file(&node) {
        debug!(path = %node.display(), %err, "cannot remove device node");
    }
    opened
}

/// Opens `/dev/vhost-net` when it exists and opens; `None` otherwise (QEMU then moves frames
/// in user space, slower but the same frames).
pub fn open_vhost_net() -> Option<OwnedFd> {
    match OpenOptions::new().read(true).write(true).custom_flags(nix::libc::O_CLOEXEC).open("/dev/vhost-net") {
        Ok(file) => Some(OwnedFd::from(file)),
        Err(err) => {
            debug!(%err, "no /dev/vhost-net");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_macvtap_names_the_device_cgroup_rule_that_allows_it() {
        let err = TapError::OpenMacvtap {
            path: "/run/vial/dev/tap7".into(),
            major: 246,
            source: io::Error::from_raw_os_error(nix::libc::EPERM),
        };
        let text = err.to_string();
        assert!(text.contains("/run/vial/dev/tap7") && text.contains("--device-cgroup-rule='c 246:* rwm'"), "{text}");
    }

    #[test]
    fn sysfs_dev_files_parse() {
        assert_eq!(parse_dev("246:1\n"), Some((246, 1)));
        assert_eq!(parse_dev("garbage"), None);
        assert_eq!(parse_dev("1:x"), None);
    }
}
