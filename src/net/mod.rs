//! The container's interfaces. This file owns the management side: which address the
//! management interface has, so forwards listen there; it only reads and never changes an
//! interface. The data plane lives in the submodules:
//!
//! - `links`: which data links exist, in guest order, and waiting for them (netlink events);
//! - `tap`: TAP, macvtap and vhost-net descriptors for QEMU (the only file opening `/dev`);
//! - `plumb`: stitching one data link to one VM NIC per plumbing mode (plan, then apply);
//! - `selfcheck`: proof that a stitched link carries frames;
//! - `dataplane`: the links over the endpoint's life (wait, stitch, check, hot-plug, unplug).
//!
//! Nothing under `net` ever touches the management interface.

/// The data links over the endpoint's life: waiting, stitching, hot-plug and unplug.
pub mod dataplane;
/// Data link discovery and waiting.
pub mod links;
/// Stitching a data link to a VM NIC: plans per plumbing mode and their executor.
pub mod plumb;
/// The self-check that proves a stitched link carries frames.
pub mod selfcheck;
/// TAP, macvtap and vhost-net descriptors.
pub mod tap;

use std::net::Ipv4Addr;

/// Why the management address is unknown.
#[derive(Debug, thiserror::Error)]
pub enum MgmtError {
    /// Listing addresses failed.
    #[error("cannot list interface addresses")]
    List(#[source] nix::Error),
    /// The interface has no IPv4 address (or does not exist).
    #[error("management interface {iface} has no IPv4 address (present: {present}); give the container a network, or set VIAL_MGMT_IFACE")]
    NoAddress {
        /// The interface.
        iface: String,
        /// Interfaces that do have IPv4 addresses.
        present: String,
    },
}

/// The first IPv4 address of `iface`.
pub fn mgmt_address(iface: &str) -> Result<Ipv4Addr, MgmtError> {
    let mut present = Vec::new();
    for entry in nix::ifaddrs::getifaddrs().map_err(MgmtError::List)? {
        let Some(addr) = entry.address.as_ref().and_then(|a| a.as_sockaddr_in()) else { continue };
        if entry.interface_name == iface {
            return Ok(addr.ip());
        }
        present.push(format!("{}={}", entry.interface_name, addr.ip()));
    }
    Err(MgmtError::NoAddress {
        iface: iface.into(),
        present: if present.is_empty() { "none".into() } else { present.join(", ") },
    })
}

#[cfg(test)]
mod kernel_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_an_address_and_a_missing_interface_is_named() {
        assert_eq!(mgmt_address("lo").unwrap(), Ipv4Addr::LOCALHOST);
        let err = mgmt_address("vial-nope0").unwrap_err().to_string();
        assert!(err.contains("vial-nope0") && err.contains("lo=127.0.0.1"), "{err}");
    }
}
