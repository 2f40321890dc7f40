//! The first boot of an appliance at image build time (Stage 1): QEMU boots the appliance's
//! disk once, under TCG unless `VIAL_ACCEL=kvm`, and the profile's `[[first_boot]]` steps drive
//! its serial console the way a person at the console would: wait for a pattern, type a line.
//! The steps' last line powers the guest off; the disk it leaves behind is what the image ships.
//!
//! The console is a Unix socket chardev that QEMU serves with `wait=on`, so QEMU does not start
//! the guest before this side is connected and no byte of the boot is lost. Everything the
//! console prints goes to `first-boot.log` in the work directory, as it arrives. Patterns are
//! matched against that text with ANSI escape sequences and carriage returns removed, each
//! search starting after the previous step's match (as `expect` does), so a prompt that was
//! already seen is never matched twice.
//!
//! A step whose pattern does not appear within its timeout fails the build with the step's
//! name, the pattern, and the last lines of the console. This module never edits a disk
//! itself and never knows what an appliance is; the profile's steps say everything.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vial::config::profile::{Boot, Disk, FirstBootStep};
use vial::config::Profile;

/// How many console lines a failure shows.
const TAIL_LINES: usize = 40;

/// How long QEMU may take to start serving the console socket.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the guest gets to power off after the last step.
pub(crate) const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(180);

/// One first boot: the appliance's hardware from its profile, its files on this machine.
pub(crate) struct FirstBoot<'a> {
    /// Machine, NICs, extra arguments and the steps.
    pub profile: &'a Profile,
    /// Kernel boot, with paths on this machine (the profile's are the image's).
    pub boot: Option<Boot>,
    /// The disks, on this machine; written in place.
    pub disks: Vec<Disk>,
    /// Where the console socket, `first-boot.log` and `qemu.log` go.
    pub work: PathBuf,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The steps to run (the profile's, normally).
    pub steps: Vec<FirstBootStep>,
}

