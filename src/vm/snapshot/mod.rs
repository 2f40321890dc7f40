//! RAM snapshots: a booted guest saved once (`vial snapshot`, at image build time) and loaded
//! at every start instead of booting, when it fits.
//!
//! A snapshot is a directory: `vmstate` (QEMU's migration stream of the paused guest),
//! `disk<N>.qcow2` (each disk's writes up to that moment, a qcow2 layer over the image's disk)
//! and `snapshot.json` (the [`Manifest`]: what the guest was started with). The state lives
//! next to the disks rather than inside them (`savevm`) because vial runs every disk through
//! an overlay, and `-loadvm` cannot see a snapshot in an overlay's backing file.
//!
//! A migration stream loads only into the same machine: same QEMU, machine type, CPU model,
//! memory, devices, kernel and disks. The manifest records the guest-visible command line
//! (with everything that differs per endpoint, such as the name and paths, held fixed) and
//! the size and time of every file the guest sees; a start whose own differ boots cold and
//! says why. The devices the snapshot lacks (9p, data NICs) are hot-plugged after it loads.
//!
//! This file owns the format and the fit check (pure); `save` makes a snapshot (`vial
//! snapshot`), `restore` starts an endpoint from one.

pub mod restore;
pub mod save;

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::{qemu_argv, Accel, Launch};
use crate::config::Profile;

