//! Management forwards from the container's management address into the guest.
//!
//! QEMU's `hostfwd` listens on 127.0.0.1 only, and `vial` relays each forwarded port from the
//! management address to it. Why not let QEMU listen on eth0 directly: libslirp presents a
//! forwarded connection to the guest with the client's real source address unless the client
//! is on loopback, in which case the guest sees the virtual gateway (10.0.2.2). With
//! `restrict=on` libslirp's DHCP hands out no router, so the guest cannot answer a client
//! from another network, and appliances with static management routes have the same
//! problem. Coming from loopback, every reply stays on the guest's own subnet. vrnetlab and
//! Antidote's images put socat in front of QEMU for the same reason.
//!
//! Every relay is bounded, so that nobody on the management network can lock the others out
//! or run vial out of descriptors:
//! - **TCP**: at most [`MAX_TCP_CONNECTIONS`] relayed connections per port. When a new client
//!   arrives and the port is full, the connection that has been silent longest (no byte in
//!   either direction) is closed to make room: a new client is always served, and a flood of
//!   idle connections only ever evicts itself. A connection silent for [`TCP_IDLE`] is closed
//!   as well (dead peers, forgotten sessions). An accept that fails for want of descriptors
//!   evicts too, so the listener never spins on a full table.
//! - **UDP**: at most [`MAX_UDP_CLIENTS`] remembered clients per port (each has a loopback
//!   socket towards QEMU, so replies find their way back); a client silent in both directions
//!   for [`UDP_IDLE`] is forgotten, and a new client on a full port evicts the one silent
//!   longest.
//!
//! This module never touches QEMU; it only moves bytes between two sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

use crate::config::{Forward, Protocol};

/// At most this many relayed TCP connections per port at once (each costs vial two
/// descriptors and QEMU one); a new client past it evicts the longest-silent connection.
pub const MAX_TCP_CONNECTIONS: usize = 256;
/// A relayed TCP connection with no byte in either direction for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(3600);
/// At most this many UDP clients per port are remembered at once.
pub const MAX_UDP_CLIENTS: usize = 256;
/// A UDP client silent in both directions for this long is forgotten.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// How long QEMU's loopback listener gets to accept a relayed connection.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(10);

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {protocol} {address} for a management forward (is another process using the port?)")]
pub struct BindError {
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The address.
    pub address: SocketAddrV4,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Where QEMU listens for `forward`: loopback, same port.
pub fn loopback_target(forward: &Forward) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::LOCALHOST, forward.container_port)
}

/// A bound relay, ready to run.
pub enum Relay {
    /// A TCP relay.
    Tcp(TcpListener, SocketAddrV4),
    /// A UDP relay.
    Udp(Arc<UdpSocket>, SocketAddrV4),
}

/// Binds every forward on `mgmt` (before QEMU starts, so a port conflict is a setup error).
pub async fn bind_all(mgmt: Ipv4Addr, forwards: &[Forward]) -> Result<Vec<Relay>, BindError> {
    let mut relays = Vec::new();
    for forward in forwards {
        let address = SocketAddrV4::new(mgmt, forward.container_port);
        let target = loopback_target(forward);
        let relay = match forward.protocol {
            Protocol::Tcp => TcpListener::bind(address)
                .await
                .map(|l| Relay::Tcp(l, target))
                .map_err(|source| BindError { protocol: "tcp", address, source })?,
            Protocol::Udp => UdpSocket::bind(address)
                .await
                .map(|s| Relay::Udp(Arc::new(s), target))
                .map_err(|source| BindError { protocol: "udp", address, source })?,
        };
        relays.push(relay);
    }
    Ok(relays)
}

/// Runs every relay as a task of its own.
pub fn spawn_all(relays: Vec<Relay>) {
    for relay in relays {
        match relay {
            Relay::Tcp(listener, target) => {
                tokio::spawn(relay_tcp(listener, target));
            }
            Relay::Udp(socket, target) => {
                tokio::spawn(relay_udp(socket, target));
            }
        }
    }
}

/// When each relayed connection of one port last moved a byte, and how to close it.
#[derive(Default)]
struct Table {
    next_id: u64,
    connections: HashMap<u64, Connection>,
}

struct Connection {
    /// Milliseconds since the relay's epoch at the last byte either way.
    last_active: Arc<AtomicU64>,
    /// Dropping or sending closes the connection.
    evict: oneshot::Sender<()>,
}

impl Table {
    /// Closes the connection silent longest; false when there is none.
    fn evict_longest_idle(&mut self) -> bool {
        let oldest =
            self.connections.iter().min_by_key(|(_, conn)| conn.last_active.load(Ordering::Relaxed)).map(|(id, _)| *id);
        match oldest.and_then(|id| self.connections.remove(&id)) {
            Some(conn) => {
                let _ = conn.evict.send(());
                true
            }
            None => false,
        }
    }
}

