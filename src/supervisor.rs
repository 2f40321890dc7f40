//! The supervisor: the one place that ties configuration, the QEMU process, QMP, readiness,
//! signals and reaping together, and walks the endpoint through its life
//! (`starting` → ... → `ready` → `stopping` → `stopped`, or `failed`).
//!
//! It fails fast during setup and never bails once QEMU runs: from then on every error is
//! logged and the loop carries on until QEMU is gone. It never leaves QEMU behind: every path
//! out of [`run`] goes through the same teardown, and QEMU carries a parent-death signal.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Probe};
use crate::dataplane::{DataPlane, DataPlaneError};
use crate::exit::Outcome;
use crate::health;
use crate::net::links::WaitError;
use crate::qmp::{self, RunState, VmEvent};
use crate::reaper::{self, Ended};
use crate::state::{BootStatus, ForwardStatus, Phase, Status};
use crate::vm::{self, argv::paths, Accel, Launch};

/// How long `quit` gets before QEMU is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How often the power button is pressed again while the guest has not powered off.
const REPRESS_INTERVAL: Duration = Duration::from_secs(2);
/// How long QEMU gets to greet on QMP after it starts.
const QMP_GREETING_TIMEOUT: Duration = Duration::from_secs(30);
/// The device every endpoint needs (DESIGN.md: the endpoint container contract).
const TUN_DEVICE: &str = "/dev/net/tun";

/// How long loading a RAM snapshot may take (a few hundred MiB from the image's layer).
const SNAPSHOT_LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a migration's progress is polled.
const MIGRATION_POLL: Duration = Duration::from_millis(10);

/// QMP negotiation as the supervision loop awaits it: the connection, or why there is none.
type Negotiation = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(qmp::Qmp, qmp::Events), String>>>>;

/// vial's control monitor as setup hands it to the supervision loop.
enum Monitor {
    /// Connected, greeting not read yet (QEMU is starting).
    Pending(tokio::net::UnixStream),
    /// Negotiated already (the snapshot was loaded over it).
    Ready(qmp::Qmp, qmp::Events),
}

/// A setup step that failed, with the outcome it maps to.
#[derive(Debug)]
pub struct SetupFailure {
    /// The exit outcome.
    pub outcome: Outcome,
    /// One line saying what failed and how to fix it.
    pub message: String,
}

fn fail(outcome: Outcome, message: impl std::fmt::Display) -> SetupFailure {
    SetupFailure { outcome, message: message.to_string() }
}

/// Runs the endpoint to its end on a current-thread runtime (see `sys::spawn_supervised` for
/// why it must be current-thread). Returns the outcome; the binary maps it to an exit code.
pub fn run(config: Config) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(%err, "cannot build the async runtime");
            return Outcome::Internal;
        }
    };
    runtime.block_on(Endpoint::new(config).run())
}

/// Signals the supervisor listens to, registered before anything else so that a `docker
/// stop` during setup is not lost. Registering a handler is also what lets PID 1 receive
/// SIGTERM at all: the kernel drops signals to a namespace's init that has no handler.
struct Signals {
    term: SignalStream,
    int: SignalStream,
    quit: SignalStream,
    child: SignalStream,
    hup: SignalStream,
    usr1: SignalStream,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            child: signal(SignalKind::child())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Where a stop request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Nobody asked to stop.
    NotRequested,
    /// The ACPI power button was pressed; waiting until the deadline.
    PoweringDown {
        /// When to give up and `quit`.
        deadline: Instant,
        /// When to press the button again: a press before the guest's ACPI handler runs
        /// (early in boot) is lost, and the kernel keeps no record of it.
        repress: Instant,
    },
    /// `quit` was sent; waiting until the deadline, then SIGKILL.
    Quitting { deadline: Instant },
    /// SIGKILL was sent.
    Killed,
    /// A second signal forced the stop.
    Forced(i32),
}

/// The state one `vial run` carries.
struct Endpoint {
    config: Config,
    status: watch::Sender<Status>,
    /// Files in the run directory that vial created and removes on exit.
    created: Vec<PathBuf>,
    /// The data links, once stitched.
    dataplane: Option<DataPlane>,
}

impl Endpoint {
    fn new(config: Config) -> Self {
        let (status, _) = watch::channel(Status::new(&config.profile.name));
        Endpoint { config, status, created: Vec::new(), dataplane: None }
    }

