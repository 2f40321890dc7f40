//! Starting the QEMU process: finding the binary (so a missing QEMU is a clear setup error
//! rather than a failed exec), putting the runtime inputs of its argv together, binding vial's
//! control monitor and spawning QEMU with the descriptors it must inherit. Never talks QMP.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::argv::{qemu_argv, DataNic, Launch, Listeners};
use super::user::RunAs;
use super::Accel;
use crate::config::Config;
use crate::rundir;

/// Why QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The binary is not on PATH (or the path does not exist).
    #[error("qemu binary {binary:?} not found: install qemu-system-x86 in the image, or point VIAL_QEMU or machine.qemu at it")]
    QemuMissing {
        /// What was looked for.
        binary: String,
    },
    /// vial's control monitor could not be bound or connected.
    #[error("cannot set up the control monitor {}", path.display())]
    Control {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The public monitor's or the console's socket could not be bound.
    #[error("cannot bind {}", path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A disk overlay could not be given to the user QEMU runs as.
    #[error("cannot give the overlay {} to {user}", path.display())]
    Chown {
        /// The overlay.
        path: PathBuf,
        /// The user.
        user: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The console log's pipe or its writer could not be set up.
    #[error("cannot set up the console log {}", path.display())]
    ConsoleLog {
        /// The log.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `fork`/`exec` failed.
    #[error("cannot start {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How long QEMU gets to greet on vial's control monitor after it starts.
pub const QMP_GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The QEMU binary `binary` names, or why there is none: checked before anything is set up, so
/// that a missing QEMU is said first.
pub fn require_binary(binary: &str) -> Result<PathBuf, LaunchError> {
    find_binary(binary).ok_or_else(|| LaunchError::QemuMissing { binary: binary.to_string() })
}

/// Finds `binary` the way `execvp` would.
pub fn find_binary(binary: &str) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        use std::os::unix::fs::PermissionsExt;
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if binary.contains('/') {
        let path = PathBuf::from(binary);
        return is_executable(&path).then_some(path);
    }
    let search = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&search).map(|dir| dir.join(binary)).find(|path| is_executable(path))
}

/// How long the sandbox probe may take before it counts as failed.
const SANDBOX_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `binary` runs under [`SANDBOX`](super::argv::SANDBOX): probed once per process
/// and remembered, and the decision logged. The probe is the real thing, a QEMU with no
/// machine that installs the filter and quits over QMP (about 50 ms): a build without
/// seccomp refuses the option, and a kernel or container that refuses filters fails it too,
/// which `-sandbox help` or `-version` would not show.
pub fn sandbox_supported(binary: &str) -> bool {
    static DECIDED: OnceLock<bool> = OnceLock::new();
    *DECIDED.get_or_init(|| match probe_sandbox(binary) {
        Ok(()) => {
            tracing::info!("qemu runs under its seccomp sandbox (-sandbox)");
            true
        }
        Err(reason) => {
            tracing::warn!(%reason, "qemu runs without its seccomp sandbox");
            false
        }
    })
}

/// Starts the sandbox probe on a thread of its own, so that its ~50 ms overlap the rest of
/// setup (links, plumbing, overlays) instead of delaying QEMU's start; [`sandbox_supported`]
/// then waits for it, or finds the answer.
pub fn probe_sandbox_early(binary: &str) {
    let binary = binary.to_string();
    std::thread::spawn(move || sandbox_supported(&binary));
}

fn probe_sandbox(binary: &str) -> Result<(), String> {
    let binary = find_binary(binary).ok_or_else(|| format!("{binary} not found"))?;
    let mut command = Command::new(&binary);
    command
        .args(["-sandbox", super::argv::SANDBOX, "-machine", "none", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = crate::reaper::spawn_own(&mut command, Command::spawn)
        .map_err(|err| format!("cannot run {}: {err}", binary.display()))?;
    let pid = child.id();
    let result = finish_probe(&mut child);
    crate::reaper::disown(pid);
    result
}

/// Waits for the sandbox probe's QEMU (bounded) and reads its answer.
fn finish_probe(child: &mut std::process::Child) -> Result<(), String> {
    use std::io::Write;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < SANDBOX_PROBE_TIMEOUT => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("the probe did not finish within {SANDBOX_PROBE_TIMEOUT:?}"));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        use std::io::Read;
        let _ = err.read_to_string(&mut stderr);
    }
    Err(format!("-sandbox {}: {status}: {}", super::argv::SANDBOX, stderr.trim()))
}

/// Starts QEMU with `argv` (argv[0] names the binary), keeping `inherit` open in it.
pub fn spawn_qemu(argv: &[OsString], inherit: &[RawFd], user: Option<&RunAs>) -> Result<Child, LaunchError> {
    let name = argv[0].to_string_lossy().to_string();
    let binary = find_binary(&name).ok_or(LaunchError::QemuMissing { binary: name })?;
    let mut command = Command::new(&binary);
    command.args(&argv[1..]).stdin(Stdio::null());
    let credentials = user.map(|user| &user.credentials);
    tracing::info!(binary = %binary.display(), user = user.map_or("root", |u| u.name.as_str()), "starting qemu");
    tracing::debug!(argv = ?argv, "qemu argv");
    let child =
        crate::reaper::spawn_own(&mut command, |command| crate::sys::spawn_supervised(command, inherit, credentials))
            .map_err(|source| LaunchError::Spawn { binary, source })?;
    // `spawn` returns once the exec succeeded (std waits on a close-on-exec pipe).
    tracing::info!(pid = child.id(), "qemu started");
    Ok(child)
}

/// The directory shared as the lesson, when the profile shares one: the lesson directory, or
/// an empty one in the run directory when there is none, so that the guest always gets its
/// share (a guest resumed from a snapshot takes its arrival as the signal to set up).
pub fn lesson_dir(config: &Config) -> Option<PathBuf> {
    let share = config.profile.share.as_ref()?;
    Some(if share.path.is_dir() { share.path.clone() } else { config.run_dir.join(rundir::EMPTY_LESSON) })
}

/// What one QEMU start differs in, beyond the configuration.
#[derive(Debug, Clone)]
pub struct Start {
    /// The accelerator.
    pub accel: Accel,
    /// The disk overlays, in the profile's order.
    pub disks: Vec<PathBuf>,
    /// The lesson share ([`lesson_dir`]), or none (`vial snapshot`).
    pub share: Option<PathBuf>,
    /// Data NICs on the command line.
    pub data_nics: Vec<DataNic>,
    /// Start paused, waiting for a RAM snapshot.
    pub restore: bool,
    /// Who QEMU runs as (`vm::user`); `None` is root.
    pub user: Option<RunAs>,
}

impl Start {
    /// The argv inputs of this start, with `control_fd` as vial's monitor: the one place they
    /// are put together.
    pub fn launch(&self, config: &Config, control_fd: RawFd) -> Launch {
        Launch {
            accel: self.accel,
            run_dir: config.run_dir.clone(),
            disks: self.disks.clone(),
            share: self.share.clone(),
            control_fd,
            listener_fds: None,
            name: config.name.clone(),
            data_nics: self.data_nics.clone(),
            extra_args: config.qemu_args.clone(),
            restore: self.restore,
            console_log_fd: None,
            sandbox: sandbox_supported(&config.profile.qemu),
        }
    }
}

/// A QEMU that [`start_qemu`] started.
pub struct Started {
    /// Its pid (also its process group).
    pub pid: u32,
    /// vial's end of its control monitor, not negotiated yet.
    pub control: tokio::net::UnixStream,
    /// Files in the run directory to remove when the run ends.
    pub created: Vec<PathBuf>,
}

/// Starts QEMU: binds vial's own QMP monitor and hands the listener to QEMU (so vial connects
/// at once, with no polling for a socket file), then spawns QEMU with `inherit` open in it.
pub fn start_qemu(config: &Config, start: &Start, inherit: &[RawFd]) -> Result<Started, LaunchError> {
    let run_path = |name: &str| config.run_dir.join(name);
    let mut created = Vec::new();
    let control_path = run_path(rundir::CONTROL);
    let control_error = |source| LaunchError::Control { path: control_path.clone(), source };
    let _ = std::fs::remove_file(&control_path);
    let control_listener = std::os::unix::net::UnixListener::bind(&control_path).map_err(control_error)?;
    created.push(control_path.clone());
    // The public monitor and the console: vial binds them and QEMU serves them, so QEMU needs
    // no access to the run directory, and they are root's and 0600 whoever QEMU runs as
    // (whoever connects owns the guest: the QMP monitor can dump its memory).
    let mut listeners = Vec::new();
    for name in [rundir::QMP, rundir::CONSOLE] {
        let path = run_path(name);
        let error = |source| LaunchError::Socket { path: path.clone(), source };
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(error)?;
        created.push(path.clone());
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(error)?;
        listeners.push(OwnedFd::from(listener));
    }
    let listener_fds = Listeners { qmp: listeners[0].as_raw_fd(), console: listeners[1].as_raw_fd() };
    // QEMU runs as the user: it writes its overlays.
    if let Some(user) = &start.user {
        for disk in &start.disks {
            user.give(disk).map_err(|source| LaunchError::Chown {
                path: disk.clone(),
                user: user.name.clone(),
                source,
            })?;
        }
    }
    let console_log = run_path(rundir::CONSOLE_LOG);
    let log_error = |source| LaunchError::ConsoleLog { path: console_log.clone(), source };
    // QEMU opens the pipe by its /proc path; without /proc mounted, QEMU writes the log
    // itself, uncapped, rather than failing to start.
    let log_write = if Path::new("/proc/self/fd").is_dir() {
        let (log_read, log_write) = super::console::pipe().map_err(log_error)?;
        // Opening the pipe by its /proc path checks the pipe's owner: make it QEMU's user.
        if let Some(user) = &start.user {
            user.give_fd(&log_write).map_err(log_error)?;
        }
        super::console::spawn_writer(log_read, console_log.clone(), super::console::LOG_CAP).map_err(log_error)?;
        Some(log_write)
    } else {
        tracing::warn!("no /proc: qemu writes the console log itself, without a cap");
        if let Some(user) = &start.user {
            std::fs::File::create(&console_log).map_err(log_error)?;
            user.give(&console_log).map_err(log_error)?;
        }
        None
    };
    // The connection waits in the listener's backlog until QEMU accepts it.
    let control = std::os::unix::net::UnixStream::connect(&control_path)
        .and_then(|stream| {
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        })
        .map_err(control_error)?;

    let console_log_fd = log_write.as_ref().map(|fd| fd.as_raw_fd());
    let launch = Launch {
        console_log_fd,
        listener_fds: Some(listener_fds),
        ..start.launch(config, control_listener.as_raw_fd())
    };
    let argv = qemu_argv(&config.profile, &launch);
    let mut inherit = inherit.to_vec();
    inherit.extend([control_listener.as_raw_fd(), listener_fds.qmp, listener_fds.console]);
    inherit.extend(console_log_fd);
    let child = spawn_qemu(&argv, &inherit, start.user.as_ref())?;
    // QEMU holds the listeners and the log's write end now; ours would only keep the sockets
    // alive after QEMU dies, and keep the log writer from seeing QEMU's end.
    drop(OwnedFd::from(control_listener));
    drop(listeners);
    drop(log_write);
    Ok(Started { pid: child.id(), control, created })
}

/// Kills QEMU's process group and reaps it: for a QEMU that vial started and gives up on
/// before its supervision loop (whose reaper would otherwise collect it) runs.
pub fn kill_and_reap(pid: u32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(Pid::from_raw(pid as i32), None);
    crate::reaper::disown(pid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machines_qemu_runs_sandboxed() {
        // Debian 12's QEMU 7.2 is built with seccomp; the probe must say so here.
        assert_eq!(probe_sandbox("qemu-system-x86_64"), Ok(()));
        assert!(probe_sandbox("/nonexistent/qemu").is_err());
    }
}
