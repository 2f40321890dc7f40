//! Choosing between KVM and TCG. `auto` takes KVM only when `/dev/kvm` can create a VM; a
//! host whose KVM works but hangs guests (some nested set-ups) is told to use `tcg`
//! explicitly (`VIAL_ACCEL=tcg`), since no probe short of booting a guest can see that.

use crate::config::AccelChoice;

/// The accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (QEMU's tiny code generator).
    Tcg,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Why `kvm` was asked for and cannot be had.
#[derive(Debug, thiserror::Error)]
#[error("accel kvm was requested but KVM is not usable ({reason}); pass --device /dev/kvm to the container or set VIAL_ACCEL=tcg")]
pub struct KvmUnavailable {
    /// What the probe saw.
    pub reason: String,
}

/// Decides the accelerator; `kvm_probe` says whether KVM can create a VM (and why not).
/// Returns the choice and, for `auto` falling back to TCG, the reason to log.
pub fn resolve_accel(
    choice: AccelChoice,
    kvm_probe: impl FnOnce() -> Result<(), String>,
) -> Result<(Accel, Option<String>), KvmUnavailable> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Kvm => kvm_probe().map(|()| (Accel::Kvm, None)).map_err(|reason| KvmUnavailable { reason }),
        AccelChoice::Auto => match kvm_probe() {
            Ok(()) => Ok((Accel::Kvm, None)),
            Err(reason) => Ok((Accel::Tcg, Some(reason))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_tcg_with_the_reason() {
        let (accel, why) = resolve_accel(AccelChoice::Auto, || Err("no /dev/kvm".into())).unwrap();
        assert_eq!(accel, Accel::Tcg);
        assert_eq!(why.as_deref(), Some("no /dev/kvm"));
        assert_eq!(resolve_accel(AccelChoice::Auto, || Ok(())).unwrap().0, Accel::Kvm);
    }

    #[test]
    fn forced_kvm_fails_with_a_fix_and_tcg_never_probes() {
        let err = resolve_accel(AccelChoice::Kvm, || Err("permission denied".into())).unwrap_err();
        assert!(err.to_string().contains("VIAL_ACCEL=tcg"));
        let (accel, _) = resolve_accel(AccelChoice::Tcg, || panic!("must not probe")).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }
}
