//! `vial snapshot`: boots the profile's guest once, waits until it is ready, and saves it as
//! the profile's RAM snapshot. Run at image build time, inside the image (a `RUN` step of its
//! Dockerfile), so the snapshot is made by the very QEMU, profile and vial that will load it.
//!
//! The guest runs as an endpoint's would, minus what a snapshot cannot hold: no 9p share (QEMU
//! refuses to migrate while one is mounted, and the lesson is the endpoint's anyway) and no
//! data NICs (each endpoint has its own); vial hot-plugs both after the snapshot loads. Its
//! management forwards listen on loopback, where the readiness probe finds them.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{file_stamps, machine_argv, Manifest, FORMAT, MANIFEST, VMSTATE};
use crate::config::{Config, Snapshot};
use crate::qmp::{self, QmpError};
use crate::rundir;
use crate::vm::disk::{self, Base};
use crate::vm::qemu::{self, Start};
use crate::vm::{readiness, Accel};

/// How long the guest may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long saving may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How often the save's progress is polled.
const POLL: Duration = Duration::from_millis(20);
/// How many lines of the console a failure shows.
const CONSOLE_LINES: usize = 20;

/// Why no snapshot was made.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The async runtime could not be built.
    #[error("cannot build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// KVM was required and is not usable.
    #[error(transparent)]
    Accel(#[from] crate::vm::accel::KvmUnavailable),
    /// The profile names no snapshot directory.
    #[error("{}: the profile has no [snapshot] (or VIAL_SNAPSHOT=off), so there is nowhere to save one: add [snapshot] path = \"...\" or give VIAL_SNAPSHOT=<directory>", profile.display())]
    NoTarget {
        /// The profile.
        profile: PathBuf,
    },
    /// A directory could not be made, or a file written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The layers could not be made.
    #[error(transparent)]
    Overlay(#[from] disk::OverlayError),
    /// QEMU could not be started.
    #[error(transparent)]
    Launch(#[from] qemu::LaunchError),
    /// The guest never became ready.
    #[error("the guest was not ready within {timeout:?}; the console's last lines:\n{console}")]
    NotReady {
        /// How long it had.
        timeout: Duration,
        /// The console's last lines.
        console: String,
    },
    /// QEMU exited before the guest was ready.
    #[error("qemu exited before the guest was ready; the console's last lines:\n{console}")]
    QemuExited {
        /// The console's last lines.
        console: String,
    },
    /// A QMP step failed.
    #[error("{step} failed; the console's last lines:\n{console}")]
    Qmp {
        /// What vial was doing.
        step: &'static str,
        /// The console's last lines.
        console: String,
        /// Why.
        source: QmpError,
    },
}

/// Makes the snapshot and returns its manifest.
pub fn run(config: Config) -> Result<Manifest, SaveError> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(SaveError::Runtime)?;
    let target =
        config.profile.snapshot.clone().ok_or_else(|| SaveError::NoTarget { profile: config.profile_path.clone() })?;
    qemu::require_binary(&config.profile.qemu)?;
    let accel = crate::vm::accel::choose(&config.profile)?.0;
    runtime.block_on(capture(&config, &target, accel))
}

async fn capture(config: &Config, target: &Snapshot, accel: Accel) -> Result<Manifest, SaveError> {
    let profile = &config.profile;
    let dir = &target.dir;
    for path in [dir, &config.run_dir] {
        std::fs::create_dir_all(path).map_err(|source| SaveError::Write { path: path.clone(), source })?;
    }
    // A new snapshot replaces the old one whole: no layer of it may survive.
    super::remove(dir, &profile.disks);
    let disks = disk::prepare_overlays(&profile.disks, dir, Base::Image)?;
    // At image build time, from the image's own files: QEMU runs as root, as the build does.
    let start = Start { accel, disks, share: None, data_nics: Vec::new(), restore: false, user: None };
    let started = qemu::start_qemu(config, &start, &[])?;
    let result = save(config, target, started.control, started.pid, accel).await;
    qemu::kill_and_reap(started.pid);
    for path in &started.created {
        let _ = std::fs::remove_file(path);
    }
    match &result {
        // The console log would otherwise end up in the image's layer.
        Ok(_) => drop(std::fs::remove_file(config.run_dir.join(rundir::CONSOLE_LOG))),
        Err(_) => super::remove(dir, &profile.disks),
    }
    result
}

async fn save(
    config: &Config,
    target: &Snapshot,
    control: tokio::net::UnixStream,
    pid: u32,
    accel: Accel,
) -> Result<Manifest, SaveError> {
    use std::os::fd::AsFd;
    let profile = &config.profile;
    let console_log = config.run_dir.join(rundir::CONSOLE_LOG);
    let console = || rundir::console_tail(&console_log, CONSOLE_LINES);
    let step = |step: &'static str| move |source| SaveError::Qmp { step, console: console(), source };

    let started = Instant::now();
    let (handle, _events) =
        qmp::connect_unix_within(control, qemu::QMP_GREETING_TIMEOUT).await.map_err(step("connecting to qmp"))?;
    let version = handle.qemu_version().await.map_err(step("asking qemu's version"))?;

    // Ready as the endpoint would be, probed on loopback where QEMU's forwards listen.
    let ready = readiness::wait_ready(&profile.probe, profile.probe_interval, Ipv4Addr::LOCALHOST, &console_log);
    tokio::select! {
        in_time = tokio::time::timeout(READY_TIMEOUT, ready) => if in_time.is_err() {
            return Err(SaveError::NotReady { timeout: READY_TIMEOUT, console: console() });
        },
        () = wait_exit(pid) => return Err(SaveError::QemuExited { console: console() }),
    }
    tracing::info!(after = ?started.elapsed(), settle = ?target.settle, "guest ready; letting it settle before saving");
    tokio::time::sleep(target.settle).await;

    let vmstate_path = target.dir.join(VMSTATE);
    let vmstate = std::fs::File::create(&vmstate_path)
        .map_err(|source| SaveError::Write { path: vmstate_path.clone(), source })?;
    let saving = Instant::now();
    let done = handle.migrate_to(vmstate.as_fd(), POLL, SAVE_TIMEOUT).await.map_err(step("saving the guest"))?;
    drop(vmstate);
    // The guest stays stopped after a completed migration; quit without resuming, so the
    // disk layers stay exactly as the saved memory knows them.
    let _ = handle.quit().await;
    let vmstate_bytes = std::fs::metadata(&vmstate_path).map(|m| m.len()).unwrap_or(0);
    tracing::info!(elapsed = ?saving.elapsed(), bytes = vmstate_bytes, total_ms = ?done.total_ms, "guest state saved");

    let manifest = Manifest {
        format: FORMAT,
        qemu: version,
        machine: machine_argv(profile, accel, &config.qemu_args),
        files: file_stamps(profile),
        vmstate_bytes,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        host_cpu: super::host_cpu(accel),
    };
    let text = serde_json::to_vec_pretty(&manifest).expect("a manifest always serializes");
    // Written last: a directory with a manifest is a whole snapshot.
    let path = target.dir.join(MANIFEST);
    std::fs::write(&path, text).map_err(|source| SaveError::Write { path, source })?;
    Ok(manifest)
}

/// Resolves when process `pid` (a child of ours) is gone. Polls: this runs once at image
/// build time, and a child's exit has no descriptor to wait on without a reaper.
async fn wait_exit(pid: u32) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    loop {
        // WNOWAIT: only look; the caller reaps.
        match waitid(
            Id::Pid(Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => return,
        }
    }
}