    fn set_phase(&self, phase: Phase, reason: Option<String>) {
        tracing::info!(state = phase.as_str(), reason = reason.as_deref().unwrap_or(""), "endpoint state");
        self.status.send_modify(|status| {
            status.phase = phase;
            status.reason = reason;
        });
    }

    fn run_path(&self, name: &str) -> PathBuf {
        self.config.run_dir.join(name)
    }

    async fn run(mut self) -> Outcome {
        let mut signals = match Signals::register() {
            Ok(signals) => signals,
            Err(err) => {
                tracing::error!(%err, "cannot install signal handlers");
                return Outcome::SetupFailed;
            }
        };
        let outcome = match self.setup_and_launch().await {
            Ok((qemu_pid, monitor)) => self.supervise(qemu_pid, monitor, &mut signals).await,
            Err(failure) => {
                tracing::error!("{}", failure.message);
                self.set_phase(Phase::Failed, Some(failure.message));
                failure.outcome
            }
        };
        self.teardown(outcome).await;
        outcome
    }

    /// Every setup step, in order; the first failure ends the run with its outcome.
    async fn setup_and_launch(&mut self) -> Result<(u32, Monitor), SetupFailure> {
        let profile = self.config.profile.clone();
        std::fs::create_dir_all(&self.config.run_dir).map_err(|err| {
            fail(Outcome::SetupFailed, format!("cannot create run directory {}: {err}", self.config.run_dir.display()))
        })?;
        let health_path = self.run_path(paths::HEALTH);
        let listener = health::bind(&health_path)
            .map_err(|err| fail(Outcome::SetupFailed, format!("health socket {}: {err}", health_path.display())))?;
        self.created.push(health_path);
        tokio::spawn(health::serve(listener, self.status.subscribe()));

        if !Path::new(TUN_DEVICE).exists() {
            return Err(fail(
                Outcome::TunMissing,
                format!(
                    "{TUN_DEVICE} is missing: run the container with --device /dev/net/tun (and --cap-add NET_ADMIN)"
                ),
            ));
        }
        if vm::launch::find_binary(&profile.qemu).is_none() {
            return Err(fail(
                Outcome::QemuMissing,
                vm::launch::LaunchError::QemuMissing { binary: profile.qemu.clone() },
            ));
        }
        let (accel, fallback) =
            vm::resolve_accel(profile.accel, crate::sys::kvm_usable).map_err(|err| fail(Outcome::Config, err))?;
        if let Some(reason) = fallback {
            tracing::info!(%reason, "KVM not usable; using TCG");
        }
        self.status.send_modify(|status| status.accel = Some(accel.as_str().into()));

        let mgmt_addr =
            crate::net::mgmt_address(&self.config.mgmt_iface).map_err(|err| fail(Outcome::SetupFailed, err))?;
        let forwards = profile
            .forwards
            .iter()
            .map(|f| ForwardStatus {
                protocol: f.protocol.as_str().into(),
                address: mgmt_addr.to_string(),
                container_port: f.container_port,
                guest_port: f.guest_port,
            })
            .collect();
        self.status.send_modify(|status| status.forwards = forwards);
        // Bound now, so a port conflict is a setup error; QEMU's own listeners are on
        // loopback, so when the management address is loopback, QEMU's serve directly.
        if !mgmt_addr.is_loopback() {
            let relays = crate::forward::bind_all(mgmt_addr, &profile.forwards)
                .await
                .map_err(|err| fail(Outcome::SetupFailed, format!("{err}: {}", err.source)))?;
            crate::forward::spawn_all(relays);
        }

        let share = lesson_dir(&self.config);
        if let (Some(dir), Some(lesson)) = (&share, &profile.share) {
            if *dir != lesson.path {
                tracing::info!(path = %lesson.path.display(), "no lesson directory; the guest gets an empty share");
                std::fs::create_dir_all(dir)
                    .map_err(|err| fail(Outcome::SetupFailed, format!("cannot create {}: {err}", dir.display())))?;
            }
        }

        self.set_phase(Phase::WaitingForInterfaces, None);
        let dataplane = DataPlane::start(&profile, &self.config.mgmt_iface).await.map_err(|err| match err {
            DataPlaneError::Wait(WaitError::Timeout { .. }) => fail(Outcome::InterfacesTimeout, err),
            other => fail(Outcome::SetupFailed, other),
        })?;
        self.set_phase(Phase::Plumbing, None);
        self.status.send_modify(|status| status.links = dataplane.statuses());
        self.dataplane = Some(dataplane);

        let note = match &profile.snapshot {
            // An image built without running `vial snapshot` (or a test bundle): not a fault.
            Some(snapshot) if !snapshot.dir.join(vm::snapshot::MANIFEST).is_file() => {
                tracing::info!(dir = %snapshot.dir.display(), "no snapshot in the profile's snapshot directory; booting cold");
                Some(format!("snapshot not used: there is none in {}", snapshot.dir.display()))
            }
            Some(snapshot) => match self.launch_from_snapshot(snapshot, accel, share.clone()).await {
                Ok((pid, handle, events)) => {
                    self.set_boot("snapshot", None);
                    self.set_phase(Phase::Booting, None);
                    return Ok((pid, Monitor::Ready(handle, events)));
                }
                Err(reason) => {
                    tracing::warn!(%reason, "not starting from the snapshot; booting cold");
                    Some(format!("snapshot not used: {reason}"))
                }
            },
            None => None,
        };
        let disks = self.overlays(None)?;
        let plane = self.dataplane.as_ref().expect("set above");
        let started = start_qemu(&self.config, accel, disks, share, plane.data_nics(), &plane.fds(), false)?;
        self.created.extend(started.created);
        self.status.send_modify(|status| status.qemu_pid = Some(started.pid));
        self.set_boot("cold", note);
        self.set_phase(Phase::Booting, None);
        Ok((started.pid, Monitor::Pending(started.control)))
    }

