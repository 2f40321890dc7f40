//! The VM profile: one TOML file per appliance kind (`vm-profiles/<kind>.toml`), baked into the
//! endpoint image. This file owns the format: the file as written (`ProfileFile`, serde) and
//! the validated profile (`Profile`) that code after validation takes; `validate` turns one
//! into the other. It never starts anything and never reads environment variables
//! (overrides are applied in `config`).

use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// The profile file as written. Every table refuses unknown fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    /// Short name of the appliance kind (`linux`, `cumulus`, `vqfx`, `frr`).
    pub name: String,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// The virtual machine's hardware.
    pub machine: MachineFile,
    /// Direct kernel boot; omit it to boot from the first disk.
    #[serde(default)]
    pub boot: Option<BootFile>,
    /// Disks, in order. Each is used through a copy-on-write overlay.
    #[serde(default)]
    pub disks: Vec<DiskFile>,
    /// NICs and management networking.
    #[serde(default)]
    pub network: NetworkFile,
    /// Ports on the container's management interface forwarded into the guest.
    #[serde(default)]
    pub forwards: Vec<ForwardFile>,
    /// The lesson directory exported into the guest over virtio-9p.
    #[serde(default)]
    pub share: ShareFile,
    /// How `vial` decides that the guest is ready.
    pub readiness: ReadinessFile,
    /// How the guest is stopped.
    #[serde(default)]
    pub stop: StopFile,
    /// The credentials the image's first boot created (used by tools, reported in docs).
    #[serde(default)]
    pub credentials: Option<Credentials>,
    /// Steps that `cargo xtask image` drives on the serial console at the image's first boot
    /// (Stage 1: user, DHCP, APIs, power-off). `vial` itself never runs them.
    #[serde(default)]
    pub first_boot: Vec<FirstBootStepFile>,
    /// A RAM snapshot of the booted guest that `vial` starts from (made by `vial snapshot`).
    #[serde(default)]
    pub snapshot: Option<SnapshotFile>,
}

/// `[snapshot]`: where the image keeps the RAM snapshot of its booted guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotFile {
    /// The snapshot directory (`vmstate`, the disks' snapshot layers, `snapshot.json`).
    pub path: PathBuf,
    /// How long `vial snapshot` lets the guest settle after it is ready, before saving.
    #[serde(default = "default_settle")]
    pub settle: String,
}

fn default_settle() -> String {
    "0s".into()
}

/// `[[first_boot]]`: wait for a pattern on the serial console, then send a line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstBootStepFile {
    /// What the step does, for progress and errors.
    pub name: String,
    /// Text to wait for on the console before sending (empty: send at once).
    #[serde(default)]
    pub expect: String,
    /// Text to send after the pattern appeared (a newline is appended).
    #[serde(default)]
    pub send: Option<String>,
    /// How long to wait for the pattern.
    #[serde(default = "default_step_timeout")]
    pub timeout: String,
}

/// A validated first-boot step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstBootStep {
    /// Name.
    pub name: String,
    /// Pattern to wait for.
    pub expect: String,
    /// Line to send.
    pub send: Option<String>,
    /// Time allowed for the pattern.
    pub timeout: Duration,
}

/// `[machine]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    /// QEMU machine type (`pc`, `q35`).
    #[serde(rename = "type", default = "default_machine_type")]
    pub machine_type: String,
    /// CPU model; `host` means the host CPU under KVM and `max` under TCG.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Guest memory, e.g. `256M`, `2G`.
    pub memory: String,
    /// Virtual CPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// `auto` (KVM when usable, else TCG), `kvm` or `tcg`.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// The QEMU binary, by name on PATH or absolute path.
    #[serde(default = "default_qemu")]
    pub qemu: String,
    /// Who QEMU runs as: `auto` (`vial-qemu` where the image allows, else root), `root`, or
    /// a user name.
    #[serde(default = "default_user")]
    pub user: String,
    /// Further QEMU arguments appended verbatim.
    #[serde(default)]
    pub extra_args: Vec<String>,
}

/// `[boot]`: direct kernel boot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    /// Path of the kernel image.
    pub kernel: PathBuf,
    /// Path of the initrd, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub append: String,
}

