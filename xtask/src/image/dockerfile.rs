//! The Dockerfile of an endpoint image, rendered from one template, `dockerfiles/Dockerfile.in`,
//! and the image's profile. Everything that differs between images comes from the validated
//! profile (forwards, snapshot, stop timeout, readiness, credentials, the files it names) or
//! from [`HEALTH`], the one table of what a profile does not say. This module never runs
//! Docker; [`render`] is pure.
//!
//! A generator rather than build arguments: Docker does not expand `ARG`s in `HEALTHCHECK`'s
//! flags, nor can an argument add or drop an instruction (`EXPOSE`, the snapshot `RUN`).
//!
//! The template's syntax, kept to what the Dockerfile needs: `{{key}}` is replaced by a value;
//! a line that is only `{{?key}}` (or `{{?!key}}`) starts a block of lines kept only when the
//! flag `key` is set (or not), up to a line that is only `{{/key}}`. Unknown keys are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vial::config::profile::Probe;

use super::ImageProfile;

/// The template, compiled in so rendering needs no file access.
pub(crate) const TEMPLATE: &str = include_str!("../../../dockerfiles/Dockerfile.in");

/// Docker's health check timing for an image: what its profile does not say.
struct Health {
    /// The profile.
    profile: &'static str,
    /// How often Docker runs `vial health`.
    interval: &'static str,
    /// How long failed checks do not count: the longest boot expected under TCG (linux boots
    /// in seconds, Debian with FRR in a minute or so, the vendor appliances in many).
    start_period: &'static str,
}

const HEALTH: &[Health] = &[
    Health { profile: "linux", interval: "1s", start_period: "120s" },
    Health { profile: "frr", interval: "1s", start_period: "300s" },
    Health { profile: "cumulus", interval: "2s", start_period: "600s" },
    Health { profile: "vqfx", interval: "2s", start_period: "900s" },
];

/// Docker's default grace between `docker stop`'s SIGTERM and SIGKILL.
const DOCKER_STOP_GRACE: Duration = Duration::from_secs(10);

/// The values and flags the template is rendered with.
#[derive(Debug, Default)]
pub(crate) struct Values {
    values: BTreeMap<&'static str, String>,
    flags: BTreeMap<&'static str, bool>,
}

/// The image's files (kernel, initrd, disks): all in one directory of the image, staged in the
/// build context under that directory's last component (`guest/`, `images/`).
pub(crate) struct ImageFiles {
    /// The directory in the image (`/var/lib/vial/images`).
    pub dir: PathBuf,
    /// Its name in the build context (`images`).
    pub staged: String,
    /// The files' names, in profile order.
    pub names: Vec<String>,
}

/// Where the profile's files live; fails unless they share one directory.
pub(crate) fn image_files(image: &ImageProfile) -> Result<ImageFiles> {
    let profile = &image.profile;
    let mut paths: Vec<&Path> = Vec::new();
    if let Some(boot) = &profile.boot {
        paths.push(&boot.kernel);
        paths.extend(boot.initrd.as_deref());
    }
    paths.extend(profile.disks.iter().map(|d| d.path.as_path()));
    let first = paths.first().with_context(|| format!("{} names no kernel and no disk", image.path.display()))?;
    let dir = first.parent().context("a resolved profile path has a parent")?.to_path_buf();
    let mut names = Vec::new();
    for path in &paths {
        ensure!(
            path.parent() == Some(dir.as_path()),
            "{}: the kernel, initrd and disks must be in one directory of the image ({} is not in {})",
            image.path.display(),
            path.display(),
            dir.display()
        );
        names.push(path.file_name().context("a resolved profile path names a file")?.to_string_lossy().into_owned());
    }
    let staged = dir.file_name().context("the image's file directory is not /")?.to_string_lossy().into_owned();
    Ok(ImageFiles { dir, staged, names })
}

