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
//! This module never touches QEMU; it only moves bytes between two sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::config::{Forward, Protocol};

/// At most this many relayed TCP connections per port at once.
const MAX_TCP_CONNECTIONS: usize = 512;
/// At most this many UDP clients per port are remembered at once.
const MAX_UDP_CLIENTS: usize = 256;
/// A UDP client silent for this long is forgotten.
const UDP_IDLE: Duration = Duration::from_secs(120);

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

async fn relay_tcp(listener: TcpListener, target: SocketAddrV4) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "forward accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many forwarded connections; refusing one");
            continue;
        };
        tokio::spawn(async move {
            let _slot = slot;
            match TcpStream::connect(target).await {
                Ok(mut upstream) => {
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                        tracing::debug!(%peer, %err, "forwarded connection ended");
                    }
                }
                Err(err) => tracing::debug!(%peer, %target, %err, "qemu's forward is not listening"),
            }
        });
    }
}

async fn relay_udp(socket: Arc<UdpSocket>, target: SocketAddrV4) {
    // One connected loopback socket per client, so replies find their way back.
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            Some(peer) = gone_rx.recv() => { clients.remove(&peer); }
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
                        tracing::warn!(%peer, "too many udp forward clients; dropping a datagram");
                        continue;
                    }
                    let Ok(upstream) = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await else { continue };
                    if upstream.connect(target).await.is_err() {
                        continue;
                    }
                    let upstream = Arc::new(upstream);
                    clients.insert(peer, upstream.clone());
                    tokio::spawn(udp_replies(upstream, socket.clone(), peer, gone_tx.clone()));
                }
                if let Some(upstream) = clients.get(&peer) {
                    let _ = upstream.send(&buf[..n]).await;
                }
            }
        }
    }
}

async fn udp_replies(
    upstream: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    peer: SocketAddr,
    gone: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = socket.send_to(&buf[..n], peer).await;
    }
    let _ = gone.send(peer);
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
}