/// `[[disks]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    /// Path of the appliance's disk image (never written: an overlay takes the writes).
    pub path: PathBuf,
    /// Image format: `qcow2`, `raw`, `vmdk`.
    #[serde(default = "default_disk_format")]
    pub format: String,
    /// How the guest sees it: `ide`, `virtio`, `scsi`.
    #[serde(default = "default_disk_interface")]
    pub interface: String,
}

/// `[network]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    /// QEMU NIC model for every NIC (`virtio-net-pci`, `e1000`).
    #[serde(default = "default_nic_model")]
    pub nic_model: String,
    /// How many data links the appliance expects (overridden by `VIAL_DATA_IFACES`).
    #[serde(default)]
    pub data_nics: u32,
    /// Unconnected NICs placed between the management NIC and the data NICs (vQFX's
    /// internal ports).
    #[serde(default)]
    pub reserved_nics: u32,
    /// Let the guest open connections out through the container (QEMU user networking
    /// without `restrict=on`). Forwards work either way.
    #[serde(default)]
    pub egress: bool,
    /// The user-mode network the guest's management NIC lives in (QEMU's default
    /// `10.0.2.0/24`; the guest gets `.15` by DHCP).
    #[serde(default)]
    pub user_net: Option<String>,
    /// Data plane: `tc`, `bridge` or `macvtap`.
    #[serde(default = "default_plumbing")]
    pub plumbing: String,
    /// Where the NICs sit on the PCI bus: `slots` or `multifunction` ([`NicLayout`]).
    #[serde(default = "default_nic_layout")]
    pub nic_layout: String,
    /// How long to wait for the expected data links before giving up.
    #[serde(default = "default_link_timeout")]
    pub link_timeout: String,
}

impl Default for NetworkFile {
    fn default() -> Self {
        NetworkFile {
            nic_model: default_nic_model(),
            data_nics: 0,
            reserved_nics: 0,
            egress: false,
            user_net: None,
            plumbing: default_plumbing(),
            nic_layout: default_nic_layout(),
            link_timeout: default_link_timeout(),
        }
    }
}

/// `[[forwards]]`: one management port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardFile {
    /// `tcp` or `udp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// The port on the container's management address.
    pub container_port: u16,
    /// The port in the guest.
    pub guest_port: u16,
}

/// `[share]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareFile {
    /// The lesson directory in the container.
    #[serde(default = "default_share_path")]
    pub path: PathBuf,
    /// The 9p mount tag the guest mounts.
    #[serde(default = "default_share_tag")]
    pub tag: String,
    /// Export read-only (the default; lessons must not be changed by a guest).
    #[serde(default = "default_true")]
    pub read_only: bool,
    /// Export at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for ShareFile {
    fn default() -> Self {
        ShareFile { path: default_share_path(), tag: default_share_tag(), read_only: true, enabled: true }
    }
}

/// `[readiness]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessFile {
    /// `tcp` (a forwarded port answers) or `serial` (a pattern on the serial console).
    pub probe: String,
    /// For `tcp`: the container port of a TCP forward.
    #[serde(default)]
    pub port: Option<u16>,
    /// For `tcp`: bytes to send after connecting (escape sequences `\r\n` allowed in TOML).
    #[serde(default)]
    pub send: Option<String>,
    /// For `tcp`: the reply must start with this (e.g. `SSH-`); without it, any byte counts.
    #[serde(default)]
    pub expect: Option<String>,
    /// For `serial`: the text to wait for on the console.
    #[serde(default)]
    pub pattern: Option<String>,
    /// For `tcp`: text the guest also prints on the serial console when it is ready, e.g.
    /// once it applied the lesson (a port can answer before that).
    #[serde(default)]
    pub console: Option<String>,
    /// Time between attempts.
    #[serde(default = "default_interval")]
    pub interval: String,
}

/// `[stop]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopFile {
    /// How long the guest gets to power off after the ACPI power button.
    #[serde(default = "default_stop_timeout")]
    pub timeout: String,
}

impl Default for StopFile {
    fn default() -> Self {
        StopFile { timeout: default_stop_timeout() }
    }
}

/// `[credentials]`: what the image's first boot set up.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Login user.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Groups the user belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
}

