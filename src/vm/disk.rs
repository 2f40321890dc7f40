//! Copy-on-write overlays: the image's disk is never written. Each profile disk gets a qcow2
//! overlay in the state directory whose backing file is the image's disk. An overlay left by
//! an earlier run of the same container (`docker restart`) is kept, so the appliance keeps
//! its configuration across restarts the way a real box does; a new container starts fresh.
//!
//! A RAM snapshot's disk layers are overlays too, made the same way in the snapshot's
//! directory while the guest that was saved ran: a layer has the file name of the overlay of
//! the same disk ([`overlay_path`] names both), and an endpoint that starts from a snapshot
//! puts its overlays over the layers instead of the image's disks ([`Base::Layers`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::profile::Disk;

/// Why an overlay could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// `qemu-img` is not installed.
    #[error("qemu-img not found on PATH: install it (Debian package qemu-utils) in the image")]
    QemuImgMissing,
    /// The state directory could not be created.
    #[error("cannot create state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img create` failed.
    #[error("qemu-img create for {base} failed: {stderr}")]
    Create {
        /// The image's disk.
        base: PathBuf,
        /// What qemu-img said.
        stderr: String,
    },
}

/// The overlay (or snapshot layer) of disk `index` in directory `dir`.
pub fn overlay_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("disk{index}.qcow2"))
}

/// What a new overlay goes over.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// The image's disks, as the profile names them.
    Image,
    /// The layers of the snapshot in this directory.
    Layers(&'a Path),
}

/// Removes the overlay (or layer) of every disk in `dir`; a missing one is fine.
pub fn remove_all(disks: &[Disk], dir: &Path) {
    for i in 0..disks.len() {
        let path = overlay_path(dir, i);
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::debug!(overlay = %path.display(), "overlay removed"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(overlay = %path.display(), %err, "cannot remove overlay"),
        }
    }
}

/// The `qemu-img` arguments that create an overlay at `overlay` over `base` in `format` (pure).
pub fn overlay_args(base: &Path, format: &str, overlay: &Path) -> Vec<String> {
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        format.into(),
        "-b".into(),
        base.display().to_string(),
        overlay.display().to_string(),
    ]
}

/// Whether an earlier run left an overlay in `state_dir` (the guest's disk then differs from
/// the image's, and from any snapshot's).
pub fn has_overlays(disks: &[Disk], state_dir: &Path) -> bool {
    (0..disks.len()).any(|i| overlay_path(state_dir, i).exists())
}

/// The first bytes of every qcow2 file (`QFI\xfb`).
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Whether `path` starts like a qcow2 file: an overlay that does not (cut short by a crash
/// while it was written, or not vial's) is made again rather than handed to QEMU.
fn looks_like_qcow2(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut file| file.read_exact(&mut magic)).is_ok() && &magic == QCOW2_MAGIC
}

/// Creates (or keeps) an overlay for every disk in `state_dir` and returns their paths in
/// order, each over `base`. An overlay is written under a temporary name and renamed, so a
/// crash never leaves a half-written one under its real name; one that does not look like a
/// qcow2 file anyway is made again. qemu-img is one of vial's own children (the reaper
/// leaves it to this wait).
pub fn prepare_overlays(disks: &[Disk], state_dir: &Path, base: Base<'_>) -> Result<Vec<PathBuf>, OverlayError> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(state_dir).map_err(|source| OverlayError::StateDir { path: state_dir.into(), source })?;
    let mut overlays = Vec::new();
    for (i, disk) in disks.iter().enumerate() {
        let overlay = overlay_path(state_dir, i);
        let partial = overlay.with_extension("qcow2.partial");
        let _ = std::fs::remove_file(&partial);
        if overlay.is_file() && !looks_like_qcow2(&overlay) {
            tracing::warn!(overlay = %overlay.display(), "an earlier run's overlay is not a qcow2 file (cut short?); making it again");
            let _ = std::fs::remove_file(&overlay);
        }
        if overlay.is_file() {
            tracing::info!(overlay = %overlay.display(), "keeping the overlay of an earlier run");
        } else {
            tracing::debug!(base = %disk.path.display(), overlay = %overlay.display(), "creating overlay");
            let args = match base {
                Base::Layers(dir) => overlay_args(&overlay_path(dir, i), "qcow2", &partial),
                Base::Image => overlay_args(&disk.path, &disk.format, &partial),
            };
            let mut command = Command::new("qemu-img");
            command.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            let output = crate::reaper::spawn_own(&mut command, Command::spawn)
                .and_then(|child| {
                    let pid = child.id();
                    let output = child.wait_with_output();
                    crate::reaper::disown(pid);
                    output
                })
                .map_err(|err| match err.kind() {
                    std::io::ErrorKind::NotFound => OverlayError::QemuImgMissing,
                    _ => OverlayError::Create { base: disk.path.clone(), stderr: err.to_string() },
                })?;
            if !output.status.success() {
                let _ = std::fs::remove_file(&partial);
                return Err(OverlayError::Create {
                    base: disk.path.clone(),
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
                });
            }
            std::fs::rename(&partial, &overlay).map_err(|err| OverlayError::Create {
                base: disk.path.clone(),
                stderr: format!("renaming {} into place: {err}", partial.display()),
            })?;
        }
        overlays.push(overlay);
    }
    Ok(overlays)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_args_name_backing_format_and_absolute_base() {
        let args = overlay_args(Path::new("/images/cvx.qcow2"), "qcow2", Path::new("/var/lib/vial/disk0.qcow2"));
        assert_eq!(args.join(" "), "create -q -f qcow2 -F qcow2 -b /images/cvx.qcow2 /var/lib/vial/disk0.qcow2");
    }

    #[test]
    fn overlay_is_created_and_base_untouched() {
        let dir = std::env::temp_dir().join(format!("vial-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let before = std::fs::metadata(&base).unwrap().modified().unwrap();
        let disk = Disk { path: base.clone(), format: "raw".into(), interface: "virtio".into() };
        let overlays = prepare_overlays(std::slice::from_ref(&disk), &dir.join("state"), Base::Image)
            .expect("qemu-img must be installed (qemu-utils)");
        assert!(overlays[0].is_file());
        // A second run keeps the first run's overlay.
        assert_eq!(prepare_overlays(std::slice::from_ref(&disk), &dir.join("state"), Base::Image).unwrap(), overlays);
        // A crash's leftovers: a half-written overlay under its real name, and a partial one.
        std::fs::write(&overlays[0], b"QF").unwrap();
        std::fs::write(overlays[0].with_extension("qcow2.partial"), b"junk").unwrap();
        assert_eq!(prepare_overlays(std::slice::from_ref(&disk), &dir.join("state"), Base::Image).unwrap(), overlays);
        assert!(looks_like_qcow2(&overlays[0]), "the cut-short overlay was kept");
        assert!(!overlays[0].with_extension("qcow2.partial").exists(), "the partial overlay was left");
        remove_all(std::slice::from_ref(&disk), &dir.join("state"));
        assert!(!overlays[0].exists());
        assert_eq!(std::fs::metadata(&base).unwrap().modified().unwrap(), before);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
