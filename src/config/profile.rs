//! The VM profile: one TOML file per appliance kind (`vm-profiles/<kind>.toml`), baked into the
//! endpoint image. This module owns the file format and its validation; it never starts
//! anything and never reads environment variables (overrides are applied in `config`).

use serde::Deserialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{parse_duration, parse_memory_mib, Problem};

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
fn default_disk_format() -> String {
    "qcow2".into()
}
fn default_disk_interface() -> String {
    "virtio".into()
}
fn default_nic_model() -> String {
    "virtio-net-pci".into()
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

const NIC_MODELS: &[&str] = &["virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"];
const DISK_INTERFACES: &[&str] = &["ide", "virtio", "scsi"];
const DISK_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi", "vpc"];

impl ProfileFile {
    /// Reads and parses a profile file. A syntax error or an unknown field is one problem
    /// naming the line.
    pub fn load(path: &Path) -> Result<ProfileFile, Problem> {
        let text = std::fs::read_to_string(path).map_err(|err| Problem {
            field: "VIAL_PROFILE".into(),
            value: path.display().to_string(),
            fix: format!("cannot read the profile ({err}); point VIAL_PROFILE or --profile at a profile file"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses profile text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ProfileFile, Problem> {
        toml::from_str(text).map_err(|err: toml::de::Error| {
            let line = err.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = err.message().trim().replace('\n', " ");
            Problem {
                field: match line {
                    Some(line) => format!("{origin}:{line}"),
                    None => origin.to_string(),
                },
                value: message,
                fix: "correct or remove it (the README lists every profile field)".into(),
            }
        })
    }

    /// Checks every field and returns all problems at once.
    pub fn validate(&self) -> Result<Profile, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, value: &dyn std::fmt::Display, fix: &str| {
            problems.push(Problem { field: field.into(), value: value.to_string(), fix: fix.into() })
        };

        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bad("name", &self.name, "use letters, digits, '-' or '_'");
        }
        let memory_mib = match parse_memory_mib(&self.machine.memory) {
            Some(mib) if (16..=1024 * 1024).contains(&mib) => mib,
            _ => {
                bad("machine.memory", &self.machine.memory, "give a size between 16M and 1T, such as 512M or 2G");
                0
            }
        };
        if self.machine.vcpus == 0 || self.machine.vcpus > 64 {
            bad("machine.vcpus", &self.machine.vcpus, "give a number from 1 to 64");
        }
        let accel = AccelChoice::parse(&self.machine.accel).unwrap_or_else(|| {
            bad("machine.accel", &self.machine.accel, "use auto, kvm or tcg");
            AccelChoice::Auto
        });
        if !["pc", "q35", "microvm"]
            .iter()
            .any(|m| self.machine.machine_type == *m || self.machine.machine_type.starts_with(&format!("{m}-")))
        {
            bad("machine.type", &self.machine.machine_type, "use pc or q35 (optionally versioned, e.g. pc-i440fx-7.2)");
        }
        if self.machine.cpu.is_empty() || self.machine.cpu.contains(char::is_whitespace) {
            bad("machine.cpu", &self.machine.cpu, "name a QEMU CPU model such as host, max or Skylake-Server");
        }
        if self.machine.qemu.is_empty() {
            bad("machine.qemu", &"", "name the QEMU binary, e.g. qemu-system-x86_64");
        }

        let boot = self.boot.as_ref().map(|boot| Boot {
            kernel: boot.kernel.clone(),
            initrd: boot.initrd.clone(),
            append: boot.append.clone(),
        });
        if self.boot.is_none() && self.disks.is_empty() {
            bad("disks", &"[]", "give a [boot] kernel or at least one [[disks]] entry");
        }
        let disks = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, disk)| {
                if !DISK_FORMATS.contains(&disk.format.as_str()) {
                    bad(&format!("disks[{i}].format"), &disk.format, "use qcow2, raw, vmdk, vdi or vpc");
                }
                if !DISK_INTERFACES.contains(&disk.interface.as_str()) {
                    bad(&format!("disks[{i}].interface"), &disk.interface, "use ide, virtio or scsi");
                }
                Disk { path: disk.path.clone(), format: disk.format.clone(), interface: disk.interface.clone() }
            })
            .collect();

        let network = &self.network;
        if !NIC_MODELS.contains(&network.nic_model.as_str()) {
            bad("network.nic_model", &network.nic_model, "use virtio-net-pci, e1000, e1000e, rtl8139 or vmxnet3");
        }
        if network.data_nics > 64 {
            bad("network.data_nics", &network.data_nics, "give at most 64");
        }
        // The management NIC and the reserved ones take the PCI slots before the data NICs'
        // fixed slots (see vm::argv::data_nic_slot).
        if network.reserved_nics > 5 {
            bad("network.reserved_nics", &network.reserved_nics, "give at most 5");
        }
        let plumbing = Plumbing::parse(&network.plumbing).unwrap_or_else(|| {
            bad("network.plumbing", &network.plumbing, "use tc, bridge or macvtap");
            Plumbing::Tc
        });
        let user_net = network.user_net.as_ref().and_then(|net| match parse_ipv4_net(net) {
            Some((addr, prefix)) if prefix <= 28 => Some((addr, prefix)),
            _ => {
                bad("network.user_net", net, "give an IPv4 network of at least 16 addresses, e.g. 10.0.0.0/24");
                None
            }
        });

        let mut forwards: Vec<Forward> = Vec::new();
        for (i, forward) in self.forwards.iter().enumerate() {
            let protocol = match forward.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    bad(&format!("forwards[{i}].protocol"), &other, "use tcp or udp");
                    continue;
                }
            };
            if forward.container_port == 0 {
                bad(&format!("forwards[{i}].container_port"), &0, "give a port from 1 to 65535");
            }
            if forward.guest_port == 0 {
                bad(&format!("forwards[{i}].guest_port"), &0, "give a port from 1 to 65535");
            }
            if forwards.iter().any(|f| f.protocol == protocol && f.container_port == forward.container_port) {
                bad(
                    &format!("forwards[{i}].container_port"),
                    &forward.container_port,
                    "each container port may be forwarded once per protocol",
                );
            }
            forwards.push(Forward { protocol, container_port: forward.container_port, guest_port: forward.guest_port });
        }

        let share = if self.share.enabled {
            if !self.share.path.is_absolute() {
                bad("share.path", &self.share.path.display(), "give an absolute path such as /antidote");
            }
            if self.share.tag.is_empty() || self.share.tag.len() > 31 || self.share.tag.contains([',', ' ']) {
                bad("share.tag", &self.share.tag, "give a 9p mount tag of 1 to 31 characters without commas or spaces");
            }
            Some(Share { path: self.share.path.clone(), tag: self.share.tag.clone(), read_only: self.share.read_only })
        } else {
            None
        };

        let readiness = &self.readiness;
        let probe = match readiness.probe.as_str() {
            "tcp" => {
                let port = readiness.port.unwrap_or(0);
                if !forwards.iter().any(|f| f.protocol == Protocol::Tcp && f.container_port == port) {
                    bad("readiness.port", &port, "name the container_port of one of the profile's tcp [[forwards]]");
                }
                if readiness.pattern.is_some() {
                    bad(
                        "readiness.pattern",
                        &"set",
                        "pattern is for probe = \"serial\"; remove it or change the probe",
                    );
                }
                if readiness.console.as_deref() == Some("") {
                    bad("readiness.console", &"", "give the console text the guest prints when ready, or remove it");
                }
                Probe::Tcp {
                    port,
                    send: readiness.send.clone().unwrap_or_default().into_bytes(),
                    expect: readiness.expect.clone().unwrap_or_default().into_bytes(),
                    console: readiness.console.clone(),
                }
            }
            "serial" => {
                let pattern = readiness.pattern.clone().unwrap_or_default();
                if pattern.is_empty() {
                    bad("readiness.pattern", &"", "give the console text that means ready, e.g. \"login:\"");
                }
                for (field, set) in [
                    ("readiness.port", readiness.port.is_some()),
                    ("readiness.send", readiness.send.is_some()),
                    ("readiness.expect", readiness.expect.is_some()),
                    ("readiness.console", readiness.console.is_some()),
                ] {
                    if set {
                        bad(field, &"set", "only probe = \"tcp\" uses it; remove it");
                    }
                }
                Probe::Serial { pattern }
            }
            other => {
                bad("readiness.probe", &other, "use tcp or serial");
                Probe::Serial { pattern: String::new() }
            }
        };
        let probe_interval = parse_duration(&readiness.interval)
            .filter(|d| *d >= Duration::from_millis(10) && *d <= Duration::from_secs(60))
            .unwrap_or_else(|| {
                bad("readiness.interval", &readiness.interval, "give a duration from 10ms to 60s, e.g. 250ms");
                Duration::ZERO
            });
        let link_timeout = parse_duration(&network.link_timeout).filter(|d| !d.is_zero()).unwrap_or_else(|| {
            bad("network.link_timeout", &network.link_timeout, "give a duration such as 120s or 10m");
            Duration::ZERO
        });
        let stop_timeout =
            parse_duration(&self.stop.timeout).filter(|d| *d <= Duration::from_secs(3600)).unwrap_or_else(|| {
                bad(
                    "stop.timeout",
                    &self.stop.timeout,
                    "give a duration up to 1h, e.g. 8s (Docker's default stop grace is 10s)",
                );
                Duration::ZERO
            });

        let first_boot = self
            .first_boot
            .iter()
            .enumerate()
            .map(|(i, step)| {
                if step.name.is_empty() {
                    bad(&format!("first_boot[{i}].name"), &"", "name the step, e.g. \"create user antidote\"");
                }
                if step.expect.is_empty() && step.send.is_none() {
                    bad(&format!("first_boot[{i}]"), &step.name, "give expect, send or both");
                }
                let timeout = parse_duration(&step.timeout).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                    bad(&format!("first_boot[{i}].timeout"), &step.timeout, "give a duration such as 60s or 10m");
                    Duration::ZERO
                });
                FirstBootStep { name: step.name.clone(), expect: step.expect.clone(), send: step.send.clone(), timeout }
            })
            .collect();

        let snapshot = self.snapshot.as_ref().map(|snapshot| {
            if snapshot.path.as_os_str().is_empty() {
                bad(
                    "snapshot.path",
                    &"",
                    "give the snapshot directory (relative to the profile's folder, or absolute)",
                );
            }
            let settle =
                parse_duration(&snapshot.settle).filter(|d| *d <= Duration::from_secs(600)).unwrap_or_else(|| {
                    bad("snapshot.settle", &snapshot.settle, "give a duration up to 10m, e.g. 5s");
                    Duration::ZERO
                });
            Snapshot { dir: snapshot.path.clone(), settle }
        });

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Profile {
            name: self.name.clone(),
            machine_type: self.machine.machine_type.clone(),
            cpu: self.machine.cpu.clone(),
            memory_mib,
            vcpus: self.machine.vcpus,
            accel,
            qemu: self.machine.qemu.clone(),
            extra_args: self.machine.extra_args.clone(),
            boot,
            disks,
            nic_model: network.nic_model.clone(),
            data_nics: network.data_nics,
            reserved_nics: network.reserved_nics,
            egress: network.egress,
            user_net,
            plumbing,
            link_timeout,
            forwards,
            share,
            probe,
            probe_interval,
            stop_timeout,
            credentials: self.credentials.clone(),
            first_boot,
            snapshot,
        })
    }
}

impl Profile {
    /// The files the profile names that are not there (kernel, initrd, disks). Kept apart
    /// from `validate` so that profiles can be checked on a machine without the images.
    pub fn missing_files(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |field: String, path: &Path, what: &str| {
            if !path.is_file() {
                problems.push(Problem {
                    field,
                    value: path.display().to_string(),
                    fix: format!("the {what} is missing: put it there (cargo xtask image builds it) or fix the path"),
                });
            }
        };
        if let Some(boot) = &self.boot {
            check("boot.kernel".into(), &boot.kernel, "kernel");
            if let Some(initrd) = &boot.initrd {
                check("boot.initrd".into(), initrd, "initrd");
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            check(format!("disks[{i}].path"), &disk.path, "disk image");
        }
        problems
    }
}

/// Parses `a.b.c.d/len`.
fn parse_ipv4_net(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((addr.parse().ok()?, prefix))
}