/// Why a snapshot cannot be used; the endpoint then boots cold, and its status says this.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The manifest cannot be read.
    #[error("no snapshot at {}", path.display())]
    NoManifest {
        /// The manifest's path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest is not JSON of the right shape.
    #[error("{} is not a snapshot manifest", path.display())]
    BadManifest {
        /// The manifest's path.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The manifest is of another format.
    #[error("{} has format {found}, this vial reads format {FORMAT}: make the snapshot again (vial snapshot)", path.display())]
    Format {
        /// The manifest's path.
        path: PathBuf,
        /// Its format.
        found: u32,
    },
    /// The start's machine is not the snapshot's.
    #[error("the machine differs from the snapshot's: argument {index} is `{now}`, the snapshot has `{was}`")]
    MachineDiffers {
        /// The first differing argument.
        index: usize,
        /// This start's.
        now: String,
        /// The snapshot's.
        was: String,
    },
    /// The snapshot was made under KVM on another host CPU.
    #[error("the snapshot was made under KVM on {was}; this host's CPU is {now}")]
    HostCpu {
        /// This host's.
        now: String,
        /// The snapshot's.
        was: String,
    },
    /// A file the guest sees changed.
    #[error("{} changed since the snapshot ({} bytes, mtime {}; the snapshot saw {} bytes, mtime {})", now.path.display(), now.bytes, now.modified, was.bytes, was.modified)]
    FileChanged {
        /// The file now.
        now: FileStamp,
        /// The file as the snapshot saw it.
        was: FileStamp,
    },
    /// A file the guest sees is not in the manifest.
    #[error("the snapshot does not know {}", path.display())]
    FileUnknown {
        /// The file.
        path: PathBuf,
    },
    /// An earlier run's overlay is kept, and the snapshot's memory does not know its changes.
    #[error("an earlier run of this container changed its disk (its overlay is kept), and the snapshot's memory does not know those changes")]
    OverlayKept,
    /// Data NICs on the command line that nothing would make the guest look for.
    #[error("the multifunction NIC layout's {nics} data NIC(s) reach a snapshot's guest when the lesson share's hot-plug makes it rescan the PCI bus, and this start has no share")]
    NoRescan {
        /// How many.
        nics: usize,
    },
    /// Another QEMU.
    #[error("this is QEMU {running}; the snapshot was made by QEMU {snapshot}")]
    QemuVersion {
        /// The QEMU that runs.
        running: String,
        /// The snapshot's.
        snapshot: String,
    },
    /// The migration stream cannot be opened.
    #[error("cannot open {}", path.display())]
    OpenVmstate {
        /// The stream.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The overlays over the snapshot's layers cannot be made.
    #[error(transparent)]
    Overlay(#[from] super::disk::OverlayError),
    /// QEMU could not be started.
    #[error(transparent)]
    Launch(#[from] super::qemu::LaunchError),
    /// QEMU exited while loading: QEMU 7.2 does when a stream does not fit.
    #[error("qemu exited while loading the snapshot (its message is in the log above)")]
    QemuExited,
    /// A QMP step failed.
    #[error("{step}")]
    Qmp {
        /// What vial was doing.
        step: &'static str,
        /// Why it failed.
        source: crate::qmp::QmpError,
    },
}

/// The migration stream.
pub const VMSTATE: &str = "vmstate";
/// The manifest.
pub const MANIFEST: &str = "snapshot.json";
/// The manifest format this vial writes and reads.
pub const FORMAT: u32 = 1;

/// A file the guest sees, as it was when the snapshot was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// The path.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its modification time (seconds since the epoch).
    pub modified: u64,
}

/// `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// QEMU's version as `query-version` tells it (`7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`).
    pub qemu: String,
    /// The guest-visible command line ([`machine_argv`]).
    pub machine: Vec<String>,
    /// Kernel, initrd and disks.
    pub files: Vec<FileStamp>,
    /// Size of `vmstate`.
    pub vmstate_bytes: u64,
    /// When it was made (seconds since the epoch).
    pub created: u64,
    /// The host CPU it was made on, under KVM (where `-cpu host` gives the guest the host's
    /// CPU); none under TCG, whose CPU models are the same on every host.
    #[serde(default)]
    pub host_cpu: Option<String>,
}

/// The host CPU a start under `accel` gives its guest, as far as a snapshot cares: `/proc/
/// cpuinfo`'s model name and a digest of its flags under KVM; `None` under TCG.
pub fn host_cpu(accel: Accel) -> Option<String> {
    if accel != Accel::Kvm {
        return None;
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let mut digest: u32 = 0x811c_9dc5;
    for byte in field("flags").bytes() {
        digest = (digest ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    Some(format!("{} (flags {digest:08x})", field("model name")))
}

/// Whether a snapshot made on `was` (see [`host_cpu`]) fits a start on `now`.
pub fn check_host_cpu(was: Option<&str>, now: Option<&str>) -> Result<(), SnapshotError> {
    match (was, now) {
        (Some(was), Some(now)) if was != now => {
            Err(SnapshotError::HostCpu { now: now.to_string(), was: was.to_string() })
        }
        _ => Ok(()),
    }
}

/// The command line that defines the guest's machine, with everything that varies per
/// endpoint and per run held fixed: the name, the run directory, the overlays, the control
/// descriptor; no share and no data NICs (a snapshot never has them). Two starts whose
/// `machine_argv` agree run the same virtual hardware.
pub fn machine_argv(profile: &Profile, accel: Accel, extra_args: &[String]) -> Vec<String> {
    let launch = Launch {
        accel,
        run_dir: PathBuf::from("/run/vial"),
        disks: (0..profile.disks.len()).map(|i| PathBuf::from(format!("disk{i}.qcow2"))).collect(),
        share: None,
        control_fd: 3,
        listener_fds: None,
        name: "snapshot".into(),
        data_nics: Vec::new(),
        extra_args: extra_args.to_vec(),
        restore: false,
        console_log_fd: None,
        sandbox: false,
    };
    qemu_argv(profile, &launch).into_iter().map(|a| a.to_string_lossy().into_owned()).collect()
}

/// The files of the profile the guest sees (kernel, initrd, disks), stamped as they are now.
/// A file that cannot be read gets size and time 0 (so it never matches a real stamp).
pub fn file_stamps(profile: &Profile) -> Vec<FileStamp> {
    let mut paths: Vec<&Path> = Vec::new();
    if let Some(boot) = &profile.boot {
        paths.push(&boot.kernel);
        paths.extend(boot.initrd.as_deref());
    }
    paths.extend(profile.disks.iter().map(|d| d.path.as_path()));
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok();
            FileStamp {
                path: path.to_path_buf(),
                bytes: meta.as_ref().map_or(0, |m| m.len()),
                modified: meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs()),
            }
        })
        .collect()
}

/// Reads `dir/snapshot.json`. The error says why the snapshot cannot be used.
pub fn load_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let text =
        std::fs::read_to_string(&path).map_err(|source| SnapshotError::NoManifest { path: path.clone(), source })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| SnapshotError::BadManifest { path: path.clone(), source })?;
    if manifest.format != FORMAT {
        return Err(SnapshotError::Format { path, found: manifest.format });
    }
    Ok(manifest)
}

/// Whether a snapshot made as `manifest` says fits a start with this machine and these files;
/// the error names the first difference.
pub fn check_fits(manifest: &Manifest, machine: &[String], files: &[FileStamp]) -> Result<(), SnapshotError> {
    if manifest.machine != machine {
        let index = manifest.machine.iter().zip(machine).take_while(|(a, b)| a == b).count();
        let was = manifest.machine.get(index).map_or("(end)", String::as_str).to_string();
        let now = machine.get(index).map_or("(end)", String::as_str).to_string();
        return Err(SnapshotError::MachineDiffers { index, now, was });
    }
    for stamp in files {
        match manifest.files.iter().find(|f| f.path == stamp.path) {
            Some(was) if was == stamp => {}
            Some(was) => return Err(SnapshotError::FileChanged { now: stamp.clone(), was: was.clone() }),
            None => return Err(SnapshotError::FileUnknown { path: stamp.path.clone() }),
        }
    }
    Ok(())
}

