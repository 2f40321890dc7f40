//! NIC hot-plug and unplug over QMP: a tap backend on descriptors vial passes (`getfd`,
//! `netdev_add`), the guest device in front of it (`device_add`), and its removal, which needs
//! the guest's consent (`device_del`, then `DEVICE_DELETED`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::device::{self, Device};
use super::{Qmp, QmpError};

/// A NIC to hot-plug into the running VM: a tap backend (`netdev_add type=tap`) on descriptors
/// that vial opened, and the guest device in front of it (`device_add`). QEMU receives its own
/// duplicates of the descriptors, so the caller may drop this once `hotplug_nic` returned.
///
/// The descriptors are named after the netdev in QEMU's table: `<id>` for the tap and
/// `<id>-vhost` for vhost-net, so each link owns one obvious set of names.
#[derive(Debug)]
pub struct HotplugNic {
    /// The netdev id (`data3`), also the `getfd` name of `fd`. QEMU rejects names that start
    /// with a digit.
    pub id: String,
    /// The guest device, as a cold boot's `-device` has it (`vm::argv::data_nic_device`): its
    /// `netdev` names `id`, its `id` (`nic3`) is what `unplug_nic` and `DEVICE_DELETED` name.
    /// A `bus` of `None` is the root bus, which hot-plugs on `pc` (ACPI PCI hotplug on
    /// `pci.0`); `q35`'s `pcie.0` does not, so there it must name a `pcie-root-port`.
    pub device: Device,
    /// The tap: a TAP from /dev/net/tun, or a macvtap's /dev/tapN, opened read-write. QEMU
    /// clears O_NONBLOCK on what it receives (`tcp_chr_recv`), and the open file description is
    /// shared, so vial should not keep using this descriptor for non-blocking I/O afterwards.
    pub fd: OwnedFd,
    /// An open /dev/vhost-net, for in-kernel virtio-net (`vhostfd`, with `vhost=on`).
    pub vhost_fd: Option<OwnedFd>,
}

