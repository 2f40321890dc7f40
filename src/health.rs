//! The health socket, `/run/vial/health.sock`: liveness, readiness and the JSON status, spoken as
//! HTTP/1.0 over a Unix socket so that a person can ask with a standard tool
//! (`curl --unix-socket /run/vial/health.sock http://vial/status`); the synchronous client that
//! `vial health` (Docker's `HEALTHCHECK`) runs; and `last-status.json`, the status a supervisor
//! leaves next to the socket when it exits.
//!
//! The protocol is the pure function [`respond`]; [`serve`] only reads a request within
//! [`Limits`], asks `respond`, and writes the answer. This module never changes the status: it
//! only reads the supervisor's `watch` channel (and writes a copy of it on request).

use crate::logging::error_chain;
use crate::status::{Phase, Status};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::rundir::LAST_STATUS as LAST_STATUS_NAME;

/// What a 404 lists, so a person who guessed a path learns the right ones.
const ROUTES: &str = "/live, /ready, /status";

/// The methods every route accepts (the `Allow` header of a 405).
const ALLOWED_METHODS: &str = "GET, HEAD";

/// More headers than any probe or curl sends; a request with more is refused with 431.
const MAX_REQUEST_HEADERS: usize = 32;

/// A status document is a few KiB; this only stops a confused peer from filling memory.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// How long the accept loop waits after a failed `accept` (EMFILE, ENOBUFS) before it tries
/// again, so a persistent error neither spins the supervisor's only thread nor floods the log.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The exit code Docker reads as healthy.
const EXIT_HEALTHY: i32 = 0;

/// The exit code Docker reads as unhealthy (2 is reserved by Docker, so every failure is 1).
const EXIT_UNHEALTHY: i32 = 1;

/// Every way the health socket or its client can fail, one variant per step.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The directory that holds the socket could not be created.
    #[error("cannot create the health socket directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A socket file left by an earlier run could not be removed.
    #[error("cannot remove the stale health socket {}", path.display())]
    RemoveStale {
        /// The socket file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The last status left by an earlier run could not be removed.
    #[error("cannot remove the stale last status {}", path.display())]
    RemoveLastStatus {
        /// The `last-status.json` file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind the health socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Nothing answers on the socket.
    #[error(
        "cannot connect to the health socket {} (the supervisor is not running, or VIAL_RUN_DIR points elsewhere)",
        path.display()
    )]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The supervisor did not answer in time.
    #[error("the supervisor did not answer on {} within {timeout:?}", path.display())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The time allowed for the whole exchange.
        timeout: Duration,
    },
    /// Writing the request failed.
    #[error("cannot send the request to {}", path.display())]
    Send {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading the response failed.
    #[error("cannot read the response from {}", path.display())]
    Receive {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The answer is not an HTTP response this client understands.
    #[error("bad response from the health socket: {0}")]
    BadResponse(String),
    /// The caller asked for a path that cannot be put on a request line.
    #[error("invalid request path {0:?}: it must start with / and hold no spaces or control characters")]
    InvalidPath(String),
}

// ---------------------------------------------------------------------------------------------
// The protocol: a pure function from a request and a status to a response.
// ---------------------------------------------------------------------------------------------

/// A parsed request: all that [`respond`] looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent; methods are case-sensitive (RFC 9110 §9.1), so `get` is not `GET`.
    pub method: String,
    /// The request target as sent, query string included; [`respond`] ignores the query.
    pub path: String,
}

impl Request {
    /// A request for `path` with `method`.
    pub fn new(method: &str, path: &str) -> Self {
        Request { method: method.to_string(), path: path.to_string() }
    }
}

/// An answer, put on the wire by [`Response::to_bytes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (200, 404, 503, ...).
    pub code: u16,
    /// The reason phrase that goes with `code`.
    pub reason: &'static str,
    /// The `Content-Type` of `body`.
    pub content_type: &'static str,
    /// The `Allow` header, sent with a 405.
    pub allow: Option<&'static str>,
    /// The body a GET gets. It is kept for a HEAD too, so that `Content-Length` is the same.
    pub body: Vec<u8>,
    /// An answer to HEAD: [`Response::to_bytes`] sends the head only.
    pub head_only: bool,
    /// `/watch`: the body is the first status line, and the connection stays open for one
    /// more line at each change (no `Content-Length`).
    pub stream: bool,
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
/// One compact JSON status per line (`/watch`).
const NDJSON: &str = "application/x-ndjson";

impl Response {
    /// A `text/plain` response with `code`'s standard reason phrase.
    pub fn text(code: u16, body: impl Into<String>) -> Self {
        Response {
            code,
            reason: reason_phrase(code),
            content_type: TEXT,
            allow: None,
            body: body.into().into_bytes(),
            head_only: false,
            stream: false,
        }
    }

