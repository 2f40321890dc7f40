//! `cargo xtask guest`: build the `linux` test guest into `target/guest/linux/`.
//!
//! The guest is made only from Debian packages already on the host, so it needs no network
//! and no image downloads: `vmlinuz` is the newest installed Debian kernel, `initrd.img` is
//! an initramfs holding busybox-static, the few kernel modules the guest needs and an
//! `/init` script. It boots straight from the initramfs (there is no root disk) and:
//!
//! - mounts the 9p share with mount tag `antidote` (the lesson directory) at `/antidote`;
//! - brings up the NICs, names them eth0, eth1, ... in PCI address order and configures
//!   eth0, the management NIC, with DHCP;
//! - runs `/antidote/guest-init.sh` if present (tests use it to address data NICs), and
//!   `/antidote/guest-hotplug.sh <iface>` for each NIC hot-plugged later;
//! - when the share is hot-plugged instead (after vial loads a RAM snapshot made without
//!   it), mounts it then, restarts httpd on it and runs `guest-init.sh`;
//! - serves `/antidote` over HTTP on port 80;
//! - powers off on the ACPI power button (QMP `system_powerdown`) unless
//!   `/antidote/ignore-power-button` exists;
//! - prints `vial-guest: ready` on the serial console and keeps a root shell there.
//!
//! The guest's scripts and its inittab are files of their own in `xtask/guest/linux/`,
//! compiled in with `include_str!` (and checked by `cargo xtask lint`).
//!
//! Outputs: `vmlinuz` (a copy of Debian's bzImage), `initrd.img`, and `vmlinux`, the same
//! kernel uncompressed, which QEMU can boot directly (PVH) ~3 s faster under TCG; either
//! works with the same `-initrd` and `-append`.
//!
//! Boot it like the vial supervisor does:
//!
//! ```text
//! qemu-system-x86_64 -machine pc -accel tcg -cpu max -m 256M -smp 1 -nodefaults \
//!   -no-user-config -display none -kernel target/guest/linux/vmlinuz \
//!   -initrd target/guest/linux/initrd.img -append "console=ttyS0 quiet panic=-1" \
//!   -serial stdio -netdev user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:18080-:80 \
//!   -device virtio-net-pci,netdev=mgmt \
//!   -fsdev local,id=antidote,path=/tmp/lesson,security_model=none,readonly=on \
//!   -device virtio-9p-pci,fsdev=antidote,mount_tag=antidote -no-reboot
//! ```