    fn set_boot(&self, from: &str, note: Option<String>) {
        tracing::info!(from, note = note.as_deref().unwrap_or(""), "boot");
        self.status.send_modify(|status| status.boot = Some(BootStatus { from: from.into(), note }));
    }

    /// The disk overlays in the state directory, over the image's disks or (`layers`) over a
    /// snapshot's.
    fn overlays(&self, layers: Option<&Path>) -> Result<Vec<PathBuf>, SetupFailure> {
        vm::disk::prepare_overlays(&self.config.profile.disks, &self.config.state_dir, layers).map_err(
            |err| match err {
                vm::disk::OverlayError::QemuImgMissing => fail(Outcome::QemuMissing, err),
                other => fail(Outcome::SetupFailed, other),
            },
        )
    }

    /// Starts QEMU from the profile's RAM snapshot: paused, without the 9p device and the data
    /// NICs; loads the snapshot, hot-plugs those devices, resumes. Any failure leaves nothing
    /// behind (QEMU gone, its overlays removed) and says why, and the caller boots cold.
    async fn launch_from_snapshot(
        &mut self,
        snapshot: &crate::config::Snapshot,
        accel: Accel,
        share: Option<PathBuf>,
    ) -> Result<(u32, qmp::Qmp, qmp::Events), String> {
        let profile = &self.config.profile;
        let manifest = vm::snapshot::load_manifest(&snapshot.dir)?;
        let machine = vm::snapshot::machine_argv(profile, accel, &self.config.qemu_args);
        vm::snapshot::check_fits(&manifest, &machine, &vm::snapshot::file_stamps(profile))?;
        if vm::disk::has_overlays(&profile.disks, &self.config.state_dir) {
            return Err("an earlier run of this container changed its disk (its overlay is kept), and the \
                        snapshot's memory does not know those changes"
                .into());
        }
        let vmstate_path = snapshot.dir.join(vm::snapshot::VMSTATE);
        let vmstate = std::fs::File::open(&vmstate_path)
            .map_err(|err| format!("cannot open {}: {err}", vmstate_path.display()))?;

        let disks = self.overlays(Some(&snapshot.dir)).map_err(|failure| failure.message)?;
        // The overlays over the snapshot's layers go with any failure from here: the cold boot
        // makes its own over the image's disks.
        let remove_overlays = |config: &Config| {
            for i in 0..config.profile.disks.len() {
                let _ = std::fs::remove_file(vm::disk::overlay_path(&config.state_dir, i));
            }
        };
        let started = match start_qemu(&self.config, accel, disks, share.clone(), Vec::new(), &[], true) {
            Ok(started) => started,
            Err(failure) => {
                remove_overlays(&self.config);
                return Err(failure.message);
            }
        };
        self.created.extend(started.created);
        let pid = started.pid;
        self.status.send_modify(|status| status.qemu_pid = Some(pid));
        let loaded = Instant::now();
        match self.load_snapshot(started.control, &manifest, &vmstate, share.is_some()).await {
            Ok((handle, events)) => {
                tracing::info!(elapsed = ?loaded.elapsed(), "snapshot loaded and resumed");
                Ok((pid, handle, events))
            }
            Err(reason) => {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
                self.status.send_modify(|status| status.qemu_pid = None);
                remove_overlays(&self.config);
                Err(reason)
            }
        }
    }

