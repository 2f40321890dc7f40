//! The endpoint's configuration, lowest to highest precedence: the profile baked into the
//! image, `VIAL_*` environment variables, command-line flags. This module owns reading and
//! validating all three; it never touches the kernel or starts a process.
//!
//! One mechanism applies every override: each setting is written into the profile's raw
//! fields *before* validation, and a problem found in an overridden field is reported under
//! the name the user typed (`VIAL_MEMORY`, `--accel`), not the profile field.

pub mod profile;
pub mod settings;
mod validate;

use std::path::PathBuf;
use std::time::Duration;

pub use profile::{
    AccelChoice, Forward, NicLayout, Plumbing, Probe, Profile, ProfileFile, Protocol, QemuUser, Snapshot,
};
use settings::OTHER_VARS;
pub use settings::{Flags, Key, SETTINGS};

/// One thing wrong with the configuration: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The profile field, environment variable or flag.
    pub field: String,
    /// The bad value as given.
    pub value: String,
    /// What to do about it.
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: bad value {:?}: {}", self.field, self.value, self.fix)
    }
}

/// Every problem found, each printed on its own line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<Problem>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "config: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// The default profile location inside an endpoint image.
pub const DEFAULT_PROFILE: &str = "/etc/vial/profile.toml";

/// Settings from the environment and flags, each remembering where it came from.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    entries: Vec<(Key, String, String)>,
}

impl Overrides {
    /// Reads the `VIAL_*` variables (and containerlab's `CLAB_INTFS`) from `vars`. An unknown
    /// `VIAL_*` variable is a problem: a typo must not be silently ignored.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Overrides, Vec<Problem>> {
        let mut overrides = Overrides::default();
        let mut problems = Vec::new();
        let mut clab_intfs = None;
        for (name, value) in vars {
            if name == "CLAB_INTFS" {
                clab_intfs = Some(value);
                continue;
            }
            if !name.starts_with("VIAL_") || OTHER_VARS.contains(&name.as_str()) {
                continue;
            }
            match SETTINGS.iter().find(|setting| setting.env == name) {
                Some(setting) => overrides.entries.push((setting.key, value, name)),
                None => problems.push(Problem {
                    field: name,
                    value,
                    fix: format!(
                        "not a vial setting; known: {}",
                        SETTINGS
                            .iter()
                            .map(|setting| setting.env)
                            .chain(OTHER_VARS.iter().copied())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }),
            }
        }
        // containerlab tells the node how many data interfaces it will get; VIAL_DATA_IFACES wins.
        if let Some(value) = clab_intfs {
            if overrides.get(Key::DataIfaces).is_none() {
                overrides.entries.push((Key::DataIfaces, value, "CLAB_INTFS".into()));
            }
        }
        if problems.is_empty() {
            Ok(overrides)
        } else {
            Err(problems)
        }
    }

    /// Sets `key` from its command-line flag (flags win over the environment).
    pub fn set_flag(&mut self, key: Key, value: String) {
        let flag = format!("--{}", settings::setting(key).flag);
        self.entries.retain(|(k, _, _)| *k != key);
        self.entries.push((key, value, flag));
    }

    /// Sets every flag of `flags`.
    pub fn set_flags(&mut self, flags: Flags) {
        for (key, value) in flags.0 {
            self.set_flag(key, value);
        }
    }

    /// The value for `key` and where it came from.
    pub fn get(&self, key: Key) -> Option<(&str, &str)> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _, _)| *k == key)
            .map(|(_, value, source)| (value.as_str(), source.as_str()))
    }
}

/// The whole validated configuration of one `vial run`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The profile with overrides applied.
    pub profile: Profile,
    /// Where it was read from.
    pub profile_path: PathBuf,
    /// Sockets and console log (`/run/vial`).
    pub run_dir: PathBuf,
    /// Disk overlays (`/var/lib/vial`).
    pub state_dir: PathBuf,
    /// The management interface (`eth0`).
    pub mgmt_iface: String,
    /// The endpoint's name.
    pub name: String,
    /// Extra QEMU arguments from `VIAL_QEMU_ARGS`.
    pub qemu_args: Vec<String>,
}