use std::{
    cmp::Ordering,
    collections::{BTreeSet, HashMap, HashSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::UNIX_EPOCH,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{dist, project_root};

/// Part of the cache key. Bump it whenever this file changes how the guest is assembled in
/// a way the other hashed inputs (kernel, busybox, scripts, module list) do not capture.
const GUEST_VERSION: u32 = 4;

/// The Debian packages the guest is built from. xz-utils unpacks Debian's xz-compressed
/// kernel into `vmlinux` (see [`extract_vmlinux`]). The initramfs is written without
/// cpio(1) and modules.dep is read without kmod, so neither is needed.
const APT_PACKAGES: &str = "linux-image-amd64 busybox-static xz-utils";

/// Kernel modules the guest needs, by module name. Whether each one is built into the
/// kernel or a loadable module (and what it depends on) is looked up in the installed
/// kernel's modules.builtin / modules.dep at build time, never assumed.
///
/// The power button ones are loaded first and acpid is started right after them, before
/// the rest: a power button press that arrives before that is lost (nothing in the
/// kernel remembers it), so the window for that is kept as short as possible.
const EARLY_MODULES: &[(&str, &str)] = &[
    ("button", "ACPI power button, turns QMP system_powerdown into a KEY_POWER event"),
    ("evdev", "/dev/input/event*, which busybox acpid reads KEY_POWER from"),
];
const MODULES: &[(&str, &str)] = &[
    ("virtio_pci", "PCI transport for the virtio-net and virtio-9p devices"),
    ("virtio_net", "virtio-net-pci NICs (management and data links)"),
    ("e1000", "e1000 NICs, used by some VM profiles"),
    ("9pnet_virtio", "9p transport over virtio, for the `antidote` share"),
    ("9p", "the 9p filesystem itself (pulls in 9pnet, netfs, fscache as needed)"),
];

/// Busybox applets that get a symlink in /bin, separated by whitespace. The first group is
/// what the scripts below use (checked against `busybox --list` at build time so a busybox
/// built without one of them fails here, not in a guest that silently does not power off);
/// the second makes the serial console shell usable for debugging.
const APPLETS: [&str; 2] = [
    "sh mount umount mkdir insmod ip readlink sort cut grep cat sleep udhcpc httpd acpid init
     cttyhack sync poweroff hostname uevent",
    "ls ps dmesg ping wget nc vi less free top kill lsmod modprobe rmmod reboot halt df cp mv rm
     ln find head tail wc tr sed awk uname netstat route ifconfig arp traceroute nslookup touch
     chmod date uptime env which stat hexdump tee",
];

fn applets() -> impl Iterator<Item = &'static str> {
    APPLETS.iter().flat_map(|group| group.split_whitespace())
}

/// PID 1. It does the whole setup itself, in order, so "ready" means ready, and then execs
/// busybox init: a shell as PID 1 does not reap orphaned daemons' children and cannot
/// respawn the console shell, busybox init does both.
const INIT: &str = include_str!("../guest/linux/init.sh");

/// busybox init's configuration. Everything is already up when it starts (see INIT).
const INITTAB: &str = include_str!("../guest/linux/inittab");

/// Run by udhcpc on lease events with the lease in the environment (`$interface`, `$ip`,
/// `$mask` as a prefix length, `$router`, `$dns`, `$domain`).
const UDHCPC_SCRIPT: &str = include_str!("../guest/linux/udhcpc.sh");

/// busybox acpid runs `/etc/acpi/PWRF/00000080` on KEY_POWER (its built-in tables, no
/// config file needed). The ignore file is checked at press time so tests can also create
/// it while the guest runs.
const POWER_BUTTON: &str = include_str!("../guest/linux/power-button.sh");

/// Run by busybox `uevent` for each kernel uevent, with the event in the environment. A NIC
/// that appears after boot (a hot-plugged data link) is brought up like the data NICs at
/// boot, then `/antidote/guest-hotplug.sh <interface>` runs if present (tests use it to give
/// the new NIC an address).
const HOTPLUG: &str = include_str!("../guest/linux/hotplug.sh");

const PROFILE: &str = include_str!("../guest/linux/profile.sh");

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n";
const GROUP: &str = "root:x:0:\n";

/// Builds the guest if its inputs changed and returns the directory holding `vmlinuz` and
/// `initrd.img`.
pub(crate) fn run() -> Result<PathBuf> {
    let out_dir = project_root().join("target").join("guest").join("linux");
    let kernel = find_kernel()?;
    let busybox_path = find_busybox()?;
    let busybox = fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;
    let modules = resolve_modules(&kernel)?;

    let stamp = stamp(&kernel, &busybox, &modules)?;
    let stamp_path = out_dir.join(".stamp");
    let outputs_exist = out_dir.join("vmlinuz").is_file()
        && out_dir.join("initrd.img").is_file()
        && (!kernel.pvh || out_dir.join("vmlinux").is_file());
    if outputs_exist && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        println!("{} is up to date (kernel {})", out_dir.display(), kernel.version);
        return Ok(out_dir);
    }

    // A static busybox is the whole userland; a dynamic one (Debian's `busybox` package
    // also installs /bin/busybox) would not find its libc in the initramfs.
    dist::check_static(&busybox_path)
        .context("the guest needs a statically linked busybox: apt-get install busybox-static")?;
    check_applets(&busybox_path)?;

    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    // Remove the stamp first: if the build fails halfway, the next run must rebuild.
    match fs::remove_file(&stamp_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", stamp_path.display()));
        }
        _ => {}
    }

    let vmlinuz = fs::read(&kernel.vmlinuz).with_context(|| {
        format!("reading {} (Debian may install it readable by root only: run as root)", kernel.vmlinuz.display())
    })?;
    write_atomically(&out_dir.join("vmlinuz"), &vmlinuz)?;
    let vmlinux_path = out_dir.join("vmlinux");
    let vmlinux = if kernel.pvh {
        let vmlinux = extract_vmlinux(&vmlinuz).with_context(|| {
            format!(
                "extracting the uncompressed kernel (for {}) from {}",
                vmlinux_path.display(),
                kernel.vmlinuz.display()
            )
        })?;
        write_atomically(&vmlinux_path, &vmlinux)?;
        Some(vmlinux.len())
    } else {
        // Do not leave a vmlinux of an older kernel next to the new vmlinuz.
        let _ = fs::remove_file(&vmlinux_path);
        None
    };
    let initrd = build_initrd(&kernel, &busybox, &modules)?;
    write_atomically(&out_dir.join("initrd.img"), &initrd)?;
    write_atomically(&stamp_path, stamp.as_bytes())?;

    println!("built {} from kernel {}", out_dir.display(), kernel.version);
    let builtin: Vec<&str> = modules.builtin.iter().map(String::as_str).collect();
    let loaded: Vec<&str> = modules.early.iter().chain(&modules.rest).map(|m| module_name(m)).collect();
    println!("  built into the kernel: {}", if builtin.is_empty() { "-".into() } else { builtin.join(" ") });
    println!("  loaded by /init:       {}", loaded.join(" "));
    println!("  vmlinuz {} bytes, initrd.img {} bytes (uncompressed newc cpio)", vmlinuz.len(), initrd.len());
    match vmlinux {
        Some(len) => {
            println!("  vmlinux {len} bytes (same kernel, uncompressed, PVH entry: boots ~3 s faster under TCG)")
        }
        None => println!("  no vmlinux: kernel {} is not built with CONFIG_PVH=y", kernel.version),
    }
    Ok(out_dir)
}

struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    modules_dir: PathBuf,
    /// Built with CONFIG_PVH=y, i.e. QEMU can boot its uncompressed ELF image directly.
    pvh: bool,
}

/// The newest installed Debian amd64 kernel that has its modules installed. Cloud kernels
/// (`-cloud-amd64`) are skipped: they lack drivers the guest may need (e.g. e1000).
fn find_kernel() -> Result<Kernel> {
    let mut found: Vec<Kernel> = Vec::new();
    let entries = fs::read_dir("/boot").map_err(|e| missing_packages(&format!("cannot list /boot: {e}")))?;
    for entry in entries {
        let name = entry.context("listing /boot")?.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("vmlinuz-")) else { continue };
        if !version.ends_with("-amd64") || version.contains("-cloud-") {
            continue;
        }
        let modules_dir = Path::new("/lib/modules").join(version);
        if !modules_dir.join("modules.dep").is_file() {
            eprintln!("note: skipping kernel {version}: {} is missing", modules_dir.join("modules.dep").display());
            continue;
        }
        // Debian installs the kernel's config next to it; without it, assume no PVH.
        let config = fs::read_to_string(Path::new("/boot").join(format!("config-{version}"))).unwrap_or_default();
        let pvh = config.lines().any(|l| l == "CONFIG_PVH=y");
        found.push(Kernel { version: version.to_owned(), vmlinuz: Path::new("/boot").join(&name), modules_dir, pvh });
    }
    found
        .into_iter()
        .max_by(|a, b| version_cmp(&a.version, &b.version))
        .ok_or_else(|| missing_packages("no Debian amd64 kernel (/boot/vmlinuz-*-amd64 with modules) is installed"))
}

fn find_busybox() -> Result<PathBuf> {
    let path = PathBuf::from("/bin/busybox");
    if !path.is_file() {
        return Err(missing_packages("/bin/busybox does not exist"));
    }
    Ok(path)
}

fn missing_packages(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot build the test guest: {what}.\n\
         It is built from Debian packages only; install them with:\n    apt-get install -y {APT_PACKAGES}"
    )
}

/// Compares kernel versions like `6.1.0-9-amd64` < `6.1.0-56-amd64`: digit runs compare as
/// numbers, everything else as text.
fn version_cmp(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (a, b) = (chunks(a), chunks(b));
    for (x, y) in a.iter().zip(&b) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.len().cmp(&b.len())
}

