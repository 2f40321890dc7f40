//! Knowing when an endpoint is usable, and seeing it at once. A VM endpoint says so itself:
//! its run directory is shared with the host, and `vialctl` follows the health socket's
//! `/watch` stream, so `ready` (which includes vial's data-link self-check) is seen the moment
//! vial sets it, with no polling interval. Every presentation is then probed on its
//! published port, as a learner reaches it: SSH through a whole handshake up to the server's
//! answer to an authentication attempt (OpenSSH's client, with the `none` method, which every
//! server refuses after listing its methods), HTTP up to a status line. A TCP connect alone (antidote-core's probe for http) proves nothing here:
//! Docker's port proxy, and vial's forwards to QEMU, accept before anything listens behind
//! them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// How often a presentation is tried again while it does not answer.
const RETRY: Duration = Duration::from_millis(100);
/// How long one attempt may take.
const ATTEMPT: Duration = Duration::from_secs(3);

/// What vial's status stream ended with, when it did not end in `ready`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VialError {
    /// vial reported `failed` or `stopped`.
    #[error("vial reports {state}: {reason}")]
    Ended {
        /// The state.
        state: String,
        /// Its reason.
        reason: String,
    },
    /// The stream closed without `ready` (vial exited).
    #[error("vial exited before the endpoint was ready")]
    Gone,
}

/// Follows the `/watch` stream of the health socket at `socket`, calling `phase` with each
/// new state, until vial reports `ready` (Ok, with that status) or ends. Waits for the
/// socket to appear. Unbounded: the caller puts a timeout around it.
pub async fn vial_ready(socket: &Path, mut phase: impl FnMut(&str)) -> Result<serde_json::Value, VialError> {
    let mut stream = loop {
        match tokio::net::UnixStream::connect(socket).await {
            Ok(stream) => break stream,
            // The container is starting: vial binds the socket within milliseconds of start.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    if stream.write_all(b"GET /watch HTTP/1.0\r\n\r\n").await.is_err() {
        return Err(VialError::Gone);
    }
    let mut lines = BufReader::new(stream).lines();
    // The head, up to the blank line.
    let mut code = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if code.is_none() {
            code = line.split_whitespace().nth(1).map(String::from);
        }
        if line.trim().is_empty() {
            break;
        }
    }
    if code.as_deref() != Some("200") {
        // A vial older than `/watch`: ask for the status until it settles.
        return poll_status(socket, phase).await;
    }
    let mut last = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if let Some(settled) = settle(status, &mut last, &mut phase) {
            return settled;
        }
    }
    Err(VialError::Gone)
}

/// Reports a new state to `phase`; `Some` once the status is final (`ready`, or an end).
fn settle(
    status: serde_json::Value,
    last: &mut String,
    phase: &mut impl FnMut(&str),
) -> Option<Result<serde_json::Value, VialError>> {
    let state = status["state"].as_str().unwrap_or("").to_string();
    if state != *last {
        phase(&state);
        last.clone_from(&state);
    }
    match state.as_str() {
        "ready" => Some(Ok(status)),
        "failed" | "stopped" => {
            let reason = status["reason"].as_str().unwrap_or("no reason given").to_string();
            Some(Err(VialError::Ended { state, reason }))
        }
        _ => None,
    }
}

/// [`vial_ready`] for a vial without `/watch`: `/status` every 100 ms.
async fn poll_status(socket: &Path, mut phase: impl FnMut(&str)) -> Result<serde_json::Value, VialError> {
    let mut last = String::new();
    loop {
        let path = socket.to_path_buf();
        let answer = tokio::task::spawn_blocking(move || crate::health::query(&path, "/status", ATTEMPT)).await;
        let Ok(Ok((_, body))) = answer else { return Err(VialError::Gone) };
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(settled) = settle(status, &mut last, &mut phase) {
            return settled;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Whether an SSH server answers at `address` up to its key exchange offer: it sends its
/// identification line (RFC 4253 §4.2), takes ours, and sends `SSH_MSG_KEXINIT` (§7.1).
/// QEMU's user networking accepts a connection before the guest listens, so a connect alone
/// proves nothing.
pub async fn ssh_answers(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let mut reader = BufReader::new(&mut stream);
        let mut line = String::new();
        // Servers may send other lines before their identification (RFC 4253 §4.2).
        loop {
            line.clear();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if line.starts_with("SSH-") {
                break;
            }
        }
        let buffered = reader.buffer().to_vec();
        drop(reader);
        stream.write_all(b"SSH-2.0-vialctl\r\n").await.ok()?;
        let mut head = buffered;
        while head.len() < 6 {
            let mut byte = [0u8; 64];
            let n = stream.read(&mut byte).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&byte[..n]);
        }
        // uint32 packet_length, byte padding_length, then the payload's message number.
        const SSH_MSG_KEXINIT: u8 = 20;
        Some(head[5] == SSH_MSG_KEXINIT)
    };
    matches!(tokio::time::timeout(ATTEMPT, attempt).await, Ok(Some(true)))
}

/// Whether something accepts a TCP connection at `address`.
pub async fn tcp_answers(address: SocketAddr) -> bool {
    matches!(tokio::time::timeout(ATTEMPT, tokio::net::TcpStream::connect(address)).await, Ok(Ok(_)))
}

/// Whether an HTTP server answers `GET /` at `address` with a status line (any status: a 404
/// is a server that serves).
pub async fn http_answers(address: SocketAddr) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: vialctl\r\n\r\n").await.ok()?;
        let mut head = [0u8; 5];
        stream.read_exact(&mut head).await.ok()?;
        Some(&head == b"HTTP/")
    };
    matches!(tokio::time::timeout(ATTEMPT, attempt).await, Ok(Some(true)))
}

