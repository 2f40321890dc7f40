//! Every `unsafe` block of the crate, each behind a safe wrapper with a `// SAFETY:` comment.
//! Callers never see a raw pointer or an unchecked ioctl.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;

// KVM's ioctls (linux/kvm.h): KVMIO = 0xAE.
nix::ioctl_none!(kvm_get_api_version, 0xAE, 0x00);
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));

/// Whether KVM can create a VM here: `/dev/kvm` opens read-write, speaks API version 12, and
/// `KVM_CREATE_VM` succeeds. Returns why not otherwise.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|err| format!("cannot open /dev/kvm: {err}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument; the fd is open for the whole call.
    let version =
        unsafe { kvm_get_api_version(kvm.as_raw_fd()) }.map_err(|err| format!("KVM_GET_API_VERSION: {err}"))?;
    if version != 12 {
        return Err(format!("KVM API version {version}, expected 12"));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default); it returns a new
    // fd that we own and close at once.
    let vm = unsafe { kvm_create_vm(kvm.as_raw_fd(), 0) }.map_err(|err| format!("KVM_CREATE_VM: {err}"))?;
    let _ = nix::unistd::close(vm);
    Ok(())
}

/// Spawns `command` as QEMU must run under `vial`:
/// - in its own process group, so a Ctrl-C on a terminal reaches only `vial` (which stops
///   the guest cleanly) and not QEMU (which would quit at once);
/// - with `PR_SET_PDEATHSIG` = SIGKILL, so QEMU never outlives `vial` even if `vial` is
///   killed without a chance to clean up (prctl(2); it fires when the spawning *thread*
///   exits, which is why `vial` runs a current-thread runtime and spawns from it);
/// - inheriting the descriptors in `inherit` (QMP listener, macvtap fds), whose close-on-exec
///   flag is cleared in the child only.
pub fn spawn_supervised(command: &mut Command, inherit: &[RawFd]) -> io::Result<Child> {
    let inherit = inherit.to_vec();
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec in the child. It only calls
    // async-signal-safe functions (setpgid, prctl, getppid, fcntl, kill via nix, which are
    // thin syscall wrappers) and allocates nothing: `inherit` was copied before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // If vial died between fork and prctl, the death signal was missed: leave now.
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("parent exited during spawn"));
            }
            for fd in &inherit {
                // SAFETY: `fd` is a descriptor the parent keeps open across the fork.
                let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
            }
            Ok(())
        })
    };
    command.spawn()
}
