//! Who QEMU runs as (`machine.user`, `VIAL_QEMU_USER`). QEMU parses everything the guest
//! sends (virtio rings, 9p requests, the management network's packets); a flaw there is the
//! guest's way into the container, and root in it is far more than QEMU needs. vial opens
//! every device and socket QEMU uses (TAPs, macvtaps, vhost-net, the QMP and console
//! listeners, the snapshot's stream) and hands them over, so an unprivileged QEMU needs only:
//!
//! - read access to the kernel, initrd and disk images, and to everything in the lesson
//!   directory (9p serves it with QEMU's rights; a writable share is written with them too);
//!   its disk overlays are given to it, and so is the empty share vial makes when there is
//!   no lesson;
//! - `/dev/kvm` under KVM (its group is added to QEMU's groups);
//! - the management forwards' ports on loopback, which must not be privileged ports: vial
//!   lowers `net.ipv4.ip_unprivileged_port_start` in the endpoint's network namespace when it
//!   can (Docker sets it to 0 already).
//!
//! `auto`, the default, runs QEMU as [`QemuUser::DEFAULT`] when the image has that user and all
//! of the above holds, and as root otherwise, saying why in status. `root` keeps root. A user
//! name must work, or the start fails naming what is missing.

use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid, User};

use super::Accel;
use crate::config::{Profile, QemuUser};
use crate::sys::{Credentials, KVM_DEVICE};

/// Where the kernel keeps the lowest port an unprivileged process may bind, per network
/// namespace.
pub const UNPRIVILEGED_PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// The user QEMU runs as, when it is not root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name.
    pub name: String,
    /// Its ids and groups, as QEMU gets them.
    pub credentials: Credentials,
}

impl RunAs {
    /// Gives `path` (a file or directory vial made for QEMU) to this user and its group.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        nix::unistd::chown(path, Some(self.credentials.uid), Some(self.credentials.gid)).map_err(Into::into)
    }

    /// Gives the open file `fd` (a pipe QEMU opens by its /proc path) to this user.
    pub fn give_fd(&self, fd: impl std::os::fd::AsFd) -> std::io::Result<()> {
        nix::unistd::fchown(fd, Some(self.credentials.uid), Some(self.credentials.gid)).map_err(Into::into)
    }
}

/// The decision: QEMU's user (`None` is root) and, when `auto` kept root, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The user, or root.
    pub run_as: Option<RunAs>,
    /// Why `auto` runs QEMU as root.
    pub note: Option<String>,
}

impl Choice {
    /// The user's name as status shows it.
    pub fn name(&self) -> &str {
        self.run_as.as_ref().map_or("root", |run_as| run_as.name.as_str())
    }
}

/// Why QEMU cannot run as the user the configuration names.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The image has no such user.
    #[error(
        "machine.user (VIAL_QEMU_USER) = {name:?}: the image has no such user: add it \
         (useradd --system --no-create-home --shell /usr/sbin/nologin {name}), or use auto or root"
    )]
    NoSuchUser {
        /// The name.
        name: String,
    },
    /// The user exists but QEMU could not run as it.
    #[error("machine.user (VIAL_QEMU_USER) = {name:?}: QEMU cannot run as this user: {reason}")]
    Unusable {
        /// The name.
        name: String,
        /// What is missing, with the fix.
        reason: String,
    },
}

