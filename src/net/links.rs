//! The container's data links: which interfaces are data links, in which order they become VM
//! NICs, and waiting for orchestrators that add them after the container started. It reads
//! the kernel's link table over rtnetlink and its link events; it never changes an interface.
//!
//! Waiting is event driven: the watcher subscribes to `RTNLGRP_LINK` first, then dumps the
//! link table, then applies every event that follows (rtnetlink(7)). A change between the
//! subscription and the dump shows up twice, which is harmless because the state is keyed by
//! interface index; nothing is missed, and nothing polls.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::{Handle, MulticastGroup};
use tracing::{debug, info, warn};

/// Prefixes of the interfaces `vial` creates (TAPs, bridges, macvtaps; see `plumb`). They are
/// never data links, so a restart of the supervisor loop never stitches its own devices.
pub const OWN_PREFIXES: &[&str] = &["vtap", "vbr", "vmvt"];

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface name (`eth1`, `net2`).
    pub name: String,
    /// Interface index (stable while the interface exists; names can change).
    pub index: u32,
    /// MTU in bytes.
    pub mtu: u32,
    /// Hardware address (zero for interfaces without one).
    pub mac: [u8; 6],
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Has carrier (`IFF_LOWER_UP`): for a veth, its peer is up.
    pub carrier: bool,
}

/// A change in the set of data links, after the watcher started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A data link is there and up, and was not reported before.
    Added(Link),
    /// A reported data link is gone (deleted, moved to another namespace, or renamed; a
    /// renamed link that still is a data link comes back as `Added` under its new name).
    Removed(String),
    /// A reported data link gained or lost its carrier (its peer came up or went down).
    Carrier {
        /// The link.
        name: String,
        /// Whether it has carrier now.
        carrier: bool,
    },
}

/// Why the data links are not known.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The netlink socket for link events could not be opened or bound.
    #[error("cannot subscribe to link events")]
    Subscribe(#[source] std::io::Error),
    /// Dumping the link table failed.
    #[error("cannot list links")]
    Dump(#[source] rtnetlink::Error),
    /// The link event stream ended (the netlink connection closed).
    #[error("link events stopped")]
    Closed,
    /// Not enough data links came up in time.
    #[error(
        "timed out after {waited:?} waiting for {expected} data links: missing {missing}; present {present} \
         (management interface {mgmt} and vial's own devices excluded)",
        missing = missing.join(", "),
        present = if present.is_empty() { "none".to_string() } else { present.join(", ") }
    )]
    Timeout {
        /// How many were expected.
        expected: usize,
        /// How long it waited.
        waited: Duration,
        /// Names inferred as missing.
        missing: Vec<String>,
        /// Data links present, with `(down)` after those not up yet.
        present: Vec<String>,
        /// The management interface.
        mgmt: String,
    },
}

/// Whether `name` is one of `vial`'s own devices.
pub fn is_own(name: &str) -> bool {
    OWN_PREFIXES
        .iter()
        .any(|prefix| name.strip_prefix(prefix).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())))
}

/// Splits `eth10` into (`eth`, 10); names without a numeric suffix give `None`.
fn numbered(name: &str) -> Option<(&str, u64)> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 || digits > 18 {
        return None;
    }
    let (stem, number) = name.split_at(name.len() - digits);
    Some((stem, number.parse().ok()?))
}

/// The guest order: by numeric suffix (`eth2` before `eth10`), then by name; names without a
/// number go last.
fn order_key(name: &str) -> (u64, &str) {
    (numbered(name).map_or(u64::MAX, |(_, number)| number), name)
}

/// Whether `name` is named like a data link: `eth1`..`ethN` as Docker and containerlab name
/// them, `net1`..`netN` as Multus does. Anything else (`eth0`, bridges, a host's own
/// interfaces if `vial` is ever started outside a container) is never touched: stitching
/// redirects every frame of the interface into the VM.
pub fn is_data_link_name(name: &str) -> bool {
    match numbered(name) {
        Some(("eth" | "net", number)) => number >= 1 && !name[3..].starts_with('0'),
        _ => false,
    }
}

/// The data links among `all`: every `ethN`/`netN` (N ≥ 1) except the management interface,
/// in guest order (by numeric suffix, ties by name). Pure.
pub fn data_links(all: &[Link], mgmt: &str) -> Vec<Link> {
    let mut links: Vec<Link> = all
        .iter()
        .filter(|link| link.name != mgmt && !is_own(&link.name) && is_data_link_name(&link.name))
        .cloned()
        .collect();
    links.sort_by(|a, b| order_key(&a.name).cmp(&order_key(&b.name)));
    links
}

