//! The QEMU Machine Protocol client: the greeting and capabilities negotiation, commands matched
//! to their replies by `id`, the VM's events, and the run state those events imply.
//!
//! It owns one QMP connection over any `AsyncRead + AsyncWrite` stream (the Unix socket in
//! production, `tokio::io::duplex` in tests). Over a Unix socket (`connect_unix`) it also passes
//! file descriptors to QEMU (`getfd`), which is how a NIC is hot-plugged on a tap that vial opened
//! (`hotplug_nic`, `unplug_nic`). It never spawns, signals or waits for QEMU, and never opens a
//! tap: the process belongs to `vm` and the supervisor, the links to `net`; this module only
//! talks to QEMU.
//!
//! References: QEMU's "QEMU Machine Protocol Specification" (docs/interop/qmp-spec) and the QMP
//! reference manual (the QAPI schema, mirrored by the `qapi-qmp` crate).

use std::collections::HashMap;
use std::fmt;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use qapi::qmp::QmpCommand;
use qapi::Enum as _;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Interest, WriteHalf};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
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
    /// `getfd` on a connection made with `connect`: only a Unix socket can carry a descriptor,
    /// and only `connect_unix` keeps hold of the socket to do it.
    #[error("cannot pass file descriptor {fdname}: the qmp connection was not made with connect_unix")]
    FdPassingUnsupported {
        /// The name the descriptor would have had in QEMU.
        fdname: String,
    },
    /// Duplicating a descriptor for the writer task failed (EMFILE, ENFILE).
    #[error("duplicating file descriptor {fdname} to pass it to qemu failed")]
    DuplicateFd {
        /// The name the descriptor would have had in QEMU.
        fdname: String,
        /// The error from `fcntl(F_DUPFD_CLOEXEC)`.
        #[source]
        source: std::io::Error,
    },
    /// `device_del` was accepted but no `DEVICE_DELETED` came in time. For PCI the guest must
    /// release the device (ACPI eject); QEMU keeps the request pending until it does or until
    /// the next system reset.
    #[error("no DEVICE_DELETED event within {timeout:?}; the guest has not released the device")]
    DeviceDeletedTimeout {
        /// How long the client waited.
        timeout: Duration,
    },
    /// A step of `hotplug_nic` failed; the steps before it were undone.
    #[error("hot-plugging nic {device} failed")]
    HotplugNic {
        /// The guest device's id.
        device: String,
        /// The step that failed.
        #[source]
        source: Box<QmpError>,
    },
    /// A migration (saving or loading a RAM snapshot) ended in `failed` or `cancelled`.
    #[error("migration {status}: {desc}")]
    Migration {
        /// The final status.
        status: String,
        /// QEMU's `error-desc`, when it gave one.
        desc: String,
    },
    /// A migration did not finish in time.
    #[error("migration not finished within {timeout:?} (status {status})")]
    MigrationTimeout {
        /// How long the client waited.
        timeout: Duration,
        /// The last status seen.
        status: String,
    },
    /// A step of `unplug_nic` failed.
    #[error("unplugging nic {device} failed")]
    UnplugNic {
        /// The guest device's id.
        device: String,
        /// The step that failed.
        #[source]
        source: Box<QmpError>,
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
    /// `DEVICE_DELETED`: QEMU finished removing a device (after `device_del`, once the guest
    /// released it). QEMU sends one for each QOM child that goes too (a virtio-net-pci NIC's
    /// `.../virtio-backend`, without a `device`), then one for the device itself.
    DeviceDeleted {
        /// The device's id (`nic3`), when it had one.
        device: Option<String>,
        /// Its QOM path (`/machine/peripheral/nic3`).
        path: String,
    },
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
/// - `POWERDOWN` only presses the ACPI button, and other events (`DEVICE_DELETED`, ...) do not
///   change the state.
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
        VmEvent::Powerdown | VmEvent::DeviceDeleted { .. } | VmEvent::Other { .. } => current.clone(),
    }
}

/// A handle to a negotiated QMP connection. Clones share the connection; commands from several
/// tasks may be in flight at once, each matched to its reply by `id`.
#[derive(Clone)]
pub struct Qmp {
    link: Arc<Link>,
}

/// What the handles share. The writer task holds only the `PendingTable`, not this, so that
/// dropping the last handle closes `requests` and ends the writer task.
struct Link {
    /// Whole requests for the writer task. A separate writer means a caller that drops an
    /// `execute` future mid-way can never leave half a line on the socket, and a line that
    /// carries descriptors is never interleaved with another.
    requests: mpsc::UnboundedSender<Request>,
    /// Commands waiting for their reply, and waiters for `DEVICE_DELETED`.
    pending: Arc<PendingTable>,
    /// The next request `id`; QMP echoes it in the reply (qmp-spec, "Commands Responses").
    next_id: AtomicU64,
    /// Whether the writer can attach descriptors: the stream is a Unix socket (`connect_unix`).
    passes_fds: bool,
    /// Held from sending a `getfd` until its reply. QEMU's socket chardev keeps only the
    /// descriptors of the latest read that brought any, closing older ones it still holds
    /// (`tcp_chr_recv`, chardev/char-socket.c), and `getfd` takes them when it runs, which may
    /// be after QEMU read further lines; so a second descriptor must not arrive before the first
    /// `getfd` ran. Commands without descriptors need no such care and do not take the lock.
    fd_command: tokio::sync::Mutex<()>,
}

