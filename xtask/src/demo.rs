//! `cargo xtask demo`: builds what is missing and brings up the example lesson
//! (`examples/lessons/ospf-basics`: two `frr` routers and a `utility` container, OSPF
//! configured by a python stage script) with `vialctl`, shows its status and a router's OSPF
//! neighbors, and tears it down on Ctrl-C.
//!
//! `cargo xtask demo endpoint` runs one endpoint alone instead, `vial` with the `linux` test
//! guest, in a sandbox (its own PID, network and mount namespaces; eth0 a veth whose peer is
//! on this host with 198.18.0.1/24).

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use testkit::sandbox::{Environment, Layout, Sandbox};

const NETNS: &str = "vial-demo";
const HOST_IF: &str = "vial-demo0";
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ENDPOINT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// The example lesson.
const LESSON: &str = "examples/lessons/ospf-basics";
/// Its slug.
const SLUG: &str = "ospf-basics";

/// Options: `--exit-when-ready` stops as soon as everything is ready (for scripts); `endpoint`
/// runs the one-endpoint demo.
pub(crate) fn run(args: &[&str]) -> Result<()> {
    let (endpoint, exit_when_ready) = match args {
        [] => (false, false),
        ["--exit-when-ready"] => (false, true),
        ["endpoint"] => (true, false),
        ["endpoint", "--exit-when-ready"] => (true, true),
        other => bail!("unknown demo arguments {other:?}: cargo xtask demo [endpoint] [--exit-when-ready]"),
    };
    if endpoint {
        endpoint_demo(exit_when_ready)
    } else {
        lesson_demo(exit_when_ready)
    }
}

