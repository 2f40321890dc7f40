//! `cargo xtask bench`, data plane: what each plumbing mode (`vial::net::plumb`: tc, bridge,
//! macvtap) costs the frames that cross it, and how long stitching takes, as figures and as
//! ratios against a plain veth pair measured in the same run. It prints figures and asserts
//! nothing.
//!
//! - throughput and frames per second: namespace A —veth— [endpoint namespace: eth1 and eth2,
//!   each stitched by `plumb::stitch`; a userspace forwarder stands in for the VM and copies
//!   every frame between the two descriptors] —veth— namespace B, with iperf3 from A to B (TCP;
//!   UDP with 64-byte datagrams; TCP again with A's offloads off); the baseline is the same
//!   iperf3 over one veth pair A—B;
//! - set-up time: discovery and `stitch` of 1, 8 and 32 links, then `self_check` and
//!   `unstitch` of all, per mode.
//!
//! Every namespace is anonymous, made by unshare(2) on a thread of its own (`testkit::netns`,
//! with a private mount namespace: sysfs of that network namespace, for macvtap device
//! numbers, and an empty `/run`, for the device nodes `tap::open_macvtap` makes). A namespace
//! vanishes, with every interface in it, once its thread has ended and nothing holds it: no
//! path leaves one behind, and no frame of the bench ever reaches the host's interfaces.
//! iperf3 runs in them as child processes, each behind a guard that kills it by PID.
//!
//! The forwarder moves frames one `read` and one `write` at a time and leaves the offloads of
//! each descriptor as the kernel made them, which differ by mode: a TAP has none until
//! someone calls `TUNSETOFFLOAD` (QEMU does, for a virtio-net guest that asks), so the kernel
//! segments and checksums every TCP super-packet before it reaches a TAP and tc and bridge
//! carry 1500-byte frames; a macvtap starts with them all on (`tap_features = TUN_OFFLOADS`
//! in drivers/net/macvtap.c, macvtap_newlink), so 64 KiB GSO packets cross it, header and
//! all. The first TCP figure is therefore not a like-for-like comparison of the modes; the
//! second one is: it runs with checksum, TSO and GSO off on A's veth (`ethtool -K`), so every
//! path, the baseline included, carries 1500-byte frames. The UDP figure is bounded by one
//! iperf3 receiver thread sharing the machine's cores with the sender and the forwarder.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;
use rtnetlink::{Handle, LinkUnspec, LinkVeth};
use testkit::netns::{Filesystem, Netns};
use testkit::stats::{median_by, ms_since as ms};
use vial::config::Plumbing;
use vial::net::links::{self, Link};
use vial::net::plumb::{self, Stitch};
use vial::net::selfcheck::{self, SelfCheck};

/// Rounds of each measurement; figures are medians.
const ROUNDS: usize = 3;
/// Length of each iperf3 run.
const IPERF_SECONDS: u32 = 3;
/// UDP payload of the frames-per-second run (a 106-byte frame on the wire).
const UDP_PAYLOAD: u32 = 64;
/// How long an iperf3 client may take beyond its test before it is killed.
const IPERF_GRACE: Duration = Duration::from_secs(20);
/// A's and B's addresses (198.18.0.0/15: RFC 2544 benchmarking, never routed).
const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PREFIX: u8 = 24;
const IPERF_PORT: u16 = 5201;
/// A's veth; its offloads are turned off for the second TCP run.
const SENDER: &str = "a0";
/// What `ethtool -K` turns off on it: checksum offload, TSO and GSO.
const OFFLOADS: [&str; 6] = ["tx", "off", "tso", "off", "gso", "off"];
/// Link counts of the set-up bench.
const LINK_COUNTS: [u32; 3] = [1, 8, 32];
/// The target: 32 links stitched in under 100 ms.
const TARGET_LINKS: u32 = 32;
const TARGET_MS: f64 = 100.0;
/// The management interface passed to discovery; the namespaces have none.
const MGMT: &str = "eth0";
const MODES: [Plumbing; 3] = [Plumbing::Tc, Plumbing::Bridge, Plumbing::Macvtap];

/// A namespace of the bench: with a private mount namespace whose sysfs is the network
/// namespace's (macvtap device numbers) and whose `/run` is empty (the device nodes
/// `tap::open_macvtap` makes).
fn netns() -> Result<Netns> {
    Ok(Netns::new(Filesystem::Private { empty: &["/run"] })?)
}

