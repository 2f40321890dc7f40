//! Stitching one container data link to one VM NIC, per plumbing mode. `plan` decides the
//! kernel steps as plain data; `stitch` carries them out over rtnetlink and records how to
//! undo each, so `unstitch` (or a failed `stitch`) removes exactly what was made. `plan`
//! never touches the kernel; nothing here ever touches the management interface, and the
//! data link itself only gains an ingress qdisc (tc), a bridge master (bridge) or a macvtap
//! upper device (macvtap), never a new MTU, address or admin state.
//!
//! Modes (the README's "Data plane modes" says what each passes):
//!
//! - `tc`: a TAP; an ingress qdisc on the link and on the TAP, each with a match-all filter
//!   whose action is `mirred egress redirect` to the other. Every frame passes, LACP and STP
//!   included; nothing learns. The classifier is `matchall` where the kernel has it, else `u32`
//!   with one all-zero key (`u32 match u32 0 0`), probed once per process.
//! - `bridge`: a Linux bridge per link with the link and a TAP as ports, STP off, forward delay
//!   0, ageing 0 (every frame floods to the one other port: a hub, so no MAC ever gets stuck on
//!   the wrong side), `group_fwd_mask` 0xfff8 so every link-local group the kernel allows
//!   passes (LLDP, 802.1X EAPOL, ...), and `br_netfilter` off in the namespace so malformed
//!   IPv4 is not dropped. The kernel refuses bits 0-2 of that mask (br_sysfs_br.c,
//!   BR_GROUPFWD_RESTRICTED): LACP (01:80:c2:00:00:02) is never forwarded and MAC pause
//!   (…:01) never either. STP BPDUs (…:00) are forwarded while the bridge's own STP is off
//!   (br_input.c: "If STP is turned off, then must forward to keep loop detection"), so a
//!   bridge passes STP but not LACP.
//! - `macvtap`: a macvtap in passthru mode on the link (the link goes promiscuous), in
//!   allmulticast mode so every multicast reaches the guest; QEMU gets its `/dev/tapN`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use futures::StreamExt;
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, BridgeStpState, In6AddrGenMode, LinkAttribute, MacVtapMode,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType,
    TcAttribute, TcFilterMatchAll, TcFilterMatchAllOption, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption,
};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::{Handle, LinkBridge, LinkMacVtap, LinkMessageBuilder, LinkUnspec};
use tracing::{debug, info, warn};

use super::links::Link;
use super::tap::{self, TapError};
use crate::config::Plumbing;
use crate::vm::argv::{DataNic, NicBackend};

/// The bridge's `group_fwd_mask`: every IEEE link-local group (01:80:c2:00:00:0X, bit X) the
/// kernel lets a bridge forward, 802.1X EAPOL (bit 3) and LLDP (bit 14) among them. Bits 0-2
/// (STP, MAC pause, LACP) it refuses (BR_GROUPFWD_RESTRICTED).
pub const GROUP_FWD_MASK: u16 = 0xfff8;

/// The `br_netfilter` switches of a network namespace: while one is 1 (the default once
/// the module is loaded, as Docker loads it), the bridge hands frames of that family to
/// iptables, and first drops IPv4 it finds malformed (br_validate_ipv4).
pub const BRIDGE_NF_SYSCTLS: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
];

/// Priority of the redirect filters (lower numbers match first; these are the only filters).
const FILTER_PRIORITY: u16 = 1;
/// Priority of the short-lived probe filter.
const PROBE_PRIORITY: u16 = 0xfff0;
/// `ETH_P_ALL` in network byte order, as tc filters take their protocol (`protocol all`).
const PROTOCOL_ALL: u16 = 0x0003u16.to_be();

/// The TAP of VM NIC `nic` (1-based).
pub fn tap_name(nic: u32) -> String {
    format!("vtap{nic}")
}

/// The bridge of VM NIC `nic` in bridge mode.
pub fn bridge_name(nic: u32) -> String {
    format!("vbr{nic}")
}

/// The macvtap of VM NIC `nic` in macvtap mode.
pub fn macvtap_name(nic: u32) -> String {
    format!("vmvt{nic}")
}

/// The tc classifier the redirect filters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classifier {
    /// `matchall` (cls_matchall): matches every frame by definition.
    Matchall,
    /// `u32` (cls_u32) with one key of mask 0: matches every frame.
    U32,
}

impl Classifier {
    /// The kernel's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Classifier::Matchall => "matchall",
            Classifier::U32 => "u32",
        }
    }
}