fn default_machine_type() -> String {
    "pc".into()
}
fn default_cpu() -> String {
    "host".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_accel() -> String {
    "auto".into()
}
fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}
fn default_user() -> String {
    "auto".into()
}
fn default_disk_format() -> String {
    "qcow2".into()
}
fn default_disk_interface() -> String {
    "virtio".into()
}
fn default_nic_model() -> String {
    "virtio-net-pci".into()
}
fn default_nic_layout() -> String {
    NicLayout::Slots.as_str().into()
}

fn default_plumbing() -> String {
    "tc".into()
}
fn default_link_timeout() -> String {
    "120s".into()
}
fn default_protocol() -> String {
    "tcp".into()
}
fn default_share_path() -> PathBuf {
    PathBuf::from("/antidote")
}
fn default_share_tag() -> String {
    "antidote".into()
}
fn default_true() -> bool {
    true
}
fn default_interval() -> String {
    "250ms".into()
}
fn default_step_timeout() -> String {
    "60s".into()
}
fn default_stop_timeout() -> String {
    "8s".into()
}

/// KVM or TCG, or let `vial` decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` is usable, else TCG.
    Auto,
    /// KVM or fail.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl AccelChoice {
    /// Parses `auto|kvm|tcg`.
    pub fn parse(value: &str) -> Option<AccelChoice> {
        match value {
            "auto" => Some(AccelChoice::Auto),
            "kvm" => Some(AccelChoice::Kvm),
            "tcg" => Some(AccelChoice::Tcg),
            _ => None,
        }
    }
}

/// Who QEMU runs as (`machine.user`); see `vm::user`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuUser {
    /// [`QemuUser::DEFAULT`] where the image has it and it can run QEMU; root otherwise.
    Auto,
    /// Root, as QEMU ran before vial confined it.
    Root,
    /// This user, or the start fails.
    Named(String),
}

impl QemuUser {
    /// The user `auto` looks for.
    pub const DEFAULT: &'static str = "vial-qemu";

    /// Parses `auto`, `root` or a user name (as `useradd` takes it: a lower-case letter or
    /// `_`, then letters, digits, `_`, `-`, at most 32 bytes).
    pub fn parse(value: &str) -> Option<QemuUser> {
        match value {
            "auto" => Some(QemuUser::Auto),
            "root" => Some(QemuUser::Root),
            name if is_user_name(name) => Some(QemuUser::Named(name.to_string())),
            _ => None,
        }
    }
}

fn is_user_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = matches!(bytes.next(), Some(b'a'..=b'z' | b'_'));
    first_ok && name.len() <= 32 && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

/// The data plane mode between a container link and a VM NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plumbing {
    /// TAP + tc ingress redirect both ways.
    Tc,
    /// TAP and link in a Linux bridge.
    Bridge,
    /// macvtap in passthru mode on the link.
    Macvtap,
}

impl Plumbing {
    /// Parses `tc|bridge|macvtap`.
    pub fn parse(value: &str) -> Option<Plumbing> {
        match value {
            "tc" => Some(Plumbing::Tc),
            "bridge" => Some(Plumbing::Bridge),
            "macvtap" => Some(Plumbing::Macvtap),
            _ => None,
        }
    }

    /// The name used in profiles and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Plumbing::Tc => "tc",
            Plumbing::Bridge => "bridge",
            Plumbing::Macvtap => "macvtap",
        }
    }
}

/// Where the VM's NICs sit on the PCI bus, which decides the names a guest with predictable
/// interface names gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NicLayout {
    /// The management NIC where QEMU puts it; data NIC N in its own slot, `0x7 + N` on `pc`
    /// (`vm::argv::data_nic_slot`), so links can arrive, leave and return at any time.
    Slots,
    /// One multifunction slot, as Antidote's images used: the management NIC at 3.0, data
    /// NIC N at 3.N (N up to 7), so a guest names them `enp0s3f0`, `enp0s3f1`, ... A slot
    /// cannot gain functions once the guest runs: data links must be present at start.
    Multifunction,
}

impl NicLayout {
    /// The PCI slot of the multifunction layout.
    pub const SLOT: u32 = 3;
    /// Data NICs the multifunction layout holds (functions 1..=7).
    pub const MAX_FUNCTIONS: u32 = 7;

