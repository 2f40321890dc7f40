//! Wiring a lesson's connections: one veth pair per connection, each end moved into its
//! endpoint container's network namespace under the name the plan gives it (`eth1`...), with
//! the lesson's MTU, up; and a plain container's address on it. All over rtnetlink: the pair
//! is made in the host's namespace under temporary names, and each end is moved, renamed,
//! sized and brought up by one message (rtnetlink(7) `RTM_NEWLINK` with `IFLA_NET_NS_PID`).
//! Addresses are added through a netlink socket opened inside the container's namespace.
//!
//! Nothing is left in the host's namespace: a failed step deletes the pair it made, and a
//! veth goes away with the namespace of either end (a removed container).

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec, LinkVeth};

use super::plan::{End, LinkPlan};

/// Why a connection could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The host's netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    /// A step failed.
    #[error("{step}")]
    Step {
        /// What was being done (`create the veth pair for r1:eth1 - r2:eth1`).
        step: String,
        /// What the kernel said.
        source: rtnetlink::Error,
    },
    /// A container's network namespace could not be entered.
    #[error("cannot enter the network namespace of pid {pid}")]
    Netns {
        /// The container's pid.
        pid: u32,
        /// Why.
        source: std::io::Error,
    },
}

/// A netlink connection in the host's network namespace.
pub fn host_netlink() -> Result<Handle, WireError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(WireError::Netlink)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink connection inside the network namespace of process `pid` (a container's init):
/// the socket is opened by a thread that joined that namespace, and served on this runtime.
pub async fn netlink_in(pid: u32) -> Result<Handle, WireError> {
    let runtime = tokio::runtime::Handle::current();
    let netns_error = move |source| WireError::Netns { pid, source };
    let (sender, opened) = tokio::sync::oneshot::channel();
    // A thread of its own, which ends with the socket opened: setns(2) moves only the calling
    // thread, and the socket belongs to the namespace it was opened in, whichever thread
    // serves it later.
    std::thread::spawn(move || {
        let open = || {
            let netns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        };
        let _ = sender.send(open());
    });
    let opened = opened.await.map_err(|_| netns_error(std::io::Error::other("the namespace thread died")))?;
    let (connection, handle, _) = opened.map_err(netns_error)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The temporary host-side names of connection `index`'s pair: unique per lesson (a hash of
/// its slug) and per connection, at most 15 bytes.
pub fn temporary_names(lesson: &str, index: usize) -> (String, String) {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in lesson.bytes() {
        hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    (format!("vw{:06x}{index}a", hash & 0xff_ffff), format!("vw{:06x}{index}b", hash & 0xff_ffff))
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await? {
        Some(link) => Ok(link.header.index),
        None => Err(rtnetlink::Error::RequestFailed),
    }
}

/// Which end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The lesson's `a`.
    A,
    /// The lesson's `b`.
    B,
}

impl Side {
    /// Both, `a` first.
    pub const BOTH: [Side; 2] = [Side::A, Side::B];

    fn pick<'a>(self, link: &'a LinkPlan, names: &'a (String, String)) -> (&'a End, &'a str) {
        match self {
            Side::A => (&link.a, &names.0),
            Side::B => (&link.b, &names.1),
        }
    }
}

/// Makes `link`'s veth pair in the host's namespace under its temporary names, both ends
/// down: each end waits there ("parked") until its container runs and [`move_end`] takes it
/// in. A pair left by an interrupted run under the same names is replaced.
pub async fn create_pair(host: &Handle, lesson: &str, link: &LinkPlan) -> Result<(), WireError> {
    let names = temporary_names(lesson, link.index);
    for name in [&names.0, &names.1] {
        if let Ok(stale) = index_of(host, name).await {
            let _ = host.link().del(stale).execute().await;
        }
    }
    let step =
        format!("create the veth pair for {}:{} - {}:{}", link.a.endpoint, link.a.iface, link.b.endpoint, link.b.iface);
    tracing::debug!(%step, tmp_a = %names.0, tmp_b = %names.1, mtu = link.mtu, "RTM_NEWLINK veth");
    host.link()
        .add(LinkVeth::new(&names.0, &names.1).mtu(link.mtu).build())
        .execute()
        .await
        .map_err(|source| WireError::Step { step, source })
}

/// Moves `side` of `link` from the host's namespace into the container whose init is `pid`,
/// named, sized and up in one message; then gives it the plan's address, if any.
pub async fn move_end(host: &Handle, lesson: &str, link: &LinkPlan, side: Side, pid: u32) -> Result<(), WireError> {
    let names = temporary_names(lesson, link.index);
    let (end, tmp) = side.pick(link, &names);
    let step = |what: String| move |source| WireError::Step { step: what, source };
    let index =
        index_of(host, tmp).await.map_err(step(format!("find {tmp} (the veth for {}:{})", end.endpoint, end.iface)))?;
    let message =
        LinkUnspec::new_with_index(index).setns_by_pid(pid).name(end.iface.clone()).mtu(link.mtu).up().build();
    tracing::debug!(tmp, iface = %end.iface, pid, "RTM_NEWLINK: into the container");
    host.link()
        .set(message)
        .execute()
        .await
        .map_err(step(format!("move {tmp} into {} as {}", end.endpoint, end.iface)))?;
    if let Some(address) = end.address {
        add_address(end, pid, address).await?;
    }
    Ok(())
}

/// Deletes every parked end of `lesson` still in the host's namespace (an interrupted `up`).
pub async fn remove_parked(host: &Handle, lesson: &str, links: usize) {
    for index in 0..links {
        let (a, b) = temporary_names(lesson, index);
        for name in [a, b] {
            if let Ok(found) = index_of(host, &name).await {
                tracing::debug!(name, "deleting a parked veth");
                let _ = host.link().del(found).execute().await;
            }
        }
    }
}

async fn add_address(end: &End, pid: u32, address: ipnetwork::IpNetwork) -> Result<(), WireError> {
    let handle = netlink_in(pid).await?;
    let step = |what: &str| {
        let step = format!("{what} {address} on {}:{}", end.endpoint, end.iface);
        move |source| WireError::Step { step, source }
    };
    let index = index_of(&handle, &end.iface).await.map_err(step("find the interface for"))?;
    let ip: IpAddr = address.ip();
    tracing::debug!(endpoint = %end.endpoint, iface = %end.iface, %address, "RTM_NEWADDR");
    handle.address().add(index, ip, address.prefix()).execute().await.map_err(step("add"))
}

/// Sets interface `iface` of the container whose init is `pid` up or down: a pulled or
/// restored cable (its peer loses or regains carrier too).
pub async fn set_admin_state(pid: u32, endpoint: &str, iface: &str, up: bool) -> Result<(), WireError> {
    let handle = netlink_in(pid).await?;
    let step = |what: &str| {
        let step = format!("{what} {endpoint}:{iface}");
        move |source| WireError::Step { step, source }
    };
    let index = index_of(&handle, iface).await.map_err(step("find"))?;
    let message = LinkUnspec::new_with_index(index);
    let message = if up { message.up() } else { message.down() };
    handle.link().set(message.build()).execute().await.map_err(step(if up { "bring up" } else { "take down" }))
}

/// Deletes interface `iface` of the container whose init is `pid` (one end of a veth: the
/// pair goes at once, both ends); one that is not there is fine.
pub async fn delete(pid: u32, iface: &str) -> Result<(), WireError> {
    let handle = netlink_in(pid).await?;
    let Ok(index) = index_of(&handle, iface).await else { return Ok(()) };
    tracing::debug!(pid, iface, "RTM_DELLINK");
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        // Gone between the lookup and the delete.
        Err(rtnetlink::Error::NetlinkError(err)) if err.raw_code() == -nix::libc::ENODEV => Ok(()),
        Err(source) => Err(WireError::Step { step: format!("delete {iface} of pid {pid}"), source }),
    }
}

