//! Reaping: as PID 1, `vial` inherits every orphan in the container and must collect each
//! one, or zombies pile up (tini's and dumb-init's first duty). When not PID 1 (tests, a
//! developer's shell), it becomes a child subreaper so the same code sees the same orphans.
//! This module never sends signals.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a reaped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exited with code {code}"),
            Ended::Signaled(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(sig) => write!(f, "killed by {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

/// Makes this process the reaper of its orphaned descendants, unless it already is (PID 1).
pub fn become_subreaper() -> nix::Result<()> {
    if std::process::id() == 1 {
        return Ok(());
    }
    nix::sys::prctl::set_child_subreaper(true)
}

/// Collects every child that has ended, without blocking. Returns how `tracked` ended if it
/// was among them, and how many processes were reaped in all.
pub fn reap_all(tracked: Option<u32>) -> (Option<Ended>, usize) {
    let mut found = None;
    let mut count = 0;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                count += 1;
                tracing::debug!(pid = pid.as_raw(), code, "reaped");
                if Some(pid.as_raw() as u32) == tracked {
                    found = Some(Ended::Exited(code));
                }
            }
            Ok(WaitStatus::Signaled(pid, signal, _core)) => {
                count += 1;
                tracing::debug!(pid = pid.as_raw(), signal = signal.as_str(), "reaped");
                if Some(pid.as_raw() as u32) == tracked {
                    found = Some(Ended::Signaled(signal as i32));
                }
            }
            // No child has ended (yet), or there are no children at all.
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!(%err, "waitpid failed");
                break;
            }
        }
    }
    (found, count)
}
