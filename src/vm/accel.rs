//! Choosing between KVM and TCG. `auto` takes KVM only when `/dev/kvm` can create a VM and a
//! guest actually starts under it: some nested set-ups open KVM fine but hang guests at
//! kernel entry, or make QEMU abort on a model-specific register. So `auto` probes the way it
//! fails ([`probe_guest`]): the profile's own kernel under KVM, with a deadline for its first
//! line on the serial console.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::AccelChoice;

/// How long the guest probe waits for the kernel's first line. A kernel that works prints it
/// within a few hundred milliseconds of QEMU's start (bzImage decompression included).
pub const GUEST_PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// What a Linux kernel prints first once it runs (with `earlyprintk`).
const KERNEL_FIRST_LINE: &str = "Linux version";

/// The accelerator a start of `profile` uses, and why `auto` fell back to TCG when it did:
/// [`resolve_accel`] with `/dev/kvm`'s check, then, for `auto` choosing KVM and a profile that
/// boots a kernel, [`probe_guest`]. Blocking (the probe may take [`GUEST_PROBE_DEADLINE`]).
/// The one place `vial run`, `vial argv` and `vial snapshot` decide it.
pub fn choose(profile: &crate::config::Profile) -> Result<(Accel, Option<String>), KvmUnavailable> {
    let (accel, fallback) = resolve_accel(profile.accel, crate::sys::kvm_usable)?;
    let (Accel::Kvm, AccelChoice::Auto, Some(boot)) = (accel, profile.accel, &profile.boot) else {
        return Ok((accel, fallback));
    };
    // Without the binary there is nothing to probe with; the start says so itself.
    let Some(binary) = super::qemu::find_binary(&profile.qemu) else { return Ok((accel, fallback)) };
    let cpu = super::argv::cpu_model(profile, Accel::Kvm);
    match probe_guest(&binary, &profile.machine_type, cpu, &boot.kernel) {
        Ok(()) => Ok((Accel::Kvm, None)),
        Err(reason) => Ok((Accel::Tcg, Some(reason))),
    }
}

/// Boots `kernel` under KVM with QEMU `binary`, machine `machine` and CPU model `cpu` (the
/// profile's, as the real start would use them) until the kernel prints its first line, or
/// [`GUEST_PROBE_DEADLINE`] passes, or QEMU exits. `Err` says what was seen. Blocking: run it
/// off the supervision loop. The probe's QEMU never outlives it.
pub fn probe_guest(binary: &Path, machine: &str, cpu: &str, kernel: &Path) -> Result<(), String> {
    let mut command = Command::new(binary);
    command
        .args(["-accel", "kvm", "-machine", machine, "-cpu", cpu, "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = crate::reaper::spawn_own(&mut command, Command::spawn)
        .map_err(|err| format!("cannot run {}: {err}", binary.display()))?;
    let pid = child.id();
    let (lines, seen) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let verdict = loop {
        let left = GUEST_PROBE_DEADLINE.saturating_sub(started.elapsed());
        match seen.recv_timeout(left) {
            Ok(line) if line.contains(KERNEL_FIRST_LINE) => break Ok(()),
            Ok(_) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!(
                    "a guest kernel under KVM printed nothing within {GUEST_PROBE_DEADLINE:?} (KVM hangs guests here)"
                ));
            }
            // The console closed: QEMU exited.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(String::new()),
        }
    };
    let _ = child.kill();
    let status = child.wait();
    crate::reaper::disown(pid);
    match verdict {
        Ok(()) => {
            tracing::info!(elapsed = ?started.elapsed(), "a guest kernel starts under KVM");
            Ok(())
        }
        Err(reason) if !reason.is_empty() => Err(reason),
        Err(_) => {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            use std::os::unix::process::ExitStatusExt;
            let how = match status {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => format!("with code {code}"),
                    (None, Some(signal)) => format!("on signal {signal}"),
                    _ => "".into(),
                },
                Err(_) => "".into(),
            };
            Err(format!("qemu exited {how} before a guest kernel ran under KVM: {last}"))
        }
    }
}

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

    /// On this project's machines KVM opens but runs no guest (nested virtualization): the
    /// probe, with the test guest's kernel, must say so quickly rather than hang. Skipped
    /// where there is no /dev/kvm or no test guest (`cargo xtask guest`).
    #[test]
    fn the_guest_probe_ends_by_its_deadline_and_says_what_it_saw() {
        let kernel = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest/linux/vmlinuz");
        if !Path::new("/dev/kvm").exists() || !kernel.is_file() || crate::sys::kvm_usable().is_err() {
            return;
        }
        let started = Instant::now();
        let result = probe_guest(Path::new("/usr/bin/qemu-system-x86_64"), "pc", "host", &kernel);
        let elapsed = started.elapsed();
        println!("probe: {result:?} after {elapsed:?}");
        assert!(elapsed < GUEST_PROBE_DEADLINE + Duration::from_secs(5), "{elapsed:?}");
        if let Err(reason) = result {
            assert!(reason.contains("KVM"), "{reason}");
        }
        // And a QEMU that cannot run at all is an error, not a hang.
        let err = probe_guest(Path::new("/nonexistent/qemu"), "pc", "host", &kernel).unwrap_err();
        assert!(err.contains("cannot run /nonexistent/qemu"), "{err}");
    }

    #[test]
    fn forced_kvm_fails_with_a_fix_and_tcg_never_probes() {
        let err = resolve_accel(AccelChoice::Kvm, || Err("permission denied".into())).unwrap_err();
        assert!(err.to_string().contains("VIAL_ACCEL=tcg"));
        let (accel, _) = resolve_accel(AccelChoice::Tcg, || panic!("must not probe")).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }
}
