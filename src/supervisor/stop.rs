//! How a stop proceeds: the ACPI power button, pressed again while the guest has not powered
//! off, then QMP `quit` after the stop timeout, then SIGKILL; a second signal forces it at
//! once. [`Stop::next`] is the whole ladder as a pure function (table-tested below); the
//! supervision loop feeds it signals and deadlines and carries out the [`StopAction`] it
//! returns. This file also holds the kill.

use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long `quit` gets before QEMU is killed.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How often the power button is pressed again while the guest has not powered off.
pub const REPRESS_INTERVAL: Duration = Duration::from_millis(500);

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

/// What moves a stop along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopInput {
    /// SIGTERM or SIGINT: a stop request (a second one forces it).
    Request(Signal),
    /// SIGQUIT: force at once.
    Force(Signal),
    /// Time passed: the loop woke at (or after) [`Stop::deadline`].
    Tick,
}

/// What the loop must do for a step of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopAction {
    /// Nothing.
    None,
    /// Press the ACPI power button (`system_powerdown`).
    PressPowerButton,
    /// Tell QEMU to exit (`quit`).
    Quit,
    /// SIGKILL QEMU: `quit` did not end it, or there is no QMP to send it on.
    Kill,
    /// SIGKILL QEMU at once: a signal forced the stop.
    ForceKill(Signal),
}

impl Stop {
    /// The next state and what to do, for `input` at `now`, with the profile's `stop_timeout`;
    /// `qmp` says whether QMP is connected (without it there is no `quit` to send). Pure.
    pub fn next(self, input: StopInput, now: Instant, stop_timeout: Duration, qmp: bool) -> (Stop, StopAction) {
        match (self, input) {
            (Stop::Forced(_), _) => (self, StopAction::None),
            (_, StopInput::Force(signal)) => (Stop::Forced(signal as i32), StopAction::ForceKill(signal)),
            (Stop::NotRequested, StopInput::Request(_)) => (
                Stop::PoweringDown { deadline: now + stop_timeout, repress: now + REPRESS_INTERVAL },
                StopAction::PressPowerButton,
            ),
            (_, StopInput::Request(signal)) => (Stop::Forced(signal as i32), StopAction::ForceKill(signal)),
            (Stop::PoweringDown { deadline, .. }, StopInput::Tick) if now >= deadline => match qmp {
                true => (Stop::Quitting { deadline: now + QUIT_GRACE }, StopAction::Quit),
                false => (Stop::Killed, StopAction::Kill),
            },
            (Stop::PoweringDown { deadline, repress }, StopInput::Tick) if now >= repress => {
                (Stop::PoweringDown { deadline, repress: now + REPRESS_INTERVAL }, StopAction::PressPowerButton)
            }
            (Stop::Quitting { deadline }, StopInput::Tick) if now >= deadline => (Stop::Killed, StopAction::Kill),
            (_, StopInput::Tick) => (self, StopAction::None),
        }
    }
}

/// SIGKILL to QEMU's process group (QEMU and anything it started).
pub fn kill(qemu_pid: u32) {
    let _ = killpg(Pid::from_raw(qemu_pid as i32), Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ladder, step by step: every state, every input, the state after and the action.
    #[test]
    fn the_stop_ladder_table() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(8);
        let secs = |n: u64| t0 + Duration::from_secs(n);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let powering = Stop::PoweringDown { deadline: secs(8), repress: ms(500) };
        let quitting = Stop::Quitting { deadline: secs(13) };
        let (term, int, quit) = (Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT);
        use StopAction as A;
        use StopInput as I;
        #[rustfmt::skip]
        let table: Vec<(Stop, StopInput, Instant, bool, Stop, StopAction)> = vec![
            // A first stop request presses the power button; the deadline is the stop timeout.
            (Stop::NotRequested, I::Request(term), t0, true, powering, A::PressPowerButton),
            (Stop::NotRequested, I::Request(int), t0, false, powering, A::PressPowerButton),
            // SIGQUIT, or a second request in any phase, kills at once.
            (Stop::NotRequested, I::Force(quit), t0, true, Stop::Forced(3), A::ForceKill(quit)),
            (powering, I::Request(term), secs(1), true, Stop::Forced(15), A::ForceKill(term)),
            (quitting, I::Request(int), secs(9), true, Stop::Forced(2), A::ForceKill(int)),
            (Stop::Killed, I::Request(term), secs(14), true, Stop::Forced(15), A::ForceKill(term)),
            (powering, I::Force(quit), secs(1), true, Stop::Forced(3), A::ForceKill(quit)),
            // Forced is final.
            (Stop::Forced(15), I::Request(term), secs(1), true, Stop::Forced(15), A::None),
            (Stop::Forced(15), I::Tick, secs(99), true, Stop::Forced(15), A::None),
            // While powering down: the button again every REPRESS_INTERVAL...
            (powering, I::Tick, ms(400), true, powering, A::None),
            (powering, I::Tick, secs(1), true, Stop::PoweringDown { deadline: secs(8), repress: ms(1500) }, A::PressPowerButton),
            // ...then `quit` at the deadline, or SIGKILL without QMP (a wedged or silent QEMU).
            (powering, I::Tick, secs(8), true, Stop::Quitting { deadline: secs(13) }, A::Quit),
            (powering, I::Tick, secs(8), false, Stop::Killed, A::Kill),
            // `quit` gets QUIT_GRACE, then SIGKILL.
            (quitting, I::Tick, secs(12), true, quitting, A::None),
            (quitting, I::Tick, secs(13), true, Stop::Killed, A::Kill),
            // Nothing happens to a run nobody asked to stop, or one already killed.
            (Stop::NotRequested, I::Tick, secs(5), true, Stop::NotRequested, A::None),
            (Stop::Killed, I::Tick, secs(20), true, Stop::Killed, A::None),
        ];
        for (i, (from, input, now, qmp, to, action)) in table.into_iter().enumerate() {
            assert_eq!(from.next(input, now, timeout, qmp), (to, action), "row {i}: {from:?} + {input:?}");
        }
        assert_eq!(QUIT_GRACE, Duration::from_secs(5));
        assert_eq!(REPRESS_INTERVAL, Duration::from_millis(500));
    }
}
