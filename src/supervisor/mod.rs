//! The supervisor: the one place that ties configuration, the QEMU process, QMP, readiness,
//! signals and reaping together, and walks the endpoint through its life
//! (`starting` → ... → `ready` → `stopping` → `stopped`, or `failed`).
//!
//! It fails fast during setup and never bails once QEMU runs: from then on every error is
//! logged and the loop carries on until QEMU is gone. It never leaves QEMU behind: every path
//! out of [`run`] goes through the same teardown, and QEMU carries a parent-death signal.
//! How a stop proceeds (power button, `quit`, SIGKILL) is decided in `stop`.

mod links;
mod stop;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, Signal as SignalStream, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, NicLayout};
use crate::exit::{Outcome, SetupError, TUN_DEVICE};
use crate::health;
use crate::net::dataplane::DataPlane;
use crate::qmp::{self, RunState, VmEvent};
use crate::reaper::{self, Ended};
use crate::rundir;
use crate::status::{BootFrom, BootStatus, ForwardStatus, Phase, Status};
use crate::vm::qemu::{self, Start};
use crate::vm::snapshot::restore::SnapshotNics;
use crate::vm::snapshot::{self, restore};
use crate::vm::{self, readiness, Accel};
use links::LinkTask;
use stop::{Stop, StopAction, StopInput};

/// How long a stop's QMP command (`system_powerdown`, `quit`) may hold the loop: a wedged
/// QEMU answers nothing, and the ladder's deadlines must still be met.
const STOP_COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Health's reason while a running guest that was ready does not answer its probe.
const NOT_ANSWERING: &str = "the guest has not answered its readiness probe for 30 s (hung, or its network is down)";

/// Health's reason while a VM that was ready is paused.
const PAUSED: &str = "the VM is paused: its vCPUs stopped (a QMP `stop` on qmp.sock, or QEMU on an I/O error)";

/// QMP negotiation as the supervision loop awaits it: the connection, or why there is none.
type Negotiation = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(qmp::Qmp, qmp::Events), qmp::QmpError>>>>;

/// How setup ended.
enum Setup {
    /// QEMU runs.
    Launched(u32, Monitor),
    /// A step failed.
    Failed(SetupError),
    /// SIGTERM or SIGINT arrived first: a clean stop, nothing to power off.
    Stopped(Signal),
    /// SIGQUIT arrived first.
    Forced(Signal),
}

/// vial's control monitor as setup hands it to the supervision loop.
enum Monitor {
    /// Connected, greeting not read yet (QEMU is starting).
    Pending(tokio::net::UnixStream),
    /// Negotiated already (the snapshot was loaded over it).
    Ready(qmp::Qmp, qmp::Events),
}

