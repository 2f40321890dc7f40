//! The QMP stream itself: the greeting and capabilities negotiation, a reader task that sorts
//! each line into a reply (matched to its command by `id`) or an event, and a writer task that
//! sends whole request lines, with descriptors attached when a command passes any. Knows no
//! command beyond `qmp_capabilities`.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, Interest, WriteHalf};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::event::{decode_event, Events, VmEvent};
use super::{Qmp, QmpError};

/// What the handles share. The writer task holds only the `PendingTable`, not this, so that
/// dropping the last handle closes `requests` and ends the writer task.
pub(super) struct Link {
    /// Whole requests for the writer task. A separate writer means a caller that drops an
    /// `execute` future mid-way can never leave half a line on the socket, and a line that
    /// carries descriptors is never interleaved with another.
    pub(super) requests: mpsc::UnboundedSender<Request>,
    /// Commands waiting for their reply, and waiters for `DEVICE_DELETED`.
    pub(super) pending: Arc<PendingTable>,
    /// The next request `id`; QMP echoes it in the reply (qmp-spec, "Commands Responses").
    pub(super) next_id: AtomicU64,
    /// How long a command waits for its reply ([`super::COMMAND_TIMEOUT`]).
    pub(super) command_timeout: std::time::Duration,
    /// Whether the writer can attach descriptors: the stream is a Unix socket (`connect_unix`).
    pub(super) passes_fds: bool,
    /// Held from sending a `getfd` until its reply. QEMU's socket chardev keeps only the
    /// descriptors of the latest read that brought any, closing older ones it still holds
    /// (`tcp_chr_recv`, chardev/char-socket.c), and `getfd` takes them when it runs, which may
    /// be after QEMU read further lines; so a second descriptor must not arrive before the first
    /// `getfd` ran. Commands without descriptors need no such care and do not take the lock.
    pub(super) fd_command: tokio::sync::Mutex<()>,
}

/// One request line for the writer task, and the descriptors to send with it (SCM_RIGHTS).
/// The descriptors are the client's own duplicates; the writer task closes them once sent.
pub(super) struct Request {
    pub(super) line: Vec<u8>,
    pub(super) fds: Vec<OwnedFd>,
}

/// How QEMU answered one command.
pub(super) enum Reply {
    /// `{"return": ...}`.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`.
    Error { class: String, desc: String },
}

/// Commands sent and not yet answered, and whether the connection is closed. One lock for both,
/// so a command either registers before the close (and is failed by it) or sees the close.
pub(super) struct PendingTable {
    pub(super) inner: Mutex<PendingInner>,
}

pub(super) struct PendingInner {
    pub(super) waiting: HashMap<u64, oneshot::Sender<Reply>>,
    /// Waiters for `DEVICE_DELETED`, by token: the device id and the sender to complete.
    pub(super) deletions: HashMap<u64, (String, oneshot::Sender<()>)>,
    pub(super) next_token: u64,
    pub(super) closed: bool,
}

impl PendingTable {
    pub(super) fn new() -> Self {
        let inner = PendingInner { waiting: HashMap::new(), deletions: HashMap::new(), next_token: 0, closed: false };
        PendingTable { inner: Mutex::new(inner) }
    }

