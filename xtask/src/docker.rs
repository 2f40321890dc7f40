//! The Docker engine that `cargo xtask image` and the Docker tests talk to: find it, or start
//! one. This module never builds images and never touches containers; it only makes sure
//! `docker info` answers, and runs `docker` for the others.
//!
//! A dockerd we start keeps off the host's networks and firewall:
//!
//! - `--bridge=none`: no default `docker0` bridge in 172.17.0.0/16 (a range that may be in use
//!   on the host's own networks); containers join a user-defined network instead, made with
//!   `docker network create --subnet 198.18.X.0/24`.
//! - `--default-address-pool base=198.18.0.0/16,size=24`: networks made without `--subnet`
//!   also come from RFC 2544's benchmarking range, which no real network uses.
//! - `--iptables=false --ip-forward=false`: no NAT, filter rules or `ip_forward` sysctl changes
//!   on a host that other work (network namespaces, other VMs) shares. Nothing here needs them:
//!   the host reaches containers on the bridge directly, and the endpoints' guests have no egress.
//! - storage driver `overlay2`, or `vfs` when the kernel or the backing filesystem cannot do
//!   overlay (slow and large, but it works everywhere).
//!
//! Its log goes to `target/dockerd.log` and its pid to `target/dockerd.pid`; it keeps running
//! after xtask exits, like an engine started by the init system would.

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The flags of a dockerd this module starts, besides `--storage-driver`.
pub(crate) const DOCKERD_FLAGS: &[&str] = &[
    "--bridge=none",
    "--default-address-pool",
    "base=198.18.0.0/16,size=24",
    "--iptables=false",
    "--ip-forward=false",
];

/// Storage drivers to try, in order.
const STORAGE_DRIVERS: &[&str] = &["overlay2", "vfs"];

/// How long a starting dockerd gets to answer `docker info`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn log_path() -> PathBuf {
    crate::project_root().join("target/dockerd.log")
}

/// Makes sure a Docker engine answers, starting dockerd (see the module docs) when none does.
pub(crate) fn ensure_dockerd() -> Result<()> {
    if let Some(version) = server_version() {
        println!("docker: engine {version} answers");
        return Ok(());
    }
    if let Some(host) = std::env::var_os("DOCKER_HOST").filter(|h| !h.is_empty()) {
        bail!(
            "the Docker engine at DOCKER_HOST={} does not answer `docker info`; start it, or unset \
             DOCKER_HOST to let xtask start a local dockerd",
            host.to_string_lossy()
        );
    }
    if which("dockerd").is_none() || which("docker").is_none() {
        bail!("dockerd or docker is not installed: run `cargo xtask setup` (or apt-get install docker.io)");
    }
    let target = crate::project_root().join("target");
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    // Two builds or tests starting at once must not start two engines on one socket.
    let lock = File::create(target.join("dockerd.lock")).context("creating target/dockerd.lock")?;
    lock.lock().context("locking target/dockerd.lock")?;
    if let Some(version) = server_version() {
        println!("docker: engine {version} answers");
        return Ok(());
    }

    let mut last_error = None;
    for driver in STORAGE_DRIVERS {
        match start(driver) {
            Ok(()) => return Ok(()),
            Err(err) => {
                eprintln!("docker: dockerd with storage driver {driver} did not come up: {err:#}");
                last_error = Some(err);
            }
        }
    }
    Err(last_error.expect("at least one storage driver was tried"))
}

/// Starts one dockerd with `driver` and waits until it answers; stops it (by its pid) again
/// when it does not.
fn start(driver: &str) -> Result<()> {
    let log_path = log_path();
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new("setsid");
    // setsid: a session of its own, so closing the terminal that ran xtask does not hang it up.
    cmd.arg("dockerd")
        .args(DOCKERD_FLAGS)
        .arg(format!("--storage-driver={driver}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    println!("docker: starting `{}` (log: {})", crate::display_cmd(&cmd), log_path.display());
    let mut child = cmd.spawn().context("starting dockerd")?;
    let pid = child.id();
    fs::write(crate::project_root().join("target/dockerd.pid"), format!("{pid}\n"))?;

    let started = Instant::now();
    loop {
        if let Some(version) = server_version() {
            println!(
                "docker: engine {version} answers after {:.1} s (pid {pid}, storage driver {driver}; stop it with \
                 `kill {pid}`)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("dockerd exited ({status}); the end of {}:\n{}", log_path.display(), log_tail(log_start, 30));
        }
        if started.elapsed() > START_TIMEOUT {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let _ = child.wait();
            bail!(
                "dockerd did not answer `docker info` within {START_TIMEOUT:?}; the end of {}:\n{}",
                log_path.display(),
                log_tail(log_start, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The engine's version when `docker info` answers.
fn server_version() -> Option<String> {
    let output = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    (output.status.success() && !version.is_empty()).then_some(version)
}

/// The last `lines` lines the log got since `offset`.
fn log_tail(offset: u64, lines: usize) -> String {
    let text = fs::read(log_path()).unwrap_or_default();
    let text = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Runs `docker args...` and returns its output; fails with the command and its stderr.
pub(crate) fn docker(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new("docker");
    cmd.args(args).stdin(Stdio::null());
    let output = cmd.output().with_context(|| format!("running `{}`", crate::display_cmd(&cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            crate::display_cmd(&cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// The value of `{{format}}` for an image, or `None` when the image does not exist.
pub(crate) fn inspect_image(image: &str, format: &str) -> Option<String> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", format, image])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}
