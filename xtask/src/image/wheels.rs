//! PyPI packages for the plain-container images, fetched on the build host so that
//! `docker build --network none` can install them. An image lists what it takes from PyPI as
//! exact pins (`name==version`, see `ContainerImage::wheels`); [`fetch`] runs
//! `pip wheel --no-deps` once per requirement list into `target/image/cache/wheels/<key>/`,
//! `key` being a hash of the list, and later builds find the wheels there without the
//! network. `--no-deps` because every dependency not pinned here comes from Debian: the
//! Dockerfile installs with `--no-deps` too and runs `pip check`, which fails the build when a
//! Debian package is missing or too old.
//!
//! Only pure-Python wheels (`*-none-any.whl`) are accepted: a compiled one would be built
//! for the host's Python and could fail in the image; such a package must come from Debian.
//! This module never touches Docker.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// Part of the cache key: bump when [`fetch`] changes what it puts in the cache.
const WHEELS_VERSION: u32 = 1;

/// The name of the requirement file, in the cache and in the image's build context.
pub(crate) const REQUIREMENTS: &str = "requirements.txt";

/// `name==version` split in two, or `None` when `pin` is not an exact pin of a plain name.
pub(crate) fn parse_pin(pin: &str) -> Option<(&str, &str)> {
    let (name, version) = pin.split_once("==")?;
    let plain =
        |s: &str, extra: &[char]| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    (plain(name, &['-', '_', '.']) && plain(version, &['.', '!', '+'])).then_some((name, version))
}

/// A distribution name as PEP 503 compares them: lowercase, runs of `-`, `_`, `.` as one `-`.
pub(crate) fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The requirement file for `pins`: one pin a line, as pip reads it.
pub(crate) fn requirements(pins: &[&str]) -> String {
    pins.iter().map(|pin| format!("{pin}\n")).collect()
}

/// For each pin, the wheel among `files` (file names) that is that distribution at that
/// version and pure Python; every problem at once otherwise.
pub(crate) fn match_wheels<'a>(pins: &[&str], files: &[&'a str]) -> Result<Vec<&'a str>, String> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for pin in pins {
        let Some((name, version)) = parse_pin(pin) else {
            problems.push(format!("`{pin}` is not an exact pin (name==version)"));
            continue;
        };
        // {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl (PEP 427)
        let wheel = files.iter().find(|file| {
            let parts: Vec<&str> = file.strip_suffix(".whl").unwrap_or_default().split('-').collect();
            parts.len() >= 5 && normalize(parts[0]) == normalize(name) && parts[1] == version
        });
        match wheel {
            None => problems.push(format!("no wheel for {pin}")),
            Some(file) if !file.ends_with("-none-any.whl") => {
                problems.push(format!("{file} is not pure Python; take {name} from a Debian package instead"))
            }
            Some(file) => found.push(*file),
        }
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        Err(problems.join("; "))
    }
}

/// The Python whose pip fetches: Debian's `/usr/bin/python3` when python3-pip is installed
/// (the interpreter the images run), else `python3` on the PATH. `cargo xtask setup` makes
/// sure one of them has pip.
pub(crate) fn python() -> &'static str {
    if Path::new(crate::setup::DEBIAN_PIP).is_dir() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// The wheels of one requirement list, in the cache.
pub(crate) struct Wheels {
    /// `target/image/cache/wheels/<key>/`.
    pub dir: PathBuf,
    /// The wheels' file names in `dir`, in pin order.
    pub files: Vec<String>,
}

