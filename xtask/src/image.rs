//! `cargo xtask image <profile> [--tag T] [--push] [--base IMAGE] [--source FILE] [--rebuild] [--no-cache]
//! [--print-dockerfile]`: builds the endpoint image of one profile, first boot and RAM
//! snapshot included (dockerfiles/README.md). `cargo xtask image utility|configurator` builds
//! a plain-container image instead: no profile, no VM; see [`container`] and its table.
//!
//! Every image is built from one template, `dockerfiles/Dockerfile.in`, rendered from the
//! profile ([`dockerfile`]) into a staging directory, `target/image/<profile>/context/`, that
//! this command fills: the rendered `Dockerfile`, the static `vial`, the profile
//! (`vm-profiles/<profile>.toml`, which becomes `/etc/vial/profile.toml`), and the appliance's
//! files. Where those files come from depends on the profile:
//!
//! - `linux`: the test guest of `cargo xtask guest` (kernel and initramfs; no first boot);
//! - `frr`: a Debian bookworm root filesystem made with debootstrap, turned into a disk without
//!   loop devices or mounts (`mkfs.ext4 -d`), booted once to run the profile's `[[first_boot]]`
//!   steps on its serial console (see [`first_boot`]), and shipped as qcow2 with its own kernel;
//! - `cumulus`, `vqfx`: the vendor's disk image, given by path, booted once the same way.
//!
//! The images are `FROM` a base that holds QEMU ([`base`]): `vial/base:bookworm`, built offline
//! from Debian packages when missing, or any image named with `--base`/`VIAL_BASE_IMAGE`.
//!
//! Every slow step is cached under `target/image/` and keyed on its inputs (a stamp file or
//! an image label), so a second build with nothing changed only reruns `docker build`, which
//! reuses its cached layers. `--rebuild` ignores the caches of this command (not Docker's).
//!
//! This module never starts a container except for the final smoke check, and never pushes
//! unless asked with `--push`.

pub(crate) mod base;
mod container;
pub(crate) mod debootstrap;
pub(crate) mod dockerfile;
pub(crate) mod first_boot;
mod frr;
mod vendor;
mod wheels;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use vial::config::{Config, Overrides, Profile, ProfileFile};

use crate::docker;

const HELP: &str = "\
Usage: cargo xtask image <profile> [options]

Builds the endpoint image vial/<profile> from vm-profiles/<profile>.toml and the Dockerfile
that dockerfiles/Dockerfile.in renders from it. Profiles: linux, frr, cumulus, vqfx.

Plain-container images (no profile, no VM; dockerfiles/<name>/Dockerfile over a debootstrapped
root filesystem): `cargo xtask image utility`, `cargo xtask image configurator`.

Options:
  --tag T          tag the image T (default vial/<profile>:latest)
  --push           docker push the tag when built
  --base IMAGE     build FROM this image instead of vial/base:bookworm (env VIAL_BASE_IMAGE);
                   it needs qemu-system-x86 and qemu-utils
  --source FILE    the vendor disk image (cumulus: env VIAL_CUMULUS_SOURCE,
                   vqfx: env VIAL_VQFX_SOURCE)
  --rebuild        ignore this command's caches (base image, root filesystems, first boot,
                   PyPI wheels)
  --no-cache       ignore Docker's layer cache too (docker build --no-cache)
  --print-dockerfile
                   print the profile's rendered Dockerfile and exit without building

Environment: VIAL_ACCEL (accelerator of the first boot: tcg, the default, or kvm),
VIAL_DEBIAN_MIRROR (default http://deb.debian.org/debian).
";

/// What the command line asked for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Options {
    /// Profile name (`vm-profiles/<name>.toml`), or the name of a plain-container image
    /// ([`container::IMAGES`]).
    pub profile: String,
    /// Image tag.
    pub tag: Option<String>,
    /// Push the tag afterwards.
    pub push: bool,
    /// Base image instead of the offline one.
    pub base: Option<String>,
    /// Vendor disk image.
    pub source: Option<PathBuf>,
    /// Ignore this command's caches.
    pub rebuild: bool,
    /// Ignore Docker's layer cache (`docker build --no-cache`), so that a build is cold
    /// end to end; `cargo xtask bench images` times such builds.
    pub no_cache: bool,
    /// Print the rendered Dockerfile instead of building.
    pub print_dockerfile: bool,
}