/// One kernel step of a plan. Devices are named; the executor resolves names to indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    /// Create a TAP through `/dev/net/tun` (`create_tap`); its descriptor goes to QEMU.
    CreateTap {
        /// Its name.
        name: String,
    },
    /// Create a Linux bridge, down, with STP off and forward delay 0.
    CreateBridge {
        /// Its name.
        name: String,
        /// `IFLA_BR_GROUP_FWD_MASK`.
        group_fwd_mask: u16,
        /// `IFLA_BR_AGEING_TIME` in centiseconds (0: entries expire at once, so it floods).
        ageing_time: u32,
    },
    /// Create a macvtap in passthru mode on a link.
    CreateMacvtap {
        /// Its name.
        name: String,
        /// The lower link.
        link: String,
        /// Its MTU.
        mtu: u32,
    },
    /// Stop the kernel from giving a device an IPv6 link-local address
    /// (`IFLA_INET6_ADDR_GEN_MODE` none), so it never sends router solicitations or MLD
    /// reports of its own into the data plane.
    NoIpv6 {
        /// The device.
        dev: String,
    },
    /// Turn `br_netfilter` off in the endpoint's namespace ([`BRIDGE_NF_SYSCTLS`]), so the
    /// bridge passes what the wire carries, malformed IPv4 included. Where `/proc/sys` is
    /// read-only (a container) and they are on, a warning names the `--sysctl` options that
    /// do it.
    NoBridgeNetfilter,
    /// Set a device's MTU.
    SetMtu {
        /// The device.
        dev: String,
        /// The MTU.
        mtu: u32,
    },
    /// Receive every multicast frame (`IFF_ALLMULTI`).
    SetAllmulti {
        /// The device.
        dev: String,
    },
    /// Make a device a port of a bridge.
    Enslave {
        /// The port.
        dev: String,
        /// The bridge.
        bridge: String,
    },
    /// Bring a device up.
    SetUp {
        /// The device.
        dev: String,
    },
    /// Add the ingress qdisc (`tc qdisc add dev X ingress`).
    AddIngress {
        /// The device.
        dev: String,
    },
    /// Redirect every frame arriving on `from` out of `to` (`tc filter add dev FROM ingress
    /// protocol all <match-all> action mirred egress redirect dev TO`).
    Redirect {
        /// Where frames arrive.
        from: String,
        /// Where they leave.
        to: String,
    },
    /// Open a macvtap's character device (`open_macvtap`); the descriptor goes to QEMU.
    OpenMacvtap {
        /// The macvtap.
        name: String,
    },
}

/// The steps that stitch `link` to VM NIC `nic` in `mode`. Pure.
pub fn plan(mode: Plumbing, link: &Link, nic: u32) -> Vec<NetOp> {
    let tap = tap_name(nic);
    let mtu = link.mtu;
    let dev = |name: &str| name.to_string();
    match mode {
        Plumbing::Tc => vec![
            NetOp::CreateTap { name: tap.clone() },
            NetOp::NoIpv6 { dev: tap.clone() },
            NetOp::SetMtu { dev: tap.clone(), mtu },
            NetOp::SetUp { dev: tap.clone() },
            NetOp::AddIngress { dev: link.name.clone() },
            NetOp::AddIngress { dev: tap.clone() },
            NetOp::Redirect { from: link.name.clone(), to: tap.clone() },
            NetOp::Redirect { from: tap, to: link.name.clone() },
        ],
        Plumbing::Bridge => {
            let bridge = bridge_name(nic);
            vec![
                NetOp::CreateTap { name: tap.clone() },
                NetOp::NoIpv6 { dev: tap.clone() },
                NetOp::SetMtu { dev: tap.clone(), mtu },
                NetOp::NoBridgeNetfilter,
                NetOp::CreateBridge { name: bridge.clone(), group_fwd_mask: GROUP_FWD_MASK, ageing_time: 0 },
                NetOp::NoIpv6 { dev: bridge.clone() },
                NetOp::SetMtu { dev: bridge.clone(), mtu },
                NetOp::Enslave { dev: tap.clone(), bridge: bridge.clone() },
                NetOp::Enslave { dev: dev(&link.name), bridge: bridge.clone() },
                NetOp::SetUp { dev: tap },
                NetOp::SetUp { dev: bridge },
            ]
        }
        Plumbing::Macvtap => {
            let macvtap = macvtap_name(nic);
            vec![
                NetOp::CreateMacvtap { name: macvtap.clone(), link: link.name.clone(), mtu },
                NetOp::NoIpv6 { dev: macvtap.clone() },
                // A macvtap only passes the multicast groups on its own list, and nobody
                // (QEMU included) puts the guest's groups there: LLDP, LACP, STP, IPv6
                // neighbour discovery would be dropped (macvlan.c, macvlan_compute_filter).
                NetOp::SetAllmulti { dev: macvtap.clone() },
                NetOp::SetUp { dev: macvtap.clone() },
                NetOp::OpenMacvtap { name: macvtap },
            ]
        }
    }
}

/// The steps that stitch `link` again to the TAP (and bridge) kept for VM NIC `nic`: when
/// the link returns after it vanished, or when the plumbing was found broken after ready.
/// tc: both ingress qdiscs (deleted first) with their redirects, both ways; bridge: both
/// ports joined again. `None` for macvtap, whose device goes with its link. Pure.
pub fn restitch_plan(mode: Plumbing, link: &Link, nic: u32) -> Option<Vec<NetOp>> {
    let tap = tap_name(nic);
    match mode {
        Plumbing::Tc => Some(vec![
            NetOp::AddIngress { dev: link.name.clone() },
            NetOp::AddIngress { dev: tap.clone() },
            NetOp::Redirect { from: link.name.clone(), to: tap.clone() },
            NetOp::Redirect { from: tap, to: link.name.clone() },
        ]),
        Plumbing::Bridge => {
            let bridge = bridge_name(nic);
            Some(vec![
                NetOp::Enslave { dev: tap.clone(), bridge: bridge.clone() },
                NetOp::Enslave { dev: link.name.clone(), bridge: bridge.clone() },
                NetOp::SetUp { dev: tap },
                NetOp::SetUp { dev: bridge },
            ])
        }
        Plumbing::Macvtap => None,
    }
}

