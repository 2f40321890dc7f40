//! The endpoint sandbox of the end-to-end tests and `cargo xtask demo` (DEVELOPERS.md, "The
//! sandbox"): `vial` runs as PID 1 of its own PID and mount namespaces inside a named network
//! namespace whose eth0 is one end of a veth pair; the other end stays with the caller, with
//! an address in the same /24 of 198.18.0.0/15. Beside it, a directory holds the lesson, run
//! and state directories and a profile bundle (the profile beside a link to the guest).
//!
//! The caller says which `vial` to run and where everything goes ([`Layout`]); this module
//! never builds anything and never depends on the `vial` crate. Dropping the sandbox kills
//! the endpoint (SIGKILL to `unshare`, whose `--kill-child` takes `vial` and its PID namespace
//! along) and removes the link and the namespace; the directory is the caller's.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long `vial` may take to appear as `unshare`'s child.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often [`Sandbox::spawn`] and [`Sandbox::wait`] look.
const POLL: Duration = Duration::from_millis(100);

/// Why the sandbox could not be made, or its endpoint not run.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: ExitStatus, stderr: String },
    #[error("could not prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the endpoint is not started")]
    NotStarted,
    #[error("could not wait for the endpoint")]
    Wait(#[source] std::io::Error),
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { timeout: Duration, what: &'static str },
}

crate::debug_as_chain!(Error);

/// `ip args...`, which must succeed.
pub fn ip(args: &[&str]) -> Result<(), Error> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn { command: command.clone(), source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(Error::Failed { command, status: output.status, stderr });
    }
    Ok(())
}

/// `ip args...` whose failure is expected or only reported: removing what may not exist.
fn ip_quiet(args: &[&str]) -> bool {
    Command::new("ip").args(args).stdin(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// Direct children of `pid`, as the host sees them (every thread's, from
/// `/proc/PID/task/*/children`).
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

/// Where a sandbox lives and what it runs.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The network namespace (`ip netns`); one left over under this name is removed first.
    pub netns: String,
    /// The caller's end of the veth pair (the endpoint's end is its eth0).
    pub host_if: String,
    /// The caller's end's address, and eth0's, in one /24.
    pub host_addr: Ipv4Addr,
    pub addr: Ipv4Addr,
    /// Where `lesson/`, `run/`, `state/` and `bundle/` go; created when missing.
    pub dir: PathBuf,
    /// The `vial` binary to run.
    pub vial: PathBuf,
    /// The guest directory the bundle links to (`vmlinuz`, `initrd.img`).
    pub guest: PathBuf,
    /// The profile copied into the bundle.
    pub profile: PathBuf,
    /// The endpoint's name (`VIAL_NAME`).
    pub name: String,
}

/// Which environment the endpoint starts with, besides [`Sandbox::env`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    /// Only `PATH`: a test's result must not depend on the caller's `VIAL_*` settings.
    Clean,
    /// The caller's, as `cargo xtask demo` passes on `VIAL_LOG` and the like.
    Inherited,
}

/// An endpoint sandbox; see the module docs.
pub struct Sandbox {
    pub netns: String,
    /// eth0's address.
    pub addr: Ipv4Addr,
    pub host_addr: Ipv4Addr,
    pub dir: PathBuf,
    pub lesson: PathBuf,
    pub run_dir: PathBuf,
    /// The bundle's profile (`bundle/profile.toml`).
    pub profile: PathBuf,
    host_if: String,
    vial: PathBuf,
    /// The endpoint's name (`VIAL_NAME`).
    pub name: String,
    /// `ip netns exec ... unshare ...`, once started.
    child: Option<Child>,
}