    async fn load_snapshot(
        &self,
        control: tokio::net::UnixStream,
        manifest: &vm::snapshot::Manifest,
        vmstate: &std::fs::File,
        share: bool,
    ) -> Result<(qmp::Qmp, qmp::Events), String> {
        use std::os::fd::AsFd;
        let chain = |err: qmp::QmpError| crate::logging::error_chain(&err);
        let (handle, events) = negotiate(control).await?;
        let version =
            vm::snapshot::qemu_version(&handle.execute_raw("query-version", Value::Null).await.map_err(chain)?);
        if version != manifest.qemu {
            return Err(format!("this is QEMU {version}; the snapshot was made by QEMU {}", manifest.qemu));
        }
        handle.getfd("vmstate", vmstate.as_fd()).await.map_err(chain)?;
        handle.execute_raw("migrate-incoming", serde_json::json!({"uri": "fd:vmstate"})).await.map_err(chain)?;
        handle.wait_migration(MIGRATION_POLL, SNAPSHOT_LOAD_TIMEOUT).await.map_err(|err| match err {
            qmp::QmpError::Closed => "qemu exited while loading the snapshot (its message is in the log above)".into(),
            other => format!("loading the snapshot: {}", chain(other)),
        })?;
        let profile = &self.config.profile;
        if let (true, Some(lesson)) = (share, &profile.share) {
            let props: serde_json::Map<String, Value> = vm::argv::share_device(profile, &lesson.tag)
                .into_iter()
                .map(|(key, value)| (key.to_string(), Value::from(value)))
                .collect();
            handle
                .execute_raw("device_add", Value::Object(props))
                .await
                .map_err(|err| format!("hot-plugging the 9p share: {}", chain(err)))?;
        }
        if let Some(plane) = &self.dataplane {
            plane.plug_all(&handle, profile, &self.config.name).await.map_err(|err| format!("hot-plugging {err}"))?;
        }
        handle.execute_raw("cont", Value::Null).await.map_err(chain)?;
        Ok((handle, events))
    }

