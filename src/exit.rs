//! Exit codes of `vial`. Setup failures use sysexits(3) numbers; the ways a running VM can end
//! get small codes of their own; a forced exit on a signal is 128+N, as shells report it.
//! This module only maps outcomes to numbers; it never exits the process itself.

/// How a `vial` run ended. Each variant has exactly one exit code (see [`Outcome::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered itself off (on request or on its own) and QEMU exited: 0.
    GuestPoweredOff,
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
            Outcome::GuestPoweredOff => 0,
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