    /// The bytes to send: an HTTP/1.0 head that announces the close, then the body unless
    /// this answers a HEAD.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.0 {} {}\r\nContent-Type: {}\r\n", self.code, self.reason, self.content_type);
        if !self.stream {
            head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if let Some(allow) = self.allow {
            head.push_str(&format!("Allow: {allow}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if !self.head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The reason phrase for each code this module sends (RFC 9110 §15, RFC 6585 for 431).
fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The routes, decided before any body is built so a 405 costs no JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Live,
    Ready,
    Status,
    Watch,
}

/// The path part of a request target: the query and fragment cut off, and the scheme and
/// authority of an absolute-form target (`http://vial/status`, which RFC 9112 §3.2.2 says a
/// server must accept) dropped.
fn target_path(target: &str) -> &str {
    let mut path = target;
    if let Some(scheme_end) = path.find("://") {
        if path[..scheme_end].eq_ignore_ascii_case("http") {
            let rest = &path[scheme_end + 3..];
            path = rest.find('/').map_or("/", |slash| &rest[slash..]);
        }
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    match &path[..end] {
        "" => "/",
        path => path,
    }
}

/// The answer to `request` given `status` at `now`: the whole health protocol.
///
/// `/live` is 200 whenever the supervisor answers at all, even once the VM failed, because it
/// is the supervisor's liveness; `/ready` is 200 only in phase `ready`, else 503 with
/// `<state>: <reason>`; `/status` (and `/`) is the JSON status; `/watch` streams the status,
/// one compact JSON line now and one at every change, until the supervisor is gone (so a
/// launcher learns of `ready` at once, without polling). GET and HEAD only.
pub fn respond(request: &Request, status: &Status, now: Instant) -> Response {
    let path = target_path(&request.path);
    let route = match path {
        "/live" => Route::Live,
        "/ready" => Route::Ready,
        "/status" | "/" => Route::Status,
        "/watch" => Route::Watch,
        _ => {
            let mut response = Response::text(404, format!("no route {path}; try {ROUTES}\n"));
            response.head_only = request.method == "HEAD";
            return response;
        }
    };
    let head_only = match request.method.as_str() {
        "GET" => false,
        "HEAD" => true,
        other => {
            let mut response = Response::text(405, format!("method {other} not allowed; use {ALLOWED_METHODS}\n"));
            response.allow = Some(ALLOWED_METHODS);
            return response;
        }
    };
    let mut response = match route {
        Route::Live => Response::text(200, "live\n"),
        Route::Ready if status.phase == Phase::Ready => Response::text(200, "ready\n"),
        Route::Ready => match &status.reason {
            Some(reason) => Response::text(503, format!("{}: {reason}\n", status.phase)),
            None => Response::text(503, format!("{}\n", status.phase)),
        },
        // Pretty, because the reader at the other end of curl is often a person.
        Route::Status => match serde_json::to_vec_pretty(&status.to_json(now)) {
            Ok(mut body) => {
                body.push(b'\n');
                Response { content_type: JSON, body, ..Response::text(200, "") }
            }
            Err(error) => Response::text(500, format!("cannot encode the status: {error}\n")),
        },
        Route::Watch => Response {
            content_type: NDJSON,
            body: status_line(status, now),
            stream: !head_only,
            ..Response::text(200, "")
        },
    };
    response.head_only = head_only;
    response
}

/// One `/watch` line: the compact JSON status and a newline.
fn status_line(status: &Status, now: Instant) -> Vec<u8> {
    let mut line = status.to_json(now).to_string().into_bytes();
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------------------------
// The server.
// ---------------------------------------------------------------------------------------------

/// Bounds that keep clients from holding the supervisor's health socket hostage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a client has to send its whole request head, counted from the accept (a
    /// dribbling client gains nothing), and then again to take the response.
    pub timeout: Duration,
    /// The largest request head read, in bytes; a longer one gets 431 and is never read whole.
    pub max_request_bytes: usize,
    /// Connections served at once. One more is answered 503 and closed at once, so memory
    /// stays bounded by this number times `max_request_bytes`, whatever clients do.
    pub max_connections: usize,
}

impl Default for Limits {
    /// 2 s, 8 KiB, 64 connections: far above what a probe or curl needs.
    fn default() -> Self {
        Limits { timeout: Duration::from_secs(2), max_request_bytes: 8 << 10, max_connections: 64 }
    }
}

/// Creates the socket directory, removes a socket file left by an earlier run (and that run's
/// `last-status.json`, which a live socket supersedes), and binds `path`.
///
/// Call it inside a tokio runtime: the listener registers with the runtime's reactor.
pub fn bind(path: &Path) -> Result<UnixListener, HealthError> {
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|source| HealthError::CreateDir { path: dir.to_path_buf(), source })?;
    }
    // Nothing unlinks a socket file when its process ends, so one from a previous run (a
    // `docker restart` keeps /run) makes bind(2) fail with EADDRINUSE. Only a socket is
    // removed: anything else at that path is not ours, and bind reports it.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .map_err(|source| HealthError::RemoveStale { path: path.to_path_buf(), source })?;
        }
    }
    // A previous run's last status would mislead `vial health` should this run die without
    // leaving its own.
    let last = last_status_path(path);
    match std::fs::remove_file(&last) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => {
            return Err(HealthError::RemoveLastStatus { path: last, source });
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| HealthError::Bind { path: path.to_path_buf(), source })?;
    // Open to all, whatever the umask: health tells only what `docker inspect` would, and
    // every client is bounded (unlike qmp.sock and console.sock, which are 0600).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|source| HealthError::Bind { path: path.to_path_buf(), source })?;
    Ok(listener)
}

/// Serves the health protocol on `listener` with the default [`Limits`], forever.
///
/// It keeps answering after the status sender is dropped (with the last status), so health
/// stays truthful while the supervisor shuts down; drop or abort the task to stop it.
pub async fn serve(listener: UnixListener, status: watch::Receiver<Status>) {
    serve_with(listener, status, Limits::default()).await
}

/// [`serve`] with explicit [`Limits`]. Never returns: every error is logged and the accept
/// loop carries on, because PID 1 must not lose its health socket to one bad client.
pub async fn serve_with(listener: UnixListener, status: watch::Receiver<Status>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::warn!(%error, "health socket: accept failed; retrying");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Refuse rather than queue: a queue would be unbounded memory. try_write never
            // waits; at worst the client misses the reason, never the close.
            tracing::debug!(max = limits.max_connections, "health socket: too many connections; refusing one");
            let busy = Response::text(503, "busy: too many health connections\n");
            let _ = stream.try_write(&busy.to_bytes());
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            serve_connection(stream, status, limits).await;
            drop(slot);
        });
    }
}

/// Why no request was read.
#[derive(Debug)]
enum ReadError {
    /// The client closed without sending a byte (a port probe): nothing to answer.
    Closed,
    /// Reading failed; the client is gone.
    Io(io::Error),
    /// The head is not HTTP/1.x: 400.
    Malformed(String),
    /// The head is longer than the limit, or has too many headers: 431.
    TooLarge,
}

/// Reads one request, answers it and closes: one response per connection, as in HTTP/1.0.
async fn serve_connection(mut stream: UnixStream, mut status: watch::Receiver<Status>, limits: Limits) {
    let read = tokio::time::timeout(limits.timeout, read_request(&mut stream, limits.max_request_bytes));
    let response = match read.await {
        Ok(Ok(request)) => answer(&request, &mut status),
        Ok(Err(ReadError::Closed)) => {
            tracing::debug!("health socket: client closed without a request");
            return;
        }
        Ok(Err(ReadError::Io(error))) => {
            tracing::debug!(%error, "health socket: reading a request failed");
            return;
        }
        Ok(Err(ReadError::Malformed(why))) => {
            tracing::debug!(why, "health socket: bad request");
            Response::text(400, format!("bad request: {why}\n"))
        }
        Ok(Err(ReadError::TooLarge)) => {
            tracing::debug!(max = limits.max_request_bytes, "health socket: request head too large");
            Response::text(431, format!("request head larger than {} bytes\n", limits.max_request_bytes))
        }
        Err(_elapsed) => {
            tracing::debug!(timeout = ?limits.timeout, "health socket: client too slow; cutting it off");
            Response::text(408, "request not received in time\n")
        }
    };
    // The write is bounded too: a client that never reads must not keep its slot.
    let bytes = response.to_bytes();
    let write = async {
        stream.write_all(&bytes).await?;
        if response.stream {
            watch_lines(&mut stream, status, limits).await?;
        }
        stream.shutdown().await
    };
    let bounded = async {
        if response.stream {
            // Each line of a watch is bounded in `watch_lines`; the watch itself is not.
            write.await.map(Some)
        } else {
            Ok(tokio::time::timeout(limits.timeout, write).await.ok().transpose()?)
        }
    };
    match bounded.await {
        Ok(Some(())) => {}
        Ok(None) => tracing::debug!("health socket: client did not take the response in time"),
        Err(error) => tracing::debug!(%error, "health socket: client left before the response was sent"),
    }
}

