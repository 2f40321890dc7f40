//! The image catalog: which image reference a lesson's image slug names on this host. The
//! project's own images have defaults (`frr`, `linux`, `cvx` → `cumulus`, `vqfx*` → `vqfx`,
//! `utility`); `--image SLUG=REF` adds or overrides one. Pure.

use std::collections::BTreeMap;

/// Slug → reference, defaults first; a trailing `*` matches any slug with that prefix.
const DEFAULTS: &[(&str, &str)] = &[
    ("frr", "vial/frr:latest"),
    ("linux", "vial/linux:latest"),
    ("cvx", "vial/cumulus:latest"),
    ("vqfx*", "vial/vqfx:latest"),
    ("utility", "vial/utility:latest"),
];

/// Why a slug has no image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// An `--image` argument is not `SLUG=REFERENCE`.
    #[error("--image {given:?}: give SLUG=REFERENCE, e.g. --image crpd=registry.example.com/crpd:20.2")]
    BadOverride {
        /// The argument.
        given: String,
    },
    /// No default and no `--image` for the slug.
    #[error("endpoint {endpoint}: image slug {slug:?} has no image on this host: name one with --image {slug}=REPOSITORY:TAG (known: {known})")]
    Unknown {
        /// The endpoint that uses it.
        endpoint: String,
        /// The slug.
        slug: String,
        /// The slugs the catalog knows.
        known: String,
    },
}

/// The catalog of one run.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    overrides: BTreeMap<String, String>,
}

impl Catalog {
    /// The defaults plus `--image SLUG=REF` arguments (later ones win).
    pub fn new(overrides: &[String]) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        for given in overrides {
            let Some((slug, reference)) = given.split_once('=').filter(|(s, r)| !s.is_empty() && !r.is_empty()) else {
                return Err(CatalogError::BadOverride { given: given.clone() });
            };
            catalog.overrides.insert(slug.to_string(), reference.to_string());
        }
        Ok(catalog)
    }

    /// The reference for `slug`, which `endpoint` uses.
    pub fn resolve(&self, endpoint: &str, slug: &str) -> Result<String, CatalogError> {
        if let Some(reference) = self.overrides.get(slug) {
            return Ok(reference.clone());
        }
        let found = DEFAULTS.iter().find(|(pattern, _)| match pattern.strip_suffix('*') {
            Some(prefix) => slug.starts_with(prefix),
            None => *pattern == slug,
        });
        match found {
            Some((_, reference)) => Ok(reference.to_string()),
            None => Err(CatalogError::Unknown {
                endpoint: endpoint.to_string(),
                slug: slug.to_string(),
                known: DEFAULTS
                    .iter()
                    .map(|(pattern, _)| pattern.to_string())
                    .chain(self.overrides.keys().cloned())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_prefixes_and_overrides() {
        let catalog = Catalog::new(&["crpd=example/crpd:1".into(), "frr=mine/frr:2".into()]).unwrap();
        assert_eq!(catalog.resolve("r1", "cvx").unwrap(), "vial/cumulus:latest");
        assert_eq!(catalog.resolve("r1", "vqfx-snap1").unwrap(), "vial/vqfx:latest");
        assert_eq!(catalog.resolve("r1", "frr").unwrap(), "mine/frr:2");
        assert_eq!(catalog.resolve("r1", "crpd").unwrap(), "example/crpd:1");
    }

    #[test]
    fn an_unknown_slug_names_the_endpoint_the_slug_and_the_flag() {
        let err = Catalog::new(&[]).unwrap().resolve("r2", "crpd").unwrap_err().to_string();
        assert!(err.contains("endpoint r2") && err.contains("\"crpd\"") && err.contains("--image crpd="), "{err}");
        let err = Catalog::new(&["crpd".into()]).unwrap_err().to_string();
        assert!(err.contains("SLUG=REFERENCE"), "{err}");
    }

    /// Repository check: each image.meta.yaml under examples/images/ names an image the
    /// catalog knows, and logs in the way that image is built to (the profile's
    /// `[credentials]`, or the plain-container Dockerfile's `vial.credentials` label).
    #[test]
    fn the_examples_image_metadata_agrees_with_the_images() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let (images, problems) = crate::lesson::load_images(&root.join("examples/images")).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert!(images.by_slug.contains_key("frr") && images.by_slug.contains_key("utility"), "{images:?}");
        let catalog = Catalog::new(&[]).unwrap();
        for (slug, image) in &images.by_slug {
            let reference = catalog.resolve("example", slug).unwrap();
            let name = reference.trim_start_matches("vial/").trim_end_matches(":latest");
            let profile = root.join("vm-profiles").join(format!("{name}.toml"));
            let login = (image.config_user.as_str(), image.config_password.as_str());
            if profile.is_file() {
                let file = crate::config::ProfileFile::load(&profile).unwrap();
                let credentials = file.credentials.expect("a VM image with metadata has credentials");
                assert_eq!(login, (credentials.user.as_str(), credentials.password.as_str()), "{slug}");
            } else {
                let dockerfile =
                    std::fs::read_to_string(root.join("dockerfiles").join(name).join("Dockerfile")).unwrap();
                let label = format!("vial.credentials=\"{}/{}\"", login.0, login.1);
                assert!(dockerfile.contains(&label), "{slug}: the Dockerfile has no `{label}`");
            }
        }
    }
}