/// Removes the snapshot in `dir` whole: manifest first (a directory without one holds no
/// snapshot), then the stream and the disk layers.
pub fn remove(dir: &Path, disks: &[crate::config::profile::Disk]) {
    let _ = std::fs::remove_file(dir.join(MANIFEST));
    let _ = std::fs::remove_file(dir.join(VMSTATE));
    super::disk::remove_all(disks, dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProfileFile;

    fn profile(memory: &str) -> Profile {
        let text = format!(
            "name = \"t\"\n[machine]\nmemory = \"{memory}\"\n[boot]\nkernel = \"/nonexistent/vmlinuz\"\n\
             [readiness]\nprobe = \"serial\"\npattern = \"login:\"\n"
        );
        ProfileFile::parse(&text, "t.toml").unwrap().validate().unwrap()
    }

    fn manifest(profile: &Profile) -> Manifest {
        Manifest {
            format: FORMAT,
            qemu: "7.2.22".into(),
            machine: machine_argv(profile, Accel::Tcg, &[]),
            files: file_stamps(profile),
            vmstate_bytes: 1,
            created: 0,
            host_cpu: None,
        }
    }

    #[test]
    fn a_kvm_snapshot_fits_only_the_host_cpu_it_was_made_on() {
        check_host_cpu(None, None).unwrap();
        check_host_cpu(Some("EPYC (flags 1)"), Some("EPYC (flags 1)")).unwrap();
        let err = check_host_cpu(Some("EPYC (flags 1)"), Some("Xeon (flags 2)")).unwrap_err().to_string();
        assert!(err.contains("made under KVM on EPYC") && err.contains("this host's CPU is Xeon"), "{err}");
        assert_eq!(host_cpu(Accel::Tcg), None);
        assert!(host_cpu(Accel::Kvm).is_some_and(|cpu| cpu.contains("flags")));
        // Manifests written before the field existed still read.
        let old = r#"{"format":1,"qemu":"7.2","machine":[],"files":[],"vmstate_bytes":1,"created":0}"#;
        assert_eq!(serde_json::from_str::<Manifest>(old).unwrap().host_cpu, None);
    }

    #[test]
    fn machine_argv_holds_per_endpoint_values_fixed() {
        let p = profile("256M");
        let argv = machine_argv(&p, Accel::Tcg, &[]);
        assert!(argv.iter().any(|a| a == "-m") && argv.iter().any(|a| a == "256"));
        assert!(argv.iter().any(|a| a.contains("opt/vial/name,string=snapshot")));
        assert!(!argv.iter().any(|a| a.contains("virtio-9p") || a == "-incoming"));
        assert_eq!(argv, machine_argv(&p, Accel::Tcg, &[]), "pure");
    }

    #[test]
    fn a_start_with_other_memory_accel_or_args_does_not_fit_and_says_where() {
        let p = profile("256M");
        let m = manifest(&p);
        check_fits(&m, &machine_argv(&p, Accel::Tcg, &[]), &file_stamps(&p)).unwrap();
        let err = check_fits(&m, &machine_argv(&profile("512M"), Accel::Tcg, &[]), &file_stamps(&p)).unwrap_err();
        let err = err.to_string();
        assert!(err.contains("`512`") && err.contains("`256`"), "{err}");
        let err = check_fits(&m, &machine_argv(&p, Accel::Kvm, &[]), &file_stamps(&p)).unwrap_err().to_string();
        assert!(err.contains("`kvm`"), "{err}");
        let err =
            check_fits(&m, &machine_argv(&p, Accel::Tcg, &["-smp".into()]), &file_stamps(&p)).unwrap_err().to_string();
        assert!(err.contains("`-smp`") && err.contains("(end)"), "{err}");
    }

    #[test]
    fn a_changed_file_does_not_fit() {
        let p = profile("256M");
        let m = manifest(&p);
        let mut files = file_stamps(&p);
        files[0].bytes = 42;
        let err = check_fits(&m, &machine_argv(&p, Accel::Tcg, &[]), &files).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinuz changed since the snapshot (42 bytes"), "{err}");
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_say_why() {
        let dir = std::env::temp_dir().join(format!("vial-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load_manifest(&dir).unwrap_err().to_string().starts_with("no snapshot at"));
        let m = manifest(&profile("256M"));
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(load_manifest(&dir).unwrap(), m);
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&Manifest { format: 99, ..m }).unwrap()).unwrap();
        assert!(load_manifest(&dir).unwrap_err().to_string().contains("format 99"));
        std::fs::write(dir.join(MANIFEST), "{").unwrap();
        assert!(load_manifest(&dir).unwrap_err().to_string().contains("is not a snapshot manifest"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
