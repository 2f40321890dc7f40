//! Endpoint images on a real Docker engine: `cargo xtask image <profile>` builds the image
//! (cached after the first time), a container from it becomes healthy, does its job, and
//! `docker stop` powers the guest off cleanly within Docker's default 10 s grace.
//!
//! The tests run the real command as a subprocess instead of calling build code: that is
//! what a user and the nightly job run, and it is also what starts dockerd when none answers
//! (xtask/src/docker.rs: `--bridge=none`, address pool in 198.18.0.0/16, no iptables), so the
//! engine logic lives in one place. Containers join a network of their own in 198.18.X.0/24;
//! the tests reach them only there. Every container and network is removed on every path.

use std::ops::RangeInclusive;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::docker::{self, Container, Network, Reach};

use crate::support::{http_get, repo, temp_dir, wait_until, BOOT_TIMEOUT};

/// A `frr` guest is a full Debian boot: give it longer than the busybox guest under TCG.
const FRR_BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// `cargo xtask image <args>`, from the repository, with its output.
fn xtask_image(args: &[&str], env_remove: &[&str]) -> Output {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["run", "--quiet", "--package", "xtask", "--", "image"]).args(args).current_dir(repo());
    for var in env_remove {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).output().expect("running cargo xtask image")
}

/// Builds (or finds up to date) the image of `profile`; panics with the build's output.
pub(crate) fn build_image(profile: &str) -> String {
    let output = xtask_image(&[profile], &[]);
    assert!(
        output.status.success(),
        "cargo xtask image {profile} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // What the build did and how long it took, for the test's output.
    for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.starts_with("image:")) {
        println!("{line}");
    }
    format!("vial/{profile}:latest")
}

/// Third octets of the tests' networks: 198.18.0.0/24 is `cargo xtask demo`'s, 240 and up
/// `cargo xtask bench images`'.
const OCTETS: RangeInclusive<u8> = 40..=239;

/// A network with a gateway on the host, which the tests reach the containers through.
fn network() -> Network {
    Network::create("vialimg-net", OCTETS, Reach::Host).unwrap()
}

/// A data link between endpoints: no gateway, nothing but the containers on it.
fn link() -> Network {
    Network::create("vialimg-net", OCTETS, Reach::Internal).unwrap()
}

/// `docker run -d` of an endpoint image on `network` with the lesson directory mounted.
fn run_endpoint(image: &str, network: &Network, lesson: &Path, extra: &[&str]) -> Container {
    Container::run("vialimg-ep", network, |name| {
        let mut own = vec![];
        own.extend_from_slice(extra);
        vial::contract::DockerRun { name, image, network: network.name(), lesson, extra: &own }.args()
    })
    .unwrap()
}

/// What the tests ask of an endpoint's container.
trait Endpoint {
    /// vial's JSON status, from inside the container.
    fn status(&self) -> serde_json::Value;
    /// Waits for Docker's health check to say `healthy`; returns how long that took.
    fn wait_healthy(&self, timeout: Duration) -> Duration;
    /// `docker stop` with Docker's default grace; the guest must have powered off by itself:
    /// exit code 0 (a SIGKILL after the grace would be 137) and vial saying so.
    fn stop_cleanly(&self);
}