/// Whether an SSH server at `address` gets through key exchange to authentication: OpenSSH's
/// client tries the `none` method, which the server refuses with its list of methods
/// ("Permission denied (publickey,password)"). Checked only once the server's key exchange
/// offer came ([`ssh_answers`]), so the client runs once per ready server, not per retry.
/// Without an `ssh` client on the host, the key exchange offer is all that is checked.
pub async fn ssh_authenticates(address: SocketAddr) -> bool {
    if !ssh_answers(address).await {
        return false;
    }
    // ConnectTimeout and the server's own login grace bound the client; it runs off the
    // runtime's thread.
    let attempt = tokio::task::spawn_blocking(move || {
        std::process::Command::new("ssh")
            .args(["-o", "BatchMode=yes", "-o", "PreferredAuthentications=none", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=3"])
            .args(["-o", "ServerAliveInterval=3", "-o", "ServerAliveCountMax=1"])
            .args(["-p", &address.port().to_string(), &format!("vialctl-probe@{}", address.ip()), "true"])
            .stdin(std::process::Stdio::null())
            .output()
    });
    match attempt.await {
        Ok(Ok(output)) => {
            output.status.success() || String::from_utf8_lossy(&output.stderr).contains("Permission denied")
        }
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => true,
        _ => false,
    }
}

/// Waits until the presentation of `kind` (`ssh`, `http`, else a TCP connect) answers at
/// `address`.
/// Unbounded: the caller puts a timeout around it.
pub async fn presentation(kind: &str, address: SocketAddr) {
    loop {
        let answers = match kind {
            "ssh" => ssh_authenticates(address).await,
            "http" => http_answers(address).await,
            _ => tcp_answers(address).await,
        };
        if answers {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A fake server that sends `greeting`, reads the client's line, then sends `packet`.
    async fn server(greeting: &'static [u8], packet: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(greeting).await;
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(packet).await;
            }
        });
        address
    }

    #[tokio::test(flavor = "current_thread")]
    async fn ssh_needs_an_identification_line_and_a_kexinit() {
        let kexinit: &[u8] = &[0, 0, 0, 12, 4, 20, 1, 2, 3];
        assert!(ssh_answers(server(b"SSH-2.0-OpenSSH_9.2\r\n", kexinit).await).await);
        assert!(ssh_answers(server(b"banner first\r\nSSH-2.0-x\r\n", kexinit).await).await);
        assert!(!ssh_answers(server(b"HTTP/1.0 200 OK\r\n", kexinit).await).await);
        assert!(!ssh_answers(server(b"SSH-2.0-x\r\n", &[0, 0, 0, 12, 4, 1]).await).await);
        // Nothing listens.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        assert!(!ssh_answers(closed).await);
        assert!(!tcp_answers(closed).await);
        assert!(!http_answers(closed).await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn http_needs_a_status_line_not_only_an_accept() {
        assert!(http_answers(server(b"HTTP/1.0 404 Not Found\r\n\r\n", b"").await).await);
        // A proxy that accepts and closes, as Docker's does with nothing behind it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        assert!(tcp_answers(address).await);
        assert!(!http_answers(address).await);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_vial_watch_ends_at_ready_or_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("vialctl-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("health.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let lines: &'static [&'static str] = &[
            "{\"state\":\"starting\"}",
            "{\"state\":\"booting\"}",
            "{\"state\":\"failed\",\"reason\":\"qemu exited unexpectedly\"}",
        ];
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = stream.read(&mut buf).await;
            stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n").await.unwrap();
            for line in lines {
                stream.write_all(format!("{line}\n").as_bytes()).await.unwrap();
            }
        });
        let mut seen = Vec::new();
        let err = vial_ready(&socket, |state| seen.push(state.to_string())).await.unwrap_err();
        assert_eq!(seen, ["starting", "booting", "failed"]);
        assert_eq!(err, VialError::Ended { state: "failed".into(), reason: "qemu exited unexpectedly".into() });
        std::fs::remove_dir_all(dir).unwrap();
    }
}
