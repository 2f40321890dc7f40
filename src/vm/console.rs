//! The serial console's log, capped. The guest decides what its console prints, and QEMU's
//! `-chardev ...,logfile=` appends for ever (QEMU 7.2 has no size limit, and truncating the
//! file under it leaves QEMU writing at its old offset, a sparse file; `logappend=on` would
//! fix that but not the copy-then-truncate race of a rotation). So QEMU writes its log into a
//! pipe that vial holds (`logfile=/proc/self/fd/N`, N the inherited write end), and vial
//! writes `console.log`: once it holds [`LOG_CAP`] bytes, it becomes `console.log.1`
//! (replacing the one before) and a new `console.log` starts. At most twice the cap is on
//! disk (the run directory is often a tmpfs, i.e. memory), and nothing is lost to a race.
//!
//! QEMU's log writes block when the pipe is full, so the writer never stops reading while
//! QEMU lives: a failed write drops the chunk (once warned) and goes on. The pipe is widened
//! to 1 MiB, enough for seconds of a flooding guest should vial's loop be busy. The writer
//! ends when the pipe reports end of file, i.e. when QEMU is gone. This module never talks to
//! QEMU and never reads the console socket (that is for people: it takes one client).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use tokio::io::AsyncReadExt;

/// The most bytes `console.log` holds before it becomes `console.log.1`.
pub const LOG_CAP: u64 = 2 * 1024 * 1024;
/// The pipe's capacity asked for (F_SETPIPE_SZ; an unprivileged process may ask up to
/// `/proc/sys/fs/pipe-max-size`, 1 MiB by default).
const PIPE_BYTES: i32 = 1 << 20;

/// A pipe for QEMU's console log: `(read, write)`, both close-on-exec (the write end is
/// inherited by QEMU alone, through `sys::spawn_supervised`).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    if let Err(err) = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES)) {
        tracing::debug!(%err, "cannot widen the console log's pipe");
    }
    Ok((read, write))
}

/// Starts writing what arrives on `read` into `log` (truncated now, as QEMU's own logfile
/// would be), rotated at `cap`; runs on the current tokio runtime until end of file.
pub fn spawn_writer(read: OwnedFd, log: PathBuf, cap: u64) -> io::Result<()> {
    let mut receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
    let mut log = RotatingLog::create(log, cap)?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match receiver.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => log.write(&buf[..n]),
                Err(err) => {
                    tracing::warn!(%err, "console log pipe failed; the log ends here");
                    break;
                }
            }
        }
    });
    Ok(())
}

/// The log file and its one rotated predecessor.
struct RotatingLog {
    path: PathBuf,
    file: File,
    written: u64,
    cap: u64,
    warned: bool,
}

impl RotatingLog {
    fn create(path: PathBuf, cap: u64) -> io::Result<RotatingLog> {
        let _ = std::fs::remove_file(rotated(&path));
        let file = open_new(&path)?;
        Ok(RotatingLog { path, file, written: 0, cap, warned: false })
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        let result = (|| {
            while !rest.is_empty() {
                if self.written >= self.cap {
                    std::fs::rename(&self.path, rotated(&self.path))?;
                    self.file = open_new(&self.path)?;
                    self.written = 0;
                }
                let room = usize::try_from(self.cap - self.written).unwrap_or(usize::MAX).min(rest.len());
                self.file.write_all(&rest[..room])?;
                self.written += room as u64;
                rest = &rest[room..];
            }
            Ok::<(), io::Error>(())
        })();
        if let Err(err) = result {
            if !self.warned {
                tracing::warn!(%err, path = %self.path.display(), "cannot write the console log; dropping what the console prints");
                self.warned = true;
            }
        }
    }
}

/// `console.log` → `console.log.1`.
fn rotated(path: &std::path::Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends (so that a writer of an earlier QEMU still draining never leaves a hole).
fn open_new(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).write(true).truncate(true).open(path)?;
    OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn the_log_rotates_at_its_cap_and_keeps_every_byte_of_the_last_two_files() {
        let dir = testkit::TempDir::new(&std::env::temp_dir(), "console").unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(rotated(&log), b"a previous run").unwrap();
        let (read, write) = pipe().unwrap();
        spawn_writer(read, log.clone(), 1000).unwrap();
        assert!(!rotated(&log).exists(), "a new run starts without the old rotated log");
        // What a flooding guest prints: 25 lines of 100 bytes, in chunks.
        let mut writer = File::from(write);
        let text: Vec<u8> = (0..25).flat_map(|i| format!("{i:099}\n").into_bytes()).collect();
        for chunk in text.chunks(300) {
            writer.write_all(chunk).unwrap();
        }
        drop(writer);
        // Each line is numbered, so the last one in the log means the writer is done.
        let last_line = &text[text.len() - 100..];
        testkit::wait_until_async(std::time::Duration::from_secs(10), "the writer to drain the pipe", || {
            std::fs::read(&log).is_ok_and(|t| t.ends_with(last_line))
        })
        .await;
        let current = std::fs::read(&log).unwrap();
        let old = std::fs::read(rotated(&log)).unwrap();
        assert!(current.len() as u64 <= 1000 && old.len() as u64 <= 1000, "{} {}", current.len(), old.len());
        assert!(text.ends_with(&current), "the log holds the newest bytes");
        let both = [old, current].concat();
        assert!(text.ends_with(&both), "the rotated log holds the bytes just before");
    }
}