impl Options {
    fn parse(args: &[&str]) -> Result<Options> {
        let mut options = Options::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| -> Result<String> {
                args.next().map(|v| v.to_string()).with_context(|| format!("{flag} needs a value\n\n{HELP}"))
            };
            match *arg {
                "--tag" => options.tag = Some(value("--tag")?),
                "--base" => options.base = Some(value("--base")?),
                "--source" => options.source = Some(PathBuf::from(value("--source")?)),
                "--push" => options.push = true,
                "--rebuild" => options.rebuild = true,
                "--no-cache" => options.no_cache = true,
                "--print-dockerfile" => options.print_dockerfile = true,
                flag if flag.starts_with('-') => bail!("unknown option `{flag}`\n\n{HELP}"),
                name if options.profile.is_empty() => options.profile = name.to_string(),
                extra => bail!("unexpected argument `{extra}`\n\n{HELP}"),
            }
        }
        ensure!(!options.profile.is_empty(), "name the profile to build\n\n{HELP}");
        Ok(options)
    }
}

/// The profile being built, as written and as `vial` will see it inside the image.
pub(crate) struct ImageProfile {
    /// `vm-profiles/<name>.toml`.
    pub path: PathBuf,
    /// The profile file's `description`, one line for people.
    pub description: String,
    /// The profile with its paths resolved as in the image (against `/etc/vial`).
    pub profile: Profile,
    /// The file's text, as parsed: what the image's caches are keyed on (read once, so that
    /// an edit during a build cannot key a disk on steps it did not run).
    pub text: String,
}

/// Where the image's profile lives inside the image; relative paths resolve against its folder.
pub(crate) const IMAGE_PROFILE_PATH: &str = "/etc/vial/profile.toml";

/// Reads and validates `vm-profiles/<name>.toml` with vial's own parser, resolving its paths
/// as `vial` will inside the image.
pub(crate) fn load_profile(name: &str) -> Result<ImageProfile> {
    let path = crate::project_root().join("vm-profiles").join(format!("{name}.toml"));
    ensure!(
        path.is_file(),
        "there is no profile `{name}` ({} is missing); profiles: {}; plain-container images: {}",
        path.display(),
        profile_names().join(", "),
        container::IMAGES.iter().map(|i| i.name).collect::<Vec<_>>().join(", ")
    );
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file =
        ProfileFile::parse(&text, &path.display().to_string()).map_err(|problem| anyhow::anyhow!("{problem}"))?;
    let description = file.description.clone();
    let config = Config::from_file(file, PathBuf::from(IMAGE_PROFILE_PATH), &Overrides::default(), name)
        .map_err(|err| anyhow::anyhow!("{} is not a valid profile:\n{err}", path.display()))?;
    Ok(ImageProfile { path, description, profile: config.profile, text })
}

fn profile_names() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(crate::project_root().join("vm-profiles"))
        .map(|dir| {
            dir.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".toml").map(String::from)).collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `target/image/<profile>/`: the build's work directory (context, caches, logs).
pub(crate) fn work_dir(profile: &str) -> PathBuf {
    crate::project_root().join("target/image").join(profile)
}

/// `target/image/cache/`: what several images share (debootstrap's downloads).
pub(crate) fn cache_dir() -> PathBuf {
    crate::project_root().join("target/image/cache")
}

/// The accelerator of build-time boots: `VIAL_ACCEL` when set to kvm or tcg, else TCG. Not
/// `auto`: on the machines this project is tested on, /dev/kvm opens but hangs guests.
pub(crate) fn build_accel() -> Result<String> {
    match std::env::var("VIAL_ACCEL").ok().as_deref() {
        None | Some("") | Some("tcg") => Ok("tcg".into()),
        Some("kvm") => Ok("kvm".into()),
        Some(other) => bail!("VIAL_ACCEL={other}: the image build boots with tcg (the default) or kvm"),
    }
}

