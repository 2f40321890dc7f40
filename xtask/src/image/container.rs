//! Plain-container images: lesson endpoints and tools that are ordinary Linux containers, not
//! VMs run by vial (no profile, no QEMU, no `vial.profile` label). [`IMAGES`] is their table:
//!
//! - `utility` (`vial/utility`): Antidote's `utility` endpoint, a Debian box with sshd as its
//!   main process, user `antidote`, Python with the curriculum's network libraries (napalm,
//!   netmiko, PyEZ, JSNAPy, Robot Framework, ...), Ansible and the usual network tools;
//! - `configurator` (`vial/configurator`): what a lesson launcher runs once per endpoint and
//!   stage to apply `stage<N>/configs/<endpoint>.py`, a playbook or a napalm configuration.
//!
//! Each is made in three steps; only the first run of the first two uses the network. The
//! Debian packages come from debootstrap (downloads cached in `target/image/cache/debs`, as
//! for the `frr` appliance) and are imported with `docker import` as
//! `vial/<name>-rootfs:bookworm`, whose label `vial.rootfs.stamp` is the cache key (suite,
//! mirror, packages, this recipe). What Debian bookworm lacks, or packages too old, comes from
//! PyPI as pure-Python wheels that [`wheels`] fetches on the build host and caches by
//! requirement list. Then `docker build --network none` configures the root filesystem with
//! `dockerfiles/<name>/Dockerfile`, staged in `target/image/<name>/context/` with the files
//! beside it, the requirement file and the wheels: it installs the wheels into `/usr/local`,
//! adds users, sshd, the message of the day, labels. Docker's layer cache makes a second build
//! with nothing changed a no-op. The smoke check then imports every promised Python module and
//! runs every promised tool in the result.
//!
//! This module never touches a VM profile and never starts a container except the smoke check.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::{base, debootstrap, wheels, Options};
use crate::docker;

/// One plain-container image.
pub(crate) struct ContainerImage {
    /// `cargo xtask image <name>`; the image is `vial/<name>:latest`, its Dockerfile
    /// `dockerfiles/<name>/Dockerfile`.
    pub name: &'static str,
    /// One line for people (the help and the errors).
    pub description: &'static str,
    /// Debian packages over debootstrap's minbase (Depends are resolved, Recommends not).
    pub packages: &'static [&'static str],
    /// What the image takes from PyPI: exact pins (`name==version`) of what Debian bookworm
    /// lacks or packages too old, pure Python only. Installed with `--no-deps`, so each of
    /// their dependencies is either pinned here too or a Debian package in `packages`; the
    /// build's `pip check` fails otherwise. In groups, so images share one ([`NAPALM_WHEELS`]).
    pub wheels: &'static [&'static [&'static str]],
    /// Python modules the image promises; the smoke check imports each.
    pub python_modules: &'static [&'static str],
    /// Shell commands the smoke check runs in the image, each of which must exit 0: one per
    /// promised tool (its `--version` or equivalent) and the image's own set-up.
    pub checks: &'static [&'static str],
}

/// The napalm drivers whose configurations a lesson may hold (`<endpoint>-<driver>.txt`); the
/// smoke checks load each one's module.
const NAPALM_DRIVERS_CHECK: &str = "python3 -c 'from napalm import get_network_driver as driver; \
     [driver(name) for name in (\"junos\", \"eos\", \"iosxr\", \"nxos\", \"nxos_ssh\", \"ios\")]'";

/// napalm and what it needs beyond bookworm: one set for `utility` and `configurator`, so a
/// napalm configuration behaves the same in both.
const NAPALM_WHEELS: &[&str] = &[
    // The multi-vendor library, and the two it drives that bookworm has too old
    // (netmiko 2.4.2, junos-eznc 2.1.7; napalm needs >= 4.1.0 and >= 2.6.3).
    // junos-eznc 2.6.8 pins ncclient 0.6.13, bookworm's.
    "napalm==4.1.0",
    "netmiko==4.2.0",
    "junos-eznc==2.6.8",
    // napalm's and netmiko's parsers. ttp-templates 0.3.7 is the last before pydantic 2,
    // which bookworm lacks; netmiko 4.2 needs textfsm >= 1.1.3 (bookworm: 1.1.0).
    "ttp==0.9.5",
    "ttp-templates==0.3.7",
    "netutils==1.6.0",
    "ntc-templates==4.0.1",
    "textfsm==1.1.3",
];

