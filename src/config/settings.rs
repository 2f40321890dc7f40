//! Every setting that can come from the environment or a flag, in one table: its key, its
//! `VIAL_*` variable, its `vial run` flag, the profile field it overrides (if any), its help,
//! and how its value is written into the profile. The command line (clap), the environment
//! reader, the problem renaming and the README check are all derived from [`SETTINGS`], so a
//! new setting is one row here (plus the README line its test asks for).

use super::profile::{ProfileFile, SnapshotFile};
use super::{parse_bool, Problem};
use std::path::PathBuf;

/// A setting that can come from the environment or a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// Path of the profile.
    Profile,
    /// `auto|kvm|tcg`.
    Accel,
    /// Guest memory.
    Memory,
    /// vCPUs.
    Vcpus,
    /// Stop timeout.
    StopTimeout,
    /// Guest egress through the container.
    Egress,
    /// The lesson directory.
    LessonDir,
    /// Where the sockets go.
    RunDir,
    /// Where disk overlays go.
    StateDir,
    /// The management interface.
    MgmtIface,
    /// Expected data links.
    DataIfaces,
    /// Data plane mode.
    Plumbing,
    NicLayout,
    /// How long to wait for the data links.
    LinkTimeout,
    /// QEMU binary.
    Qemu,
    /// Who QEMU runs as.
    QemuUser,
    /// Extra QEMU arguments (whitespace-separated).
    QemuArgs,
    /// The endpoint's name (MAC addresses derive from it; the guest is told it).
    Name,
    /// `off`, `auto` or a snapshot directory.
    Snapshot,
}

/// How a setting's value is written into the profile file before validation; the error is
/// the fix to show.
pub type Apply = fn(&mut ProfileFile, String) -> Result<(), String>;

/// One row of the table.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The key code asks by.
    pub key: Key,
    /// The environment variable.
    pub env: &'static str,
    /// The `vial run` flag, without its dashes.
    pub flag: &'static str,
    /// The value's placeholder in `--help`.
    pub value_name: &'static str,
    /// One line for `--help` and the README.
    pub help: &'static str,
    /// The profile field it overrides, and how; `None` for settings that are not in the
    /// profile (they are read with [`super::Overrides::get`]).
    pub profile: Option<(&'static str, Apply)>,
}