/// Why plumbing failed. Every variant names the step and its object.
#[derive(Debug, thiserror::Error)]
pub enum PlumbError {
    /// A TAP or macvtap descriptor could not be had.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A device the plan names is not known (a bug in the plan, or it vanished).
    #[error("cannot find device {name}")]
    UnknownDevice {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// Creating the bridge failed.
    #[error("cannot create bridge {name}")]
    CreateBridge {
        /// The bridge.
        name: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Creating the macvtap failed.
    #[error("cannot create macvtap {name} on {link}")]
    CreateMacvtap {
        /// The macvtap.
        name: String,
        /// Its lower link.
        link: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Setting an MTU failed.
    #[error("cannot set the mtu of {dev} to {mtu}")]
    SetMtu {
        /// The device.
        dev: String,
        /// The MTU.
        mtu: u32,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Setting allmulticast failed.
    #[error("cannot set {dev} allmulticast")]
    SetAllmulti {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Enslaving a port failed.
    #[error("cannot add {dev} to bridge {bridge}")]
    Enslave {
        /// The port.
        dev: String,
        /// The bridge.
        bridge: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Bringing a device up failed.
    #[error("cannot bring {dev} up")]
    SetUp {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Adding an ingress qdisc failed.
    #[error("cannot add an ingress qdisc to {dev}")]
    AddIngress {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Probing for a classifier failed (for another reason than its absence).
    #[error("cannot probe tc classifiers on {dev}")]
    Probe {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Adding a redirect filter failed.
    #[error("cannot redirect {from} to {to} with a {classifier} filter")]
    Redirect {
        /// Where frames arrive.
        from: String,
        /// Where they would leave.
        to: String,
        /// The classifier.
        classifier: &'static str,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Deleting a device failed.
    #[error("cannot delete {dev}")]
    DeleteLink {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// Deleting an ingress qdisc failed.
    #[error("cannot delete the ingress qdisc of {dev}")]
    DeleteIngress {
        /// The device.
        dev: String,
        /// Why.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// A link came back to a NIC whose device went with it.
    #[error("{link} cannot be stitched again to VM NIC {nic} in {mode} mode: its macvtap went with the link (use tc or bridge plumbing, or restart the endpoint)")]
    Reattach {
        /// The link.
        link: String,
        /// Its NIC.
        nic: u32,
        /// The plumbing mode.
        mode: &'static str,
    },
    /// The self-check could not send or watch.
    #[error("self-check of {link} (nic {nic}) failed")]
    SelfCheck {
        /// The link.
        link: String,
        /// The VM NIC.
        nic: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The self-check frame never left on the link.
    #[error("self-check frame written to {device} did not leave on {link} within {waited:?}")]
    SelfCheckLost {
        /// The device written to.
        device: String,
        /// The link watched.
        link: String,
        /// How long it waited.
        waited: Duration,
    },
}

/// How to take back one step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Undo {
    DeleteLink { name: String, index: u32 },
    DeleteIngress { name: String, index: u32 },
}

/// A data link stitched to a VM NIC: what QEMU needs, and what `unstitch` removes.
#[derive(Debug)]
pub struct Stitch {
    /// The container link.
    pub link: Link,
    /// The VM NIC (1-based).
    pub nic: u32,
    /// The mode.
    pub mode: Plumbing,
    /// The device whose descriptor QEMU gets (the TAP, or the macvtap).
    pub device: String,
    /// Its interface index.
    pub device_index: u32,
    /// The descriptor for QEMU (`-netdev tap,fd=N`). For a TAP it is the only one: the TAP
    /// lives while this or QEMU's inherited copy is open.
    pub fd: OwnedFd,
    /// `/dev/vhost-net`, when it opens.
    pub vhost: Option<OwnedFd>,
    /// The classifier of the redirect filters (tc mode).
    pub classifier: Option<Classifier>,
    undo: Vec<Undo>,
}

impl Stitch {
    /// The VM NIC for `vm::argv`: the descriptor (to be inherited by QEMU), the link's MTU,
    /// vhost when `/dev/vhost-net` opened. QEMU then opens `/dev/vhost-net` itself (`vhost=on`
    /// without `vhostfd=`); the descriptor held here only proves it can.
    pub fn data_nic(&self) -> DataNic {
        DataNic {
            index: self.nic,
            backend: NicBackend::TapFd { fd: self.fd.as_raw_fd() },
            mtu: self.link.mtu,
            vhost: self.vhost.is_some(),
        }
    }
}

/// Turns a netlink error into its errno, if it is one.
fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// Sends one request and waits for its acknowledgement.
async fn request(handle: &Handle, message: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut message = NetlinkMessage::from(message);
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut responses = handle.clone().request(message)?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::Error(err) = response.payload {
            if err.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(err));
            }
        }
    }
    Ok(())
}

/// The `mirred egress redirect dev <to>` action; `stolen` because the frame is consumed
/// (what tc(8) sets for redirect, tc-mirred(8)).
fn redirect_action(to: u32) -> TcAction {
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
    ];
    action
}

/// A `matchall` filter on the ingress of `dev`, with `actions`.
fn matchall_filter(dev: u32, priority: u16, actions: Vec<TcAction>) -> TcMessage {
    let mut message = TcMessage::with_index(dev as i32);
    message.header.parent = TcHandle { major: 0xffff, minor: TcHandle::MIN_INGRESS };
    message.header.info = u32::from(TcHandle { major: priority, minor: PROTOCOL_ALL });
    let mut options = Vec::new();
    if !actions.is_empty() {
        options.push(TcOption::MatchAll(TcFilterMatchAllOption::Action(actions)));
    }
    message.attributes = vec![TcAttribute::Kind(TcFilterMatchAll::KIND.to_string()), TcAttribute::Options(options)];
    message
}

/// Which match-all classifier the kernel has: adds a `matchall` filter without actions on
/// the ingress of `ifindex` (which must have an ingress qdisc) and deletes it again; `u32`
/// when the kernel answers that the classifier does not exist (ENOENT; EOPNOTSUPP where
/// modules cannot load). Kernels built without `cls_matchall` exist (this project's CI), so
/// this never assumes.
pub async fn probe_classifier(handle: &Handle, ifindex: u32, dev: &str) -> Result<Classifier, PlumbError> {
    debug!(dev, "probing for the matchall classifier");
    let probe = matchall_filter(ifindex, PROBE_PRIORITY, Vec::new());
    match request(handle, RouteNetlinkMessage::NewTrafficFilter(probe.clone()), NLM_F_CREATE | NLM_F_EXCL).await {
        Ok(()) => {
            let mut delete = TcMessage::with_index(ifindex as i32);
            delete.header.parent = probe.header.parent;
            delete.header.info = probe.header.info;
            request(handle, RouteNetlinkMessage::DelTrafficFilter(delete), 0)
                .await
                .map_err(|source| PlumbError::Probe { dev: dev.into(), source: Box::new(source) })?;
            Ok(Classifier::Matchall)
        }
        Err(err) if matches!(errno(&err), Some(nix::libc::ENOENT | nix::libc::EOPNOTSUPP)) => Ok(Classifier::U32),
        Err(source) => Err(PlumbError::Probe { dev: dev.into(), source: Box::new(source) }),
    }
}

/// The classifier for this process, probed on first use.
async fn classifier(handle: &Handle, ifindex: u32, dev: &str) -> Result<Classifier, PlumbError> {
    static CLASSIFIER: tokio::sync::OnceCell<Classifier> = tokio::sync::OnceCell::const_new();
    CLASSIFIER
        .get_or_try_init(|| async {
            let found = probe_classifier(handle, ifindex, dev).await?;
            info!(classifier = found.as_str(), "tc classifier for redirects");
            Ok(found)
        })
        .await
        .copied()
}

/// What the executor has made so far.
struct Progress {
    /// Device name to interface index.
    index: HashMap<String, u32>,
    fd: Option<(String, OwnedFd)>,
    classifier: Option<Classifier>,
    undo: Vec<Undo>,
}

impl Progress {
    fn index(&self, name: &str) -> Result<u32, PlumbError> {
        match self.index.get(name) {
            Some(index) => Ok(*index),
            None => nix::net::if_::if_nametoindex(name)
                .map_err(|source| PlumbError::UnknownDevice { name: name.into(), source }),
        }
    }
}

fn link_set(index: u32) -> LinkMessageBuilder<LinkUnspec> {
    LinkUnspec::new_with_index(index)
}

/// Carries out one step.
async fn apply(handle: &Handle, op: &NetOp, progress: &mut Progress) -> Result<(), PlumbError> {
    match op {
        NetOp::CreateTap { name } => {
            let fd = tap::create_tap(name)?;
            let index = nix::net::if_::if_nametoindex(name.as_str())
                .map_err(|source| PlumbError::UnknownDevice { name: name.clone(), source })?;
            progress.index.insert(name.clone(), index);
            progress.undo.push(Undo::DeleteLink { name: name.clone(), index });
            progress.fd = Some((name.clone(), fd));
        }
        NetOp::CreateBridge { name, group_fwd_mask, ageing_time } => {
            debug!(name, group_fwd_mask, ageing_time, "RTM_NEWLINK bridge");
            let message = LinkMessageBuilder::<LinkBridge>::new(name)
                .stp_state(BridgeStpState::Disabled)
                .forward_delay(0)
                .ageing_time(*ageing_time)
                .group_fwd_mask(*group_fwd_mask)
                // No IGMP/MLD snooping: the bridge must not decide which multicast the guest
                // sees.
                .mcast_snooping(false)
                .build();
            handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(|source| PlumbError::CreateBridge { name: name.clone(), source: Box::new(source) })?;
            let index = progress.index(name)?;
            progress.index.insert(name.clone(), index);
            progress.undo.push(Undo::DeleteLink { name: name.clone(), index });
        }
        NetOp::CreateMacvtap { name, link, mtu } => {
            let lower = progress.index(link)?;
            debug!(name, link, mtu, "RTM_NEWLINK macvtap mode passthru");
            let message = LinkMacVtap::new(name, lower, MacVtapMode::Passthrough).mtu(*mtu).build();
            handle.link().add(message).execute().await.map_err(|source| PlumbError::CreateMacvtap {
                name: name.clone(),
                link: link.clone(),
                source: Box::new(source),
            })?;
            let index = progress.index(name)?;
            progress.index.insert(name.clone(), index);
            progress.undo.push(Undo::DeleteLink { name: name.clone(), index });
        }
        NetOp::NoBridgeNetfilter => no_bridge_netfilter(),
        NetOp::NoIpv6 { dev } => {
            let index = progress.index(dev)?;
            debug!(dev, "RTM_SETLINK addrgenmode none");
            let message = link_set(index)
                .append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![
                    AfSpecInet6::AddrGenMode(In6AddrGenMode::None),
                ])]))
                .build();
            // Not fatal: a kernel without IPv6 refuses the attribute, and then there is no
            // IPv6 chatter to prevent either.
            if let Err(err) = handle.link().set(message).execute().await {
                debug!(dev, %err, "cannot turn off IPv6 address generation");
            }
        }
        NetOp::SetMtu { dev, mtu } => {
            let index = progress.index(dev)?;
            debug!(dev, mtu, "RTM_SETLINK mtu");
            handle
                .link()
                .set(link_set(index).mtu(*mtu).build())
                .execute()
                .await
                .map_err(|source| PlumbError::SetMtu { dev: dev.clone(), mtu: *mtu, source: Box::new(source) })?;
        }
        NetOp::SetAllmulti { dev } => {
            let index = progress.index(dev)?;
            debug!(dev, "RTM_SETLINK allmulticast on");
            handle
                .link()
                .set(link_set(index).allmulticast(true).build())
                .execute()
                .await
                .map_err(|source| PlumbError::SetAllmulti { dev: dev.clone(), source: Box::new(source) })?;
        }
        NetOp::Enslave { dev, bridge } => {
            let index = progress.index(dev)?;
            let master = progress.index(bridge)?;
            debug!(dev, bridge, "RTM_SETLINK master");
            handle.link().set(link_set(index).controller(master).build()).execute().await.map_err(|source| {
                PlumbError::Enslave { dev: dev.clone(), bridge: bridge.clone(), source: Box::new(source) }
            })?;
        }
        NetOp::SetUp { dev } => {
            let index = progress.index(dev)?;
            debug!(dev, "RTM_SETLINK up");
            handle
                .link()
                .set(link_set(index).up().build())
                .execute()
                .await
                .map_err(|source| PlumbError::SetUp { dev: dev.clone(), source: Box::new(source) })?;
        }
        NetOp::AddIngress { dev } => {
            let index = progress.index(dev)?;
            debug!(dev, "RTM_NEWQDISC ingress");
            handle
                .qdisc()
                .add(index as i32)
                .ingress()
                .execute()
                .await
                .map_err(|source| PlumbError::AddIngress { dev: dev.clone(), source: Box::new(source) })?;
            progress.undo.push(Undo::DeleteIngress { name: dev.clone(), index });
        }
        NetOp::Redirect { from, to } => {
            let from_index = progress.index(from)?;
            let to_index = progress.index(to)?;
            let classifier = classifier(handle, from_index, from).await?;
            progress.classifier = Some(classifier);
            debug!(from, to, classifier = classifier.as_str(), "RTM_NEWTFILTER mirred egress redirect");
            let result = match classifier {
                Classifier::Matchall => {
                    let filter = matchall_filter(from_index, FILTER_PRIORITY, vec![redirect_action(to_index)]);
                    request(handle, RouteNetlinkMessage::NewTrafficFilter(filter), NLM_F_CREATE | NLM_F_EXCL).await
                }
                // rtnetlink's `redirect` is exactly `u32 match u32 0 0 action mirred egress
                // redirect`: one key with mask 0 matches every frame; the selector is
                // terminal (tc-u32(8)).
                Classifier::U32 => match handle
                    .traffic_filter(from_index as i32)
                    .add()
                    .ingress()
                    .priority(FILTER_PRIORITY)
                    .protocol(PROTOCOL_ALL)
                    .redirect(to_index)
                {
                    Ok(filter) => filter.execute().await,
                    Err(err) => Err(err),
                },
            };
            result.map_err(|source| PlumbError::Redirect {
                from: from.clone(),
                to: to.clone(),
                classifier: classifier.as_str(),
                source: Box::new(source),
            })?;
        }
        NetOp::OpenMacvtap { name } => {
            let index = progress.index(name)?;
            let fd = tap::open_macvtap(index)?;
            progress.fd = Some((name.clone(), fd));
        }
    }
    Ok(())
}

/// Turns off each of [`BRIDGE_NF_SYSCTLS`] that is on in this thread's network namespace.
/// Not fatal: without `br_netfilter` there is nothing to turn off, and where `/proc/sys` is
/// read-only the bridge still works, minus malformed IPv4; a warning says how to fix that.
fn no_bridge_netfilter() {
    for sysctl in BRIDGE_NF_SYSCTLS {
        let path = format!("/proc/sys/{}", sysctl.replace('.', "/"));
        match std::fs::read_to_string(&path) {
            Ok(value) if value.trim() == "1" => {
                if let Err(err) = std::fs::write(&path, "0") {
                    warn!(
                        sysctl,
                        %err,
                        "br_netfilter is on in this namespace and cannot be turned off here: the bridge drops \
                         IPv4 it finds malformed; start the container with --sysctl {sysctl}=0 (vialctl does)"
                    );
                } else {
                    debug!(sysctl, "br_netfilter off in this namespace");
                }
            }
            _ => {}
        }
    }
}

/// Takes back one step; what is already gone counts as taken back.
async fn revert(handle: &Handle, undo: &Undo) -> Result<(), PlumbError> {
    match undo {
        Undo::DeleteLink { name, index } => {
            debug!(dev = %name, "RTM_DELLINK");
            match handle.link().del(*index).execute().await {
                Err(err) if errno(&err) == Some(nix::libc::ENODEV) => Ok(()),
                result => {
                    result.map_err(|source| PlumbError::DeleteLink { dev: name.clone(), source: Box::new(source) })
                }
            }
        }
        Undo::DeleteIngress { name, index } => {
            debug!(dev = %name, "RTM_DELQDISC ingress");
            let mut delete = handle.qdisc().del(*index as i32);
            delete.message_mut().header.parent = TcHandle::INGRESS;
            delete.message_mut().header.handle = TcHandle::from(0xffff_0000);
            match delete.execute().await {
                // No device, no ingress qdisc, or another qdisc there (tc_get_qdisc).
                Err(err) if matches!(errno(&err), Some(nix::libc::ENODEV | nix::libc::ENOENT | nix::libc::EINVAL)) => {
                    Ok(())
                }
                result => {
                    result.map_err(|source| PlumbError::DeleteIngress { dev: name.clone(), source: Box::new(source) })
                }
            }
        }
    }
}

/// Takes back every step in reverse order; returns the first failure after trying all.
async fn revert_all(handle: &Handle, undo: &[Undo]) -> Result<(), PlumbError> {
    let mut first = None;
    for step in undo.iter().rev() {
        if let Err(err) = revert(handle, step).await {
            warn!(error = %err, "cleanup step failed");
            first.get_or_insert(err);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Stitches `link` to VM NIC `nic` in `mode` (see the module docs), in the calling thread's
/// network namespace. On failure, removes whatever it made before returning the error.
pub async fn stitch(handle: &Handle, mode: Plumbing, link: &Link, nic: u32) -> Result<Stitch, PlumbError> {
    let steps = plan(mode, link, nic);
    let mut progress = Progress {
        index: HashMap::from([(link.name.clone(), link.index)]),
        fd: None,
        classifier: None,
        undo: Vec::new(),
    };
    for step in &steps {
        if let Err(err) = apply(handle, step, &mut progress).await {
            warn!(link = %link.name, nic, mode = mode.as_str(), error = %err, "plumbing failed; cleaning up");
            let _ = revert_all(handle, &progress.undo).await;
            return Err(err);
        }
    }
    let Some((device, fd)) = progress.fd.take() else {
        unreachable!("every plan makes a descriptor for QEMU");
    };
    let device_index = progress.index(&device)?;
    let vhost = tap::open_vhost_net();
    info!(
        link = %link.name,
        nic,
        mode = mode.as_str(),
        device = %device,
        mtu = link.mtu,
        vhost = vhost.is_some(),
        classifier = progress.classifier.map(Classifier::as_str),
        "data link stitched"
    );
    Ok(Stitch {
        link: link.clone(),
        nic,
        mode,
        device,
        device_index,
        fd,
        vhost,
        classifier: progress.classifier,
        undo: progress.undo,
    })
}

/// Removes everything `stitch` made for `stitch` (ingress qdisc on the link, TAP, bridge,
/// macvtap), also the TAP while QEMU still holds it (the guest's NIC then loses its link).
/// What is already gone is fine. Tries every step and returns the first failure.
pub async fn unstitch(handle: &Handle, stitch: &Stitch) -> Result<(), PlumbError> {
    let result = revert_all(handle, &stitch.undo).await;
    info!(link = %stitch.link.name, nic = stitch.nic, ok = result.is_ok(), "data link unstitched");
    result
}

/// Removes what an earlier vial left in this network namespace when it could not clean up
/// (killed, in a namespace that outlived it, as a pod's does when its container restarts):
/// every device named like vial's (`vtap`, `vbr`, `vmvt` and a number), and an ingress qdisc on
/// a data link in `links` whose every filter is a redirect to a device that no longer exists
/// (its TAP went with the old QEMU). Nothing else is touched: a qdisc with any other filter is
/// someone else's, and stitching then says so. Returns what it removed, for the log.
pub async fn remove_leftovers(handle: &Handle, links: &[Link]) -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(all) = crate::net::links::list_links(handle).await {
        for link in all.iter().filter(|l| crate::net::links::is_own(&l.name)) {
            if revert(handle, &Undo::DeleteLink { name: link.name.clone(), index: link.index }).await.is_ok() {
                removed.push(link.name.clone());
            }
        }
    }
    for link in links {
        let filters = ingress_filters(handle, link.index).await;
        let targets: Vec<Option<u32>> =
            filters.iter().filter(|f| !f.attributes.is_empty()).map(redirect_target).collect();
        // The kernel reports a redirect whose device is gone with index 0 (tc shows `*`).
        let dangling = |target: &Option<u32>| {
            target.is_some_and(|index| index == 0 || nix::net::if_::if_indextoname(index).is_err())
        };
        // u32 lists its hash table as filters of their own, without actions: only the
        // filters with an action decide.
        let with_action: Vec<&Option<u32>> = targets.iter().filter(|t| t.is_some()).collect();
        let has_foreign = filters.iter().any(|f| !f.attributes.is_empty() && !is_vial_shaped(f));
        debug!(link = %link.name, filters = filters.len(), ?targets, has_foreign, "ingress filters of a data link at start");
        let leftover = !with_action.is_empty() && with_action.iter().all(|t| dangling(t)) && !has_foreign;
        if leftover && revert(handle, &Undo::DeleteIngress { name: link.name.clone(), index: link.index }).await.is_ok()
        {
            removed.push(format!("the ingress qdisc of {}", link.name));
        }
    }
    removed
}

/// The filters on the ingress of device `index` (none when it has no ingress qdisc).
async fn ingress_filters(handle: &Handle, index: u32) -> Vec<TcMessage> {
    handle
        .clone()
        .traffic_filter(index as i32)
        .get()
        .ingress()
        .execute()
        .filter_map(|m| async move { m.ok() })
        .collect()
        .await
}

/// The device a filter's `mirred` action redirects to, if it has one.
fn redirect_target(filter: &TcMessage) -> Option<u32> {
    let actions = filter.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(options) => options.iter().find_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => Some(actions.clone()),
            TcOption::MatchAll(TcFilterMatchAllOption::Action(actions)) => Some(actions.clone()),
            _ => None,
        }),
        _ => None,
    })?;
    actions.iter().find_map(|action| {
        action.attributes.iter().find_map(|a| match a {
            TcActionAttribute::Options(options) => options.iter().find_map(|o| match o {
                TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror)) => Some(mirror.ifindex),
                _ => None,
            }),
            _ => None,
        })
    })
}