/// The template's values for `image`: see the module docs.
pub(crate) fn values(image: &ImageProfile) -> Result<Values> {
    let profile = &image.profile;
    let name = profile.name.as_str();
    let health = HEALTH
        .iter()
        .find(|h| h.profile == name)
        .with_context(|| format!("no health check timing for profile `{name}`: add it to HEALTH in {}", file!()))?;
    let files = image_files(image)?;
    let mut v = Values::default();
    v.set("name", name);
    v.set("description", &image.description);
    v.set("label_description", quoted(&format!("{} in a QEMU VM, run by vial as PID 1", image.description)));
    v.set("staged_files", format!("{:<16}{}", format!("{}/", files.staged), files.names.join(", ")));
    v.set("staged_dir", &files.staged);
    v.set("image_dir", files.dir.display().to_string());

    let stop = profile.stop_timeout.as_secs();
    let long_stop = profile.stop_timeout >= DOCKER_STOP_GRACE;
    v.flag("long_stop", long_stop);
    v.set("stop_timeout", stop.to_string());
    v.set("stop_grace", (stop + DOCKER_STOP_GRACE.as_secs()).to_string());
    let mut run_options = String::new();
    if long_stop {
        run_options.push_str(&format!(" --stop-timeout {}", stop + DOCKER_STOP_GRACE.as_secs()));
    }
    if let Some(share) = &profile.share {
        run_options.push_str(&format!(" -v LESSON:{}:ro", share.path.display()));
    }
    v.set("run_options", run_options);

    v.flag("snapshot", profile.snapshot.is_some());
    v.flag("forwards", !profile.forwards.is_empty());
    let ports: Vec<String> =
        profile.forwards.iter().map(|f| format!("{}/{}", f.container_port, f.protocol.as_str())).collect();
    v.set("exposed_ports", ports.join(" "));
    v.set("readiness", readiness(&profile.probe));
    v.set("health_interval", health.interval);
    v.set("start_period", health.start_period);

    v.flag("credentials", profile.credentials.is_some());
    let credentials = profile.credentials.as_ref().map(|c| quoted(&format!("{}/{}", c.user, c.password)));
    v.set("credentials", credentials.unwrap_or_default());
    Ok(v)
}

/// The profile's readiness, in words.
fn readiness(probe: &Probe) -> String {
    match probe {
        Probe::Tcp { port, console, .. } => {
            let mut text = format!("the guest answers on port {port}");
            if let Some(console) = console {
                text.push_str(&format!(" and has printed `{console}` on its console"));
            }
            text
        }
        Probe::Serial { pattern } => format!("the guest has printed `{pattern}` on its console"),
    }
}

/// `text` escaped for a double-quoted Dockerfile string (a `LABEL` value): `\`, `"` and `$`,
/// which Docker would otherwise take as an environment variable.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Values {
    fn set(&mut self, key: &'static str, value: impl Into<String>) {
        self.values.insert(key, value.into());
    }
    fn flag(&mut self, key: &'static str, on: bool) {
        self.flags.insert(key, on);
    }
}

/// The Dockerfile of `image`: [`TEMPLATE`] rendered with [`values`].
pub(crate) fn dockerfile(image: &ImageProfile) -> Result<String> {
    render(TEMPLATE, &values(image)?).context("rendering dockerfiles/Dockerfile.in")
}

