//! The endpoint's data links over its whole life: wait for the expected links, stitch each to
//! a VM NIC before QEMU starts, then follow link events and hot-plug links that arrive late
//! (or come back) into the running VM, and unplug links that vanish. This module decides
//! which link gets which NIC; the kernel work is `net::plumb`'s and the QMP work `qmp`'s.
//!
//! A link's NIC index is its numeric suffix (`eth3` and `net3` are NIC 3), so a link keeps
//! its NIC, MAC and PCI slot whatever order links arrive in; links without a number take the
//! next free index.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use rtnetlink::Handle;

use crate::config::{NicLayout, Plumbing, Profile};
use crate::net::links::{Link, LinkEvent, LinkWatcher, WaitError};
use crate::net::plumb::{self, PlumbError, Stitch};
use crate::net::selfcheck::{self, SelfCheck};
use crate::qmp::{HotplugNic, Qmp};
use crate::status::{LinkState, LinkStatus};
use crate::vm::argv::{data_nic_device, DataNic};

/// How long an unplugged NIC's guest gets to release it.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the data plane could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// The netlink connection could not be opened.
    #[error("cannot open a netlink connection")]
    Netlink(#[source] std::io::Error),
    /// Waiting for the links failed (the timeout names what is missing).
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// A link could not be stitched.
    #[error("cannot stitch {link} to NIC {nic}")]
    Stitch {
        /// The link.
        link: String,
        /// Its NIC.
        nic: u32,
        /// Why.
        source: PlumbError,
    },
    /// A link's descriptor could not be duplicated for QEMU.
    #[error("cannot duplicate the descriptors of {link} for qemu")]
    Duplicate {
        /// The link.
        link: String,
        /// Why.
        source: std::io::Error,
    },
    /// A link's NIC index is past what the multifunction layout holds.
    #[error(
        "{link} would be data NIC {nic}, but the multifunction NIC layout holds data NICs 1 to 7 \
         (functions of PCI slot 3): name the links eth1..eth7, or set VIAL_NIC_LAYOUT=slots"
    )]
    NoFunction {
        /// The link.
        link: String,
        /// Its NIC.
        nic: u32,
    },
    /// A stitched link does not carry frames.
    #[error("self-check of {link} failed (health stays red rather than report a dead link as ready)")]
    SelfCheck {
        /// The link.
        link: String,
        /// Why.
        source: PlumbError,
    },
}

/// One data link and its state.
struct Slot {
    nic: u32,
    name: String,
    stitch: Option<Stitch>,
    state: LinkState,
    repairs: u32,
}

/// The data links of one endpoint.
pub struct DataPlane {
    handle: Handle,
    watcher: LinkWatcher,
    mode: Plumbing,
    layout: NicLayout,
    slots: Vec<Slot>,
}

/// The health state of a checked link.
fn check_state(check: SelfCheck) -> LinkState {
    match check {
        SelfCheck::Passed => LinkState::Up,
        SelfCheck::NoCarrier => LinkState::NoCarrier,
    }
}

/// The NIC index of `link`: its numeric suffix, else the next index not in `taken`.
pub fn nic_index(name: &str, taken: &[u32]) -> u32 {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    match name[name.len() - digits..].parse::<u32>() {
        Ok(n) if n > 0 && !taken.contains(&n) => n,
        _ => (1..).find(|n| !taken.contains(n)).unwrap_or(1),
    }
}

