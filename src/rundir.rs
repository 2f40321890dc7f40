//! The run directory (`/run/vial` by default, `VIAL_RUN_DIR`): the one place that names the
//! files in it. Everything a person or tool may use from outside the container is here: the
//! health socket, QEMU's public QMP monitor, the serial console and its log, and the status a
//! finished run leaves. This module only names paths; it never creates or removes them.

use std::path::{Path, PathBuf};

/// The default run directory.
pub const DEFAULT: &str = "/run/vial";

/// The health socket (HTTP/1.0): `/live`, `/ready`, `/status`.
pub const HEALTH: &str = "health.sock";
/// The status an exiting supervisor leaves next to the health socket.
pub const LAST_STATUS: &str = "last-status.json";
/// QEMU's public QMP socket, for people and tools.
pub const QMP: &str = "qmp.sock";
/// vial's own QMP socket (its listener is handed to QEMU as a descriptor).
pub const CONTROL: &str = "vial-qmp.sock";
/// The serial console (a socket to attach to).
pub const CONSOLE: &str = "console.sock";
/// Everything the serial console printed.
pub const CONSOLE_LOG: &str = "console.log";
/// The empty directory shared as the lesson when there is no lesson directory.
pub const EMPTY_LESSON: &str = "no-lesson";

/// A run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// The run directory at `path`.
    pub fn new(path: impl Into<PathBuf>) -> RunDir {
        RunDir(path.into())
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The file `name` (one of this module's constants) in it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The health socket.
    pub fn health(&self) -> PathBuf {
        self.join(HEALTH)
    }

    /// The console log.
    pub fn console_log(&self) -> PathBuf {
        self.join(CONSOLE_LOG)
    }
}

/// The last `lines` lines of the console log at `log` (empty when there is none): what a
/// failure shows so that the guest's own last words are seen.
pub fn console_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read(log).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
