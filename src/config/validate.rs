//! Reading and validating a profile file: every problem at once, each naming the field, the
//! bad value and the fix. Pure but for reading the file and checking that the files a profile
//! names exist.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use super::profile::*;
use super::{parse_duration, parse_memory_mib, Problem};

const NIC_MODELS: &[&str] = &["virtio-net-pci", "e1000", "e1000e", "rtl8139", "vmxnet3"];
const DISK_INTERFACES: &[&str] = &["ide", "virtio", "scsi"];
const DISK_FORMATS: &[&str] = &["qcow2", "raw", "vmdk", "vdi", "vpc"];
/// The longest wait a profile may ask for (for the data links, a first-boot step): a day.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

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
        let qemu_user = QemuUser::parse(&self.machine.user).unwrap_or_else(|| {
            bad(
                "machine.user",
                &self.machine.user,
                "use auto (vial-qemu where the image has it, else root), root, or a user name such as vial-qemu",
            );
            QemuUser::Auto
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
        let nic_layout = NicLayout::parse(&network.nic_layout).unwrap_or_else(|| {
            bad("network.nic_layout", &network.nic_layout, "use slots or multifunction");
            NicLayout::Slots
        });
        if nic_layout == NicLayout::Multifunction {
            if network.data_nics > NicLayout::MAX_FUNCTIONS {
                bad(
                    "network.data_nics",
                    &network.data_nics,
                    "give at most 7 with nic_layout = \"multifunction\" (one PCI slot has 8 functions, the first is management), or use nic_layout = \"slots\"",
                );
            }
            if network.reserved_nics > 0 {
                bad(
                    "network.reserved_nics",
                    &network.reserved_nics,
                    "give 0 with nic_layout = \"multifunction\" (data NIC N is function N), or use nic_layout = \"slots\"",
                );
            }
            if pci_root_bus(&self.machine.machine_type).is_none() {
                bad(
                    "network.nic_layout",
                    &network.nic_layout,
                    "use slots on this machine type (multifunction needs a pc or q35 machine)",
                );
            }
        }
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
        let link_timeout =
            parse_duration(&network.link_timeout).filter(|d| !d.is_zero() && *d <= MAX_WAIT).unwrap_or_else(|| {
                bad("network.link_timeout", &network.link_timeout, "give a duration up to 24h, e.g. 120s or 10m");
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
                let timeout =
                    parse_duration(&step.timeout).filter(|d| !d.is_zero() && *d <= MAX_WAIT).unwrap_or_else(|| {
                        bad(
                            &format!("first_boot[{i}].timeout"),
                            &step.timeout,
                            "give a duration up to 24h, e.g. 60s or 10m",
                        );
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
            qemu_user,
            extra_args: self.machine.extra_args.clone(),
            boot,
            disks,
            nic_model: network.nic_model.clone(),
            data_nics: network.data_nics,
            reserved_nics: network.reserved_nics,
            egress: network.egress,
            user_net,
            plumbing,
            nic_layout,
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
