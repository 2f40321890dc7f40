//! Vendor appliances (`cumulus`, `vqfx`): the image is built from the vendor's own disk image,
//! which cannot be downloaded without an account and a license, so the user gives it by path
//! (`--source FILE`, or `VIAL_CUMULUS_SOURCE` / `VIAL_VQFX_SOURCE`). Without it the build stops
//! at once, naming the file it expects and where the vendor publishes it.
//!
//! The vendor file is never written: a scratch qcow2 copy is booted once to run the profile's
//! `[[first_boot]]` steps, then shipped compressed under the file name the profile gives.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vial::config::profile::Disk;

use super::ImageProfile;

/// What each vendor profile expects, and where its vendor publishes it.
struct Vendor {
    profile: &'static str,
    variable: &'static str,
    product: &'static str,
    example: &'static str,
    published: &'static str,
}

const VENDORS: &[Vendor] = &[
    Vendor {
        profile: "cumulus",
        variable: "VIAL_CUMULUS_SOURCE",
        product: "the Cumulus VX disk image for KVM/QEMU (qcow2)",
        example: "cumulus-linux-4.4.0-vx-amd64-qemu.qcow2",
        published: "NVIDIA publishes it on the Cumulus VX download page, \
                    https://www.nvidia.com/en-us/networking/ethernet-switching/cumulus-vx/download/ \
                    (free, with an NVIDIA account)",
    },
    Vendor {
        profile: "vqfx",
        variable: "VIAL_VQFX_SOURCE",
        product: "the vQFX10000 routing engine (RE) disk image (qcow2, or the older vmdk)",
        example: "vqfx-20.2R1.10-re-qemu.qcow2 (or vqfx10k-re-15.1X53-D60.vmdk)",
        published: "Juniper publishes it with the vQFX evaluation downloads, \
                    https://support.juniper.net/support/downloads/?p=vqfxeval \
                    (free, with a Juniper account)",
    },
];

/// The smallest file taken for a vendor disk image (vQFX's RE, the smallest, is ~700 MB).
const MIN_DISK_BYTES: u64 = 64 << 20;

fn vendor(profile: &str) -> Result<&'static Vendor> {
    VENDORS.iter().find(|v| v.profile == profile).with_context(|| format!("`{profile}` is not a vendor profile"))
}

/// The vendor file: `--source`, else the profile's environment variable; fails fast, saying
/// what is expected and where to get it, when neither names an existing file.
pub(super) fn source(profile: &str, flag: Option<&Path>) -> Result<PathBuf> {
    let vendor = vendor(profile)?;
    let given = flag
        .map(|p| (p.to_path_buf(), "--source"))
        .or_else(|| std::env::var_os(vendor.variable).filter(|v| !v.is_empty()).map(|v| (v.into(), vendor.variable)));
    match given {
        // Every appliance disk is hundreds of megabytes; a small file is the wrong file, and
        // booting it would only fail after the first step's long timeout.
        Some((path, origin)) if path.is_file() => {
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size < MIN_DISK_BYTES {
                bail!(
                    "{origin} names {}, which is {size} bytes: not a disk image; `cargo xtask image {profile}` \
                     needs {}, e.g. {}. {}.",
                    path.display(),
                    vendor.product,
                    vendor.example,
                    vendor.published
                );
            }
            Ok(path)
        }
        Some((path, origin)) => bail!(
            "{origin} names {}, which is not a file; `cargo xtask image {profile}` needs {}, e.g. {}. {}.",
            path.display(),
            vendor.product,
            vendor.example,
            vendor.published
        ),
        None => bail!(
            "`cargo xtask image {profile}` needs {}, e.g. {}: give it with --source FILE or {}=FILE. {}.",
            vendor.product,
            vendor.example,
            vendor.variable,
            vendor.published
        ),
    }
}

/// Fills `staged`, the build context's directory for the image's files (`images/`), with the
/// first-booted disk under the profile's file name.
pub(super) fn stage(image: &ImageProfile, source: &Path, staged: &Path, rebuild: bool) -> Result<()> {
    let profile = &image.profile;
    let ([disk], None) = (profile.disks.as_slice(), &profile.boot) else {
        bail!("{}: a vendor profile boots exactly one disk and no [boot] kernel", image.path.display());
    };
    let work = super::work_dir(&profile.name);
    fs::create_dir_all(&work)?;
    let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    let source_stamp = super::stamp(&[
        source.canonicalize()?.as_os_str().as_encoded_bytes(),
        &meta.len().to_le_bytes(),
        &meta.mtime().to_le_bytes(),
    ]);
    let scratch = work.join("disk.qcow2");
    let make_disk = || -> Result<()> {
        let _ = fs::remove_file(&scratch);
        crate::run_cmd(
            "qemu-img",
            &["convert".as_ref(), "-O".as_ref(), "qcow2".as_ref(), source.as_os_str(), scratch.as_os_str()]
                as &[&std::ffi::OsStr],
        )
        .with_context(|| format!("copying {} to {}", source.display(), scratch.display()))
    };
    let boot_disk = Disk { path: scratch.clone(), format: "qcow2".into(), interface: disk.interface.clone() };
    let shipped = super::first_booted_disk(image, &work, &source_stamp, make_disk, None, boot_disk, rebuild)?;
    fs::create_dir_all(staged)?;
    super::link_or_copy(&shipped, &staged.join(disk.path.file_name().expect("validated profile paths name files")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_source_names_the_file_and_where_to_get_it() {
        let err = source("cumulus", None).unwrap_err().to_string();
        if std::env::var_os("VIAL_CUMULUS_SOURCE").is_none() {
            assert!(err.contains("cumulus-linux-4.4.0-vx-amd64-qemu.qcow2"), "{err}");
            assert!(err.contains("nvidia.com"), "{err}");
            assert!(err.contains("--source FILE or VIAL_CUMULUS_SOURCE=FILE"), "{err}");
        }
        let err = source("vqfx", Some(Path::new("/nonexistent/vqfx.qcow2"))).unwrap_err().to_string();
        assert!(err.contains("--source names /nonexistent/vqfx.qcow2, which is not a file"), "{err}");
        assert!(err.contains("vqfx-20.2R1.10-re-qemu.qcow2"), "{err}");
        assert!(err.contains("juniper.net"), "{err}");
        let err = source("vqfx", Some(Path::new("/etc/hostname"))).unwrap_err().to_string();
        assert!(err.contains("/etc/hostname, which is") && err.contains("not a disk image"), "{err}");
    }
}