impl Config {
    /// Loads the profile named by the overrides (or the default), applies the overrides and
    /// validates everything, returning every problem at once.
    pub fn load(overrides: &Overrides, hostname: &str) -> Result<Config, ConfigError> {
        let profile_path = PathBuf::from(overrides.get(Key::Profile).map(|(v, _)| v).unwrap_or(DEFAULT_PROFILE));
        let file = ProfileFile::load(&profile_path).map_err(|problem| ConfigError(vec![problem]))?;
        let config = Self::from_file(file, profile_path, overrides, hostname)?;
        let missing = config.profile.missing_files();
        if missing.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(missing))
        }
    }

    /// As [`Config::load`], from an already parsed profile, without checking that the files
    /// it names exist (so profiles can be checked away from the image).
    pub fn from_file(
        mut file: ProfileFile,
        profile_path: PathBuf,
        overrides: &Overrides,
        hostname: &str,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        // Relative asset paths belong to the profile's bundle: resolve them against its folder.
        let base = profile_path.parent().map(PathBuf::from).unwrap_or_default();
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        if let Some(boot) = &mut file.boot {
            resolve(&mut boot.kernel);
            if let Some(initrd) = &mut boot.initrd {
                resolve(initrd);
            }
        }
        for disk in &mut file.disks {
            resolve(&mut disk.path);
        }
        if let Some(snapshot) = &mut file.snapshot {
            resolve(&mut snapshot.path);
        }
        // Which profile field each override replaced, so problems name the override.
        let renamed = settings::apply(&mut file, overrides, &mut problems);

        let profile = match file.validate() {
            Ok(profile) => Some(profile),
            Err(found) => {
                problems.extend(found);
                None
            }
        };
        for problem in &mut problems {
            if let Some((_, name)) = renamed.iter().find(|(field, _)| *field == problem.field) {
                problem.field = name.clone();
            }
        }

        let path_setting = |key: Key, default: &str, problems: &mut Vec<Problem>| {
            let (value, source) = overrides.get(key).unwrap_or((default, "default"));
            let path = PathBuf::from(value);
            if !path.is_absolute() {
                problems.push(Problem {
                    field: source.into(),
                    value: value.into(),
                    fix: "give an absolute path".into(),
                });
            }
            path
        };
        let run_dir = path_setting(Key::RunDir, crate::rundir::DEFAULT, &mut problems);
        let state_dir = path_setting(Key::StateDir, "/var/lib/vial", &mut problems);
        let (mgmt_iface, mgmt_source) = overrides.get(Key::MgmtIface).unwrap_or(("eth0", "default"));
        let mgmt_iface = mgmt_iface.to_string();
        if mgmt_iface.is_empty() || mgmt_iface.len() > 15 || mgmt_iface.contains(['/', ' ']) {
            problems.push(Problem {
                field: mgmt_source.into(),
                value: mgmt_iface.clone(),
                fix: "give an interface name of 1 to 15 characters".into(),
            });
        }
        let (name, name_source) = overrides.get(Key::Name).unwrap_or((hostname, "the hostname"));
        let name = name.to_string();
        if !valid_name(&name) {
            problems.push(Problem {
                field: name_source.into(),
                value: name.clone(),
                fix: "give the endpoint a host name: 1 to 63 letters, digits, '-', '_' or '.' (VIAL_NAME or --name)"
                    .into(),
            });
        }
        let qemu_args = overrides
            .get(Key::QemuArgs)
            .map(|(v, _)| v.split_whitespace().map(String::from).collect())
            .unwrap_or_default();

        match profile {
            Some(profile) if problems.is_empty() => {
                Ok(Config { profile, profile_path, run_dir, state_dir, mgmt_iface, name, qemu_args })
            }
            _ => Err(ConfigError(problems)),
        }
    }
}

/// Whether `name` can be the guest's host name (and go on QEMU's command line unquoted).
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses a size such as `512M`, `2G`, `2GiB`, `1024` (MiB) into MiB.
pub fn parse_memory_mib(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The longest duration [`parse_duration`] accepts: a year. Every duration vial reads ends up
/// added to an `Instant` (a deadline), and `Instant + Duration` panics on overflow; a year is
/// far beyond any sensible timeout and far from the clock's limit, so a huge value such as
/// `99999999999h` is a configuration error, never a panic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration such as `250ms`, `8s`, `2m`, `1h`, up to [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let duration = match unit {
        "ms" => Duration::from_millis(number),
        "s" => Duration::from_secs(number),
        "m" => Duration::from_secs(number.checked_mul(60)?),
        "h" => Duration::from_secs(number.checked_mul(3600)?),
        _ => return None,
    };
    (duration <= MAX_DURATION).then_some(duration)
}

pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fuzz;
