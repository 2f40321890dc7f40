//! Choosing between KVM and TCG. `auto` takes KVM only when `/dev/kvm` can create a VM and a
//! guest actually starts under it: some nested set-ups open KVM fine but hang guests at
//! kernel entry, or make QEMU abort on a model-specific register. So `auto` probes the way it
//! fails ([`probe_guest`]): the profile's own kernel under KVM, with a deadline for its first
//! line on the serial console; a profile that boots from disk has no kernel to give, so its
//! probe runs the firmware (SeaBIOS) alone and waits for its first line on the debug port.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::AccelChoice;

/// How long the guest probe waits for the guest's first line. A kernel that works prints it
/// within a few hundred milliseconds of QEMU's start (bzImage decompression included); the
/// firmware within a few milliseconds.
pub const GUEST_PROBE_DEADLINE: Duration = Duration::from_secs(3);

/// What the probe runs under KVM.
#[derive(Debug, Clone, Copy)]
pub enum ProbeGuest<'a> {
    /// This kernel, until it prints its first line (`Linux version`, with `earlyprintk`).
    Kernel(&'a Path),
    /// The firmware alone, until it prints its first line (`SeaBIOS`) on its debug port:
    /// proves a vCPU runs, not that a kernel would.
    Firmware,
}

impl ProbeGuest<'_> {
    /// What it prints first once it runs.
    fn first_line(self) -> &'static str {
        match self {
            ProbeGuest::Kernel(_) => "Linux version",
            ProbeGuest::Firmware => "SeaBIOS",
        }
    }

    /// What the verdicts call it.
    fn what(self) -> &'static str {
        match self {
            ProbeGuest::Kernel(_) => "a guest kernel",
            ProbeGuest::Firmware => "the guest firmware",
        }
    }

    /// The arguments that load it and put its first line on stdout.
    fn args(self) -> Vec<std::ffi::OsString> {
        let args: Vec<std::ffi::OsString> = match self {
            ProbeGuest::Kernel(kernel) => vec![
                "-serial".into(),
                "stdio".into(),
                "-kernel".into(),
                kernel.into(),
                "-append".into(),
                "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 panic=-1".into(),
            ],
            // SeaBIOS logs to the ISA debug console at port 0x402.
            ProbeGuest::Firmware => vec![
                "-chardev".into(),
                "stdio,id=firmware".into(),
                "-device".into(),
                "isa-debugcon,iobase=0x402,chardev=firmware".into(),
            ],
        };
        args
    }
}

/// The accelerator a start of `profile` uses, and why `auto` fell back to TCG when it did:
/// [`resolve_accel`] with `/dev/kvm`'s check, then, for `auto` choosing KVM, [`probe_guest`]
/// with the profile's kernel, or its firmware when it boots from disk. Blocking (the probe may
/// take [`GUEST_PROBE_DEADLINE`]). The one place `vial run`, `vial argv` and `vial snapshot`
/// decide it.
pub fn choose(profile: &crate::config::Profile) -> Result<(Accel, Option<String>), KvmUnavailable> {
    let (accel, fallback) = resolve_accel(profile.accel, crate::sys::kvm_usable)?;
    let (Accel::Kvm, AccelChoice::Auto) = (accel, profile.accel) else {
        return Ok((accel, fallback));
    };
    // Without the binary there is nothing to probe with; the start says so itself.
    let Some(binary) = super::qemu::find_binary(&profile.qemu) else { return Ok((accel, fallback)) };
    let cpu = super::argv::cpu_model(profile, Accel::Kvm);
    let guest = match &profile.boot {
        Some(boot) => ProbeGuest::Kernel(&boot.kernel),
        None => ProbeGuest::Firmware,
    };
    match probe_guest(&binary, &profile.machine_type, cpu, guest) {
        Ok(()) => Ok((Accel::Kvm, None)),
        Err(reason) => Ok((Accel::Tcg, Some(reason))),
    }
}