/// Decides who QEMU runs as for a start of `profile` with `accel`, sharing `share`, and makes
/// the management ports bindable for it (see the module). `sysctl` is
/// [`UNPRIVILEGED_PORT_START`] (tests give another file).
pub fn choose(profile: &Profile, accel: Accel, share: Option<&Path>, sysctl: &Path) -> Result<Choice, UserError> {
    let (name, required) = match &profile.qemu_user {
        QemuUser::Root => return Ok(Choice { run_as: None, note: None }),
        QemuUser::Auto => (QemuUser::DEFAULT, false),
        QemuUser::Named(name) => (name.as_str(), true),
    };
    let root = |note: String| Ok(Choice { run_as: None, note: Some(note) });
    let user = match User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) if required => return Err(UserError::NoSuchUser { name: name.into() }),
        Ok(None) => return root(format!("qemu runs as root: the image has no user {name}")),
        Err(err) if required => {
            return Err(UserError::Unusable { name: name.into(), reason: format!("cannot look it up: {err}") })
        }
        Err(err) => return root(format!("qemu runs as root: cannot look up the user {name}: {err}")),
    };
    let mut run_as = RunAs {
        name: name.into(),
        credentials: Credentials { uid: user.uid, gid: user.gid, groups: groups_of(&user) },
    };
    match obstacle(profile, accel, share, sysctl, &mut run_as) {
        None => Ok(Choice { run_as: Some(run_as), note: None }),
        Some(reason) if required => Err(UserError::Unusable { name: name.into(), reason }),
        Some(reason) => root(format!("qemu runs as root, not {name}: {reason}")),
    }
}

/// The user's groups: its primary group and those /etc/group lists it in.
fn groups_of(user: &User) -> Vec<Gid> {
    let name = std::ffi::CString::new(user.name.as_str()).unwrap_or_default();
    nix::unistd::getgrouplist(&name, user.gid).unwrap_or_else(|_| vec![user.gid])
}

/// What keeps `run_as` from running this QEMU, if anything, with the fix; adds the groups it
/// needs and lowers the unprivileged port start as it goes.
fn obstacle(
    profile: &Profile,
    accel: Accel,
    share: Option<&Path>,
    sysctl: &Path,
    run_as: &mut RunAs,
) -> Option<String> {
    let who = &run_as.credentials;
    let mut files: Vec<(&Path, Access)> = Vec::new();
    if let Some(boot) = &profile.boot {
        files.push((&boot.kernel, Access::Read));
        files.extend(boot.initrd.as_deref().map(|initrd| (initrd, Access::Read)));
    }
    files.extend(profile.disks.iter().map(|disk| (disk.path.as_path(), Access::Read)));
    files.extend(share.map(|dir| (dir, Access::List)));
    for (path, access) in files {
        if let Err(reason) = allowed(path, access, who) {
            return Some(format!(
                "{reason}: make it readable by {} (chmod o+r, or chgrp), or set VIAL_QEMU_USER=root",
                run_as.name
            ));
        }
    }
    if let Some(dir) = share {
        if let Err(reason) = tree_readable(dir, who) {
            return Some(format!(
                "{reason}, and the guest reads the lesson with QEMU's rights: make the lesson readable by {} \
                 (chmod -R o+rX), or set VIAL_QEMU_USER=root",
                run_as.name
            ));
        }
    }
    if accel == Accel::Kvm {
        match device_group(Path::new(KVM_DEVICE), who) {
            Ok(Some(group)) => run_as.credentials.groups.push(group),
            Ok(None) => {}
            Err(reason) => {
                return Some(format!(
                    "{reason}: QEMU needs it for KVM; give /dev/kvm to a group (kvm), or set VIAL_QEMU_USER=root"
                ))
            }
        }
    }
    let lowest = profile.forwards.iter().map(|f| f.container_port).min()?;
    ports_bindable(lowest, sysctl).err()
}

/// What a file must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read a file.
    Read,
    /// Read and search a directory.
    List,
}

/// Whether `who` may reach `path` and do `access` on it, by its mode bits and those of every
/// directory above it (ACLs aside); `Err` names the first that stops it.
fn allowed(path: &Path, access: Access, who: &Credentials) -> Result<(), String> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut dirs: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_path_buf).collect();
    dirs.reverse();
    for dir in dirs {
        if !permits(&dir, Mode::S_IXOTH, who)? {
            return Err(format!("{} cannot be searched by uid {}", dir.display(), who.uid));
        }
    }
    let want = match access {
        Access::Read => Mode::S_IROTH,
        Access::List => Mode::S_IROTH | Mode::S_IXOTH,
    };
    if !permits(&path, want, who)? {
        return Err(format!("{} cannot be read by uid {}", path.display(), who.uid));
    }
    Ok(())
}