/// Every setting, in `--help` order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: Key::Profile,
        env: "VIAL_PROFILE",
        flag: "profile",
        value_name: "FILE",
        help: "the profile file (/etc/vial/profile.toml)",
        profile: None,
    },
    Setting {
        key: Key::Accel,
        env: "VIAL_ACCEL",
        flag: "accel",
        value_name: "auto|kvm|tcg",
        help: "accelerator: auto (KVM when usable, else TCG), kvm or tcg",
        profile: Some(("machine.accel", |file, value| {
            file.machine.accel = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::Memory,
        env: "VIAL_MEMORY",
        flag: "memory",
        value_name: "SIZE",
        help: "guest memory, e.g. 2G",
        profile: Some(("machine.memory", |file, value| {
            file.machine.memory = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::Vcpus,
        env: "VIAL_VCPUS",
        flag: "vcpus",
        value_name: "N",
        help: "virtual CPUs",
        profile: Some(("machine.vcpus", |file, value| {
            file.machine.vcpus = value.parse().map_err(|_| "give a number from 1 to 64")?;
            Ok(())
        })),
    },
    Setting {
        key: Key::StopTimeout,
        env: "VIAL_STOP_TIMEOUT",
        flag: "stop-timeout",
        value_name: "DURATION",
        help: "time the guest gets to power off, e.g. 8s",
        profile: Some(("stop.timeout", |file, value| {
            file.stop.timeout = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::Egress,
        env: "VIAL_EGRESS",
        flag: "egress",
        value_name: "on|off",
        help: "on lets the guest connect out through the container",
        profile: Some(("network.egress", |file, value| {
            file.network.egress = parse_bool(&value).ok_or("use on or off")?;
            Ok(())
        })),
    },
    Setting {
        key: Key::LessonDir,
        env: "VIAL_LESSON_DIR",
        flag: "lesson-dir",
        value_name: "DIR",
        help: "the lesson directory exported over 9p (/antidote)",
        profile: Some(("share.path", |file, value| {
            file.share.path = PathBuf::from(value);
            Ok(())
        })),
    },
    Setting {
        key: Key::RunDir,
        env: "VIAL_RUN_DIR",
        flag: "run-dir",
        value_name: "DIR",
        help: "sockets and the console log (/run/vial)",
        profile: None,
    },
    Setting {
        key: Key::StateDir,
        env: "VIAL_STATE_DIR",
        flag: "state-dir",
        value_name: "DIR",
        help: "disk overlays (/var/lib/vial)",
        profile: None,
    },
    Setting {
        key: Key::MgmtIface,
        env: "VIAL_MGMT_IFACE",
        flag: "mgmt-iface",
        value_name: "IFACE",
        help: "the management interface (eth0)",
        profile: None,
    },
    Setting {
        key: Key::DataIfaces,
        env: "VIAL_DATA_IFACES",
        flag: "data-ifaces",
        value_name: "N",
        help: "data links to expect (or containerlab's CLAB_INTFS)",
        profile: Some(("network.data_nics", |file, value| {
            file.network.data_nics = value.parse().map_err(|_| "give the number of data links, e.g. 2")?;
            Ok(())
        })),
    },
    Setting {
        key: Key::Plumbing,
        env: "VIAL_PLUMBING",
        flag: "plumbing",
        value_name: "tc|bridge|macvtap",
        help: "data plane mode",
        profile: Some(("network.plumbing", |file, value| {
            file.network.plumbing = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::NicLayout,
        env: "VIAL_NIC_LAYOUT",
        flag: "nic-layout",
        value_name: "slots|multifunction",
        help: "where the VM's NICs sit on the PCI bus",
        profile: Some(("network.nic_layout", |file, value| {
            file.network.nic_layout = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::LinkTimeout,
        env: "VIAL_LINK_TIMEOUT",
        flag: "link-timeout",
        value_name: "DURATION",
        help: "how long to wait for the data links, e.g. 120s",
        profile: Some(("network.link_timeout", |file, value| {
            file.network.link_timeout = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::Qemu,
        env: "VIAL_QEMU",
        flag: "qemu",
        value_name: "BINARY",
        help: "the QEMU binary",
        profile: Some(("machine.qemu", |file, value| {
            file.machine.qemu = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::QemuUser,
        env: "VIAL_QEMU_USER",
        flag: "qemu-user",
        value_name: "auto|root|USER",
        help: "who QEMU runs as: auto (vial-qemu where the image allows, else root), root or a user",
        profile: Some(("machine.user", |file, value| {
            file.machine.user = value;
            Ok(())
        })),
    },
    Setting {
        key: Key::QemuArgs,
        env: "VIAL_QEMU_ARGS",
        flag: "qemu-args",
        value_name: "ARGS",
        help: "extra QEMU arguments, space-separated",
        profile: None,
    },
    Setting {
        key: Key::Name,
        env: "VIAL_NAME",
        flag: "name",
        value_name: "NAME",
        help: "endpoint name, told to the guest; VM NIC MACs derive from it (default the host name)",
        profile: None,
    },
    Setting {
        key: Key::Snapshot,
        env: "VIAL_SNAPSHOT",
        flag: "snapshot",
        value_name: "auto|off|DIR",
        help: "start from the image's RAM snapshot: auto, off, or a snapshot directory",
        profile: Some(("snapshot.path", |file, value| {
            match value.as_str() {
                "off" => file.snapshot = None,
                "auto" => {}
                path if path.starts_with('/') => {
                    let settle = file.snapshot.take().map(|s| s.settle).unwrap_or_else(|| "0s".into());
                    file.snapshot = Some(SnapshotFile { path: PathBuf::from(path), settle });
                }
                _ => {
                    return Err("use off (always boot cold), auto (the profile's snapshot, the default) or the \
                                absolute path of a snapshot directory"
                        .into())
                }
            }
            Ok(())
        })),
    },
];

/// `VIAL_*` variables that are read elsewhere and are not settings.
pub const OTHER_VARS: &[&str] = &["VIAL_LOG"];

/// The row of `key`.
pub fn setting(key: Key) -> &'static Setting {
    SETTINGS.iter().find(|s| s.key == key).expect("every key has a row")
}

/// Writes every override that has a profile field into `file`; a value that does not parse
/// is a problem named by where it came from. Returns which profile field each override
/// replaced, so that problems validation finds later are named by the override too.
pub fn apply(
    file: &mut ProfileFile,
    overrides: &super::Overrides,
    problems: &mut Vec<Problem>,
) -> Vec<(&'static str, String)> {
    let mut renamed = Vec::new();
    for setting in SETTINGS {
        let (Some((field, apply)), Some((value, source))) = (setting.profile, overrides.get(setting.key)) else {
            continue;
        };
        renamed.push((field, format!("{source} (overrides {field})")));
        if let Err(fix) = apply(file, value.to_string()) {
            problems.push(Problem { field: source.into(), value: value.into(), fix });
        }
    }
    renamed
}

/// The flags of `vial run` (and `argv`, `snapshot`), built from the table: each takes a value
/// and says its variable in `--help`.
#[derive(Debug, Clone, Default)]
pub struct Flags(pub Vec<(Key, String)>);

impl clap::FromArgMatches for Flags {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = Flags::default();
        flags.update_from_arg_matches(matches)?;
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        for setting in SETTINGS {
            if let Some(value) = matches.get_one::<String>(setting.flag) {
                self.0.retain(|(key, _)| *key != setting.key);
                self.0.push((setting.key, value.clone()));
            }
        }
        Ok(())
    }
}

impl clap::Args for Flags {
    fn augment_args(mut command: clap::Command) -> clap::Command {
        for setting in SETTINGS {
            let arg = clap::Arg::new(setting.flag)
                .long(setting.flag)
                .value_name(setting.value_name)
                .allow_hyphen_values(setting.key == Key::QemuArgs)
                .help(format!("{} [env: {}]", setting.help, setting.env));
            command = command.arg(arg);
        }
        command
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_has_one_row_with_a_vial_variable_and_a_flag() {
        for (i, setting) in SETTINGS.iter().enumerate() {
            assert!(setting.env.starts_with("VIAL_"), "{}", setting.env);
            assert_eq!(setting.env, format!("VIAL_{}", setting.flag.replace('-', "_").to_uppercase()));
            assert!(SETTINGS[..i].iter().all(|other| other.key != setting.key), "{:?} twice", setting.key);
        }
        assert_eq!(setting(Key::Accel).flag, "accel");
    }

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        for setting in SETTINGS {
            assert!(readme.contains(&format!("`{}`", setting.env)), "README lacks {}", setting.env);
            assert!(readme.contains(&format!("`--{}`", setting.flag)), "README lacks --{}", setting.flag);
        }
    }
}