    /// Watches QEMU until it is gone and returns how the run ended.
    async fn supervise(&mut self, qemu_pid: u32, monitor: Monitor, signals: &mut Signals) -> Outcome {
        let profile = self.config.profile.clone();
        let mut stop = Stop::NotRequested;
        let mut qmp_handle: Option<qmp::Qmp> = None;
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
        let mut probe_task: Option<tokio::task::JoinHandle<()>> = None;
        let mut events: Option<qmp::Events> = None;
        let mut run_state = RunState::Running;
        let mut dataplane = self.dataplane.take();

        // QMP negotiation runs beside the loop, so signals and QEMU's death are seen while
        // QEMU is still starting.
        let mut negotiation: Negotiation = match monitor {
            Monitor::Pending(control) => Box::pin(negotiate(control)),
            Monitor::Ready(handle, events) => Box::pin(std::future::ready(Ok((handle, events)))),
        };
        let mut negotiating = true;

        loop {
            let deadline = match stop {
                Stop::PoweringDown { deadline, repress } => Some(deadline.min(repress)),
                Stop::Quitting { deadline } => Some(deadline),
                _ => None,
            };
            tokio::select! {
                result = &mut negotiation, if negotiating => {
                    negotiating = false;
                    match result {
                        Ok((handle, stream)) => {
                            tracing::info!("qmp negotiated");
                            if let Some(state) = self.after_negotiation(&handle).await {
                                run_state = state;
                            }
                            events = Some(stream);
                            // A stop requested while QEMU was starting goes out now.
                            if let Stop::PoweringDown { .. } = stop {
                                press_power_button(&handle).await;
                            }
                            if stop == Stop::NotRequested {
                                probe_task = Some(self.start_probe(ready_tx.clone()));
                            }
                            qmp_handle = Some(handle);
                        }
                        Err(reason) => tracing::warn!(%reason, "supervising qemu without qmp"),
                    }
                }
                event = recv_event(&mut events) => match event {
                    Some(event) => {
                        run_state = qmp::next_run_state(&run_state, &event);
                        self.status.send_modify(|status| status.vm_run_state = Some(run_state.as_str().to_string()));
                        self.on_event(&event, &mut probe_task, &ready_tx, stop);
                    }
                    None => {
                        tracing::debug!("qmp closed");
                        events = None;
                    }
                },
                event = next_link_event(&mut dataplane), if qmp_handle.is_some() => match (event, &qmp_handle, &mut dataplane) {
                    (Ok(event), Some(handle), Some(plane)) => {
                        plane.on_event(event, handle, &profile, &self.config.name).await;
                        self.status.send_modify(|status| status.links = plane.statuses());
                    }
                    (Err(err), _, _) => {
                        tracing::warn!(%err, "link events stopped; late links will not be plugged");
                        if let Some(mut plane) = dataplane.take() {
                            plane.teardown().await;
                        }
                    }
                    _ => {}
                },
                Some(()) = ready_rx.recv() => {
                    if stop == Stop::NotRequested && self.status.borrow().phase == Phase::Booting {
                        self.set_phase(Phase::Ready, None);
                    }
                }
                _ = signals.child.recv() => {
                    let (ended, count) = reaper::reap_all(Some(qemu_pid));
                    if count > 0 {
                        tracing::debug!(count, "reaped children");
                    }
                    if let Some(ended) = ended {
                        if let Some(task) = probe_task.take() {
                            task.abort();
                        }
                        self.dataplane = dataplane;
                        return self.qemu_ended(ended, stop);
                    }
                }
                _ = signals.term.recv() => stop = self.on_stop_signal(Signal::SIGTERM, stop, qemu_pid, qmp_handle.as_ref()).await,
                _ = signals.int.recv() => stop = self.on_stop_signal(Signal::SIGINT, stop, qemu_pid, qmp_handle.as_ref()).await,
                _ = signals.quit.recv() => stop = force_stop(Signal::SIGQUIT, qemu_pid),
                _ = signals.hup.recv() => tracing::info!("SIGHUP ignored (vial has no configuration to reload; restart the container instead)"),
                _ = signals.usr1.recv() => {
                    let json = self.status.borrow().to_json(Instant::now());
                    tracing::info!(status = %json, "status on SIGUSR1");
                }
                _ = sleep_until(deadline) => {
                    stop = match stop {
                        Stop::PoweringDown { deadline, .. } if Instant::now() < deadline => {
                            if let Some(handle) = &qmp_handle {
                                tracing::debug!("pressing the power button again");
                                press_power_button(handle).await;
                            }
                            Stop::PoweringDown { deadline, repress: Instant::now() + REPRESS_INTERVAL }
                        }
                        Stop::PoweringDown { .. } => {
                            tracing::warn!(timeout = ?profile.stop_timeout, "guest did not power off in time; sending quit");
                            match &qmp_handle {
                                Some(handle) => {
                                    if let Err(err) = handle.quit().await {
                                        tracing::warn!(%err, "qmp quit failed");
                                    }
                                    Stop::Quitting { deadline: Instant::now() + QUIT_GRACE }
                                }
                                None => kill_qemu(qemu_pid),
                            }
                        }
                        Stop::Quitting { .. } => {
                            tracing::warn!("qemu did not quit in time; killing it");
                            kill_qemu(qemu_pid)
                        }
                        other => other,
                    };
                }
            }
        }
    }

    /// Reads the run state and the accelerator QEMU really uses.
    async fn after_negotiation(&self, handle: &qmp::Qmp) -> Option<RunState> {
        let state = match handle.query_status().await {
            Ok(state) => {
                self.status.send_modify(|status| status.vm_run_state = Some(state.as_str().to_string()));
                Some(state)
            }
            Err(err) => {
                tracing::warn!(%err, "query-status failed");
                None
            }
        };
        // Report the accelerator QEMU really uses, not only the one asked for.
        match handle.query_kvm().await {
            Ok(enabled) => {
                let accel = if enabled { Accel::Kvm } else { Accel::Tcg };
                self.status.send_modify(|status| status.accel = Some(accel.as_str().into()));
            }
            Err(err) => tracing::debug!(%err, "query-kvm failed"),
        }
        state
    }

