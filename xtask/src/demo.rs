//! `cargo xtask demo`: builds what is missing and runs one endpoint, `vial` with the `linux`
//! test guest, in a sandbox (its own PID, network and mount namespaces; eth0 a veth whose
//! peer is on this host with 198.18.0.1/24), prints where to reach it and its health, and
//! stops it cleanly on Ctrl-C.

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

/// Options: `--exit-when-ready` stops the endpoint as soon as it is ready (for scripts).
pub(crate) fn run(args: &[&str]) -> Result<()> {
    let exit_when_ready = match args {
        [] => false,
        ["--exit-when-ready"] => true,
        other => bail!("unknown demo arguments {other:?}; the only option is --exit-when-ready"),
    };
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
