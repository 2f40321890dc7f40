//! What the end-to-end tests share: the sandbox, polling, HTTP and process helpers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use testkit::sandbox::children;
use testkit::sandbox::{Environment, Layout};
pub use testkit::{wait_until, TempDir};

/// How long a TCG guest may take to become ready on a loaded 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn vial_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vial"))
}

/// The test guest built by `cargo xtask guest`.
pub fn guest_dir() -> PathBuf {
    let dir = repo().join("target/guest/linux");
    assert!(
        dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file(),
        "the test guest is missing in {}: run `cargo xtask guest` (or `cargo xtask test`)",
        dir.display()
    );
    dir
}

/// A fresh directory under target/itest, removed when dropped.
pub fn temp_dir(tag: &str) -> TempDir {
    TempDir::new(&repo().join("target/itest"), tag).unwrap()
}

pub fn ip(args: &[&str]) {
    testkit::sandbox::ip(args).unwrap();
}

/// testkit's endpoint sandbox as the tests use it: the repository's `linux` profile and the
/// built guest, in a temporary directory, with an address in 198.19.X.0/24 picked by pid;
/// `vial`'s log in `vial.log`; every failure a panic.
pub struct Sandbox {
    inner: testkit::sandbox::Sandbox,
    /// Dropped after `inner`, which stops the endpoint that writes there.
    pub dir: TempDir,
}

impl Deref for Sandbox {
    type Target = testkit::sandbox::Sandbox;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Sandbox {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 100_000;
        // 198.18.0.0/15 is set aside for benchmarking networks (RFC 2544): test traffic only.
        let octet = (1 + (pid * 7 + k) % 250) as u8;
        let netns = format!("vialt{pid}x{k}");
        let dir = temp_dir(tag);
        let layout = Layout {
            name: netns.clone(),
            netns,
            host_if: format!("vh{pid}x{k}"),
            host_addr: Ipv4Addr::new(198, 19, octet, 1),
            addr: Ipv4Addr::new(198, 19, octet, 2),
            dir: dir.path().to_path_buf(),
            vial: vial_bin(),
            guest: guest_dir(),
            profile: repo().join("vm-profiles/linux.toml"),
        };
        Sandbox { inner: testkit::sandbox::Sandbox::create(layout).unwrap(), dir }
    }

    /// Starts `vial` in the sandbox with a clean environment, debug logs to `vial.log` and
    /// `extra` settings; `prelude` is shell run in the sandbox before exec (e.g. to hide a
    /// device). Returns the host pid of `vial` (0 when it ended before it was seen).
    pub fn start(&mut self, extra: &[(&str, &str)], prelude: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join("vial.log")).unwrap();
        let mut command = self.command(prelude, Environment::Clean);
        command
            .env("VIAL_LOG", "debug")
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.inner.spawn(command).unwrap()
    }

    /// Waits for the sandbox to end and returns vial's exit status (unshare passes it on).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.inner.wait(timeout).unwrap_or_else(|err| panic!("{err:?}\n--- vial log ---\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vial.log")).unwrap_or_default()
    }

    /// `vial health <args>` from the test's side; (exit code, stdout).
    pub fn health(&self, args: &[&str]) -> (i32, String) {
        self.inner.health(args).unwrap()
    }

    /// The JSON status, when the supervisor answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (_, out) = self.health(&["--status"]);
        serde_json::from_str(out.trim()).ok()
    }

    pub fn wait_ready(&self) {
        let start = std::time::Instant::now();
        loop {
            let (code, out) = self.health(&[]);
            if code == 0 {
                return;
            }
            if start.elapsed() > BOOT_TIMEOUT {
                panic!("not ready after {BOOT_TIMEOUT:?}: {out}\n--- vial log ---\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The endpoint's QEMU processes (their `-name` says `process=qemu-NAME`).
    pub fn qemu_processes(&self) -> Vec<u32> {
        processes_mentioning(&format!("process=qemu-{}", self.name))
    }

    /// What the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("console.log")).unwrap_or_default()
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

/// `/proc/<pid>/stat`'s state letter.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

/// A plain HTTP/1.0 GET; the body when the status is 200.
pub fn http_get(addr: Ipv4Addr, port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&SocketAddrV4::new(addr, port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

/// A bare network namespace the test owns (a lesson peer that is not a VM).
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("vialp{}{tag}{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::SeqCst));
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    /// Runs a command in the namespace; its exit status.
    pub fn exec(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.0])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A veth pair with one end, `name_a`, in namespace `ns_a` and the other, `name_b`, in
/// `ns_b`, both up with `mtu`: a lesson's connection, as a host companion wires it.
pub fn veth_between(ns_a: &str, name_a: &str, ns_b: &str, name_b: &str, mtu: u32) {
    let mtu = mtu.to_string();
    ip(&[
        "link", "add", name_a, "netns", ns_a, "mtu", &mtu, "type", "veth", "peer", "name", name_b, "netns", ns_b,
        "mtu", &mtu,
    ]);
    ip(&["-n", ns_a, "link", "set", name_a, "up"]);
    ip(&["-n", ns_b, "link", "set", name_b, "up"]);
}

/// Sends one QMP command on the endpoint's public monitor (`/run/vial/qmp.sock`), as a person
/// or tool would, and returns QEMU's answer.
pub fn qmp_command(sandbox: &Sandbox, command: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(sandbox.run_dir.join("qmp.sock")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // the greeting
    let mut writer = stream;
    for execute in ["qmp_capabilities", command] {
        writeln!(writer, "{{\"execute\":\"{execute}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    }
    line
}
