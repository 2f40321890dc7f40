//! Plain-container images: lesson endpoints and tools that are ordinary Linux containers, not
//! VMs run by vial (no profile, no QEMU, no `vial.profile` label). [`IMAGES`] is their table:
//!
//! - `utility` (`vial/utility`): Antidote's `utility` endpoint, a Debian box with sshd as its
//!   main process, user `antidote`, Python, Ansible and the usual network tools;
//! - `configurator` (`vial/configurator`): what a lesson launcher runs once per endpoint and
//!   stage to apply `stage<N>/configs/<endpoint>.py` or a playbook to the endpoint.
//!
//! Each is made in two steps, both offline. The packages come from debootstrap (downloads
//! cached in `target/image/cache/debs`, as for the `frr` appliance) and are imported with
//! `docker import` as `vial/<name>-rootfs:bookworm`, whose label `vial.rootfs.stamp` is the
//! cache key (suite, mirror, packages, this recipe). Then `docker build --network none`
//! configures that root filesystem with `dockerfiles/<name>/Dockerfile`, the directory being
//! the build context: users, sshd, the message of the day, labels. Docker's layer cache makes
//! a second build with nothing changed a no-op.
//!
//! This module never touches a VM profile and never starts a container except the smoke check.

use std::fs;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use super::{base, debootstrap, Options};
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
    /// A shell command run in the built image (`docker run --rm --network none`) that fails
    /// when the image cannot do its job.
    pub smoke_check: &'static str,
}

/// The plain-container images `cargo xtask image` builds.
pub(crate) const IMAGES: &[ContainerImage] = &[
    ContainerImage {
        name: "utility",
        description: "Linux endpoint: sshd (antidote/antidotepassword), python3, ansible, network tools",
        packages: &[
            "openssh-server",
            "sudo",
            "python3",
            "python3-jinja2",
            "python3-yaml",
            "python3-paramiko",
            // debootstrap does not resolve virtual packages: bcrypt and cryptography depend on
            // python3-cffi-backend-api-{min,max}, which this one provides.
            "python3-cffi-backend",
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
            "sshpass",
            "vim",
            "nano",
            "less",
            "procps",
            "netbase",
        ],
        smoke_check: "/usr/sbin/sshd -t && id antidote && sudo -l -U antidote | grep -q NOPASSWD \
                      && ansible --version && python3 -c 'import jinja2, yaml, paramiko' && ip -V && git --version",
    },
    ContainerImage {
        name: "configurator",
        description: "runs a lesson's stage<N>/configs/<endpoint>.py or playbook against an endpoint",
        packages: &[
            "python3",
            "python3-paramiko",
            "python3-scp",
            // Provides the virtual python3-cffi-backend-api-* (see `utility`).
            "python3-cffi-backend",
            "python3-jinja2",
            "python3-yaml",
            // NETCONF (ansible's junos and netconf modules) and the curriculum's other SSH library.
            "python3-ncclient",
            "python3-netmiko",
            "ansible",
            "sshpass",
            "openssh-client",
            "iputils-ping",
            "netbase",
        ],
        smoke_check: "python3 -c 'import paramiko, scp, ncclient, netmiko, jinja2, yaml' \
                      && ansible-playbook --version && sshpass -V > /dev/null && ssh -V",
    },
];

/// Part of the root filesystem's cache key: bump when [`rootfs`] changes how it is made.
const ROOTFS_VERSION: u32 = 1;

/// The label holding the root filesystem image's cache key.
const STAMP_LABEL: &str = "vial.rootfs.stamp";

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
    let context = context_dir(image);
    ensure!(context.join("Dockerfile").is_file(), "{} has no Dockerfile", context.display());
    let tag = options.tag.clone().unwrap_or_else(|| format!("vial/{}:latest", image.name));
    println!("image: {tag}, a plain container: {}", image.description);

    crate::setup::run()?;
    docker::ensure_dockerd()?;
    let rootfs = rootfs(image, options.rebuild)?;

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

    docker::docker(&["run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", &tag, "-c", image.smoke_check])
        .with_context(|| format!("the image {tag} fails its smoke check"))?;
    let size = docker::inspect_image(&tag, "{{.Size}}").unwrap_or_default();
    println!("image: {tag} passes its smoke check ({} MB)", size.parse::<u64>().unwrap_or(0) / 1_000_000);
    if options.push {
        crate::run_cmd("docker", &["push", &tag]).with_context(|| format!("pushing {tag}"))?;
    }
    Ok(tag)
}

/// `dockerfiles/<name>/`: the Dockerfile and the files it copies, the whole build context.
fn context_dir(image: &ContainerImage) -> PathBuf {
    crate::project_root().join("dockerfiles").join(image.name)
}

/// The tag of the image's imported root filesystem.
fn rootfs_tag(image: &ContainerImage) -> String {
    format!("vial/{}-rootfs:{}", image.name, debootstrap::SUITE)
}

/// Makes sure `vial/<name>-rootfs:bookworm` holds the image's packages (debootstrap, pruned,
/// imported), rebuilding it when its stamp differs; returns its tag.
fn rootfs(image: &ContainerImage, rebuild: bool) -> Result<String> {
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
    let work = super::work_dir(image.name);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // Two builds of one image must not both debootstrap it.
    let lock = fs::File::create(work.join("build.lock"))?;
    lock.lock().context("locking the image's build directory")?;
    if !rebuild && up_to_date() {
        return Ok(tag);
    }

    println!("image: making {tag} offline (debootstrap {} + {})", debootstrap::SUITE, image.packages.join(" "));
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

    /// Repository check: every plain-container image has its Dockerfile, which builds `FROM`
    /// the root filesystem it is given and says what it is. None carries `vial.profile`: a
    /// lesson launcher takes that label to mean "a VM endpoint".
    #[test]
    fn every_container_image_has_its_dockerfile() {
        for image in IMAGES {
            let path = context_dir(image).join("Dockerfile");
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rootfs = format!("ARG ROOTFS={}", rootfs_tag(image));
            for line in [rootfs.as_str(), "FROM ${ROOTFS}", "ARG VERSION=dev", "ARG REVISION=unknown"] {
                assert!(text.lines().any(|l| l.trim() == line), "{}: no `{line}`", path.display());
            }
            assert!(!text.contains("vial.profile"), "{}: a plain container must not claim a profile", path.display());
            assert!(text.contains("vial.kind="), "{}: no vial.kind label", path.display());
            assert!(
                !crate::project_root().join("vm-profiles").join(format!("{}.toml", image.name)).exists(),
                "{} is both a profile and a plain-container image",
                image.name
            );
        }
    }

    #[test]
    fn the_utility_image_is_an_ssh_endpoint() {
        let text = fs::read_to_string(context_dir(find("utility").unwrap()).join("Dockerfile")).unwrap();
        for needle in [
            "EXPOSE 22/tcp",
            r#"CMD ["/usr/sbin/sshd", "-D", "-e"]"#,
            r#"vial.kind="container""#,
            r#"vial.credentials="antidote/antidotepassword""#,
        ] {
            assert!(text.contains(needle), "utility: no `{needle}`");
        }
    }
}
