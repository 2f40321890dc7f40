//! Property tests over what QEMU's side of QMP may send: arbitrary bytes and arbitrary JSON
//! through [`classify`], event-shaped objects through [`decode_event`] and the run-state
//! tracking, and whole sessions through a real client over a duplex stream. No panic, no
//! hang: whatever arrives, the reader ends when the stream does. Bounded case counts: they run
//! in seconds with `cargo test`.

use super::event::{decode_event, next_run_state, RunState, VmEvent, RUN_STATE_NAMES};
use super::wire::{classify, Message, MAX_LINE};
use super::*;
use proptest::prelude::*;
use serde_json::{json, Map};
use tokio::io::AsyncWriteExt;

const GREETING: &str =
    r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "x"}, "capabilities": []}}"#;

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(vec!["host-qmp-quit", "guest-shutdown", "running", "/machine/peripheral/nic1"])
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(("[a-z_-]{0,10}", inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// An object shaped like an event QEMU sends, with data that may or may not fit the schema.
fn event_object() -> impl Strategy<Value = Value> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "SHUTDOWN",
            "POWERDOWN",
            "RESET",
            "STOP",
            "RESUME",
            "GUEST_PANICKED",
            "DEVICE_DELETED",
            "NIC_RX_FILTER_CHANGED",
            "RTC_CHANGE",
            "MIGRATION",
            "JOB_STATUS_CHANGE",
            "NOT_AN_EVENT",
        ])
        .prop_map(|s| Value::String(s.into())),
        json_value(),
    ];
    let data = prop_oneof![
        json_value(),
        (json_value(), json_value()).prop_map(|(guest, reason)| json!({"guest": guest, "reason": reason})),
        (any::<bool>(), prop::sample::select(vec!["host-qmp-quit", "guest-shutdown", "guest-panic", "future-reason"]))
            .prop_map(|(guest, reason)| json!({"guest": guest, "reason": reason})),
        (json_value(), any::<String>()).prop_map(|(device, path)| json!({"device": device, "path": path})),
    ];
    (name, prop::option::of(data), prop::option::of(json_value())).prop_map(|(name, data, timestamp)| {
        let mut event = json!({"event": name});
        if let Some(data) = data {
            event["data"] = data;
        }
        if let Some(timestamp) = timestamp {
            event["timestamp"] = timestamp;
        }
        event
    })
}

/// One line from QEMU's side: junk, any JSON, a reply with any id, or an event.
fn qemu_line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        (json_value(), json_value()).prop_map(|(id, ret)| json!({"return": ret, "id": id}).to_string().into_bytes()),
        (json_value(), json_value()).prop_map(|(id, error)| json!({"error": error, "id": id}).to_string().into_bytes()),
        event_object().prop_map(|v| v.to_string().into_bytes()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_line_is_sorted_without_panic(line in qemu_line()) {
        if let Message::Event(message) = classify(&line) {
            let _ = decode_event(message);
        }
    }

    #[test]
    fn any_event_object_decodes_or_is_dropped_and_the_run_state_follows(
        events in prop::collection::vec(event_object(), 1..8),
        start in 0..RUN_STATE_NAMES.len(),
    ) {
        let mut state = RUN_STATE_NAMES[start].0.clone();
        for event in events {
            let name = event["event"].as_str().map(str::to_string);
            if let Some(decoded) = decode_event(event) {
                // A decoded event is the event QEMU named.
                if let VmEvent::Other { name: other } = &decoded {
                    prop_assert_eq!(Some(other.clone()), name);
                }
                state = next_run_state(&state, &decoded);
                prop_assert!(!state.as_str().is_empty());
            }
        }
        prop_assert!(!matches!(state, RunState::Unknown(ref name) if name.is_empty()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// A whole session: a greeting (or not), the negotiation's reply, any lines, then the end.
    /// `connect` finishes, and, when it connected, the event stream ends after the lines and a
    /// command sent meanwhile fails instead of waiting for ever.
    #[test]
    fn a_session_of_any_lines_ends_when_the_stream_does(
        greeting in prop_oneof![Just(GREETING.as_bytes().to_vec()), qemu_line()],
        lines in prop::collection::vec(qemu_line(), 0..12),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 20);
            let mut script = greeting;
            script.extend_from_slice(b"\n{\"return\": {}}\n");
            for line in lines {
                script.extend_from_slice(&line);
                script.push(b'\n');
            }
            server.write_all(&script).await.unwrap();
            drop(server);
            let session = async {
                let Ok((qmp, mut events)) = connect(client).await else { return };
                while events.recv().await.is_some() {}
                assert!(qmp.query_status().await.is_err(), "a command after the end must fail");
            };
            tokio::time::timeout(Duration::from_secs(10), session).await.expect("the qmp reader hung");
        });
    }
}

/// A line without end is refused at [`MAX_LINE`] bytes, and the connection counts as closed.
#[tokio::test(flavor = "current_thread")]
async fn a_line_past_the_limit_closes_the_connection() {
    let (client, mut server) = tokio::io::duplex(1 << 20);
    let peer = tokio::spawn(async move {
        server.write_all(format!("{GREETING}\n{{\"return\": {{}}}}\n").as_bytes()).await.unwrap();
        let chunk = vec![b'['; 1 << 20];
        let mut sent = 0u64;
        // The reader stops reading past the limit; the peer stops once it is not read.
        while sent <= MAX_LINE + (1 << 20) {
            if tokio::time::timeout(Duration::from_secs(5), server.write_all(&chunk)).await.is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        server
    });
    let (_qmp, mut events) = connect(client).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), async { while events.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the reader must give up on an endless line");
    drop(peer);
}