    /// The table stays consistent even if a holder panicked, so a poisoned lock is still usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>, QmpError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(QmpError::Closed);
        }
        let (sender, receiver) = oneshot::channel();
        inner.waiting.insert(id, sender);
        Ok(receiver)
    }

    /// Hands `reply` to the command with `id`; false when no command waits for it.
    pub(super) fn complete(&self, id: u64, reply: Reply) -> bool {
        let sender = self.lock().waiting.remove(&id);
        match sender {
            // A dropped receiver means the caller gave up; the reply is simply discarded.
            Some(sender) => {
                let _ = sender.send(reply);
                true
            }
            None => false,
        }
    }

    pub(super) fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// Registers a waiter for the `DEVICE_DELETED` event of `device`. The reader task completes
    /// it and still forwards the event, so the supervisor's receiver misses nothing.
    pub(super) fn watch_deletion(&self, device: &str) -> Result<DeletionWatch<'_>, QmpError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(QmpError::Closed);
        }
        let (sender, receiver) = oneshot::channel();
        let token = inner.next_token;
        inner.next_token += 1;
        inner.deletions.insert(token, (device.to_string(), sender));
        Ok(DeletionWatch { pending: self, token, receiver })
    }

    /// Completes every waiter for `device`.
    pub(super) fn device_deleted(&self, device: &str) {
        let mut inner = self.lock();
        let tokens: Vec<u64> =
            inner.deletions.iter().filter(|(_, (watched, _))| watched == device).map(|(token, _)| *token).collect();
        for token in tokens {
            if let Some((_, sender)) = inner.deletions.remove(&token) {
                let _ = sender.send(());
            }
        }
    }

    /// Marks the connection closed. Dropping the senders wakes every waiting command, which
    /// then reports `Closed`, and every deletion waiter.
    pub(super) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.waiting.clear();
        inner.deletions.clear();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Removes a command's table entry when its `execute` future ends in any way, including being
/// dropped by a caller's timeout, so abandoned commands do not pile up.
pub(super) struct PendingGuard<'a> {
    pub(super) pending: &'a PendingTable,
    pub(super) id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.forget(self.id);
    }
}

/// A registered wait for one device's `DEVICE_DELETED`; dropping it (done, timed out or
/// abandoned) removes the registration.
pub(super) struct DeletionWatch<'a> {
    pub(super) pending: &'a PendingTable,
    pub(super) token: u64,
    pub(super) receiver: oneshot::Receiver<()>,
}

impl DeletionWatch<'_> {
    /// Waits for the event, up to `timeout`.
    pub(super) async fn wait(&mut self, timeout: Duration) -> Result<(), QmpError> {
        match tokio::time::timeout(timeout, &mut self.receiver).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::DeviceDeletedTimeout { timeout }),
        }
    }
}

impl Drop for DeletionWatch<'_> {
    fn drop(&mut self) {
        self.pending.lock().deletions.remove(&self.token);
    }
}

/// The writing half of a QMP stream, and the Unix socket under it when there is one: the
/// writer task sends a line that carries descriptors with `sendmsg(2)` on that socket.
pub(super) trait QmpWriter: AsyncWrite + Unpin + Send + 'static {
    fn unix_socket(&self) -> Option<&UnixStream>;
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> QmpWriter for WriteHalf<S> {
    fn unix_socket(&self) -> Option<&UnixStream> {
        None
    }
}

impl QmpWriter for OwnedWriteHalf {
    fn unix_socket(&self) -> Option<&UnixStream> {
        Some(self.as_ref())
    }
}

pub(super) async fn start<R, W>(read_half: R, mut write_half: W) -> Result<(Qmp, Events), QmpError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: QmpWriter,
{
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();

    read_greeting(&mut reader, &mut line).await?;
    negotiate(&mut reader, &mut write_half, &mut line, &events_tx)
        .await
        .map_err(|source| QmpError::Negotiate { source: Box::new(source) })?;

    let pending = Arc::new(PendingTable::new());
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();
    let passes_fds = write_half.unix_socket().is_some();
    // The reader keeps the same BufReader: it may already hold bytes past the negotiation reply.
    tokio::spawn(read_messages(reader, Arc::clone(&pending), events_tx));
    tokio::spawn(write_requests(write_half, requests_rx, Arc::clone(&pending)));

    let link = Link {
        requests: requests_tx,
        pending,
        next_id: AtomicU64::new(1),
        command_timeout: super::COMMAND_TIMEOUT,
        passes_fds,
        fd_command: tokio::sync::Mutex::new(()),
    };
    Ok((Qmp { link: Arc::new(link) }, events_rx))
}

/// Reads one line into `line` (cleared first); false at end of stream.
/// The longest line taken from QEMU: far above its largest reply (`query-qmp-schema`, a few
/// hundred KiB), and a bound on what a runaway or hostile peer can make vial buffer.
pub(super) const MAX_LINE: u64 = 16 << 20;