struct Modules {
    /// Names of the wanted modules that are built into the kernel.
    builtin: Vec<String>,
    /// Module files to insmod for EARLY_MODULES and then for MODULES, relative to the
    /// modules dir as in modules.dep, dependencies before the modules that need them.
    early: Vec<String>,
    rest: Vec<String>,
    /// modules.dep, parsed: module path -> the paths it depends on.
    deps: HashMap<String, Vec<String>>,
}

/// Module names treat `-` and `_` as the same character; file names use either.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.find(".ko").map_or(file, |i| &file[..i])
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn resolve_modules(kernel: &Kernel) -> Result<Modules> {
    let read = |file: &str| {
        let path = kernel.modules_dir.join(file);
        fs::read_to_string(&path)
            .with_context(|| format!("reading {} (regenerate it with `depmod {}`)", path.display(), kernel.version))
    };
    let builtin_names: HashSet<String> = read("modules.builtin")?.lines().map(|l| normalize(module_name(l))).collect();
    let mut deps = HashMap::new();
    let mut by_name = HashMap::new();
    for line in read("modules.dep")?.lines() {
        let Some((path, rest)) = line.split_once(':') else { continue };
        by_name.insert(normalize(module_name(path)), path.to_owned());
        deps.insert(path.to_owned(), rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
    }

    fn visit(path: &str, deps: &HashMap<String, Vec<String>>, seen: &mut HashSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, seen, order);
        }
        order.push(path.to_owned());
    }

    let mut builtin = Vec::new();
    let mut seen = HashSet::new();
    let (mut early, mut rest) = (Vec::new(), Vec::new());
    for (wanted, load_order) in [(EARLY_MODULES, &mut early), (MODULES, &mut rest)] {
        for (name, why) in wanted {
            if builtin_names.contains(&normalize(name)) {
                builtin.push(name.to_string());
            } else if let Some(path) = by_name.get(&normalize(name)) {
                visit(path, &deps, &mut seen, load_order);
            } else {
                bail!(
                    "kernel {} has no module `{name}` ({why}): it is neither in modules.builtin nor \
                     in modules.dep under {}",
                    kernel.version,
                    kernel.modules_dir.display()
                );
            }
        }
    }
    Ok(Modules { builtin, early, rest, deps })
}

/// The cache key: a hash of everything the output is made from. Files that are large and
/// only change with a package upgrade (vmlinuz, modules) are represented by their size and
/// mtime, which keeps a no-op run fast; busybox is small enough to hash whole.
fn stamp(kernel: &Kernel, busybox: &[u8], modules: &Modules) -> Result<String> {
    let mut h = Fnv64::new();
    h.field(&GUEST_VERSION.to_le_bytes());
    h.field(kernel.version.as_bytes());
    h.field(&[u8::from(kernel.pvh)]);
    h.field(file_identity(&kernel.vmlinuz)?.as_bytes());
    h.field(busybox);
    for text in [INIT, INITTAB, UDHCPC_SCRIPT, POWER_BUTTON, HOTPLUG, PROFILE, PASSWD, GROUP] {
        h.field(text.as_bytes());
    }
    for applet in applets() {
        h.field(applet.as_bytes());
    }
    for (name, _) in EARLY_MODULES.iter().chain(MODULES) {
        h.field(name.as_bytes());
    }
    for path in modules.early.iter().chain(&modules.rest) {
        h.field(path.as_bytes());
        h.field(file_identity(&kernel.modules_dir.join(path))?.as_bytes());
    }
    Ok(format!("{:016x}\n", h.0))
}

fn file_identity(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("reading metadata of {}", path.display()))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    Ok(format!("{} {}.{:09}", meta.len(), mtime.as_secs(), mtime.subsec_nanos()))
}

/// FNV-1a, 64 bit: a stable hash in a few lines (std's `DefaultHasher` may change between
/// Rust releases, which would invalidate every cache on a toolchain update). Collision
/// resistance against an adversary is not needed for a build cache.
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// Length-prefixed, so that ("ab", "c") and ("a", "bc") hash differently.
    fn field(&mut self, bytes: &[u8]) {
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }
}