impl Qmp {
    /// Hands QEMU a duplicate of `fd` under `name` (`getfd`), for a later command on this same
    /// connection to use (`netdev_add ... fd=<name>`); QEMU's table of named descriptors is per
    /// monitor. A name already in the table is replaced (QEMU closes the old descriptor).
    ///
    /// Needs a connection from `connect_unix`; otherwise returns `FdPassingUnsupported` without
    /// sending anything. Do not abandon the future once it is polled: the descriptor may still
    /// reach QEMU after the caller gave up, and collide with the next one (see `fd_command`).
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        if !self.link.passes_fds {
            return Err(QmpError::FdPassingUnsupported { fdname: name.to_string() });
        }
        let duplicate =
            fd.try_clone_to_owned().map_err(|source| QmpError::DuplicateFd { fdname: name.to_string(), source })?;
        let _one_descriptor_in_flight = self.link.fd_command.lock().await;
        self.execute_with_fds(qapi::qmp::getfd { fdname: name.to_string() }, vec![duplicate]).await.map(drop)
    }

    /// Closes a descriptor that `getfd` passed and no command took (`closefd`). Commands that
    /// use a named descriptor take it out of the table, so after a successful `netdev_add` there
    /// is nothing left to close.
    pub async fn closefd(&self, name: &str) -> Result<(), QmpError> {
        self.execute(qapi::qmp::closefd { fdname: name.to_string() }).await.map(drop)
    }

    /// Hot-plugs `nic` into the running VM: `getfd` for the tap (and vhost-net), `netdev_add` of
    /// a tap backend on them, and `device_add` of the guest device. When a step fails, the steps
    /// before it are undone (`netdev_del`, `closefd`), so QEMU is left as it was.
    ///
    /// The machine must accept hot-plug on the chosen bus: `pc` does on its root bus through
    /// ACPI; on `q35`, `nic.bus` must name a free `pcie-root-port` created at launch.
    pub async fn hotplug_nic(&self, nic: &HotplugNic) -> Result<(), QmpError> {
        self.plug_nic(nic)
            .await
            .map_err(|source| QmpError::HotplugNic { device: nic.device.id(), source: Box::new(source) })?;
        info!(device = %nic.device.to_arg(), netdev = %nic.id, "nic hot-plugged");
        Ok(())
    }

    async fn plug_nic(&self, nic: &HotplugNic) -> Result<(), QmpError> {
        let vhost_name = format!("{}-vhost", nic.id);
        self.getfd(&nic.id, nic.fd.as_fd()).await?;
        if let Some(vhost_fd) = &nic.vhost_fd {
            if let Err(error) = self.getfd(&vhost_name, vhost_fd.as_fd()).await {
                self.undo_getfd(&nic.id).await;
                return Err(error);
            }
        }

        let tap = qapi::qmp::NetdevTapOptions {
            fd: Some(nic.id.clone()),
            vhost: nic.vhost_fd.as_ref().map(|_| true),
            vhostfd: nic.vhost_fd.as_ref().map(|_| vhost_name.clone()),
            ..Default::default()
        };
        let netdev = qapi::qmp::Netdev::tap { id: nic.id.clone(), tap };
        if let Err(error) = self.execute(qapi::qmp::netdev_add(netdev)).await {
            // netdev_add takes each named descriptor out of the table as it parses it
            // (monitor_fd_param), so depending on where it failed, some may be left.
            self.undo_getfd(&nic.id).await;
            if nic.vhost_fd.is_some() {
                self.undo_getfd(&vhost_name).await;
            }
            return Err(error);
        }

        if let Err(error) = self.device_add(&nic.device).await {
            match self.execute(qapi::qmp::netdev_del { id: nic.id.clone() }).await {
                Ok(_) => debug!(netdev = %nic.id, "netdev of the failed hot-plug deleted"),
                Err(undo) => warn!(netdev = %nic.id, error = %undo, "deleting the netdev of a failed hot-plug failed"),
            }
            return Err(error);
        }
        Ok(())
    }

    /// Sets the link state of NIC `device` as the guest sees it (`set_link`): a virtio-net or
    /// e1000 guest gets a carrier change, as when a cable is pulled or plugged.
    pub async fn set_link(&self, device: &str, up: bool) -> Result<(), QmpError> {
        self.execute(qapi::qmp::set_link { name: device.to_string(), up }).await.map(drop)
    }

    /// Adds `device` (`device_add`); a `bus` property goes where QMP wants it.
    pub async fn device_add(&self, device: &Device) -> Result<(), QmpError> {
        let mut arguments = serde_json::Map::new();
        let mut bus = None;
        let mut id = None;
        for (key, value) in &device.props {
            match (*key, value) {
                ("bus", value) => bus = Some(value.to_string()),
                ("id", value) => id = Some(value.to_string()),
                (key, device::Value::Number(number)) => drop(arguments.insert(key.into(), Value::from(*number))),
                (key, device::Value::Text(text)) => drop(arguments.insert(key.into(), Value::from(text.as_str()))),
            }
        }
        let command = qapi::qmp::device_add { bus, id, driver: device.driver.clone(), arguments };
        self.execute(command).await.map(drop)
    }

    /// Closes a passed descriptor after a failed step. QEMU may already have taken it (then
    /// `closefd` fails with "not found", which is what was wanted); the hot-plug has failed
    /// anyway, so a failure here is logged, not returned.
    async fn undo_getfd(&self, name: &str) {
        match self.closefd(name).await {
            Ok(()) => debug!(fdname = name, "passed descriptor closed after a failed hot-plug"),
            Err(QmpError::Command { desc, .. }) => debug!(fdname = name, %desc, "passed descriptor already taken"),
            Err(error) => warn!(fdname = name, %error, "closing a passed descriptor after a failed hot-plug failed"),
        }
    }

    /// Removes a NIC that `hotplug_nic` added: `device_del`, a wait of up to `timeout` for the
    /// device's `DEVICE_DELETED`, then `netdev_del`. The event still reaches `Events`.
    ///
    /// PCI unplug needs the guest: QEMU asks it to eject the device (ACPI on `pc`, and on `q35`
    /// too since QEMU 6.1) and deletes the device only when it does, or at the next system
    /// reset. A guest that never does (no OS yet, `-S`, no ACPI hot-plug support) gives
    /// `DeviceDeletedTimeout`; the request stays pending in QEMU and the netdev stays in place,
    /// since the device may still use it.
    ///
    /// Calling it again is safe: a device already being unplugged is waited for again, and a
    /// device or netdev that no longer exists counts as removed.
    pub async fn unplug_nic(&self, device_id: &str, netdev_id: &str, timeout: Duration) -> Result<(), QmpError> {
        self.unplug_steps(device_id, netdev_id, timeout)
            .await
            .map_err(|source| QmpError::UnplugNic { device: device_id.to_string(), source: Box::new(source) })?;
        info!(device = device_id, netdev = netdev_id, "nic unplugged");
        Ok(())
    }

    async fn unplug_steps(&self, device_id: &str, netdev_id: &str, timeout: Duration) -> Result<(), QmpError> {
        // Watch before asking: where no guest is involved QEMU deletes the device, and sends the
        // event, before it replies to device_del (tests/qtest/device-plug-test.c).
        let mut watch = self.link.pending.watch_deletion(device_id)?;
        let gone = match self.execute(qapi::qmp::device_del { id: device_id.to_string() }).await {
            Ok(_) => false,
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
                debug!(device = device_id, "device already gone");
                true
            }
            // QEMU 7.1+ refuses a second device_del while the first is pending
            // (qmp_device_del, softmmu/qdev-monitor.c); waiting for the first is what we want.
            Err(QmpError::Command { desc, .. }) if desc.contains("already in the process of unplug") => {
                debug!(device = device_id, "device unplug already pending; waiting for it");
                false
            }
            Err(error) => return Err(error),
        };
        if !gone {
            watch.wait(timeout).await?;
        }
        drop(watch);
        match self.execute(qapi::qmp::netdev_del { id: netdev_id.to_string() }).await {
            Ok(_) => Ok(()),
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {
                debug!(netdev = netdev_id, "netdev already gone");
                Ok(())
            }
            Err(error) => Err(error),
        }
    }
}