async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    let read = (&mut *reader).take(MAX_LINE + 1).read_until(b'\n', line).await?;
    if line.len() as u64 > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a qmp line longer than {MAX_LINE} bytes"),
        ));
    }
    Ok(read > 0)
}

/// Checks that the first line is `{"QMP": {"version": ..., "capabilities": [...]}}`
/// (qmp-spec, "Server Greeting") and logs QEMU's version.
async fn read_greeting<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, line: &mut Vec<u8>) -> Result<(), QmpError> {
    if !read_line(reader, line).await? {
        return Err(QmpError::Greeting { reason: "connection closed before the greeting".into() });
    }
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    // Enough of the line to recognise what answered instead of QEMU, not all of it.
    let excerpt: String = text.chars().take(200).collect();
    let greeting: Value = serde_json::from_str(text)
        .map_err(|error| QmpError::Greeting { reason: format!("not json ({error}): {excerpt:?}") })?;
    let Some(qmp) = greeting.get("QMP").and_then(Value::as_object) else {
        return Err(QmpError::Greeting { reason: format!("no \"QMP\" object: {excerpt:?}") });
    };
    let version = &qmp.get("version").unwrap_or(&Value::Null)["qemu"];
    let capabilities = qmp.get("capabilities").unwrap_or(&Value::Null);
    info!(
        major = version["major"].as_u64(),
        minor = version["minor"].as_u64(),
        micro = version["micro"].as_u64(),
        %capabilities,
        "qmp greeting received"
    );
    Ok(())
}

/// Sends `qmp_capabilities` and waits for its reply; until then QEMU accepts no other command
/// (qmp-spec, "Capabilities Negotiation"). No capability is enabled: out-of-band execution is
/// not needed by a supervisor.
async fn negotiate<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut W,
    line: &mut Vec<u8>,
    events: &mpsc::UnboundedSender<VmEvent>,
) -> Result<(), QmpError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    const NAME: &str = "qmp_capabilities";
    write_line(writer, b"{\"execute\":\"qmp_capabilities\"}\n").await?;
    loop {
        if !read_line(reader, line).await? {
            return Err(QmpError::Closed);
        }
        match classify(line) {
            Message::Skip => {}
            Message::Event(message) => {
                // QEMU sends no events in negotiation mode, but one may race the reply.
                if let Some(event) = decode_event(message) {
                    let _ = events.send(event);
                }
            }
            Message::Reply { reply: Reply::Return(_), .. } => return Ok(()),
            Message::Reply { reply: Reply::Error { class, desc }, .. } => {
                return Err(QmpError::Command { command: NAME.into(), class, desc })
            }
        }
    }
}

async fn write_line<W: AsyncWrite + Unpin>(writer: &mut W, line: &[u8]) -> std::io::Result<()> {
    writer.write_all(line).await?;
    writer.flush().await
}

/// One line from QEMU, sorted.
pub(super) enum Message {
    /// Blank, not JSON, or not a message this client understands; already logged.
    Skip,
    /// An object with an `event` member.
    Event(Value),
    /// A command's reply, with the `id` it echoed (none for replies to id-less requests).
    Reply { id: Option<u64>, reply: Reply },
}

/// Sorts one line. Never fails: a line it cannot use is logged and skipped, because one bad
/// line from QEMU must not cost the supervisor its view of the VM.
pub(super) fn classify(line: &[u8]) -> Message {
    let text = line.trim_ascii();
    if text.is_empty() {
        return Message::Skip;
    }
    let message: Value = match serde_json::from_slice(text) {
        Ok(message) => message,
        Err(error) => {
            warn!(line = %String::from_utf8_lossy(text), %error, "qmp line is not json; skipped");
            return Message::Skip;
        }
    };
    let Value::Object(mut object) = message else {
        warn!(line = %message, "qmp line is not an object; skipped");
        return Message::Skip;
    };
    if object.contains_key("event") {
        return Message::Event(Value::Object(object));
    }
    let id = object.get("id").and_then(Value::as_u64);
    if let Some(value) = object.remove("return") {
        return Message::Reply { id, reply: Reply::Return(value) };
    }
    if let Some(error) = object.remove("error") {
        // The class is kept as a string: qapi's `ErrorClass` enum is closed, and an error class
        // it does not know must still reach the caller as an error, not as a decode failure.
        let class = error["class"].as_str().unwrap_or("GenericError").to_string();
        let desc = error["desc"].as_str().unwrap_or_default().to_string();
        return Message::Reply { id, reply: Reply::Error { class, desc } };
    }
    let line = Value::Object(object);
    warn!(%line, "qmp line is neither a reply nor an event; skipped");
    Message::Skip
}