/// Whether `filter` is of the kind vial installs: `u32` or `matchall` at vial's priority.
fn is_vial_shaped(filter: &TcMessage) -> bool {
    let kind = filter.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(kind) => Some(kind.as_str()),
        _ => None,
    });
    TcHandle::from(filter.header.info).major == FILTER_PRIORITY && matches!(kind, Some("u32" | "matchall"))
}

/// What of `stitch`'s plumbing is gone, if anything: a redirect filter (or its ingress qdisc)
/// on the link or the TAP (tc), a port of the bridge (bridge), the macvtap (macvtap). Only
/// reads.
pub async fn broken(handle: &Handle, stitch: &Stitch) -> Option<String> {
    let (link, device) =
        ((stitch.link.name.as_str(), stitch.link.index), (stitch.device.as_str(), stitch.device_index));
    match stitch.mode {
        Plumbing::Tc => {
            for (name, index) in [link, device] {
                let filters = ingress_filters(handle, index).await;
                if !filters.iter().any(|f| TcHandle::from(f.header.info).major == FILTER_PRIORITY) {
                    return Some(format!("the redirect filter on {name}'s ingress is gone"));
                }
            }
            None
        }
        Plumbing::Bridge => {
            let bridge = nix::net::if_::if_nametoindex(bridge_name(stitch.nic).as_str()).ok();
            for (name, index) in [link, device] {
                let master = controller_of(handle, index).await;
                if bridge.is_none() || master != bridge {
                    return Some(format!("{name} is no longer a port of {}", bridge_name(stitch.nic)));
                }
            }
            None
        }
        Plumbing::Macvtap => nix::net::if_::if_nametoindex(stitch.device.as_str())
            .is_err()
            .then(|| format!("the macvtap {} is gone", stitch.device)),
    }
}