/// Renders `template` (see the module docs for its syntax).
pub(crate) fn render(template: &str, values: &Values) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    // The open blocks, innermost last: (key, whether its lines are kept).
    let mut blocks: Vec<(&str, bool)> = Vec::new();
    for (index, line) in template.lines().enumerate() {
        let number = index + 1;
        let directive = line.strip_prefix("{{").and_then(|l| l.strip_suffix("}}"));
        if let Some(open) = directive.and_then(|d| d.strip_prefix('?')) {
            let (key, negated) = match open.strip_prefix('!') {
                Some(key) => (key, true),
                None => (open, false),
            };
            let on = *values.flags.get(key).with_context(|| format!("line {number}: unknown flag `{key}`"))?;
            blocks.push((key, on != negated));
            continue;
        }
        if let Some(key) = directive.and_then(|d| d.strip_prefix('/')) {
            match blocks.pop() {
                Some((open, _)) if open == key => continue,
                Some((open, _)) => bail!("line {number}: `{{{{/{key}}}}}` closes `{open}`"),
                None => bail!("line {number}: `{{{{/{key}}}}}` closes nothing"),
            }
        }
        if blocks.iter().any(|(_, kept)| !kept) {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").with_context(|| format!("line {number}: `{{{{` without `}}}}`"))?;
            let key = &after[..end];
            let value = values.values.get(key).with_context(|| format!("line {number}: unknown value `{key}`"))?;
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    if let Some((open, _)) = blocks.last() {
        bail!("`{{{{?{open}}}}}` is never closed");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{check_exposed_ports, load_profile};

    fn rendered(profile: &str) -> String {
        dockerfile(&load_profile(profile).unwrap()).unwrap()
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l.trim() == line)
    }

    /// What every image needs: the base, vial as PID 1, its health check and stop signal,
    /// the profile and vial copied in, the profile's name as a label, the forwards exposed.
    #[test]
    fn every_profile_renders_the_common_lines() {
        for name in ["linux", "frr", "cumulus", "vqfx"] {
            let image = load_profile(name).unwrap();
            let text = dockerfile(&image).unwrap();
            for line in [
                "ARG BASE=vial/base:bookworm",
                "FROM ${BASE}",
                "COPY profile.toml /etc/vial/profile.toml",
                "COPY vial /vial",
                "STOPSIGNAL SIGTERM",
                "ENTRYPOINT [\"/vial\"]",
                "ARG VERSION=dev",
                "ARG REVISION=unknown",
                "ARG SOURCE=",
                &format!("LABEL org.opencontainers.image.title=\"vial {name} endpoint\" \\"),
                "org.opencontainers.image.source=\"${SOURCE}\" \\",
                "org.opencontainers.image.version=\"${VERSION}\" \\",
                "org.opencontainers.image.revision=\"${REVISION}\" \\",
                &format!("vial.profile=\"{name}\""),
            ] {
                assert!(has_line(&text, line), "{name}: no line `{line}` in\n{text}");
            }
            assert!(!text.contains("{{"), "{name}: unrendered\n{text}");
            check_exposed_ports(&text, &image.profile).unwrap_or_else(|e| panic!("{name}: {e:#}\n{text}"));
            // The LABEL instruction's last line ends it, every other continues it.
            let label: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("LABEL ")).collect();
            let (last, rest) = label.split_last().unwrap();
            assert!(rest.iter().all(|l| l.ends_with(" \\")) && !last.ends_with('\\'), "{name}: {label:#?}");
        }
    }

    #[test]
    fn each_profile_gets_its_own_lines() {
        let linux = rendered("linux");
        for line in [
            "COPY guest/ /etc/vial/guest/",
            "RUN [\"/vial\", \"snapshot\", \"--name\", \"linux\"]",
            "EXPOSE 80/tcp",
            "HEALTHCHECK --interval=1s --timeout=3s --start-period=120s --retries=3 CMD [\"/vial\", \"health\"]",
        ] {
            assert!(has_line(&linux, line), "linux: no `{line}` in\n{linux}");
        }
        assert!(!linux.contains("vial.credentials"), "{linux}");

        let frr = rendered("frr");
        for line in [
            "COPY images/ /var/lib/vial/images/",
            "RUN [\"/vial\", \"snapshot\", \"--name\", \"frr\"]",
            "EXPOSE 22/tcp",
            "HEALTHCHECK --interval=1s --timeout=3s --start-period=300s --retries=3 CMD [\"/vial\", \"health\"]",
            "vial.credentials=\"antidote/antidotepassword\" \\",
            "vial.snapshot=\"ram\" \\",
        ] {
            assert!(has_line(&frr, line), "frr: no `{line}` in\n{frr}");
        }

        for (name, start_period) in [("cumulus", "600s"), ("vqfx", "900s")] {
            let text = rendered(name);
            let healthcheck = format!(
                "HEALTHCHECK --interval=2s --timeout=3s --start-period={start_period} --retries=3 CMD [\"/vial\", \"health\"]"
            );
            for line in [
                "COPY images/ /var/lib/vial/images/",
                "EXPOSE 22/tcp 161/udp 830/tcp 8080/tcp",
                &healthcheck,
                "vial.credentials=\"antidote/antidotepassword\" \\",
            ] {
                assert!(has_line(&text, line), "{name}: no `{line}` in\n{text}");
            }
            // No [snapshot]: nothing runs at build time; a 30 s stop needs more than 10 s.
            assert!(!text.contains("RUN ") && !text.contains("vial.snapshot"), "{name}:\n{text}");
            assert!(text.contains("`docker stop -t 40`") && text.contains("--stop-timeout 40"), "{name}:\n{text}");
        }
        assert!(!linux.contains("docker stop -t"), "{linux}");
    }

    #[test]
    fn blocks_and_values() {
        let mut values = Values::default();
        values.set("who", "world");
        values.flag("on", true);
        values.flag("off", false);
        let template =
            "hello {{who}}\n{{?on}}\nkept\n{{?off}}\ndropped\n{{/off}}\n{{/on}}\n{{?!off}}\nnot off\n{{/off}}\n";
        assert_eq!(render(template, &values).unwrap(), "hello world\nkept\nnot off\n");
        assert!(render("{{nope}}\n", &values).is_err());
        assert!(render("{{?nope}}\n{{/nope}}\n", &values).is_err());
        assert!(render("{{?on}}\n", &values).is_err());
        assert!(render("{{?on}}\n{{/off}}\n", &values).is_err());
        assert!(render("{{who\n", &values).is_err());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(quoted(r#"a "b" $c \d"#), r#"a \"b\" \$c \\d"#);
    }
}