/// The command: see the module docs.
pub(crate) fn run(args: &[&str]) -> Result<()> {
    if args.iter().any(|a| matches!(*a, "-h" | "--help" | "help")) {
        print!("{HELP}");
        return Ok(());
    }
    let options = Options::parse(args)?;
    if let Some(image) = container::find(&options.profile) {
        if options.print_dockerfile {
            let path = crate::project_root().join("dockerfiles").join(image.name).join("Dockerfile");
            print!("{}", fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?);
            return Ok(());
        }
        let started = Instant::now();
        let built = container::build(image, &options)?;
        println!("image: {built} built in {:.0} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    if options.print_dockerfile {
        print!("{}", dockerfile::dockerfile(&load_profile(&options.profile)?)?);
        return Ok(());
    }
    let started = Instant::now();
    let built = build(&options)?;
    println!("image: {built} built in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds the image `options` ask for and returns its tag.
pub(crate) fn build(options: &Options) -> Result<String> {
    if let Some(image) = container::find(&options.profile) {
        return container::build(image, options);
    }
    let image = load_profile(&options.profile)?;
    let dockerfile_text = dockerfile::dockerfile(&image)?;
    let files = dockerfile::image_files(&image)?;
    // A vendor profile without its disk image stops here, before anything slow.
    let vendor_source = match options.profile.as_str() {
        "cumulus" | "vqfx" => Some(vendor::source(&options.profile, options.source.as_deref())?),
        _ => {
            ensure!(options.source.is_none(), "--source is only for vendor images (cumulus, vqfx)");
            None
        }
    };
    let tag = options.tag.clone().unwrap_or_else(|| format!("vial/{}:latest", options.profile));

    crate::setup::run()?;
    let vial = crate::dist::run()?;
    docker::ensure_dockerd()?;
    let base = match options.base.clone().or_else(|| std::env::var("VIAL_BASE_IMAGE").ok().filter(|b| !b.is_empty())) {
        Some(base) => {
            ensure!(
                docker::inspect_image(&base, "{{.Id}}").is_some() || docker::docker(&["pull", &base]).is_ok(),
                "the base image {base} is neither present nor pullable"
            );
            base
        }
        None => base::ensure(options.rebuild)?,
    };

    let work = work_dir(&options.profile);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // One build of a profile at a time (tests and a developer may start the same build).
    let lock = fs::File::create(work.join("build.lock"))?;
    lock.lock().context("locking the profile's build directory")?;
    let context = work.join("context");
    if context.exists() {
        fs::remove_dir_all(&context).with_context(|| format!("emptying {}", context.display()))?;
    }
    fs::create_dir_all(&context)?;

    // The image's files go where the Dockerfile's COPY takes them from.
    let staged = context.join(&files.staged);
    match options.profile.as_str() {
        "linux" => {
            let guest = crate::guest::run()?;
            fs::create_dir_all(&staged)?;
            for file in ["vmlinux", "initrd.img"] {
                link_or_copy(&guest.join(file), &staged.join(file))?;
            }
        }
        "frr" => frr::stage(&image, &staged, options.rebuild)?,
        "cumulus" | "vqfx" => {
            vendor::stage(&image, vendor_source.as_deref().expect("checked above"), &staged, options.rebuild)?
        }
        other => bail!("no recipe for profile `{other}`: add one in xtask/src/image.rs"),
    }
    fs::copy(&image.path, context.join("profile.toml"))?;
    link_or_copy(&vial, &context.join("vial"))?;
    // Exactly what `docker build` sees, and what `--print-dockerfile` prints.
    fs::write(context.join("Dockerfile"), &dockerfile_text)?;

    let build_args = [
        format!("BASE={base}"),
        format!("VERSION={}", version()),
        format!("REVISION={}", revision()),
        format!("SOURCE={}", repository()),
    ];
    // No network: the Dockerfile only copies files and runs vial, and a build must not depend
    // on one.
    let mut args = vec!["build".to_string(), "--network".into(), "none".into(), "--tag".into(), tag.clone()];
    for arg in build_args {
        args.extend(["--build-arg".into(), arg]);
    }
    if options.no_cache {
        args.push("--no-cache".into());
    }
    args.push(context.display().to_string());
    let started = Instant::now();
    crate::run_cmd("docker", &args).with_context(|| format!("building the {} image", options.profile))?;
    println!("image: docker build took {:.1} s", started.elapsed().as_secs_f64());

    smoke_check(&tag)?;
    if options.push {
        crate::run_cmd("docker", &["push", &tag]).with_context(|| format!("pushing {tag}"))?;
    }
    Ok(tag)
}

/// Runs `vial argv` in the new image: it loads the baked profile exactly as the endpoint
/// will, and fails when a file it names (kernel, initrd, disk) is not in the image.
fn smoke_check(tag: &str) -> Result<()> {
    let output = docker::docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--env",
        "VIAL_ACCEL=tcg",
        "--entrypoint",
        "/vial",
        tag,
        "argv",
    ])
    .with_context(|| format!("the image {tag} does not hold what its profile names"))?;
    let argv = String::from_utf8_lossy(&output.stdout);
    println!("image: {tag} passes `vial argv`: {}", argv.trim());
    Ok(())
}

/// Every `EXPOSE` of the Dockerfile must be a forward of the profile and the other way round,
/// so `docker run -P` and the documentation never disagree with what `vial` forwards. The
/// renderer writes `EXPOSE` from the forwards; its tests check the result with this.
#[cfg(test)]
pub(crate) fn check_exposed_ports(dockerfile: &str, profile: &Profile) -> Result<()> {
    let mut exposed: Vec<String> = dockerfile
        .lines()
        .filter_map(|line| line.trim().strip_prefix("EXPOSE "))
        .flat_map(|ports| ports.split_whitespace().map(String::from))
        .map(|port| if port.contains('/') { port } else { format!("{port}/tcp") })
        .collect();
    let mut forwarded: Vec<String> =
        profile.forwards.iter().map(|f| format!("{}/{}", f.container_port, f.protocol.as_str())).collect();
    exposed.sort();
    forwarded.sort();
    ensure!(
        exposed == forwarded,
        "the Dockerfile exposes [{}] but the profile forwards [{}]",
        exposed.join(" "),
        forwarded.join(" ")
    );
    Ok(())
}

/// The `org.opencontainers.image.version` label: the workspace version.
fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// The commit being built (`org.opencontainers.image.revision`), with `-dirty` for local changes.
fn revision() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(crate::project_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

/// `org.opencontainers.image.source`: the workspace's `repository`.
fn repository() -> String {
    let manifest = fs::read_to_string(crate::project_root().join("Cargo.toml")).unwrap_or_default();
    manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("repository = \"").and_then(|r| r.strip_suffix('"')).map(String::from))
        .unwrap_or_default()
}

/// Part of the first-booted disk's cache key: bump when [`first_booted_disk`] changes.
const FIRST_BOOT_VERSION: u32 = 1;

/// The disk an appliance ships after its first boot, `work/<profile>.qcow2`: `make_disk`
/// writes the disk the first boot starts from (`disk.path`, a scratch file), the profile's
/// `[[first_boot]]` steps run on it, and it is converted to a compressed qcow2. Skipped when
/// nothing it is made from changed: the input (`input_stamp`), the profile file, this recipe.
pub(crate) fn first_booted_disk(
    image: &ImageProfile,
    work: &Path,
    input_stamp: &str,
    make_disk: impl FnOnce() -> Result<()>,
    boot: Option<vial::config::profile::Boot>,
    disk: vial::config::profile::Disk,
    rebuild: bool,
) -> Result<PathBuf> {
    let profile = &image.profile;
    ensure!(
        !profile.first_boot.is_empty(),
        "{} has no [[first_boot]] steps; an appliance image needs them (user, DHCP, APIs, power-off)",
        image.path.display()
    );
    let shipped = work.join(format!("{}.qcow2", profile.name));
    let stamp_path = work.join(format!("{}.qcow2.stamp", profile.name));
    let stamp = stamp(&[input_stamp.as_bytes(), image.text.as_bytes(), &FIRST_BOOT_VERSION.to_le_bytes()]);
    if !rebuild && shipped.is_file() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        println!("image: first-booted disk {} is up to date", shipped.display());
        return Ok(shipped);
    }
    let _ = fs::remove_file(&stamp_path);
    make_disk()?;
    let first_boot = first_boot::FirstBoot {
        profile,
        boot,
        disks: vec![disk.clone()],
        work: work.to_path_buf(),
        accel: build_accel()?,
        steps: profile.first_boot.clone(),
    };
    first_boot.run()?;

    // zstd-compressed clusters: a third of the size, and cheap to read at boot.
    let partial = work.join(format!("{}.qcow2.partial", profile.name));
    let started = Instant::now();
    crate::run_cmd(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-c".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            "-o".as_ref(),
            "compression_type=zstd".as_ref(),
            "-f".as_ref(),
            disk.format.as_ref(),
            disk.path.as_os_str(),
            partial.as_os_str(),
        ] as &[&std::ffi::OsStr],
    )?;
    fs::rename(&partial, &shipped)?;
    fs::remove_file(&disk.path)?;
    fs::write(&stamp_path, &stamp)?;
    let size = fs::metadata(&shipped)?.len();
    println!(
        "image: {} ({} MB) compressed in {:.0} s",
        shipped.display(),
        size / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    Ok(shipped)
}

