//! The endpoint's life cycle and the status snapshot that the health socket serves (the
//! README's "Health" names the states). Plain data, every state a serde enum with the name it
//! has on the wire: this module never does I/O.

use serde::Serialize;
use std::time::{Duration, Instant};

/// Where the endpoint is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// `vial` is reading its configuration and checking the container.
    Starting,
    /// Waiting for the container's data links to appear.
    WaitingForInterfaces,
    /// Stitching data links to VM NICs.
    Plumbing,
    /// QEMU runs and QMP is connected; the guest does not answer its readiness probe yet.
    Booting,
    /// The profile's readiness probe passed.
    Ready,
    /// It was ready and no longer is (its VM is paused, or the guest stopped answering its
    /// probe); `reason` says why. Back to `ready` once the guest answers its probe again.
    Unready,
    /// A stop was requested; the guest is being powered off.
    Stopping,
    /// The guest is off and QEMU has exited.
    Stopped,
    /// Something went wrong; `reason` says what.
    Failed,
}

impl Phase {
    /// The name used on the wire and in logs (`waiting-for-interfaces`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::WaitingForInterfaces => "waiting-for-interfaces",
            Phase::Plumbing => "plumbing",
            Phase::Booting => "booting",
            Phase::Ready => "ready",
            Phase::Unready => "unready",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One management port forwarded from the container's eth0 into the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardStatus {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The address QEMU listens on (eth0's IPv4 address).
    pub address: String,
    /// The port on that address.
    pub container_port: u16,
    /// The port in the guest.
    pub guest_port: u16,
}

/// Where one data link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    /// Stitched, not proven yet.
    Unchecked,
    /// Stitched and proven to carry frames by the self-check.
    Up,
    /// Stitched, but the link has no carrier (its peer is down): proven again when it returns.
    NoCarrier,
    /// Stitching, plugging or the self-check failed.
    Failed,
    /// The link is gone (its NIC was unplugged; it is plugged again if the link returns).
    Missing,
}

/// One data link between a container interface and a VM NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkStatus {
    /// The container interface (`eth1`, `net1`).
    pub interface: String,
    /// The VM NIC index (1-based, as the guest counts data ports).
    pub nic: u32,
    /// The plumbing mode (`tc`, `bridge`, `macvtap`).
    pub mode: String,
    /// Where it stands.
    pub state: LinkState,
    /// How often vial found this link's plumbing broken after ready (a filter, qdisc or
    /// bridge port removed by someone else) and restored it.
    pub repairs: u32,
}

/// What the guest was started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootFrom {
    /// A cold boot.
    Cold,
    /// The image's RAM snapshot was loaded.
    Snapshot,
}

/// How the guest was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootStatus {
    /// Cold or from the snapshot.
    pub from: BootFrom,
    /// Why a profile's snapshot was not used, when it was not.
    pub note: Option<String>,
}

/// A snapshot of everything health reports. The supervisor owns the only writer.
#[derive(Debug, Clone)]
pub struct Status {
    /// The profile's name.
    pub profile: String,
    /// The life-cycle phase.
    pub phase: Phase,
    /// Why the endpoint is in this phase, when that is not obvious (always set for `failed`).
    pub reason: Option<String>,
    /// When `vial` started.
    pub started: Instant,
    /// QEMU's pid while it runs.
    pub qemu_pid: Option<u32>,
    /// `kvm` or `tcg`, once decided.
    pub accel: Option<String>,
    /// Why `auto` chose TCG, when it did.
    pub accel_note: Option<String>,
    /// The user QEMU runs as (`vm::user`), once decided.
    pub qemu_user: Option<String>,
    /// Why QEMU runs as root under `machine.user = "auto"`, when it does.
    pub qemu_user_note: Option<String>,
    /// The guest's run state as QMP last reported it (`running`, `paused`, `shutdown`, ...).
    pub vm_run_state: Option<String>,
    /// Forwarded management ports.
    pub forwards: Vec<ForwardStatus>,
    /// Data links.
    pub links: Vec<LinkStatus>,
    /// What is wrong with watching the links, when something is (the links stay stitched).
    pub links_note: Option<String>,
    /// How the guest was started, once it was.
    pub boot: Option<BootStatus>,
}

impl Status {
    /// A fresh status for `profile`, in phase `starting`.
    pub fn new(profile: &str) -> Self {
        Status {
            profile: profile.to_string(),
            phase: Phase::Starting,
            reason: None,
            started: Instant::now(),
            qemu_pid: None,
            accel: None,
            accel_note: None,
            qemu_user: None,
            qemu_user_note: None,
            vm_run_state: None,
            forwards: Vec::new(),
            links: Vec::new(),
            links_note: None,
            boot: None,
        }
    }

    /// The JSON document that `GET /status` returns and that is persisted on exit.
    pub fn to_json(&self, now: Instant) -> serde_json::Value {
        let uptime: Duration = now.saturating_duration_since(self.started);
        serde_json::json!({
            "state": self.phase,
            "reason": self.reason,
            "profile": self.profile,
            "uptime_seconds": (uptime.as_millis() as f64) / 1000.0,
            "qemu_pid": self.qemu_pid,
            "accel": self.accel,
            "accel_note": self.accel_note,
            "qemu_user": self.qemu_user,
            "qemu_user_note": self.qemu_user_note,
            "vm": self.vm_run_state,
            "forwards": self.forwards,
            "links": self.links,
            "links_note": self.links_note,
            "boot": self.boot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_serialize_with_design_names() {
        assert_eq!(
            serde_json::to_value(Phase::WaitingForInterfaces).unwrap(),
            serde_json::json!("waiting-for-interfaces")
        );
        for phase in [
            Phase::Starting,
            Phase::WaitingForInterfaces,
            Phase::Plumbing,
            Phase::Booting,
            Phase::Ready,
            Phase::Stopping,
            Phase::Stopped,
            Phase::Failed,
        ] {
            assert_eq!(serde_json::to_value(phase).unwrap(), serde_json::json!(phase.as_str()));
        }
    }

    #[test]
    fn status_json_names_every_field() {
        let status = Status::new("linux");
        let json = status.to_json(status.started);
        for key in ["state", "reason", "profile", "uptime_seconds", "qemu_pid", "accel", "vm", "forwards", "links"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["state"], "starting");
    }

    #[test]
    fn link_states_and_boot_sources_have_their_wire_names() {
        let names = [
            (LinkState::Unchecked, "unchecked"),
            (LinkState::Up, "up"),
            (LinkState::NoCarrier, "no-carrier"),
            (LinkState::Failed, "failed"),
            (LinkState::Missing, "missing"),
        ];
        for (state, name) in names {
            assert_eq!(serde_json::to_value(state).unwrap(), serde_json::json!(name));
        }
        assert_eq!(serde_json::to_value(BootFrom::Snapshot).unwrap(), serde_json::json!("snapshot"));
        assert_eq!(serde_json::to_value(BootFrom::Cold).unwrap(), serde_json::json!("cold"));
    }
}
