//! `cargo xtask bench vm`, the first section of `cargo xtask bench`: what vial costs, as
//! ratios against a baseline measured in the same run. Each round launches the same QEMU
//! command line twice, once directly from here and once under `vial`, alternating, and polls
//! the guest the same way in both. The other sections are `bench::net` and `bench::images`.
//!
//! - supervisor overhead: from exec to QEMU started, and to QMP negotiated;
//! - what `VIAL_ACCEL=auto`'s KVM guest probe adds to a start, against `tcg` (no probe);
//! - time from SIGTERM to exit in each phase: waiting for links, booting, ready;
//! - time to ready of the `linux` guest (TCG), direct against under vial;
//! - vial's resident memory while the VM runs, and the static binary's size.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rtnetlink::LinkUnspec;
use testkit::netns::{Filesystem, Netns};
use testkit::stats::{median_by, ms_since as ms};

/// The forwarded port the bench's profile uses (loopback only).
const PORT: u16 = 18080;
const ROUNDS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// One launch's milestones, measured from the moment before spawning.
#[derive(Debug, Default, Clone, Copy)]
struct Milestones {
    qemu_started: f64,
    qmp_negotiated: f64,
    ready: f64,
    rss_kib: u64,
}

/// The readiness probe of the linux profile, done the same way for both launches.
fn probe(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"HEAD / HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"HTTP/1."
}