/// The reader task: dispatches replies and events until the stream ends, then fails pending
/// commands with `Closed` and, by dropping `events`, ends the event receiver.
async fn read_messages<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    pending: Arc<PendingTable>,
    events: mpsc::UnboundedSender<VmEvent>,
) {
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line).await {
            Ok(true) => {}
            Ok(false) => {
                info!("qmp connection closed by qemu");
                break;
            }
            Err(error) => {
                warn!(%error, "reading the qmp socket failed; treating the connection as closed");
                break;
            }
        }
        match classify(&line) {
            Message::Skip => {}
            Message::Event(message) => {
                if let Some(event) = decode_event(message) {
                    if let VmEvent::DeviceDeleted { device: Some(device), .. } = &event {
                        pending.device_deleted(device);
                    }
                    // Nobody listening is fine: the events are advisory.
                    let _ = events.send(event);
                }
            }
            Message::Reply { id: Some(id), reply } => {
                if !pending.complete(id, reply) {
                    debug!(id, "qmp reply for a command nobody waits for any more");
                }
            }
            Message::Reply { id: None, .. } => {
                // Every request this client sends carries an id, so this is QEMU rejecting a
                // line it could not parse at all (qmp-spec: such errors carry no id).
                warn!(line = %String::from_utf8_lossy(line.trim_ascii()), "qmp reply without an id; ignored");
            }
        }
    }
    pending.close();
}

/// The writer task: writes whole request lines in order until every `Qmp` handle is dropped.
/// A write error means the socket is gone for commands, so it closes the pending table.
async fn write_requests<W: QmpWriter>(
    mut writer: W,
    mut requests: mpsc::UnboundedReceiver<Request>,
    pending: Arc<PendingTable>,
) {
    while let Some(request) = requests.recv().await {
        let written = if request.fds.is_empty() {
            write_line(&mut writer, &request.line).await
        } else {
            send_with_fds(&mut writer, &request.line, &request.fds).await
        };
        // Dropping the request closes the client's duplicates: QEMU holds its own now.
        drop(request);
        if let Err(error) = written {
            warn!(%error, "writing to the qmp socket failed; failing pending commands");
            pending.close();
            return;
        }
    }
}

/// Sends `line` with `fds` attached to its first byte (SCM_RIGHTS, unix(7)), then whatever part
/// of the line the socket did not take, so that the whole line goes out before any other.
///
/// QEMU reads the descriptors with the bytes they came with and keeps them for the `getfd`
/// that those bytes carry (`qemu_chr_fe_get_msgfd`). Waiting for room uses tokio's readiness:
/// `writable()` sleeps until epoll reports the socket writable, and `try_io` clears that
/// readiness when `sendmsg` still says EAGAIN, so a full socket costs no spinning.
async fn send_with_fds<W: QmpWriter>(writer: &mut W, line: &[u8], fds: &[OwnedFd]) -> std::io::Result<()> {
    let sent = {
        let Some(socket) = writer.unix_socket() else {
            return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "descriptors need a unix socket"));
        };
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            socket.writable().await?;
            let attempt = socket.try_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(line)];
                let rights = [ControlMessage::ScmRights(&raw)];
                // MSG_NOSIGNAL: a QEMU that went away is an EPIPE to report, not a SIGPIPE.
                sendmsg::<()>(socket.as_raw_fd(), &iov, &rights, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(sent) => break sent,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    debug!(bytes = line.len(), "qmp socket full; waiting until qemu reads");
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
    };
    debug!(fds = fds.len(), sent, bytes = line.len(), "qmp line sent with descriptors");
    // A stream socket may take only part of the line; the descriptors went with that part.
    write_line(writer, &line[sent..]).await
}