/// Spawns `program args` in namespace `ns`.
fn spawn(ns: &Netns, program: &str, args: Vec<String>, stdout: bool) -> Result<Running> {
    let program = program.to_string();
    ns.run(move |_, _| {
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(if stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start {program} (cargo xtask setup installs it)"))?;
        Ok(Running(child))
    })
}

/// A child process, killed (by its PID) and reaped when dropped.
struct Running(Child);

impl Running {
    /// Waits up to `timeout` for it to exit; its stdout, or why there is none.
    fn output(mut self, timeout: Duration) -> Result<String> {
        let mut stdout = self.0.stdout.take().context("stdout not piped")?;
        let mut stderr = self.0.stderr.take().context("stderr not piped")?;
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            stdout.read_to_string(&mut text).map(|_| text)
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.0.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                // Dropping `self` kills it; the reader then sees the end of the pipe.
                bail!("still running after {timeout:?}; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = reader.join().map_err(|_| anyhow!("stdout reader panicked"))??;
        if !status.success() && text.trim().is_empty() {
            let mut errors = String::new();
            let _ = stderr.read_to_string(&mut errors);
            bail!("exited with {status}: {}", errors.trim());
        }
        Ok(text)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

async fn link_named(handle: &Handle, name: &str) -> Result<Link> {
    links::list_links(handle)
        .await
        .context("list links")?
        .into_iter()
        .find(|link| link.name == name)
        .with_context(|| format!("no link {name}"))
}

async fn set_up(handle: &Handle, name: &str) -> Result<()> {
    let index = link_named(handle, name).await?.index;
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .with_context(|| format!("{name} up"))
}

/// A veth pair `name` <-> `peer`, the peer moved into `peer_ns`; both ends down.
async fn add_veth(handle: &Handle, name: &str, peer: &str, peer_ns: &OwnedFd) -> Result<()> {
    handle.link().add(LinkVeth::new(name, peer).build()).execute().await.with_context(|| format!("add veth {name}"))?;
    let message = LinkUnspec::new_with_name(peer).setns_by_fd(peer_ns.as_raw_fd()).build();
    handle.link().set(message).execute().await.with_context(|| format!("move {peer} to its namespace"))
}

/// Gives `name` `address`/PREFIX and brings it up.
async fn address_up(handle: &Handle, name: &str, address: Ipv4Addr) -> Result<()> {
    let index = link_named(handle, name).await?.index;
    handle
        .address()
        .add(index, IpAddr::V4(address), PREFIX)
        .execute()
        .await
        .with_context(|| format!("address {address} on {name}"))?;
    set_up(handle, name).await
}

/// Polls until every one of `names` (in the calling thread's namespace) is operationally up:
/// a veth only gets its qdisc, and passes frames, once link-watch has run after carrier came.
fn wait_running(names: &[String]) -> Result<()> {
    use nix::net::if_::InterfaceFlags;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let running: Vec<String> = nix::ifaddrs::getifaddrs()?
            .filter(|entry| entry.flags.contains(InterfaceFlags::IFF_RUNNING))
            .map(|entry| entry.interface_name)
            .collect();
        let missing: Vec<&String> = names.iter().filter(|name| !running.contains(name)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not running after 5 s: {missing:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a VM would be: copies every frame read from one descriptor to the other, both ways,
/// one thread per direction, virtio-net header included (both descriptors have the same).
struct Forwarder {
    stop: Arc<AtomicBool>,
    /// Frames moved and frames dropped (a write refused), per direction (1 -> 2, 2 -> 1).
    counters: [(Arc<AtomicU64>, Arc<AtomicU64>); 2],
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Forwarder {
    fn start(one: &OwnedFd, two: &OwnedFd) -> Result<Forwarder> {
        let headers = (vial::sys::tun_vnet_hdr_len(one.as_fd())?, vial::sys::tun_vnet_hdr_len(two.as_fd())?);
        ensure!(headers.0 == headers.1, "the descriptors' virtio-net headers differ: {headers:?}");
        for fd in [one, two] {
            use nix::fcntl::{fcntl, FcntlArg, OFlag};
            let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let counters: [(Arc<AtomicU64>, Arc<AtomicU64>); 2] = Default::default();
        let mut threads = Vec::new();
        for (direction, (from, to)) in [(one, two), (two, one)].into_iter().enumerate() {
            let (from, to) = (from.try_clone()?, to.try_clone()?);
            let (stop, (moved, dropped)) = (stop.clone(), counters[direction].clone());
            let thread = std::thread::Builder::new()
                .name(format!("bench-forward-{}", direction + 1))
                .spawn(move || forward(&from, &to, &stop, &moved, &dropped))?;
            threads.push(thread);
        }
        Ok(Forwarder { stop, counters, threads })
    }

    /// Frames moved and dropped so far, both directions summed.
    fn counts(&self) -> (u64, u64) {
        self.counters.iter().fold((0, 0), |(moved, dropped), (m, d)| {
            (moved + m.load(Ordering::Relaxed), dropped + d.load(Ordering::Relaxed))
        })
    }

    /// Stops both threads; the first error either met.
    fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        let mut result = Ok(());
        for thread in self.threads.drain(..) {
            let outcome = thread.join().map_err(|_| anyhow!("a forwarder thread panicked")).and_then(|r| r);
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn forward(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool, moved: &AtomicU64, dropped: &AtomicU64) -> Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 65536 + 64];
    while !stop.load(Ordering::Relaxed) {
        match nix::unistd::read(from, &mut buf) {
            Ok(len) => match nix::unistd::write(to, &buf[..len]) {
                Ok(_) => moved.fetch_add(1, Ordering::Relaxed),
                // A full queue drops the frame, as a NIC would.
                Err(Errno::EAGAIN | Errno::ENOBUFS) => dropped.fetch_add(1, Ordering::Relaxed),
                Err(err) => return Err(err).context("forwarder write"),
            },
            // Poll only when the queue is empty, with a timeout so `stop` is seen.
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(50u16)) {
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(err) => return Err(err).context("forwarder poll"),
                }
            }
            Err(Errno::EINTR) => continue,
            Err(err) => return Err(err).context("forwarder read"),
        };
    }
    Ok(())
}

/// The path between A and B.
#[derive(Debug, Clone, Copy)]
enum Path {
    /// One veth pair.
    Veth,
    /// Through an endpoint namespace stitched in this mode, with the forwarder.
    Stitched(Plumbing),
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Veth => "plain veth",
            Path::Stitched(mode) => mode.as_str(),
        }
    }
}

/// A, B and what lies between them. Dropping it stops the forwarder, unstitches, and ends the
/// namespaces, in that order.
struct Topology {
    forwarder: Option<Forwarder>,
    stitches: Vec<Stitch>,
    endpoint: Option<Netns>,
    a: Netns,
    b: Netns,
}

impl Topology {
    fn build(path: Path) -> Result<Topology> {
        let a = netns()?;
        let b = netns()?;
        let mut topology = Topology { forwarder: None, stitches: Vec::new(), endpoint: None, a, b };
        match path {
            Path::Veth => {
                let b_fd = topology.b.fd()?;
                topology.a.block_on(move |h| async move { add_veth(&h, "a0", "b0", &b_fd).await })?;
            }
            Path::Stitched(mode) => {
                let endpoint = netns()?;
                for (ns, (name, peer)) in [(&topology.a, ("a0", "eth1")), (&topology.b, ("b0", "eth2"))] {
                    let endpoint_fd = endpoint.fd()?;
                    ns.block_on(move |h| async move { add_veth(&h, name, peer, &endpoint_fd).await })?;
                }
                let stitches = endpoint.block_on(move |h| async move {
                    set_up(&h, "eth1").await?;
                    set_up(&h, "eth2").await?;
                    let found = links::data_links(&links::list_links(&h).await?, MGMT);
                    let names: Vec<&str> = found.iter().map(|link| link.name.as_str()).collect();
                    ensure!(names == ["eth1", "eth2"], "data links {names:?}, expected eth1 and eth2");
                    let mut stitches = Vec::new();
                    for (nic, link) in (1..).zip(&found) {
                        stitches.push(plumb::stitch(&h, mode, link, nic).await.context("stitch")?);
                    }
                    Ok(stitches)
                })?;
                topology.stitches = stitches;
                topology.endpoint = Some(endpoint);
            }
        }
        topology.a.block_on(|h| async move { address_up(&h, "a0", ADDR_A).await })?;
        topology.b.block_on(|h| async move { address_up(&h, "b0", ADDR_B).await })?;
        topology.a.run(|_, _| wait_running(&["a0".into()]))?;
        topology.b.run(|_, _| wait_running(&["b0".into()]))?;
        if let Some(endpoint) = &topology.endpoint {
            // Proves each stitch carries frames before anything is measured (and waits for
            // the links and devices to run).
            let stitches = std::mem::take(&mut topology.stitches);
            topology.stitches = endpoint.block_on(move |_| async move {
                for stitch in &stitches {
                    let outcome = selfcheck::self_check(stitch).await.context("self-check")?;
                    ensure!(outcome == SelfCheck::Passed, "self-check of {}: {outcome:?}", stitch.link.name);
                }
                Ok(stitches)
            })?;
            topology.forwarder = Some(Forwarder::start(&topology.stitches[0].fd, &topology.stitches[1].fd)?);
        }
        Ok(topology)
    }

    /// One iperf3 run from A to B; its JSON `end.sum_received`.
    fn iperf(&self, extra: &[&str]) -> Result<serde_json::Value> {
        let server = spawn(
            &self.b,
            "iperf3",
            ["-s", "-1", "-B", &ADDR_B.to_string(), "-p", &IPERF_PORT.to_string()].map(String::from).to_vec(),
            false,
        )?;
        wait_listening(server.0.id(), IPERF_PORT)?;
        let mut args: Vec<String> = ["-c", &ADDR_B.to_string(), "-p", &IPERF_PORT.to_string()]
            .into_iter()
            .chain(["-t", &IPERF_SECONDS.to_string(), "-J", "--connect-timeout", "3000"])
            .map(String::from)
            .collect();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let client = spawn(&self.a, "iperf3", args.clone(), true)?;
        let text = client
            .output(Duration::from_secs(IPERF_SECONDS.into()) + IPERF_GRACE)
            .with_context(|| format!("iperf3 {}", args.join(" ")))?;
        drop(server);
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("iperf3 printed no JSON: {text}"))?;
        if let Some(error) = json.get("error") {
            bail!("iperf3 {}: {error}", args.join(" "));
        }
        json.pointer("/end/sum_received").cloned().with_context(|| format!("no end.sum_received in {text}"))
    }

    /// TCP throughput, Gbit/s.
    fn tcp(&self) -> Result<f64> {
        let received = self.iperf(&[])?;
        let bps = received["bits_per_second"].as_f64().context("no bits_per_second")?;
        Ok(bps / 1e9)
    }

    /// UDP datagrams of UDP_PAYLOAD bytes delivered to B, and sent by A, per second.
    fn udp(&self) -> Result<(f64, f64)> {
        let received = self.iperf(&["-u", "-b", "0", "-l", &UDP_PAYLOAD.to_string()])?;
        let number = |key: &str| received[key].as_f64().with_context(|| format!("no {key} in {received}"));
        let seconds = number("seconds")?;
        ensure!(seconds > 0.0, "iperf3 ran for {seconds} s");
        Ok((number("bytes")? / f64::from(UDP_PAYLOAD) / seconds, number("packets")? / seconds))
    }

    /// Turns A's offloads off, so the TCP stream leaves in 1500-byte frames on every path.
    fn sender_offloads_off(&self) -> Result<()> {
        let args: Vec<String> = ["-K", SENDER].into_iter().chain(OFFLOADS).map(String::from).collect();
        spawn(&self.a, "ethtool", args.clone(), true)?
            .output(Duration::from_secs(10))
            .map(drop)
            .with_context(|| format!("ethtool {}", args.join(" ")))
    }

    /// Stops the forwarder and unstitches, reporting errors the drop would swallow.
    fn finish(mut self) -> Result<()> {
        if let Some(mut forwarder) = self.forwarder.take() {
            forwarder.stop()?;
        }
        if let Some(endpoint) = &self.endpoint {
            let stitches = std::mem::take(&mut self.stitches);
            endpoint.block_on(move |h| async move {
                for stitch in &stitches {
                    plumb::unstitch(&h, stitch).await.context("unstitch")?;
                }
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        drop(self.forwarder.take());
        if let Some(endpoint) = &self.endpoint {
            let stitches = std::mem::take(&mut self.stitches);
            let _ = endpoint.block_on(move |h| async move {
                for stitch in &stitches {
                    let _ = plumb::unstitch(&h, stitch).await;
                }
                Ok::<_, anyhow::Error>(())
            });
        }
    }
}

/// Polls until process `pid` listens on TCP `port` (its namespace's `/proc/PID/net/tcp`).
fn wait_listening(pid: u32, port: u16) -> Result<()> {
    let local = format!(":{port:04X}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).context("iperf3 server is gone")?;
        // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
        let listening = table.lines().skip(1).any(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns.len() > 3 && columns[1].ends_with(&local) && columns[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("iperf3 server not listening on port {port} after 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One path's figures in one round.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    /// TCP, offloads as the kernel made them.
    tcp_gbps: f64,
    /// TCP with A's offloads off (1500-byte frames on every path).
    tcp_frames_gbps: f64,
    /// UDP datagrams per second delivered to B, and sent by A.
    udp_delivered: f64,
    udp_sent: f64,
    /// Frames the forwarder moved, and dropped, in the UDP run (both directions).
    udp_forwarded: Option<(u64, u64)>,
}

fn measure_traffic(path: Path) -> Result<Traffic> {
    let topology = Topology::build(path)?;
    let tcp_gbps = topology.tcp().context("TCP run")?;
    let before = topology.forwarder.as_ref().map(Forwarder::counts);
    let (udp_delivered, udp_sent) = topology.udp().context("UDP run")?;
    let udp_forwarded = topology
        .forwarder
        .as_ref()
        .map(Forwarder::counts)
        .zip(before)
        .map(|(after, before)| (after.0 - before.0, after.1 - before.1));
    topology.sender_offloads_off()?;
    let tcp_frames_gbps = topology.tcp().context("TCP run without offloads")?;
    topology.finish()?;
    Ok(Traffic { tcp_gbps, tcp_frames_gbps, udp_delivered, udp_sent, udp_forwarded })
}

/// One round of set-up times, in ms.
#[derive(Debug, Clone, Copy)]
struct SetupTimes {
    discover_stitch: f64,
    self_check: f64,
    unstitch: f64,
}

/// Makes `count` veth pairs (eth1..ethN in a fresh endpoint namespace, their peers up in
/// another), waits until they run, then times discovery + `stitch` of all, `self_check` of
/// all, and `unstitch` of all.
fn measure_setup(mode: Plumbing, count: u32) -> Result<SetupTimes> {
    let endpoint = netns()?;
    let outside = netns()?;
    let outside_fd = outside.fd()?;
    let names: Vec<String> = (1..=count).map(|n| format!("eth{n}")).collect();
    let to_make = names.clone();
    endpoint.block_on(move |h| async move {
        for (n, name) in (1..).zip(&to_make) {
            add_veth(&h, name, &format!("p{n}"), &outside_fd).await?;
            set_up(&h, name).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    outside.block_on(move |h| async move {
        for n in 1..=count {
            set_up(&h, &format!("p{n}")).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let running = names.clone();
    endpoint.run(move |_, _| wait_running(&running))?;
    endpoint.block_on(move |h| async move {
        let start = Instant::now();
        let found = links::data_links(&links::list_links(&h).await?, MGMT);
        ensure!(found.len() == count as usize, "found {} data links, expected {count}", found.len());
        let mut stitches = Vec::with_capacity(found.len());
        for (nic, link) in (1..).zip(&found) {
            stitches.push(plumb::stitch(&h, mode, link, nic).await.with_context(|| format!("stitch {}", link.name))?);
        }
        let discover_stitch = ms(start);
        let start = Instant::now();
        // Side by side, as DataPlane::start runs them.
        let outcomes = futures::future::join_all(stitches.iter().map(selfcheck::self_check)).await;
        for (stitch, outcome) in stitches.iter().zip(outcomes) {
            let outcome = outcome.context("self-check")?;
            ensure!(outcome == SelfCheck::Passed, "self-check of {}: {outcome:?}", stitch.link.name);
        }
        let self_check = ms(start);
        let start = Instant::now();
        for stitch in &stitches {
            plumb::unstitch(&h, stitch).await.context("unstitch")?;
        }
        let unstitch = ms(start);
        Ok(SetupTimes { discover_stitch, self_check, unstitch })
    })
}

/// The data-plane bench; prints its rounds, then its tables.
pub(crate) fn run() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the data-plane bench needs root (network namespaces, TAP, macvtap, tc): run `cargo xtask bench` as root"
        );
    }
    println!("\ndata plane: iperf3 A -> B, {IPERF_SECONDS} s per run, {ROUNDS} rounds");
    let paths: Vec<Path> = std::iter::once(Path::Veth).chain(MODES.map(Path::Stitched)).collect();
    let mut traffic: Vec<Vec<Traffic>> = vec![Vec::new(); paths.len()];
    for round in 1..=ROUNDS {
        // Every path once per round, so drift over the run spreads over all of them.
        for (i, path) in paths.iter().enumerate() {
            let figures = measure_traffic(*path).with_context(|| format!("data-plane bench, {}", path.name()))?;
            let forwarder = figures.udp_forwarded.map_or(String::new(), |(moved, dropped)| {
                format!(", forwarder moved {moved} frames, dropped {dropped}")
            });
            println!(
                "round {round}: {:<10} TCP {:6.2} Gbit/s, without offloads {:5.2} Gbit/s | UDP {UDP_PAYLOAD} B sent {:4.0} kframes/s, delivered {:4.0} kframes/s{forwarder}",
                path.name(),
                figures.tcp_gbps,
                figures.tcp_frames_gbps,
                figures.udp_sent / 1e3,
                figures.udp_delivered / 1e3,
            );
            traffic[i].push(figures);
        }
    }

    println!("\nplumbing set-up: discovery + stitch, then self-check, then unstitch; {ROUNDS} rounds");
    let mut setups = Vec::new();
    for mode in MODES {
        for count in LINK_COUNTS {
            let mut rounds = Vec::new();
            for round in 1..=ROUNDS {
                let times = measure_setup(mode, count)
                    .with_context(|| format!("set-up bench, {} mode, {count} links", mode.as_str()))?;
                println!(
                    "round {round}: {:<7} {count:2} links: discover+stitch {:6.1} ms, self-check {:6.1} ms, unstitch {:6.1} ms",
                    mode.as_str(),
                    times.discover_stitch,
                    times.self_check,
                    times.unstitch
                );
                rounds.push(times);
            }
            setups.push((mode, count, rounds));
        }
    }

    let base = |f: fn(&Traffic) -> f64| median_by(&traffic[0], f);
    let (base_tcp, base_frames, base_udp) =
        (base(|t| t.tcp_gbps), base(|t| t.tcp_frames_gbps), base(|t| t.udp_delivered));
    println!(
        "\nmedians of {ROUNDS} rounds, data plane (a userspace forwarder stands in for the VM; ratios to plain veth):"
    );
    println!("  path        TCP Gbit/s  ratio | TCP, A without offloads  ratio | UDP {UDP_PAYLOAD} B kframes/s delivered  ratio");
    for (path, rounds) in paths.iter().zip(&traffic) {
        let tcp = median_by(rounds, |t| t.tcp_gbps);
        let frames = median_by(rounds, |t| t.tcp_frames_gbps);
        let udp = median_by(rounds, |t| t.udp_delivered);
        println!(
            "  {:<10}  {tcp:10.2}  {:5.3} | {frames:16.2} Gbit/s  {:5.3} | {:>28.0}  {:5.3}",
            path.name(),
            tcp / base_tcp,
            frames / base_frames,
            udp / 1e3,
            udp / base_udp
        );
    }
    println!("  (macvtap descriptors start with offloads on, TAPs without: only the middle column compares modes like for like)");

    println!("\nmedians of {ROUNDS} rounds, plumbing set-up (ms; per link in parentheses):");
    println!("  mode     links  discover+stitch        self-check          unstitch");
    let mut verdicts = Vec::new();
    for (mode, count, rounds) in &setups {
        let med = |f: fn(&SetupTimes) -> f64| median_by(rounds, f);
        let (stitch, check, unstitch) = (med(|t| t.discover_stitch), med(|t| t.self_check), med(|t| t.unstitch));
        let per = |total: f64| total / f64::from(*count);
        println!(
            "  {:<7}  {count:5}  {stitch:7.1} ({:5.2})  {check:7.1} ({:5.2})  {unstitch:7.1} ({:5.2})",
            mode.as_str(),
            per(stitch),
            per(check),
            per(unstitch)
        );
        if *count == TARGET_LINKS {
            let meets = |total: f64| if total < TARGET_MS { "meets it" } else { "MISSES it" };
            let started = med(|t| t.discover_stitch + t.self_check);
            verdicts.push(format!(
                "  {:<7}  discover+stitch {stitch:.1} ms: {}; with the self-checks (run side by side, as \
                 DataPlane::start does) {started:.1} ms: {}",
                mode.as_str(),
                meets(stitch),
                meets(started)
            ));
        }
    }
    println!("target: {TARGET_LINKS} links in under {TARGET_MS:.0} ms");
    for verdict in verdicts {
        println!("{verdict}");
    }
    Ok(())
}
