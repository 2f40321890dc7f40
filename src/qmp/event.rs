//! QMP events as the supervisor sees them ([`VmEvent`]), decoded through the `qapi` schema, and
//! the VM's run state they imply ([`next_run_state`], pure). Never sends anything to QEMU.

use std::fmt;

use qapi::Enum as _;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// An event from QEMU that the supervisor cares about, mapped from the QMP event of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// `SHUTDOWN`: the guest or the host asked the VM to stop; QEMU exits next unless it was
    /// started with `-no-shutdown`.
    Shutdown {
        /// True when the guest initiated it (ACPI poweroff, reset turned into shutdown).
        guest: bool,
        /// QEMU's `ShutdownCause` name (`guest-shutdown`, `host-qmp-quit`, `host-signal`, ...).
        reason: String,
    },
    /// `POWERDOWN`: an ACPI power button press was sent to the guest (`system_powerdown`).
    Powerdown,
    /// `RESET`: the VM was reset.
    Reset {
        /// True when the guest initiated it (a reboot).
        guest: bool,
    },
    /// `STOP`: the vCPUs stopped (paused, or the stop that follows a shutdown or a panic).
    Stop,
    /// `RESUME`: the vCPUs run again.
    Resume,
    /// `GUEST_PANICKED`: the guest reported a panic through a pvpanic-like device.
    GuestPanicked,
    /// `DEVICE_DELETED`: QEMU finished removing a device (after `device_del`, once the guest
    /// released it). QEMU sends one for each QOM child that goes too (a virtio-net-pci NIC's
    /// `.../virtio-backend`, without a `device`), then one for the device itself.
    DeviceDeleted {
        /// The device's id (`nic3`), when it had one.
        device: Option<String>,
        /// Its QOM path (`/machine/peripheral/nic3`).
        path: String,
    },
    /// Any other event that the `qapi-qmp` schema knows (`RTC_CHANGE`, `NIC_RX_FILTER_CHANGED`,
    /// ...). Forwarded by name only, so the supervisor can log it; it does not change the run
    /// state.
    Other {
        /// The QMP event name.
        name: String,
    },
}

/// The receiving end of the VM's events. `recv()` returns `None` once the connection is closed.
pub type Events = mpsc::UnboundedReceiver<VmEvent>;

/// The VM's run state, as QEMU names it in `query-status` (the QAPI `RunState` enum).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunState {
    /// `debug`: stopped by the gdb stub.
    Debug,
    /// `inmigrate`: waiting for an incoming migration.
    InMigrate,
    /// `internal-error`: stopped by an internal error (e.g. KVM failure).
    InternalError,
    /// `io-error`: stopped on a disk I/O error.
    IoError,
    /// `paused`: stopped by `stop` or `-S`.
    Paused,
    /// `postmigrate`: stopped after an outgoing migration.
    PostMigrate,
    /// `prelaunch`: not started yet, or reset while not running.
    Prelaunch,
    /// `finish-migrate`: finishing an outgoing migration.
    FinishMigrate,
    /// `restore-vm`: loading a snapshot.
    RestoreVm,
    /// `running`: the vCPUs run.
    Running,
    /// `save-vm`: saving a snapshot.
    SaveVm,
    /// `shutdown`: the guest shut down and QEMU was told not to exit (`-no-shutdown`).
    Shutdown,
    /// `suspended`: the guest is in ACPI S3.
    Suspended,
    /// `watchdog`: stopped by a watchdog whose action is `pause`.
    Watchdog,
    /// `guest-panicked`: stopped after a guest panic.
    Panicked,
    /// `colo`: COLO fault tolerance.
    Colo,
    /// A name this module does not know (a QEMU newer than this code).
    Unknown(String),
}

/// The named run states, in one table so that `from_name` and `as_str` cannot drift apart.
pub(super) const RUN_STATE_NAMES: &[(RunState, &str)] = &[
    (RunState::Debug, "debug"),
    (RunState::InMigrate, "inmigrate"),
    (RunState::InternalError, "internal-error"),
    (RunState::IoError, "io-error"),
    (RunState::Paused, "paused"),
    (RunState::PostMigrate, "postmigrate"),
    (RunState::Prelaunch, "prelaunch"),
    (RunState::FinishMigrate, "finish-migrate"),
    (RunState::RestoreVm, "restore-vm"),
    (RunState::Running, "running"),
    (RunState::SaveVm, "save-vm"),
    (RunState::Shutdown, "shutdown"),
    (RunState::Suspended, "suspended"),
    (RunState::Watchdog, "watchdog"),
    (RunState::Panicked, "guest-panicked"),
    (RunState::Colo, "colo"),
];