/// The plain-container images `cargo xtask image` builds.
pub(crate) const IMAGES: &[ContainerImage] = &[
    ContainerImage {
        name: "utility",
        description: "Linux endpoint: sshd (antidote/antidotepassword), python3 with napalm, netmiko, PyEZ, \
                      JSNAPy, Robot Framework, ansible, network tools",
        packages: &[
            "openssh-server",
            "sudo",
            "python3",
            // `python` is python3, for learners and scripts alike (Antidote had a shell alias).
            "python-is-python3",
            // Installs the wheels at build time; learners may use it too.
            "python3-pip",
            "python3-jinja2",
            "python3-yaml",
            "python3-paramiko",
            "python3-scp",
            // debootstrap does not resolve virtual packages: bcrypt and cryptography depend on
            // python3-cffi-backend-api-{min,max}, which this one provides.
            "python3-cffi-backend",
            // What the wheels below need from Debian (their `pip check`). python3-ply provides
            // the virtual python3-ply-{lex,yacc}-3.10 that cffi's pycparser depends on.
            "python3-cffi",
            "python3-ply",
            "python3-lxml",
            "python3-ncclient",
            "python3-netaddr",
            "python3-requests",
            "python3-future",
            "python3-setuptools",
            "python3-typing-extensions",
            "python3-pyeapi",
            "python3-serial",
            "python3-six",
            "python3-pyparsing",
            "python3-transitions",
            "python3-yamlordereddictloader",
            "python3-colorama",
            // The rest of Antidote's Python, as Debian has it.
            "python3-paho-mqtt",
            "python3-grpcio",
            "python3-flask",
            "python3-pygments",
            "ansible",
            "git",
            "iproute2",
            "iputils-ping",
            "traceroute",
            "tcpdump",
            "netcat-openbsd",
            // Transitional in bookworm: pulls bind9-dnsutils (dig, nslookup).
            "dnsutils",
            "curl",
            "jq",
            // kislyuk's yq (jq syntax over YAML), not the mikefarah yq v3 Antidote downloaded.
            "yq",
            // The command is `batcat` in Debian; the Dockerfile adds `bat`.
            "bat",
            // xmllint
            "libxml2-utils",
            "sshpass",
            "vim",
            "nano",
            "less",
            "procps",
            "netbase",
        ],
        wheels: &[
            NAPALM_WHEELS,
            &[
                // JSNAPy and what it pins: icdiff (bookworm has the command, not the module) and
                // the configparser backport, which it requires by name.
                "jsnapy==1.3.8",
                "icdiff==1.9.1",
                "configparser==7.1.0",
                "robotframework==7.1.1",
            ],
        ],
        python_modules: &[
            "jinja2",
            "yaml",
            "paramiko",
            "scp",
            "lxml",
            "ncclient",
            "requests",
            "netaddr",
            "textfsm",
            "ttp",
            "netmiko",
            "napalm",
            "jnpr.junos",
            "jnpr.jsnapy",
            "robot",
            "paho.mqtt.client",
            "grpc",
            "flask",
            "pygments",
        ],
        checks: &[
            "/usr/sbin/sshd -t",
            "/usr/sbin/sshd -T | grep -qx 'permitrootlogin no'",
            "/usr/sbin/sshd -T | grep -qx 'passwordauthentication yes'",
            "[ \"$(getent passwd antidote | cut -d: -f7)\" = /bin/bash ]",
            "sudo -l -U antidote | grep -q NOPASSWD",
            "[ -x /etc/update-motd.d/10-vial ]",
            "python -c 'import sys; sys.exit(sys.version_info.major != 3)'",
            "python3 -m pip --version",
            "napalm --help",
            NAPALM_DRIVERS_CHECK,
            // As the learner: JSNAPy reads /etc/jsnapy and writes its log and snapshots.
            "sudo -u antidote -H jsnapy --version",
            "sudo -u antidote test -w /home/antidote/jsnapy/snapshots",
            // Robot Framework exits 251 after printing its version.
            "robot --version || [ $? -eq 251 ]",
            "ansible --version",
            "ansible-playbook --version",
            "git --version",
            "vim --version",
            "nano --version",
            "less --version",
            "curl --version",
            "jq --version",
            "yq --version",
            "bat --version",
            "batcat --version",
            "xmllint --version",
            "sshpass -V",
            "ssh -V",
            "dig -v",
            "ping -V",
            "ip -V",
            "tcpdump --version",
            "traceroute --version",
            "command -v nc",
            "ps --version",
        ],
    },
    ContainerImage {
        name: "configurator",
        description:
            "runs a lesson's stage<N>/configs/<endpoint>.py, playbook or napalm configuration against an endpoint",
        packages: &[
            "python3",
            // Installs the wheels at build time.
            "python3-pip",
            "python3-paramiko",
            "python3-scp",
            // Provides the virtual python3-cffi-backend-api-* (see `utility`).
            "python3-cffi-backend",
            "python3-jinja2",
            "python3-yaml",
            // NETCONF (ansible's junos and netconf modules, PyEZ).
            "python3-ncclient",
            // What the wheels need from Debian (see `utility`).
            "python3-cffi",
            "python3-ply",
            "python3-lxml",
            "python3-netaddr",
            "python3-requests",
            "python3-future",
            "python3-setuptools",
            "python3-typing-extensions",
            "python3-pyeapi",
            "python3-serial",
            "python3-six",
            "python3-pyparsing",
            "python3-transitions",
            "python3-yamlordereddictloader",
            "ansible",
            "sshpass",
            "openssh-client",
            "iputils-ping",
            "netbase",
        ],
        // napalm for `<endpoint>-<driver>.txt` configurations, as in `utility`.
        wheels: &[NAPALM_WHEELS],
        python_modules: &["paramiko", "scp", "ncclient", "jinja2", "yaml", "lxml", "netmiko", "napalm", "jnpr.junos"],
        checks: &[
            "ansible-playbook --version",
            "napalm --help",
            NAPALM_DRIVERS_CHECK,
            "sshpass -V",
            "ssh -V",
            "command -v scp",
            "ping -V",
        ],
    },
];