impl DataPlane {
    /// Waits for the profile's data links (all links present when it expects none), stitches
    /// each and proves each carries frames. A failure removes what was stitched.
    pub async fn start(profile: &Profile, mgmt: &str) -> Result<DataPlane, DataPlaneError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(DataPlaneError::Netlink)?;
        tokio::spawn(connection);
        let mut watcher = LinkWatcher::start(&handle, mgmt).await?;
        let links = watcher.wait_for(profile.data_nics as usize, profile.link_timeout).await?;
        tracing::info!(links = ?links.iter().map(|l| &l.name).collect::<Vec<_>>(), "data links present");
        let removed = plumb::remove_leftovers(&handle, &links).await;
        if !removed.is_empty() {
            tracing::info!(?removed, "removed what an earlier vial left behind (it did not exit cleanly)");
        }
        let mut plane =
            DataPlane { handle, watcher, mode: profile.plumbing, layout: profile.nic_layout, slots: Vec::new() };
        for link in links {
            if let Err(err) = plane.stitch(&link).await {
                plane.teardown().await;
                return Err(err);
            }
        }
        // The self-checks run side by side: each waits ~15 ms on the kernel (closing a packet
        // socket waits for an RCU grace period), which adds up over 32 links.
        let checks = plane.slots.iter().filter_map(|s| s.stitch.as_ref()).map(selfcheck::self_check);
        let results = futures::future::join_all(checks).await;
        let mut failure = None;
        for (slot, result) in plane.slots.iter_mut().zip(results) {
            match result {
                Ok(check) => slot.state = check_state(check),
                Err(source) => failure = Some(DataPlaneError::SelfCheck { link: slot.name.clone(), source }),
            }
        }
        if let Some(err) = failure {
            plane.teardown().await;
            return Err(err);
        }
        Ok(plane)
    }

    async fn stitch(&mut self, link: &Link) -> Result<&Slot, DataPlaneError> {
        let nic = match self.slots.iter().find(|s| s.name == link.name) {
            Some(slot) => slot.nic,
            None => nic_index(&link.name, &self.slots.iter().map(|s| s.nic).collect::<Vec<_>>()),
        };
        if self.layout == NicLayout::Multifunction && nic > NicLayout::MAX_FUNCTIONS {
            return Err(DataPlaneError::NoFunction { link: link.name.clone(), nic });
        }
        let stitch = plumb::stitch(&self.handle, self.mode, link, nic)
            .await
            .map_err(|source| DataPlaneError::Stitch { link: link.name.clone(), nic, source })?;
        tracing::info!(link = %link.name, nic, mode = self.mode.as_str(), "link stitched");
        let repairs = self.slots.iter().find(|s| s.name == link.name).map_or(0, |s| s.repairs);
        let slot = Slot { nic, name: link.name.clone(), stitch: Some(stitch), state: LinkState::Unchecked, repairs };
        match self.slots.iter().position(|s| s.name == link.name) {
            Some(i) => self.slots[i] = slot,
            None => {
                self.slots.push(slot);
                self.slots.sort_by_key(|s| s.nic);
            }
        }
        Ok(self.slots.iter().find(|s| s.name == link.name).expect("just stitched"))
    }

    /// The VM NICs for QEMU's command line.
    pub fn data_nics(&self) -> Vec<DataNic> {
        self.slots.iter().filter_map(|s| s.stitch.as_ref()).map(Stitch::data_nic).collect()
    }

    /// The descriptors QEMU must inherit.
    pub fn fds(&self) -> Vec<RawFd> {
        let stitches = self.slots.iter().filter_map(|s| s.stitch.as_ref());
        stitches
            .flat_map(|s| std::iter::once(s.fd.as_raw_fd()).chain(s.vhost.as_ref().map(|v| v.as_raw_fd())))
            .collect()
    }

    /// What health reports for each link.
    pub fn statuses(&self) -> Vec<LinkStatus> {
        self.slots
            .iter()
            .map(|s| LinkStatus {
                interface: s.name.clone(),
                nic: s.nic,
                mode: self.mode.as_str().into(),
                state: s.state,
                repairs: s.repairs,
            })
            .collect()
    }

    /// The next change in the container's links.
    pub async fn next_event(&mut self) -> Result<LinkEvent, WaitError> {
        self.watcher.next_event().await
    }

    /// Carries out a link change on the running VM: a new (or returning) link is stitched
    /// and hot-plugged into the slot it would have had at boot; a vanished one is unplugged.
    /// Errors are logged: the VM keeps running with the links it has.
    pub async fn on_event(&mut self, event: LinkEvent, qmp: &Qmp, profile: &Profile, name: &str) {
        match event {
            LinkEvent::Added(link) if self.layout == NicLayout::Multifunction => self.on_added_in_slot(link, qmp).await,
            LinkEvent::Added(link) => {
                if self.slots.iter().any(|s| s.name == link.name && s.stitch.is_some()) {
                    return;
                }
                let nic = match self.stitch(&link).await {
                    Ok(slot) => slot.nic,
                    Err(err) => {
                        tracing::error!(link = %link.name, %err, "cannot stitch a late link");
                        return;
                    }
                };
                let slot = self.slots.iter_mut().find(|s| s.name == link.name).expect("just stitched");
                match selfcheck::self_check(slot.stitch.as_ref().expect("stitched")).await {
                    Ok(check) => slot.state = check_state(check),
                    Err(err) => {
                        tracing::error!(link = %link.name, %err, "self-check of a late link failed; not plugging it");
                        self.drop_stitch(&link.name, LinkState::Failed).await;
                        return;
                    }
                }
                if let Err(err) = self.plug(&link.name, qmp, profile, name).await {
                    tracing::error!(link = %link.name, nic, %err, "hot-plug failed");
                    self.drop_stitch(&link.name, LinkState::Failed).await;
                    return;
                }
                if !link.carrier {
                    set_nic_link(qmp, &link.name, nic, false).await;
                }
            }
            LinkEvent::Carrier { name: link, carrier } => {
                let Some(slot) = self.slots.iter_mut().find(|s| s.name == link) else { return };
                let Some(stitch) = slot.stitch.as_ref() else { return };
                // Carrier back: prove the plumbing again, as at start; gone: say so.
                slot.state = if carrier {
                    match selfcheck::self_check(stitch).await {
                        Ok(check) => check_state(check),
                        Err(err) => {
                            tracing::error!(%link, %err, "self-check after carrier returned failed");
                            LinkState::Failed
                        }
                    }
                } else {
                    LinkState::NoCarrier
                };
                tracing::info!(%link, state = ?slot.state, "link carrier changed");
                // The guest sees what the container link sees: a pulled cable is a carrier
                // loss in the VM too, whatever the plumbing mode (a TAP or macvtap keeps its
                // own carrier while QEMU holds it).
                set_nic_link(qmp, &link, slot.nic, carrier).await;
            }
            LinkEvent::Removed(gone) if self.layout == NicLayout::Multifunction => {
                // A function of a multifunction slot cannot be unplugged alone: the NIC and
                // its TAP stay, without carrier, until the link returns.
                let Some(slot) = self.slots.iter_mut().find(|s| s.name == gone && s.stitch.is_some()) else { return };
                slot.state = LinkState::Missing;
                let nic = slot.nic;
                set_nic_link(qmp, &gone, nic, false).await;
                tracing::info!(link = %gone, nic, "link gone; its NIC stays, without carrier, until it returns");
            }
            LinkEvent::Removed(gone) => {
                let Some(slot) = self.slots.iter().find(|s| s.name == gone && s.stitch.is_some()) else { return };
                let nic = slot.nic;
                tracing::info!(link = %gone, nic, timeout = ?UNPLUG_TIMEOUT, "link gone; unplugging its NIC (the guest must release it)");
                if let Err(err) = qmp.unplug_nic(&format!("nic{nic}"), &format!("data{nic}"), UNPLUG_TIMEOUT).await {
                    tracing::warn!(link = %gone, nic, %err, "unplug did not complete");
                }
                self.drop_stitch(&gone, LinkState::Missing).await;
                tracing::info!(link = %gone, nic, "link gone; NIC unplugged (it is plugged again if the link returns)");
            }
        }
    }

    /// A link that appears while the VM runs, in the multifunction layout: one that returns to
    /// the NIC it had is stitched to that NIC's kept TAP; a new one cannot get a NIC (a PCI
    /// slot gains no functions once the guest runs) and is reported failed.
    async fn on_added_in_slot(&mut self, link: Link, qmp: &Qmp) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == link.name) else {
            tracing::error!(
                link = %link.name,
                "link arrived after the VM started: the multifunction NIC layout cannot add a NIC to a running \
                 VM (a PCI slot gains no functions then); restart the endpoint with every link present, or set \
                 VIAL_NIC_LAYOUT=slots"
            );
            let nic = nic_index(&link.name, &self.slots.iter().map(|s| s.nic).collect::<Vec<_>>());
            self.slots.push(Slot { nic, name: link.name.clone(), stitch: None, state: LinkState::Failed, repairs: 0 });
            self.slots.sort_by_key(|s| s.nic);
            return;
        };
        if slot.state != LinkState::Missing {
            return;
        }
        let Some(stitch) = slot.stitch.as_mut() else { return };
        slot.state = restitch_checked(&self.handle, stitch, &link).await;
        set_nic_link(qmp, &link.name, slot.nic, link.carrier && slot.state != LinkState::Failed).await;
    }

    /// Checks every stitched link's plumbing (`plumb::broken`) and restores what someone
    /// else removed: the link is `failed` until it is stitched again and passes its
    /// self-check (vrnetlab's silent dead datapath, its issue #504). Returns whether any
    /// link's status changed.
    pub async fn check_plumbing(&mut self) -> bool {
        let mut changed = false;
        for slot in &mut self.slots {
            if !matches!(slot.state, LinkState::Up | LinkState::NoCarrier) {
                continue;
            }
            let Some(stitch) = slot.stitch.as_mut() else { continue };
            let Some(what) = plumb::broken(&self.handle, stitch).await else { continue };
            tracing::warn!(link = %slot.name, nic = slot.nic, %what, "plumbing broken after ready; restoring it");
            changed = true;
            slot.repairs += 1;
            slot.state = LinkState::Failed;
            let link = stitch.link.clone();
            slot.state = restitch_checked(&self.handle, stitch, &link).await;
            tracing::info!(link = %slot.name, state = ?slot.state, "plumbing restored");
        }
        changed
    }

    /// Tells the VM the carrier of every link that has none now (at start, the NICs come up
    /// with carrier): called once QMP is connected.
    pub async fn sync_carrier(&self, qmp: &Qmp) {
        for slot in self.slots.iter().filter(|s| s.stitch.is_some() && s.state == LinkState::NoCarrier) {
            set_nic_link(qmp, &slot.name, slot.nic, false).await;
        }
    }

    /// The hot-plug of every stitched link, in NIC order: what a RAM snapshot's start plugs in
    /// before the guest resumes (its machine had no data NICs).
    pub fn hotplug_nics(&self, profile: &Profile, name: &str) -> Result<Vec<HotplugNic>, DataPlaneError> {
        self.slots.iter().filter(|s| s.stitch.is_some()).map(|slot| self.hotplug_nic(slot, profile, name)).collect()
    }

    /// The hot-plug of one stitched link: the device a cold boot has in its slot, on duplicates
    /// of the link's descriptors.
    fn hotplug_nic(&self, slot: &Slot, profile: &Profile, name: &str) -> Result<HotplugNic, DataPlaneError> {
        let stitch = slot.stitch.as_ref().expect("only stitched slots are plugged");
        let duplicate = |source| DataPlaneError::Duplicate { link: slot.name.clone(), source };
        let fd = stitch.fd.as_fd().try_clone_to_owned().map_err(duplicate)?;
        let vhost_fd = match &stitch.vhost {
            Some(vhost) => Some(vhost.try_clone().map_err(duplicate)?),
            None => None,
        };
        let nic = slot.nic;
        let device = data_nic_device(profile, name, nic, stitch.data_nic().mtu);
        Ok(HotplugNic { id: format!("data{nic}"), device, fd, vhost_fd })
    }

    /// Hot-plugs the stitched link `link` into the slot it has at boot.
    async fn plug(&self, link: &str, qmp: &Qmp, profile: &Profile, name: &str) -> Result<(), String> {
        let slot = self.slots.iter().find(|s| s.name == link && s.stitch.is_some()).ok_or("not stitched")?;
        let hotplug = self.hotplug_nic(slot, profile, name).map_err(|err| crate::logging::error_chain(&err))?;
        qmp.hotplug_nic(&hotplug).await.map_err(|err| crate::logging::error_chain(&err))?;
        tracing::info!(link, nic = slot.nic, "link hot-plugged into the VM");
        Ok(())
    }

    async fn drop_stitch(&mut self, name: &str, state: LinkState) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) {
            if let Some(stitch) = slot.stitch.take() {
                if let Err(err) = plumb::unstitch(&self.handle, &stitch).await {
                    tracing::warn!(link = %name, %err, "unstitch failed");
                }
            }
            slot.state = state;
        }
    }

    /// Removes everything stitched (ingress qdiscs, bridges, macvtaps); TAPs go with the
    /// last descriptor.
    pub async fn teardown(&mut self) {
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        for name in names {
            self.drop_stitch(&name, LinkState::Missing).await;
        }
    }
}