fn wait_ready(start: Instant) -> Result<f64> {
    while start.elapsed() < READY_TIMEOUT {
        if probe(PORT) {
            return Ok(ms(start));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("guest not ready after {READY_TIMEOUT:?}")
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

struct Bench {
    vial: PathBuf,
    dir: PathBuf,
    /// `VIAL_ACCEL` for the launches under vial (the direct one is TCG, as vial picks).
    accel: String,
}

impl Bench {
    fn env(&self, cmd: &mut Command, run: &str) {
        cmd.env("VIAL_PROFILE", self.dir.join("bundle/profile.toml"))
            .env("VIAL_RUN_DIR", self.dir.join(run))
            .env("VIAL_STATE_DIR", self.dir.join("state"))
            .env("VIAL_LESSON_DIR", self.dir.join("lesson"))
            .env("VIAL_ACCEL", &self.accel)
            .env("VIAL_MGMT_IFACE", "lo")
            .env("VIAL_NAME", "bench");
    }

    /// The argv vial would use, with its inherited control socket swapped for a path the
    /// bench connects to (the only difference between the two launches).
    fn direct_argv(&self, control: &Path) -> Result<Vec<String>> {
        let mut cmd = Command::new(&self.vial);
        cmd.arg("argv");
        self.env(&mut cmd, "run-direct");
        let out = cmd.output().context("vial argv")?;
        if !out.status.success() {
            bail!("vial argv failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8(out.stdout)?;
        Ok(text
            .split_whitespace()
            .map(|a| a.replace("socket,id=control,fd=3,", &format!("socket,id=control,path={},", control.display())))
            .collect())
    }

    fn direct(&self) -> Result<Milestones> {
        let run = self.dir.join("run-direct");
        std::fs::create_dir_all(&run)?;
        let control = run.join("control.sock");
        let _ = std::fs::remove_file(&control);
        let argv = self.direct_argv(&control)?;
        // The argv keeps `-append console=ttyS0 quiet panic=-1` split by words; re-join it.
        let argv = rejoin_append(argv);
        let start = Instant::now();
        let mut qemu = Command::new(&argv[0]).args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).spawn()?;
        let mut m = Milestones { qemu_started: ms(start), ..Default::default() };
        let result = (|| -> Result<Milestones> {
            let stream = loop {
                match UnixStream::connect(&control) {
                    Ok(s) => break s,
                    Err(_) if start.elapsed() < READY_TIMEOUT => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => bail!("qemu's control socket: {e}"),
                }
            };
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            reader.read_line(&mut line)?; // greeting
            (&stream).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
            line.clear();
            reader.read_line(&mut line)?;
            if !line.contains("return") {
                bail!("qmp_capabilities: {line}");
            }
            m.qmp_negotiated = ms(start);
            m.ready = wait_ready(start)?;
            Ok(m)
        })();
        kill(&mut qemu);
        result
    }

    fn under_vial(&self) -> Result<Milestones> {
        let mut cmd = Command::new(&self.vial);
        self.env(&mut cmd, "run-vial");
        cmd.env("VIAL_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut vial = cmd.spawn()?;
        // Milestones come from vial's log lines as they arrive (sub-millisecond latency).
        let (tx, rx) = mpsc::channel::<(&'static str, f64)>();
        let stderr = vial.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let at = ms(start);
                for marker in ["qemu started", "qmp negotiated"] {
                    if line.contains(marker) {
                        let _ = tx.send((marker, at));
                    }
                }
            }
        });
        let result = (|| -> Result<Milestones> {
            let mut m = Milestones { ready: wait_ready(start)?, ..Default::default() };
            m.rss_kib = rss_kib(vial.id());
            for (marker, at) in rx.try_iter() {
                match marker {
                    "qemu started" => m.qemu_started = at,
                    _ => m.qmp_negotiated = at,
                }
            }
            Ok(m)
        })();
        // Stop it the way docker does, and wait for the clean power-off.
        let _ = Command::new("kill").args(["-TERM", &vial.id().to_string()]).status();
        let status = vial.wait()?;
        if result.is_ok() && !status.success() {
            bail!("vial did not stop cleanly: {status}");
        }
        result
    }
}

impl Bench {
    /// Starts vial, waits for `phase` (`links`: waiting for a link that never comes;
    /// `booting`: QEMU just started; `ready`), sends SIGTERM and returns the ms until it exited.
    fn stop_time(&self, phase: &str) -> Result<f64> {
        let mut cmd = Command::new(&self.vial);
        self.env(&mut cmd, "run-vial");
        if phase == "links" {
            cmd.env("VIAL_DATA_IFACES", "1").env("VIAL_LINK_TIMEOUT", "10m");
        }
        cmd.env("VIAL_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let start = Instant::now();
        let mut vial = cmd.spawn()?;
        let (tx, rx) = mpsc::channel::<()>();
        let stderr = vial.stderr.take().expect("piped");
        let marker = match phase {
            "links" => "waiting-for-interfaces",
            _ => "qemu started",
        };
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(marker) {
                    let _ = tx.send(());
                }
            }
        });
        let reached = match phase {
            "ready" => wait_ready(start).map(drop),
            _ => rx.recv_timeout(READY_TIMEOUT).map_err(|_| anyhow::anyhow!("vial never reached {phase}")),
        };
        if let Err(err) = reached {
            kill(&mut vial);
            return Err(err);
        }
        let stopping = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &vial.id().to_string()]).status();
        vial.wait()?;
        Ok(ms(stopping))
    }
}