/// Part of the root filesystem's cache key: bump when [`rootfs`] changes how it is made.
const ROOTFS_VERSION: u32 = 1;

/// The label holding the root filesystem image's cache key.
const STAMP_LABEL: &str = "vial.rootfs.stamp";

impl ContainerImage {
    /// Every pin of [`ContainerImage::wheels`], in order.
    pub fn pins(&self) -> Vec<&'static str> {
        self.wheels.iter().flat_map(|group| group.iter().copied()).collect()
    }
}

/// The plain-container image called `name`, if there is one.
pub(crate) fn find(name: &str) -> Option<&'static ContainerImage> {
    IMAGES.iter().find(|image| image.name == name)
}

/// Builds `image` as `options` ask (see the module docs) and returns its tag.
pub(crate) fn build(image: &ContainerImage, options: &Options) -> Result<String> {
    ensure!(options.source.is_none(), "--source is only for vendor images (cumulus, vqfx)");
    ensure!(
        options.base.is_none(),
        "--base is only for VM endpoint images; `{}` is made from its own root filesystem",
        image.name
    );
    let source = source_dir(image);
    ensure!(source.join("Dockerfile").is_file(), "{} has no Dockerfile", source.display());
    let tag = options.tag.clone().unwrap_or_else(|| format!("vial/{}:latest", image.name));
    println!("image: {tag}, a plain container: {}", image.description);

    crate::setup::run()?;
    docker::ensure_dockerd()?;
    let work = super::work_dir(image.name);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // Two builds of one image must not both debootstrap it or stage its context.
    let lock = fs::File::create(work.join("build.lock"))?;
    lock.lock().context("locking the image's build directory")?;
    let rootfs = rootfs(image, &work, options.rebuild)?;
    let wheels = wheels::fetch(&image.pins(), options.rebuild)?;
    let context = work.join("context");
    stage_context(image, &context, &wheels)?;

    let mut args = vec!["build".to_string(), "--network".into(), "none".into(), "--tag".into(), tag.clone()];
    for arg in [
        format!("ROOTFS={rootfs}"),
        format!("VERSION={}", super::version()),
        format!("REVISION={}", super::revision()),
        format!("SOURCE={}", super::repository()),
    ] {
        args.extend(["--build-arg".into(), arg]);
    }
    if options.no_cache {
        args.push("--no-cache".into());
    }
    args.push(context.display().to_string());
    let started = Instant::now();
    crate::run_cmd("docker", &args).with_context(|| format!("building the {} image", image.name))?;
    println!("image: docker build took {:.1} s", started.elapsed().as_secs_f64());

    smoke_check(image, &tag)?;
    let size = docker::inspect_image(&tag, "{{.Size}}").unwrap_or_default();
    println!("image: {tag} passes its smoke check ({} MB)", size.parse::<u64>().unwrap_or(0) / 1_000_000);
    if options.push {
        crate::run_cmd("docker", &["push", &tag]).with_context(|| format!("pushing {tag}"))?;
    }
    Ok(tag)
}