/// A relay's clock: milliseconds since its start (an `AtomicU64` holds it).
fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn relay_tcp(listener: TcpListener, target: SocketAddrV4) {
    let epoch = Instant::now();
    let table = Arc::new(Mutex::new(Table::default()));
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE/ENFILE leave the connection in the backlog: free a slot, or the
                // listener would wake at once, again and again.
                let evicted = table.lock().map(|mut t| t.evict_longest_idle()).unwrap_or(false);
                tracing::warn!(%err, evicted, "forward accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (evict_tx, evict_rx) = oneshot::channel();
        let last_active = Arc::new(AtomicU64::new(millis_since(epoch)));
        let id = {
            let Ok(mut table) = table.lock() else { return };
            if table.connections.len() >= MAX_TCP_CONNECTIONS && table.evict_longest_idle() {
                tracing::info!(%peer, limit = MAX_TCP_CONNECTIONS, "forward full; closed its longest-silent connection");
            }
            let id = table.next_id;
            table.next_id += 1;
            table.connections.insert(id, Connection { last_active: last_active.clone(), evict: evict_tx });
            id
        };
        let table = table.clone();
        tokio::spawn(async move {
            relay_connection(client, peer, target, epoch, last_active, evict_rx).await;
            if let Ok(mut table) = table.lock() {
                table.connections.remove(&id);
            }
        });
    }
}

/// Moves bytes both ways until both sides are done, the connection is evicted, or it has
/// been silent for [`TCP_IDLE`].
async fn relay_connection(
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddrV4,
    epoch: Instant,
    last_active: Arc<AtomicU64>,
    evicted: oneshot::Receiver<()>,
) {
    let mut upstream = match tokio::time::timeout(UPSTREAM_CONNECT, TcpStream::connect(target)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(err)) => return tracing::debug!(%peer, %target, %err, "qemu's forward is not listening"),
        Err(_) => return tracing::debug!(%peer, %target, "qemu's forward did not accept in time"),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let both_ways = async {
        tokio::join!(
            pump(client_read, upstream_write, epoch, &last_active),
            pump(upstream_read, client_write, epoch, &last_active)
        )
    };
    let idle = async {
        loop {
            let silent = Duration::from_millis(millis_since(epoch).saturating_sub(last_active.load(Ordering::Relaxed)));
            if silent >= TCP_IDLE {
                return;
            }
            tokio::time::sleep(TCP_IDLE - silent).await;
        }
    };
    tokio::select! {
        _ = both_ways => tracing::debug!(%peer, "forwarded connection ended"),
        _ = evicted => tracing::debug!(%peer, "forwarded connection evicted"),
        () = idle => tracing::debug!(%peer, idle = ?TCP_IDLE, "forwarded connection closed: idle"),
    }
}

/// Copies `from` to `to` until end of file (then half-closes `to`) or an error, stamping
/// `last_active` at every chunk.
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    epoch: Instant,
    last_active: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                last_active.store(millis_since(epoch), Ordering::Relaxed);
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

/// One UDP client's way to QEMU.
struct UdpSession {
    /// Tells [`udp_replies`]'s end apart from a newer session of the same client.
    id: u64,
    upstream: Arc<UdpSocket>,
    last_active: Arc<AtomicU64>,
    replies: tokio::task::JoinHandle<()>,
}

async fn relay_udp(socket: Arc<UdpSocket>, target: SocketAddrV4) {
    let epoch = Instant::now();
    let mut clients: HashMap<SocketAddr, UdpSession> = HashMap::new();
    let mut next_id = 0u64;
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            Some((peer, id)) = gone_rx.recv() => {
                if clients.get(&peer).is_some_and(|session| session.id == id) {
                    clients.remove(&peer);
                }
            }
            received = socket.recv_from(&mut buf) => {
                let (n, peer) = match received {
                    Ok(r) => r,
                    Err(err) => {
                        tracing::debug!(%err, "forward recv failed");
                        continue;
                    }
                };
                if !clients.contains_key(&peer) {
                    if clients.len() >= MAX_UDP_CLIENTS {
                        let oldest = clients
                            .iter()
                            .min_by_key(|(_, session)| session.last_active.load(Ordering::Relaxed))
                            .map(|(addr, _)| *addr);
                        if let Some(session) = oldest.and_then(|addr| clients.remove(&addr)) {
                            session.replies.abort();
                            tracing::info!(%peer, limit = MAX_UDP_CLIENTS, "udp forward full; forgot its longest-silent client");
                        }
                    }
                    let Ok(upstream) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await else { continue };
                    if upstream.connect(target).await.is_err() {
                        continue;
                    }
                    let upstream = Arc::new(upstream);
                    let last_active = Arc::new(AtomicU64::new(millis_since(epoch)));
                    let id = next_id;
                    next_id += 1;
                    let replies = tokio::spawn(udp_replies(
                        upstream.clone(),
                        socket.clone(),
                        peer,
                        (epoch, last_active.clone()),
                        (gone_tx.clone(), id),
                    ));
                    clients.insert(peer, UdpSession { id, upstream, last_active, replies });
                }
                if let Some(session) = clients.get(&peer) {
                    session.last_active.store(millis_since(epoch), Ordering::Relaxed);
                    let _ = session.upstream.send(&buf[..n]).await;
                }
            }
        }
    }
}

