//! The QEMU Machine Protocol client: the greeting and capabilities negotiation, commands matched
//! to their replies by `id`, the VM's events, and the run state those events imply.
//!
//! It owns one QMP connection over any `AsyncRead + AsyncWrite` stream (the Unix socket in
//! production, `tokio::io::duplex` in tests). It never spawns, signals or waits for QEMU: the
//! process belongs to `vm` and the supervisor; this module only talks to it.
//!
//! References: QEMU's "QEMU Machine Protocol Specification" (docs/interop/qmp-spec) and the QMP
//! reference manual (the QAPI schema, mirrored by the `qapi-qmp` crate).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use qapi::qmp::QmpCommand;
use qapi::Enum as _;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// What can go wrong talking QMP. One variant per failed step; the binary prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The first line was not a QMP greeting (`{"QMP": {...}}`), or the peer closed first.
    #[error("bad qmp greeting: {reason}")]
    Greeting {
        /// What was wrong, with the offending line when there was one.
        reason: String,
    },
    /// `qmp_capabilities` failed, so the connection never left negotiation mode.
    #[error("negotiating qmp capabilities failed")]
    Negotiate {
        /// Why it failed.
        #[source]
        source: Box<QmpError>,
    },
    /// Reading or writing the QMP stream failed.
    #[error("qmp i/o failed")]
    Io {
        /// The I/O error.
        #[from]
        source: std::io::Error,
    },
    /// The connection is closed (QEMU exited or closed the socket); no reply will come.
    #[error("qmp connection closed")]
    Closed,
    /// QEMU answered a command with an `error` response.
    #[error("qmp command {command} failed: {class}: {desc}")]
    Command {
        /// The command's name (`query-status`).
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A command's arguments could not be turned into JSON.
    #[error("encoding the arguments of qmp command {command} failed")]
    Encode {
        /// The command's name.
        command: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A command's `return` value did not have the shape the schema promises.
    #[error("decoding the reply to qmp command {command} failed")]
    Decode {
        /// The command's name.
        command: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
}

/// An event from QEMU that the supervisor cares about, mapped from the QMP event of that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// `SHUTDOWN`: the guest or the host asked the VM to stop; QEMU exits next unless it was
    /// started with `-no-shutdown`.
    Shutdown {
        /// True when the guest initiated it (ACPI poweroff, reset turned into shutdown).
        guest: bool,
        /// QEMU's `ShutdownCause` name (`guest-shutdown`, `host-qmp-quit`, `host-signal`, ...).
        reason: String,
    },
    /// `POWERDOWN`: an ACPI power button press was sent to the guest (`system_powerdown`).
    Powerdown,
    /// `RESET`: the VM was reset.
    Reset {
        /// True when the guest initiated it (a reboot).
        guest: bool,
    },
    /// `STOP`: the vCPUs stopped (paused, or the stop that follows a shutdown or a panic).
    Stop,
    /// `RESUME`: the vCPUs run again.
    Resume,
    /// `GUEST_PANICKED`: the guest reported a panic through a pvpanic-like device.
    GuestPanicked,
    /// Any other event that the `qapi-qmp` schema knows (`RTC_CHANGE`, `NIC_RX_FILTER_CHANGED`,
    /// ...). Forwarded by name only, so the supervisor can log it; it does not change the run
    /// state.
    Other {
        /// The QMP event name.
        name: String,
    },
}

/// The receiving end of the VM's events. `recv()` returns `None` once the connection is closed.
pub type Events = mpsc::UnboundedReceiver<VmEvent>;

/// The VM's run state, as QEMU names it in `query-status` (the QAPI `RunState` enum).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunState {
    /// `debug`: stopped by the gdb stub.
    Debug,
    /// `inmigrate`: waiting for an incoming migration.
    InMigrate,
    /// `internal-error`: stopped by an internal error (e.g. KVM failure).
    InternalError,
    /// `io-error`: stopped on a disk I/O error.
    IoError,
    /// `paused`: stopped by `stop` or `-S`.
    Paused,
    /// `postmigrate`: stopped after an outgoing migration.
    PostMigrate,
    /// `prelaunch`: not started yet, or reset while not running.
    Prelaunch,
    /// `finish-migrate`: finishing an outgoing migration.
    FinishMigrate,
    /// `restore-vm`: loading a snapshot.
    RestoreVm,
    /// `running`: the vCPUs run.
    Running,
    /// `save-vm`: saving a snapshot.
    SaveVm,
    /// `shutdown`: the guest shut down and QEMU was told not to exit (`-no-shutdown`).
    Shutdown,
    /// `suspended`: the guest is in ACPI S3.
    Suspended,
    /// `watchdog`: stopped by a watchdog whose action is `pause`.
    Watchdog,
    /// `guest-panicked`: stopped after a guest panic.
    Panicked,
    /// `colo`: COLO fault tolerance.
    Colo,
    /// A name this module does not know (a QEMU newer than this code).
    Unknown(String),
}

/// The named run states, in one table so that `from_name` and `as_str` cannot drift apart.
const RUN_STATE_NAMES: &[(RunState, &str)] = &[
    (RunState::Debug, "debug"),
    (RunState::InMigrate, "inmigrate"),
    (RunState::InternalError, "internal-error"),
    (RunState::IoError, "io-error"),
    (RunState::Paused, "paused"),
    (RunState::PostMigrate, "postmigrate"),
    (RunState::Prelaunch, "prelaunch"),
    (RunState::FinishMigrate, "finish-migrate"),
    (RunState::RestoreVm, "restore-vm"),
    (RunState::Running, "running"),
    (RunState::SaveVm, "save-vm"),
    (RunState::Shutdown, "shutdown"),
    (RunState::Suspended, "suspended"),
    (RunState::Watchdog, "watchdog"),
    (RunState::Panicked, "guest-panicked"),
    (RunState::Colo, "colo"),
];

