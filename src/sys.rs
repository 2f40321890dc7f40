//! Every `unsafe` block of the crate, each behind a safe wrapper with a `// SAFETY:` comment.
//! Callers never see a raw pointer or an unchecked ioctl.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;

// KVM's ioctls (linux/kvm.h): KVMIO = 0xAE.
// KVM_GET_API_VERSION refuses any argument but 0 (kvm_dev_ioctl: `if (arg) goto out`), and
// `ioctl_none!` passes none, leaving whatever the register held: pass 0 explicitly.
nix::ioctl_write_int_bad!(kvm_get_api_version, nix::request_code_none!(0xAE, 0x00));
nix::ioctl_write_int_bad!(kvm_create_vm, nix::request_code_none!(0xAE, 0x01));

/// The device KVM is opened through.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Whether KVM can create a VM here: `/dev/kvm` opens read-write, speaks API version 12, and
/// `KVM_CREATE_VM` succeeds. Returns why not otherwise.
pub fn kvm_usable() -> Result<(), String> {
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
        .map_err(|err| format!("cannot open {KVM_DEVICE}: {err}"))?;
    // SAFETY: KVM_GET_API_VERSION takes no argument; the fd is open for the whole call.
    let version =
        unsafe { kvm_get_api_version(kvm.as_raw_fd(), 0) }.map_err(|err| format!("KVM_GET_API_VERSION: {err}"))?;
    if version != 12 {
        return Err(format!("KVM API version {version}, expected 12"));
    }
    // SAFETY: KVM_CREATE_VM takes the machine type by value (0 = default); it returns a new
    // fd that we own and close at once.
    let vm = unsafe { kvm_create_vm(kvm.as_raw_fd(), 0) }.map_err(|err| format!("KVM_CREATE_VM: {err}"))?;
    let _ = nix::unistd::close(vm);
    Ok(())
}

/// A user's ids and groups, for a process to run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user id.
    pub uid: nix::unistd::Uid,
    /// The primary group.
    pub gid: nix::unistd::Gid,
    /// Every group, the primary one included.
    pub groups: Vec<nix::unistd::Gid>,
}

/// Spawns `command` as QEMU must run under `vial`:
/// - in its own process group, so a Ctrl-C on a terminal reaches only `vial` (which stops
///   the guest cleanly) and not QEMU (which would quit at once);
/// - with `PR_SET_PDEATHSIG` = SIGKILL, so QEMU never outlives `vial` even if `vial` is
///   killed without a chance to clean up (prctl(2); it fires when the spawning *thread*
///   exits, which is why `vial` runs a current-thread runtime and spawns from it);
/// - as `user` when one is given (`vm::user`), root otherwise;
/// - inheriting the descriptors in `inherit` (QMP listener, macvtap fds), whose close-on-exec
///   flag is cleared in the child only;
/// - with umask 0177, so that anything QEMU creates by path (the sockets of a QEMU given
///   paths instead of vial's listeners) is 0600 from the moment it exists: whoever connects
///   owns the guest (the QMP monitor can dump its memory). The 9p server sets each file's
///   mode itself, and the console log is vial's pipe.
pub fn spawn_supervised(command: &mut Command, inherit: &[RawFd], user: Option<&Credentials>) -> io::Result<Child> {
    let inherit = inherit.to_vec();
    let user = user.cloned();
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec in the child. It only calls
    // async-signal-safe functions (setpgid, setgroups, setgid, setuid, prctl, umask, getppid,
    // fcntl, kill via nix, which are thin syscall wrappers) and allocates nothing: `inherit`
    // and `user` were copied before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
            // The groups and the gid first, while the process may still change them; the
            // death signal after, since a change of credentials clears it (prctl(2)).
            if let Some(user) = &user {
                nix::unistd::setgroups(&user.groups)?;
                nix::unistd::setgid(user.gid)?;
                nix::unistd::setuid(user.uid)?;
            }
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
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

// TUN/TAP's ioctls (linux/if_tun.h). TUNSETIFF and TUNGETIFF take a `struct ifreq` although
// their request codes encode an int, hence the `_bad` forms with the kernel's own numbers;
// TUNSETIFF also writes the chosen name back.
nix::ioctl_readwrite_bad!(tun_set_iff_raw, nix::libc::TUNSETIFF, nix::libc::ifreq);
nix::ioctl_read_bad!(tun_get_iff_raw, nix::libc::TUNGETIFF, nix::libc::ifreq);
nix::ioctl_read_bad!(tun_get_vnet_hdr_sz_raw, nix::libc::TUNGETVNETHDRSZ, nix::libc::c_int);

fn ifreq_name(name: &str) -> io::Result<[nix::libc::c_char; nix::libc::IFNAMSIZ]> {
    let mut out = [0 as nix::libc::c_char; nix::libc::IFNAMSIZ];
    // The name must leave room for the terminating NUL the kernel expects (IFNAMSIZ = 16).
    if name.len() >= out.len() || name.bytes().any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace()) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    for (slot, byte) in out.iter_mut().zip(name.bytes()) {
        *slot = byte as nix::libc::c_char;
    }
    Ok(out)
}