/// The names of the links missing for `expected` data links when `present` are there,
/// inferred from the naming scheme: the most common stem among the present names (`eth`
/// when there is none), numbered from 1, skipping the present ones. With `eth1` and `eth2`
/// present and 3 expected: `eth3`. Pure.
pub fn missing_links(present: &[Link], expected: usize) -> Vec<String> {
    let wanted = expected.saturating_sub(present.len());
    let mut stems: BTreeMap<&str, usize> = BTreeMap::new();
    for (stem, _) in present.iter().filter_map(|link| numbered(&link.name)) {
        *stems.entry(stem).or_default() += 1;
    }
    // Most common stem; on a tie, `eth` (the containerlab/Docker scheme) then alphabetical.
    let stem = stems
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then_with(|| (*b.0 != "eth").cmp(&(*a.0 != "eth"))).then_with(|| b.0.cmp(a.0)))
        .map_or("eth", |(stem, _)| stem);
    let names: BTreeSet<&str> = present.iter().map(|link| link.name.as_str()).collect();
    (1u64..).map(|n| format!("{stem}{n}")).filter(|name| !names.contains(name.as_str())).take(wanted).collect()
}

/// The `Link` a netlink link message describes; `None` when it lacks a name.
pub fn link_from_message(message: &LinkMessage) -> Option<Link> {
    let mut link = Link {
        name: String::new(),
        index: message.header.index,
        mtu: 0,
        mac: [0; 6],
        up: message.header.flags.contains(LinkFlags::Up),
        carrier: message.header.flags.contains(LinkFlags::LowerUp),
    };
    for attribute in &message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(address) if address.len() == 6 => link.mac.copy_from_slice(address),
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

/// Every interface in the calling thread's network namespace (one `RTM_GETLINK` dump).
pub async fn list_links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    debug!("RTM_GETLINK dump");
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(messages.iter().filter_map(link_from_message).collect())
}

/// Watches the link table: which data links exist now, and which come and go.
///
/// A data link counts once it is administratively up. Orchestrators (Docker's libnetwork,
/// containerlab, CNI plugins) create or move a link in under a temporary name, rename it while
/// it is down (the kernel refuses to rename an interface that is up: `dev_change_name`
/// returns EBUSY), then bring it up last; taking a link that is still down would race that
/// rename.
pub struct LinkWatcher {
    handle: Handle,
    events: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, rtnetlink::sys::SocketAddr)>,
    connection: tokio::task::JoinHandle<()>,
    mgmt: String,
    /// Every interface by index, as of the last dump plus events.
    table: BTreeMap<u32, Link>,
    /// Data links already handed out (by `wait_for` or as `Added`), by index, with the
    /// carrier last reported.
    reported: BTreeMap<u32, (String, bool)>,
    pending: VecDeque<LinkEvent>,
}

impl LinkWatcher {
    /// Subscribes to link events, then dumps the link table (through `handle`, a connection
    /// in the same network namespace). Must run inside a tokio runtime: the event
    /// connection is a spawned task, ended when the watcher is dropped.
    pub async fn start(handle: &Handle, mgmt: &str) -> Result<LinkWatcher, WaitError> {
        debug!("subscribing to RTNLGRP_LINK");
        let (mut connection, _, events) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(WaitError::Subscribe)?;
        // A burst of events (32 links arriving at once, each renamed and brought up) must not
        // overflow the socket; an overflow is survived anyway by dumping again (see `apply`).
        if let Err(err) = connection.socket_mut().socket_mut().set_rx_buf_sz(1 << 20) {
            debug!(%err, "cannot enlarge the link event buffer");
        }
        let connection = tokio::spawn(connection);
        let mut watcher = LinkWatcher {
            handle: handle.clone(),
            events,
            connection,
            mgmt: mgmt.to_string(),
            table: BTreeMap::new(),
            reported: BTreeMap::new(),
            pending: VecDeque::new(),
        };
        watcher.redump().await?;
        Ok(watcher)
    }

    /// Every interface known now, in index order.
    pub fn links(&self) -> Vec<Link> {
        self.table.values().cloned().collect()
    }