impl Sandbox {
    /// Makes the directories, the bundle, the namespace and the veth pair, both ends up.
    pub fn create(layout: Layout) -> Result<Sandbox, Error> {
        let Layout { netns, host_if, host_addr, addr, dir, vial, guest, profile: source, name } = layout;
        let prepare = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| Error::Prepare { path, source }
        };
        let (lesson, run_dir, bundle) = (dir.join("lesson"), dir.join("run"), dir.join("bundle"));
        for dir in [&lesson, &bundle] {
            std::fs::create_dir_all(dir).map_err(prepare(dir))?;
        }
        let link = bundle.join("guest");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&guest, &link).map_err(prepare(&link))?;
        let profile = bundle.join("profile.toml");
        std::fs::copy(&source, &profile).map_err(prepare(&profile))?;

        ip_quiet(&["link", "del", &host_if]);
        ip_quiet(&["netns", "del", &netns]);
        ip(&["netns", "add", &netns])?;
        // From here on, dropping the sandbox removes what was made.
        let sandbox =
            Sandbox { netns, addr, host_addr, dir, lesson, run_dir, profile, host_if, vial, name, child: None };
        let (netns, host_if) = (sandbox.netns.as_str(), sandbox.host_if.as_str());
        ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", host_if])?;
        ip(&["link", "set", host_if, "up"])?;
        ip(&["-n", netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        Ok(sandbox)
    }

    /// The `vial` binary the sandbox runs.
    pub fn vial(&self) -> &std::path::Path {
        &self.vial
    }

    /// What every run of `vial` in the sandbox gets: its profile, directories and name. The
    /// accelerator is the profile's `auto`: vial finds out itself whether KVM runs guests.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("VIAL_PROFILE", self.profile.display().to_string()),
            ("VIAL_RUN_DIR", self.run_dir.display().to_string()),
            ("VIAL_STATE_DIR", self.dir.join("state").display().to_string()),
            ("VIAL_LESSON_DIR", self.lesson.display().to_string()),
            ("VIAL_NAME", self.name.clone()),
        ]
    }

    /// The command that runs `vial` as PID 1 of new PID and mount namespaces inside the
    /// network namespace, with [`Sandbox::env`]. `prelude` is shell run in the sandbox before
    /// `vial` is exec'd (to hide a device, say); empty for none. Add settings and stdio to it,
    /// then [`Sandbox::spawn`] it.
    pub fn command(&self, prelude: &str, environment: Environment) -> Command {
        let script = format!("{prelude}\nexec \"$0\" \"$@\"");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, "unshare", "--pid", "--fork", "--mount", "--kill-child", "--"]);
        command.args(["sh", "-c", &script]).arg(&self.vial);
        if environment == Environment::Clean {
            command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
        }
        command.envs(self.env());
        command
    }

    /// Spawns `command` (from [`Sandbox::command`]) and returns `vial`'s pid as the host sees
    /// it, or 0 when `vial` ended before it could be seen (one that fails at once).
    pub fn spawn(&mut self, mut command: Command) -> Result<u32, Error> {
        let child = command.spawn().map_err(|source| Error::Spawn { command: format!("{command:?}"), source })?;
        let unshare = child.id();
        let child = self.child.insert(child);
        let start = Instant::now();
        loop {
            if let Some(&pid) = children(unshare).first() {
                return Ok(pid);
            }
            if child.try_wait().map_err(Error::Wait)?.is_some() {
                return Ok(0);
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(Error::Timeout { timeout: START_TIMEOUT, what: "vial to start in the sandbox" });
            }
            std::thread::sleep(POLL);
        }
    }

    /// `vial`'s pid as the host sees it, while it runs.
    pub fn vial_pid(&self) -> Option<u32> {
        children(self.child.as_ref()?.id()).first().copied()
    }

    /// The endpoint's exit status (`unshare` passes on `vial`'s), once it has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child.as_mut().ok_or(Error::NotStarted)?.try_wait().map_err(Error::Wait)
    }

    /// Waits up to `timeout` for the endpoint to end; its exit status.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout { timeout, what: "vial to exit" });
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM to `vial`, as `docker stop` sends it; nothing when it does not run.
    pub fn terminate(&self) -> Result<(), Error> {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = self.vial_pid() else { return Ok(()) };
        match kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(errno) => Err(Error::Wait(errno.into())),
        }
    }

    /// `vial health <args>` from the caller's side: (exit code, stdout); -1 for a signal.
    pub fn health(&self, args: &[&str]) -> Result<(i32, String), Error> {
        let output = Command::new(&self.vial)
            .arg("health")
            .args(args)
            .env("VIAL_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn { command: format!("{} health", self.vial.display()), source })?;
        Ok((output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stdout).into_owned()))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(None) = child.try_wait() {
                // SIGKILL to unshare; --kill-child then kills vial, and the PID namespace with it.
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        ip_quiet(&["link", "del", &self.host_if]);
        if !ip_quiet(&["netns", "del", &self.netns]) {
            eprintln!("testkit: could not remove network namespace {}", self.netns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_of_this_process_include_a_child_it_started() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let found = children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?} lacks {}", child.id());
    }

    #[test]
    fn a_sandbox_runs_its_command_in_its_namespace_and_removes_it() {
        let dir = crate::TempDir::new(&std::env::temp_dir(), "testkit-sandbox").unwrap();
        // Any "guest" and "profile" do: this sandbox runs `true` instead of vial.
        std::fs::write(dir.path().join("profile.toml"), "").unwrap();
        let k = std::process::id() % 100_000;
        let layout = Layout {
            netns: format!("tkns{k}"),
            host_if: format!("tkh{k}"),
            host_addr: Ipv4Addr::new(198, 19, 251, 1),
            addr: Ipv4Addr::new(198, 19, 251, 2),
            dir: dir.path().join("sandbox"),
            vial: PathBuf::from("/bin/true"),
            guest: dir.path().to_path_buf(),
            profile: dir.path().join("profile.toml"),
            name: "testkit".into(),
        };
        let mut sandbox = Sandbox::create(layout).expect("a sandbox (run as root)");
        assert!(sandbox.profile.is_file() && sandbox.lesson.is_dir());
        // The prelude runs in the namespace: eth0 has the sandbox's address.
        let prelude = "ip -4 -o addr show dev eth0 | grep -q 198.19.251.2/24 || exit 3";
        sandbox.spawn(sandbox.command(prelude, Environment::Clean)).unwrap();
        assert_eq!(sandbox.wait(Duration::from_secs(10)).unwrap().code(), Some(0));
        let netns = sandbox.netns.clone();
        drop(sandbox);
        assert!(!ip_quiet(&["netns", "pids", &netns]), "namespace {netns} is still there");
    }
}