impl RunState {
    /// The state for QEMU's name of it; a name not in the table becomes `Unknown`.
    pub fn from_name(name: &str) -> RunState {
        RUN_STATE_NAMES
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(state, _)| state.clone())
            .unwrap_or_else(|| RunState::Unknown(name.to_string()))
    }

    /// QEMU's name for the state (`running`, `paused`, `guest-panicked`, ...).
    pub fn as_str(&self) -> &str {
        if let RunState::Unknown(name) = self {
            return name;
        }
        RUN_STATE_NAMES.iter().find(|(state, _)| state == self).map(|(_, name)| *name).unwrap_or("unknown")
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The run state after `event`, given the state before it. Pure, so the supervisor can track the
/// state from the event stream without asking QEMU after every event.
///
/// The rules follow QEMU's `main_loop_should_exit()` and `qemu_system_guest_panicked()`
/// (softmmu/runstate.c), checked against QEMU 7.2:
/// - `STOP` → `paused`, except that QEMU implements a shutdown under `-no-shutdown` and a guest
///   panic as `SHUTDOWN`/`GUEST_PANICKED` followed by `vm_stop()`, which sends `STOP`; that STOP
///   leaves `shutdown` and `guest-panicked` as they are.
/// - `RESUME` → `running`; `SHUTDOWN` → `shutdown`; `GUEST_PANICKED` → `guest-panicked`.
/// - `RESET` keeps `running` (a reboot), but a reset of a VM that was not running leaves it in
///   `prelaunch` until `cont` (observed: `stop`, `system_reset`, `query-status` → `prelaunch`).
/// - `POWERDOWN` only presses the ACPI button, and other events (`DEVICE_DELETED`, ...) do not
///   change the state.
pub fn next_run_state(current: &RunState, event: &VmEvent) -> RunState {
    match event {
        VmEvent::Stop => match current {
            RunState::Shutdown | RunState::Panicked => current.clone(),
            _ => RunState::Paused,
        },
        VmEvent::Resume => RunState::Running,
        VmEvent::Shutdown { .. } => RunState::Shutdown,
        VmEvent::GuestPanicked => RunState::Panicked,
        VmEvent::Reset { .. } => match current {
            RunState::Running | RunState::InMigrate | RunState::FinishMigrate => current.clone(),
            _ => RunState::Prelaunch,
        },
        VmEvent::Powerdown | VmEvent::DeviceDeleted { .. } | VmEvent::Other { .. } => current.clone(),
    }
}

/// The generic shape of every event (qmp-spec, "Asynchronous events"), parsed before the typed
/// one so that an event the schema rejects can still be logged by name.
#[derive(Deserialize)]
struct RawEvent {
    event: String,
    #[serde(default)]
    data: Value,
}

/// Maps one event object to a `VmEvent`, or `None` (logged) when it is not one to forward.
///
/// The typed parse uses `qapi::qmp::Event`, an internally tagged serde enum with no catch-all
/// variant: an event name the schema does not know, or known data of the wrong shape, is a
/// deserialization error. Both are logged and ignored, never fatal.
pub(super) fn decode_event(message: Value) -> Option<VmEvent> {
    let raw: RawEvent = match serde_json::from_value(message.clone()) {
        Ok(raw) => raw,
        Err(error) => {
            warn!(line = %message, %error, "qmp event without a string name; ignored");
            return None;
        }
    };
    let typed = match serde_json::from_value::<qapi::qmp::Event>(message) {
        Ok(typed) => typed,
        Err(error) => {
            // serde reports an unknown tag as "unknown variant `NAME`" (an enum value inside
            // the data that the schema does not know reads the same, with that value instead of
            // the event name). An unknown event is a QEMU newer than the schema, which is
            // expected; a known event with data of another shape is worth a warning.
            let unknown_name = format!("unknown variant `{}`", raw.event);
            if error.to_string().starts_with(&unknown_name) {
                info!(event = %raw.event, data = %raw.data, "qmp event unknown to the qapi schema; ignored");
            } else {
                warn!(event = %raw.event, data = %raw.data, %error, "qmp event does not fit the qapi schema; ignored");
            }
            return None;
        }
    };
    debug!(event = %raw.event, data = %raw.data, "qmp event");
    use qapi::qmp::Event;
    Some(match typed {
        Event::SHUTDOWN { data, .. } => VmEvent::Shutdown { guest: data.guest, reason: data.reason.name().to_string() },
        Event::POWERDOWN { .. } => VmEvent::Powerdown,
        Event::RESET { data, .. } => VmEvent::Reset { guest: data.guest },
        Event::STOP { .. } => VmEvent::Stop,
        Event::RESUME { .. } => VmEvent::Resume,
        Event::GUEST_PANICKED { .. } => VmEvent::GuestPanicked,
        Event::DEVICE_DELETED { data, .. } => VmEvent::DeviceDeleted { device: data.device, path: data.path },
        _ => VmEvent::Other { name: raw.event },
    })
}