/// Writes one status line at every change until the status sender is gone (the supervisor
/// exits; its last status was the last line) or the client stops reading.
async fn watch_lines(stream: &mut UnixStream, mut status: watch::Receiver<Status>, limits: Limits) -> io::Result<()> {
    while status.changed().await.is_ok() {
        let line = status_line(&status.borrow_and_update(), Instant::now());
        match tokio::time::timeout(limits.timeout, stream.write_all(&line)).await {
            Ok(result) => result?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "watch client not reading")),
        }
    }
    Ok(())
}

/// [`respond`] to the current status, marking it seen (a `/watch` then sends the changes after
/// it). The watch borrow holds a read lock, so it lives in this synchronous function and never
/// across an await, where it would stall the supervisor's send.
fn answer(request: &Request, status: &mut watch::Receiver<Status>) -> Response {
    respond(request, &status.borrow_and_update(), Instant::now())
}

/// Reads until the request head is complete, at most `max + 1` bytes: one past the limit is
/// enough to know that a head is too large, and more is never buffered.
async fn read_request(stream: &mut UnixStream, max: usize) -> Result<Request, ReadError> {
    let mut head = Vec::with_capacity(512.min(max + 1));
    let mut chunk = [0u8; 1024];
    loop {
        let want = (max + 1 - head.len()).min(chunk.len());
        let read = stream.read(&mut chunk[..want]).await.map_err(ReadError::Io)?;
        if read == 0 {
            return Err(if head.is_empty() {
                ReadError::Closed
            } else {
                ReadError::Malformed("the request ended before its head did".into())
            });
        }
        head.extend_from_slice(&chunk[..read]);
        match parse_request(&head)? {
            Some((request, head_len)) if head_len <= max => return Ok(request),
            Some(_) => return Err(ReadError::TooLarge),
            None if head.len() > max => return Err(ReadError::TooLarge),
            None => {}
        }
    }
}

/// Parses a request head with httparse, which takes HTTP/1.0 and HTTP/1.1 request lines.
/// `None` means more bytes are needed; `Some` carries the head's length.
fn parse_request(bytes: &[u8]) -> Result<Option<(Request, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => {
            // httparse fills both on Complete; the defaults are never used.
            let method = request.method.unwrap_or_default();
            let path = request.path.unwrap_or_default();
            Ok(Some((Request::new(method, path), head_len)))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ReadError::TooLarge),
        Err(error) => Err(ReadError::Malformed(error.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// The client, for `vial health`: synchronous std code, because a HEALTHCHECK should not start
// a runtime to send forty bytes.
// ---------------------------------------------------------------------------------------------

/// Sends `GET <path>` to `socket` and returns the status code and body, all within `timeout`.
pub fn query(socket: &Path, path: &str, timeout: Duration) -> Result<(u16, String), HealthError> {
    // Anything else would let a caller smuggle a second request line or header.
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HealthError::InvalidPath(path.to_string()));
    }
    // `vial health --timeout-secs` takes any u64; `Instant + Duration` panics on overflow.
    let timeout = timeout.min(crate::config::MAX_DURATION);
    let deadline = Instant::now() + timeout;
    let timed_out = || HealthError::Timeout { path: socket.to_path_buf(), timeout };
    let mut stream = connect(socket, timeout)?;

    let remaining = |deadline: Instant| match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(timed_out()),
    };
    let send_error = |source| HealthError::Send { path: socket.to_path_buf(), source };
    stream.set_write_timeout(Some(remaining(deadline)?)).map_err(send_error)?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: vial\r\n\r\n");
    if let Err(error) = stream.write_all(request.as_bytes()) {
        return Err(if is_timeout(&error) { timed_out() } else { send_error(error) });
    }

    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Set before every read: SO_RCVTIMEO bounds one read, and the deadline bounds them all,
        // so a server that dribbles cannot stretch the exchange.
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|source| HealthError::Receive { path: socket.to_path_buf(), source })?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => {
                received.extend_from_slice(&chunk[..read]);
                if received.len() > MAX_RESPONSE_BYTES {
                    return Err(HealthError::BadResponse(format!("longer than {MAX_RESPONSE_BYTES} bytes")));
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // A server that closes with bytes of ours unread is reported by Linux as a reset
            // after its data (unix_release_sock in net/unix/af_unix.c); what came is the answer.
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset && !received.is_empty() => break,
            Err(error) if is_timeout(&error) => return Err(timed_out()),
            Err(source) => return Err(HealthError::Receive { path: socket.to_path_buf(), source }),
        }
    }
    parse_response(&received)
}

/// SO_RCVTIMEO and SO_SNDTIMEO expire as EAGAIN (socket(7)), which std calls WouldBlock.
fn is_timeout(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// Connects within `timeout`. connect(2) on a Unix socket blocks while the listener's backlog
/// is full, which is what a supervisor with a stuck runtime looks like, and std has no connect
/// timeout for Unix sockets; so the connect runs on a thread that can be given up on. A thread
/// left behind ends with the short-lived `vial health` process.
fn connect(socket: &Path, timeout: Duration) -> Result<std::os::unix::net::UnixStream, HealthError> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let path = socket.to_path_buf();
    let spawned = std::thread::Builder::new().name("health-connect".into()).spawn(move || {
        let _ = sender.send(std::os::unix::net::UnixStream::connect(&path));
    });
    let connect_error = |source| HealthError::Connect { path: socket.to_path_buf(), source };
    if let Err(error) = spawned {
        // No thread to spare: connect here, unbounded, rather than not at all.
        tracing::debug!(%error, "health client: cannot start the connecting thread");
        return std::os::unix::net::UnixStream::connect(socket).map_err(connect_error);
    }
    match receiver.recv_timeout(timeout) {
        Ok(result) => result.map_err(connect_error),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            Err(HealthError::Timeout { path: socket.to_path_buf(), timeout })
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(connect_error(io::Error::other("the connecting thread ended without a result")))
        }
    }
}