/// Runs `guest` under KVM with QEMU `binary`, machine `machine` and CPU model `cpu` (the
/// profile's, as the real start would use them) until it prints its first line, or
/// [`GUEST_PROBE_DEADLINE`] passes, or QEMU exits. `Err` says what was seen. Blocking: run it
/// off the supervision loop. The probe's QEMU never outlives it.
pub fn probe_guest(binary: &Path, machine: &str, cpu: &str, guest: ProbeGuest<'_>) -> Result<(), String> {
    probe(binary, Accel::Kvm, machine, cpu, guest)
}

/// [`probe_guest`] under `accel` (tests run the probe's verdicts under TCG too).
fn probe(binary: &Path, accel: Accel, machine: &str, cpu: &str, guest: ProbeGuest<'_>) -> Result<(), String> {
    let mut command = Command::new(binary);
    command
        .args(["-accel", accel.as_str(), "-machine", machine, "-cpu", cpu, "-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(guest.args())
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
    let (what, first_line) = (guest.what(), guest.first_line());
    let verdict = loop {
        let left = GUEST_PROBE_DEADLINE.saturating_sub(started.elapsed());
        match seen.recv_timeout(left) {
            Ok(line) if line.contains(first_line) => break Ok(()),
            Ok(_) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!(
                    "{what} under KVM printed nothing within {GUEST_PROBE_DEADLINE:?} (KVM hangs guests here)"
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
            tracing::info!(elapsed = ?started.elapsed(), "{what} starts under KVM");
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
            Err(format!("qemu exited {how} before {what} ran under KVM: {last}"))
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
        let result = probe_guest(Path::new("/usr/bin/qemu-system-x86_64"), "pc", "host", ProbeGuest::Kernel(&kernel));
        let elapsed = started.elapsed();
        println!("probe: {result:?} after {elapsed:?}");
        assert!(elapsed < GUEST_PROBE_DEADLINE + Duration::from_secs(5), "{elapsed:?}");
        if let Err(reason) = result {
            assert!(reason.contains("KVM"), "{reason}");
        }
        // And a QEMU that cannot run at all is an error, not a hang.
        let err = probe_guest(Path::new("/nonexistent/qemu"), "pc", "host", ProbeGuest::Kernel(&kernel)).unwrap_err();
        assert!(err.contains("cannot run /nonexistent/qemu"), "{err}");
    }

    /// The firmware probe, for profiles that boot from disk: SeaBIOS's first line is seen
    /// (under TCG, where it runs here), and under this machine's KVM QEMU cannot start the
    /// host CPU model (it aborts on an MSR), which the probe says.
    #[test]
    fn the_firmware_probe_sees_seabios_start_and_says_why_when_it_cannot() {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.exists() {
            return;
        }
        assert_eq!(probe(qemu, Accel::Tcg, "pc", "max", ProbeGuest::Firmware), Ok(()));
        if Path::new("/dev/kvm").exists() && crate::sys::kvm_usable().is_ok() {
            let started = Instant::now();
            let result = probe_guest(qemu, "pc", "host", ProbeGuest::Firmware);
            println!("firmware probe under KVM: {result:?} after {:?}", started.elapsed());
            assert!(started.elapsed() < GUEST_PROBE_DEADLINE + Duration::from_secs(5));
            if let Err(reason) = result {
                assert!(reason.contains("the guest firmware") && reason.contains("KVM"), "{reason}");
            }
        }
    }

    #[test]
    fn forced_kvm_fails_with_a_fix_and_tcg_never_probes() {
        let err = resolve_accel(AccelChoice::Kvm, || Err("permission denied".into())).unwrap_err();
        assert!(err.to_string().contains("VIAL_ACCEL=tcg"));
        let (accel, _) = resolve_accel(AccelChoice::Tcg, || panic!("must not probe")).unwrap();
        assert_eq!(accel, Accel::Tcg);
    }
}