impl Endpoint for Container {
    fn status(&self) -> serde_json::Value {
        let output = docker::output(&["exec", self.name(), "/vial", "health", "--status"]).unwrap();
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|err| panic!("no status from {} ({err}):\n{}", self.name(), self.logs(None)))
    }

    fn wait_healthy(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let health = self.inspect("{{.State.Health.Status}} {{.State.Status}}").unwrap();
            if health.starts_with("healthy") {
                return started.elapsed();
            }
            if health.ends_with("exited") || started.elapsed() > timeout {
                panic!("container not healthy after {:?} ({health}):\n{}", started.elapsed(), self.logs(None));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_cleanly(&self) {
        let started = Instant::now();
        docker::stdout(&["stop", self.name()]).unwrap();
        let elapsed = started.elapsed();
        let code = self.inspect("{{.State.ExitCode}}").unwrap();
        let logs = self.logs(None);
        assert_eq!(code, "0", "exit code {code} after docker stop ({elapsed:?}):\n{logs}");
        assert!(logs.contains("guest powered off"), "vial did not report a power-off:\n{logs}");
        println!("docker stop took {elapsed:?}");
    }
}

/// `ssh antidote@addr command` with the image's password; (success, stdout + stderr). A
/// failure of ssh itself (exit 255: no banner in time on a loaded TCG guest, say) is retried
/// for up to a minute; the command's own failure is returned.
fn ssh(addr: std::net::Ipv4Addr, command: &str) -> (bool, String) {
    ssh_at(&addr.to_string(), 22, command)
}

/// [`ssh`] to `host` on `port`.
pub(crate) fn ssh_at(host: &str, port: u16, command: &str) -> (bool, String) {
    let addr = host;
    let started = Instant::now();
    loop {
        let output = Command::new("sshpass")
            .args(["-p", "antidotepassword", "ssh"])
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
            .args(["-o", "ConnectTimeout=20", "-o", "PreferredAuthentications=password,keyboard-interactive"])
            .args(["-p", &port.to_string()])
            .arg(format!("antidote@{addr}"))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .expect("running sshpass (apt-get install sshpass openssh-client)");
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        if output.status.code() != Some(255) || started.elapsed() > Duration::from_secs(60) {
            return (output.status.success(), text);
        }
        println!("ssh to {addr} failed, retrying: {}", text.trim());
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Tests that boot `frr` guests take turns: each guest wants two TCG vCPUs, and three at
/// once on a small machine make everything crawl.
pub(crate) fn frr_turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn linux_image_becomes_healthy_serves_the_lesson_and_stops_cleanly() {
    let image = build_image("linux");
    let lesson = temp_dir("image-linux");
    let text = "Hello from the lesson directory, through an endpoint image.\n";
    std::fs::write(lesson.path().join("hello.txt"), text).unwrap();
    let network = network();
    let container = run_endpoint(&image, &network, lesson.path(), &[]);
    let took = container.wait_healthy(BOOT_TIMEOUT);
    println!("linux: container start to healthy in {took:?}");
    assert_eq!(container.status()["boot"]["from"], "snapshot", "{}", container.logs(None));
    // QEMU runs as the image's unprivileged user, from the snapshot too.
    let status = container.status();
    assert_eq!(
        (&status["qemu_user"], &status["qemu_user_note"]),
        (&"vial-qemu".into(), &serde_json::Value::Null),
        "{status}"
    );
    let uid = docker::stdout(&["exec", container.name(), "id", "-u", "vial-qemu"]).unwrap();
    let processes = docker::stdout(&["top", container.name(), "-eo", "pid,uid,args"]).unwrap();
    let qemu = processes.lines().find(|line| line.contains("qemu-system")).unwrap_or_default();
    assert_eq!(qemu.split_whitespace().nth(1), Some(uid.trim()), "qemu's uid:\n{processes}");
    let addr = container.address().unwrap();
    let body = wait_until(Duration::from_secs(10), "the lesson file over HTTP", || http_get(addr, 80, "/hello.txt"));
    assert_eq!(body, text);
    container.stop_cleanly();
}

#[test]
fn linux_image_is_ready_again_after_docker_restart_and_after_docker_kill_and_start() {
    let image = build_image("linux");
    let lesson = temp_dir("image-restart");
    std::fs::write(lesson.path().join("hello.txt"), "again").unwrap();
    let network = network();
    let container = run_endpoint(&image, &network, lesson.path(), &[]);
    container.wait_healthy(BOOT_TIMEOUT);
    let served = |container: &Container| {
        let addr = container.address().unwrap();
        wait_until(Duration::from_secs(30), "the lesson file", || http_get(addr, 80, "/hello.txt"))
    };
    assert_eq!(served(&container), "again");

    // A clean restart: vial stops the guest, the container starts again over its own
    // leftovers (run directory, sockets, last status).
    docker::stdout(&["restart", container.name()]).unwrap();
    container.wait_healthy(BOOT_TIMEOUT);
    assert_eq!(served(&container), "again");

    // An unclean one: vial gets no chance to clean up.
    docker::stdout(&["kill", container.name()]).unwrap();
    docker::stdout(&["start", container.name()]).unwrap();
    container.wait_healthy(BOOT_TIMEOUT);
    assert_eq!(served(&container), "again");
    let status = container.status();
    assert_eq!(status["state"], "ready", "{status}");
    container.stop_cleanly();
}

#[test]
fn frr_image_logs_in_over_ssh_runs_vtysh_took_dhcp_and_stops_cleanly() {
    let image = build_image("frr");
    let _turn = frr_turn();
    // The endpoint's own folder in the lesson directory, as vial-lesson-config looks for it.
    let lesson = temp_dir("image-frr");
    let configs = lesson.path().join("frr1");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("frr.conf"),
        "frr defaults traditional\nhostname frr1\n!\nrouter ospf\n ospf router-id 192.0.2.11\n!\n",
    )
    .unwrap();
    let network = network();
    // A cold boot (the OSPF test below starts from the image's snapshot). The endpoint's name
    // is the container's host name, as a lab tool sets it; vial hands it to the guest.
    let container = run_endpoint(&image, &network, lesson.path(), &["--hostname", "frr1", "-e", "VIAL_SNAPSHOT=off"]);
    let took = container.wait_healthy(FRR_BOOT_TIMEOUT);
    println!("frr: container start to healthy in {took:?} (cold boot)");
    assert_eq!(container.status()["boot"]["from"], "cold");
    let addr = container.address().unwrap();

    let (ok, version) = ssh(addr, "sudo vtysh -c 'show version'");
    assert!(ok && version.contains("FRRouting"), "sudo vtysh -c 'show version' over SSH:\n{version}");

    // Named as on Antidote's frr image: function 0 of the multifunction slot 3.
    let (ok, eth0) = ssh(addr, "ip -4 addr show dev enp0s3f0; cat /var/lib/dhcp/dhclient.enp0s3f0.leases");
    assert!(ok, "{eth0}");
    assert!(
        eth0.contains("inet 10.0.2.15/24") && eth0.contains("dynamic") && eth0.contains("lease {"),
        "enp0s3f0 did not take its address by DHCP:\n{eth0}"
    );

    // The lesson's frr.conf reached FRR through the 9p share, before FRR started.
    let (ok, config) = ssh(addr, "hostname; sudo vtysh -c 'show running-config'");
    assert!(ok && config.contains("ospf router-id 192.0.2.11"), "the lesson's frr.conf is not running:\n{config}");
    assert!(config.starts_with("frr1\n"), "the guest did not take its name from vial (fw_cfg):\n{config}");

    container.stop_cleanly();
}

#[test]
fn cumulus_image_without_a_source_fails_fast_naming_the_file_and_where_to_get_it() {
    let output = xtask_image(&["cumulus"], &["VIAL_CUMULUS_SOURCE"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it built without a source?\n{stdout}\n{stderr}");
    assert!(stderr.contains("cumulus-linux-") && stderr.contains("-vx-amd64-qemu.qcow2"), "{stderr}");
    assert!(stderr.contains("https://www.nvidia.com/"), "{stderr}");
    assert!(stderr.contains("--source FILE or VIAL_CUMULUS_SOURCE=FILE"), "{stderr}");
    // Fast: it stopped before any build step (packages, the static binary, Docker).
    assert!(stdout.trim().is_empty(), "it started building before checking the source:\n{stdout}");
}

/// The lesson files of two routers cabled eth1 to eth1: a /30 and OSPF area 0 on it,
/// point-to-point with short timers so the adjacency forms quickly.
fn ospf_lesson(lesson: &Path) {
    for n in [1, 2] {
        let dir = lesson.join(format!("r{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "frr defaults traditional\nhostname r{n}\n!\ninterface enp0s3f1\n ip address 10.12.0.{n}/30\n \
             ip ospf network point-to-point\n ip ospf hello-interval 1\n ip ospf dead-interval 4\n!\n\
             router ospf\n ospf router-id 192.0.2.{n}\n network 10.12.0.0/30 area 0\n!\n"
        );
        std::fs::write(dir.join("frr.conf"), config).unwrap();
    }
}

#[test]
fn two_frr_endpoints_cabled_through_eth1_form_an_ospf_adjacency_from_lesson_files() {
    let image = build_image("frr");
    let _turn = frr_turn();
    let lesson = temp_dir("image-ospf");
    ospf_lesson(lesson.path());
    let management = network();
    let cable = link();
    let routers: Vec<Container> = ["r1", "r2"]
        .iter()
        .map(|name| {
            let router =
                run_endpoint(&image, &management, lesson.path(), &["--hostname", name, "-e", "VIAL_DATA_IFACES=1"]);
            router.connect(&cable).unwrap();
            router
        })
        .collect();
    for router in &routers {
        let took = router.wait_healthy(FRR_BOOT_TIMEOUT);
        println!("{}: healthy after {took:?} more", router.name());
        // From the image's RAM snapshot: the lesson share and eth1 were hot-plugged after it
        // loaded, and the guest took its name and frr.conf then.
        let status = router.status();
        assert_eq!(status["boot"]["from"], "snapshot", "{status}\n{}", router.logs(None));
    }
    // Each sees the other, over eth1, with the configuration the lesson directory gave it.
    for (router, neighbor) in routers.iter().zip(["192.0.2.2", "192.0.2.1"]) {
        let addr = router.address().unwrap();
        let started = Instant::now();
        loop {
            let (ok, neighbors) = ssh(addr, "sudo vtysh -c 'show ip ospf neighbor'");
            if ok && neighbors.lines().any(|l| l.starts_with(neighbor) && l.contains("Full")) {
                println!("{}: {}", router.name(), neighbors.trim());
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{} has no full adjacency with {neighbor}:\n{neighbors}\n{}",
                router.name(),
                ssh(addr, "ip -br addr; sudo vtysh -c 'show running-config'").1
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
