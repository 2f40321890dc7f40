//! Starting QEMU from its argv, after checking that the binary exists, so a missing QEMU is a
//! clear setup error rather than a failed exec.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The binary is not on PATH (or the path does not exist).
    #[error("qemu binary {binary:?} not found: install qemu-system-x86 in the image, or point VIAL_QEMU or machine.qemu at it")]
    QemuMissing {
        /// What was looked for.
        binary: String,
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

/// Starts QEMU with `argv` (argv[0] names the binary), keeping `inherit` open in it.
pub fn spawn_qemu(argv: &[OsString], inherit: &[RawFd]) -> Result<Child, LaunchError> {
    let name = argv[0].to_string_lossy().to_string();
    let binary = find_binary(&name).ok_or(LaunchError::QemuMissing { binary: name })?;
    let mut command = Command::new(&binary);
    command.args(&argv[1..]).stdin(Stdio::null());
    tracing::info!(binary = %binary.display(), "starting qemu");
    tracing::debug!(argv = ?argv, "qemu argv");
    let child =
        crate::sys::spawn_supervised(&mut command, inherit).map_err(|source| LaunchError::Spawn { binary, source })?;
    // `spawn` returns once the exec succeeded (std waits on a close-on-exec pipe).
    tracing::info!(pid = child.id(), "qemu started");
    Ok(child)
}
