//! Reaping: as PID 1, `vial` inherits every orphan in the container and must collect each
//! one, or zombies pile up (tini's and dumb-init's first duty). When not PID 1 (tests, a
//! developer's shell), it becomes a child subreaper so the same code sees the same orphans.
//! This module never sends signals.

use std::collections::BTreeSet;
use std::process::{Child, Command};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The children vial starts itself (QEMU, qemu-img, the sandbox probe), whose owners wait for
/// them: while setup runs, the reaper collects only orphans and leaves these alone, or an
/// owner's `wait` would find its child gone.
static OWN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn own() -> std::sync::MutexGuard<'static, BTreeSet<u32>> {
    OWN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Spawns `command` with `spawn` (`Command::spawn`, or a variant of it) as one of vial's own
/// children: [`reap_orphans`] leaves it to its owner, who calls [`disown`] once it waited.
pub fn spawn_own(
    command: &mut Command,
    spawn: impl FnOnce(&mut Command) -> std::io::Result<Child>,
) -> std::io::Result<Child> {
    // Held across the spawn, so the reaper cannot see the child end before it is listed.
    let mut own = own();
    let child = spawn(command)?;
    own.insert(child.id());
    Ok(child)
}

/// `pid`, one of vial's own children, has been waited for.
pub fn disown(pid: u32) {
    own().remove(&pid);
}

/// Collects every ended child that vial did not start itself (orphans the container's
/// processes left to PID 1), without blocking: what runs while setup does. Stops at the first
/// ended child of its own (its owner collects it; the next SIGCHLD comes back here).
pub fn reap_orphans() -> usize {
    let own = own();
    let mut count = 0;
    loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let pid = match waitid(Id::All, flags) {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => break,
            },
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        };
        if own.contains(&(pid.as_raw() as u32)) {
            break;
        }
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) => {
                count += 1;
                tracing::debug!(pid = pid.as_raw(), ?status, "reaped an orphan");
            }
        }
    }
    count
}

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
                disown(pid.as_raw() as u32);
                tracing::debug!(pid = pid.as_raw(), code, "reaped");
                if Some(pid.as_raw() as u32) == tracked {
                    found = Some(Ended::Exited(code));
                }
            }
            Ok(WaitStatus::Signaled(pid, signal, _core)) => {
                count += 1;
                disown(pid.as_raw() as u32);
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