/// Stitches `link` again to `stitch`'s kept TAP (a returning link, or plumbing found broken)
/// and proves it with the self-check: the link's new state. Failures are logged.
async fn restitch_checked(handle: &Handle, stitch: &mut Stitch, link: &Link) -> LinkState {
    if let Err(err) = plumb::restitch(handle, stitch, link).await {
        tracing::error!(link = %link.name, nic = stitch.nic, err = %crate::logging::error_chain(&err), "cannot stitch the link again");
        return LinkState::Failed;
    }
    match selfcheck::self_check(stitch).await {
        Ok(check) => check_state(check),
        Err(err) => {
            tracing::error!(link = %link.name, %err, "self-check after stitching the link again failed");
            LinkState::Failed
        }
    }
}

/// Sets VM NIC `nic`'s link state; a failure is logged (the guest keeps its old state).
async fn set_nic_link(qmp: &Qmp, link: &str, nic: u32, up: bool) {
    match qmp.set_link(&format!("nic{nic}"), up).await {
        Ok(()) => tracing::info!(link, nic, up, "VM NIC link state set"),
        Err(err) => tracing::warn!(link, nic, up, err = %crate::logging::error_chain(&err), "set_link failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nic_index_is_the_numeric_suffix_else_the_next_free() {
        assert_eq!(nic_index("eth3", &[]), 3);
        assert_eq!(nic_index("net1", &[]), 1);
        assert_eq!(nic_index("eth10", &[1, 2]), 10);
        assert_eq!(nic_index("wan", &[1, 2]), 3);
        assert_eq!(nic_index("eth0", &[]), 1);
        assert_eq!(nic_index("eth2", &[2]), 1, "a taken suffix falls back to the next free index");
    }
}