/// The bridge (controller) device `index` is a port of, if any.
async fn controller_of(handle: &Handle, index: u32) -> Option<u32> {
    let mut links = handle.link().get().match_index(index).execute();
    let message = links.next().await?.ok()?;
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(master) => Some(*master),
        _ => None,
    })
}

/// Stitches `link` again to the TAP `stitch` kept for its VM NIC ([`restitch_plan`]): a link
/// back after it vanished (the multifunction NIC layout never unplugs a NIC, so its TAP
/// outlives the link), or plumbing found broken. On failure, removes what it made.
pub async fn restitch(handle: &Handle, stitch: &mut Stitch, link: &Link) -> Result<(), PlumbError> {
    let Some(steps) = restitch_plan(stitch.mode, link, stitch.nic) else {
        return Err(PlumbError::Reattach { link: link.name.clone(), nic: stitch.nic, mode: stitch.mode.as_str() });
    };
    if stitch.mode == Plumbing::Tc {
        // Old redirects go with their ingress qdiscs (the TAP's pointed at the link it had).
        revert(handle, &Undo::DeleteIngress { name: link.name.clone(), index: link.index }).await?;
        revert(handle, &Undo::DeleteIngress { name: stitch.device.clone(), index: stitch.device_index }).await?;
    }
    let mut progress = Progress {
        index: HashMap::from([(link.name.clone(), link.index), (stitch.device.clone(), stitch.device_index)]),
        fd: None,
        classifier: stitch.classifier,
        undo: Vec::new(),
    };
    for step in &steps {
        if let Err(err) = apply(handle, step, &mut progress).await {
            warn!(link = %link.name, nic = stitch.nic, error = %err, "stitching a returning link failed; cleaning up");
            let _ = revert_all(handle, &progress.undo).await;
            return Err(err);
        }
    }
    info!(link = %link.name, nic = stitch.nic, mode = stitch.mode.as_str(), "link stitched again to its kept NIC");
    stitch.undo.extend(progress.undo);
    stitch.link = link.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(name: &str, index: u32, mtu: u32) -> Link {
        Link { name: name.into(), index, mtu, mac: [2, 0, 0, 0, 0, 1], up: true, carrier: true }
    }

    fn op_names(ops: &[NetOp]) -> Vec<String> {
        ops.iter()
            .map(|op| match op {
                NetOp::CreateTap { name } => format!("tap {name}"),
                NetOp::CreateBridge { name, group_fwd_mask, ageing_time } => {
                    format!("bridge {name} mask={group_fwd_mask:#x} ageing={ageing_time}")
                }
                NetOp::CreateMacvtap { name, link, mtu } => format!("macvtap {name} on {link} mtu {mtu}"),
                NetOp::NoIpv6 { dev } => format!("noipv6 {dev}"),
                NetOp::NoBridgeNetfilter => "no-br-netfilter".into(),
                NetOp::SetMtu { dev, mtu } => format!("mtu {dev} {mtu}"),
                NetOp::SetAllmulti { dev } => format!("allmulti {dev}"),
                NetOp::Enslave { dev, bridge } => format!("enslave {dev} {bridge}"),
                NetOp::SetUp { dev } => format!("up {dev}"),
                NetOp::AddIngress { dev } => format!("ingress {dev}"),
                NetOp::Redirect { from, to } => format!("redirect {from} {to}"),
                NetOp::OpenMacvtap { name } => format!("open {name}"),
            })
            .collect()
    }

    #[test]
    fn tc_plan_redirects_both_ways_at_the_link_mtu() {
        assert_eq!(
            op_names(&plan(Plumbing::Tc, &eth("eth3", 7, 9500), 3)),
            [
                "tap vtap3",
                "noipv6 vtap3",
                "mtu vtap3 9500",
                "up vtap3",
                "ingress eth3",
                "ingress vtap3",
                "redirect eth3 vtap3",
                "redirect vtap3 eth3"
            ]
        );
    }

    #[test]
    fn bridge_plan_forwards_lldp_and_floods() {
        assert_eq!(
            op_names(&plan(Plumbing::Bridge, &eth("net1", 4, 9000), 1)),
            [
                "tap vtap1",
                "noipv6 vtap1",
                "mtu vtap1 9000",
                "no-br-netfilter",
                "bridge vbr1 mask=0xfff8 ageing=0",
                "noipv6 vbr1",
                "mtu vbr1 9000",
                "enslave vtap1 vbr1",
                "enslave net1 vbr1",
                "up vtap1",
                "up vbr1"
            ]
        );
        // 01:80:c2:00:00:0e (LLDP) is bit 14, ...:03 (EAPOL) bit 3; bits 0-2 (STP, pause,
        // LACP) the kernel refuses.
        assert_ne!(GROUP_FWD_MASK & (1 << 0x0e), 0);
        assert_ne!(GROUP_FWD_MASK & (1 << 0x03), 0);
        assert_eq!(GROUP_FWD_MASK & 0b111, 0);
    }

    #[test]
    fn macvtap_plan_is_passthru_allmulti_and_opens_the_device() {
        assert_eq!(
            op_names(&plan(Plumbing::Macvtap, &eth("eth1", 2, 1500), 1)),
            ["macvtap vmvt1 on eth1 mtu 1500", "noipv6 vmvt1", "allmulti vmvt1", "up vmvt1", "open vmvt1"]
        );
    }

    #[test]
    fn plans_never_touch_anything_but_the_link_and_their_own_devices() {
        for mode in [Plumbing::Tc, Plumbing::Bridge, Plumbing::Macvtap] {
            for op in plan(mode, &eth("eth9", 11, 1500), 9) {
                let names = match &op {
                    NetOp::CreateTap { name } | NetOp::OpenMacvtap { name } => vec![name.clone()],
                    NetOp::CreateBridge { name, .. } => vec![name.clone()],
                    NetOp::CreateMacvtap { name, link, .. } => vec![name.clone(), link.clone()],
                    NetOp::NoIpv6 { dev }
                    | NetOp::SetMtu { dev, .. }
                    | NetOp::SetAllmulti { dev }
                    | NetOp::SetUp { dev }
                    | NetOp::AddIngress { dev } => vec![dev.clone()],
                    NetOp::Enslave { dev, bridge } => vec![dev.clone(), bridge.clone()],
                    NetOp::Redirect { from, to } => vec![from.clone(), to.clone()],
                    // The namespace's br_netfilter switches: no device.
                    NetOp::NoBridgeNetfilter => vec![],
                };
                for name in names {
                    assert!(name == "eth9" || crate::net::links::is_own(&name), "{mode:?} {op:?}");
                    assert!(name.len() <= 15, "{name}");
                }
                // The link's own MTU, admin state and IPv6 are the orchestrator's.
                if let NetOp::SetMtu { dev, .. } | NetOp::SetUp { dev } | NetOp::NoIpv6 { dev } = &op {
                    assert_ne!(dev, "eth9", "{mode:?} {op:?}");
                }
            }
        }
    }

    #[test]
    fn every_plan_makes_exactly_one_descriptor_for_qemu_and_creates_it_first() {
        for mode in [Plumbing::Tc, Plumbing::Bridge, Plumbing::Macvtap] {
            let ops = plan(mode, &eth("eth1", 2, 1500), 1);
            let descriptors =
                ops.iter().filter(|op| matches!(op, NetOp::CreateTap { .. } | NetOp::OpenMacvtap { .. })).count();
            assert_eq!(descriptors, 1, "{mode:?}");
            // Creation first: a failure later finds something to clean up, never the reverse.
            assert!(matches!(ops[0], NetOp::CreateTap { .. } | NetOp::CreateMacvtap { .. }), "{mode:?}");
        }
    }

    #[test]
    fn device_names_fit_ifnamsiz() {
        for name in [tap_name(u32::MAX), bridge_name(u32::MAX), macvtap_name(u32::MAX)] {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
