//! The data links' self-check: proof that a stitched link carries frames from the VM's side
//! to the wire, by one frame written where the guest would write it and seen leaving on the
//! link. It reads the kernel's state and sends that frame; it changes no interface.

use std::os::fd::AsFd;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::plumb::{PlumbError, Stitch};
use crate::sys;

/// How long [`self_check`] waits for its frame on the link.
pub const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often [`self_check`] sends its frame again while it has not seen it leave.
pub const SELF_CHECK_RESEND: Duration = Duration::from_millis(250);
/// The self-check frame's ethertype: IEEE 802 "local experimental ethertype 1".
pub const SELF_CHECK_ETHERTYPE: u16 = 0x88b5;

/// The self-check frame of VM NIC `nic`: to and from locally administered addresses no
/// interface has (02:76:69:61:6c = "vial"), IEEE local experimental ethertype, a payload that
/// names it, padded to the Ethernet minimum. Pure.
pub fn self_check_frame(nic: u32, nonce: u64) -> Vec<u8> {
    let mut frame = vec![0x02, 0x76, 0x69, 0x61, 0x6c, 0xff, 0x02, 0x76, 0x69, 0x61, 0x6c, nic.min(254) as u8];
    frame.extend_from_slice(&SELF_CHECK_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(format!("vial self-check nic {nic} nonce {nonce:016x}").as_bytes());
    frame.resize(frame.len().max(60), 0);
    frame
}

/// What `self_check` proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfCheck {
    /// The frame written at the VM's side left on the link.
    Passed,
    /// The link has no carrier (the other end of a veth is down, or a cable is out): nothing
    /// can leave on it, so nothing was sent and nothing is proven. Frames are dropped before
    /// any packet socket sees them (the device runs `noop` qdisc without carrier).
    NoCarrier,
}

/// `name`'s carrier (`IFF_LOWER_UP`) and operational state (`IFF_RUNNING`), from the
/// kernel's link table.
fn carrier_and_running(name: &str) -> Result<(bool, bool), nix::Error> {
    use nix::net::if_::InterfaceFlags;
    let flags = nix::ifaddrs::getifaddrs()?
        .filter(|entry| entry.interface_name == name)
        .fold(InterfaceFlags::empty(), |flags, entry| flags | entry.flags);
    Ok((flags.contains(InterfaceFlags::IFF_LOWER_UP), flags.contains(InterfaceFlags::IFF_RUNNING)))
}

/// Proves the plumbing carries frames from the VM's side to the wire: writes one frame into
/// the stitch's descriptor (as the guest would send it) and waits for it to leave on the
/// link, seen by an `AF_PACKET` socket as `PACKET_OUTGOING` (packet(7)). Works the same in
/// every mode. Side effect: one 60-byte frame with ethertype 0x88b5 (IEEE local experimental)
/// on each data link at start (rarely a few: it is sent again every `SELF_CHECK_RESEND` until
/// seen), unicast to 02:76:69:61:6c:ff, which no interface has. A link
/// without carrier is reported as such, not as a failure: its peer may simply not be up yet.
pub async fn self_check(stitch: &Stitch) -> Result<SelfCheck, PlumbError> {
    let io_error = |source| PlumbError::SelfCheck { link: stitch.link.name.clone(), nic: stitch.nic, source };
    // Carrier is set at once when a veth's peer comes up, but the device only gets its real
    // qdisc (dev_activate), and `IFF_RUNNING`, from the link-watch work, up to a second later
    // (net/core/link_watch.c); until then every frame sent is dropped. A bridge likewise
    // enables a port (br_port_carrier_check) only once link-watch reports it up. So: no carrier
    // on the link means nothing to prove; otherwise wait until the link and the device run.
    let deadline = tokio::time::Instant::now() + SELF_CHECK_TIMEOUT;
    loop {
        let (carrier, link_running) = carrier_and_running(&stitch.link.name).map_err(|err| io_error(err.into()))?;
        if !carrier {
            warn!(link = %stitch.link.name, nic = stitch.nic, "link has no carrier; self-check skipped");
            return Ok(SelfCheck::NoCarrier);
        }
        let (_, device_running) = carrier_and_running(&stitch.device).map_err(|err| io_error(err.into()))?;
        if (link_running && device_running) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let socket = sys::packet_socket(stitch.link.index).map_err(io_error)?;
    nix::fcntl::fcntl(&socket, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|err| io_error(err.into()))?;
    let socket = sys::async_fd(socket).map_err(io_error)?;

    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let frame = self_check_frame(stitch.nic, nonce);
    // The descriptor carries a virtio-net header (see `tap`); QEMU may have changed its
    // length already, so it is asked each time. An all-zero header means no offload.
    let header = sys::tun_vnet_hdr_len(stitch.fd.as_fd()).map_err(io_error)?;
    let mut message = vec![0u8; header];
    message.extend_from_slice(&frame);

    let mut buf = vec![0u8; 2048];
    let watch = async {
        // The same frame again every SELF_CHECK_RESEND until one is seen: a device can still
        // be settling when the check starts (a bridge port that link-watch has not enabled
        // yet drops it), and one lost frame must not fail the endpoint.
        let mut resend = tokio::time::interval(SELF_CHECK_RESEND);
        let mut sent = 0u32;
        loop {
            tokio::select! {
                _ = resend.tick() => {
                    sent += 1;
                    debug!(device = %stitch.device, link = %stitch.link.name, header, sent, "writing the self-check frame");
                    nix::unistd::write(&stitch.fd, &message)?;
                }
                ready = socket.readable() => {
                    let mut ready = ready?;
                    match ready.try_io(|socket| sys::packet_recv(socket.as_fd(), &mut buf)) {
                        Ok(Ok(meta)) if meta.outgoing && buf[..meta.len] == frame[..] => return Ok(sent),
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return Err(err),
                        Err(_would_block) => {}
                    }
                }
            }
        }
    };
    let outcome = tokio::time::timeout(SELF_CHECK_TIMEOUT, watch).await;
    // Closing a packet socket waits for an RCU grace period (packet_release calls
    // synchronize_net), ~15 ms here. Done on the supervisor's one thread that would make the
    // checks of N links take N grace periods even when run side by side; on the blocking
    // pool the closes overlap.
    let socket = socket.into_inner();
    tokio::task::spawn_blocking(move || drop(socket));
    match outcome {
        Ok(Ok(sent)) => {
            info!(link = %stitch.link.name, nic = stitch.nic, sent, "self-check frame left on the link");
            Ok(SelfCheck::Passed)
        }
        Ok(Err(err)) => Err(io_error(err)),
        Err(_) => Err(PlumbError::SelfCheckLost {
            device: stitch.device.clone(),
            link: stitch.link.name.clone(),
            waited: SELF_CHECK_TIMEOUT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_check_frame_is_experimental_and_padded() {
        let frame = self_check_frame(3, 0xabc);
        assert_eq!(frame.len(), 60);
        assert_eq!(&frame[12..14], &[0x88, 0xb5]);
        assert_eq!(frame[0] & 0x03, 0x02, "locally administered unicast");
        assert!(String::from_utf8_lossy(&frame).contains("vial self-check nic 3 nonce 0000000000000abc"));
    }
}