    /// Data links that are up, in guest order.
    pub fn ready(&self) -> Vec<Link> {
        data_links(&self.links(), &self.mgmt).into_iter().filter(|link| link.up).collect()
    }

    /// Waits until at least `expected` data links are up, then returns all that are (in
    /// guest order), and counts them as reported, so `next_event` only announces later ones.
    /// `expected = 0` takes what is there now. On timeout, the error lists the missing and
    /// the present links.
    pub async fn wait_for(&mut self, expected: usize, timeout: Duration) -> Result<Vec<Link>, WaitError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ready = self.ready();
            if ready.len() >= expected {
                for link in &ready {
                    self.reported.insert(link.index, (link.name.clone(), link.carrier));
                }
                // Whatever was queued is now covered by what this returns.
                self.pending.clear();
                let names: Vec<&str> = ready.iter().map(|link| link.name.as_str()).collect();
                info!(expected, links = ?names, "data links present");
                return Ok(ready);
            }
            match tokio::time::timeout_at(deadline, self.events.next()).await {
                Ok(Some((message, _))) => self.apply(message).await?,
                Ok(None) => return Err(WaitError::Closed),
                Err(_) => {
                    let present = data_links(&self.links(), &self.mgmt)
                        .iter()
                        .map(|link| if link.up { link.name.clone() } else { format!("{} (down)", link.name) })
                        .collect();
                    return Err(WaitError::Timeout {
                        expected,
                        waited: timeout,
                        missing: missing_links(&ready, expected),
                        present,
                        mgmt: self.mgmt.clone(),
                    });
                }
            }
        }
    }

    /// The next change to the data links: a link that came up (`Added`) or one that went away
    /// (`Removed`). Waits for as long as it takes; cancel-safe (events stay queued).
    pub async fn next_event(&mut self) -> Result<LinkEvent, WaitError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            match self.events.next().await {
                Some((message, _)) => self.apply(message).await?,
                None => return Err(WaitError::Closed),
            }
        }
    }

    /// Applies one netlink message to the table, then queues the events it implies.
    async fn apply(&mut self, message: NetlinkMessage<RouteNetlinkMessage>) -> Result<(), WaitError> {
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                if let Some(link) = link_from_message(&link) {
                    debug!(name = %link.name, index = link.index, up = link.up, "RTM_NEWLINK");
                    self.table.insert(link.index, link);
                }
            }
            // A port leaving a bridge is an RTM_DELLINK of family AF_BRIDGE (its bridge-port
            // state goes); the link itself stays.
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                if link.header.interface_family == netlink_packet_route::AddressFamily::Bridge =>
            {
                debug!(index = link.header.index, "RTM_DELLINK of a bridge port's state; the link stays");
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                debug!(index = link.header.index, "RTM_DELLINK");
                self.table.remove(&link.header.index);
            }
            // The socket buffer overflowed and events were lost: the table is stale, so it is
            // read again in full (netlink(7), ENOBUFS).
            NetlinkPayload::Overrun(_) => {
                warn!("link events overflowed; listing links again");
                self.redump().await?;
            }
            _ => {}
        }
        self.diff();
        Ok(())
    }

    async fn redump(&mut self) -> Result<(), WaitError> {
        let links = list_links(&self.handle).await.map_err(WaitError::Dump)?;
        self.table = links.into_iter().map(|link| (link.index, link)).collect();
        self.diff();
        Ok(())
    }

    /// Queues `Removed` for reported links that are gone or renamed, then `Added` for data
    /// links that are up and not reported yet.
    fn diff(&mut self) {
        let gone: Vec<u32> = self
            .reported
            .iter()
            .filter(|(index, (name, _))| self.table.get(index).is_none_or(|link| &link.name != name))
            .map(|(index, _)| *index)
            .collect();
        for index in gone {
            if let Some((name, _)) = self.reported.remove(&index) {
                info!(link = %name, "data link gone");
                self.pending.push_back(LinkEvent::Removed(name));
            }
        }
        for (index, (name, carrier)) in self.reported.iter_mut() {
            if let Some(link) = self.table.get(index).filter(|link| link.carrier != *carrier) {
                info!(link = %name, carrier = link.carrier, "data link carrier changed");
                *carrier = link.carrier;
                self.pending.push_back(LinkEvent::Carrier { name: name.clone(), carrier: link.carrier });
            }
        }
        for link in self.ready() {
            if let std::collections::btree_map::Entry::Vacant(entry) = self.reported.entry(link.index) {
                info!(link = %link.name, index = link.index, mtu = link.mtu, "data link added");
                entry.insert((link.name.clone(), link.carrier));
                self.pending.push_back(LinkEvent::Added(link));
            }
        }
    }
}

