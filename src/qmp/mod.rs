//! The QEMU Machine Protocol client: the greeting and capabilities negotiation, commands matched
//! to their replies by `id`, the VM's events, and the run state those events imply.
//!
//! It owns one QMP connection over any `AsyncRead + AsyncWrite` stream (the Unix socket in
//! production, `tokio::io::duplex` in tests). Over a Unix socket (`connect_unix`) it also passes
//! file descriptors to QEMU (`getfd`), which is how a NIC is hot-plugged on a tap that vial opened
//! (`hotplug_nic`, `unplug_nic`) and how a RAM snapshot is saved and loaded. It never spawns,
//! signals or waits for QEMU, and never opens a tap: the process belongs to `vm` and the
//! supervisor, the links to `net`; this module only talks to QEMU, always through typed
//! commands (the `qapi` schema, or a small reply type of its own where the schema's closed
//! enums would turn a newer QEMU's answer into an error).
//!
//! - `device`: a device as driver and properties, the form `-device` and `device_add` share;
//! - `wire`: the stream: reader and writer tasks, replies matched by `id`, descriptor passing;
//! - `event`: QMP events as [`VmEvent`]s and the run state they imply;
//! - `nic`: NIC hot-plug and unplug;
//! - `migrate`: saving and loading a RAM snapshot (migration to and from a descriptor).
//!
//! References: QEMU's "QEMU Machine Protocol Specification" (docs/interop/qmp-spec) and the QMP
//! reference manual (the QAPI schema, mirrored by the `qapi-qmp` crate).

pub mod device;
mod event;
mod migrate;
mod nic;
mod wire;

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use qapi::qmp::QmpCommand;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tracing::debug;

pub use event::{next_run_state, Events, RunState, VmEvent};
pub use nic::HotplugNic;
use wire::{Link, PendingGuard, Reply, Request};

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
    /// QEMU did not answer a command in time (it is wedged: stopped, or stuck in a device).
    #[error("qemu did not answer {command} within {timeout:?}")]
    NoAnswer {
        /// The command.
        command: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// QEMU did not greet in time after it started.
    #[error("qemu did not greet on qmp within {timeout:?}")]
    NoGreeting {
        /// How long the client waited.
        timeout: Duration,
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

/// A handle to a negotiated QMP connection. Clones share the connection; commands from several
/// tasks may be in flight at once, each matched to its reply by `id`.
#[derive(Clone)]
pub struct Qmp {
    link: Arc<Link>,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp").field("closed", &self.link.pending.is_closed()).finish()
    }
}

/// How long any command waits for QEMU's reply: a QEMU that answers nothing for this long is
/// wedged (stopped, or stuck in a device), and the caller must not wait with it. Commands that
/// take long (migration) return at once and report progress through queries.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

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
    wire::start(read_half, write_half).await
}

/// [`connect_unix`], waiting at most `timeout` for QEMU's greeting and the negotiation: the
/// way vial connects to its control monitor of a QEMU that just started.
pub async fn connect_unix_within(stream: UnixStream, timeout: Duration) -> Result<(Qmp, Events), QmpError> {
    match tokio::time::timeout(timeout, connect_unix(stream)).await {
        Ok(connected) => connected,
        Err(_) => Err(QmpError::NoGreeting { timeout }),
    }
}

/// Like `connect`, over QEMU's QMP Unix socket, keeping the socket so that `getfd` can pass
/// descriptors on it (SCM_RIGHTS, unix(7)).
pub async fn connect_unix(stream: UnixStream) -> Result<(Qmp, Events), QmpError> {
    let (read_half, write_half) = stream.into_split();
    wire::start(read_half, write_half).await
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
    pub(crate) async fn execute_raw(&self, name: &str, arguments: Value) -> Result<Value, QmpError> {
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
        let timeout = self.link.command_timeout;
        let reply = tokio::time::timeout(timeout, receiver)
            .await
            .map_err(|_| QmpError::NoAnswer { command: name.to_string(), timeout })?;
        match reply.map_err(|_| QmpError::Closed)? {
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
mod fuzz;
#[cfg(test)]
mod tests;
