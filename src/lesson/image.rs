//! The image model: every field of `image.meta.yaml` (antidote-core v0.6+), the metadata of an
//! endpoint image that lessons name by slug. Parsing only; it never looks for the image itself.

use super::model::is_slug;
use super::yaml::{self, Diagnostic, Diagnostics, MapReader};

/// An endpoint image, as `image.meta.yaml` describes it. Only handed out once it is valid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Image {
    /// Unique identifier that lesson endpoints use in `image:` (`slug`).
    pub slug: String,
    /// What the image is (`description`).
    pub description: String,
    /// How much the image is trusted, which decides its runtime (`flavor`).
    pub flavor: Flavor,
    /// Whether IP forwarding is turned on in the endpoint (`enableForwarding`), for routers
    /// that run natively in the container.
    pub enable_forwarding: bool,
    /// Interfaces a lesson's connections attach to, in order (`networkInterfaces`); dropped
    /// from the curriculum in 2021 but still accepted.
    pub network_interfaces: Vec<String>,
    /// User for the learner's SSH presentations (`sshUser`).
    pub ssh_user: String,
    /// Password for the learner's SSH presentations (`sshPassword`).
    pub ssh_password: String,
    /// User that stage configuration runs as (`configUser`).
    pub config_user: String,
    /// Password that stage configuration uses (`configPassword`).
    pub config_password: String,
}

/// How an image runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// A privileged container on the default runtime, for images with their own virtualisation
    /// layer (VM appliances).
    Trusted,
    /// An unprivileged container under a sandboxed runtime (Kata).
    #[default]
    Untrusted,
}

impl Flavor {
    /// Every value with its spelling in the file.
    pub const CHOICES: &'static [(&'static str, Flavor)] =
        &[("trusted", Flavor::Trusted), ("untrusted", Flavor::Untrusted)];
}

impl Image {
    /// Parses and validates the text of an `image.meta.yaml`, returning every problem at once.
    pub fn parse(text: &str) -> Result<Image, Vec<Diagnostic>> {
        let doc = yaml::parse_document(text).map_err(|d| vec![d])?;
        let mut d = Diagnostics::default();
        let Some(mut map) = MapReader::new(&doc, "", "a mapping of image fields", &mut d) else {
            return Err(d.0);
        };
        let mut image = Image::default();
        if let Some(n) = map.required("slug", "<image-slug>", &mut d) {
            if let Some(s) = yaml::string(n, "slug", &mut d) {
                if s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    image.slug = s.value;
                } else {
                    let fix =
                        if is_slug(&s.value.to_lowercase()) { s.value.to_lowercase() } else { "vqfx-snap1".into() };
                    d.push(s.pos, format!("`slug` is `{}`: use letters, digits and hyphens, e.g. `{fix}`", s.value));
                }
            }
        }
        if let Some(n) = map.required("description", "<what the image runs>", &mut d) {
            image.description = yaml::string(n, "description", &mut d).map(|s| s.value).unwrap_or_default();
        }
        if let Some(n) = map.required("flavor", "untrusted", &mut d) {
            image.flavor = yaml::one_of(n, "flavor", Flavor::CHOICES, |_| None, &mut d).unwrap_or_default().value;
        }
        if let Some(n) = map.optional("enableForwarding") {
            image.enable_forwarding = yaml::boolean(n, "enableForwarding", &mut d).unwrap_or_default();
        }
        if let Some(n) = map.optional("networkInterfaces") {
            for (i, item) in yaml::list(n, "networkInterfaces", "interface names", &mut d).iter().enumerate() {
                if let Some(s) = yaml::string(item, &format!("networkInterfaces[{i}]"), &mut d) {
                    image.network_interfaces.push(s.value);
                }
            }
        }
        let mut credential = |key: &str, d: &mut Diagnostics| {
            map.required(key, "<non-empty>", d)
                .and_then(|n| yaml::string(n, key, d))
                .map(|s| s.value)
                .unwrap_or_default()
        };
        image.ssh_user = credential("sshUser", &mut d);
        image.ssh_password = credential("sshPassword", &mut d);
        image.config_user = credential("configUser", &mut d);
        image.config_password = credential("configPassword", &mut d);
        map.finish(|_| None, &mut d);
        if d.0.is_empty() {
            Ok(image)
        } else {
            d.0.sort_by_key(|p| p.pos);
            Err(d.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trusted_vm_image_parses() {
        let text = "slug: cvx\ndescription: Cumulus Linux\nflavor: trusted\nsshUser: antidote\nsshPassword: p\n\
                    configUser: antidote\nconfigPassword: p\n";
        let image = Image::parse(text).unwrap();
        assert_eq!(image.flavor, Flavor::Trusted);
        assert!(!image.enable_forwarding);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "slug: a/b\nflavor: privileged\nenableForwarding: yes\nsshUser: x\nsshPassword: y\nconfigUser: z\nconfigPassword: w\nport: 1\n";
        let problems = Image::parse(text).unwrap_err();
        let lines: Vec<usize> = problems.iter().map(|p| p.pos.line).collect();
        // slug (line 1), description missing (at the mapping, line 1), flavor, enableForwarding, port.
        assert_eq!(lines, vec![1, 1, 2, 3, 8], "{problems:?}");
        assert!(problems.iter().any(|p| p.message.contains("`flavor` has unknown value `privileged`")));
    }
}