/// Splits a response into its status code and body (trimmed to `Content-Length` when sent).
fn parse_response(bytes: &[u8]) -> Result<(u16, String), HealthError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) if bytes.is_empty() => {
            return Err(HealthError::BadResponse("the connection closed without a response".into()));
        }
        Ok(httparse::Status::Partial) => {
            return Err(HealthError::BadResponse("the response ended inside its head".into()));
        }
        Err(error) => return Err(HealthError::BadResponse(format!("unparsable head: {error}"))),
    };
    let code = response.code.ok_or_else(|| HealthError::BadResponse("no status code".into()))?;
    let mut body = &bytes[head_len..];
    let length = response.headers.iter().find(|header| header.name.eq_ignore_ascii_case("content-length"));
    if let Some(length) = length {
        let length: usize = std::str::from_utf8(length.value)
            .ok()
            .and_then(|value| value.trim().parse().ok())
            .ok_or_else(|| HealthError::BadResponse("unparsable Content-Length".into()))?;
        if body.len() < length {
            return Err(HealthError::BadResponse(format!(
                "the body has {} bytes of the {length} announced",
                body.len()
            )));
        }
        body = &body[..length];
    }
    Ok((code, String::from_utf8_lossy(body).into_owned()))
}

/// What `vial health` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The supervisor answers (`GET /live`).
    Live,
    /// The endpoint is ready (`GET /ready`).
    Ready,
    /// The JSON status, healthy when its state is `ready` (`GET /status`).
    Status,
}

impl Check {
    /// The path this check asks for.
    pub fn path(self) -> &'static str {
        match self {
            Check::Live => "/live",
            Check::Ready => "/ready",
            Check::Status => "/status",
        }
    }
}

/// Runs `check` against `socket` and returns the exit code for Docker's `HEALTHCHECK` (0
/// healthy, 1 unhealthy) and the text to print, without a trailing newline.
///
/// When the socket cannot be reached and the supervisor left a `last-status.json` next to it,
/// the text is `supervisor not running; last status: <its JSON>`, which says why it ended.
pub fn run_check(socket: &Path, check: Check, timeout: Duration) -> (i32, String) {
    match query(socket, check.path(), timeout) {
        Ok((code, body)) => {
            let healthy = code == 200
                && match check {
                    Check::Live | Check::Ready => true,
                    Check::Status => status_is_ready(&body),
                };
            let text = match body.trim_end() {
                "" => format!("HTTP {code} {}", reason_phrase(code)),
                text => text.to_string(),
            };
            (if healthy { EXIT_HEALTHY } else { EXIT_UNHEALTHY }, text)
        }
        Err(error @ HealthError::Connect { .. }) => match read_last_status(socket) {
            Some(last) => (EXIT_UNHEALTHY, format!("supervisor not running; last status: {last}")),
            None => (EXIT_UNHEALTHY, error_chain(&error)),
        },
        Err(error) => (EXIT_UNHEALTHY, error_chain(&error)),
    }
}

/// Whether a status document says `"state": "ready"`.
fn status_is_ready(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body)
        .is_ok_and(|status| status.get("state").and_then(|state| state.as_str()) == Some("ready"))
}

/// Where the last status of the supervisor serving `socket` is kept.
fn last_status_path(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new(".")).join(LAST_STATUS_NAME)
}

/// The last status next to `socket`, on one line, if there is one.
fn read_last_status(socket: &Path) -> Option<String> {
    let text = std::fs::read_to_string(last_status_path(socket)).ok()?;
    // Re-encoded compact when it parses, so it prints on one line; shown as found when not,
    // because a damaged file still says more than nothing.
    Some(match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => value.to_string(),
        Err(_) => text.trim().to_string(),
    })
}