    /// Parses `slots|multifunction`.
    pub fn parse(value: &str) -> Option<NicLayout> {
        match value {
            "slots" => Some(NicLayout::Slots),
            "multifunction" => Some(NicLayout::Multifunction),
            _ => None,
        }
    }

    /// The name used in profiles and status.
    pub fn as_str(self) -> &'static str {
        match self {
            NicLayout::Slots => "slots",
            NicLayout::Multifunction => "multifunction",
        }
    }
}

/// The root PCI bus of a machine type, by the name QEMU gives it: `pci.0` on `pc` (i440FX),
/// `pcie.0` on `q35`; `None` for machines without one vial knows.
pub fn pci_root_bus(machine_type: &str) -> Option<&'static str> {
    if machine_type == "q35" || machine_type.starts_with("pc-q35") {
        Some("pcie.0")
    } else if machine_type == "pc" || machine_type.starts_with("pc-") {
        Some("pci.0")
    } else {
        None
    }
}

/// `tcp` or `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The name QEMU's `hostfwd` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A validated management port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// Protocol.
    pub protocol: Protocol,
    /// Port on the container's management address.
    pub container_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

/// A validated disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image's disk (read-only base of the overlay).
    pub path: PathBuf,
    /// Its format.
    pub format: String,
    /// `ide`, `virtio` or `scsi`.
    pub interface: String,
}

/// A validated kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// Kernel.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Command line.
    pub append: String,
}

/// A validated readiness probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connect to a forwarded TCP port on the management address; optionally send, then
    /// require a reply (starting with `expect` when given). A bare connect is not enough:
    /// QEMU's user networking accepts on the container side even when nothing listens in
    /// the guest, then closes.
    Tcp {
        /// Container port.
        port: u16,
        /// Bytes to send.
        send: Vec<u8>,
        /// Required reply prefix.
        expect: Vec<u8>,
        /// Console text that must also have appeared.
        console: Option<String>,
    },
    /// Wait for text on the serial console.
    Serial {
        /// The text.
        pattern: String,
    },
}

/// A validated share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The directory in the container.
    pub path: PathBuf,
    /// 9p mount tag.
    pub tag: String,
    /// Read-only export.
    pub read_only: bool,
}

/// A validated profile: code after validation takes only this type.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Appliance kind.
    pub name: String,
    /// QEMU machine type.
    pub machine_type: String,
    /// CPU model (`host` = host under KVM, max under TCG).
    pub cpu: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Acceleration choice.
    pub accel: AccelChoice,
    /// QEMU binary.
    pub qemu: String,
    /// Who QEMU runs as.
    pub qemu_user: QemuUser,
    /// Extra QEMU arguments.
    pub extra_args: Vec<String>,
    /// Kernel boot.
    pub boot: Option<Boot>,
    /// Disks.
    pub disks: Vec<Disk>,
    /// NIC model.
    pub nic_model: String,
    /// Expected data links.
    pub data_nics: u32,
    /// Unconnected NICs before the data NICs.
    pub reserved_nics: u32,
    /// Guest may open outbound connections.
    pub egress: bool,
    /// User-mode network (`10.0.2.0/24` when `None`).
    pub user_net: Option<(Ipv4Addr, u8)>,
    /// Data plane mode.
    pub plumbing: Plumbing,
    /// Where the NICs sit on the PCI bus.
    pub nic_layout: NicLayout,
    /// How long to wait for the expected data links.
    pub link_timeout: Duration,
    /// Management forwards.
    pub forwards: Vec<Forward>,
    /// The lesson share, unless disabled.
    pub share: Option<Share>,
    /// Readiness probe.
    pub probe: Probe,
    /// Probe interval.
    pub probe_interval: Duration,
    /// Stop timeout.
    pub stop_timeout: Duration,
    /// Credentials.
    pub credentials: Option<Credentials>,
    /// First-boot steps (used by `cargo xtask image`).
    pub first_boot: Vec<FirstBootStep>,
    /// The RAM snapshot to start from, if the profile has one.
    pub snapshot: Option<Snapshot>,
}

/// A validated `[snapshot]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Time between ready and saving, when the snapshot is made.
    pub settle: Duration,
}