/// Hard-links `from` to `to` (free, and Docker hashes the content either way), copying when
/// they are on different filesystems.
pub(crate) fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = fs::remove_file(to);
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// A stable 64-bit FNV-1a hash as hex, for cache stamps (std's hasher may change between
/// releases). Fields are length-prefixed so that ("ab", "c") and ("a", "bc") differ.
pub(crate) fn stamp(fields: &[&[u8]]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for field in fields {
        for byte in (field.len() as u64).to_le_bytes().iter().chain(field.iter()) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let options = Options::parse(&["frr", "--tag", "r/frr:1", "--push", "--rebuild", "--no-cache"]).unwrap();
        assert_eq!(
            options,
            Options {
                profile: "frr".into(),
                tag: Some("r/frr:1".into()),
                push: true,
                base: None,
                source: None,
                rebuild: true,
                no_cache: true,
                print_dockerfile: false,
            }
        );
        assert!(Options::parse(&["frr", "--print-dockerfile"]).unwrap().print_dockerfile);
        assert!(Options::parse(&[]).is_err());
        assert!(Options::parse(&["frr", "--tag"]).is_err());
        assert!(Options::parse(&["frr", "--fast"]).is_err());
        assert!(Options::parse(&["frr", "vqfx"]).is_err());
    }

    /// Repository check: every profile loads and renders a Dockerfile (the renderer's own
    /// tests check the lines of each).
    #[test]
    fn every_profile_renders_a_dockerfile() {
        let names = profile_names();
        assert!(names.len() >= 4, "{names:?}");
        for name in names {
            let image = load_profile(&name).unwrap();
            let text = dockerfile::dockerfile(&image).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            check_exposed_ports(&text, &image.profile).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn exposed_ports_must_match_forwards() {
        let image = load_profile("cumulus").unwrap();
        check_exposed_ports("EXPOSE 22/tcp 161/udp\nEXPOSE 830 8080/tcp\n", &image.profile).unwrap();
        let err = check_exposed_ports("EXPOSE 22/tcp 830/tcp 8080/tcp\n", &image.profile).unwrap_err();
        assert!(err.to_string().contains("161/udp"), "{err}");
    }

    #[test]
    fn stamps_are_stable_and_length_prefixed() {
        assert_eq!(stamp(&[b"ab", b"c"]), stamp(&[b"ab", b"c"]));
        assert_ne!(stamp(&[b"ab", b"c"]), stamp(&[b"a", b"bc"]));
    }
}
