//! Exit codes of `vial`. Setup failures use sysexits(3) numbers; the ways a running VM can end
//! get small codes of their own; a forced exit on a signal is 128+N, as shells report it.
//! [`SetupError`] is every way a start can fail before QEMU runs, one variant per module
//! error; [`SetupError::outcome`] maps each to its [`Outcome`]. This module only maps; it
//! never exits the process itself.

use std::path::PathBuf;

use crate::health::HealthError;
use crate::net::dataplane::DataPlaneError;
use crate::net::links::WaitError;
use crate::net::MgmtError;
use crate::vm::accel::KvmUnavailable;
use crate::vm::disk::OverlayError;
use crate::vm::qemu::LaunchError;
use crate::vm::snapshot::save::SaveError;

/// The device every endpoint needs (the README's endpoint contract).
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// A setup step that failed. Each module's error comes in whole (`#[from]`), so the binary
/// prints the cause chain once, with every errno.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The async runtime could not be built.
    #[error("cannot build the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// A directory or file vial makes could not be made.
    #[error("cannot create {}", path.display())]
    Create {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The health socket.
    #[error(transparent)]
    Health(#[from] HealthError),
    /// `/dev/net/tun` is missing.
    #[error("{TUN_DEVICE} is missing: run the container with --device /dev/net/tun (and --cap-add NET_ADMIN)")]
    TunMissing,
    /// QEMU could not be found or started.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// KVM was required and is not usable.
    #[error(transparent)]
    Accel(#[from] KvmUnavailable),
    /// QEMU cannot run as the user the configuration names.
    #[error(transparent)]
    User(#[from] crate::vm::user::UserError),
    /// The management interface has no address.
    #[error(transparent)]
    Mgmt(#[from] MgmtError),
    /// A management port could not be bound.
    #[error(transparent)]
    Forward(#[from] crate::forward::BindError),
    /// The data links did not come, or could not be stitched.
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    /// A disk overlay could not be made.
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    /// `vial snapshot` could not save the guest.
    #[error(transparent)]
    Save(#[from] SaveError),
}

/// Parses the command line of a binary: `--help` and `--version` exit 0 after printing, a bad
/// command line prints clap's message and exits 64 (EX_USAGE), as both binaries document.
pub fn parse_command_line<P: clap::Parser>() -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            std::process::exit(if usage { Outcome::Usage.code() } else { 0 });
        }
    }
}

impl SetupError {
    /// The exit outcome of this failure.
    pub fn outcome(&self) -> Outcome {
        match self {
            SetupError::Runtime(_) | SetupError::Save(SaveError::Runtime(_)) => Outcome::Internal,
            SetupError::TunMissing => Outcome::TunMissing,
            SetupError::Launch(LaunchError::QemuMissing { .. })
            | SetupError::Overlay(OverlayError::QemuImgMissing)
            | SetupError::Save(SaveError::Launch(LaunchError::QemuMissing { .. }))
            | SetupError::Save(SaveError::Overlay(OverlayError::QemuImgMissing)) => Outcome::QemuMissing,
            SetupError::Accel(_)
            | SetupError::User(_)
            | SetupError::Save(SaveError::NoTarget { .. } | SaveError::Accel(_)) => Outcome::Config,
            SetupError::DataPlane(DataPlaneError::Wait(WaitError::Timeout { .. })) => Outcome::InterfacesTimeout,
            SetupError::Signals(_)
            | SetupError::Create { .. }
            | SetupError::Health(_)
            | SetupError::Launch(_)
            | SetupError::Mgmt(_)
            | SetupError::Forward(_)
            | SetupError::DataPlane(_)
            | SetupError::Overlay(_)
            | SetupError::Save(_) => Outcome::SetupFailed,
        }
    }
}

/// How a `vial` run ended. Each variant has exactly one exit code (see [`Outcome::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered itself off (on request or on its own) and QEMU exited: 0.
    GuestPoweredOff,
    /// A stop request (SIGTERM, SIGINT) arrived before the VM started: 0.
    StoppedBeforeStart,
    /// The guest ignored the ACPI power button for the whole stop timeout; QEMU was told to
    /// `quit` over QMP and did: 2.
    QuitAfterStopTimeout,
    /// QEMU did not exit after `quit` (or QMP was gone) and had to be sent SIGKILL: 3.
    KilledQemu,
    /// QEMU exited without being asked to (crash, killed from outside, failed to start): 4.
    QemuCrashed,
    /// A bad command line: 64 (EX_USAGE).
    Usage,
    /// The QEMU binary was not found: 69 (EX_UNAVAILABLE).
    QemuMissing,
    /// An internal error (a bug): 70 (EX_SOFTWARE).
    Internal,
    /// A system call during setup failed (sockets, overlays, interfaces): 71 (EX_OSERR).
    SetupFailed,
    /// `/dev/net/tun` is missing: 72 (EX_OSFILE).
    TunMissing,
    /// The expected data links did not all appear in time: 75 (EX_TEMPFAIL).
    InterfacesTimeout,
    /// The profile, an environment variable or a flag is invalid: 78 (EX_CONFIG).
    Config,
    /// A second SIGTERM/SIGINT (or a SIGQUIT) forced an immediate stop: 128 + signal number.
    ForcedBySignal(i32),
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn code(self) -> i32 {
        match self {
            Outcome::GuestPoweredOff | Outcome::StoppedBeforeStart => 0,
            Outcome::QuitAfterStopTimeout => 2,
            Outcome::KilledQemu => 3,
            Outcome::QemuCrashed => 4,
            Outcome::Usage => 64,
            Outcome::QemuMissing => 69,
            Outcome::Internal => 70,
            Outcome::SetupFailed => 71,
            Outcome::TunMissing => 72,
            Outcome::InterfacesTimeout => 75,
            Outcome::Config => 78,
            Outcome::ForcedBySignal(signal) => 128 + signal,
        }
    }

    /// A short phrase for logs and the persisted status.
    pub fn describe(self) -> String {
        match self {
            Outcome::GuestPoweredOff => "guest powered off".into(),
            Outcome::StoppedBeforeStart => "stopped before the VM started".into(),
            Outcome::QuitAfterStopTimeout => "guest ignored the power button; qemu quit after the stop timeout".into(),
            Outcome::KilledQemu => "qemu did not quit and was killed".into(),
            Outcome::QemuCrashed => "qemu exited unexpectedly".into(),
            Outcome::Usage => "bad command line".into(),
            Outcome::QemuMissing => "qemu binary not found".into(),
            Outcome::Internal => "internal error".into(),
            Outcome::SetupFailed => "setup failed".into(),
            Outcome::TunMissing => "/dev/net/tun missing".into(),
            Outcome::InterfacesTimeout => "data interfaces did not appear in time".into(),
            Outcome::Config => "invalid configuration".into(),
            Outcome::ForcedBySignal(signal) => format!("forced stop on signal {signal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_table() {
        let table = [
            (Outcome::GuestPoweredOff, 0),
            (Outcome::StoppedBeforeStart, 0),
            (Outcome::QuitAfterStopTimeout, 2),
            (Outcome::KilledQemu, 3),
            (Outcome::QemuCrashed, 4),
            (Outcome::Usage, 64),
            (Outcome::QemuMissing, 69),
            (Outcome::Internal, 70),
            (Outcome::SetupFailed, 71),
            (Outcome::TunMissing, 72),
            (Outcome::InterfacesTimeout, 75),
            (Outcome::Config, 78),
            (Outcome::ForcedBySignal(15), 143),
            (Outcome::ForcedBySignal(2), 130),
            (Outcome::ForcedBySignal(3), 131),
        ];
        for (outcome, code) in table {
            assert_eq!(outcome.code(), code, "{outcome:?}");
        }
    }

    #[test]
    fn setup_error_outcome_table() {
        use std::time::Duration;
        let io = || std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let missing = || LaunchError::QemuMissing { binary: "qemu-system-x86_64".into() };
        let timeout = WaitError::Timeout {
            expected: 2,
            waited: Duration::from_secs(1),
            missing: vec!["eth2".into()],
            present: vec!["eth1".into()],
            mgmt: "eth0".into(),
        };
        let table: Vec<(SetupError, Outcome)> = vec![
            (SetupError::Runtime(io()), Outcome::Internal),
            (SetupError::Signals(io()), Outcome::SetupFailed),
            (SetupError::Create { path: "/run/vial".into(), source: io() }, Outcome::SetupFailed),
            (SetupError::TunMissing, Outcome::TunMissing),
            (missing().into(), Outcome::QemuMissing),
            (LaunchError::Spawn { binary: "qemu".into(), source: io() }.into(), Outcome::SetupFailed),
            (OverlayError::QemuImgMissing.into(), Outcome::QemuMissing),
            (OverlayError::Create { base: "/d".into(), stderr: "no".into() }.into(), Outcome::SetupFailed),
            (KvmUnavailable { reason: "no /dev/kvm".into() }.into(), Outcome::Config),
            (MgmtError::NoAddress { iface: "eth0".into(), present: "none".into() }.into(), Outcome::SetupFailed),
            (DataPlaneError::Wait(timeout).into(), Outcome::InterfacesTimeout),
            (DataPlaneError::Wait(WaitError::Closed).into(), Outcome::SetupFailed),
            (SaveError::NoTarget { profile: "p.toml".into() }.into(), Outcome::Config),
            (SaveError::Launch(missing()).into(), Outcome::QemuMissing),
            (SaveError::Accel(KvmUnavailable { reason: "hangs".into() }).into(), Outcome::Config),
            (SaveError::Runtime(io()).into(), Outcome::Internal),
            (SaveError::QemuExited { console: String::new() }.into(), Outcome::SetupFailed),
        ];
        for (error, outcome) in table {
            assert_eq!(error.outcome(), outcome, "{error}");
        }
    }

    #[test]
    fn setup_errors_print_their_cause_once() {
        let error = SetupError::from(LaunchError::Spawn {
            binary: "/usr/bin/qemu".into(),
            source: std::io::Error::from_raw_os_error(nix::libc::EACCES),
        });
        let chain = crate::logging::error_chain(&error);
        assert_eq!(chain.matches("Permission denied").count(), 1, "{chain}");
        assert!(chain.starts_with("cannot start /usr/bin/qemu: "), "{chain}");
    }

    #[test]
    fn codes_are_distinct() {
        let all = [
            Outcome::GuestPoweredOff,
            Outcome::QuitAfterStopTimeout,
            Outcome::KilledQemu,
            Outcome::QemuCrashed,
            Outcome::Usage,
            Outcome::QemuMissing,
            Outcome::Internal,
            Outcome::SetupFailed,
            Outcome::TunMissing,
            Outcome::InterfacesTimeout,
            Outcome::Config,
        ];
        let mut codes: Vec<i32> = all.iter().map(|o| o.code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert!(codes.iter().all(|c| *c < 128), "setup codes must not look like signals");
    }
}
