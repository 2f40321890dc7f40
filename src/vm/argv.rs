//! The QEMU command line, as a pure function of the validated profile and the runtime inputs.
//! Unit tests pin it for every profile. This file never looks at the host.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::Accel;
use crate::config::profile::pci_root_bus;
use crate::config::{NicLayout, Profile};
use crate::qmp::device::Device;
use crate::rundir;

/// Runtime inputs that the profile cannot know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The accelerator decided at start.
    pub accel: Accel,
    /// Where the sockets and the console log go.
    pub run_dir: PathBuf,
    /// The overlay of each profile disk, in the profile's order.
    pub disks: Vec<PathBuf>,
    /// The lesson directory to export, when it exists.
    pub share: Option<PathBuf>,
    /// The listening socket QEMU serves `vial`'s own QMP monitor on (inherited).
    pub control_fd: RawFd,
    /// The listening sockets of the public QMP monitor and the serial console (inherited;
    /// vial binds them, so QEMU never writes in the run directory); `None` names
    /// `qmp.sock` and `console.sock` for QEMU to bind (`vial argv`, a snapshot's machine line).
    pub listener_fds: Option<Listeners>,
    /// The endpoint's name (the VM's name; MACs derive from it).
    pub name: String,
    /// Data NICs, in guest order.
    pub data_nics: Vec<DataNic>,
    /// Extra arguments from the environment, appended last.
    pub extra_args: Vec<String>,
    /// Start paused, waiting for a RAM snapshot (`-S -incoming defer`), without the devices
    /// the snapshot lacks: the 9p device (its `-fsdev` stays) and the data NICs are
    /// hot-plugged once the snapshot is loaded.
    pub restore: bool,
    /// The write end of the console log's pipe (`vm::console`), inherited; `None` names
    /// `console.log` for QEMU to write itself (`vial argv`, a snapshot's machine line).
    pub console_log_fd: Option<RawFd>,
    /// Run QEMU under its seccomp sandbox ([`SANDBOX`]), decided once at start.
    pub sandbox: bool,
}

/// The inherited listeners of [`Launch::listener_fds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// `qmp.sock`.
    pub qmp: RawFd,
    /// `console.sock`.
    pub console: RawFd,
}

/// QEMU's seccomp sandbox as vial asks for it (qemu(1) `-sandbox`): besides the default
/// filter, no set*id (`elevateprivileges`), no fork or exec (`spawn`; vial's QEMU needs
/// neither: TAPs come without scripts and migrations go to descriptors) and no scheduler or
/// priority changes (`resourcecontrol`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// How a data NIC reaches its container link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    /// A TAP device QEMU opens by name.
    Tap {
        /// The TAP's name.
        ifname: String,
    },
    /// An already opened tap file descriptor (macvtap's `/dev/tapN`), inherited by QEMU.
    TapFd {
        /// The descriptor.
        fd: RawFd,
    },
}

/// One data NIC of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataNic {
    /// 1-based index, as the guest counts data ports (`swp1`).
    pub index: u32,
    /// Where its frames go.
    pub backend: NicBackend,
    /// The link's MTU, told to virtio guests.
    pub mtu: u32,
    /// Use vhost-net.
    pub vhost: bool,
}