/// How many entries of the lesson directory [`tree_readable`] looks at; a lesson has tens.
const TREE_LIMIT: usize = 10_000;

/// Whether every file and directory under `dir` (not following symbolic links, up to
/// [`TREE_LIMIT`] entries) can be read by `who`; `Err` names the first that cannot.
fn tree_readable(dir: &Path, who: &Credentials) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let mut pending = vec![dir.to_path_buf()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            seen += 1;
            if seen > TREE_LIMIT {
                tracing::debug!(dir = %dir.display(), limit = TREE_LIMIT, "lesson directory not checked past its first entries");
                return Ok(());
            }
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            let want = if meta.is_dir() {
                Mode::S_IROTH | Mode::S_IXOTH
            } else if meta.is_file() {
                Mode::S_IROTH
            } else {
                continue;
            };
            if !granted(meta.mode(), Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid()), want.bits(), who) {
                return Err(format!("{} cannot be read by uid {}", entry.path().display(), who.uid));
            }
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Whether `path`'s mode grants `want` (given as the "other" bits) to `who`, the way the
/// kernel checks it: the owner's bits for the owner, the group's for a member, else other's.
fn permits(path: &Path, want: Mode, who: &Credentials) -> Result<bool, String> {
    let stat = nix::sys::stat::stat(path).map_err(|err| format!("{}: {err}", path.display()))?;
    Ok(granted(stat.st_mode, Uid::from_raw(stat.st_uid), Gid::from_raw(stat.st_gid), want.bits(), who))
}

/// The mode check of [`permits`] on plain values: `want` is in the "other" position (0o7).
fn granted(mode: u32, owner: Uid, group: Gid, want: u32, who: &Credentials) -> bool {
    if who.uid.is_root() {
        return true;
    }
    let bits = if owner == who.uid {
        mode >> 6
    } else if group == who.gid || who.groups.contains(&group) {
        mode >> 3
    } else {
        mode
    };
    bits & want == want
}

/// The group `who` must join to open the device at `path` read-write (`None` when it can
/// already), or why it cannot.
fn device_group(path: &Path, who: &Credentials) -> Result<Option<Gid>, String> {
    let stat = nix::sys::stat::stat(path).map_err(|err| format!("{}: {err}", path.display()))?;
    let (owner, group) = (Uid::from_raw(stat.st_uid), Gid::from_raw(stat.st_gid));
    let rw = (Mode::S_IROTH | Mode::S_IWOTH).bits();
    if granted(stat.st_mode, owner, group, rw, who) {
        return Ok(None);
    }
    let joined = Credentials { groups: vec![group], ..who.clone() };
    if owner != who.uid && granted(stat.st_mode, owner, group, rw, &joined) {
        return Ok(Some(group));
    }
    Err(format!("{} (mode {:o}) is not open to uid {} or to its group", path.display(), stat.st_mode & 0o777, who.uid))
}

/// Makes `port` bindable without privilege in this network namespace: reads `sysctl` and
/// lowers it to `port` when it is above. `Err` says why it cannot, with the fix.
fn ports_bindable(port: u16, sysctl: &Path) -> Result<(), String> {
    let start: u32 = match std::fs::read_to_string(sysctl) {
        Ok(text) => text.trim().parse().unwrap_or(1024),
        // No such sysctl (a kernel before 4.11): every port under 1024 is privileged.
        Err(_) => 1024,
    };
    if u32::from(port) >= start {
        return Ok(());
    }
    match std::fs::write(sysctl, port.to_string()) {
        Ok(()) => {
            tracing::info!(from = start, to = port, "lowered net.ipv4.ip_unprivileged_port_start for qemu's forwards");
            Ok(())
        }
        Err(err) => Err(format!(
            "port {port} is privileged here (net.ipv4.ip_unprivileged_port_start = {start}) and vial cannot lower it \
             ({err}): run the container with --sysctl net.ipv4.ip_unprivileged_port_start=0 (Docker's default)"
        )),
    }
}

#[cfg(test)]
mod tests;
