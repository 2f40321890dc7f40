//! Starting an endpoint from the profile's RAM snapshot: QEMU starts paused without the 9p
//! device and the data NICs (`-S -incoming defer`), loads the saved guest through a passed
//! descriptor, then the lesson share and the data NICs are hot-plugged into the slots they
//! have at a cold boot, and the guest resumes. In the multifunction NIC layout the data NICs
//! cannot be hot-plugged (a PCI slot gains no functions once its function 0, the management
//! NIC, is there): they are on QEMU's command line instead, where the snapshot has no state
//! for them, and the guest finds them when the share's hot-plug makes it rescan the bus (Linux's
//! acpiphp rescans every slot of a bus after a device check finds a new device). Any failure
//! leaves nothing behind (QEMU gone, its overlays removed) and says why; the caller then
//! boots cold.

use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{check_fits, check_host_cpu, file_stamps, host_cpu, load_manifest, machine_argv, SnapshotError, VMSTATE};
use crate::config::{Config, Snapshot};
use crate::qmp::{self, HotplugNic, Qmp};
use crate::vm::argv::DataNic;
use crate::vm::disk::{self, Base};
use crate::vm::qemu::{self, Start};
use crate::vm::user::RunAs;
use crate::vm::{argv, Accel};

/// How the data NICs reach a guest started from its snapshot, which has none.
pub enum SnapshotNics {
    /// Hot-plugged before it resumes, each into the slot it has at a cold boot.
    Hotplug(Vec<HotplugNic>),
    /// On QEMU's command line, with the descriptors QEMU inherits (the multifunction layout;
    /// see the module docs).
    CommandLine {
        /// The NICs.
        nics: Vec<DataNic>,
        /// Their descriptors.
        fds: Vec<RawFd>,
    },
}

/// How long loading a RAM snapshot may take (a few hundred MiB from the image's layer).
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the load's progress is polled.
const POLL: Duration = Duration::from_millis(10);

/// A guest loaded from its snapshot and running again.
pub struct Restored {
    /// QEMU's pid.
    pub pid: u32,
    /// vial's control monitor, negotiated.
    pub qmp: Qmp,
    /// Its events.
    pub events: qmp::Events,
    /// Files in the run directory to remove when the run ends.
    pub created: Vec<PathBuf>,
}

/// Whether the snapshot fits this start at all, before anything is made: same machine, same
/// files, no overlay kept from an earlier run.
pub fn check(config: &Config, snapshot: &Snapshot, accel: Accel) -> Result<super::Manifest, SnapshotError> {
    let profile = &config.profile;
    let manifest = load_manifest(&snapshot.dir)?;
    check_fits(&manifest, &machine_argv(profile, accel, &config.qemu_args), &file_stamps(profile))?;
    check_host_cpu(manifest.host_cpu.as_deref(), host_cpu(accel).as_deref())?;
    if disk::has_overlays(&profile.disks, &config.state_dir) {
        return Err(SnapshotError::OverlayKept);
    }
    Ok(manifest)
}

/// Starts QEMU from `snapshot` with the lesson `share` and hot-plugs `nics` (the data links,
/// in NIC order) before the guest resumes.
pub async fn restore(
    config: &Config,
    snapshot: &Snapshot,
    accel: Accel,
    share: Option<PathBuf>,
    nics: SnapshotNics,
    user: Option<RunAs>,
) -> Result<Restored, SnapshotError> {
    let manifest = check(config, snapshot, accel)?;
    let (hotplug, data_nics, fds) = match nics {
        SnapshotNics::Hotplug(nics) => (nics, Vec::new(), Vec::new()),
        SnapshotNics::CommandLine { nics, .. } if !nics.is_empty() && share.is_none() => {
            return Err(SnapshotError::NoRescan { nics: nics.len() });
        }
        SnapshotNics::CommandLine { nics, fds } => (Vec::new(), nics, fds),
    };
    let vmstate_path = snapshot.dir.join(VMSTATE);
    let vmstate = std::fs::File::open(&vmstate_path)
        .map_err(|source| SnapshotError::OpenVmstate { path: vmstate_path.clone(), source })?;
    let profile = &config.profile;
    let disks = disk::prepare_overlays(&profile.disks, &config.state_dir, Base::Layers(&snapshot.dir))?;
    // The overlays over the snapshot's layers go with any failure from here: the cold boot
    // makes its own over the image's disks.
    let start = Start { accel, disks, share: share.clone(), data_nics, restore: true, user };
    let started = match qemu::start_qemu(config, &start, &fds) {
        Ok(started) => started,
        Err(err) => {
            disk::remove_all(&profile.disks, &config.state_dir);
            return Err(err.into());
        }
    };
    let loading = Instant::now();
    // Until the guest runs, this QEMU and what it was started with go with any way out: a
    // failure, or the caller dropping this future (a stop requested during the load).
    let mut guard = Loading { config, pid: started.pid, created: started.created.clone(), armed: true };
    let loaded = load(config, started.control, &manifest.qemu, &vmstate, share.is_some(), &hotplug).await;
    let (qmp, events) = loaded?;
    guard.armed = false;
    tracing::info!(elapsed = ?loading.elapsed(), "snapshot loaded and resumed");
    Ok(Restored { pid: started.pid, qmp, events, created: started.created })
}

/// A QEMU loading a snapshot, and the files and overlays it was started with: removed on
/// drop unless disarmed (the guest runs).
struct Loading<'a> {
    config: &'a Config,
    pid: u32,
    created: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        qemu::kill_and_reap(self.pid);
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        disk::remove_all(&self.config.profile.disks, &self.config.state_dir);
    }
}

async fn load(
    config: &Config,
    control: tokio::net::UnixStream,
    snapshot_qemu: &str,
    vmstate: &std::fs::File,
    share: bool,
    nics: &[HotplugNic],
) -> Result<(Qmp, qmp::Events), SnapshotError> {
    let step = |step: &'static str| move |source| SnapshotError::Qmp { step, source };
    let (handle, events) =
        qmp::connect_unix_within(control, qemu::QMP_GREETING_TIMEOUT).await.map_err(step("connecting to qmp"))?;
    let running = handle.qemu_version().await.map_err(step("asking qemu's version"))?;
    if running != snapshot_qemu {
        return Err(SnapshotError::QemuVersion { running, snapshot: snapshot_qemu.to_string() });
    }
    handle.migrate_from(vmstate.as_fd(), POLL, LOAD_TIMEOUT).await.map_err(|source| match source {
        qmp::QmpError::Closed => SnapshotError::QemuExited,
        source => SnapshotError::Qmp { step: "loading the snapshot", source },
    })?;
    let profile = &config.profile;
    if let (true, Some(lesson)) = (share, &profile.share) {
        handle
            .device_add(&argv::share_device(profile, &lesson.tag))
            .await
            .map_err(step("hot-plugging the 9p share"))?;
    }
    for nic in nics {
        handle.hotplug_nic(nic).await.map_err(step("hot-plugging a data link"))?;
    }
    handle.cont().await.map_err(step("resuming the guest"))?;
    Ok((handle, events))
}