/// One request line for the writer task, and the descriptors to send with it (SCM_RIGHTS).
/// The descriptors are the client's own duplicates; the writer task closes them once sent.
struct Request {
    line: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A NIC to hot-plug into the running VM: a tap backend (`netdev_add type=tap`) on descriptors
/// that vial opened, and the guest device in front of it (`device_add`). QEMU receives its own
/// duplicates of the descriptors, so the caller may drop this once `hotplug_nic` returned.
///
/// The descriptors are named after the netdev in QEMU's table: `<id>` for the tap and
/// `<id>-vhost` for vhost-net, so each link owns one obvious set of names.
#[derive(Debug)]
pub struct HotplugNic {
    /// The netdev id (`data3`), also the `getfd` name of `fd`. QEMU rejects names that start
    /// with a digit.
    pub id: String,
    /// The guest device's id (`nic3`), which `unplug_nic` and `DEVICE_DELETED` name.
    pub device_id: String,
    /// The device model (`virtio-net-pci`, `e1000`, ...).
    pub driver: String,
    /// The guest MAC address (`02:00:00:00:00:03`).
    pub mac: String,
    /// The MTU the device offers the guest (virtio-net's `host_mtu`); `None` leaves it unset.
    pub host_mtu: Option<u32>,
    /// The tap: a TAP from /dev/net/tun, or a macvtap's /dev/tapN, opened read-write. QEMU
    /// clears O_NONBLOCK on what it receives (`tcp_chr_recv`), and the open file description is
    /// shared, so vial should not keep using this descriptor for non-blocking I/O afterwards.
    pub fd: OwnedFd,
    /// An open /dev/vhost-net, for in-kernel virtio-net (`vhostfd`, with `vhost=on`).
    pub vhost_fd: Option<OwnedFd>,
    /// The bus to plug into. `None` is the root bus, which hot-plugs on `pc` (ACPI PCI hotplug
    /// on `pci.0`); `q35`'s `pcie.0` does not, so there it must name a `pcie-root-port`.
    pub bus: Option<String>,
    /// The slot and function on the bus (`addr`, e.g. `0x5` or `05.0`); `None` takes a free one.
    pub pci_addr: Option<String>,
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
    /// Waiters for `DEVICE_DELETED`, by token: the device id and the sender to complete.
    deletions: HashMap<u64, (String, oneshot::Sender<()>)>,
    next_token: u64,
    closed: bool,
}

impl PendingTable {
    fn new() -> Self {
        let inner = PendingInner { waiting: HashMap::new(), deletions: HashMap::new(), next_token: 0, closed: false };
        PendingTable { inner: Mutex::new(inner) }
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

    /// Registers a waiter for the `DEVICE_DELETED` event of `device`. The reader task completes
    /// it and still forwards the event, so the supervisor's receiver misses nothing.
    fn watch_deletion(&self, device: &str) -> Result<DeletionWatch<'_>, QmpError> {
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
    fn device_deleted(&self, device: &str) {
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
    fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.waiting.clear();
        inner.deletions.clear();
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

/// A registered wait for one device's `DEVICE_DELETED`; dropping it (done, timed out or
/// abandoned) removes the registration.
struct DeletionWatch<'a> {
    pending: &'a PendingTable,
    token: u64,
    receiver: oneshot::Receiver<()>,
}

impl DeletionWatch<'_> {
    /// Waits for the event, up to `timeout`.
    async fn wait(&mut self, timeout: Duration) -> Result<(), QmpError> {
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

/// Reads QEMU's greeting, negotiates capabilities, and starts the tasks that own the stream.
///
/// Returns the command handle and the event receiver. Must be called inside a tokio runtime
/// (it spawns a reader task and a writer task). It waits for QEMU as long as QEMU takes; wrap it
/// in `tokio::time::timeout` to bound that.
///
/// A connection made this way cannot pass descriptors (`getfd` returns
/// `FdPassingUnsupported`), even over a Unix socket: use `connect_unix` for that.
pub async fn connect<S>(stream: S) -> Result<(Qmp, Events), QmpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (read_half, write_half) = tokio::io::split(stream);
    start(read_half, write_half).await
}

/// Like `connect`, over QEMU's QMP Unix socket, keeping the socket so that `getfd` can pass
/// descriptors on it (SCM_RIGHTS, unix(7)).
pub async fn connect_unix(stream: UnixStream) -> Result<(Qmp, Events), QmpError> {
    let (read_half, write_half) = stream.into_split();
    start(read_half, write_half).await
}

/// The writing half of a QMP stream, and the Unix socket under it when there is one: the
/// writer task sends a line that carries descriptors with `sendmsg(2)` on that socket.
trait QmpWriter: AsyncWrite + Unpin + Send + 'static {
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

async fn start<R, W>(read_half: R, mut write_half: W) -> Result<(Qmp, Events), QmpError>
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
        passes_fds,
        fd_command: tokio::sync::Mutex::new(()),
    };
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
        Event::DEVICE_DELETED { data, .. } => VmEvent::DeviceDeleted { device: data.device, path: data.path },
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
        self.execute_with_fds(command, Vec::new()).await
    }

    /// `execute`, with `fds` sent on the same `sendmsg` as the command's line.
    async fn execute_with_fds<C: QmpCommand>(&self, command: C, fds: Vec<OwnedFd>) -> Result<C::Ok, QmpError> {
        let arguments = serde_json::to_value(&command)
            .map_err(|source| QmpError::Encode { command: C::NAME.to_string(), source })?;
        let value = self.request(C::NAME, arguments, fds).await?;
        serde_json::from_value(value).map_err(|source| QmpError::Decode { command: C::NAME.to_string(), source })
    }

    /// Runs command `name` with `arguments` (a JSON object, or `Value::Null` for none) and
    /// returns its `return` value as JSON. For commands the typed API makes awkward.
    pub async fn execute_raw(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
        self.request(name, arguments, Vec::new()).await
    }