/// Sends QEMU's replies back to `peer` until the session has been silent both ways for
/// [`UDP_IDLE`].
async fn udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    (epoch, last_active): (Instant, Arc<AtomicU64>),
    (gone, id): (tokio::sync::mpsc::UnboundedSender<(SocketAddr, u64)>, u64),
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let silent = Duration::from_millis(millis_since(epoch).saturating_sub(last_active.load(Ordering::Relaxed)));
        if silent >= UDP_IDLE {
            break;
        }
        match tokio::time::timeout(UDP_IDLE - silent, upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                last_active.store(millis_since(epoch), Ordering::Relaxed);
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    let _ = gone.send((peer, id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread")]
    async fn tcp_and_udp_are_relayed_to_loopback() {
        // Stand-ins for QEMU's hostfwd listeners on 127.0.0.1.
        let echo_tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = echo_tcp.local_addr().unwrap().port();
        let echo_udp = UdpSocket::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo_tcp.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = echo_udp.recv_from(&mut buf).await.unwrap();
            echo_udp.send_to(&buf[..n], from).await.unwrap();
        });
        // The "management address" here is another loopback address, on the same port.
        let mgmt = Ipv4Addr::new(127, 0, 0, 2);
        let forwards = [
            Forward { protocol: Protocol::Tcp, container_port: port, guest_port: 1 },
            Forward { protocol: Protocol::Udp, container_port: port, guest_port: 1 },
        ];
        spawn_all(bind_all(mgmt, &forwards).await.unwrap());

        let mut client = TcpStream::connect((mgmt, port)).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"hello");

        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.send_to(b"snmp", (mgmt, port)).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), udp.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"snmp");
        assert_eq!(from, SocketAddr::from((mgmt, port)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_port_in_use_is_a_bind_error_naming_it() {
        let taken = TcpListener::bind("127.0.0.3:0").await.unwrap();
        let port = taken.local_addr().unwrap().port();
        let forwards = [Forward { protocol: Protocol::Tcp, container_port: port, guest_port: 22 }];
        let err = bind_all(Ipv4Addr::new(127, 0, 0, 3), &forwards).await.err().unwrap();
        assert!(err.to_string().contains(&format!("127.0.0.3:{port}")), "{err}");
    }

    /// The acceptance test: 600 idle TCP connections to a forward (more than
    /// [`MAX_TCP_CONNECTIONS`]) do not keep a new client from being served, and the relay holds
    /// no more than its limit towards QEMU once it has caught up.
    #[tokio::test(flavor = "current_thread")]
    async fn six_hundred_idle_connections_do_not_lock_out_a_new_client() {
        const IDLE_CLIENTS: usize = 600;
        // The test holds both ends of every connection: 600 clients, up to 256 relayed pairs
        // and QEMU's stand-in's side; more than a soft limit of 1024.
        crate::limits::raise_fd_limit().unwrap();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        let upstream_open = Arc::new(AtomicU64::new(0));
        let open = upstream_open.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                let open = open.clone();
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let mgmt = Ipv4Addr::new(127, 0, 0, 4);
        let forwards = [Forward { protocol: Protocol::Tcp, container_port: port, guest_port: 22 }];
        spawn_all(bind_all(mgmt, &forwards).await.unwrap());

        let mut idle = Vec::with_capacity(IDLE_CLIENTS);
        for _ in 0..IDLE_CLIENTS {
            idle.push(TcpStream::connect((mgmt, port)).await.unwrap());
        }
        let mut client = TcpStream::connect((mgmt, port)).await.unwrap();
        let served = async {
            client.write_all(b"SSH-2.0-test\r\n").await.unwrap();
            let mut reply = [0u8; 14];
            client.read_exact(&mut reply).await.unwrap();
            reply
        };
        let reply = tokio::time::timeout(Duration::from_secs(30), served).await.expect("the new client was served");
        assert_eq!(&reply, b"SSH-2.0-test\r\n");
        testkit::wait_until_async(Duration::from_secs(30), "the relay to hold at most its limit", || {
            (upstream_open.load(Ordering::SeqCst) as usize <= MAX_TCP_CONNECTIONS).then_some(())
        })
        .await;
        drop(idle);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_udp_forward_forgets_its_longest_silent_client() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                echo.send_to(&buf[..n], from).await.unwrap();
            }
        });
        let mgmt = Ipv4Addr::new(127, 0, 0, 5);
        let forwards = [Forward { protocol: Protocol::Udp, container_port: port, guest_port: 161 }];
        spawn_all(bind_all(mgmt, &forwards).await.unwrap());
        let mut silent = Vec::new();
        for _ in 0..MAX_UDP_CLIENTS + 10 {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            socket.send_to(b"x", (mgmt, port)).await.unwrap();
            silent.push(socket);
        }
        let fresh = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        fresh.send_to(b"snmp", (mgmt, port)).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = tokio::time::timeout(Duration::from_secs(30), fresh.recv_from(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"snmp");
    }
}