/// Fails if the host's busybox lacks an applet the guest uses.
fn check_applets(busybox: &Path) -> Result<()> {
    let mut cmd = Command::new(busybox);
    cmd.arg("--list");
    let output = cmd.output().with_context(|| format!("running `{}`", crate::display_cmd(&cmd)))?;
    ensure!(output.status.success(), "`{}` failed ({})", crate::display_cmd(&cmd), output.status);
    let list = String::from_utf8_lossy(&output.stdout);
    let have: HashSet<&str> = list.lines().collect();
    let missing: Vec<&str> = applets().filter(|a| !have.contains(a)).collect();
    ensure!(
        missing.is_empty(),
        "{} lacks the applets {} that the guest uses; install Debian's busybox-static",
        busybox.display(),
        missing.join(" ")
    );
    Ok(())
}

/// Assembles the initramfs.
///
/// It is an uncompressed newc cpio archive. Under TCG every instruction the guest kernel
/// runs is emulated, so decompressing the initramfs is slow CPU work, while QEMU copies the
/// file into guest RAM at host speed. Measured on the 2-core build machine: the kernel
/// unpacks this 3.5 MiB archive in ~0.06 s, the gzip -9 version (1.4 MiB) in 0.12-0.15 s.
/// A gain of well under a tenth of a second, but it also saves a compressor; the size
/// (a few MiB on the host disk) does not matter.
///
/// The archive is written by hand rather than with cpio(1): that needs no staging
/// directory, can contain /dev/console without root's mknod (the kernel opens it for
/// /init's stdin/stdout/stderr before devtmpfs is mounted), and is byte-for-byte
/// reproducible (all mtimes 0, owner root).
fn build_initrd(kernel: &Kernel, busybox: &[u8], modules: &Modules) -> Result<Vec<u8>> {
    let kmod_dir = format!("lib/modules/{}", kernel.version);
    let mut cpio = Cpio::default();

    let mut dirs: BTreeSet<String> = [
        "bin",
        "dev",
        "etc",
        "etc/acpi",
        "etc/acpi/PWRF",
        "proc",
        "sys",
        "run",
        "root",
        "antidote",
        "usr",
        "var",
        "var/log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut module_files = Vec::new();
    for path in modules.early.iter().chain(&modules.rest) {
        let dest = format!("{kmod_dir}/{}", uncompressed_name(path));
        let mut parent = Path::new(&dest).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        module_files.push((dest, read_module(&kernel.modules_dir.join(path))?));
    }
    // BTreeSet order puts every directory after its parent, as the kernel needs.
    for dir in &dirs {
        cpio.dir(dir, 0o755);
    }
    cpio.dir("tmp", 0o1777);
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.symlink("sbin", "bin");
    cpio.symlink("usr/bin", "../bin");
    cpio.symlink("usr/sbin", "../bin");
    cpio.symlink("var/run", "../run");

    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, busybox);
    for applet in applets() {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    cpio.file("etc/inittab", 0o644, INITTAB.as_bytes());
    cpio.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes());
    cpio.file("etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON.as_bytes());
    cpio.file("etc/vial-hotplug", 0o755, HOTPLUG.as_bytes());
    cpio.file("etc/profile", 0o644, PROFILE.as_bytes());
    cpio.file("etc/passwd", 0o644, PASSWD.as_bytes());
    cpio.file("etc/group", 0o644, GROUP.as_bytes());

    for (list, file) in [(&modules.early, "etc/vial-modules.early"), (&modules.rest, "etc/vial-modules")] {
        let mut load_list = String::new();
        for path in list {
            writeln!(load_list, "/{kmod_dir}/{}", uncompressed_name(path))?;
        }
        cpio.file(file, 0o644, load_list.as_bytes());
    }
    // A modules.dep for just these modules, so `modprobe` works on the console too.
    let mut modules_dep = String::new();
    for path in modules.early.iter().chain(&modules.rest) {
        let deps: Vec<&str> = modules.deps[path].iter().map(|d| uncompressed_name(d)).collect();
        writeln!(modules_dep, "{}: {}", uncompressed_name(path), deps.join(" "))?;
    }
    cpio.file(&format!("{kmod_dir}/modules.dep"), 0o644, modules_dep.as_bytes());
    for (dest, bytes) in &module_files {
        cpio.file(dest, 0o644, bytes);
    }
    Ok(cpio.finish())
}

/// Extracts the uncompressed kernel ELF (`vmlinux`) from a bzImage.
///
/// Why: under TCG the kernel's own decompressor is emulated instruction by instruction and
/// inflating Debian's ~8 MiB xz bzImage to ~63 MiB takes about 3 s of every boot, more
/// than the rest of the kernel's boot. A kernel built with CONFIG_PVH=y carries a PVH
/// entry point note, and QEMU boots such an uncompressed ELF directly with `-kernel`
/// (also with `-initrd` and `-append`), skipping the decompressor. So we decompress once
/// here, on the host, at native speed.
///
/// Layout (Documentation/arch/x86/boot.rst): the compressed payload starts at
/// `(setup_sects + 1) * 512 + payload_offset` and is `payload_length` bytes long; the
/// kernel's build appends the decompressed size as 4 trailing bytes, which xz and friends
/// would reject as garbage.
fn extract_vmlinux(bzimage: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |off: usize| -> Result<u32> {
        let bytes = bzimage.get(off..off + 4).context("bzImage header truncated")?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    };
    ensure!(bzimage.get(0x202..0x206) == Some(b"HdrS"), "not a bzImage (no HdrS signature)");
    let protocol = u16::from_le_bytes([bzimage[0x206], bzimage[0x207]]);
    ensure!(protocol >= 0x208, "boot protocol {protocol:#x} is older than 2.08, which added payload_offset");
    let setup_sects = match bzimage[0x1f1] {
        0 => 4, // "if this field is 0, the real value is 4"
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = bzimage.get(start..start + len).context("bzImage payload extends past the end of the file")?;
    let payload = &payload[..len.saturating_sub(4)];
    let (tool, package) = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", "xz-utils"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", "zstd"),
        [0x1f, 0x8b, ..] => ("gzip", "gzip"),
        _ => bail!("unsupported kernel compression (payload starts with {:02x?})", &payload[..payload.len().min(6)]),
    };
    let vmlinux = decompress(tool, package, payload)?;
    ensure!(vmlinux.starts_with(b"\x7fELF"), "the decompressed kernel is not an ELF file");
    Ok(vmlinux)
}