fn ifreq_name_to_string(name: &[nix::libc::c_char]) -> String {
    let bytes: Vec<u8> = name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `TUNSETIFF` on an open `/dev/net/tun`: attaches `fd` to the TUN/TAP interface `name`
/// (creating it) with `flags` (`IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR`, ...). Returns the name
/// the kernel gave the interface.
pub fn tun_set_iff(fd: BorrowedFd<'_>, name: &str, flags: i16) -> io::Result<String> {
    // SAFETY: ifreq is a plain C struct (a name and a union of integers and arrays); all zero
    // bytes is a valid value of it.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name = ifreq_name(name)?;
    request.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads one `struct ifreq` (and writes the chosen name back into it);
    // `request` is a valid, initialised ifreq that outlives the call, and `fd` is open.
    unsafe { tun_set_iff_raw(fd.as_raw_fd(), &mut request) }.map_err(io::Error::from)?;
    Ok(ifreq_name_to_string(&request.ifr_name))
}

/// `TUNGETIFF`: the interface name and flags a TUN/TAP (or macvtap) descriptor is attached to.
/// QEMU calls this on an inherited `fd=` to learn whether the descriptor has `IFF_VNET_HDR`.
pub fn tun_get_iff(fd: BorrowedFd<'_>) -> io::Result<(String, i16)> {
    // SAFETY: as in `tun_set_iff`, all zero bytes is a valid ifreq.
    let mut request: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `struct ifreq` into `request`, which is valid and writable
    // for the whole call; `fd` is open.
    unsafe { tun_get_iff_raw(fd.as_raw_fd(), &mut request) }.map_err(io::Error::from)?;
    // SAFETY: TUNGETIFF fills `ifru_flags`, the union member read here (an i16 in any case).
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    Ok((ifreq_name_to_string(&request.ifr_name), flags))
}

/// `TUNGETVNETHDRSZ`: the length of the virtio-net header that prefixes every frame read from
/// or written to a TAP or macvtap descriptor that has `IFF_VNET_HDR` (10 until someone, such as
/// QEMU, sets another).
pub fn tun_vnet_hdr_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut len: nix::libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int into `len`, valid for the call; `fd` is open.
    unsafe { tun_get_vnet_hdr_sz_raw(fd.as_raw_fd(), &mut len) }.map_err(io::Error::from)?;
    usize::try_from(len).map_err(|_| io::Error::other(format!("negative vnet header size {len}")))
}

/// Opens an `AF_PACKET` raw socket that sees every frame (any ethertype, both directions) of
/// interface `ifindex` in the calling thread's network namespace, with `PACKET_AUXDATA` on so
/// `packet_recv` can report the VLAN tag the kernel took out of the frame (packet(7)).
pub fn packet_socket(ifindex: u32) -> io::Result<OwnedFd> {
    use nix::libc;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 first: the socket receives nothing until it is bound to the one interface, so
    // no frame of another interface slips in between socket(2) and bind(2) (packet(7)).
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is a plain C struct; all zero bytes is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all;
    address.sll_ifindex =
        i32::try_from(ifindex).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
    // SAFETY: bind(2) reads `size_of::<sockaddr_ll>()` bytes from `address`, a valid
    // sockaddr_ll that outlives the call; the socket is open.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let on: libc::c_int = 1;
    // SAFETY: setsockopt(2) reads one int from `on`, valid for the call; the socket is open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// What `packet_recv` learned about one frame besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The frame's length on the wire (larger than `len` when the buffer was too small).
    pub wire_len: usize,
    /// The frame was sent by this host (`PACKET_OUTGOING`), not received.
    pub outgoing: bool,
    /// The 802.1Q tag (TPID, TCI) the kernel moved out of the frame into metadata, if any.
    pub vlan: Option<(u16, u16)>,
}

/// Receives one frame from a socket made by `packet_socket`. On a blocking socket this waits
/// (up to `SO_RCVTIMEO`); on a non-blocking one it returns `WouldBlock` when none is queued.
pub fn packet_recv(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<PacketMeta> {
    use nix::libc;
    // SAFETY: plain C structs; all zero bytes is a valid value of each.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    // Room for one cmsghdr carrying a tpacket_auxdata, u64-aligned as cmsg(3) requires.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as above.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
    message.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    // socklen_t on musl, size_t on glibc: the cast fits either (the buffer is small).
    message.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `message` (name, one iovec over `buf`, control) points to memory
    // that is valid and writable for the given lengths for the whole call. MSG_TRUNC makes the
    // return value the frame's real length (packet(7)).
    let wire_len = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_TRUNC) };
    if wire_len < 0 {
        return Err(io::Error::last_os_error());
    }
    let wire_len = wire_len as usize;
    let mut vlan = None;
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer the kernel filled, within
    // `msg_controllen`; each header they return lies inside `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&message) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points inside `control` (see above).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_PACKET && header.cmsg_type == libc::PACKET_AUXDATA {
            // SAFETY: a PACKET_AUXDATA message carries one tpacket_auxdata as its data; it may
            // be unaligned for the struct, hence read_unaligned.
            let aux: libc::tpacket_auxdata =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::tpacket_auxdata>()) };
            if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { aux.tp_vlan_tpid } else { 0x8100 };
                vlan = Some((tpid, aux.tp_vlan_tci));
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&message, cmsg) };
    }
    Ok(PacketMeta { len: wire_len.min(buf.len()), wire_len, outgoing: from.sll_pkttype == libc::PACKET_OUTGOING, vlan })
}

/// Registers an owned descriptor with the tokio reactor (it must be non-blocking for the
/// `try_io` pattern to work). Must run inside a tokio runtime.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is a valid open descriptor that stays open, and returns the same
    // number from as_raw_fd, until it is dropped, which the AsyncFd only does on its own drop
    // (or hands it back through into_inner).
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|err| err.into_parts().1)
}
