//! How a stop proceeds: the ACPI power button, pressed again while the guest has not powered
//! off, then QMP `quit` after the stop timeout, then SIGKILL; a second signal forces it at
//! once. This file holds the states and the kill; the supervision loop moves between them.

use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long `quit` gets before QEMU is killed.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How often the power button is pressed again while the guest has not powered off.
pub const REPRESS_INTERVAL: Duration = Duration::from_secs(2);

/// Where a stop request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
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

impl Stop {
    /// When the loop must act next without any event: the deadline or the next press.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Stop::PoweringDown { deadline, repress } => Some(deadline.min(repress)),
            Stop::Quitting { deadline } => Some(deadline),
            _ => None,
        }
    }
}

/// A second signal: QEMU is killed at once.
pub fn force(signal: Signal, qemu_pid: u32) -> Stop {
    tracing::warn!(signal = signal.as_str(), "forced stop: killing qemu");
    let _ = killpg(Pid::from_raw(qemu_pid as i32), Signal::SIGKILL);
    Stop::Forced(signal as i32)
}

/// `quit` did not end QEMU, or there is no QMP to send it on.
pub fn kill(qemu_pid: u32) -> Stop {
    let _ = killpg(Pid::from_raw(qemu_pid as i32), Signal::SIGKILL);
    Stop::Killed
}