/// Waits, up to `timeout`, until the container whose init is `pid` has no interface `iface`:
/// a veth whose other end's namespace went (a removed container) is deleted by the kernel's
/// namespace clean-up, a little after the container is gone. Returns whether it went.
pub async fn wait_gone(pid: u32, iface: &str, timeout: std::time::Duration) -> Result<bool, WireError> {
    let handle = netlink_in(pid).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if index_of(&handle, iface).await.is_err() {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether `iface` in the container whose init is `pid` is up and has carrier.
pub async fn link_state(pid: u32, iface: &str) -> Result<(bool, bool), WireError> {
    use netlink_packet_route::link::LinkFlags;
    let handle = netlink_in(pid).await?;
    let step = |source| WireError::Step { step: format!("read {iface}"), source };
    let mut links = handle.link().get().match_name(iface.to_string()).execute();
    let link = links
        .try_next()
        .await
        .map_err(step)?
        .ok_or(WireError::Step { step: format!("read {iface}"), source: rtnetlink::Error::RequestFailed })?;
    Ok((link.header.flags.contains(LinkFlags::Up), link.header.flags.contains(LinkFlags::LowerUp)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_fit_and_differ_per_lesson_and_connection() {
        let (a, b) = temporary_names("ospf-basics", 12);
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert_ne!(a, b);
        assert_ne!(temporary_names("ospf-basics", 1).0, temporary_names("other", 1).0);
        assert_ne!(temporary_names("ospf-basics", 1).0, temporary_names("ospf-basics", 2).0);
    }
}
