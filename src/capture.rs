//! `vial snapshot`: boots the profile's guest once, waits until it is ready, and saves it as
//! the profile's RAM snapshot (see `vm::snapshot`). Run at image build time, inside the image
//! (a `RUN` step of its Dockerfile), so the snapshot is made by the very QEMU, profile and
//! vial that will load it.
//!
//! The guest runs as an endpoint's would, minus what a snapshot cannot hold: no 9p share (QEMU
//! refuses to migrate while one is mounted, and the lesson is the endpoint's anyway) and no
//! data NICs (each endpoint has its own); vial hot-plugs both after the snapshot loads. Its
//! management forwards listen on loopback, where the readiness probe finds them.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::config::Config;
use crate::exit::Outcome;
use crate::supervisor::{self, SetupFailure};
use crate::vm::{self, argv::paths, snapshot};

/// How long the guest may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long saving may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

fn fail(outcome: Outcome, message: impl std::fmt::Display) -> SetupFailure {
    SetupFailure { outcome, message: message.to_string() }
}

/// Makes the snapshot and returns its manifest.
pub fn run(config: Config) -> Result<snapshot::Manifest, SetupFailure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|err| fail(Outcome::Internal, format!("cannot build the async runtime: {err}")))?;
    runtime.block_on(capture(&config))
}

async fn capture(config: &Config) -> Result<snapshot::Manifest, SetupFailure> {
    let profile = &config.profile;
    let target = profile.snapshot.clone().ok_or_else(|| {
        fail(
            Outcome::Config,
            format!(
                "{}: the profile has no [snapshot] (or VIAL_SNAPSHOT=off), so there is nowhere to save one: \
                 add [snapshot] path = \"...\" or give VIAL_SNAPSHOT=<directory>",
                config.profile_path.display()
            ),
        )
    })?;
    if vm::launch::find_binary(&profile.qemu).is_none() {
        return Err(fail(Outcome::QemuMissing, vm::launch::LaunchError::QemuMissing { binary: profile.qemu.clone() }));
    }
    let (accel, _) =
        vm::resolve_accel(profile.accel, crate::sys::kvm_usable).map_err(|err| fail(Outcome::Config, err))?;
    let dir = &target.dir;
    std::fs::create_dir_all(dir).and_then(|()| std::fs::create_dir_all(&config.run_dir)).map_err(|err| {
        fail(Outcome::SetupFailed, format!("cannot create {} or the run directory: {err}", dir.display()))
    })?;
    // A new snapshot replaces the old one whole: no layer of it may survive.
    remove_snapshot(dir, profile.disks.len());
    let disks = vm::disk::prepare_overlays(&profile.disks, dir, None).map_err(|err| fail(Outcome::SetupFailed, err))?;

    let started = supervisor::start_qemu(config, accel, disks, None, Vec::new(), &[], false)?;
    let pid = started.pid;
    let result = save(config, &target, started.control, pid, accel).await;
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
    for path in &started.created {
        let _ = std::fs::remove_file(path);
    }
    match &result {
        // The console log would otherwise end up in the image's layer.
        Ok(_) => drop(std::fs::remove_file(config.run_dir.join(paths::CONSOLE_LOG))),
        Err(_) => remove_snapshot(dir, profile.disks.len()),
    }
    result
}

fn remove_snapshot(dir: &Path, disks: usize) {
    let _ = std::fs::remove_file(dir.join(snapshot::MANIFEST));
    let _ = std::fs::remove_file(dir.join(snapshot::VMSTATE));
    for i in 0..disks {
        let _ = std::fs::remove_file(snapshot::disk_layer(dir, i));
    }
}

async fn save(
    config: &Config,
    target: &crate::config::Snapshot,
    control: tokio::net::UnixStream,
    pid: u32,
    accel: vm::Accel,
) -> Result<snapshot::Manifest, SetupFailure> {
    use std::os::fd::AsFd;
    let profile = &config.profile;
    let console_log = config.run_dir.join(paths::CONSOLE_LOG);
    let failed = |what: String| {
        fail(Outcome::SetupFailed, format!("{what}; the console's last lines:\n{}", console_tail(&console_log, 20)))
    };
    let chain = |err: crate::qmp::QmpError| crate::logging::error_chain(&err);

    let started = Instant::now();
    let (handle, _events) = supervisor::negotiate(control).await.map_err(failed)?;
    let version = handle.execute_raw("query-version", Value::Null).await.map_err(|err| failed(chain(err)))?;

    // Ready as the endpoint would be, probed on loopback where QEMU's forwards listen.
    let ready = supervisor::wait_ready(&profile.probe, profile.probe_interval, Ipv4Addr::LOCALHOST, &console_log);
    let qemu_gone = wait_exit(pid);
    tokio::select! {
        in_time = tokio::time::timeout(READY_TIMEOUT, ready) => if in_time.is_err() {
            return Err(failed(format!("the guest was not ready within {READY_TIMEOUT:?}")));
        },
        () = qemu_gone => return Err(failed("qemu exited before the guest was ready".into())),
    }
    let ready_after = started.elapsed();
    tracing::info!(after = ?ready_after, settle = ?target.settle, "guest ready; letting it settle before saving");
    tokio::time::sleep(target.settle).await;

    let vmstate_path = target.dir.join(snapshot::VMSTATE);
    let vmstate = std::fs::File::create(&vmstate_path)
        .map_err(|err| failed(format!("cannot create {}: {err}", vmstate_path.display())))?;
    let saving = Instant::now();
    handle.getfd("vmstate", vmstate.as_fd()).await.map_err(|err| failed(chain(err)))?;
    handle
        .execute_raw("migrate", serde_json::json!({"uri": "fd:vmstate"}))
        .await
        .map_err(|err| failed(format!("saving: {}", chain(err))))?;
    let info = handle
        .wait_migration(Duration::from_millis(20), SAVE_TIMEOUT)
        .await
        .map_err(|err| failed(format!("saving: {}", chain(err))))?;
    drop(vmstate);
    // The guest stays stopped after a completed migration; quit without resuming, so the
    // disk layers stay exactly as the saved memory knows them.
    let _ = handle.quit().await;
    let vmstate_bytes = std::fs::metadata(&vmstate_path).map(|m| m.len()).unwrap_or(0);
    tracing::info!(
        elapsed = ?saving.elapsed(),
        bytes = vmstate_bytes,
        total_ms = %info["total-time"],
        "guest state saved"
    );

    let manifest = snapshot::Manifest {
        format: snapshot::FORMAT,
        qemu: snapshot::qemu_version(&version),
        machine: snapshot::machine_argv(profile, accel, &config.qemu_args),
        files: snapshot::file_stamps(profile),
        vmstate_bytes,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    };
    let text = serde_json::to_vec_pretty(&manifest).map_err(|err| fail(Outcome::Internal, err))?;
    // Written last: a directory with a manifest is a whole snapshot.
    std::fs::write(target.dir.join(snapshot::MANIFEST), text)
        .map_err(|err| fail(Outcome::SetupFailed, format!("cannot write the manifest: {err}")))?;
    Ok(manifest)
}

/// Resolves when process `pid` (a child of ours) is gone. Polls: this runs once at image
/// build time, and a child's exit has no descriptor to wait on without a reaper.
async fn wait_exit(pid: u32) {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    loop {
        // WNOWAIT: only look; the caller reaps.
        match waitid(
            Id::Pid(Pid::from_raw(pid as i32)),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => return,
        }
    }
}

/// The console log's last `lines` lines.
fn console_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