    async fn request(&self, name: &str, arguments: Value, fds: Vec<OwnedFd>) -> Result<Value, QmpError> {
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
        debug!(command = name, id, fds = fds.len(), "qmp command");
        self.link.requests.send(Request { line, fds }).map_err(|_| QmpError::Closed)?;
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

    /// Waits until the current migration (outgoing `migrate` or incoming `migrate-incoming`)
    /// completes, polling `query-migrate` every `poll`, and returns its final info (sizes,
    /// times). `failed` or `cancelled` is an error with QEMU's description; a QEMU that exits
    /// instead (an incoming migration that fails to load ends QEMU 7.2) gives `Closed`.
    pub async fn wait_migration(&self, poll: Duration, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.execute_raw("query-migrate", Value::Null).await?;
            let status = info["status"].as_str().unwrap_or("none").to_string();
            match status.as_str() {
                "completed" => return Ok(info),
                "failed" | "cancelled" => {
                    let desc = info["error-desc"].as_str().unwrap_or("no description").to_string();
                    return Err(QmpError::Migration { status, desc });
                }
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::MigrationTimeout { timeout, status })
                }
                _ => tokio::time::sleep(poll).await,
            }
        }
    }

    /// Hands QEMU a duplicate of `fd` under `name` (`getfd`), for a later command on this same
    /// connection to use (`netdev_add ... fd=<name>`); QEMU's table of named descriptors is per
    /// monitor. A name already in the table is replaced (QEMU closes the old descriptor).
    ///
    /// Needs a connection from `connect_unix`; otherwise returns `FdPassingUnsupported` without
    /// sending anything. Do not abandon the future once it is polled: the descriptor may still
    /// reach QEMU after the caller gave up, and collide with the next one (see `fd_command`).
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        if !self.link.passes_fds {
            return Err(QmpError::FdPassingUnsupported { fdname: name.to_string() });
        }
        let duplicate =
            fd.try_clone_to_owned().map_err(|source| QmpError::DuplicateFd { fdname: name.to_string(), source })?;
        let _one_descriptor_in_flight = self.link.fd_command.lock().await;
        self.execute_with_fds(qapi::qmp::getfd { fdname: name.to_string() }, vec![duplicate]).await.map(drop)
    }

    /// Closes a descriptor that `getfd` passed and no command took (`closefd`). Commands that
    /// use a named descriptor take it out of the table, so after a successful `netdev_add` there
    /// is nothing left to close.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute(qapi::qmp::closefd { fdname: name.to_string() }).await.map(drop)
    }

    /// Hot-plugs `nic` into the running VM: `getfd` for the tap (and vhost-net), `netdev_add` of
    /// a tap backend on them, and `device_add` of the guest device. When a step fails, the steps
    /// before it are undone (`netdev_del`, `closefd`), so QEMU is left as it was.
    ///
    /// The machine must accept hot-plug on the chosen bus: `pc` does on its root bus through
    /// ACPI; on `q35`, `nic.bus` must name a free `pcie-root-port` created at launch.
    pub async fn hotplug_nic(&self, nic: &HotplugNic) -> Result<(), QmpError> {
        self.plug_nic(nic)
            .await
            .map_err(|source| QmpError::HotplugNic { device: nic.device_id.clone(), source: Box::new(source) })?;
        info!(device = %nic.device_id, netdev = %nic.id, driver = %nic.driver, mac = %nic.mac, "nic hot-plugged");
        Ok(())
    }

    async fn plug_nic(&self, nic: &HotplugNic) -> Result<(), QmpError> {
        let vhost_name = format!("{}-vhost", nic.id);
        self.getfd(&nic.id, nic.fd.as_fd()).await?;
        if let Some(vhost_fd) = &nic.vhost_fd {
            if let Err(error) = self.getfd(&vhost_name, vhost_fd.as_fd()).await {
                self.undo_getfd(&nic.id).await;
                return Err(error);
            }
        }

        let tap = qapi::qmp::NetdevTapOptions {
            fd: Some(nic.id.clone()),
            vhost: nic.vhost_fd.as_ref().map(|_| true),
            vhostfd: nic.vhost_fd.as_ref().map(|_| vhost_name.clone()),
            ..Default::default()
        };
        let netdev = qapi::qmp::Netdev::tap { id: nic.id.clone(), tap };
        if let Err(error) = self.execute(qapi::qmp::netdev_add(netdev)).await {
            // netdev_add takes each named descriptor out of the table as it parses it
            // (monitor_fd_param), so depending on where it failed, some may be left.
            self.undo_getfd(&nic.id).await;
            if nic.vhost_fd.is_some() {
                self.undo_getfd(&vhost_name).await;
            }
            return Err(error);
        }

        let mut properties = serde_json::Map::new();
        properties.insert("netdev".into(), Value::from(nic.id.as_str()));
        properties.insert("mac".into(), Value::from(nic.mac.as_str()));
        if let Some(mtu) = nic.host_mtu {
            properties.insert("host_mtu".into(), Value::from(mtu));
        }
        if let Some(addr) = &nic.pci_addr {
            properties.insert("addr".into(), Value::from(addr.as_str()));
        }
        let device = qapi::qmp::device_add {
            bus: nic.bus.clone(),
            id: Some(nic.device_id.clone()),
            driver: nic.driver.clone(),
            arguments: properties,
        };
        if let Err(error) = self.execute(device).await {
            match self.execute(qapi::qmp::netdev_del { id: nic.id.clone() }).await {
                Ok(_) => debug!(netdev = %nic.id, "netdev of the failed hot-plug deleted"),
                Err(undo) => warn!(netdev = %nic.id, error = %undo, "deleting the netdev of a failed hot-plug failed"),
            }
            return Err(error);
        }
        Ok(())
    }

    /// Closes a passed descriptor after a failed step. QEMU may already have taken it (then
    /// `closefd` fails with "not found", which is what was wanted); the hot-plug has failed
    /// anyway, so a failure here is logged, not returned.
    async fn undo_getfd(&self, name: &str) {
        match self.closefd(name).await {
            Ok(()) => debug!(fdname = name, "passed descriptor closed after a failed hot-plug"),
            Err(QmpError::Command { desc, .. }) => debug!(fdname = name, %desc, "passed descriptor already taken"),
            Err(error) => warn!(fdname = name, %error, "closing a passed descriptor after a failed hot-plug failed"),
        }
    }

    /// Removes a NIC that `hotplug_nic` added: `device_del`, a wait of up to `timeout` for the
    /// device's `DEVICE_DELETED`, then `netdev_del`. The event still reaches `Events`.
    ///
    /// PCI unplug needs the guest: QEMU asks it to eject the device (ACPI on `pc`, and on `q35`
    /// too since QEMU 6.1) and deletes the device only when it does, or at the next system
    /// reset. A guest that never does (no OS yet, `-S`, no ACPI hot-plug support) gives
    /// `DeviceDeletedTimeout`; the request stays pending in QEMU and the netdev stays in place,
    /// since the device may still use it.
    ///
    /// Calling it again is safe: a device already being unplugged is waited for again, and a
    /// device or netdev that no longer exists counts as removed.
    pub async fn unplug_nic(&self, device_id: &str, netdev_id: &str, timeout: Duration) -> Result<(), QmpError> {
        self.unplug_steps(device_id, netdev_id, timeout)
            .await
            .map_err(|source| QmpError::UnplugNic { device: device_id.to_string(), source: Box::new(source) })?;
        info!(device = device_id, netdev = netdev_id, "nic unplugged");
        Ok(())
    }

    async fn unplug_steps(&self, device_id: &str, netdev_id: &str, timeout: Duration) -> Result<(), QmpError> {
        // Watch before asking: where no guest is involved QEMU deletes the device, and sends the
        // event, before it replies to device_del (tests/qtest/device-plug-test.c).
        let mut watch = self.link.pending.watch_deletion(device_id)?;
        let gone = match self.execute(qapi::qmp::device_del { id: device_id.to_string() }).await {
            Ok(_) => false,
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
                debug!(device = device_id, "device already gone");
                true
            }
            // QEMU 7.1+ refuses a second device_del while the first is pending
            // (qmp_device_del, softmmu/qdev-monitor.c); waiting for the first is what we want.
            Err(QmpError::Command { desc, .. }) if desc.contains("already in the process of unplug") => {
                debug!(device = device_id, "device unplug already pending; waiting for it");
                false
            }
            Err(error) => return Err(error),
        };
        if !gone {
            watch.wait(timeout).await?;
        }
        drop(watch);
        match self.execute(qapi::qmp::netdev_del { id: netdev_id.to_string() }).await {
            Ok(_) => Ok(()),
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
                debug!(netdev = netdev_id, "netdev already gone");
                Ok(())
            }
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
        // As QEMU 7.2 sends them for a virtio-net-pci NIC: its backend first, then the device.
        peer.event("DEVICE_DELETED", Some(json!({"path": "/machine/peripheral/nic3/virtio-backend"}))).await;
        peer.event("DEVICE_DELETED", Some(json!({"device": "nic3", "path": "/machine/peripheral/nic3"}))).await;

        let expected = [
            VmEvent::Shutdown { guest: true, reason: "guest-shutdown".into() },
            VmEvent::Powerdown,
            VmEvent::Reset { guest: false },
            VmEvent::Stop,
            VmEvent::Resume,
            VmEvent::GuestPanicked,
            VmEvent::Other { name: "RTC_CHANGE".into() },
            VmEvent::DeviceDeleted { device: None, path: "/machine/peripheral/nic3/virtio-backend".into() },
            VmEvent::DeviceDeleted { device: Some("nic3".into()), path: "/machine/peripheral/nic3".into() },
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
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let (client, _server) = tokio::io::duplex(1024);
        runtime.block_on(async {
            let qmp = Qmp {
                link: Arc::new(Link {
                    requests: mpsc::unbounded_channel().0,
                    pending: Arc::new(PendingTable::new()),
                    next_id: AtomicU64::new(1),
                    passes_fds: false,
                    fd_command: tokio::sync::Mutex::new(()),
                }),
            };
            let nic = test_nic("data3", "nic3", temp_file("sendable").1, None);
            let (unix, _peer) = UnixStream::pair().unwrap();
            // Never polled: only their types are checked.
            sendable(&connect(client));
            sendable(&connect_unix(unix));
            sendable(&qmp.execute(qapi::qmp::stop {}));
            sendable(&qmp.execute_raw("stop", Value::Null));
            sendable(&qmp.query_status());
            sendable(&qmp.quit());
            sendable(&qmp.getfd("data3", nic.fd.as_fd()));
            sendable(&qmp.closefd("data3"));
            sendable(&qmp.hotplug_nic(&nic));
            sendable(&qmp.unplug_nic("nic3", "data3", PATIENCE));
        });
    }

    #[test]
    fn run_state_follows_events() {
        use RunState::*;
        let shutdown = VmEvent::Shutdown { guest: true, reason: "guest-shutdown".into() };
        let reset = VmEvent::Reset { guest: true };
        let other = VmEvent::Other { name: "RTC_CHANGE".into() };
        let deleted = VmEvent::DeviceDeleted { device: Some("nic3".into()), path: "/machine/peripheral/nic3".into() };
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
            (Paused, &deleted, Paused),
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
            QmpError::FdPassingUnsupported { fdname: "data3".into() },
            QmpError::DuplicateFd { fdname: "data3".into(), source: std::io::Error::other("x") },
            QmpError::DeviceDeletedTimeout { timeout: Duration::from_secs(1) },
            QmpError::HotplugNic { device: "nic3".into(), source: Box::new(QmpError::Closed) },
            QmpError::UnplugNic { device: "nic3".into(), source: Box::new(QmpError::Closed) },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.starts_with(|c: char| c.is_lowercase()), "{message}");
            assert!(!message.ends_with('.'), "{message}");
        }
    }

    /// A temporary file, removed when the test ends however it ends.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        /// The file's device and inode numbers.
        fn identity(&self) -> (u64, u64) {
            use std::os::unix::fs::MetadataExt as _;
            let metadata = std::fs::metadata(&self.0).unwrap();
            (metadata.dev(), metadata.ino())
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A new temporary file and a descriptor open on it.
    fn temp_file(tag: &str) -> (TempFile, OwnedFd) {
        let path = std::env::temp_dir().join(format!("vial-qmp-{}-{tag}.tmp", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        (TempFile(path), OwnedFd::from(file))
    }

    /// The device and inode numbers of the file a received descriptor refers to, read through
    /// /proc/self/fd so that the test needs no `unsafe` to borrow a raw descriptor.
    fn identity_of(fd: RawFd) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap();
        (metadata.dev(), metadata.ino())
    }

    fn close_all(fds: Vec<RawFd>) {
        for fd in fds {
            nix::unistd::close(fd).unwrap();
        }
    }

    fn test_nic(id: &str, device_id: &str, fd: OwnedFd, vhost_fd: Option<OwnedFd>) -> HotplugNic {
        HotplugNic {
            id: id.into(),
            device_id: device_id.into(),
            driver: "virtio-net-pci".into(),
            mac: "02:00:00:00:00:03".into(),
            host_mtu: Some(9000),
            fd,
            vhost_fd,
            bus: None,
            pci_addr: None,
        }
    }

    /// The scripted QEMU side of a Unix socket pair, which also receives descriptors.
    ///
    /// A descriptor is matched to the line that holds the last byte of the read that brought
    /// it: Linux ends a read on a stream socket with the segment that carried descriptors
    /// (`unix_stream_read_generic`), and the client sends such a line with one `sendmsg`.
    struct UnixPeer {
        socket: UnixStream,
        /// Bytes read and not yet returned as lines.
        buffer: Vec<u8>,
        /// The stream position of `buffer[0]`.
        position: usize,
        /// Descriptors received, each with the stream position just past the read that brought it.
        fds: Vec<(usize, RawFd)>,
    }

    impl UnixPeer {
        fn new(socket: UnixStream) -> Self {
            UnixPeer { socket, buffer: Vec::new(), position: 0, fds: Vec::new() }
        }

        /// One `recvmsg`; false at end of stream.
        async fn receive(&mut self) -> bool {
            use nix::sys::socket::{recvmsg, ControlMessageOwned};
            let mut chunk = vec![0_u8; 64 * 1024];
            let (read, fds) = loop {
                self.socket.readable().await.unwrap();
                let socket = &self.socket;
                let attempt = socket.try_io(Interest::READABLE, || {
                    let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
                    let mut space = nix::cmsg_space!([RawFd; 4]);
                    let flags = MsgFlags::MSG_CMSG_CLOEXEC;
                    let message = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut space), flags)
                        .map_err(std::io::Error::from)?;
                    let mut fds = Vec::new();
                    for message in message.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(received) = message {
                            fds.extend(received);
                        }
                    }
                    Ok((message.bytes, fds))
                });
                match attempt {
                    Ok(received) => break received,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => panic!("recvmsg failed: {error}"),
                }
            };
            self.buffer.extend_from_slice(&chunk[..read]);
            let end = self.position + self.buffer.len();
            self.fds.extend(fds.into_iter().map(|fd| (end, fd)));
            read > 0
        }

        /// The next request line and the descriptors that came with it.
        async fn request_with_fds(&mut self) -> (Value, Vec<RawFd>) {
            loop {
                if let Some(newline) = self.buffer.iter().position(|&byte| byte == b'\n') {
                    let line: Vec<u8> = self.buffer.drain(..=newline).collect();
                    self.position += line.len();
                    let end = self.position;
                    let (mine, later): (Vec<_>, Vec<_>) = self.fds.drain(..).partition(|(at, _)| *at <= end);
                    self.fds = later;
                    let request = serde_json::from_slice(&line).unwrap_or_else(|error| {
                        let start: String = String::from_utf8_lossy(&line).chars().take(200).collect();
                        panic!("request is not json ({error}), lines interleaved? {start:?}")
                    });
                    return (request, mine.into_iter().map(|(_, fd)| fd).collect());
                }
                assert!(self.receive().await, "client closed the socket");
            }
        }

        /// The next request, which must carry no descriptor.
        async fn request(&mut self) -> Value {
            let (request, fds) = self.request_with_fds().await;
            assert!(fds.is_empty(), "descriptors came with {}", request["execute"]);
            request
        }

        async fn send(&mut self, line: &str) {
            self.socket.write_all(line.as_bytes()).await.unwrap();
            self.socket.write_all(b"\n").await.unwrap();
        }

        async fn send_json(&mut self, message: Value) {
            self.send(&message.to_string()).await;
        }

        /// Reads a request, checks its name, answers it with `reply` plus the request's id.
        async fn answer(&mut self, name: &str, mut reply: Value) -> Value {
            let request = self.request().await;
            assert_eq!(request["execute"], name, "request {request}");
            reply["id"] = request["id"].clone();
            self.send_json(reply).await;
            request
        }

        /// Reads a `getfd` for `name` with one descriptor, checks that it refers to `file`, and
        /// answers it.
        async fn answer_getfd(&mut self, name: &str, file: &TempFile) {
            let (request, fds) = self.request_with_fds().await;
            assert_eq!(request["execute"], "getfd", "request {request}");
            assert_eq!(request["arguments"], json!({"fdname": name}));
            assert_eq!(fds.len(), 1, "descriptors with {request}");
            assert_eq!(identity_of(fds[0]), file.identity(), "the descriptor for {name} is another file");
            close_all(fds);
            self.send_json(json!({"return": {}, "id": request["id"]})).await;
        }
    }

    /// A `connect_unix` client on `client`, negotiated by a scripted peer on `server`.
    async fn connected_unix_over(client: UnixStream, server: UnixStream) -> (Qmp, Events, UnixPeer) {
        let peer = async move {
            let mut peer = UnixPeer::new(server);
            peer.send(GREETING).await;
            let request = peer.request().await;
            assert_eq!(request, json!({"execute": "qmp_capabilities"}));
            peer.send(r#"{"return": {}}"#).await;
            peer
        };
        let (connection, peer) = tokio::join!(connect_unix(client), peer);
        let (qmp, events) = connection.unwrap();
        (qmp, events, peer)
    }

    async fn connected_unix() -> (Qmp, Events, UnixPeer) {
        let (client, server) = UnixStream::pair().unwrap();
        connected_unix_over(client, server).await
    }

    /// Whether a `DEVICE_DELETED` waiter for `device` is registered.
    fn watching(qmp: &Qmp, device: &str) -> bool {
        qmp.link.pending.lock().deletions.values().any(|(watched, _)| watched == device)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn getfd_sends_the_descriptor_with_its_line() {
        let (qmp, _events, mut peer) = connected_unix().await;
        let (file, fd) = temp_file("getfd");
        let (result, ()) = tokio::join!(qmp.getfd("data3", fd.as_fd()), peer.answer_getfd("data3", &file));
        result.unwrap();

        // QEMU's error (no descriptor arrived, a name starting with a digit) reaches the caller.
        let reply = json!({"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}});
        let peer_side = async {
            let (request, fds) = peer.request_with_fds().await;
            close_all(fds);
            peer.send_json(json!({"error": reply["error"], "id": request["id"]})).await;
        };
        let (result, ()) = tokio::join!(qmp.getfd("data4", fd.as_fd()), peer_side);
        assert!(matches!(&result, Err(QmpError::Command { command, .. }) if command == "getfd"), "{result:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn descriptor_lines_do_not_interleave_with_other_commands() {
        let (qmp, _events, mut peer) = connected_unix().await;
        let (file_a, fd_a) = temp_file("interleave-a");
        let (file_b, fd_b) = temp_file("interleave-b");
        // Lines larger than the socket buffer, so each takes the writer many writes.
        let padding = "x".repeat(512 * 1024);
        let tasks: Vec<_> = (0..4)
            .map(|n| {
                let qmp = qmp.clone();
                let arguments = json!({"padding": padding});
                tokio::spawn(async move { qmp.execute_raw(&format!("query-{n}"), arguments).await })
            })
            .collect();
        let getfds = async {
            let (a, b) = tokio::join!(qmp.getfd("fd-a", fd_a.as_fd()), qmp.getfd("fd-b", fd_b.as_fd()));
            a.unwrap();
            b.unwrap();
        };
        let peer_side = async {
            let mut getfds = Vec::new();
            for _ in 0..6 {
                // Interleaved lines would not parse.
                let (request, fds) = peer.request_with_fds().await;
                if request["execute"] == "getfd" {
                    let name = request["arguments"]["fdname"].as_str().unwrap().to_string();
                    let file = if name == "fd-a" { &file_a } else { &file_b };
                    assert_eq!(fds.len(), 1, "descriptors with getfd {name}");
                    assert_eq!(identity_of(fds[0]), file.identity(), "the descriptor for {name} is another file");
                    getfds.push(name);
                } else {
                    assert!(fds.is_empty(), "descriptors came with {}", request["execute"]);
                    assert_eq!(request["arguments"]["padding"].as_str().map(str::len), Some(padding.len()));
                }
                close_all(fds);
                peer.send_json(json!({"return": {}, "id": request["id"]})).await;
            }
            getfds.sort();
            assert_eq!(getfds, ["fd-a", "fd-b"]);
        };
        tokio::join!(getfds, peer_side);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn getfd_waits_for_room_without_spinning() {
        let logs = Captured::default();
        let _logging = logs.install();
        let (client, server) = UnixStream::pair().unwrap();
        // A second descriptor for the client's socket, to fill it behind tokio's back: tokio still
        // believes the socket writable, so the writer's first sendmsg meets EAGAIN.
        let filler = client.as_fd().try_clone_to_owned().unwrap();
        let (qmp, _events, mut peer) = connected_unix_over(client, server).await;
        let spaces = [b' '; 4096];
        loop {
            match nix::sys::socket::send(filler.as_raw_fd(), &spaces, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(error) => panic!("filling the socket failed: {error}"),
            }
        }
        let (file, fd) = temp_file("full");
        let waits = || logs.lines().iter().filter(|line| line.contains("qmp socket full")).count();
        let peer_side = async {
            let start = std::time::Instant::now();
            while waits() == 0 {
                assert!(start.elapsed() < PATIENCE, "the writer never met the full socket");
                tokio::task::yield_now().await;
            }
            // A writer that retried without waiting for room would log again on every turn.
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(waits(), 1, "the writer retried sendmsg without waiting for the socket to drain");
            // The filler is blank space before the getfd line, which JSON allows.
            peer.answer_getfd("data3", &file).await;
        };
        let (result, ()) = tokio::join!(qmp.getfd("data3", fd.as_fd()), peer_side);
        result.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn getfd_over_a_plain_stream_is_refused_before_sending() {
        let (qmp, _events, mut peer) = connected().await;
        let (_file, fd) = temp_file("plain");
        let error = qmp.getfd("data3", fd.as_fd()).await.unwrap_err();
        assert!(matches!(&error, QmpError::FdPassingUnsupported { fdname } if fdname == "data3"), "{error:?}");
        assert_eq!(
            error.to_string(),
            "cannot pass file descriptor data3: the qmp connection was not made with connect_unix"
        );
        let nic = test_nic("data3", "nic3", fd, None);
        let error = qmp.hotplug_nic(&nic).await.unwrap_err();
        assert!(
            matches!(&error, QmpError::HotplugNic { source, .. } if matches!(**source, QmpError::FdPassingUnsupported { .. })),
            "{error:?}"
        );
        // Nothing was sent: the next request the peer sees is the next command.
        let (result, _) =
            tokio::join!(qmp.execute_raw("query-name", Value::Null), peer.answer("query-name", json!({"return": {}})));
        result.unwrap();

        // A Unix socket through the generic `connect` cannot pass descriptors either.
        let (client, server) = UnixStream::pair().unwrap();
        let peer_side = async move {
            let mut peer = UnixPeer::new(server);
            peer.send(GREETING).await;
            peer.answer("qmp_capabilities", json!({"return": {}})).await;
            peer
        };
        let (connection, _peer) = tokio::join!(connect(client), peer_side);
        let (qmp, _events) = connection.unwrap();
        let error = qmp.getfd("data3", nic.fd.as_fd()).await.unwrap_err();
        assert!(matches!(error, QmpError::FdPassingUnsupported { .. }), "{error:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hotplug_nic_passes_descriptors_then_adds_netdev_and_device() {
        let (qmp, _events, mut peer) = connected_unix().await;
        let (tap_file, tap) = temp_file("hotplug-tap");
        let (vhost_file, vhost) = temp_file("hotplug-vhost");
        let mut nic = test_nic("data3", "nic3", tap, Some(vhost));
        nic.bus = Some("rp1".into());
        nic.pci_addr = Some("0x5".into());
        let ok = json!({"return": {}});
        let peer_side = async {
            peer.answer_getfd("data3", &tap_file).await;
            peer.answer_getfd("data3-vhost", &vhost_file).await;
            let request = peer.answer("netdev_add", ok.clone()).await;
            let netdev = json!({"type": "tap", "id": "data3", "fd": "data3", "vhost": true, "vhostfd": "data3-vhost"});
            assert_eq!(request["arguments"], netdev);
            let request = peer.answer("device_add", ok.clone()).await;
            let device = json!({
                "driver": "virtio-net-pci", "id": "nic3", "bus": "rp1", "addr": "0x5",
                "netdev": "data3", "mac": "02:00:00:00:00:03", "host_mtu": 9000
            });
            assert_eq!(request["arguments"], device);
        };
        let (result, ()) = tokio::join!(qmp.hotplug_nic(&nic), peer_side);
        result.unwrap();

        // Without vhost, bus, slot or MTU, none of them is sent.
        let (tap_file, tap) = temp_file("hotplug-plain");
        let mut nic = test_nic("data4", "nic4", tap, None);
        nic.host_mtu = None;
        let peer_side = async {
            peer.answer_getfd("data4", &tap_file).await;
            let request = peer.answer("netdev_add", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"type": "tap", "id": "data4", "fd": "data4"}));
            let request = peer.answer("device_add", ok.clone()).await;
            let device =
                json!({"driver": "virtio-net-pci", "id": "nic4", "netdev": "data4", "mac": "02:00:00:00:00:03"});
            assert_eq!(request["arguments"], device);
        };
        let (result, ()) = tokio::join!(qmp.hotplug_nic(&nic), peer_side);
        result.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hotplug_nic_undoes_its_steps_when_one_fails() {
        let (qmp, _events, mut peer) = connected_unix().await;
        let ok = json!({"return": {}});
        let failed = |desc: &str| json!({"error": {"class": "GenericError", "desc": desc}});
        let failed_step = |result: Result<(), QmpError>, step: &str| match result {
            Err(QmpError::HotplugNic { device, source }) => {
                assert_eq!(device, "nic3");
                assert!(matches!(&*source, QmpError::Command { command, .. } if command == step), "{source:?}");
            }
            other => panic!("expected a failed {step}, got {other:?}"),
        };

        // device_add fails: the netdev goes (and with it the tap, which it had taken).
        let (tap_file, tap) = temp_file("undo-device");
        let nic = test_nic("data3", "nic3", tap, None);
        let peer_side = async {
            peer.answer_getfd("data3", &tap_file).await;
            peer.answer("netdev_add", ok.clone()).await;
            peer.answer("device_add", failed("Bus 'pcie.0' does not support hotplugging")).await;
            let request = peer.answer("netdev_del", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"id": "data3"}));
        };
        let (result, ()) = tokio::join!(qmp.hotplug_nic(&nic), peer_side);
        failed_step(result, "device_add");

        // netdev_add fails: both named descriptors are closed; one already taken is fine.
        let (tap_file, tap) = temp_file("undo-netdev-tap");
        let (vhost_file, vhost) = temp_file("undo-netdev-vhost");
        let nic = test_nic("data3", "nic3", tap, Some(vhost));
        let peer_side = async {
            peer.answer_getfd("data3", &tap_file).await;
            peer.answer_getfd("data3-vhost", &vhost_file).await;
            peer.answer("netdev_add", failed("Duplicate ID 'data3' for netdev")).await;
            let request = peer.answer("closefd", failed("File descriptor named 'data3' not found")).await;
            assert_eq!(request["arguments"], json!({"fdname": "data3"}));
            let request = peer.answer("closefd", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"fdname": "data3-vhost"}));
        };
        let (result, ()) = tokio::join!(qmp.hotplug_nic(&nic), peer_side);
        failed_step(result, "netdev_add");

        // The second getfd fails: the first descriptor is closed.
        let (tap_file, tap) = temp_file("undo-getfd-tap");
        let (_vhost_file, vhost) = temp_file("undo-getfd-vhost");
        let nic = test_nic("data3", "nic3", tap, Some(vhost));
        let peer_side = async {
            peer.answer_getfd("data3", &tap_file).await;
            let (request, fds) = peer.request_with_fds().await;
            close_all(fds);
            let reply = failed("No file descriptor supplied via SCM_RIGHTS");
            peer.send_json(json!({"error": reply["error"], "id": request["id"]})).await;
            let request = peer.answer("closefd", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"fdname": "data3"}));
        };
        let (result, ()) = tokio::join!(qmp.hotplug_nic(&nic), peer_side);
        failed_step(result, "getfd");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unplug_waits_for_its_device_deleted_then_deletes_the_netdev() {
        let (qmp, mut events, mut peer) = connected().await;
        let ok = json!({"return": {}});
        let peer_side = async {
            let request = peer.answer("device_del", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"id": "nic3"}));
            // The backend's event and another device's do not end the wait.
            peer.event("DEVICE_DELETED", Some(json!({"path": "/machine/peripheral/nic3/virtio-backend"}))).await;
            peer.event("DEVICE_DELETED", Some(json!({"device": "nic9", "path": "/machine/peripheral/nic9"}))).await;
            for _ in 0..2 {
                assert!(matches!(next_event(&mut events).await, Some(VmEvent::DeviceDeleted { .. })));
            }
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert!(watching(&qmp, "nic3"));
            assert!(qmp.link.pending.lock().waiting.is_empty(), "netdev_del sent before the device was deleted");
            peer.event("DEVICE_DELETED", Some(json!({"device": "nic3", "path": "/machine/peripheral/nic3"}))).await;
            let request = peer.answer("netdev_del", ok.clone()).await;
            assert_eq!(request["arguments"], json!({"id": "data3"}));
        };
        let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer_side);
        result.unwrap();
        // The supervisor's receiver still gets the event.
        let deleted = VmEvent::DeviceDeleted { device: Some("nic3".into()), path: "/machine/peripheral/nic3".into() };
        assert_eq!(next_event(&mut events).await, Some(deleted));
        assert!(!watching(&qmp, "nic3"));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unplug_sees_an_event_that_comes_before_the_reply() {
        let (qmp, _events, mut peer) = connected().await;
        let peer_side = async {
            let request = peer.request().await;
            assert_eq!(request["execute"], "device_del");
            peer.event("DEVICE_DELETED", Some(json!({"device": "nic3", "path": "/machine/peripheral/nic3"}))).await;
            peer.send_json(json!({"return": {}, "id": request["id"]})).await;
            peer.answer("netdev_del", json!({"return": {}})).await;
        };
        let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer_side);
        result.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unplug_times_out_and_keeps_the_netdev() {
        let (qmp, _events, mut peer) = connected().await;
        let timeout = Duration::from_millis(20);
        let (result, _) =
            tokio::join!(qmp.unplug_nic("nic3", "data3", timeout), peer.answer("device_del", json!({"return": {}})));
        match result {
            Err(QmpError::UnplugNic { device, source }) => {
                assert_eq!(device, "nic3");
                assert!(matches!(*source, QmpError::DeviceDeletedTimeout { timeout: waited } if waited == timeout));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(!watching(&qmp, "nic3"));
        // No netdev_del was sent: the next request is the next command.
        let reply = json!({"return": {"status": "paused", "running": false}});
        let (status, _) = tokio::join!(qmp.query_status(), peer.answer("query-status", reply));
        status.unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unplug_again_waits_for_a_pending_unplug_or_finds_nothing_to_do() {
        let (qmp, _events, mut peer) = connected().await;
        let ok = json!({"return": {}});
        // QEMU 7.2's answer while an earlier device_del is pending.
        let pending =
            json!({"error": {"class": "GenericError", "desc": "Device nic3 is already in the process of unplug"}});
        let peer_side = async {
            peer.answer("device_del", pending).await;
            peer.event("DEVICE_DELETED", Some(json!({"device": "nic3", "path": "/machine/peripheral/nic3"}))).await;
            peer.answer("netdev_del", ok.clone()).await;
        };
        let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer_side);
        result.unwrap();

        let gone =
            |what: &str| json!({"error": {"class": "DeviceNotFound", "desc": format!("Device '{what}' not found")}});
        let peer_side = async {
            peer.answer("device_del", gone("nic3")).await;
            peer.answer("netdev_del", gone("data3")).await;
        };
        let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer_side);
        result.unwrap();

        // Any other refusal is an error, and the netdev is left alone.
        let refused = json!({"error": {"class": "GenericError", "desc": "Bus 'pci.0' does not support hotplugging"}});
        let (result, _) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer.answer("device_del", refused));
        assert!(
            matches!(&result, Err(QmpError::UnplugNic { source, .. }) if matches!(&**source, QmpError::Command { command, .. } if command == "device_del")),
            "{result:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unplug_fails_when_qemu_goes_away_while_waiting() {
        let (qmp, _events, mut peer) = connected().await;
        let peer_side = async move {
            peer.answer("device_del", json!({"return": {}})).await;
            drop(peer);
        };
        let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), peer_side);
        assert!(
            matches!(&result, Err(QmpError::UnplugNic { source, .. }) if matches!(**source, QmpError::Closed)),
            "{result:?}"
        );
        assert!(!watching(&qmp, "nic3"));
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
            let qemu = spawn_qemu(tag, args).await;
            let stream = connect_when_listening(&qemu.socket).await;
            let (qmp, events) =
                tokio::time::timeout(PATIENCE, connect(stream)).await.expect("qmp negotiation timed out").unwrap();
            (qemu, qmp, events)
        }

        /// `start_qemu`, connected with `connect_unix` so that descriptors can be passed.
        async fn start_qemu_unix(tag: &str, args: &[&str]) -> (Qemu, Qmp, Events) {
            let qemu = spawn_qemu(tag, args).await;
            let stream = connect_when_listening(&qemu.socket).await;
            let (qmp, events) =
                tokio::time::timeout(PATIENCE, connect_unix(stream)).await.expect("qmp negotiation timed out").unwrap();
            (qemu, qmp, events)
        }

        /// Starts QEMU with a QMP socket and waits until the socket exists.
        /// QEMU binds its socket before it listens on it: the file can exist while a connect
        /// is still refused, so refusals are retried until PATIENCE runs out.
        async fn connect_when_listening(path: &Path) -> tokio::net::UnixStream {
            let start = std::time::Instant::now();
            loop {
                match tokio::net::UnixStream::connect(path).await {
                    Ok(stream) => return stream,
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused && start.elapsed() < PATIENCE => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(err) => panic!("cannot connect to {}: {err}", path.display()),
                }
            }
        }

        async fn spawn_qemu(tag: &str, args: &[&str]) -> Qemu {
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
            qemu
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

        /// Runs `test` on a thread of its own in a new network namespace, on a current-thread
        /// runtime, so the taps it creates touch no host interface. The namespace goes away with
        /// the thread and the QEMU it started. unshare(2) moves only the calling thread.
        fn in_new_network_namespace<F, T>(test: F)
        where
            F: FnOnce() -> T + Send + 'static,
            T: std::future::Future<Output = ()>,
        {
            let thread = std::thread::spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("unshare(CLONE_NEWNET) failed: these tests need root (CAP_SYS_ADMIN)");
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(test());
            });
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }

        /// `struct ifreq` (linux/if.h) as TUNSETIFF reads it: the name, then a 24-byte union
        /// whose `ifr_flags` comes first.
        #[repr(C)]
        struct InterfaceRequest {
            name: [u8; 16],
            flags: nix::libc::c_short,
            rest_of_union: [u8; 22],
        }

        // TUNSETIFF = _IOW('T', 202, int) (linux/if_tun.h); the int is historical, it takes an ifreq.
        nix::ioctl_write_ptr_bad!(
            tun_set_iff,
            nix::request_code_write!(b'T', 202, std::mem::size_of::<nix::libc::c_int>()),
            InterfaceRequest
        );

        /// Creates TAP `name` (IFF_TAP | IFF_NO_PI, as QEMU's own tap code asks) in the current
        /// network namespace and returns its descriptor; the interface lives while one is open.
        /// Test-only: vial's own tap opening belongs to `net` and `sys`.
        fn open_tap(name: &str) -> OwnedFd {
            use nix::libc::{c_short, IFF_NO_PI, IFF_TAP};
            assert!(name.len() < 16, "interface names have at most 15 bytes: {name}");
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap_or_else(|error| panic!("cannot open /dev/net/tun (these tests need it): {error}"));
            let mut request =
                InterfaceRequest { name: [0; 16], flags: (IFF_TAP | IFF_NO_PI) as c_short, rest_of_union: [0; 22] };
            request.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes on Linux), which InterfaceRequest
            // lays out field for field and in size; `request` and `tun` outlive the call.
            unsafe { tun_set_iff(tun.as_raw_fd(), &request) }
                .unwrap_or_else(|error| panic!("TUNSETIFF {name} failed (needs CAP_NET_ADMIN): {error}"));
            OwnedFd::from(tun)
        }

        fn interface_exists(name: &str) -> bool {
            nix::net::if_::if_nametoindex(name).is_ok()
        }

        /// The ids of every PCI device QEMU reports, behind bridges and root ports too.
        async fn pci_device_ids(qmp: &Qmp) -> Vec<String> {
            fn collect(devices: &Value, ids: &mut Vec<String>) {
                for device in devices.as_array().into_iter().flatten() {
                    if let Some(id) = device["qdev_id"].as_str().filter(|id| !id.is_empty()) {
                        ids.push(id.to_string());
                    }
                    collect(&device["pci_bridge"]["devices"], ids);
                }
            }
            let buses = qmp.execute_raw("query-pci", Value::Null).await.unwrap();
            let mut ids = Vec::new();
            for bus in buses.as_array().unwrap() {
                collect(&bus["devices"], &mut ids);
            }
            ids
        }

        /// The ids of the devices created with an id (`-device`, `device_add`), from QOM's
        /// `/machine/peripheral`. Unlike `query-pci`, it sees devices behind a root port whose
        /// secondary bus no firmware has numbered yet (`-S`).
        async fn peripheral_ids(qmp: &Qmp) -> Vec<String> {
            let children = qmp.execute_raw("qom-list", json!({"path": "/machine/peripheral"})).await.unwrap();
            children
                .as_array()
                .unwrap()
                .iter()
                .filter(|child| child["type"].as_str().is_some_and(|kind| kind.starts_with("child<")))
                .filter_map(|child| child["name"].as_str().map(str::to_string))
                .collect()
        }

        /// The netdevs QEMU has, from `info network` (QEMU 7.2 has no `query-netdev`); each is a
        /// line `<id>: index=...,type=tap,...`, indented under the NIC it is peered with.
        async fn netdev_ids(qmp: &Qmp) -> Vec<String> {
            let arguments = json!({"command-line": "info network"});
            let text = qmp.execute_raw("human-monitor-command", arguments).await.unwrap();
            text.as_str()
                .unwrap()
                .lines()
                .filter(|line| line.contains("type=tap"))
                .filter_map(|line| line.trim_start_matches([' ', '\\']).split(':').next())
                .map(str::to_string)
                .collect()
        }

        fn tap_nic(id: &str, device_id: &str, tap: &str, bus: Option<&str>) -> HotplugNic {
            let mut nic = test_nic(id, device_id, open_tap(tap), None);
            nic.bus = bus.map(str::to_string);
            nic
        }

        /// Unplugs `nic3`/`data3` from a VM started with `-S`, whose guest never runs: QEMU asks
        /// the guest to eject the device (ACPI) and keeps it until the guest does, so the first
        /// `unplug_nic` times out and leaves everything in place. A system reset completes the
        /// pending unplug (QEMU's tests/qtest/device-plug-test.c relies on that), and a second
        /// `unplug_nic`, which waits for the unplug already pending, then deletes the netdev.
        async fn unplug_through_a_reset(qmp: &Qmp, events: &mut Events, tap: &str) {
            let error = qmp.unplug_nic("nic3", "data3", Duration::from_millis(500)).await.unwrap_err();
            assert!(
                matches!(&error, QmpError::UnplugNic { source, .. } if matches!(**source, QmpError::DeviceDeletedTimeout { .. })),
                "{error:?}"
            );
            assert!(peripheral_ids(qmp).await.contains(&"nic3".to_string()));
            assert_eq!(netdev_ids(qmp).await, ["data3"]);
            assert!(interface_exists(tap));

            let reset = async {
                // unplug_nic registers its waiter and queues device_del in one step, and the
                // writer keeps order, so QEMU sees the reset after that device_del.
                let start = std::time::Instant::now();
                while !watching(qmp, "nic3") {
                    assert!(start.elapsed() < PATIENCE, "unplug_nic never started waiting");
                    tokio::task::yield_now().await;
                }
                qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
            };
            let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), reset);
            result.unwrap();

            // The supervisor's receiver saw the reset and both deletions, the backend's first.
            let mut deleted = Vec::new();
            while deleted.len() < 2 {
                match next_event(events).await.expect("the connection closed") {
                    VmEvent::DeviceDeleted { device, path } => deleted.push((device, path)),
                    VmEvent::Reset { guest: false } => {}
                    other => panic!("unexpected event {other:?}"),
                }
            }
            let backend = (None, "/machine/peripheral/nic3/virtio-backend".to_string());
            let device = (Some("nic3".to_string()), "/machine/peripheral/nic3".to_string());
            assert_eq!(deleted, [backend, device]);

            assert!(!peripheral_ids(qmp).await.contains(&"nic3".to_string()));
            assert!(!pci_device_ids(qmp).await.contains(&"nic3".to_string()));
            assert!(netdev_ids(qmp).await.is_empty());
            // netdev_del closed QEMU's descriptor, the last one, so the TAP went away.
            wait_until("the tap to go", || !interface_exists(tap)).await;
            // Unplugging again finds nothing to do.
            qmp.unplug_nic("nic3", "data3", PATIENCE).await.unwrap();
        }

        #[test]
        fn hotplug_and_unplug_a_tap_nic_on_pc() {
            in_new_network_namespace(|| async {
                let (mut qemu, qmp, mut events) =
                    start_qemu_unix("hotplug-pc", &["-machine", "pc", "-m", "16", "-S"]).await;
                let tap = format!("vqt{}", std::process::id());

                // A device model QEMU does not have: the netdev is deleted again, which closes
                // the tap QEMU had taken.
                let mut bad = tap_nic("data3", "nic3", &tap, None);
                bad.driver = "vial-no-such-nic".into();
                let error = qmp.hotplug_nic(&bad).await.unwrap_err();
                assert!(
                    matches!(&error, QmpError::HotplugNic { source, .. } if matches!(&**source, QmpError::Command { command, .. } if command == "device_add")),
                    "{error:?}"
                );
                drop(bad);
                assert!(netdev_ids(&qmp).await.is_empty());
                wait_until("the tap of the failed hot-plug to go", || !interface_exists(&tap)).await;

                let nic = tap_nic("data3", "nic3", &tap, None);
                qmp.hotplug_nic(&nic).await.unwrap();
                // QEMU holds its own descriptor: the TAP outlives vial's.
                drop(nic);
                assert!(interface_exists(&tap));
                assert!(pci_device_ids(&qmp).await.contains(&"nic3".to_string()));
                assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
                assert_eq!(netdev_ids(&qmp).await, ["data3"]);

                unplug_through_a_reset(&qmp, &mut events, &tap).await;
                qmp.quit().await.unwrap();
                assert!(wait_exit(&mut qemu).await.success());
            });
        }

        #[test]
        fn q35_hotplugs_only_behind_a_root_port() {
            in_new_network_namespace(|| async {
                let args = ["-machine", "q35", "-S", "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"];
                let (mut qemu, qmp, mut events) = start_qemu_unix("hotplug-q35", &args).await;
                let tap = format!("vqt{}", std::process::id());

                // q35's root complex takes no hot-plugged device.
                let nic = tap_nic("data3", "nic3", &tap, None);
                let error = qmp.hotplug_nic(&nic).await.unwrap_err();
                match &error {
                    QmpError::HotplugNic { source, .. } => match &**source {
                        QmpError::Command { command, desc, .. } if command == "device_add" => {
                            assert!(desc.contains("does not support hotplugging"), "{desc}")
                        }
                        other => panic!("expected device_add to fail, got {other:?}"),
                    },
                    other => panic!("expected a hot-plug error, got {other:?}"),
                }
                drop(nic);
                assert!(netdev_ids(&qmp).await.is_empty());

                // A pcie-root-port created at launch does.
                let nic = tap_nic("data3", "nic3", &tap, Some("rp1"));
                qmp.hotplug_nic(&nic).await.unwrap();
                drop(nic);
                assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
                assert_eq!(netdev_ids(&qmp).await, ["data3"]);

                unplug_through_a_reset(&qmp, &mut events, &tap).await;
                qmp.quit().await.unwrap();
                assert!(wait_exit(&mut qemu).await.success());
            });
        }

        #[test]
        fn q35_native_pcie_hotplug_unplugs_an_unpowered_slot_at_once() {
            in_new_network_namespace(|| async {
                // With ACPI hot-plug off, the root port uses PCIe native hot-plug; no guest has
                // powered its slot, so QEMU removes the device at once on device_del
                // (pcie_cap_slot_unplug_request_cb) instead of asking the guest.
                let args = [
                    "-machine",
                    "q35",
                    "-S",
                    "-global",
                    "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                    "-device",
                    "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
                ];
                let (mut qemu, qmp, mut events) = start_qemu_unix("hotplug-q35-native", &args).await;
                let tap = format!("vqt{}", std::process::id());
                let nic = tap_nic("data3", "nic3", &tap, Some("rp1"));
                qmp.hotplug_nic(&nic).await.unwrap();
                drop(nic);
                assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));

                qmp.unplug_nic("nic3", "data3", PATIENCE).await.unwrap();
                let device =
                    VmEvent::DeviceDeleted { device: Some("nic3".into()), path: "/machine/peripheral/nic3".into() };
                let backend =
                    VmEvent::DeviceDeleted { device: None, path: "/machine/peripheral/nic3/virtio-backend".into() };
                assert_eq!(next_event(&mut events).await, Some(backend));
                assert_eq!(next_event(&mut events).await, Some(device));
                assert!(!peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
                assert!(netdev_ids(&qmp).await.is_empty());
                wait_until("the tap to go", || !interface_exists(&tap)).await;

                qmp.quit().await.unwrap();
                assert!(wait_exit(&mut qemu).await.success());
            });
        }
    }
}