/// A stable, locally administered MAC for NIC `index` (0 = management) of endpoint `name`:
/// `02` then 32 bits of FNV-1a over the name, then the index. Endpoints with different names
/// get different MACs (up to hash collisions, one in four billion per pair), and a restart
/// keeps them, so guest configuration keyed on MACs survives.
pub fn nic_mac(name: &str, index: u32) -> [u8; 6] {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let h = hash.to_be_bytes();
    [0x02, h[0], h[1], h[2], h[3], index.min(255) as u8]
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The PCI slot of data NIC `index` on `pc` machines: fixed, so that a NIC hot-plugged later
/// lands where it would have been at boot and the guest enumerates data NICs in link order
/// however they arrived. Slots 2..7 are left to the management, reserved and 9p devices,
/// which QEMU places itself. `None` (QEMU chooses) past 24 data NICs and on other machines
/// (`q35` hot-plug needs pcie-root-ports, not done yet).
pub fn data_nic_slot(machine_type: &str, index: u32) -> Option<u32> {
    let pc = machine_type == "pc" || machine_type.starts_with("pc-");
    (pc && (1..=24).contains(&index)).then_some(0x07 + index)
}

/// Data NIC `index` of endpoint `name` on a link of `mtu`: the `-device` of a cold boot and
/// what a hot-plug adds, alike.
pub fn data_nic_device(profile: &Profile, name: &str, index: u32, mtu: u32) -> Device {
    let mut device = Device::new(profile.nic_model.as_str())
        .with("netdev", format!("data{index}"))
        .with("id", format!("nic{index}"))
        .with("mac", format_mac(nic_mac(name, index)));
    if profile.nic_model == "virtio-net-pci" && mtu != 1500 {
        device = device.with("host_mtu", mtu);
    }
    match (profile.nic_layout, pci_root_bus(&profile.machine_type)) {
        // Validation keeps index within the slot's functions (`NicLayout::MAX_FUNCTIONS`).
        (NicLayout::Multifunction, Some(bus)) => {
            device = device.with("bus", bus).with("addr", format!("{:#x}.{index}", NicLayout::SLOT));
        }
        _ => {
            if let Some(slot) = data_nic_slot(&profile.machine_type, index) {
                device = device.with("bus", "pci.0").with("addr", format!("{slot:#x}"));
            }
        }
    }
    device
}

/// The management NIC (on the `mgmt` netdev). In the multifunction layout it is function 0
/// of slot 3 and says the slot has more; otherwise QEMU places it.
pub fn mgmt_nic_device(profile: &Profile, name: &str) -> Device {
    let mut device =
        Device::new(profile.nic_model.as_str()).with("netdev", "mgmt").with("mac", format_mac(nic_mac(name, 0)));
    if let (NicLayout::Multifunction, Some(bus)) = (profile.nic_layout, pci_root_bus(&profile.machine_type)) {
        device = device.with("bus", bus).with("addr", format!("{:#x}.0", NicLayout::SLOT)).with("multifunction", "on");
    }
    device
}

/// The fw_cfg file that carries the endpoint's name (`/sys/firmware/qemu_fw_cfg/by_name/
/// opt/vial/name/raw` in a Linux guest with `qemu_fw_cfg` loaded).
pub const NAME_FW_CFG: &str = "opt/vial/name";

/// The id of the 9p device (also what a hot-plug adds) and of its `-fsdev`.
pub const SHARE_DEVICE_ID: &str = "share";
/// The id of the lesson directory's `-fsdev`.
pub const SHARE_FSDEV_ID: &str = "lesson";

/// The 9p device, for `-device` and for `device_add` alike. On `pc` it sits at slot 7, just
/// below the data NICs, when the slots QEMU assigns before it (virtio and SCSI disks, the
/// management NIC, reserved NICs from slot 2) leave it free; a device hot-plugged after a
/// snapshot loads then lands where it is at a cold boot.
pub fn share_device(profile: &Profile, tag: &str) -> Device {
    let mut device =
        Device::new("virtio-9p-pci").with("id", SHARE_DEVICE_ID).with("fsdev", SHARE_FSDEV_ID).with("mount_tag", tag);
    let pc = profile.machine_type == "pc" || profile.machine_type.starts_with("pc-");
    let before = profile.disks.iter().filter(|d| d.interface != "ide").count() + 1 + profile.reserved_nics as usize;
    if pc && before <= 5 {
        device = device.with("bus", "pci.0").with("addr", "0x7");
    }
    device
}

/// The CPU model for the accelerator: `host` exists only under KVM, so TCG gets `max`.
pub fn cpu_model(profile: &Profile, accel: Accel) -> &str {
    match (profile.cpu.as_str(), accel) {
        ("host", Accel::Tcg) => "max",
        (model, _) => model,
    }
}

fn path_str(path: &Path) -> String {
    // QEMU option values separate on ','; a comma in a path is written twice.
    path.display().to_string().replace(',', ",,")
}

/// The full QEMU argv (argv[0] is the profile's QEMU binary).
pub fn qemu_argv(profile: &Profile, launch: &Launch) -> Vec<OsString> {
    let mut args: Vec<String> = vec![profile.qemu.clone()];
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let run = |name: &str| path_str(&launch.run_dir.join(name));

    push(&["-name", &format!("{},process=qemu-{}", launch.name.replace(',', ",,"), launch.name)]);
    push(&["-machine", &profile.machine_type]);
    push(&["-accel", launch.accel.as_str()]);
    push(&["-cpu", cpu_model(profile, launch.accel)]);
    push(&["-m", &profile.memory_mib.to_string()]);
    push(&["-smp", &profile.vcpus.to_string()]);
    // No default devices or config files: every device is on this command line, on purpose.
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // Unless the extra arguments choose their own sandbox (QEMU takes the first it is given).
    let own_sandbox = profile.extra_args.iter().chain(&launch.extra_args).any(|arg| arg == "-sandbox");
    if launch.sandbox && !own_sandbox {
        push(&["-sandbox", SANDBOX]);
    }

    if let Some(boot) = &profile.boot {
        push(&["-kernel", &path_str(&boot.kernel)]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", &path_str(initrd)]);
        }
        if !boot.append.is_empty() {
            push(&["-append", &boot.append]);
        }
    }
    for (i, (disk, overlay)) in profile.disks.iter().zip(&launch.disks).enumerate() {
        // The overlay is always qcow2; its backing file carries the image's own format.
        push(&[
            "-drive",
            &format!("file={},format=qcow2,if={},index={i},cache=writeback", path_str(overlay), disk.interface),
        ]);
    }

    // Management NIC: QEMU user networking, one hostfwd per forward, listening on loopback;
    // `forward` relays the management address to it (see there for why). restrict=on keeps
    // the guest from opening connections out through the container (DHCP and the forwards
    // still work; libslirp answers BOOTP before its restriction check).
    let mut netdev = String::from("user,id=mgmt");
    if let Some((net, prefix)) = profile.user_net {
        netdev.push_str(&format!(",net={net}/{prefix}"));
    }
    netdev.push_str(if profile.egress { ",restrict=off" } else { ",restrict=on" });
    // The endpoint's name, as DHCP option 12 (appliances that name themselves from DHCP).
    netdev.push_str(&format!(",hostname={}", launch.name));
    for forward in &profile.forwards {
        netdev.push_str(&format!(
            ",hostfwd={}:{}:{}-:{}",
            forward.protocol.as_str(),
            Ipv4Addr::LOCALHOST,
            forward.container_port,
            forward.guest_port
        ));
    }
    push(&["-netdev", &netdev]);
    push(&["-device", &mgmt_nic_device(profile, &launch.name).to_arg()]);
    // Unconnected NICs the appliance expects before its data ports (vQFX's internal ports).
    for reserved in 0..profile.reserved_nics {
        push(&["-device", &format!("{},mac={}", profile.nic_model, format_mac(nic_mac(&launch.name, 200 + reserved)))]);
    }
    for nic in &launch.data_nics {
        let id = format!("data{}", nic.index);
        let vhost = if nic.vhost { ",vhost=on" } else { "" };
        let backend = match &nic.backend {
            NicBackend::Tap { ifname } => format!("tap,id={id},ifname={ifname},script=no,downscript=no{vhost}"),
            NicBackend::TapFd { fd } => format!("tap,id={id},fd={fd}{vhost}"),
        };
        push(&["-netdev", &backend]);
        push(&["-device", &data_nic_device(profile, &launch.name, nic.index, nic.mtu).to_arg()]);
    }

    if let (Some(share), Some(dir)) = (&profile.share, &launch.share) {
        let readonly = if share.read_only { ",readonly=on" } else { "" };
        push(&["-fsdev", &format!("local,id={SHARE_FSDEV_ID},path={},security_model=none{readonly}", path_str(dir))]);
        if !launch.restore {
            push(&["-device", &share_device(profile, &share.tag).to_arg()]);
        }
    }
    // The endpoint's name, for guests that read it before they have a network (and after a
    // snapshot loads, when their DHCP lease is the snapshot's).
    push(&["-fw_cfg", &format!("name={NAME_FW_CFG},string={}", launch.name)]);

    // Serial console: a socket to attach to, and everything it prints in a log.
    let console_log = match launch.console_log_fd {
        Some(fd) => format!("/proc/self/fd/{fd}"),
        None => run(rundir::CONSOLE_LOG),
    };
    let (console_socket, qmp_socket) = match launch.listener_fds {
        Some(fds) => (format!("fd={}", fds.console), format!("fd={}", fds.qmp)),
        None => (format!("path={}", run(rundir::CONSOLE)), format!("path={}", run(rundir::QMP))),
    };
    let console = format!("socket,id=console,{console_socket},server=on,wait=off,logfile={console_log}");
    push(&["-chardev", &console]);
    push(&["-serial", "chardev:console"]);
    // vial's own monitor: a listener vial bound before the launch, so vial can connect at
    // once (the connection waits in the backlog) without polling for a socket file.
    push(&["-chardev", &format!("socket,id=control,fd={},server=on,wait=off", launch.control_fd)]);
    push(&["-mon", "chardev=control,mode=control"]);
    // A second monitor for people and tools, so they never take vial's.
    push(&["-chardev", &format!("socket,id=qmp,{qmp_socket},server=on,wait=off")]);
    push(&["-mon", "chardev=qmp,mode=control"]);

    if launch.restore {
        push(&["-S", "-incoming", "defer"]);
    }
    args.extend(profile.extra_args.iter().cloned());
    args.extend(launch.extra_args.iter().cloned());
    args.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests;