/// Runs the endpoint to its end on a current-thread runtime (see `sys::spawn_supervised` for
/// why it must be current-thread). Returns the outcome; the binary maps it to an exit code.
pub fn run(config: Config) -> Outcome {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            let err = SetupError::Runtime(err);
            tracing::error!("{}", crate::logging::error_chain(&err));
            return err.outcome();
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

    async fn run(mut self) -> Outcome {
        let setup = match Signals::register() {
            Ok(mut signals) => match self.setup_unless_stopped(&mut signals).await {
                Setup::Launched(qemu_pid, monitor) => Ok((signals, qemu_pid, monitor)),
                Setup::Failed(err) => Err(Some(err)),
                Setup::Stopped(signal) => {
                    tracing::info!(signal = signal.as_str(), "stop requested before the VM started");
                    self.set_phase(Phase::Stopped, Some(format!("{} received before the VM started", signal.as_str())));
                    Err(None)
                }
                Setup::Forced(signal) => {
                    tracing::warn!(signal = signal.as_str(), "forced stop before the VM started");
                    self.set_phase(Phase::Stopped, Some(format!("{} received before the VM started", signal.as_str())));
                    let outcome = Outcome::ForcedBySignal(signal as i32);
                    self.teardown(outcome).await;
                    return outcome;
                }
            },
            Err(err) => Err(Some(SetupError::Signals(err))),
        };
        let outcome = match setup {
            Ok((mut signals, qemu_pid, monitor)) => self.supervise(qemu_pid, monitor, &mut signals).await,
            Err(None) => Outcome::StoppedBeforeStart,
            Err(Some(err)) => {
                let message = crate::logging::error_chain(&err);
                tracing::error!("{message}");
                self.set_phase(Phase::Failed, Some(message));
                err.outcome()
            }
        };
        self.teardown(outcome).await;
        outcome
    }

    /// Runs setup inside the same signal and reaper loop as supervision: a stop request
    /// during any setup step (the wait for data links, a snapshot's load) ends it at once, and
    /// orphans are collected meanwhile. Dropping the setup future cancels the step it was in;
    /// what that step made goes with it or with [`Endpoint::teardown`].
    async fn setup_unless_stopped(&mut self, signals: &mut Signals) -> Setup {
        let status = self.status.subscribe();
        let launch = self.setup_and_launch();
        tokio::pin!(launch);
        loop {
            tokio::select! {
                result = &mut launch => return match result {
                    Ok((qemu_pid, monitor)) => Setup::Launched(qemu_pid, monitor),
                    Err(err) => Setup::Failed(err),
                },
                _ = signals.term.recv() => return Setup::Stopped(Signal::SIGTERM),
                _ = signals.int.recv() => return Setup::Stopped(Signal::SIGINT),
                _ = signals.quit.recv() => return Setup::Forced(Signal::SIGQUIT),
                _ = signals.child.recv() => {
                    let count = reaper::reap_orphans();
                    if count > 0 {
                        tracing::debug!(count, "reaped orphans during setup");
                    }
                }
                _ = signals.hup.recv() => tracing::info!("SIGHUP ignored (vial has no configuration to reload; restart the container instead)"),
                _ = signals.usr1.recv() => {
                    let json = status.borrow().to_json(Instant::now());
                    tracing::info!(status = %json, "status on SIGUSR1");
                }
            }
        }
    }

    /// Every setup step, in order; the first failure ends the run with its outcome.
    async fn setup_and_launch(&mut self) -> Result<(u32, Monitor), SetupError> {
        let profile = self.config.profile.clone();
        let run_dir = &self.config.run_dir;
        std::fs::create_dir_all(run_dir).map_err(|source| SetupError::Create { path: run_dir.clone(), source })?;
        let health_path = run_dir.join(rundir::HEALTH);
        let listener = health::bind(&health_path)?;
        self.created.push(health_path);
        tokio::spawn(health::serve(listener, self.status.subscribe()));

        if !Path::new(TUN_DEVICE).exists() {
            return Err(SetupError::TunMissing);
        }
        qemu::require_binary(&profile.qemu)?;
        qemu::probe_sandbox_early(&profile.qemu);
        // Off the loop: `auto` may boot a probe guest (see vm::accel).
        let probed = profile.clone();
        let (accel, fallback) = tokio::task::spawn_blocking(move || vm::accel::choose(&probed))
            .await
            .unwrap_or_else(|err| Ok((Accel::Tcg, Some(format!("the accelerator probe failed: {err}")))))?;
        if let Some(reason) = &fallback {
            tracing::warn!(%reason, "KVM not usable; using TCG");
        }
        self.status.send_modify(|status| {
            status.accel = Some(accel.as_str().into());
            status.accel_note = fallback.clone();
        });

        let mgmt_addr = crate::net::mgmt_address(&self.config.mgmt_iface)?;
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
            let relays = crate::forward::bind_all(mgmt_addr, &profile.forwards).await?;
            crate::forward::spawn_all(relays);
        }

        let share = qemu::lesson_dir(&self.config);
        if let (Some(dir), Some(lesson)) = (&share, &profile.share) {
            if *dir != lesson.path {
                tracing::info!(path = %lesson.path.display(), "no lesson directory; the guest gets an empty share");
                std::fs::create_dir_all(dir).map_err(|source| SetupError::Create { path: dir.clone(), source })?;
            }
        }

        let user = vm::user::choose(&profile, accel, share.as_deref(), Path::new(vm::user::UNPRIVILEGED_PORT_START))?;
        if let Some(note) = &user.note {
            tracing::warn!(%note, "qemu runs as root");
        }
        self.status.send_modify(|status| {
            status.qemu_user = Some(user.name().into());
            status.qemu_user_note = user.note.clone();
        });
        let user = user.run_as;
        // The empty share vial made (no lesson directory) is the guest's, through QEMU.
        if let (Some(dir), Some(run_as)) = (&share, &user) {
            if *dir == run_dir.join(rundir::EMPTY_LESSON) {
                run_as.give(dir).map_err(|source| SetupError::Create { path: dir.clone(), source })?;
            }
        }

        self.set_phase(Phase::WaitingForInterfaces, None);
        let dataplane = DataPlane::start(&profile, &self.config.mgmt_iface).await?;
        self.set_phase(Phase::Plumbing, None);
        self.status.send_modify(|status| status.links = dataplane.statuses());
        // Kept from here on, so that every way out tears the plumbing down.
        let dataplane = &*self.dataplane.insert(dataplane);

        let note = match &profile.snapshot {
            // An image built without running `vial snapshot` (or a test bundle): not a fault.
            Some(target) if !target.dir.join(snapshot::MANIFEST).is_file() => {
                tracing::info!(dir = %target.dir.display(), "no snapshot in the profile's snapshot directory; booting cold");
                Some(format!("snapshot not used: there is none in {}", target.dir.display()))
            }
            Some(target) => {
                let nics = match profile.nic_layout {
                    NicLayout::Slots => SnapshotNics::Hotplug(dataplane.hotplug_nics(&profile, &self.config.name)?),
                    NicLayout::Multifunction => {
                        SnapshotNics::CommandLine { nics: dataplane.data_nics(), fds: dataplane.fds() }
                    }
                };
                match restore::restore(&self.config, target, accel, share.clone(), nics, user.clone()).await {
                    Ok(restored) => {
                        self.created.extend(restored.created);
                        self.status.send_modify(|status| status.qemu_pid = Some(restored.pid));
                        self.set_boot(BootFrom::Snapshot, None);
                        self.set_phase(Phase::Booting, None);
                        return Ok((restored.pid, Monitor::Ready(restored.qmp, restored.events)));
                    }
                    Err(err) => {
                        let reason = crate::logging::error_chain(&err);
                        tracing::warn!(%reason, "not starting from the snapshot; booting cold");
                        Some(format!("snapshot not used: {reason}"))
                    }
                }
            }
            None => None,
        };
        let disks = vm::disk::prepare_overlays(&profile.disks, &self.config.state_dir, vm::disk::Base::Image)?;
        let start = Start { accel, disks, share, data_nics: dataplane.data_nics(), restore: false, user };
        let started = qemu::start_qemu(&self.config, &start, &dataplane.fds())?;
        self.created.extend(started.created);
        self.status.send_modify(|status| status.qemu_pid = Some(started.pid));
        self.set_boot(BootFrom::Cold, note);
        self.set_phase(Phase::Booting, None);
        Ok((started.pid, Monitor::Pending(started.control)))
    }

    fn set_boot(&self, from: BootFrom, note: Option<String>) {
        tracing::info!(?from, note = note.as_deref().unwrap_or(""), "boot");
        self.status.send_modify(|status| status.boot = Some(BootStatus { from, note }));
    }

    /// Watches QEMU until it is gone and returns how the run ended.
    async fn supervise(&mut self, qemu_pid: u32, monitor: Monitor, signals: &mut Signals) -> Outcome {
        let mut stop = Stop::NotRequested;
        let mut qmp_handle: Option<qmp::Qmp> = None;
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
        let mut probe_task: Option<tokio::task::JoinHandle<()>> = None;
        let mut events: Option<qmp::Events> = None;
        let mut run_state = RunState::Running;
        // Link changes and the plumbing check run on their own task (see `links`).
        let links = self.dataplane.take().map(|plane| {
            LinkTask::spawn(plane, self.status.clone(), self.config.profile.clone(), self.config.name.clone())
        });

        // QMP negotiation runs beside the loop, so signals and QEMU's death are seen while
        // QEMU is still starting.
        let mut negotiation: Negotiation = match monitor {
            Monitor::Pending(control) => Box::pin(qmp::connect_unix_within(control, qemu::QMP_GREETING_TIMEOUT)),
            Monitor::Ready(handle, events) => Box::pin(std::future::ready(Ok((handle, events)))),
        };
        let mut negotiating = true;
        let (alive_tx, mut alive_rx) = mpsc::unbounded_channel::<bool>();
        let mut liveness: Option<tokio::task::JoinHandle<()>> = None;

        loop {
            let deadline = stop.deadline();
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
                            if let Some(links) = &links {
                                links.give_qmp(handle.clone());
                            }
                            // A stop requested while QEMU was starting goes out now.
                            if let Stop::PoweringDown { .. } = stop {
                                press_power_button(&handle).await;
                            }
                            if stop == Stop::NotRequested {
                                probe_task = Some(self.start_probe(ready_tx.clone()));
                            }
                            qmp_handle = Some(handle);
                        }
                        Err(err) => tracing::warn!(reason = %crate::logging::error_chain(&err), "supervising qemu without qmp"),
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
                Some(()) = ready_rx.recv() => {
                    if stop == Stop::NotRequested && matches!(self.status.borrow().phase, Phase::Booting | Phase::Unready) {
                        self.set_phase(Phase::Ready, None);
                        if liveness.is_none() {
                            liveness = Some(self.start_liveness(alive_tx.clone()));
                        }
                    }
                }
                Some(answering) = alive_rx.recv() => {
                    let phase = self.status.borrow().phase;
                    let reason = self.status.borrow().reason.clone();
                    match (answering, phase) {
                        (false, Phase::Ready) if stop == Stop::NotRequested => {
                            tracing::warn!("the guest stopped answering its readiness probe");
                            self.set_phase(Phase::Unready, Some(NOT_ANSWERING.into()));
                        }
                        (true, Phase::Unready) if reason.as_deref() == Some(NOT_ANSWERING) => {
                            tracing::info!("the guest answers its readiness probe again");
                            self.set_phase(Phase::Ready, None);
                        }
                        _ => {}
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
                        if let Some(task) = liveness.take() {
                            task.abort();
                        }
                        if let Some(links) = links {
                            self.dataplane = links.finish().await;
                        }
                        return self.qemu_ended(ended, stop);
                    }
                }
                _ = signals.term.recv() => stop = self.advance(stop, StopInput::Request(Signal::SIGTERM), qemu_pid, qmp_handle.as_ref()).await,
                _ = signals.int.recv() => stop = self.advance(stop, StopInput::Request(Signal::SIGINT), qemu_pid, qmp_handle.as_ref()).await,
                _ = signals.quit.recv() => stop = self.advance(stop, StopInput::Force(Signal::SIGQUIT), qemu_pid, qmp_handle.as_ref()).await,
                _ = signals.hup.recv() => tracing::info!("SIGHUP ignored (vial has no configuration to reload; restart the container instead)"),
                _ = signals.usr1.recv() => {
                    let json = self.status.borrow().to_json(Instant::now());
                    tracing::info!(status = %json, "status on SIGUSR1");
                }
                _ = sleep_until(deadline) => {
                    stop = self.advance(stop, StopInput::Tick, qemu_pid, qmp_handle.as_ref()).await;
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
            // Paused after it was ready (a QMP `stop` from a person or tool on qmp.sock, or
            // QEMU on an I/O error): not usable, and health says why.
            VmEvent::Stop if stop == Stop::NotRequested && self.status.borrow().phase == Phase::Ready => {
                self.set_phase(Phase::Unready, Some(PAUSED.into()));
            }
            // Running again: ready once the guest answers its probe.
            VmEvent::Resume if stop == Stop::NotRequested && self.status.borrow().phase == Phase::Unready => {
                if let Some(task) = probe_task.take() {
                    task.abort();
                }
                self.set_phase(
                    Phase::Unready,
                    Some("the VM resumed; waiting for the guest to answer its probe".into()),
                );
                *probe_task = Some(self.start_liveness_probe(ready_tx.clone()));
            }
            _ => {}
        }
    }

    /// One step of the stop ladder ([`Stop::next`]): the new state, after carrying out its
    /// action. Every QMP command here is bounded by [`STOP_COMMAND_TIMEOUT`], so a wedged QEMU
    /// (kill -STOP) cannot hold the loop past its deadlines.
    async fn advance(&self, stop: Stop, input: StopInput, qemu_pid: u32, qmp_handle: Option<&qmp::Qmp>) -> Stop {
        if let (Stop::NotRequested, StopInput::Request(signal)) = (stop, input) {
            tracing::info!(signal = signal.as_str(), timeout = ?self.config.profile.stop_timeout, "stopping: pressing the guest's power button");
            self.set_phase(Phase::Stopping, Some(format!("{} received", signal.as_str())));
        }
        let (next, action) = stop.next(input, Instant::now(), self.config.profile.stop_timeout, qmp_handle.is_some());
        match action {
            StopAction::None => {}
            StopAction::PressPowerButton => {
                if let Some(handle) = qmp_handle {
                    press_power_button(handle).await;
                }
            }
            StopAction::Quit => {
                tracing::warn!(timeout = ?self.config.profile.stop_timeout, "guest did not power off in time; sending quit");
                if let Some(handle) = qmp_handle {
                    match tokio::time::timeout(STOP_COMMAND_TIMEOUT, handle.quit()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => tracing::warn!(%err, "qmp quit failed"),
                        Err(_) => tracing::warn!("qemu did not answer quit; it is killed after the grace"),
                    }
                }
            }
            StopAction::Kill => {
                tracing::warn!("qemu did not quit in time (or cannot be asked to); killing it");
                stop::kill(qemu_pid);
            }
            StopAction::ForceKill(signal) => {
                tracing::warn!(signal = signal.as_str(), "forced stop: killing qemu");
                stop::kill(qemu_pid);
            }
        }
        next
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

    /// Where a TCP probe aims: the forward on the management address (a profile with a TCP
    /// probe has forwards, so there is one).
    fn probe_addr(&self) -> Ipv4Addr {
        let mgmt = self.status.borrow().forwards.first().and_then(|f| f.address.parse().ok());
        mgmt.unwrap_or(Ipv4Addr::LOCALHOST)
    }

    fn start_probe(&self, ready: mpsc::UnboundedSender<()>) -> tokio::task::JoinHandle<()> {
        let profile = &self.config.profile;
        let interval = profile.probe_interval;
        let probe = profile.probe.clone();
        let addr = self.probe_addr();
        let console_log = self.config.run_dir.join(rundir::CONSOLE_LOG);
        tokio::spawn(async move {
            readiness::wait_ready(&probe, interval, addr, &console_log).await;
            let _ = ready.send(());
        })
    }

    /// Follows a ready guest's probe ([`readiness::watch_liveness`]), reporting on `alive`.
    fn start_liveness(&self, alive: mpsc::UnboundedSender<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(readiness::watch_liveness(self.config.profile.probe.clone(), self.probe_addr(), alive))
    }

    /// Sends on `ready` once a guest that was ready answers its probe again
    /// ([`readiness::wait_answering`]).
    fn start_liveness_probe(&self, ready: mpsc::UnboundedSender<()>) -> tokio::task::JoinHandle<()> {
        let profile = &self.config.profile;
        let (interval, probe, addr) = (profile.probe_interval, profile.probe.clone(), self.probe_addr());
        tokio::spawn(async move {
            readiness::wait_answering(&probe, interval, addr).await;
            let _ = ready.send(());
        })
    }

    /// The one way out: kill QEMU if it still runs, remove what vial created, persist the
    /// final status for `vial health` to show after the supervisor is gone.
    async fn teardown(&mut self, outcome: Outcome) {
        if let Some(pid) = self.status.borrow().qemu_pid {
            stop::kill(pid);
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
    match tokio::time::timeout(STOP_COMMAND_TIMEOUT, handle.system_powerdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::warn!(%err, "system_powerdown failed"),
        Err(_) => tracing::warn!("qemu did not answer system_powerdown (wedged?); the ladder goes on"),
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

/// The QEMU argv `vial run` would use for a cold boot with this configuration, without
/// creating anything (`vial argv`): overlays are named but not made, and the control
/// monitor's descriptor is shown as 3.
pub fn dry_run_argv(config: &Config) -> Result<Vec<std::ffi::OsString>, SetupError> {
    let (accel, _) = vm::accel::choose(&config.profile)?;
    let disks = (0..config.profile.disks.len()).map(|i| vm::disk::overlay_path(&config.state_dir, i)).collect();
    let start =
        Start { accel, disks, share: qemu::lesson_dir(config), data_nics: Vec::new(), restore: false, user: None };
    Ok(vm::qemu_argv(&config.profile, &start.launch(config, 3)))
}