fn rejoin_append(argv: Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut iter = argv.into_iter().peekable();
    while let Some(arg) = iter.next() {
        out.push(arg.clone());
        if arg == "-append" {
            let mut words = Vec::new();
            while let Some(next) = iter.peek() {
                if next.starts_with('-') && !next.contains('=') {
                    break;
                }
                words.push(iter.next().unwrap());
            }
            out.push(words.join(" "));
        }
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub(crate) fn run() -> Result<()> {
    crate::setup::run()?;
    let vial = crate::dist::run()?;
    let guest = crate::guest::run()?;
    let dir = crate::project_root().join("target/bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("bundle"))?;
    std::fs::create_dir_all(dir.join("lesson"))?;
    std::fs::write(dir.join("lesson/index.html"), "bench\n")?;
    std::os::unix::fs::symlink(&guest, dir.join("bundle/guest"))?;
    let profile = std::fs::read_to_string(crate::project_root().join("vm-profiles/linux.toml"))?;
    let profile = profile
        .replace("container_port = 80", &format!("container_port = {PORT}"))
        .replace("\nport = 80", &format!("\nport = {PORT}"));
    std::fs::write(dir.join("bundle/profile.toml"), profile)?;

    // Both launches run in a network namespace of their own, holding only `lo`: vial would
    // stitch any ethN it found, and the host's interfaces are not the bench's to touch. Every
    // round runs on the namespace's thread, so what it spawns lives in the namespace too.
    let namespace = Netns::new(Filesystem::Host).context("the bench's network namespace")?;
    let bench = Bench { vial: vial.clone(), dir, accel: "tcg".into() };
    let (direct, vialed, probed, stops) = namespace.run(move |runtime, handle| -> Result<_> {
        runtime
            .block_on(handle.link().set(LinkUnspec::new_with_name("lo").up().build()).execute())
            .context("bringing lo up in the bench's namespace")?;
        if probe(PORT) {
            bail!("127.0.0.1:{PORT} already answers; stop whatever listens there");
        }
        let (mut direct, mut vialed) = (Vec::new(), Vec::new());
        for round in 1..=ROUNDS {
            let d = bench.direct().context("direct launch")?;
            let v = bench.under_vial().context("launch under vial")?;
            println!(
                "round {round}: direct qmp {:.1} ms ready {:.0} ms | vial qemu {:.1} ms qmp {:.1} ms ready {:.0} ms rss {} KiB",
                d.qmp_negotiated, d.ready, v.qemu_started, v.qmp_negotiated, v.ready, v.rss_kib
            );
            direct.push(d);
            vialed.push(v);
        }
        // The same launch with `auto`: its KVM guest probe is the only difference.
        let mut bench = bench;
        let mut probed = Vec::new();
        for round in 1..=ROUNDS {
            bench.accel = "auto".into();
            let a = bench.under_vial().context("launch under vial with auto")?;
            println!("round {round}: vial (auto) qemu {:.1} ms", a.qemu_started);
            probed.push(a);
        }
        bench.accel = "tcg".into();
        let mut stops = Vec::new();
        for phase in ["links", "booting", "ready"] {
            let times: Vec<f64> =
                (0..3).map(|_| bench.stop_time(phase)).collect::<Result<_>>().with_context(|| format!("stop in {phase}"))?;
            println!("stop in {phase}: {times:.0?} ms");
            stops.push((phase, testkit::stats::median(times)));
        }
        Ok((direct, vialed, probed, stops))
    })?;
    drop(namespace);
    let d_exec = median_by(&direct, |m| m.qemu_started);
    let v_exec = median_by(&vialed, |m| m.qemu_started);
    let d_qmp = median_by(&direct, |m| m.qmp_negotiated);
    let v_qmp = median_by(&vialed, |m| m.qmp_negotiated);
    let d_ready = median_by(&direct, |m| m.ready);
    let v_ready = median_by(&vialed, |m| m.ready);
    let rss = vialed.iter().map(|m| m.rss_kib).max().unwrap_or(0);
    let size = std::fs::metadata(&vial)?.len();
    println!("\nmedians of {ROUNDS} rounds (TCG, linux guest):");
    println!(
        "  exec -> qemu started:   direct {d_exec:.1} ms, vial {v_exec:.1} ms: vial adds {:.1} ms (target < 20 ms)",
        v_exec - d_exec
    );
    println!(
        "  exec -> qmp negotiated: direct {d_qmp:.1} ms, vial {v_qmp:.1} ms: vial adds {:.1} ms (target < 20 ms)",
        v_qmp - d_qmp
    );
    println!(
        "  exec -> ready:          direct {d_ready:.0} ms, vial {v_ready:.0} ms: ratio {:.3} (target <= 1.05)",
        v_ready / d_ready
    );
    let a_exec = median_by(&probed, |m| m.qemu_started);
    println!(
        "  KVM guest probe (auto against tcg): {a_exec:.1} ms against {v_exec:.1} ms to qemu started: it adds {:.1} ms (target < 50 ms)",
        a_exec - v_exec
    );
    for (phase, median) in &stops {
        println!("  SIGTERM -> exit while {phase}: {median:.0} ms");
    }
    println!("  vial resident memory:   {:.1} MiB (max over rounds; target <= 10 MiB)", rss as f64 / 1024.0);
    println!("  static binary size:     {:.1} MiB (target <= 8 MiB)", size as f64 / (1024.0 * 1024.0));
    Ok(())
}