/// Writes `status` (as of `now`) to `dir/last-status.json` atomically: to a temporary file in
/// the same directory, then renamed over the old one, so a reader sees the old or the new
/// file, never half of one. The supervisor calls this as it exits.
pub fn persist_last_status(dir: &Path, status: &Status, now: Instant) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = serde_json::to_vec(&status.to_json(now))?;
    text.push(b'\n');
    let temporary = dir.join(format!(".{LAST_STATUS_NAME}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(&text)?;
        // Durable before it is visible: the container may be gone right after this.
        file.sync_all()?;
        std::fs::rename(&temporary, dir.join(LAST_STATUS_NAME))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::LinkStatus;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncRead;

    /// Generous: only a hung or serialising server ever reaches it.
    const PATIENCE: Duration = Duration::from_secs(10);

    const KILLED: &str = "qemu exited unexpectedly: killed by SIGKILL";

    fn status(phase: Phase, reason: Option<&str>) -> Status {
        let mut status = Status::new("linux");
        status.phase = phase;
        status.reason = reason.map(str::to_string);
        status
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let unique = format!("vial-health-{}-{}-{name}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            let path = std::env::temp_dir().join(unique);
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A server on a real Unix socket in a temp dir, with the status sender the test drives.
    struct Server {
        _dir: TempDir,
        socket: PathBuf,
        status: watch::Sender<Status>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        fn start(name: &str, limits: Limits, initial: Status) -> Server {
            let dir = TempDir::new(name);
            let socket = dir.0.join(crate::rundir::HEALTH);
            let listener = bind(&socket).unwrap();
            let (sender, receiver) = watch::channel(initial);
            let task = tokio::spawn(serve_with(listener, receiver, limits));
            Server { _dir: dir, socket, status: sender, task }
        }

        /// The blocking client, on the blocking pool: on this current-thread runtime it would
        /// otherwise stall the server it is asking.
        async fn query(&self, path: &str) -> Result<(u16, String), HealthError> {
            let (socket, path) = (self.socket.clone(), path.to_string());
            tokio::task::spawn_blocking(move || query(&socket, &path, PATIENCE)).await.unwrap()
        }

        async fn check(&self, check: Check) -> (i32, String) {
            let socket = self.socket.clone();
            tokio::task::spawn_blocking(move || run_check(&socket, check, PATIENCE)).await.unwrap()
        }

        async fn connect(&self) -> UnixStream {
            UnixStream::connect(&self.socket).await.unwrap()
        }

        async fn assert_answers(&self) {
            assert_eq!(self.query("/live").await.unwrap(), (200, "live\n".to_string()));
            assert!(!self.task.is_finished(), "the accept loop ended");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Reads until the server closes, within PATIENCE. A reset after data is how Linux reports
    /// a close with some of our bytes unread, so it counts as the close.
    async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut received = Vec::new();
        let read = async {
            let mut chunk = [0u8; 4096];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(read) => received.extend_from_slice(&chunk[..read]),
                    Err(error) if error.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(error) => panic!("reading from the server failed: {error}"),
                }
            }
        };
        tokio::time::timeout(PATIENCE, read).await.expect("the server did not close the connection");
        received
    }

    fn code_of(response: &[u8]) -> u16 {
        parse_response(response).unwrap_or_else(|error| panic!("{error}: {:?}", String::from_utf8_lossy(response))).0
    }

    /// Polls `condition` until it holds; fails after PATIENCE.
    async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
        testkit::wait_until_async(PATIENCE, what, condition).await
    }

    #[test]
    fn respond_table() {
        let ready = status(Phase::Ready, None);
        let booting = status(Phase::Booting, None);
        let failed = status(Phase::Failed, Some(KILLED));
        let not_allowed = |method: &str| format!("method {method} not allowed; use GET, HEAD\n");
        let no_route = |path: &str| format!("no route {path}; try /live, /ready, /status\n");
        #[rustfmt::skip]
        let table: Vec<(&str, &str, &Status, u16, String)> = vec![
            ("GET", "/live", &ready, 200, "live\n".into()),
            ("GET", "/live", &booting, 200, "live\n".into()),
            // The supervisor is alive even though the VM is not.
            ("GET", "/live", &failed, 200, "live\n".into()),
            ("GET", "/ready", &ready, 200, "ready\n".into()),
            ("GET", "/ready", &booting, 503, "booting\n".into()),
            ("GET", "/ready", &failed, 503, format!("failed: {KILLED}\n")),
            ("GET", "/ready?x=1", &ready, 200, "ready\n".into()),
            ("GET", "/ready?x=1", &booting, 503, "booting\n".into()),
            ("GET", "/live#top", &failed, 200, "live\n".into()),
            ("GET", "http://vial/ready", &ready, 200, "ready\n".into()),
            ("GET", "/nope", &ready, 404, no_route("/nope")),
            ("GET", "/nope?to=/live", &ready, 404, no_route("/nope")),
            ("GET", "/live/", &ready, 404, no_route("/live/")),
            ("POST", "/nope", &ready, 404, no_route("/nope")),
            ("POST", "/live", &ready, 405, not_allowed("POST")),
            ("PUT", "/ready", &booting, 405, not_allowed("PUT")),
            ("DELETE", "/status", &failed, 405, not_allowed("DELETE")),
            ("get", "/status", &ready, 405, not_allowed("get")),
        ];
        for (method, path, status, code, body) in table {
            let response = respond(&Request::new(method, path), status, status.started);
            let case = format!("{method} {path} in {}", status.phase);
            assert_eq!(response.code, code, "{case}");
            assert_eq!(response.reason, reason_phrase(code), "{case}");
            assert_eq!(String::from_utf8(response.body.clone()).unwrap(), body, "{case}");
            assert_eq!(response.content_type, TEXT, "{case}");
            assert_eq!(response.allow, (code == 405).then_some("GET, HEAD"), "{case}");
            assert!(!response.head_only, "{case}");
        }

        for status in [&ready, &booting, &failed] {
            for path in ["/status", "/", "/status?pretty=0", "http://vial/status", "http://vial"] {
                let response = respond(&Request::new("GET", path), status, status.started);
                let case = format!("GET {path} in {}", status.phase);
                assert_eq!((response.code, response.content_type), (200, JSON), "{case}");
                assert_eq!(response.body.last(), Some(&b'\n'), "{case}");
                let json: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
                assert_eq!(json["state"], status.phase.as_str(), "{case}");
                assert_eq!(json["reason"].as_str(), status.reason.as_deref(), "{case}");
            }
        }
    }

    #[test]
    fn head_sends_the_same_head_and_no_body() {
        let ready = status(Phase::Ready, None);
        let booting = status(Phase::Booting, None);
        let failed = status(Phase::Failed, Some(KILLED));
        for (path, status) in
            [("/live", &failed), ("/ready", &ready), ("/ready", &booting), ("/status", &failed), ("/x", &ready)]
        {
            let get = respond(&Request::new("GET", path), status, status.started);
            let head = respond(&Request::new("HEAD", path), status, status.started);
            assert!(head.head_only, "HEAD {path}");
            assert_eq!(head.code, get.code, "HEAD {path}");
            let (get, head) = (get.to_bytes(), head.to_bytes());
            assert!(head.ends_with(b"\r\n\r\n"), "HEAD {path}");
            assert!(get.starts_with(&head), "HEAD {path}: the head differs from GET's");
            assert!(get.len() > head.len(), "GET {path} has a body");
        }
    }

    #[test]
    fn wire_format() {
        assert_eq!(
            String::from_utf8(Response::text(200, "live\n").to_bytes()).unwrap(),
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\
             Connection: close\r\n\r\nlive\n"
        );
        let ready = status(Phase::Ready, None);
        let not_allowed = respond(&Request::new("POST", "/live"), &ready, ready.started).to_bytes();
        let not_allowed = String::from_utf8(not_allowed).unwrap();
        assert!(not_allowed.starts_with("HTTP/1.0 405 Method Not Allowed\r\n"), "{not_allowed}");
        assert!(not_allowed.contains("\r\nAllow: GET, HEAD\r\n"), "{not_allowed}");
        // The client reads what the server writes.
        let booting = status(Phase::Booting, None);
        let bytes = respond(&Request::new("GET", "/ready"), &booting, booting.started).to_bytes();
        assert_eq!(parse_response(&bytes).unwrap(), (503, "booting\n".to_string()));
    }

    #[test]
    fn request_heads() {
        for head in [
            "GET /live HTTP/1.0\r\n\r\n",
            "GET /live HTTP/1.1\r\nHost: vial\r\n\r\n",
            "GET /live HTTP/1.1\r\nHost: vial\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
        ] {
            let (request, len) = parse_request(head.as_bytes()).unwrap().unwrap();
            assert_eq!((request, len), (Request::new("GET", "/live"), head.len()), "{head:?}");
        }
        assert!(matches!(parse_request(b"GET /live HTT"), Ok(None)));
        assert!(matches!(parse_request(b""), Ok(None)));
        for garbage in
            [&b"\x16\x03\x01\x02\x00\x01"[..], b"GET /live HTTP/2.0\r\n\r\n", b"GET /\r\n\r\n", b"hello\r\n\r\n"]
        {
            let parsed = parse_request(garbage);
            assert!(matches!(parsed, Err(ReadError::Malformed(_))), "{garbage:?}: {parsed:?}");
        }
        let mut crowded = "GET /live HTTP/1.1\r\n".to_string();
        for n in 0..=MAX_REQUEST_HEADERS {
            crowded.push_str(&format!("X-{n}: y\r\n"));
        }
        crowded.push_str("\r\n");
        assert!(matches!(parse_request(crowded.as_bytes()), Err(ReadError::TooLarge)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn server_answers_live_ready_and_status() {
        let server = Server::start("routes", Limits::default(), status(Phase::Booting, None));
        assert_eq!(server.query("/live").await.unwrap(), (200, "live\n".into()));
        assert_eq!(server.query("/ready").await.unwrap(), (503, "booting\n".into()));

        server.status.send_modify(|status| status.phase = Phase::Ready);
        assert_eq!(server.query("/ready").await.unwrap(), (200, "ready\n".into()));
        let (code, body) = server.query("/status").await.unwrap();
        assert_eq!(code, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["state"], "ready");
        assert_eq!(json["profile"], "linux");
        assert_eq!(server.query("/ready?probe=docker").await.unwrap().0, 200);
        assert_eq!(server.query("/nope").await.unwrap().0, 404);

        server.status.send_modify(|status| {
            status.phase = Phase::Failed;
            status.reason = Some(KILLED.into());
        });
        assert_eq!(server.query("/live").await.unwrap(), (200, "live\n".into()));
        assert_eq!(server.query("/ready").await.unwrap(), (503, format!("failed: {KILLED}\n")));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn watch_streams_a_line_now_and_one_per_change_until_the_supervisor_is_gone() {
        use tokio::io::AsyncBufReadExt;
        let mut server = Server::start("watch", Limits::default(), status(Phase::Booting, None));
        let mut stream = server.connect().await;
        stream.write_all(b"GET /watch HTTP/1.0\r\n\r\n").await.unwrap();
        let mut reader = tokio::io::BufReader::new(stream);
        let mut line = String::new();
        let mut next_line = async |line: &mut String| {
            line.clear();
            tokio::time::timeout(PATIENCE, reader.read_line(line)).await.expect("a line in time").unwrap()
        };
        // The head, without a Content-Length, then a blank line.
        next_line(&mut line).await;
        assert_eq!(line, "HTTP/1.0 200 OK\r\n");
        let mut head = Vec::new();
        while next_line(&mut line).await > 0 && line != "\r\n" {
            head.push(line.clone());
        }
        assert!(head.iter().any(|h| h.contains("application/x-ndjson")), "{head:?}");
        assert!(!head.iter().any(|h| h.starts_with("Content-Length")), "{head:?}");
        let state = |line: &str| serde_json::from_str::<serde_json::Value>(line).unwrap()["state"].clone();
        next_line(&mut line).await;
        assert_eq!(state(&line), "booting");
        server.status.send_modify(|status| status.phase = Phase::Ready);
        next_line(&mut line).await;
        assert_eq!(state(&line), "ready");
        // The supervisor goes: the stream ends after the last status.
        server.status.send_modify(|status| status.phase = Phase::Stopped);
        next_line(&mut line).await;
        assert_eq!(state(&line), "stopped");
        drop(std::mem::replace(&mut server.status, watch::channel(Status::new("gone")).0));
        assert_eq!(next_line(&mut line).await, 0, "the stream ends with the supervisor");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn run_check_maps_answers_to_exit_codes() {
        let server = Server::start("check", Limits::default(), status(Phase::Booting, None));
        assert_eq!(server.check(Check::Live).await, (0, "live".into()));
        assert_eq!(server.check(Check::Ready).await, (1, "booting".into()));
        let (code, text) = server.check(Check::Status).await;
        assert_eq!(code, 1);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["state"], "booting");

        server.status.send_modify(|status| status.phase = Phase::Ready);
        assert_eq!(server.check(Check::Ready).await, (0, "ready".into()));
        let (code, text) = server.check(Check::Status).await;
        assert_eq!(code, 0);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap()["state"], "ready");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn garbage_gets_400_and_the_connection_closed() {
        let server = Server::start("garbage", Limits::default(), status(Phase::Ready, None));
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"hello there\r\n\r\n",
            b"GET /live HTTP/2.0\r\n\r\n",
        ] {
            let mut client = server.connect().await;
            client.write_all(garbage).await.unwrap();
            let response = read_until_closed(&mut client).await;
            assert_eq!(code_of(&response), 400, "{garbage:?}");
        }
        // Half a request, then the client's end of sending.
        let mut client = server.connect().await;
        client.write_all(b"GET /li").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(code_of(&read_until_closed(&mut client).await), 400);
        server.assert_answers().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_head_gets_431_without_being_read_whole() {
        let server = Server::start("oversized", Limits::default(), status(Phase::Ready, None));
        let (mut reader, mut writer) = server.connect().await.into_split();
        // 1 MiB, far beyond a Unix socket's buffer (net.core.wmem_default, ~208 KiB): the whole
        // write can only succeed if the server reads it all.
        let mut request = b"GET /live HTTP/1.0\r\nX-Padding: ".to_vec();
        request.resize(request.len() + (1 << 20), b'a');
        let write = tokio::spawn(async move { writer.write_all(&request).await });
        assert_eq!(code_of(&read_until_closed(&mut reader).await), 431);
        let written = tokio::time::timeout(PATIENCE, write).await.expect("the write never ended").unwrap();
        assert!(written.is_err(), "the server read the whole megabyte");
        server.assert_answers().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_client_does_not_hold_up_others() {
        // A deadline far beyond PATIENCE: a server that served one connection at a time would
        // leave the query below unanswered until the query gave up.
        let limits = Limits { timeout: Duration::from_secs(120), ..Limits::default() };
        let server = Server::start("slow", limits, status(Phase::Ready, None));
        let mut silent = server.connect().await;
        let mut dribbler = server.connect().await;
        dribbler.write_all(b"GET /li").await.unwrap();

        server.assert_answers().await;

        // Both slow clients were held open meanwhile, and are served when they finish.
        dribbler.write_all(b"ve HTTP/1.0\r\n\r\n").await.unwrap();
        assert_eq!(parse_response(&read_until_closed(&mut dribbler).await).unwrap(), (200, "live\n".into()));
        silent.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await.unwrap();
        assert_eq!(parse_response(&read_until_closed(&mut silent).await).unwrap(), (200, "ready\n".into()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slow_clients_are_cut_off_at_the_deadline() {
        let limits = Limits { timeout: Duration::from_millis(200), ..Limits::default() };
        let server = Server::start("deadline", limits, status(Phase::Ready, None));

        let mut silent = server.connect().await;
        assert_eq!(code_of(&read_until_closed(&mut silent).await), 408);

        // One byte every 10 ms, a head that never ends: the deadline counts from the accept, so
        // dribbling does not extend it (and the 8 KiB limit would take 80 s to reach).
        let (mut reader, mut writer) = server.connect().await.into_split();
        let dribble = tokio::spawn(async move {
            let head = b"GET /live HTTP/1.0\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
            for byte in head {
                if writer.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert_eq!(code_of(&read_until_closed(&mut reader).await), 408);
        tokio::time::timeout(PATIENCE, dribble).await.expect("writes kept succeeding").unwrap();
        server.assert_answers().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_beyond_the_cap_are_refused_and_the_server_recovers() {
        // Held connections never time out during the test, so the count is exact.
        let limits = Limits { timeout: Duration::from_secs(120), ..Limits::default() };
        let (cap, total) = (limits.max_connections, 200);
        let server = Server::start("cap", limits, status(Phase::Ready, None));
        let mut clients = Vec::new();
        for _ in 0..total {
            clients.push(server.connect().await);
            tokio::task::yield_now().await;
        }

        // None of them sends a byte. A server within its cap holds `cap` of them and refuses
        // the rest at once; one that held more would never refuse this many.
        let mut received = vec![Vec::new(); total];
        let mut closed = vec![false; total];
        wait_until("every connection beyond the cap to be refused", || {
            let mut chunk = [0u8; 1024];
            for (index, client) in clients.iter().enumerate() {
                while !closed[index] {
                    match client.try_read(&mut chunk) {
                        Ok(0) => closed[index] = true,
                        Ok(read) => received[index].extend_from_slice(&chunk[..read]),
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => closed[index] = true,
                        Err(error) => panic!("client {index}: {error}"),
                    }
                }
            }
            closed.iter().filter(|closed| **closed).count() >= total - cap
        })
        .await;
        for (index, response) in received.iter().enumerate().filter(|(index, _)| closed[*index]) {
            let (code, body) = parse_response(response).unwrap();
            assert_eq!((code, body.as_str()), (503, "busy: too many health connections\n"), "client {index}");
        }

        // The held ones are still being served, and are exactly `cap`.
        let mut served = 0;
        for (index, client) in clients.iter_mut().enumerate().filter(|(index, _)| !closed[*index]) {
            client.write_all(b"GET /live HTTP/1.0\r\n\r\n").await.unwrap();
            assert_eq!(code_of(&read_until_closed(client).await), 200, "client {index}");
            served += 1;
        }
        assert_eq!(served, cap);

        drop(clients);
        server.assert_answers().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn clients_that_leave_early_do_not_hurt_the_server() {
        let mut large = status(Phase::Ready, None);
        large.links = (0..20_000)
            .map(|nic| LinkStatus {
                interface: format!("eth{nic}"),
                nic,
                mode: "tc".into(),
                state: crate::status::LinkState::Up,
                repairs: 0,
            })
            .collect();
        // Far more than a socket buffer, so the server is mid-write when the client leaves.
        let size = respond(&Request::new("GET", "/status"), &large, large.started).body.len();
        assert!(size > 1 << 20, "the status is only {size} bytes");
        let server = Server::start("leave", Limits::default(), large);

        // Gone without a byte.
        drop(server.connect().await);
        // Gone mid-request.
        let mut client = server.connect().await;
        client.write_all(b"GET /sta").await.unwrap();
        drop(client);
        // Gone mid-response: the first bytes, then away.
        for _ in 0..3 {
            let mut client = server.connect().await;
            client.write_all(b"GET /status HTTP/1.0\r\n\r\n").await.unwrap();
            let mut first = [0u8; 12];
            tokio::time::timeout(PATIENCE, client.read_exact(&mut first)).await.unwrap().unwrap();
            assert_eq!(&first, b"HTTP/1.0 200");
            drop(client);
        }
        server.assert_answers().await;
    }

    /// Out of file descriptors, `accept` fails with EMFILE; the loop must back off and carry
    /// on. Exhausting descriptors would break the tests running beside this one, so the test
    /// runs itself again in a child process under a small `ulimit -n`.
    #[test]
    fn accept_errors_do_not_end_the_loop() {
        const CHILD: &str = "VIAL_HEALTH_TEST_EMFILE_CHILD";
        if std::env::var_os(CHILD).is_some() {
            return accept_errors_in_child();
        }
        // libtest names a test by its path without the crate's name.
        let full_name = concat!(module_path!(), "::accept_errors_do_not_end_the_loop");
        let name = full_name.split_once("::").map_or(full_name, |(_crate, name)| name);
        let output = std::process::Command::new("sh")
            .args(["-c", r#"ulimit -n 256 && exec "$0" "$@""#])
            .arg(std::env::current_exe().unwrap())
            .args([name, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("cannot run sh to lower the descriptor limit");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "the child test failed or did not run:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn accept_errors_in_child() {
        /// "Too many open files" (errno(3)); std has no ErrorKind for it.
        const EMFILE: i32 = 24;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let server = Server::start("emfile", Limits::default(), status(Phase::Ready, None));
            let mut reserve = Vec::new();
            loop {
                match std::fs::File::open("/dev/null") {
                    Ok(file) => reserve.push(file),
                    Err(error) if error.raw_os_error() == Some(EMFILE) => break,
                    Err(error) => panic!("opening /dev/null: {error}"),
                }
            }
            // One descriptor for the client's socket leaves none for the server's accept.
            reserve.pop();
            let mut client = server.connect().await;
            client.write_all(b"GET /live HTTP/1.0\r\n\r\n").await.unwrap();
            // Time for the server to fail a few accepts; nothing is measured.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!server.task.is_finished(), "an accept error ended the loop");
            drop(reserve);
            let response = read_until_closed(&mut client).await;
            assert_eq!(parse_response(&response).unwrap(), (200, "live\n".into()));
        });
    }

    #[test]
    fn run_check_without_a_supervisor_shows_the_last_status() {
        let dir = TempDir::new("gone");
        let socket = dir.0.join(crate::rundir::HEALTH);
        let (code, text) = run_check(&socket, Check::Ready, PATIENCE);
        assert_eq!(code, 1);
        assert!(text.contains("the supervisor is not running, or VIAL_RUN_DIR points elsewhere"), "{text}");
        assert!(text.contains(&socket.display().to_string()), "{text}");

        let last = status(Phase::Failed, Some(KILLED));
        persist_last_status(&dir.0, &last, last.started).unwrap();
        let expect_last_status = |text: &str| {
            let json = text
                .strip_prefix("supervisor not running; last status: ")
                .unwrap_or_else(|| panic!("no last status in {text:?}"));
            assert!(json.contains(r#""state":"failed""#), "{text}");
            assert!(json.contains(&format!(r#""reason":"{KILLED}""#)), "{text}");
        };
        for check in [Check::Live, Check::Ready, Check::Status] {
            let (code, text) = run_check(&socket, check, PATIENCE);
            assert_eq!(code, 1, "{check:?}");
            expect_last_status(&text);
        }

        // A socket file whose supervisor died without removing it refuses connections: the
        // same "not running".
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let (code, text) = run_check(&socket, Check::Live, PATIENCE);
        assert_eq!(code, 1);
        expect_last_status(&text);
    }

    #[test]
    fn last_status_is_written_whole_and_alone() {
        let dir = TempDir::new("persist");
        let target = dir.0.join("run");
        let mut last = status(Phase::Booting, None);
        persist_last_status(&target, &last, last.started).unwrap();
        last.phase = Phase::Stopped;
        persist_last_status(&target, &last, last.started).unwrap();
        let names: Vec<_> = std::fs::read_dir(&target)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [LAST_STATUS_NAME], "a temporary file was left behind");
        let text = std::fs::read_to_string(target.join(LAST_STATUS_NAME)).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 1, "{text:?}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["state"], "stopped");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bind_replaces_what_an_earlier_run_left() {
        let dir = TempDir::new("bind");
        let socket = dir.0.join("run").join("vial").join(crate::rundir::HEALTH);
        drop(bind(&socket).unwrap());
        assert!(socket.exists(), "the socket file outlives its listener");
        let last = status(Phase::Failed, Some(KILLED));
        persist_last_status(socket.parent().unwrap(), &last, last.started).unwrap();

        let _listener = bind(&socket).expect("a stale socket must not stop a new supervisor");
        assert!(!last_status_path(&socket).exists(), "the previous run's last status is gone");
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666, "health.sock is open to all, whatever the umask");

        // Anything but a socket is not ours to remove.
        let file = dir.0.join("not-a-socket");
        std::fs::write(&file, "precious").unwrap();
        assert!(matches!(bind(&file), Err(HealthError::Bind { .. })));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    }

    #[test]
    fn query_reports_bad_paths_bad_responses_and_timeouts() {
        let dir = TempDir::new("client");
        let socket = dir.0.join(crate::rundir::HEALTH);
        for path in ["live", "/live HTTP/1.1\r\nX-Injected: 1", "/a b", ""] {
            assert!(matches!(query(&socket, path, PATIENCE), Err(HealthError::InvalidPath(_))), "{path:?}");
        }

        // A peer that speaks something else, then one that closes at once, then one that
        // announces more body than it sends, then one that never answers.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let peer = std::thread::spawn(move || {
            let replies: [&[u8]; 3] =
                [b"SSH-2.0-OpenSSH_9.6\r\n", b"", b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nabc"];
            for reply in replies {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = [0u8; 256];
                let _ = stream.read(&mut request);
                stream.write_all(reply).unwrap();
            }
            let (mut stream, _) = listener.accept().unwrap();
            // Hold the connection, answering nothing, until the client gives up.
            let _ = std::io::copy(&mut stream, &mut std::io::sink());
        });
        for expected in ["unparsable head", "closed without a response", "3 bytes of the 10 announced"] {
            match query(&socket, "/live", PATIENCE) {
                Err(HealthError::BadResponse(why)) => assert!(why.contains(expected), "{why}"),
                other => panic!("expected a bad response ({expected}), got {other:?}"),
            }
        }
        let result = query(&socket, "/live", Duration::from_millis(200));
        assert!(matches!(result, Err(HealthError::Timeout { .. })), "{result:?}");
        peer.join().unwrap();
    }

    #[test]
    fn error_messages_chain_once() {
        let error = HealthError::Connect {
            path: "/run/vial/health.sock".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(
            error_chain(&error),
            "cannot connect to the health socket /run/vial/health.sock (the supervisor is not running, \
             or VIAL_RUN_DIR points elsewhere): entity not found"
        );
    }

    /// A person's standard tool must be able to read the socket. A machine without curl fails
    /// this test rather than skipping it.
    #[tokio::test(flavor = "current_thread")]
    async fn curl_reads_the_socket() {
        match std::process::Command::new("curl").arg("--version").output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => panic!("`curl --version` failed: {}", String::from_utf8_lossy(&output.stderr)),
            Err(error) => panic!(
                "curl is needed to test that a standard client reads the health socket, and \
                 cannot be run ({error}); install it (apt-get install curl)"
            ),
        }
        let server = Server::start("curl", Limits::default(), status(Phase::Booting, None));
        let curl = |args: &[&str]| {
            let mut command = std::process::Command::new("curl");
            command.args(["--silent", "--show-error", "--max-time", "10", "--unix-socket"]);
            command.arg(&server.socket).args(args);
            tokio::task::spawn_blocking(move || command.output().unwrap())
        };

        let output = curl(&["http://vial/status"]).await.unwrap();
        assert!(output.status.success(), "curl: {}", String::from_utf8_lossy(&output.stderr));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["state"], "booting");

        // --fail turns the 503 into curl's exit code 22, as a shell check would use it.
        let output = curl(&["--fail", "http://vial/ready"]).await.unwrap();
        assert_eq!(output.status.code(), Some(22), "{output:?}");

        // --head: the status line and headers, no body.
        let output = curl(&["--head", "http://vial/ready"]).await.unwrap();
        let head = String::from_utf8(output.stdout).unwrap();
        assert!(head.starts_with("HTTP/1.0 503 Service Unavailable\r\n"), "{head}");
        assert!(head.contains("Content-Length: 8\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
