//! Property tests over what a client of the health socket may send: arbitrary bytes and
//! HTTP-shaped heads through [`parse_request`], [`respond`] and [`Response::to_bytes`], and
//! through [`read_request`] over a real socket pair. No panic, no hang (a closed client
//! always ends the read), every answer a well-formed HTTP/1.0 head, and every refusal says
//! why. Bounded case counts: they run in seconds with `cargo test`.

use super::*;
use proptest::prelude::*;

fn statuses() -> Vec<Status> {
    let mut ready = Status::new("linux");
    ready.phase = Phase::Ready;
    let mut failed = Status::new("linux");
    failed.phase = Phase::Failed;
    failed.reason = Some("qemu exited unexpectedly: \"signal\"\n\u{0}".into());
    vec![Status::new("linux"), ready, failed]
}

/// A head an HTTP client, a careless one or a hostile one might send.
fn http_head() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        prop::sample::select(vec!["GET", "HEAD", "POST", "get", "OPTIONS", "CONNECT", ""]).prop_map(str::to_string),
        "[!-~]{0,12}",
    ];
    let target = prop_oneof![
        prop::sample::select(vec!["/live", "/ready", "/status", "/", "/watch", "*", "http://vial/status", "HTTP://x"])
            .prop_map(str::to_string),
        "[!-~]{0,40}",
        any::<String>(),
    ];
    let version = prop::sample::select(vec!["HTTP/1.0", "HTTP/1.1", "HTTP/2", "HTTP/1.", ""]);
    let headers = prop::collection::vec(("[!-~&&[^:]]{0,10}", "[ -~]{0,20}"), 0..40);
    let ending = prop::sample::select(vec!["\r\n\r\n", "\n\n", "\r\n", ""]);
    (method, target, version, headers, ending).prop_map(|(method, target, version, headers, ending)| {
        let mut head = format!("{method} {target} {version}");
        for (name, value) in headers {
            head.push_str(&format!("\r\n{name}: {value}"));
        }
        head.push_str(ending);
        head.into_bytes()
    })
}

/// Parses `bytes` and answers what parses, against every status.
fn check_head(bytes: &[u8]) {
    match parse_request(bytes) {
        Ok(Some((request, head_len))) => {
            assert!(head_len <= bytes.len());
            for status in statuses() {
                let response = respond(&request, &status, status.started);
                assert!(reason_phrase(response.code) != "Unknown", "{response:?}");
                let wire = response.to_bytes();
                let text = String::from_utf8_lossy(&wire);
                assert!(text.starts_with(&format!("HTTP/1.0 {} ", response.code)), "{text}");
                assert!(text.contains("\r\n\r\n"), "{text}");
                // The request never reaches the head: no header injection through the path.
                let head = &text[..text.find("\r\n\r\n").unwrap()];
                for line in head.split("\r\n").skip(1) {
                    let known = ["Content-Type: ", "Content-Length: ", "Allow: ", "Connection: close"];
                    assert!(known.iter().any(|name| line.starts_with(name)), "{head}");
                }
            }
        }
        Ok(None) => {}
        Err(ReadError::Malformed(why)) => assert!(!why.is_empty()),
        Err(ReadError::TooLarge) => {}
        Err(other) => panic!("parse_request cannot fail with {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_a_request_more_to_read_or_a_refusal(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_head(&bytes);
    }

    #[test]
    fn http_shaped_heads_are_answered_or_refused(head in http_head()) {
        check_head(&head);
        // Every prefix too: a head arriving in pieces.
        for cut in [1, head.len() / 3, head.len() / 2, head.len().saturating_sub(1)] {
            check_head(&head[..cut.min(head.len())]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn reading_a_request_over_a_socket_always_ends(
        head in prop_oneof![http_head(), prop::collection::vec(any::<u8>(), 0..3000)],
        max in 1usize..2048,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut client, mut server) = UnixStream::pair().unwrap();
            let send = async move {
                // The server stops reading past the limit; a send it does not take is fine.
                let _ = client.write_all(&head).await;
                let _ = client.shutdown().await;
                client
            };
            let read = tokio::time::timeout(Duration::from_secs(10), read_request(&mut server, max));
            let (_client, read) = tokio::join!(send, read);
            match read.expect("read_request hung on a closed client") {
                Ok(request) => assert!(request.method.len() + request.path.len() < max),
                Err(ReadError::Malformed(why)) => assert!(!why.is_empty()),
                Err(ReadError::TooLarge | ReadError::Closed | ReadError::Io(_)) => {}
            }
        });
    }
}