impl Drop for LinkWatcher {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Waits until `expected` data links are up in the calling thread's network namespace and
/// returns them in guest order (see `LinkWatcher::wait_for`). A supervisor that also wants
/// later changes keeps a `LinkWatcher` instead, so no event falls between the two.
pub async fn wait_for_links(
    handle: &Handle,
    mgmt: &str,
    expected: usize,
    timeout: Duration,
) -> Result<Vec<Link>, WaitError> {
    info!(expected, ?timeout, mgmt, "waiting for data links");
    LinkWatcher::start(handle, mgmt).await?.wait_for(expected, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, index: u32) -> Link {
        Link { name: name.into(), index, mtu: 1500, mac: [2, 0, 0, 0, 0, index as u8], up: true, carrier: true }
    }

    fn names(links: &[Link]) -> Vec<&str> {
        links.iter().map(|link| link.name.as_str()).collect()
    }

    #[test]
    fn data_links_are_ordered_by_number_and_exclude_lo_mgmt_and_our_own() {
        let all: Vec<Link> = ["lo", "eth0", "eth10", "eth2", "vtap1", "vbr1", "vmvt2", "eth1", "eth3"]
            .iter()
            .enumerate()
            .map(|(i, name)| link(name, i as u32 + 1))
            .collect();
        assert_eq!(names(&data_links(&all, "eth0")), ["eth1", "eth2", "eth3", "eth10"]);
    }

    #[test]
    fn multus_names_and_ties_and_unnumbered_names() {
        let all: Vec<Link> = ["net2", "eth0", "net1", "eth1", "foo", "net10"]
            .iter()
            .enumerate()
            .map(|(i, n)| link(n, i as u32))
            .collect();
        // eth1 and net1 tie on their number and are ordered by name; other names never count.
        assert_eq!(names(&data_links(&all, "eth0")), ["eth1", "net1", "net2", "net10"]);
        // eth0 is never a data link, whatever the management interface is.
        let all = vec![link("net0", 1), link("eth0", 2), link("net1", 3)];
        assert_eq!(names(&data_links(&all, "lo")), ["net1"]);
    }

    #[test]
    fn a_hosts_own_interfaces_are_never_data_links() {
        // What `vial` would see if started in a host's namespace by mistake.
        let all: Vec<Link> = ["lo", "eth0", "ens3", "br-9a60c0950193", "docker0", "vh24225x0", "eth01", "wlan0"]
            .iter()
            .enumerate()
            .map(|(i, n)| link(n, i as u32))
            .collect();
        assert!(data_links(&all, "lo").is_empty());
    }

    #[test]
    fn missing_links_follow_the_naming_scheme() {
        assert_eq!(missing_links(&[link("eth1", 1), link("eth2", 2)], 3), ["eth3"]);
        assert_eq!(missing_links(&[link("eth1", 1), link("eth3", 2)], 4), ["eth2", "eth4"]);
        assert_eq!(missing_links(&[link("net1", 1)], 3), ["net2", "net3"]);
        assert_eq!(missing_links(&[], 2), ["eth1", "eth2"]);
        assert!(missing_links(&[link("eth1", 1)], 1).is_empty());
        assert!(missing_links(&[link("eth1", 1), link("eth2", 2)], 1).is_empty());
    }

    #[test]
    fn own_devices_are_recognised() {
        for name in ["vtap1", "vbr32", "vmvt7"] {
            assert!(is_own(name), "{name}");
        }
        assert!(!is_own("eth1") && !is_own("veth1234"));
    }

    #[test]
    fn timeout_error_names_missing_and_present() {
        let err = WaitError::Timeout {
            expected: 3,
            waited: Duration::from_millis(300),
            missing: vec!["eth3".into()],
            present: vec!["eth1".into(), "eth2 (down)".into()],
            mgmt: "eth0".into(),
        };
        assert_eq!(
            err.to_string(),
            "timed out after 300ms waiting for 3 data links: missing eth3; present eth1, eth2 (down) \
             (management interface eth0 and vial's own devices excluded)"
        );
    }
}