/// `dockerfiles/<name>/`: the Dockerfile and the files it copies.
fn source_dir(image: &ContainerImage) -> PathBuf {
    crate::project_root().join("dockerfiles").join(image.name)
}

/// Files the build adds to the context beside `dockerfiles/<name>/`'s: the requirement file
/// (the image's wheel pins) and the directory of wheels.
const STAGED: &[&str] = &[wheels::REQUIREMENTS, "wheels"];

/// Fills `context` afresh: the files of `dockerfiles/<name>/`, the requirement file and the
/// wheels (hard links into the cache, so staging copies nothing). Docker's layer cache keys on
/// the files' contents, so an unchanged context rebuilds nothing.
fn stage_context(image: &ContainerImage, context: &Path, wheels: &wheels::Wheels) -> Result<()> {
    if context.exists() {
        fs::remove_dir_all(context).with_context(|| format!("emptying {}", context.display()))?;
    }
    fs::create_dir_all(context.join("wheels")).with_context(|| format!("creating {}", context.display()))?;
    let source = source_dir(image);
    for entry in fs::read_dir(&source).with_context(|| format!("reading {}", source.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        ensure!(
            entry.file_type()?.is_file(),
            "{}: only files belong here (the build context is staged from them)",
            entry.path().display()
        );
        ensure!(
            !STAGED.iter().any(|staged| name == *staged),
            "{}: the build makes this itself (from the image's table in xtask/src/image/container.rs)",
            entry.path().display()
        );
        fs::copy(entry.path(), context.join(&name)).with_context(|| format!("copying {}", entry.path().display()))?;
    }
    fs::write(context.join(wheels::REQUIREMENTS), wheels::requirements(&image.pins()))?;
    for file in &wheels.files {
        super::link_or_copy(&wheels.dir.join(file), &context.join("wheels").join(file))?;
    }
    Ok(())
}

/// The smoke check's shell script: every promised module imported (all failures named at
/// once), `pip check` when the image has wheels, then each check. A check's output (all of
/// it: a check may be a pipeline) is shown only when it fails, with the check's text.
fn smoke_script(image: &ContainerImage) -> String {
    let mut checks: Vec<String> = Vec::new();
    if !image.python_modules.is_empty() {
        checks.push(format!("python3 -c '{IMPORT_ALL}' {}", image.python_modules.join(" ")));
    }
    if !image.pins().is_empty() {
        checks.push("python3 -m pip check".into());
    }
    checks.extend(image.checks.iter().map(|check| check.to_string()));
    let mut script =
        String::from("# The smoke check of a vial plain-container image (xtask/src/image/container.rs).\n");
    for check in &checks {
        let quoted = check.replace('\'', "'\\''");
        script.push_str(&format!(
            "if ! out=$({{ {check}; }} 2>&1); then printf '%s\\n' \"$out\" >&2; echo 'smoke check failed: {quoted}' >&2; exit 1; fi\n"
        ));
    }
    script.push_str(&format!(
        "echo 'smoke check: {} Python modules import, {} checks pass'\n",
        image.python_modules.len(),
        checks.len()
    ));
    script
}

/// Imports the modules named in its arguments and fails naming every one that does not import.
const IMPORT_ALL: &str = "
import importlib, sys
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f\"{name}: {error!r}\")
sys.exit(\"\\n\".join(failed) or None)
";

/// Runs [`smoke_script`] in the image, offline, as root; its output says which check failed.
fn smoke_check(image: &ContainerImage, tag: &str) -> Result<()> {
    let mut child = std::process::Command::new("docker")
        .args(["run", "--rm", "--interactive", "--network", "none", "--entrypoint", "/bin/sh", tag, "-s"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running docker")?;
    let script = smoke_script(image);
    std::io::Write::write_all(&mut child.stdin.take().expect("piped"), script.as_bytes())
        .context("writing the smoke check to docker")?;
    let status = child.wait().context("waiting for docker")?;
    if !status.success() {
        bail!("the image {tag} fails its smoke check ({status}; the failed check is printed above)");
    }
    Ok(())
}

/// The tag of the image's imported root filesystem.
fn rootfs_tag(image: &ContainerImage) -> String {
    format!("vial/{}-rootfs:{}", image.name, debootstrap::SUITE)
}

/// Makes sure `vial/<name>-rootfs:bookworm` holds the image's packages (debootstrap, pruned,
/// imported), rebuilding it when its stamp differs; returns its tag.
fn rootfs(image: &ContainerImage, work: &Path, rebuild: bool) -> Result<String> {
    let tag = rootfs_tag(image);
    let stamp = super::stamp(&[
        debootstrap::SUITE.as_bytes(),
        debootstrap::mirror().as_bytes(),
        image.packages.join(",").as_bytes(),
        &ROOTFS_VERSION.to_le_bytes(),
    ]);
    let label = format!("{{{{index .Config.Labels \"{STAMP_LABEL}\"}}}}");
    let up_to_date = || docker::inspect_image(&tag, &label).as_deref() == Some(stamp.as_str());
    if !rebuild && up_to_date() {
        println!("image: root filesystem {tag} is up to date");
        return Ok(tag);
    }

    println!("image: making {tag} (debootstrap {} + {})", debootstrap::SUITE, image.packages.join(" "));
    let dir = work.join("rootfs");
    debootstrap::run(image.packages, &dir)?;
    base::prune(&dir)?;
    let changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        "ENV LANG=C.UTF-8".to_string(),
        format!("LABEL {STAMP_LABEL}={stamp}"),
    ];
    base::import_rootfs(&dir, &tag, &changes)?;
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    let size = docker::inspect_image(&tag, "{{.Size}}").unwrap_or_default();
    println!("image: {tag} imported ({} MB)", size.parse::<u64>().unwrap_or(0) / 1_000_000);
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dockerfile(image: &ContainerImage) -> (PathBuf, String) {
        let path = source_dir(image).join("Dockerfile");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (path, text)
    }

    /// Repository check: every plain-container image has its Dockerfile, whose final stage is
    /// the root filesystem it is given and which says what it is. None carries `vial.profile`:
    /// a lesson launcher takes that label to mean "a VM endpoint".
    #[test]
    fn every_container_image_has_its_dockerfile() {
        for image in IMAGES {
            let (path, text) = dockerfile(image);
            let rootfs = format!("ARG ROOTFS={}", rootfs_tag(image));
            for line in [rootfs.as_str(), "ARG VERSION=dev", "ARG REVISION=unknown"] {
                assert!(text.lines().any(|l| l.trim() == line), "{}: no `{line}`", path.display());
            }
            let last_from = text.lines().rfind(|l| l.starts_with("FROM ")).unwrap_or_default();
            assert_eq!(last_from.trim(), "FROM ${ROOTFS}", "{}: the image must be its root filesystem", path.display());
            assert!(!text.contains("vial.profile"), "{}: a plain container must not claim a profile", path.display());
            assert!(text.contains("vial.kind="), "{}: no vial.kind label", path.display());
            assert!(
                !crate::project_root().join("vm-profiles").join(format!("{}.toml", image.name)).exists(),
                "{} is both a profile and a plain-container image",
                image.name
            );
            for staged in STAGED {
                assert!(!source_dir(image).join(staged).exists(), "{}: the build stages {staged} itself", image.name);
            }
        }
    }

    #[test]
    fn the_utility_image_is_an_ssh_endpoint() {
        let (_, text) = dockerfile(find("utility").unwrap());
        for needle in [
            "EXPOSE 22/tcp",
            r#"CMD ["/usr/sbin/sshd", "-D", "-e"]"#,
            r#"vial.kind="container""#,
            r#"vial.credentials="antidote/antidotepassword""#,
        ] {
            assert!(text.contains(needle), "utility: no `{needle}`");
        }
    }

    /// The PyPI part of an image: exact pins, no Debian package of the same name (two copies of
    /// one library, one shadowing the other), pip in the root filesystem, and a Dockerfile that
    /// installs exactly the staged requirement file, offline and without dependencies.
    #[test]
    fn wheels_are_pinned_and_installed_offline() {
        for image in IMAGES {
            let (path, text) = dockerfile(image);
            for pin in image.pins() {
                let (name, _) =
                    wheels::parse_pin(pin).unwrap_or_else(|| panic!("{}: `{pin}` is not name==version", image.name));
                let debian = format!("python3-{}", wheels::normalize(name));
                assert!(
                    !image.packages.contains(&debian.as_str()),
                    "{}: {name} is both a wheel and {debian}",
                    image.name
                );
            }
            let installs = text.contains("pip install --no-index") && text.contains("--no-deps");
            assert_eq!(
                installs,
                !image.pins().is_empty(),
                "{}: wheels and `pip install --no-index --no-deps` go together",
                path.display()
            );
            if installs {
                assert!(image.packages.contains(&"python3-pip"), "{}: installing wheels needs python3-pip", image.name);
                for needle in ["COPY requirements.txt", "COPY wheels/", "pip check"] {
                    assert!(text.contains(needle), "{}: no `{needle}`", path.display());
                }
            }
        }
    }

    /// One napalm everywhere: a napalm configuration behaves the same whether a learner runs it
    /// in `utility` or the launcher in `configurator`.
    #[test]
    fn the_configurator_takes_the_utility_images_pins() {
        let utility = find("utility").unwrap();
        for pin in find("configurator").unwrap().pins() {
            assert!(utility.pins().contains(&pin), "configurator pins {pin}, utility does not");
        }
    }

    /// Runs a smoke script with the host's sh and python3; returns its exit status and stderr.
    fn run_smoke(image: &ContainerImage) -> (bool, String) {
        let mut child = std::process::Command::new("sh")
            .arg("-s")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), smoke_script(image).as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
    }

    fn test_image(python_modules: &'static [&'static str], checks: &'static [&'static str]) -> ContainerImage {
        ContainerImage { name: "test", description: "", packages: &[], wheels: &[], python_modules, checks }
    }

    #[test]
    fn the_smoke_script_names_what_is_missing() {
        let (ok, stderr) =
            run_smoke(&test_image(&["json", "os.path"], &["true", "echo 'it''s quoted' | grep -q quoted"]));
        assert!(ok, "{stderr}");

        let (ok, stderr) = run_smoke(&test_image(&["json", "vial_no_such_module", "vial_nor_this"], &["true"]));
        assert!(!ok);
        assert!(stderr.contains("vial_no_such_module") && stderr.contains("vial_nor_this"), "{stderr}");

        let (ok, stderr) = run_smoke(&test_image(&["json"], &["echo noise >&2 | true", "false || true"]));
        assert!(ok, "{stderr}");
        assert!(!stderr.contains("noise"), "a passing check is silent, pipelines included: {stderr}");

        let (ok, stderr) =
            run_smoke(&test_image(&[], &["true", "echo 'before it failed'; test 'a' = b", "touch /never"]));
        assert!(!ok);
        assert!(stderr.contains("before it failed"), "the failed check's output is shown: {stderr}");
        assert!(stderr.contains("smoke check failed: echo 'before it failed'; test 'a' = b"), "{stderr}");
        assert!(!stderr.contains("/never"), "checks after a failure do not run: {stderr}");
    }

    /// Every image's smoke script is valid shell and runs every promise of the table.
    #[test]
    fn every_smoke_script_covers_its_image() {
        for image in IMAGES {
            let script = smoke_script(image);
            let status = std::process::Command::new("sh").args(["-n", "-c", &script]).status().unwrap();
            assert!(status.success(), "{}: the smoke script is not valid shell:\n{script}", image.name);
            for module in image.python_modules {
                assert!(script.contains(&format!(" {module}")), "{}: {module} is not imported", image.name);
            }
            for check in image.checks {
                assert!(script.contains(check), "{}: `{check}` is not run", image.name);
            }
            assert_eq!(script.contains("pip check"), !image.pins().is_empty(), "{}", image.name);
        }
    }
}