/// Runs `tool -dc` with `input` on stdin. Busybox's own xz cannot do this: it lacks the
/// x86 BCJ filter that kernel images are compressed with.
fn decompress(tool: &str, package: &str, input: &[u8]) -> Result<Vec<u8>> {
    use std::{io::Write, process::Stdio};
    let mut cmd = Command::new(tool);
    cmd.arg("-dc").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running `{tool} -dc` (apt-get install {package})"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Feed stdin from another thread: the child blocks writing stdout until we read it.
    let (written, output) = std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        let output = child.wait_with_output();
        (writer.join().expect("stdin writer panicked"), output)
    });
    let output = output.with_context(|| format!("waiting for `{tool} -dc`"))?;
    ensure!(
        output.status.success(),
        "`{tool} -dc` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    written.with_context(|| format!("writing to `{tool} -dc`"))?;
    Ok(output.stdout)
}

/// Debian 12's kernels ship plain `.ko` files, but other kernels compress them; busybox
/// insmod cannot load compressed modules, so they are decompressed at build time.
fn uncompressed_name(path: &str) -> &str {
    [".xz", ".zst", ".gz"].iter().find_map(|ext| path.strip_suffix(ext)).unwrap_or(path)
}

fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let (tool, package) = if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if name.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if name.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let mut cmd = Command::new(tool);
    cmd.arg("-dc").arg(path);
    let output =
        cmd.output().with_context(|| format!("running `{}` (apt-get install {package})", crate::display_cmd(&cmd)))?;
    ensure!(
        output.status.success(),
        "`{}` failed ({}): {}",
        crate::display_cmd(&cmd),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output.stdout)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Writer for the "newc" cpio format the kernel unpacks initramfs from
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str, perm: u32) {
        self.entry(name, 0o040_000 | perm, 2, (0, 0), &[]);
    }
    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, 1, (0, 0), data);
    }
    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, 1, (0, 0), target.as_bytes());
    }
    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, 1, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1, // namesize, including the NUL
            0,                     // check
        ];
        self.buf.extend_from_slice(b"070701");
        for field in fields {
            self.buf.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_compare_numerically() {
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-56-amd64"), Ordering::Less);
        assert_eq!(version_cmp("6.10.0-1-amd64", "6.9.0-3-amd64"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.0-56-amd64", "6.1.0-56-amd64"), Ordering::Equal);
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(uncompressed_name("kernel/fs/9p/9p.ko.xz"), "kernel/fs/9p/9p.ko");
        assert_eq!(uncompressed_name("kernel/fs/9p/9p.ko"), "kernel/fs/9p/9p.ko");
    }

    /// The archive must be readable by a real cpio implementation, byte for byte.
    #[test]
    fn cpio_round_trips_through_busybox_cpio() {
        let mut cpio = Cpio::default();
        cpio.dir("d", 0o755);
        cpio.file("d/f", 0o644, b"hello\n");
        cpio.file("d/odd", 0o755, b"12345");
        cpio.symlink("d/l", "f");
        let archive = cpio.finish();
        assert_eq!(archive.len() % 4, 0);

        let dir = std::env::temp_dir().join(format!("xtask-cpio-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.cpio"), &archive).unwrap();
        let status = Command::new("/bin/busybox")
            .args(["cpio", "-i", "-d", "-F", "a.cpio"])
            .current_dir(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("running /bin/busybox (apt-get install busybox-static)");
        assert!(status.success());
        assert_eq!(fs::read(dir.join("d/f")).unwrap(), b"hello\n");
        assert_eq!(fs::read(dir.join("d/odd")).unwrap(), b"12345");
        assert_eq!(fs::read_link(dir.join("d/l")).unwrap(), Path::new("f"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A fake bzImage: the offset arithmetic and the 4-byte size trailer must be right for
    /// the decompressor to accept the payload.
    #[test]
    fn extracts_payload_from_bzimage() {
        let elf = b"\x7fELF and the rest of a kernel".to_vec();
        let mut gzip = Command::new("gzip")
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut gzip.stdin.take().unwrap(), &elf).unwrap();
        let mut payload = gzip.wait_with_output().unwrap().stdout;
        payload.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // the kernel's size_append

        let setup_sects = 3u8;
        let payload_offset = 100u32;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload_offset as usize];
        image[0x1f1] = setup_sects;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        image[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&payload);
        image.extend_from_slice(b"trailing setup data");
        assert_eq!(extract_vmlinux(&image).unwrap(), elf);

        image[0x202] = b'X';
        assert!(extract_vmlinux(&image).is_err());
    }

    /// Resolves the real module list against the installed kernel: every load list must
    /// put a module's dependencies before it.
    #[test]
    fn resolves_modules_of_installed_kernel() {
        let kernel = find_kernel().unwrap();
        let modules = resolve_modules(&kernel).unwrap();
        let order: Vec<&str> = modules.early.iter().chain(&modules.rest).map(String::as_str).collect();
        for (i, path) in order.iter().enumerate() {
            for dep in &modules.deps[*path] {
                let pos = order.iter().position(|p| p == dep).expect("dependency is loaded");
                assert!(pos < i, "{dep} must be loaded before {path}");
            }
        }
        for (name, _) in EARLY_MODULES.iter().chain(MODULES) {
            let loaded = order.iter().any(|p| normalize(module_name(p)) == normalize(name));
            assert!(loaded || modules.builtin.iter().any(|b| b == name), "{name} is neither loaded nor built in");
        }
    }

    /// The scripts are plain text in `xtask/guest/linux/`; at least make sure busybox `sh` can
    /// parse them (shellcheck, in `cargo xtask lint`, checks more but is not busybox).
    #[test]
    fn scripts_parse() {
        for (name, script) in
            [("INIT", INIT), ("UDHCPC_SCRIPT", UDHCPC_SCRIPT), ("POWER_BUTTON", POWER_BUTTON), ("HOTPLUG", HOTPLUG)]
        {
            let out = Command::new("/bin/busybox").args(["sh", "-n", "-c", script]).output().unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
