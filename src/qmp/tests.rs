use super::event::RUN_STATE_NAMES;
use super::wire::PendingTable;
use super::*;
use crate::qmp::device::Device;
use nix::sys::socket::MsgFlags;
use serde_json::json;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Interest, ReadHalf, WriteHalf};

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

    peer.send(r#"{"event": "VIAL_FUTURE_EVENT", "data": {"x": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#)
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
                requests: tokio::sync::mpsc::unbounded_channel().0,
                pending: Arc::new(PendingTable::new()),
                next_id: AtomicU64::new(1),
                command_timeout: super::COMMAND_TIMEOUT,
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

/// A NIC as `vm::argv::data_nic_device` makes one, with `extra` properties after its own.
fn test_device(id: &str, device_id: &str, extra: &[(&'static str, crate::qmp::device::Value)]) -> Device {
    let mut device =
        Device::new("virtio-net-pci").with("netdev", id).with("id", device_id).with("mac", "02:00:00:00:00:03");
    device.props.extend(extra.iter().cloned());
    device
}

fn test_nic(id: &str, device_id: &str, fd: OwnedFd, vhost_fd: Option<OwnedFd>) -> HotplugNic {
    let device = test_device(id, device_id, &[("host_mtu", 9000u32.into())]);
    HotplugNic { id: id.into(), device, fd, vhost_fd }
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
    nic.device.props.extend([("bus", "rp1".into()), ("addr", "0x5".into())]);
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
    nic.device = test_device("data4", "nic4", &[]);
    let peer_side = async {
        peer.answer_getfd("data4", &tap_file).await;
        let request = peer.answer("netdev_add", ok.clone()).await;
        assert_eq!(request["arguments"], json!({"type": "tap", "id": "data4", "fd": "data4"}));
        let request = peer.answer("device_add", ok.clone()).await;
        let device = json!({"driver": "virtio-net-pci", "id": "nic4", "netdev": "data4", "mac": "02:00:00:00:00:03"});
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

    let gone = |what: &str| json!({"error": {"class": "DeviceNotFound", "desc": format!("Device '{what}' not found")}});
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
mod real_qemu;

/// A wedged QEMU (stopped with SIGSTOP, or stuck in a device) answers nothing: a command ends
/// with `NoAnswer` after `COMMAND_TIMEOUT` instead of hanging its caller, and leaves no
/// entry behind.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_command_qemu_never_answers_ends_after_the_command_timeout() {
    let (qmp, _events, mut peer) = connected().await;
    let started = tokio::time::Instant::now();
    let (result, request) = tokio::join!(qmp.query_status(), peer.request());
    assert_eq!(request["execute"], "query-status");
    match result {
        Err(QmpError::NoAnswer { command, timeout }) => {
            assert_eq!((command.as_str(), timeout), ("query-status", COMMAND_TIMEOUT));
        }
        other => panic!("expected NoAnswer, got {other:?}"),
    }
    assert!(started.elapsed() >= COMMAND_TIMEOUT);
    assert!(qmp.link.pending.lock().waiting.is_empty(), "the abandoned command left its entry");
}
