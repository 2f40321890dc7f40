//! `cargo xtask demo`: builds what is missing and runs one endpoint, `vial` with the `linux`
//! test guest, in a sandbox (its own PID, network and mount namespaces; eth0 a veth whose
//! peer is on this host with 198.18.0.1/24), prints where to reach it and its health, and
//! stops it cleanly on Ctrl-C.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const NETNS: &str = "vial-demo";
const HOST_IF: &str = "vial-demo0";
const HOST_ADDR: &str = "198.18.0.1/24";
const ENDPOINT_ADDR: &str = "198.18.0.2";

fn ip(args: &[&str]) -> Result<()> {
    crate::run_cmd("ip", args)
}

/// Removes what an earlier demo may have left (a killed terminal, say).
fn remove_sandbox() {
    let quiet = |args: &[&str]| Command::new("ip").args(args).stderr(Stdio::null()).status();
    let _ = quiet(&["link", "del", HOST_IF]);
    let _ = quiet(&["netns", "del", NETNS]);
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

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
    let (lesson, bundle, run_dir) = (root.join("lesson"), root.join("bundle"), root.join("run"));
    let _ = std::fs::remove_dir_all(&root);
    for dir in [&lesson, &bundle] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(lesson.join("hello.txt"), "Hello from the lesson directory, served by the guest over virtio-9p.\n")?;
    std::fs::copy(crate::project_root().join("vm-profiles/linux.toml"), bundle.join("profile.toml"))?;
    std::os::unix::fs::symlink(&guest, bundle.join("guest"))?;

    remove_sandbox();
    ip(&["netns", "add", NETNS])?;
    let result = run_endpoint(&vial, &lesson, &bundle, &run_dir, &root, exit_when_ready);
    remove_sandbox();
    result
}

fn run_endpoint(
    vial: &Path,
    lesson: &Path,
    bundle: &Path,
    run_dir: &Path,
    root: &Path,
    exit_when_ready: bool,
) -> Result<()> {
    ip(&["link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", NETNS])?;
    ip(&["addr", "add", HOST_ADDR, "dev", HOST_IF])?;
    ip(&["link", "set", HOST_IF, "up"])?;
    ip(&["-n", NETNS, "addr", "add", &format!("{ENDPOINT_ADDR}/24"), "dev", "eth0"])?;
    ip(&["-n", NETNS, "link", "set", "eth0", "up"])?;
    ip(&["-n", NETNS, "link", "set", "lo", "up"])?;

    // Ctrl-C reaches only this process: the endpoint runs in its own process group, and we
    // turn the interrupt into the SIGTERM that `docker stop` would send.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;

    let accel = std::env::var("VIAL_ACCEL").unwrap_or_else(|_| "tcg".into());
    let mut endpoint = Command::new("ip")
        .args(["netns", "exec", NETNS, "unshare", "--pid", "--fork", "--mount", "--kill-child", "--"])
        .arg(vial)
        .env("VIAL_PROFILE", bundle.join("profile.toml"))
        .env("VIAL_RUN_DIR", run_dir)
        .env("VIAL_STATE_DIR", root.join("state"))
        .env("VIAL_LESSON_DIR", lesson)
        .env("VIAL_ACCEL", &accel)
        .env("VIAL_NAME", "demo1")
        .process_group(0)
        .spawn()
        .context("starting the endpoint")?;
    let health = |flag: &str| {
        Command::new(vial).args(["health", flag]).env("VIAL_RUN_DIR", run_dir).stderr(Stdio::null()).output()
    };
    println!("\nendpoint starting (accel {accel}; set VIAL_ACCEL=auto on a host where KVM works)");
    let start = Instant::now();
    let mut ready = false;
    loop {
        if let Some(status) = endpoint.try_wait()? {
            println!("vial exited: {status}");
            return Ok(());
        }
        if interrupted.load(Ordering::SeqCst) || (ready && exit_when_ready) {
            break;
        }
        if !ready && health("--ready").is_ok_and(|o| o.status.success()) {
            ready = true;
            let status = health("--status")?;
            println!(
                "ready after {:.1} s:\n{}",
                start.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&status.stdout)
            );
            println!("reach it:      curl http://{ENDPOINT_ADDR}/hello.txt");
            println!("health:        VIAL_RUN_DIR={} {} health --status", run_dir.display(), vial.display());
            println!("serial console: socat -,rawer UNIX:{}", run_dir.join("console.sock").display());
            println!("Ctrl-C stops the guest cleanly.");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping: SIGTERM to vial");
    if let Some(pid) = children(endpoint.id()).first() {
        Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    }
    let status = endpoint.wait()?;
    println!("vial exited: {status} (0 means the guest powered off cleanly)");
    if !status.success() {
        bail!("the endpoint did not stop cleanly: {status}");
    }
    Ok(())
}
