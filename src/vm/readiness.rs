//! When the guest counts as ready: the profile's readiness probe, a TCP exchange through a
//! management forward (a reply from the guest, not only a connect) and optionally a text on the
//! serial console, or a console pattern alone. Only reads: never changes the VM.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Probe;

/// How often the console log is read for a readiness text that goes with a TCP probe: the
/// text usually appears with the port, so a slow poll would only add to the time to ready.
const CONSOLE_POLL: Duration = Duration::from_millis(50);

/// Returns once the guest passes `probe`: a TCP probe aimed at `addr` (and its console text,
/// when it has one, in `console_log`), or a console pattern. Retries every `interval`.
pub async fn wait_ready(probe: &Probe, interval: Duration, addr: Ipv4Addr, console_log: &Path) {
    match probe {
        Probe::Tcp { port, send, expect, console } => {
            let target = SocketAddrV4::new(addr, *port);
            let answers = async {
                while !probe_tcp(target, send, expect).await {
                    tokio::time::sleep(interval).await;
                }
            };
            let printed = async {
                if let Some(text) = console {
                    watch_console(console_log, text.as_bytes(), CONSOLE_POLL.min(interval)).await;
                }
            };
            tokio::join!(answers, printed);
        }
        Probe::Serial { pattern } => {
            watch_console(console_log, pattern.as_bytes(), interval).await;
        }
    }
}

/// One TCP readiness attempt through a forward: connect, send, and require a reply (QEMU's
/// user networking accepts on the container side before it knows whether the guest listens,
/// so only bytes from the guest prove it is up).
pub async fn probe_tcp(target: SocketAddrV4, send: &[u8], expect: &[u8]) -> bool {
    const ATTEMPT: Duration = Duration::from_secs(2);
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await.ok()?;
        if !send.is_empty() {
            stream.write_all(send).await.ok()?;
        }
        let want = expect.len().max(1);
        let mut reply = Vec::with_capacity(want);
        let mut buf = [0u8; 256];
        while reply.len() < want {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Some(reply.starts_with(expect))
    };
    matches!(tokio::time::timeout(ATTEMPT, attempt).await, Ok(Some(true)))
}

/// How often a ready guest's probe is repeated.
pub const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);
/// Failed probes in a row after which a ready guest counts as not answering (30 s): a
/// loaded TCG guest, or one restarting its network for a lesson, misses a few.
pub const LIVENESS_FAILURES: u32 = 6;

/// Follows a guest that was ready, by the TCP part of `probe` aimed at `addr`: sends `false`
/// on `changes` once it failed [`LIVENESS_FAILURES`] times in a row, and `true` when it
/// answers again. Runs until aborted; a console-pattern probe has nothing to repeat.
pub async fn watch_liveness(probe: Probe, addr: Ipv4Addr, changes: tokio::sync::mpsc::UnboundedSender<bool>) {
    let Probe::Tcp { port, send, expect, .. } = probe else { return };
    let target = SocketAddrV4::new(addr, port);
    let (mut failures, mut answering) = (0, true);
    loop {
        tokio::time::sleep(LIVENESS_INTERVAL).await;
        if probe_tcp(target, &send, &expect).await {
            failures = 0;
            if !answering {
                answering = true;
                let _ = changes.send(true);
            }
        } else {
            failures += 1;
            if answering && failures >= LIVENESS_FAILURES {
                answering = false;
                let _ = changes.send(false);
            }
        }
    }
}

/// Returns once a guest that was ready answers again: the TCP part of `probe` (its console
/// text was printed already and stays in the log); a console-pattern probe at once.
pub async fn wait_answering(probe: &Probe, interval: Duration, addr: Ipv4Addr) {
    if let Probe::Tcp { port, send, expect, .. } = probe {
        let target = SocketAddrV4::new(addr, *port);
        while !probe_tcp(target, send, expect).await {
            tokio::time::sleep(interval).await;
        }
    }
}

/// Follows the console log until `pattern` appears. Polls at the probe interval: the log is
/// a plain file vial appends to, and a probe is periodic by nature. Reads only what is new
/// (a small local read, fine on the supervisor's thread).
async fn watch_console(log: &Path, pattern: &[u8], interval: Duration) {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    let mut offset = 0u64;
    let mut inode = None;
    let mut window: Vec<u8> = Vec::new();
    loop {
        if let Ok(mut file) = std::fs::File::open(log) {
            // The log is rotated at a cap (`vm::console`): a new file starts from its start.
            let meta = file.metadata().ok();
            let now = meta.as_ref().map(|m| m.ino());
            if now != inode || meta.is_some_and(|m| m.len() < offset) {
                inode = now;
                offset = 0;
            }
            let mut fresh = Vec::new();
            if file.seek(SeekFrom::Start(offset)).is_ok() && file.read_to_end(&mut fresh).is_ok() && !fresh.is_empty() {
                offset += fresh.len() as u64;
                window.extend_from_slice(&fresh);
                if window.windows(pattern.len()).any(|w| w == pattern) {
                    return;
                }
                // Keep only what could still be the start of a match.
                let keep = pattern.len().saturating_sub(1);
                if window.len() > keep {
                    window.drain(..window.len() - keep);
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