/// Makes sure the wheel cache holds one pure-Python wheel per pin (fetching them again when
/// `refetch`) and returns them. Only the first build of a requirement list uses the network.
pub(crate) fn fetch(pins: &[&str], refetch: bool) -> Result<Wheels> {
    if pins.is_empty() {
        return Ok(Wheels { dir: PathBuf::new(), files: Vec::new() });
    }
    let text = requirements(pins);
    let root = super::cache_dir().join("wheels");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Two builds may want the same list at once; one fetches, the other then finds it.
    let lock = fs::File::create(root.join("fetch.lock"))?;
    lock.lock().context("locking the wheel cache")?;
    let dir = root.join(super::stamp(&[text.as_bytes(), &WHEELS_VERSION.to_le_bytes()]));
    if dir.is_dir() && refetch {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if dir.is_dir() {
        let files = checked(pins, &dir)?;
        println!("image: {} PyPI wheels cached in {}", files.len(), dir.display());
        return Ok(Wheels { dir, files });
    }

    // Fetched into a scratch directory and renamed when complete, so an interrupted fetch
    // never looks like a cache hit.
    let partial = dir.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    fs::create_dir_all(&partial)?;
    fs::write(partial.join(REQUIREMENTS), &text)?;
    let mut cmd = Command::new(python());
    cmd.args(["-m", "pip", "wheel", "--no-deps", "--no-input", "--disable-pip-version-check"])
        .args(["--progress-bar", "off", "--wheel-dir"])
        .arg(&partial)
        .arg("--requirement")
        .arg(partial.join(REQUIREMENTS))
        // pip refuses every command outside a virtual environment when this is set; `wheel`
        // installs nothing.
        .env_remove("PIP_REQUIRE_VIRTUALENV");
    println!("image: fetching {} PyPI packages: {}", pins.len(), crate::display_cmd(&cmd));
    let started = std::time::Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("running {} -m pip (cargo xtask setup installs python3-pip)", python()))?;
    if !status.success() {
        bail!(
            "pip could not fetch the wheels ({status}); the first build of a requirement list needs \
             PyPI, later ones use {}",
            root.display()
        );
    }
    let files = checked(pins, &partial)?;
    fs::rename(&partial, &dir).with_context(|| format!("renaming {} to {}", partial.display(), dir.display()))?;
    println!(
        "image: fetched {} wheels in {:.0} s into {}",
        files.len(),
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(Wheels { dir, files })
}

/// The wheels of `dir` matched to `pins` (see [`match_wheels`]).
fn checked(pins: &[&str], dir: &Path) -> Result<Vec<String>> {
    let names: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| name.ends_with(".whl"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let wheels = match_wheels(pins, &refs).map_err(|problems| anyhow::anyhow!("{}: {problems}", dir.display()))?;
    ensure!(wheels.len() == pins.len(), "{}: expected {} wheels", dir.display(), pins.len());
    Ok(wheels.into_iter().map(String::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_exact() {
        assert_eq!(parse_pin("junos-eznc==2.6.8"), Some(("junos-eznc", "2.6.8")));
        assert_eq!(parse_pin("napalm"), None);
        assert_eq!(parse_pin("napalm>=4"), None);
        assert_eq!(parse_pin("napalm==4.*"), None);
        assert_eq!(parse_pin("napalm[extra]==4.1.0"), None);
        assert_eq!(parse_pin("==1"), None);
    }

    #[test]
    fn names_compare_as_pep_503_says() {
        assert_eq!(normalize("Junos_EZNC"), "junos-eznc");
        assert_eq!(normalize("ttp.templates"), normalize("ttp-templates"));
        assert_eq!(normalize("a__b"), "a-b");
    }

    #[test]
    fn wheels_match_their_pins() {
        let files = [
            "junos_eznc-2.6.8-py2.py3-none-any.whl",
            "ttp_templates-0.3.7-py3-none-any.whl",
            "lxml-4.9.2-cp311-cp311-manylinux_2_28_x86_64.whl",
            "requirements.txt",
        ];
        assert_eq!(
            match_wheels(&["ttp-templates==0.3.7", "junos-eznc==2.6.8"], &files),
            Ok(vec!["ttp_templates-0.3.7-py3-none-any.whl", "junos_eznc-2.6.8-py2.py3-none-any.whl"])
        );
        let problems = match_wheels(&["junos-eznc==2.7.1", "lxml==4.9.2", "napalm"], &files).unwrap_err();
        assert!(problems.contains("no wheel for junos-eznc==2.7.1"), "{problems}");
        assert!(problems.contains("lxml-4.9.2-cp311") && problems.contains("Debian package"), "{problems}");
        assert!(problems.contains("`napalm` is not an exact pin"), "{problems}");
    }

    #[test]
    fn the_requirement_file_has_one_pin_a_line() {
        assert_eq!(requirements(&["a==1", "b==2"]), "a==1\nb==2\n");
    }
}
