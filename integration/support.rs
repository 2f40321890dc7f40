//! What the end-to-end tests share: the sandbox, polling, HTTP and process helpers.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a TCG guest may take to become ready on a loaded 2-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Polls `condition` every 100 ms until it holds or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

/// A fresh directory under target/ that is removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = repo().join("target/itest").join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    let output = cmd.output().unwrap_or_else(|err| panic!("{cmd:?}: {err}"));
    assert!(output.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// An endpoint sandbox: a network namespace whose eth0 is a veth from the test's namespace,
/// a lesson directory, a run directory and the `linux` profile bundle.
pub struct Sandbox {
    pub netns: String,
    host_if: String,
    pub addr: Ipv4Addr,
    pub dir: TempDir,
    pub lesson: PathBuf,
    pub run_dir: PathBuf,
    pub profile: PathBuf,
    child: Option<Child>,
}

impl Sandbox {
    pub fn new(tag: &str) -> Sandbox {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 100_000;
        // 198.18.0.0/15 is set aside for benchmarking networks (RFC 2544): test traffic only.
        let octet = 1 + (pid * 7 + k) % 250;
        let netns = format!("vialt{pid}x{k}");
        let host_if = format!("vh{pid}x{k}");
        let dir = TempDir::new(tag);
        let lesson = dir.path().join("lesson");
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&lesson).unwrap();
        let host_addr = format!("198.19.{octet}.1/24");
        let addr = Ipv4Addr::new(198, 19, octet as u8, 2);
        let _ = Command::new("ip").args(["netns", "del", &netns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &netns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
        ip(&["addr", "add", &host_addr, "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        // The profile bundle: the repository's linux profile beside the built guest.
        let bundle = dir.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        std::os::unix::fs::symlink(guest_dir(), bundle.join("guest")).unwrap();
        let profile = bundle.join("profile.toml");
        std::fs::copy(repo().join("vm-profiles/linux.toml"), &profile).unwrap();
        Sandbox { netns, host_if, addr, dir, lesson, run_dir, profile, child: None }
    }

    /// The environment every test run of `vial` gets.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("VIAL_PROFILE", self.profile.display().to_string()),
            ("VIAL_RUN_DIR", self.run_dir.display().to_string()),
            ("VIAL_STATE_DIR", self.dir.path().join("state").display().to_string()),
            ("VIAL_LESSON_DIR", self.lesson.display().to_string()),
            ("VIAL_ACCEL", "tcg".into()),
            ("VIAL_NAME", self.netns.clone()),
            ("VIAL_LOG", "debug".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts `vial` as PID 1 of new PID and mount namespaces inside the network namespace,
    /// with `extra` environment. `prelude` is shell run in the sandbox before exec (e.g. to
    /// hide a device). Returns the host pid of `vial`.
    pub fn start(&mut self, extra: &[(&str, &str)], prelude: &str) -> u32 {
        let log = std::fs::File::create(self.dir.path().join("vial.log")).unwrap();
        let script = format!("{prelude}\nexec \"$0\" \"$@\"");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--kill-child",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .arg(vial_bin())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(self.env())
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        let child = cmd.spawn().expect("spawn ip netns exec unshare");
        let unshare = child.id();
        let child = self.child.insert(child);
        // `unshare --fork` makes vial its child; find its pid as the host sees it. A vial that
        // fails at once may be gone before it is seen: then there is no pid to return (0).
        wait_until(Duration::from_secs(10), "vial to start in the sandbox", || {
            children(unshare).first().copied().or_else(|| child.try_wait().unwrap().map(|_| 0))
        })
    }

    /// Waits for the sandbox to end and returns vial's exit status (unshare passes it on).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("started");
        wait_until(timeout, "vial to exit", || child.try_wait().unwrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vial.log")).unwrap_or_default()
    }

    /// `vial health <args>` from the test's side; (exit code, stdout).
    pub fn health(&self, args: &[&str]) -> (i32, String) {
        let output =
            Command::new(vial_bin()).arg("health").args(args).env("VIAL_RUN_DIR", &self.run_dir).output().unwrap();
        (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).to_string())
    }

    /// The JSON status, when the supervisor answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (_, out) = self.health(&["--status"]);
        serde_json::from_str(out.trim()).ok()
    }

    pub fn wait_ready(&self) {
        let start = Instant::now();
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
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SIGKILL to unshare; --kill-child then kills vial, and the PID namespace with it.
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

/// Direct children of `pid`, as the host sees them.
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                found.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    found
}

/// Processes whose command line mentions `needle` (QEMU's mentions its run directory).
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

impl Sandbox {
    /// What the guest printed on its serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("console.log")).unwrap_or_default()
    }
}
