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

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::{qemu_argv, Accel, Launch};
use crate::config::Profile;

/// The migration stream.
pub const VMSTATE: &str = "vmstate";
/// The manifest.
pub const MANIFEST: &str = "snapshot.json";
/// The manifest format this vial writes and reads.
pub const FORMAT: u32 = 1;

/// The snapshot's layer of disk `index` (the overlay the guest wrote while it was saved).
pub fn disk_layer(dir: &Path, index: usize) -> PathBuf {
    super::disk::overlay_path(dir, index)
}

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
        name: "snapshot".into(),
        data_nics: Vec::new(),
        extra_args: extra_args.to_vec(),
        restore: false,
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
pub fn load_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|err| format!("no snapshot at {} ({err})", path.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|err| format!("{} is not a snapshot manifest: {err}", path.display()))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "{} has format {}, this vial reads format {FORMAT}: make the snapshot again (vial snapshot)",
            path.display(),
            manifest.format
        ));
    }
    Ok(manifest)
}

/// Whether a snapshot made as `manifest` says fits a start with this machine and these files;
/// the error names the first difference.
pub fn check_fits(manifest: &Manifest, machine: &[String], files: &[FileStamp]) -> Result<(), String> {
    if manifest.machine != machine {
        let n = manifest.machine.iter().zip(machine).take_while(|(a, b)| a == b).count();
        let was = manifest.machine.get(n).map_or("(end)", String::as_str);
        let now = machine.get(n).map_or("(end)", String::as_str);
        return Err(format!(
            "the machine differs from the snapshot's: argument {n} is `{now}`, the snapshot has `{was}`"
        ));
    }
    for stamp in files {
        match manifest.files.iter().find(|f| f.path == stamp.path) {
            Some(was) if was == stamp => {}
            Some(was) => {
                return Err(format!(
                    "{} changed since the snapshot ({} bytes, mtime {}; the snapshot saw {} bytes, mtime {})",
                    stamp.path.display(),
                    stamp.bytes,
                    stamp.modified,
                    was.bytes,
                    was.modified
                ))
            }
            None => return Err(format!("the snapshot does not know {}", stamp.path.display())),
        }
    }
    Ok(())
}

/// QEMU's version from a `query-version` reply, as the manifest records it.
pub fn qemu_version(reply: &serde_json::Value) -> String {
    let q = &reply["qemu"];
    let package = reply["package"].as_str().unwrap_or("").trim();
    let number = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
    if package.is_empty() {
        number
    } else {
        format!("{number} ({package})")
    }
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
        }
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
        assert_eq!(check_fits(&m, &machine_argv(&p, Accel::Tcg, &[]), &file_stamps(&p)), Ok(()));
        let err = check_fits(&m, &machine_argv(&profile("512M"), Accel::Tcg, &[]), &file_stamps(&p)).unwrap_err();
        assert!(err.contains("`512`") && err.contains("`256`"), "{err}");
        let err = check_fits(&m, &machine_argv(&p, Accel::Kvm, &[]), &file_stamps(&p)).unwrap_err();
        assert!(err.contains("`kvm`"), "{err}");
        let err = check_fits(&m, &machine_argv(&p, Accel::Tcg, &["-smp".into()]), &file_stamps(&p)).unwrap_err();
        assert!(err.contains("`-smp`") && err.contains("(end)"), "{err}");
    }

    #[test]
    fn a_changed_file_does_not_fit() {
        let p = profile("256M");
        let m = manifest(&p);
        let mut files = file_stamps(&p);
        files[0].bytes = 42;
        let err = check_fits(&m, &machine_argv(&p, Accel::Tcg, &[]), &files).unwrap_err();
        assert!(err.contains("/nonexistent/vmlinuz changed since the snapshot (42 bytes"), "{err}");
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_say_why() {
        let dir = std::env::temp_dir().join(format!("vial-snapshot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load_manifest(&dir).unwrap_err().starts_with("no snapshot at"));
        let m = manifest(&profile("256M"));
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(load_manifest(&dir).unwrap(), m);
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&Manifest { format: 99, ..m }).unwrap()).unwrap();
        assert!(load_manifest(&dir).unwrap_err().contains("format 99"));
        std::fs::write(dir.join(MANIFEST), "{").unwrap();
        assert!(load_manifest(&dir).unwrap_err().contains("is not a snapshot manifest"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn qemu_version_reads_query_version() {
        let reply = serde_json::json!({"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2"});
        assert_eq!(qemu_version(&reply), "7.2.22 (Debian 1:7.2)");
    }
}