impl RunState {
    /// The state for QEMU's name of it; a name not in the table becomes `Unknown`.
    pub fn from_name(name: &str) -> RunState {
        RUN_STATE_NAMES
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(state, _)| state.clone())
            .unwrap_or_else(|| RunState::Unknown(name.to_string()))
    }

    /// QEMU's name for the state (`running`, `paused`, `guest-panicked`, ...).
    pub fn as_str(&self) -> &str {
        if let RunState::Unknown(name) = self {
            return name;
        }
        RUN_STATE_NAMES.iter().find(|(state, _)| state == self).map(|(_, name)| *name).unwrap_or("unknown")
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The run state after `event`, given the state before it. Pure, so the supervisor can track the
/// state from the event stream without asking QEMU after every event.
///
/// The rules follow QEMU's `main_loop_should_exit()` and `qemu_system_guest_panicked()`
/// (softmmu/runstate.c), checked against QEMU 7.2:
/// - `STOP` → `paused`, except that QEMU implements a shutdown under `-no-shutdown` and a guest
///   panic as `SHUTDOWN`/`GUEST_PANICKED` followed by `vm_stop()`, which sends `STOP`; that STOP
///   leaves `shutdown` and `guest-panicked` as they are.
/// - `RESUME` → `running`; `SHUTDOWN` → `shutdown`; `GUEST_PANICKED` → `guest-panicked`.
/// - `RESET` keeps `running` (a reboot), but a reset of a VM that was not running leaves it in
///   `prelaunch` until `cont` (observed: `stop`, `system_reset`, `query-status` → `prelaunch`).
/// - `POWERDOWN` only presses the ACPI button, and other events do not change the state.
pub fn next_run_state(current: &RunState, event: &VmEvent) -> RunState {
    match event {
        VmEvent::Stop => match current {
            RunState::Shutdown | RunState::Panicked => current.clone(),
            _ => RunState::Paused,
        },
        VmEvent::Resume => RunState::Running,
        VmEvent::Shutdown { .. } => RunState::Shutdown,
        VmEvent::GuestPanicked => RunState::Panicked,
        VmEvent::Reset { .. } => match current {
            RunState::Running | RunState::InMigrate | RunState::FinishMigrate => current.clone(),
            _ => RunState::Prelaunch,
        },
        VmEvent::Powerdown | VmEvent::Other { .. } => current.clone(),
    }
}

/// A handle to a negotiated QMP connection. Clones share the connection; commands from several
/// tasks may be in flight at once, each matched to its reply by `id`.
#[derive(Clone)]
pub struct Qmp {
    link: Arc<Link>,
}

/// What the handles share. The writer task holds only the `PendingTable`, not this, so that
/// dropping the last handle closes `lines` and ends the writer task.
struct Link {
    /// Whole request lines for the writer task. A separate writer means a caller that drops an
    /// `execute` future mid-way can never leave half a line on the socket.
    lines: mpsc::UnboundedSender<Vec<u8>>,
    /// Commands waiting for their reply.
    pending: Arc<PendingTable>,
    /// The next request `id`; QMP echoes it in the reply (qmp-spec, "Commands Responses").
    next_id: AtomicU64,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp").field("closed", &self.link.pending.is_closed()).finish()
    }
}

/// How QEMU answered one command.
enum Reply {
    /// `{"return": ...}`.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`.
    Error { class: String, desc: String },
}

/// Commands sent and not yet answered, and whether the connection is closed. One lock for both,
/// so a command either registers before the close (and is failed by it) or sees the close.
struct PendingTable {
    inner: Mutex<PendingInner>,
}

struct PendingInner {
    waiting: HashMap<u64, oneshot::Sender<Reply>>,
    closed: bool,
}

impl PendingTable {
    fn new() -> Self {
        PendingTable { inner: Mutex::new(PendingInner { waiting: HashMap::new(), closed: false }) }
    }

    /// The table stays consistent even if a holder panicked, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>, QmpError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(QmpError::Closed);
        }
        let (sender, receiver) = oneshot::channel();
        inner.waiting.insert(id, sender);
        Ok(receiver)
    }

    /// Hands `reply` to the command with `id`; false when no command waits for it.
    fn complete(&self, id: u64, reply: Reply) -> bool {
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

    fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// Marks the connection closed. Dropping the senders wakes every waiting command, which
    /// then reports `Closed`.
    fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.waiting.clear();
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

/// Removes a command's table entry when its `execute` future ends in any way, including being
/// dropped by a caller's timeout, so abandoned commands do not pile up.
struct PendingGuard<'a> {
    pending: &'a PendingTable,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.forget(self.id);
    }
}

/// Reads QEMU's greeting, negotiates capabilities, and starts the tasks that own the stream.
///
/// Returns the command handle and the event receiver. Must be called inside a tokio runtime
/// (it spawns a reader task and a writer task). It waits for QEMU as long as QEMU takes; wrap it
/// in `tokio::time::timeout` to bound that.
pub async fn connect<S>(stream: S) -> Result<(Qmp, Events), QmpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, mut write_half) = tokio::io::split(stream);
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    let (events_tx, events_rx) = mpsc::unbounded_channel();

    read_greeting(&mut reader, &mut line).await?;
    negotiate(&mut reader, &mut write_half, &mut line, &events_tx)
        .await
        .map_err(|source| QmpError::Negotiate { source: Box::new(source) })?;

    let pending = Arc::new(PendingTable::new());
    let (lines_tx, lines_rx) = mpsc::unbounded_channel();
    // The reader keeps the same BufReader: it may already hold bytes past the negotiation reply.
    tokio::spawn(read_messages(reader, Arc::clone(&pending), events_tx));
    tokio::spawn(write_lines(write_half, lines_rx, Arc::clone(&pending)));

    let link = Link { lines: lines_tx, pending, next_id: AtomicU64::new(1) };
    Ok((Qmp { link: Arc::new(link) }, events_rx))
}