fn lesson_demo(exit_when_ready: bool) -> Result<()> {
    crate::setup::run()?;
    crate::docker::ensure_dockerd()?;
    for image in ["frr", "utility", "configurator"] {
        crate::image::run(&[image])?;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::run_cmd(&cargo, &["build", "--quiet", "--bin", "vialctl"])?;
    let vialctl = crate::cargo_target_dir().join("debug/vialctl");
    let state = crate::project_root().join("target/demo/state");
    let accel = std::env::var("VIAL_ACCEL").unwrap_or_else(|_| "tcg".into());
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;
    let ctl = |args: &[&str]| -> Result<std::process::Output> {
        let mut cmd = std::process::Command::new(&vialctl);
        cmd.arg("--state-dir").arg(&state).args(args).env("VIALCTL_ACCEL", &accel).current_dir(crate::project_root());
        cmd.stdin(std::process::Stdio::null()).output().with_context(|| format!("running {}", vialctl.display()))
    };
    // A demo interrupted earlier may have left its lesson up.
    let _ = ctl(&["down", SLUG]);
    println!(
        "
bringing up {LESSON} (accel {accel}; VIAL_ACCEL=auto on a host where KVM works)"
    );
    let mut up = std::process::Command::new(&vialctl);
    up.arg("--state-dir").arg(&state).args(["up", LESSON, "--mgmt-pool", "198.18.0.0/24"]);
    up.env("VIALCTL_ACCEL", &accel).current_dir(crate::project_root()).process_group(0);
    let status = up.status().context("running vialctl up")?;
    if !status.success() {
        bail!("vialctl up failed ({status})");
    }
    print!("{}", String::from_utf8_lossy(&ctl(&["status", SLUG])?.stdout));
    let lesson_status: serde_json::Value = serde_json::from_slice(&ctl(&["status", SLUG, "--json"])?.stdout)?;
    let port = lesson_status[SLUG]
        .as_array()
        .and_then(|endpoints| endpoints.iter().find(|e| e["endpoint"] == "r1"))
        .and_then(|r1| r1["ports"]["22"].as_u64())
        .context("r1 has no published SSH port")?;
    let started = Instant::now();
    loop {
        let neighbors = std::process::Command::new("sshpass")
            .args([
                "-p",
                "antidotepassword",
                "ssh",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "-p", &port.to_string(), "antidote@127.0.0.1"])
            .arg("sudo vtysh -c 'show ip ospf neighbor'")
            .output()?;
        let text = String::from_utf8_lossy(&neighbors.stdout).into_owned();
        if text.contains("Full") || started.elapsed() > Duration::from_secs(120) || interrupted.load(Ordering::SeqCst) {
            println!(
                "
r1's OSPF neighbors:
{text}"
            );
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!("log in:  ssh -p {port} antidote@127.0.0.1   (password antidotepassword)");
    println!(
        "operate: {} --state-dir {} status|graph|link set r1:eth1 down|restart r2",
        vialctl.display(),
        state.display()
    );
    if !exit_when_ready {
        println!("Ctrl-C takes the lesson down.");
        while !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let down = ctl(&["down", SLUG])?;
    print!("{}", String::from_utf8_lossy(&down.stdout));
    if !down.status.success() {
        bail!("vialctl down failed: {}", String::from_utf8_lossy(&down.stderr));
    }
    Ok(())
}

fn endpoint_demo(exit_when_ready: bool) -> Result<()> {
    crate::setup::run()?;
    let vial = crate::dist::run()?;
    let guest = crate::guest::run()?;

    let root = crate::project_root().join("target/demo");
    let _ = std::fs::remove_dir_all(&root);
    // Replaces what an earlier demo may have left (a killed terminal, say); removed again on
    // every path out of here.
    let sandbox = Sandbox::create(Layout {
        netns: NETNS.into(),
        host_if: HOST_IF.into(),
        host_addr: HOST_ADDR,
        addr: ENDPOINT_ADDR,
        dir: root,
        vial,
        guest,
        profile: crate::project_root().join("vm-profiles/linux.toml"),
        name: "demo1".into(),
    })
    .context("setting up the demo's sandbox")?;
    std::fs::write(
        sandbox.lesson.join("hello.txt"),
        "Hello from the lesson directory, served by the guest over virtio-9p.\n",
    )?;
    run_endpoint(sandbox, exit_when_ready)
}

fn run_endpoint(mut sandbox: Sandbox, exit_when_ready: bool) -> Result<()> {
    // Ctrl-C reaches only this process: the endpoint runs in its own process group, and we
    // turn the interrupt into the SIGTERM that `docker stop` would send.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;

    let accel = std::env::var("VIAL_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut endpoint = sandbox.command("", Environment::Inherited);
    endpoint.env("VIAL_ACCEL", &accel).process_group(0);
    sandbox.spawn(endpoint).context("starting the endpoint")?;
    println!("\nendpoint starting (accel {accel}; set VIAL_ACCEL=auto on a host where KVM works)");
    let start = Instant::now();
    let mut ready = false;
    loop {
        if let Some(status) = sandbox.try_wait()? {
            println!("vial exited: {status}");
            return Ok(());
        }
        if interrupted.load(Ordering::SeqCst) || (ready && exit_when_ready) {
            break;
        }
        if !ready && sandbox.health(&["--ready"])?.0 == 0 {
            ready = true;
            let (_, status) = sandbox.health(&["--status"])?;
            println!("ready after {:.1} s:\n{status}", start.elapsed().as_secs_f64());
            let (run_dir, vial) = (sandbox.run_dir.display(), sandbox.vial().display());
            println!("reach it:      curl http://{ENDPOINT_ADDR}/hello.txt");
            println!("health:        VIAL_RUN_DIR={run_dir} {vial} health --status");
            println!("serial console: socat -,rawer UNIX:{}", sandbox.run_dir.join("console.sock").display());
            println!("Ctrl-C stops the guest cleanly.");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping: SIGTERM to vial");
    sandbox.terminate()?;
    let status = sandbox.wait(Duration::MAX)?;
    println!("vial exited: {status} (0 means the guest powered off cleanly)");
    if !status.success() {
        bail!("the endpoint did not stop cleanly: {status}");
    }
    Ok(())
}