    fn on_event(
        &self,
        event: &VmEvent,
        probe_task: &mut Option<tokio::task::JoinHandle<()>>,
        ready_tx: &mpsc::UnboundedSender<()>,
        stop: Stop,
    ) {
        tracing::info!(?event, "vm event");
        match event {
            VmEvent::Shutdown { guest, reason } => {
                tracing::info!(guest, %reason, "guest shut down");
            }
            VmEvent::Reset { .. } if stop == Stop::NotRequested => {
                // The guest rebooted: it is not ready again until the probe passes again.
                if let Some(task) = probe_task.take() {
                    task.abort();
                }
                self.set_phase(Phase::Booting, Some("guest rebooted".into()));
                *probe_task = Some(self.start_probe(ready_tx.clone()));
            }
            VmEvent::GuestPanicked => self.set_phase(Phase::Failed, Some("guest panicked".into())),
            _ => {}
        }
    }

    async fn on_stop_signal(&self, signal: Signal, stop: Stop, qemu_pid: u32, qmp_handle: Option<&qmp::Qmp>) -> Stop {
        if stop != Stop::NotRequested {
            tracing::warn!(signal = signal.as_str(), "second stop signal: forcing the stop");
            return force_stop(signal, qemu_pid);
        }
        tracing::info!(signal = signal.as_str(), timeout = ?self.config.profile.stop_timeout, "stopping: pressing the guest's power button");
        self.set_phase(Phase::Stopping, Some(format!("{} received", signal.as_str())));
        if let Some(handle) = qmp_handle {
            press_power_button(handle).await;
        }
        let now = Instant::now();
        Stop::PoweringDown { deadline: now + self.config.profile.stop_timeout, repress: now + REPRESS_INTERVAL }
    }

    fn qemu_ended(&self, ended: Ended, stop: Stop) -> Outcome {
        tracing::info!(%ended, "qemu exited");
        self.status.send_modify(|status| status.qemu_pid = None);
        let outcome = match stop {
            Stop::Forced(signal) => Outcome::ForcedBySignal(signal),
            Stop::Killed => Outcome::KilledQemu,
            Stop::Quitting { .. } => Outcome::QuitAfterStopTimeout,
            // QEMU exits 0 only when the guest powered off or someone sent `quit` on the public
            // monitor; both are clean. The SHUTDOWN event is not relied on: a newer QEMU's
            // reason may not fit the schema, and then the event is logged and dropped.
            Stop::PoweringDown { .. } | Stop::NotRequested if ended == Ended::Exited(0) => Outcome::GuestPoweredOff,
            _ => Outcome::QemuCrashed,
        };
        if outcome == Outcome::QemuCrashed {
            self.set_phase(Phase::Failed, Some(format!("qemu exited unexpectedly: {ended}")));
        } else {
            self.set_phase(Phase::Stopped, Some(outcome.describe()));
        }
        outcome
    }

    fn start_probe(&self, ready: mpsc::UnboundedSender<()>) -> tokio::task::JoinHandle<()> {
        let profile = &self.config.profile;
        let interval = profile.probe_interval;
        let probe = profile.probe.clone();
        let mgmt = self.status.borrow().forwards.first().and_then(|f| f.address.parse().ok());
        let console_log = self.run_path(paths::CONSOLE_LOG);
        tokio::spawn(async move {
            // A TCP probe goes through the forward on the management address (a profile with a
            // TCP probe has forwards, so there is one).
            let addr = mgmt.unwrap_or(Ipv4Addr::LOCALHOST);
            wait_ready(&probe, interval, addr, &console_log).await;
            let _ = ready.send(());
        })
    }