impl FirstBoot<'_> {
    /// The transcript of the console.
    pub(crate) fn transcript(&self) -> PathBuf {
        self.work.join("first-boot.log")
    }

    fn console_socket(&self) -> PathBuf {
        self.work.join("console.sock")
    }

    /// The QEMU command line: the profile's machine without vial's runtime parts (no
    /// forwards, no lesson share, no QMP), the disks written directly, the console on a
    /// socket QEMU waits on.
    pub(crate) fn argv(&self) -> Vec<String> {
        let profile = self.profile;
        let cpu = if profile.cpu == "host" && self.accel == "tcg" { "max" } else { profile.cpu.as_str() };
        let mut args: Vec<String> = vec![profile.qemu.clone()];
        let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &format!("vial-first-boot-{}", profile.name)]);
        push(&["-machine", &profile.machine_type, "-accel", &self.accel, "-cpu", cpu]);
        push(&["-m", &profile.memory_mib.to_string(), "-smp", &profile.vcpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        if let Some(boot) = &self.boot {
            push(&["-kernel", &qemu_path(&boot.kernel)]);
            if let Some(initrd) = &boot.initrd {
                push(&["-initrd", &qemu_path(initrd)]);
            }
            if !boot.append.is_empty() {
                push(&["-append", &boot.append]);
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            push(&[
                "-drive",
                &format!(
                    "file={},format={},if={},index={i},cache=writeback",
                    qemu_path(&disk.path),
                    disk.format,
                    disk.interface
                ),
            ]);
        }
        // The management NIC, as the endpoint will have it, so the guest configures the NIC
        // it will really have; no egress, nothing is downloaded at first boot.
        let mut netdev = String::from("user,id=mgmt,restrict=on");
        if let Some((net, prefix)) = profile.user_net {
            netdev.push_str(&format!(",net={net}/{prefix}"));
        }
        push(&["-netdev", &netdev, "-device", &format!("{},netdev=mgmt", profile.nic_model)]);
        for _ in 0..profile.reserved_nics {
            push(&["-device", &profile.nic_model]);
        }
        push(&[
            "-chardev",
            &format!("socket,id=console,path={},server=on,wait=on", qemu_path(&self.console_socket())),
            "-serial",
            "chardev:console",
        ]);
        args.extend(profile.extra_args.iter().cloned());
        args
    }

    /// Boots, runs the steps, waits for the power-off. QEMU is killed on any failure.
    pub(crate) fn run(&self) -> Result<()> {
        fs::create_dir_all(&self.work)?;
        let socket = self.console_socket();
        let _ = fs::remove_file(&socket);
        let argv = self.argv();
        let qemu_log = self.work.join("qemu.log");
        let log = File::create(&qemu_log)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        println!("first boot: {}", crate::display_cmd(&cmd));
        let mut qemu = Qemu(cmd.spawn().with_context(|| format!("starting {}", argv[0]))?);
        let started = Instant::now();

        let stream = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break stream,
                Err(_) if started.elapsed() < CONSOLE_TIMEOUT && qemu.0.try_wait()?.is_none() => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(err) => bail!(
                    "QEMU did not serve the console at {} ({err}); {}:\n{}",
                    socket.display(),
                    qemu_log.display(),
                    fs::read_to_string(&qemu_log).unwrap_or_default().trim()
                ),
            }
        };
        let console = Console::attach(stream.try_clone()?, File::create(self.transcript())?);
        let mut input = stream;
        drive(&console, &mut input, &self.steps, &self.transcript())?;

        let deadline = Instant::now() + POWER_OFF_TIMEOUT;
        let status = loop {
            if let Some(status) = qemu.0.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "the guest did not power off within {POWER_OFF_TIMEOUT:?} after the last first-boot step; \
                     the console's last lines ({}):\n{}",
                    self.transcript().display(),
                    console.tail(TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !status.success() {
            bail!(
                "QEMU exited with {status} at the end of the first boot; {}:\n{}",
                qemu_log.display(),
                fs::read_to_string(&qemu_log).unwrap_or_default().trim()
            );
        }
        println!(
            "first boot: done in {:.0} s (transcript: {})",
            started.elapsed().as_secs_f64(),
            self.transcript().display()
        );
        Ok(())
    }
}

/// QEMU as our child: killed (by its handle, so by its pid) if the build gives up on it.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// QEMU option values are split on ','; a comma in a path is written twice.
fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Runs the steps against a console: for each, wait for `expect` after the previous match
/// (when it has one), then type `send` and a newline (when it has one).
pub(crate) fn drive(
    console: &Console,
    input: &mut impl Write,
    steps: &[FirstBootStep],
    transcript: &Path,
) -> Result<()> {
    let mut position = 0;
    for (i, step) in steps.iter().enumerate() {
        let started = Instant::now();
        println!("first boot: step {}/{}: {}", i + 1, steps.len(), step.name);
        if !step.expect.is_empty() {
            match console.wait_for(&step.expect, position, step.timeout) {
                Wait::Found(end) => position = end,
                outcome => {
                    let why = match outcome {
                        Wait::Closed => "the console closed (QEMU exited) before it showed".to_string(),
                        _ => format!("did not see within {:?}", step.timeout),
                    };
                    bail!(
                        "first-boot step {}/{} `{}` {why} {:?}; the console's last {TAIL_LINES} lines (whole \
                         transcript: {}):\n{}",
                        i + 1,
                        steps.len(),
                        step.name,
                        step.expect,
                        transcript.display(),
                        console.tail(TAIL_LINES)
                    );
                }
            }
        }
        if let Some(line) = &step.send {
            input
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| input.flush())
                .with_context(|| format!("first-boot step `{}`: typing on the console", step.name))?;
        }
        if started.elapsed() > Duration::from_secs(5) {
            println!("first boot:   ({:.0} s)", started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// What waiting for a pattern came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Found; the position just after the match.
    Found(usize),
    /// The timeout passed.
    TimedOut,
    /// The console closed.
    Closed,
}

#[derive(Default)]
struct Screen {
    /// Everything printed, without escape sequences and carriage returns.
    text: Vec<u8>,
    /// Where the escape-sequence filter is (see [`Screen::push`]).
    escape: Escape,
    closed: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// After ESC and intermediate bytes (`ESC ( B`), until the final byte.
    Intermediate,
    /// Inside `ESC [ ...` (CSI) until its final byte.
    Csi,
    /// Inside `ESC ] ...` (OSC) until BEL or ESC.
    Osc,
}

impl Screen {
    /// Appends console bytes, dropping ANSI escape sequences (ECMA-48 CSI and OSC, and ESC
    /// with intermediate bytes) and carriage returns; state carries over between chunks.
    fn push(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.escape = match (self.escape, byte) {
                (Escape::None, 0x1b) => Escape::Start,
                (Escape::None, b'\r') => Escape::None,
                (Escape::None, _) => {
                    self.text.push(byte);
                    Escape::None
                }
                (Escape::Start, b'[') => Escape::Csi,
                (Escape::Start, b']') => Escape::Osc,
                (Escape::Start | Escape::Intermediate, 0x20..=0x2f) => Escape::Intermediate,
                (Escape::Start | Escape::Intermediate, _) => Escape::None,
                (Escape::Csi, 0x40..=0x7e) => Escape::None,
                (Escape::Csi, _) => Escape::Csi,
                (Escape::Osc, 0x07) => Escape::None,
                (Escape::Osc, 0x1b) => Escape::Start,
                (Escape::Osc, _) => Escape::Osc,
            };
        }
    }
}

/// The console's output, collected by a reader thread and waited on by the steps.
pub(crate) struct Console {
    screen: Arc<(Mutex<Screen>, Condvar)>,
}

impl Console {
    /// Starts reading `output` into the screen and, raw, into `transcript`.
    pub(crate) fn attach(mut output: impl Read + Send + 'static, mut transcript: File) -> Console {
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match output.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let (lock, changed) = &*shared;
                let mut screen = lock.lock().expect("console lock");
                if n == 0 {
                    screen.closed = true;
                    changed.notify_all();
                    return;
                }
                let _ = transcript.write_all(&buf[..n]);
                screen.push(&buf[..n]);
                changed.notify_all();
            }
        });
        Console { screen }
    }

    /// Waits until `pattern` appears at or after `from` in the screen text.
    pub(crate) fn wait_for(&self, pattern: &str, from: usize, timeout: Duration) -> Wait {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.screen;
        let mut screen = lock.lock().expect("console lock");
        loop {
            let text = &screen.text[from.min(screen.text.len())..];
            if let Some(at) = text.windows(pattern.len()).position(|w| w == pattern.as_bytes()) {
                return Wait::Found(from + at + pattern.len());
            }
            if screen.closed {
                return Wait::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Wait::TimedOut;
            }
            screen = changed.wait_timeout(screen, deadline - now).expect("console lock").0;
        }
    }

    /// The last `lines` non-empty lines of the screen text.
    pub(crate) fn tail(&self, lines: usize) -> String {
        let screen = self.screen.0.lock().expect("console lock");
        let text = String::from_utf8_lossy(&screen.text);
        let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        all[all.len().saturating_sub(lines)..].iter().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vial::config::{Config, Overrides, ProfileFile};

    fn step(name: &str, expect: &str, send: Option<&str>, timeout: Duration) -> FirstBootStep {
        FirstBootStep { name: name.into(), expect: expect.into(), send: send.map(String::from), timeout }
    }

    /// The linux test guest; built once even when both QEMU tests ask at the same time.
    fn test_guest() -> PathBuf {
        static BUILD: Mutex<()> = Mutex::new(());
        let _one_at_a_time = BUILD.lock().unwrap();
        crate::guest::run().unwrap()
    }

    fn repo_profile(name: &str) -> Profile {
        let path = crate::project_root().join("vm-profiles").join(format!("{name}.toml"));
        let file = ProfileFile::load(&path).unwrap();
        Config::from_file(file, path, &Overrides::default(), "t").unwrap().profile
    }

    #[test]
    fn escape_sequences_and_carriage_returns_are_dropped_across_chunks() {
        let mut screen = Screen::default();
        screen.push(b"\x1b[01;32mroot@frr\x1b[0");
        screen.push(b"0m:~# \r\n\x1b]0;title\x07ok\x1b(B.");
        assert_eq!(String::from_utf8_lossy(&screen.text), "root@frr:~# \nok.");
    }

    #[test]
    fn argv_is_the_profiles_machine_with_the_console_on_a_socket() {
        let profile = repo_profile("vqfx");
        let boot = FirstBoot {
            profile: &profile,
            boot: None,
            disks: vec![Disk { path: "/w/re.qcow2".into(), format: "qcow2".into(), interface: "ide".into() }],
            work: "/w".into(),
            accel: "tcg".into(),
            steps: Vec::new(),
        };
        assert_eq!(
            boot.argv().join(" "),
            "qemu-system-x86_64 -name vial-first-boot-vqfx -machine pc -accel tcg -cpu max -m 2048 -smp 1 \
             -nodefaults -no-user-config -display none -no-reboot \
             -drive file=/w/re.qcow2,format=qcow2,if=ide,index=0,cache=writeback \
             -netdev user,id=mgmt,restrict=on,net=10.0.0.0/24 -device e1000,netdev=mgmt -device e1000 -device e1000 \
             -chardev socket,id=console,path=/w/console.sock,server=on,wait=on -serial chardev:console"
        );
    }

    /// A scripted console over a socket pair: the steps see what was printed, in order, and
    /// a pattern that was already consumed is not matched again.
    #[test]
    fn steps_wait_then_type_and_never_rematch_a_consumed_prompt() {
        let (guest, host) = UnixStream::pair().unwrap();
        let dir = std::env::temp_dir().join(format!("xtask-first-boot-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let console = Console::attach(host.try_clone().unwrap(), File::create(dir.join("t.log")).unwrap());
        let mut guest_out = guest.try_clone().unwrap();
        // Held until the end: the console must stay open for step 3 to time out.
        let _guest_open = guest.try_clone().unwrap();
        let typist = std::thread::spawn(move || {
            let mut guest_in = std::io::BufReader::new(guest);
            guest_out.write_all(b"login: ").unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(&mut guest_in, &mut line).unwrap();
            guest_out.write_all(format!("{}\r\n# ", line.trim()).as_bytes()).unwrap();
            line
        });
        let steps = [
            step("log in", "login: ", Some("root"), Duration::from_secs(5)),
            step("prompt", "# ", None, Duration::from_secs(5)),
            step("second prompt", "# ", None, Duration::from_millis(300)),
        ];
        let err = drive(&console, &mut host.try_clone().unwrap(), &steps, &dir.join("t.log")).unwrap_err();
        assert_eq!(typist.join().unwrap(), "root\n");
        let text = err.to_string();
        assert!(text.contains("step 3/3 `second prompt` did not see"), "{text}");
        assert!(text.contains("  | login: root"), "{text}");
        assert_eq!(fs::read(dir.join("t.log")).unwrap(), b"login: root\r\n# ");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A first boot of the linux test guest under TCG with `steps`, working in a fresh
    /// `target/itest/first-boot-<tag>-<pid>`.
    fn linux_first_boot<'p>(profile: &'p Profile, tag: &str, steps: Vec<FirstBootStep>) -> FirstBoot<'p> {
        let guest = test_guest();
        let work = crate::project_root().join(format!("target/itest/first-boot-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&work);
        let mut boot_files = profile.boot.clone().unwrap();
        boot_files.kernel = guest.join("vmlinux");
        boot_files.initrd = Some(guest.join("initrd.img"));
        FirstBoot { profile, boot: Some(boot_files), disks: Vec::new(), work, accel: "tcg".into(), steps }
    }

    /// The real thing: the linux test guest under QEMU. A step whose pattern never appears
    /// fails the first boot with the step's name and the console's tail, and QEMU is gone.
    #[test]
    fn a_step_that_never_sees_its_pattern_fails_with_its_name_and_the_console_tail() {
        let profile = repo_profile("linux");
        let first_boot = linux_first_boot(
            &profile,
            "fail",
            vec![
                step(
                    "wait for the guest",
                    "vial-guest: ready",
                    Some("echo marker-$((6 * 7))"),
                    Duration::from_secs(120),
                ),
                step("see the marker", "marker-42", None, Duration::from_secs(30)),
                step("wait for a banner that never comes", "no such banner", None, Duration::from_secs(3)),
            ],
        );
        let work = first_boot.work.clone();
        let started = Instant::now();
        let err = first_boot.run().unwrap_err().to_string();
        assert!(err.contains("step 3/3 `wait for a banner that never comes` did not see"), "{err}");
        assert!(err.contains("\"no such banner\""), "{err}");
        assert!(err.contains("  | marker-42"), "{err}");
        assert!(err.contains("first-boot.log"), "{err}");
        assert!(fs::read_to_string(work.join("first-boot.log")).unwrap().contains("vial-guest: ready"));
        // QEMU was killed when the build gave up: nothing mentions the work directory now.
        let name = format!("path={}", work.join("console.sock").display());
        wait_gone(&name, started);
        fs::remove_dir_all(&work).unwrap();
    }

    /// The success path on the same guest: the last step powers it off and QEMU exits 0.
    #[test]
    fn steps_that_end_in_poweroff_complete_the_first_boot() {
        let profile = repo_profile("linux");
        let steps = vec![step("power off", "vial-guest: ready", Some("poweroff"), Duration::from_secs(120))];
        let first_boot = linux_first_boot(&profile, "ok", steps);
        first_boot.run().unwrap();
        fs::remove_dir_all(&first_boot.work).unwrap();
    }

    fn wait_gone(needle: &str, started: Instant) {
        let running = || {
            fs::read_dir("/proc").unwrap().flatten().any(|entry| {
                fs::read(entry.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
            })
        };
        while running() {
            assert!(started.elapsed() < Duration::from_secs(60), "QEMU ({needle}) still runs");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