/// Reads one line into `line` (cleared first); false at end of stream.
async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>, line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    Ok(reader.read_until(b'\n', line).await? > 0)
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
enum Message {
    /// Blank, not JSON, or not a message this client understands; already logged.
    Skip,
    /// An object with an `event` member.
    Event(Value),
    /// A command's reply, with the `id` it echoed (none for replies to id-less requests).
    Reply { id: Option<u64>, reply: Reply },
}

/// Sorts one line. Never fails: a line it cannot use is logged and skipped, because one bad
/// line from QEMU must not cost the supervisor its view of the VM.
fn classify(line: &[u8]) -> Message {
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

/// The generic shape of every event (qmp-spec, "Asynchronous events"), parsed before the typed
/// one so that an event the schema rejects can still be logged by name.
#[derive(Deserialize)]
struct RawEvent {
    event: String,
    #[serde(default)]
    data: Value,
}

/// Maps one event object to a `VmEvent`, or `None` (logged) when it is not one to forward.
///
/// The typed parse uses `qapi::qmp::Event`, an internally tagged serde enum with no catch-all
/// variant: an event name the schema does not know, or known data of the wrong shape, is a
/// deserialization error. Both are logged and ignored, never fatal.
fn decode_event(message: Value) -> Option<VmEvent> {
    let raw: RawEvent = match serde_json::from_value(message.clone()) {
        Ok(raw) => raw,
        Err(error) => {
            warn!(line = %message, %error, "qmp event without a string name; ignored");
            return None;
        }
    };
    let typed = match serde_json::from_value::<qapi::qmp::Event>(message) {
        Ok(typed) => typed,
        Err(error) => {
            // serde reports an unknown tag as "unknown variant `NAME`" (an enum value inside
            // the data that the schema does not know reads the same, with that value instead of
            // the event name). An unknown event is a QEMU newer than the schema, which is
            // expected; a known event with data of another shape is worth a warning.
            let unknown_name = format!("unknown variant `{}`", raw.event);
            if error.to_string().starts_with(&unknown_name) {
                info!(event = %raw.event, data = %raw.data, "qmp event unknown to the qapi schema; ignored");
            } else {
                warn!(event = %raw.event, data = %raw.data, %error, "qmp event does not fit the qapi schema; ignored");
            }
            return None;
        }
    };
    debug!(event = %raw.event, data = %raw.data, "qmp event");
    use qapi::qmp::Event;
    Some(match typed {
        Event::SHUTDOWN { data, .. } => VmEvent::Shutdown { guest: data.guest, reason: data.reason.name().to_string() },
        Event::POWERDOWN { .. } => VmEvent::Powerdown,
        Event::RESET { data, .. } => VmEvent::Reset { guest: data.guest },
        Event::STOP { .. } => VmEvent::Stop,
        Event::RESUME { .. } => VmEvent::Resume,
        Event::GUEST_PANICKED { .. } => VmEvent::GuestPanicked,
        _ => VmEvent::Other { name: raw.event },
    })
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
async fn write_lines<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Arc<PendingTable>,
) {
    while let Some(line) = lines.recv().await {
        if let Err(error) = write_line(&mut writer, &line).await {
            warn!(%error, "writing to the qmp socket failed; failing pending commands");
            pending.close();
            return;
        }
    }
}

/// The reply to `query-status`. Parsed by hand rather than as `qapi::qmp::StatusInfo`, whose
/// closed `RunState` enum would turn a state newer than the schema into a decode error; unknown
/// fields (`singlestep` in QEMU 7.2, gone in 8.1) are ignored.
#[derive(Deserialize)]
struct StatusReply {
    status: String,
}

impl Qmp {
    /// Runs a typed command from `qapi::qmp` (e.g. `qapi::qmp::query_kvm {}`) and decodes its
    /// `return` value as the schema says.
    pub async fn execute<C: QmpCommand>(&self, command: C) -> Result<C::Ok, QmpError> {
        let arguments = serde_json::to_value(&command)
            .map_err(|source| QmpError::Encode { command: C::NAME.to_string(), source })?;
        let value = self.execute_raw(C::NAME, arguments).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode { command: C::NAME.to_string(), source })
    }

    /// Runs command `name` with `arguments` (a JSON object, or `Value::Null` for none) and
    /// returns its `return` value as JSON. For commands the typed API makes awkward.
    pub async fn execute_raw(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.link.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = serde_json::Map::new();
        request.insert("execute".into(), Value::from(name));
        // QEMU rejects `"arguments": null`; an empty object is accepted but pointless.
        if !arguments.is_null() {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), Value::from(id));
        let mut line =
            serde_json::to_vec(&request).map_err(|source| QmpError::Encode { command: name.to_string(), source })?;
        line.push(b'\n');

        let receiver = self.link.pending.register(id)?;
        let _guard = PendingGuard { pending: &self.link.pending, id };
        debug!(command = name, id, "qmp command");
        self.link.lines.send(line).map_err(|_| QmpError::Closed)?;
        match receiver.await.map_err(|_| QmpError::Closed)? {
            Reply::Return(value) => Ok(value),
            Reply::Error { class, desc } => Err(QmpError::Command { command: name.to_string(), class, desc }),
        }
    }

    /// The VM's run state (`query-status`).
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        const NAME: &str = "query-status";
        let value = self.execute_raw(NAME, Value::Null).await?;
        let reply: StatusReply =
            serde_json::from_value(value).map_err(|source| QmpError::Decode { command: NAME.to_string(), source })?;
        Ok(RunState::from_name(&reply.status))
    }

    /// Whether KVM acceleration is enabled for this VM (`query-kvm`, field `enabled`).
    pub async fn query_kvm(&self) -> Result<bool, QmpError> {
        Ok(self.execute(qapi::qmp::query_kvm {}).await?.enabled)
    }

    /// Presses the ACPI power button (`system_powerdown`). The guest decides whether and when to
    /// power off; the command returns as soon as the button is pressed.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute(qapi::qmp::system_powerdown {}).await.map(drop)
    }

    /// Tells QEMU to exit at once (`quit`). QEMU may close the socket before or after sending the
    /// reply, so `Closed` counts as success here.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute(qapi::qmp::quit {}).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    /// QEMU 7.2's greeting, as captured from the real binary.
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

    /// A safety net for waits that should end at once; a hang fails the test instead of CI.
    const PATIENCE: Duration = Duration::from_secs(30);

    /// The scripted QEMU side of a duplex stream.
    struct Peer {
        reader: BufReader<ReadHalf<DuplexStream>>,
        writer: WriteHalf<DuplexStream>,
    }

    impl Peer {
        fn new(stream: DuplexStream) -> Self {
            let (reader, writer) = tokio::io::split(stream);
            Peer { reader: BufReader::new(reader), writer }
        }

        async fn send(&mut self, line: &str) {
            self.writer.write_all(line.as_bytes()).await.unwrap();
            self.writer.write_all(b"\n").await.unwrap();
            self.writer.flush().await.unwrap();
        }

        async fn send_json(&mut self, message: Value) {
            self.send(&message.to_string()).await;
        }

        /// The next request the client sent.
        async fn request(&mut self) -> Value {
            let mut line = String::new();
            let read = self.reader.read_line(&mut line).await.unwrap();
            assert!(read > 0, "client closed the stream");
            serde_json::from_str(&line).unwrap()
        }

        /// Reads a request, checks its name, answers it with `reply` plus the request's id.
        async fn answer(&mut self, name: &str, mut reply: Value) -> Value {
            let request = self.request().await;
            assert_eq!(request["execute"], name, "request {request}");
            reply["id"] = request["id"].clone();
            self.send_json(reply).await;
            request
        }

        async fn event(&mut self, name: &str, data: Option<Value>) {
            let mut event = json!({"event": name, "timestamp": {"seconds": 1, "microseconds": 2}});
            if let Some(data) = data {
                event["data"] = data;
            }
            self.send_json(event).await;
        }
    }

    /// A client connected to a peer that greeted and accepted `qmp_capabilities`.
    async fn connected() -> (Qmp, Events, Peer) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = async move {
            let mut peer = Peer::new(server);
            peer.send(GREETING).await;
            let request = peer.request().await;
            assert_eq!(request, json!({"execute": "qmp_capabilities"}));
            peer.send(r#"{"return": {}}"#).await;
            peer
        };
        let (connection, peer) = tokio::join!(connect(client), peer);
        let (qmp, events) = connection.unwrap();
        (qmp, events, peer)
    }

    /// Records every tracing event on the current thread as `LEVEL field=value ...`, so a test
    /// can check what the module logged. A current-thread runtime runs the reader task on the
    /// test's thread, so its logs land here too.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<String>>>);

    impl Captured {
        fn install(&self) -> tracing::subscriber::DefaultGuard {
            tracing::subscriber::set_default(self.clone())
        }

        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }

        fn has(&self, level: &str, parts: &[&str]) -> bool {
            self.lines().iter().any(|line| line.starts_with(level) && parts.iter().all(|part| line.contains(part)))
        }
    }

    impl tracing::Subscriber for Captured {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            use std::fmt::Write as _;
            let mut line = event.metadata().level().to_string();
            event.record(&mut |field: &tracing::field::Field, value: &dyn fmt::Debug| {
                let _ = write!(line, " {}={:?}", field.name(), value);
            });
            self.0.lock().unwrap().push(line);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    async fn next_event(events: &mut Events) -> Option<VmEvent> {
        tokio::time::timeout(PATIENCE, events.recv()).await.expect("no event in time")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn query_status_accepts_qemu_7_2_and_newer_replies() {
        let (qmp, _events, mut peer) = connected().await;
        let old = json!({"return": {"status": "running", "running": true, "singlestep": false}});
        let (state, _) = tokio::join!(qmp.query_status(), peer.answer("query-status", old));
        assert_eq!(state.unwrap(), RunState::Running);

        let new = json!({"return": {"status": "paused", "running": false}});
        let (state, _) = tokio::join!(qmp.query_status(), peer.answer("query-status", new));
        assert_eq!(state.unwrap(), RunState::Paused);

        let future = json!({"return": {"status": "vial-future-state", "running": false}});
        let (state, _) = tokio::join!(qmp.query_status(), peer.answer("query-status", future));
        assert_eq!(state.unwrap(), RunState::Unknown("vial-future-state".into()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn typed_commands_send_their_schema_names() {
        let (qmp, _events, mut peer) = connected().await;
        let kvm = json!({"return": {"enabled": true, "present": true}});
        let (enabled, request) = tokio::join!(qmp.query_kvm(), peer.answer("query-kvm", kvm));
        assert!(enabled.unwrap());
        // Typed commands with no fields serialize to an empty arguments object.
        assert_eq!(request["arguments"], json!({}));

        let (result, _) = tokio::join!(qmp.system_powerdown(), peer.answer("system_powerdown", json!({"return": {}})));
        result.unwrap();

        let (result, request) = tokio::join!(
            qmp.execute_raw("human-monitor-command", json!({"command-line": "info version"})),
            peer.answer("human-monitor-command", json!({"return": "7.2.22\r\n"}))
        );
        assert_eq!(result.unwrap(), json!("7.2.22\r\n"));
        assert_eq!(request["arguments"]["command-line"], "info version");

        // A raw command without arguments sends no arguments member at all.
        let (_, request) =
            tokio::join!(qmp.execute_raw("query-name", Value::Null), peer.answer("query-name", json!({"return": {}})));
        assert!(request.get("arguments").is_none(), "request {request}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn known_events_arrive_mapped() {
        let (_qmp, mut events, mut peer) = connected().await;
        peer.event("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"}))).await;
        peer.event("POWERDOWN", None).await;
        peer.event("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"}))).await;
        peer.event("STOP", None).await;
        peer.event("RESUME", None).await;
        peer.event("GUEST_PANICKED", Some(json!({"action": "pause"}))).await;
        peer.event("RTC_CHANGE", Some(json!({"offset": 3, "qom-path": "/machine/unattached"}))).await;

        let expected = [
            VmEvent::Shutdown { guest: true, reason: "guest-shutdown".into() },
            VmEvent::Powerdown,
            VmEvent::Reset { guest: false },
            VmEvent::Stop,
            VmEvent::Resume,
            VmEvent::GuestPanicked,
            VmEvent::Other { name: "RTC_CHANGE".into() },
        ];
        for want in expected {
            assert_eq!(next_event(&mut events).await, Some(want));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unknown_misfit_and_garbage_lines_are_skipped() {
        let logs = Captured::default();
        let _logging = logs.install();
        let (qmp, mut events, mut peer) = connected().await;
        let mut state = RunState::Running;

        peer.send(
            r#"{"event": "VIAL_FUTURE_EVENT", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        )
        .await;
        peer.send("this is not json {").await;
        // A name the schema knows, with data that does not fit it.
        peer.event("SHUTDOWN", Some(json!({"guest": "yes"}))).await;
        peer.event("RESET", Some(json!({"guest": true, "reason": "vial-future-cause"}))).await;
        // JSON that is not a QMP message, a nameless event and a blank line.
        peer.send("[1, 2, 3]").await;
        peer.send(r#"{"event": 7}"#).await;
        peer.send(r#"{"neither": "reply nor event"}"#).await;
        peer.send("").await;
        peer.event("STOP", None).await;

        let event = next_event(&mut events).await.unwrap();
        assert_eq!(event, VmEvent::Stop);
        state = next_run_state(&state, &event);
        assert_eq!(state, RunState::Paused);

        // Each skipped line was logged with what it was.
        let logged = logs.lines();
        assert!(logs.has("INFO", &["event=VIAL_FUTURE_EVENT", r#"data={"x":1}"#]), "{logged:#?}");
        assert!(logs.has("WARN", &["line=this is not json {"]), "{logged:#?}");
        assert!(logs.has("WARN", &["event=SHUTDOWN", r#"data={"guest":"yes"}"#]), "{logged:#?}");
        assert!(logs.has("WARN", &["event=RESET", "vial-future-cause"]), "{logged:#?}");
        assert!(logs.has("WARN", &["line=[1,2,3]"]), "{logged:#?}");
        assert!(logs.has("WARN", &[r#"line={"event":7}"#]), "{logged:#?}");
        assert!(logs.has("WARN", &["neither"]), "{logged:#?}");

        // The reader is still alive: commands and later events still work.
        let reply = json!({"return": {"status": "paused", "running": false}});
        let (status, _) = tokio::join!(qmp.query_status(), peer.answer("query-status", reply));
        assert_eq!(status.unwrap(), state);
        peer.event("RESUME", None).await;
        let event = next_event(&mut events).await.unwrap();
        assert_eq!(next_run_state(&state, &event), RunState::Running);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_commands_get_their_own_replies() {
        let (qmp, _events, mut peer) = connected().await;
        let other = qmp.clone();
        let third = qmp.clone();
        let peer_side = async {
            let mut requests = Vec::new();
            for _ in 0..3 {
                requests.push(peer.request().await);
            }
            // Answer in reverse order, each with its own command name, interleaving an event.
            for request in requests.iter().rev() {
                peer.send_json(json!({"return": {"name": request["execute"]}, "id": request["id"]})).await;
                peer.event("STOP", None).await;
            }
        };
        let (a, b, c, ()) = tokio::join!(
            qmp.execute_raw("query-a", Value::Null),
            other.execute_raw("query-b", Value::Null),
            third.execute_raw("query-c", json!({"x": 1})),
            peer_side
        );
        assert_eq!(a.unwrap(), json!({"name": "query-a"}));
        assert_eq!(b.unwrap(), json!({"name": "query-b"}));
        assert_eq!(c.unwrap(), json!({"name": "query-c"}));
        assert!(qmp.link.pending.lock().waiting.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn commands_run_from_spawned_tasks() {
        let (qmp, _events, mut peer) = connected().await;
        let tasks: Vec<_> = (0..4)
            .map(|n| {
                let qmp = qmp.clone();
                tokio::spawn(async move { qmp.execute_raw(&format!("query-{n}"), Value::Null).await })
            })
            .collect();
        for _ in 0..4 {
            let request = peer.request().await;
            peer.send_json(json!({"return": request["execute"], "id": request["id"]})).await;
        }
        for (n, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap().unwrap(), json!(format!("query-{n}")));
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn error_reply_becomes_command_error() {
        let (qmp, _events, mut peer) = connected().await;
        let reply = json!({"error": {"class": "CommandNotFound", "desc": "The command vial-nope has not been found"}});
        let (result, _) = tokio::join!(qmp.execute_raw("vial-nope", Value::Null), peer.answer("vial-nope", reply));
        match result {
            Err(QmpError::Command { command, class, desc }) => {
                assert_eq!(command, "vial-nope");
                assert_eq!(class, "CommandNotFound");
                assert_eq!(desc, "The command vial-nope has not been found");
            }
            other => panic!("expected a command error, got {other:?}"),
        }

        // An error class newer than qapi's closed ErrorClass enum still reaches the caller.
        let reply = json!({"error": {"class": "VialFutureClass", "desc": "no"}});
        let (result, _) = tokio::join!(qmp.query_kvm(), peer.answer("query-kvm", reply));
        assert!(matches!(&result, Err(QmpError::Command { class, .. }) if class == "VialFutureClass"), "{result:?}");
        let message = result.unwrap_err().to_string();
        assert_eq!(message, "qmp command query-kvm failed: VialFutureClass: no");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reply_of_the_wrong_shape_is_a_decode_error() {
        let (qmp, _events, mut peer) = connected().await;
        let reply = json!({"return": {"enabled": "yes", "present": true}});
        let (result, _) = tokio::join!(qmp.query_kvm(), peer.answer("query-kvm", reply));
        assert!(matches!(&result, Err(QmpError::Decode { command, .. }) if command == "query-kvm"), "{result:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn closing_fails_pending_commands_and_ends_events() {
        let (qmp, mut events, mut peer) = connected().await;
        let peer_side = async move {
            peer.event("STOP", None).await;
            let request = peer.request().await;
            assert_eq!(request["execute"], "query-status");
            // QEMU goes away without answering.
            drop(peer);
        };
        let (result, ()) = tokio::join!(qmp.query_status(), peer_side);
        assert!(matches!(result, Err(QmpError::Closed)), "{result:?}");
        // Events sent before the close are still delivered, then the stream ends.
        assert_eq!(next_event(&mut events).await, Some(VmEvent::Stop));
        assert_eq!(next_event(&mut events).await, None);
        // Later commands fail at once.
        assert!(matches!(qmp.query_kvm().await, Err(QmpError::Closed)));
        assert!(qmp.link.pending.lock().waiting.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn quit_succeeds_whether_or_not_the_reply_comes() {
        let (qmp, mut events, mut peer) = connected().await;
        let (result, _) = tokio::join!(qmp.quit(), peer.answer("quit", json!({"return": {}})));
        result.unwrap();

        let peer_side = async move {
            peer.event("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"}))).await;
            let request = peer.request().await;
            assert_eq!(request["execute"], "quit");
            drop(peer);
        };
        let (result, ()) = tokio::join!(qmp.quit(), peer_side);
        result.unwrap();
        let shutdown = VmEvent::Shutdown { guest: false, reason: "host-qmp-quit".into() };
        assert_eq!(next_event(&mut events).await, Some(shutdown));
        assert_eq!(next_event(&mut events).await, None);
        // Quitting a QEMU that is already gone is still a success.
        qmp.quit().await.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn abandoned_commands_leave_no_entry_behind() {
        let (qmp, _events, mut peer) = connected().await;
        let call = qmp.execute_raw("query-slow", Value::Null);
        let (outcome, request) = tokio::join!(tokio::time::timeout(Duration::from_millis(1), call), peer.request());
        // No reply comes, so the timeout drops the command's future, and its entry with it.
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(qmp.link.pending.lock().waiting.is_empty());
        // A late reply for it is ignored, and the connection still works.
        peer.send_json(json!({"return": {}, "id": request["id"]})).await;
        let kvm = json!({"return": {"enabled": false, "present": false}});
        let (enabled, _) = tokio::join!(qmp.query_kvm(), peer.answer("query-kvm", kvm));
        assert!(!enabled.unwrap());
    }

    /// Runs `connect` against a peer that sends `lines` and then closes.
    async fn connect_to_script(lines: &[&str]) -> Result<(Qmp, Events), QmpError> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let mut peer = Peer::new(server);
        for line in lines {
            peer.send(line).await;
        }
        drop(peer);
        connect(client).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_greeting_that_is_not_qmp_fails() {
        for script in [&[r#"{"return": {}}"#][..], &["SSH-2.0-OpenSSH_9.2"][..], &[][..], &[r#"{"QMP": 1}"#][..]] {
            let result = connect_to_script(script).await;
            assert!(matches!(result, Err(QmpError::Greeting { .. })), "{script:?}: {result:?}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_negotiation_fails() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = async move {
            let mut peer = Peer::new(server);
            peer.send(GREETING).await;
            let reply = json!({"error": {"class": "GenericError", "desc": "no"}});
            peer.answer("qmp_capabilities", reply).await;
            peer
        };
        let (result, _peer) = tokio::join!(connect(client), peer);
        match result {
            Err(QmpError::Negotiate { source }) => {
                assert!(matches!(*source, QmpError::Command { .. }), "{source:?}")
            }
            other => panic!("expected a negotiation error, got {other:?}"),
        }

        // A peer that greets, reads the request and hangs up without answering.
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = async move {
            let mut peer = Peer::new(server);
            peer.send(GREETING).await;
            peer.request().await;
        };
        let (result, ()) = tokio::join!(connect(client), peer);
        assert!(
            matches!(&result, Err(QmpError::Negotiate { source }) if matches!(**source, QmpError::Closed)),
            "{result:?}"
        );
    }

    #[test]
    fn handles_and_futures_can_cross_tasks() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        fn sendable<T: Send>(_: &T) {}
        shareable::<Qmp>();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (client, _server) = tokio::io::duplex(1024);
        runtime.block_on(async {
            let qmp = Qmp {
                link: Arc::new(Link {
                    lines: mpsc::unbounded_channel().0,
                    pending: Arc::new(PendingTable::new()),
                    next_id: AtomicU64::new(1),
                }),
            };
            // Never polled: only their types are checked.
            sendable(&connect(client));
            sendable(&qmp.execute(qapi::qmp::stop {}));
            sendable(&qmp.execute_raw("stop", Value::Null));
            sendable(&qmp.query_status());
            sendable(&qmp.quit());
        });
    }

    #[test]
    fn run_state_follows_events() {
        use RunState::*;
        let shutdown = VmEvent::Shutdown { guest: true, reason: "guest-shutdown".into() };
        let reset = VmEvent::Reset { guest: true };
        let other = VmEvent::Other { name: "RTC_CHANGE".into() };
        let table: &[(RunState, &VmEvent, RunState)] = &[
            (Running, &VmEvent::Stop, Paused),
            (Paused, &VmEvent::Resume, Running),
            (Prelaunch, &VmEvent::Resume, Running),
            (Running, &shutdown, Shutdown),
            (Running, &VmEvent::GuestPanicked, Panicked),
            (Running, &reset, Running),
            (Paused, &reset, Prelaunch),
            (Shutdown, &reset, Prelaunch),
            (Panicked, &reset, Prelaunch),
            (Running, &VmEvent::Powerdown, Running),
            (Paused, &VmEvent::Powerdown, Paused),
            (Running, &other, Running),
            // The STOP that QEMU sends after SHUTDOWN (-no-shutdown) or a guest panic.
            (Shutdown, &VmEvent::Stop, Shutdown),
            (Panicked, &VmEvent::Stop, Panicked),
            (Unknown("x".into()), &VmEvent::Stop, Paused),
        ];
        for (before, event, after) in table {
            assert_eq!(&next_run_state(before, event), after, "{before} + {event:?}");
        }
    }

    #[test]
    fn run_state_names_match_the_qapi_schema() {
        // Every state the schema names maps to a named variant and back to the same name.
        for name in <qapi::qmp::RunState as qapi::Enum>::NAMES {
            let state = RunState::from_name(name);
            assert!(!matches!(state, RunState::Unknown(_)), "{name} is not mapped");
            assert_eq!(state.as_str(), *name);
        }
        assert_eq!(RUN_STATE_NAMES.len(), <qapi::qmp::RunState as qapi::Enum>::COUNT);
        assert_eq!(RunState::Panicked.as_str(), "guest-panicked");
        assert_eq!(RunState::from_name("colo-2").as_str(), "colo-2");
        assert_eq!(RunState::Paused.to_string(), "paused");
    }

    #[test]
    fn error_messages_are_lowercase_without_a_period() {
        let errors = [
            QmpError::Greeting { reason: "connection closed before the greeting".into() },
            QmpError::Negotiate { source: Box::new(QmpError::Closed) },
            QmpError::Io { source: std::io::Error::other("x") },
            QmpError::Closed,
            QmpError::Decode { command: "query-kvm".into(), source: serde_json::from_str::<u8>("x").unwrap_err() },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
            assert!(!message.ends_with('.'), "{message}");
        }
    }

    /// Real QEMU: these tests start `qemu-system-x86_64` from PATH and fail, not skip, when it is
    /// missing (Debian package `qemu-system-x86`).
    mod real_qemu {
        use super::*;
        use std::path::{Path, PathBuf};
        use std::process::{Child, Command, Stdio};
        use std::time::Instant;

        /// Kills QEMU (by its own pid, through `Child`) if a test ends before QEMU exited.
        struct Qemu {
            child: Child,
            socket: PathBuf,
        }

        impl Drop for Qemu {
            fn drop(&mut self) {
                if let Ok(None) = self.child.try_wait() {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                }
                let _ = std::fs::remove_file(&self.socket);
            }
        }

        /// Polls `condition` until it holds; panics after `PATIENCE`.
        async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
            let start = Instant::now();
            while !condition() {
                assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn start_qemu(tag: &str, args: &[&str]) -> (Qemu, Qmp, Events) {
            let socket = std::env::temp_dir().join(format!("vial-qmp-{}-{tag}.sock", std::process::id()));
            let _ = std::fs::remove_file(&socket);
            let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
            let child = Command::new("qemu-system-x86_64")
                .args(["-nodefaults", "-display", "none", "-accel", "tcg", "-qmp", &qmp_arg])
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .unwrap_or_else(|error| {
                    panic!("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86): {error}")
                });
            let mut qemu = Qemu { child, socket };
            let path = qemu.socket.clone();
            wait_until("the qmp socket", || {
                if let Ok(Some(status)) = qemu.child.try_wait() {
                    panic!("qemu exited early: {status}");
                }
                Path::new(&path).exists()
            })
            .await;
            let stream = tokio::net::UnixStream::connect(&qemu.socket).await.unwrap();
            let (qmp, events) =
                tokio::time::timeout(PATIENCE, connect(stream)).await.expect("qmp negotiation timed out").unwrap();
            (qemu, qmp, events)
        }

        /// A firmware image file, removed when the test ends however it ends.
        struct Firmware(PathBuf);

        impl Drop for Firmware {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }

        /// Writes a 64 KiB firmware image whose reset vector (the last 16 bytes) runs `code`:
        /// the smallest guest that can make QEMU emit guest-initiated events.
        fn firmware(tag: &str, code: &[u8]) -> Firmware {
            let mut image = vec![0xf4_u8; 64 * 1024]; // hlt everywhere else
            let start = image.len() - 16;
            image[start..start + code.len()].copy_from_slice(code);
            let path = std::env::temp_dir().join(format!("vial-qmp-{}-{tag}.bin", std::process::id()));
            std::fs::write(&path, image).unwrap();
            Firmware(path)
        }

        async fn wait_exit(qemu: &mut Qemu) -> std::process::ExitStatus {
            let mut status = None;
            wait_until("qemu to exit", || {
                status = qemu.child.try_wait().unwrap();
                status.is_some()
            })
            .await;
            status.unwrap()
        }

        #[tokio::test(flavor = "current_thread")]
        async fn commands_events_and_quit() {
            let (mut qemu, qmp, mut events) = start_qemu("basic", &["-machine", "none"]).await;
            let mut state = qmp.query_status().await.unwrap();
            assert_eq!(state, RunState::Running);
            assert!(!qmp.query_kvm().await.unwrap(), "-accel tcg must not report kvm");

            qmp.execute(qapi::qmp::stop {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            assert_eq!(event, VmEvent::Stop);
            state = next_run_state(&state, &event);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            qmp.execute(qapi::qmp::cont {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            assert_eq!(event, VmEvent::Resume);
            state = next_run_state(&state, &event);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            // A reset of a VM that is not running leaves it in prelaunch until cont.
            qmp.execute(qapi::qmp::stop {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            state = next_run_state(&state, &event);
            qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            assert_eq!(event, VmEvent::Reset { guest: false });
            state = next_run_state(&state, &event);
            assert_eq!(state, RunState::Prelaunch);
            assert_eq!(qmp.query_status().await.unwrap(), state);
            qmp.execute(qapi::qmp::cont {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            state = next_run_state(&state, &event);
            assert_eq!(state, RunState::Running);
            // A reset of a running VM (a reboot) keeps it running.
            qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            assert_eq!(event, VmEvent::Reset { guest: false });
            state = next_run_state(&state, &event);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            qmp.system_powerdown().await.unwrap();
            assert_eq!(next_event(&mut events).await, Some(VmEvent::Powerdown));

            let error = qmp.execute_raw("vial-no-such-command", Value::Null).await.unwrap_err();
            assert!(matches!(&error, QmpError::Command { class, .. } if class == "CommandNotFound"), "{error:?}");
            let version = qmp.execute(qapi::qmp::query_version {}).await.unwrap();
            assert_eq!(version.qemu.major, 7, "these checks were written against QEMU 7.2");

            qmp.quit().await.unwrap();
            let shutdown = VmEvent::Shutdown { guest: false, reason: "host-qmp-quit".into() };
            assert_eq!(next_event(&mut events).await, Some(shutdown));
            assert_eq!(next_event(&mut events).await, None);
            assert!(matches!(qmp.query_status().await, Err(QmpError::Closed)));
            assert!(wait_exit(&mut qemu).await.success());
        }

        #[tokio::test(flavor = "current_thread")]
        async fn guest_reset_turned_into_shutdown_then_stop() {
            // mov al, 0xfe; out 0x64, al (i8042 CPU reset); hlt; jmp back to hlt.
            let bios = firmware("reset", &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
            let bios_arg = bios.0.to_str().unwrap();
            let args =
                ["-machine", "pc", "-m", "16", "-bios", bios_arg, "-S", "-action", "reboot=shutdown,shutdown=pause"];
            let (mut qemu, qmp, mut events) = start_qemu("reset", &args).await;
            let mut state = qmp.query_status().await.unwrap();
            assert_eq!(state, RunState::Prelaunch);
            qmp.execute(qapi::qmp::cont {}).await.unwrap();
            let expected =
                [VmEvent::Resume, VmEvent::Shutdown { guest: true, reason: "guest-reset".into() }, VmEvent::Stop];
            for want in expected {
                let event = next_event(&mut events).await.unwrap();
                assert_eq!(event, want);
                state = next_run_state(&state, &event);
            }
            assert_eq!(state, RunState::Shutdown);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            // reboot=shutdown turns a host reset into a shutdown too; no STOP follows it, since
            // the VM is not running.
            qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
            let event = next_event(&mut events).await.unwrap();
            let host_reset = VmEvent::Shutdown { guest: false, reason: "host-qmp-system-reset".into() };
            assert_eq!(event, host_reset);
            state = next_run_state(&state, &event);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            qmp.quit().await.unwrap();
            assert!(wait_exit(&mut qemu).await.success());
        }

        #[tokio::test(flavor = "current_thread")]
        async fn guest_panic_then_stop() {
            // mov al, 1; mov dx, 0x505; out dx, al (pvpanic "panicked"); hlt; jmp back to hlt.
            let code = [0xb0, 0x01, 0xba, 0x05, 0x05, 0xee, 0xf4, 0xeb, 0xfd];
            let bios = firmware("panic", &code);
            let bios_arg = bios.0.to_str().unwrap();
            let args =
                ["-machine", "pc", "-m", "16", "-bios", bios_arg, "-S", "-device", "pvpanic", "-action", "panic=pause"];
            let (mut qemu, qmp, mut events) = start_qemu("panic", &args).await;
            let mut state = qmp.query_status().await.unwrap();
            qmp.execute(qapi::qmp::cont {}).await.unwrap();
            for want in [VmEvent::Resume, VmEvent::GuestPanicked, VmEvent::Stop] {
                let event = next_event(&mut events).await.unwrap();
                assert_eq!(event, want);
                state = next_run_state(&state, &event);
            }
            assert_eq!(state, RunState::Panicked);
            assert_eq!(qmp.query_status().await.unwrap(), state);

            qmp.quit().await.unwrap();
            assert!(wait_exit(&mut qemu).await.success());
        }
    }
}