    /// The one way out: kill QEMU if it still runs, remove what vial created, persist the
    /// final status for `vial health` to show after the supervisor is gone.
    async fn teardown(&mut self, outcome: Outcome) {
        if let Some(pid) = self.status.borrow().qemu_pid {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(mut plane) = self.dataplane.take() {
            plane.teardown().await;
            self.status.send_modify(|status| status.links = plane.statuses());
        }
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
        let status = self.status.borrow().clone();
        if let Err(err) = health::persist_last_status(&self.config.run_dir, &status, Instant::now()) {
            tracing::warn!(%err, "cannot persist the final status");
        }
        tracing::info!(code = outcome.code(), outcome = %outcome.describe(), "vial exits");
    }
}

async fn press_power_button(handle: &qmp::Qmp) {
    if let Err(err) = handle.system_powerdown().await {
        tracing::warn!(%err, "system_powerdown failed");
    }
}

fn force_stop(signal: Signal, qemu_pid: u32) -> Stop {
    tracing::warn!(signal = signal.as_str(), "forced stop: killing qemu");
    let _ = killpg(Pid::from_raw(qemu_pid as i32), Signal::SIGKILL);
    Stop::Forced(signal as i32)
}

fn kill_qemu(qemu_pid: u32) -> Stop {
    let _ = killpg(Pid::from_raw(qemu_pid as i32), Signal::SIGKILL);
    Stop::Killed
}

async fn next_link_event(dataplane: &mut Option<DataPlane>) -> Result<crate::net::links::LinkEvent, WaitError> {
    match dataplane {
        Some(plane) => plane.next_event().await,
        None => std::future::pending().await,
    }
}

async fn recv_event(events: &mut Option<qmp::Events>) -> Option<VmEvent> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Negotiates QMP on vial's control monitor of a QEMU that just started, waiting for its
/// greeting up to [`QMP_GREETING_TIMEOUT`]; the error says what went wrong.
pub(crate) async fn negotiate(control: tokio::net::UnixStream) -> Result<(qmp::Qmp, qmp::Events), String> {
    match tokio::time::timeout(QMP_GREETING_TIMEOUT, qmp::connect_unix(control)).await {
        Ok(Ok(connected)) => Ok(connected),
        Ok(Err(err)) => Err(format!("qmp negotiation failed: {}", crate::logging::error_chain(&err))),
        Err(_) => Err(format!("qemu did not greet on qmp within {QMP_GREETING_TIMEOUT:?}")),
    }
}

/// How often the console log is read for a readiness text that goes with a TCP probe: the
/// text usually appears with the port, so a slow poll would only add to the time to ready.
const CONSOLE_POLL: Duration = Duration::from_millis(50);

/// Returns once the guest passes `probe`: a TCP probe aimed at `addr` (and its console text,
/// when it has one, in `console_log`), or a console pattern. Retries every `interval`.
pub(crate) async fn wait_ready(probe: &Probe, interval: Duration, addr: Ipv4Addr, console_log: &Path) {
    match probe {
        Probe::Tcp { port, send, expect, console } => {
            let target = SocketAddrV4::new(addr, *port);
            let answers = async {
                while !probe_tcp(target, send, expect).await {
                    tokio::time::sleep(interval).await;
                }
            };
            let printed = async {
                if let Some(text) = console {
                    watch_console(console_log, text.as_bytes(), CONSOLE_POLL.min(interval)).await;
                }
            };
            tokio::join!(answers, printed);
        }
        Probe::Serial { pattern } => {
            watch_console(console_log, pattern.as_bytes(), interval).await;
        }
    }
}

/// One TCP readiness attempt through a forward: connect, send, and require a reply (QEMU's
/// user networking accepts on the container side before it knows whether the guest listens,
/// so only bytes from the guest prove it is up).
pub async fn probe_tcp(target: SocketAddrV4, send: &[u8], expect: &[u8]) -> bool {
    const ATTEMPT: Duration = Duration::from_secs(2);
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await.ok()?;
        if !send.is_empty() {
            stream.write_all(send).await.ok()?;
        }
        let want = expect.len().max(1);
        let mut reply = Vec::with_capacity(want);
        let mut buf = [0u8; 256];
        while reply.len() < want {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Some(reply.starts_with(expect))
    };
    matches!(tokio::time::timeout(ATTEMPT, attempt).await, Ok(Some(true)))
}

/// Follows the console log until `pattern` appears. Polls at the probe interval: the log is
/// a plain file QEMU appends to, and a probe is periodic by nature. Reads only what is new
/// (a small local read, fine on the supervisor's thread).
async fn watch_console(log: &Path, pattern: &[u8], interval: Duration) {
    use std::io::{Read, Seek, SeekFrom};
    let mut offset = 0u64;
    let mut window: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut file) = std::fs::File::open(log) {
            let mut fresh = Vec::new();
            if file.seek(SeekFrom::Start(offset)).is_ok() && file.read_to_end(&mut fresh).is_ok() && !fresh.is_empty() {
                offset += fresh.len() as u64;
                window.extend_from_slice(&fresh);
                if window.windows(pattern.len()).any(|w| w == pattern) {
                    return;
                }
                // Keep only what could still be the start of a match.
                let keep = pattern.len().saturating_sub(1);
                if window.len() > keep {
                    window.drain(..window.len() - keep);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// The QEMU argv `vial run` would use for a cold boot with this configuration, without
/// creating anything (`vial argv`): overlays are named but not made, and the control
/// monitor's descriptor is shown as 3.
pub fn dry_run_argv(config: &Config) -> Result<Vec<std::ffi::OsString>, SetupFailure> {
    let (accel, _) =
        vm::resolve_accel(config.profile.accel, crate::sys::kvm_usable).map_err(|err| fail(Outcome::Config, err))?;
    let disks = (0..config.profile.disks.len()).map(|i| vm::disk::overlay_path(&config.state_dir, i)).collect();
    Ok(vm::qemu_argv(&config.profile, &launch_for(config, accel, disks, lesson_dir(config), 3, Vec::new(), false)))
}

/// The directory shared as the lesson, when the profile shares one: the lesson directory, or
/// an empty one in the run directory when there is none, so that the guest always gets its
/// share (a guest resumed from a snapshot takes its arrival as the signal to set up).
pub(crate) fn lesson_dir(config: &Config) -> Option<PathBuf> {
    let share = config.profile.share.as_ref()?;
    Some(if share.path.is_dir() { share.path.clone() } else { config.run_dir.join(EMPTY_LESSON) })
}

/// The empty directory shared when there is no lesson directory.
const EMPTY_LESSON: &str = "no-lesson";

/// The runtime inputs of QEMU's argv: the one place they are put together.
fn launch_for(
    config: &Config,
    accel: Accel,
    disks: Vec<PathBuf>,
    share: Option<PathBuf>,
    control_fd: std::os::fd::RawFd,
    data_nics: Vec<vm::argv::DataNic>,
    restore: bool,
) -> Launch {
    Launch {
        accel,
        run_dir: config.run_dir.clone(),
        disks,
        share,
        control_fd,
        name: config.name.clone(),
        data_nics,
        extra_args: config.qemu_args.clone(),
        restore,
    }
}

/// A QEMU that `start_qemu` started.
pub(crate) struct Started {
    /// Its pid (also its process group).
    pub pid: u32,
    /// vial's end of its control monitor, not negotiated yet.
    pub control: tokio::net::UnixStream,
    /// Files in the run directory to remove when the run ends.
    pub created: Vec<PathBuf>,
}

/// Starts QEMU: binds vial's own QMP monitor and hands the listener to QEMU (so vial connects
/// at once, with no polling for a socket file), then spawns QEMU with `inherit` open in it.
pub(crate) fn start_qemu(
    config: &Config,
    accel: Accel,
    disks: Vec<PathBuf>,
    share: Option<PathBuf>,
    data_nics: Vec<vm::argv::DataNic>,
    inherit: &[std::os::fd::RawFd],
    restore: bool,
) -> Result<Started, SetupFailure> {
    let run_path = |name: &str| config.run_dir.join(name);
    let mut created = Vec::new();
    let control_path = run_path(paths::CONTROL);
    let _ = std::fs::remove_file(&control_path);
    let control_listener = std::os::unix::net::UnixListener::bind(&control_path)
        .map_err(|err| fail(Outcome::SetupFailed, format!("cannot bind {}: {err}", control_path.display())))?;
    created.push(control_path.clone());
    // Files QEMU creates; removed on exit in case QEMU is killed before it can.
    for name in [paths::QMP, paths::CONSOLE] {
        let path = run_path(name);
        let _ = std::fs::remove_file(&path);
        created.push(path);
    }
    // The connection waits in the listener's backlog until QEMU accepts it.
    let control = std::os::unix::net::UnixStream::connect(&control_path)
        .and_then(|stream| {
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        })
        .map_err(|err| fail(Outcome::SetupFailed, format!("cannot connect to {}: {err}", control_path.display())))?;

    let launch = launch_for(config, accel, disks, share, control_listener.as_raw_fd(), data_nics, restore);
    let argv = vm::qemu_argv(&config.profile, &launch);
    let mut inherit = inherit.to_vec();
    inherit.push(control_listener.as_raw_fd());
    let child = vm::launch::spawn_qemu(&argv, &inherit).map_err(|err| match err {
        vm::launch::LaunchError::QemuMissing { .. } => fail(Outcome::QemuMissing, err),
        other => fail(Outcome::SetupFailed, crate::logging::error_chain(&other)),
    })?;
    // QEMU holds the listener now; ours would only keep the socket alive after QEMU dies.
    drop(OwnedFd::from(control_listener));
    Ok(Started { pid: child.id(), control, created })
}
