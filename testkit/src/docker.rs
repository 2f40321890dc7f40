//! Docker networks and containers for tests and benchmarks, each a guard that removes what it
//! made when dropped, so every path, a failed assertion or an error included, removes them.
//! It drives the `docker` CLI, as a user would, and never starts an engine or builds an image
//! (xtask's `docker` module does that).
//!
//! Networks are user-defined, in 198.18.X.0/24 (RFC 2544's benchmarking range, never routed;
//! never Docker's default bridge). Each caller keeps to its own range of third octets:
//! 198.18.0.0/24 is `cargo xtask demo`'s, the image tests take 40 to 239, `bench images` 240 to
//! 254; within its range a network steps over subnets that others already hold.

use std::ops::RangeInclusive;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A `docker` command that could not run or failed.
#[derive(thiserror::Error)]
pub enum Error {
    #[error("could not run `docker {args}` (apt-get install docker.io)")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`docker {args}` failed ({status}): {stderr}")]
    Failed { args: String, status: ExitStatus, stderr: String },
    #[error("no free subnet 198.18.X.0/24 with X in {octets:?}")]
    NoFreeSubnet { octets: RangeInclusive<u8> },
    #[error("container {container} has no IPv4 address on {network}: {text:?}")]
    NoAddress { container: String, network: String, text: String },
}

crate::debug_as_chain!(Error);

/// `docker args...` with its output, whatever its exit status.
pub fn output(args: &[&str]) -> Result<Output, Error> {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn { args: args.join(" "), source })
}

/// `docker args...`, which must succeed; its stdout, trimmed.
pub fn stdout(args: &[&str]) -> Result<String, Error> {
    let output = output(args)?;
    if !output.status.success() {
        return Err(Error::Failed {
            args: args.join(" "),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// `<prefix>-<pid>-<n>`: unique among the networks and containers of this process, and
/// telling whose they are when one is left behind (a SIGKILLed test).
fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst))
}

/// Runs a removal from a guard's `drop`; a failure is reported, not raised.
fn remove(args: &[&str], what: &str) {
    if let Err(err) = stdout(args) {
        eprintln!("testkit: could not remove {what}: {err:?}");
    }
}

/// What a network connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A gateway on the host: the test reaches the containers through it.
    Host,
    /// `--internal`: nothing but the containers on it (a data link between endpoints).
    Internal,
}

/// A user-defined Docker network in 198.18.X.0/24, removed on drop.
pub struct Network {
    name: String,
    subnet: String,
}

impl Network {
    /// Creates `<prefix>-<pid>-<n>` on the first free 198.18.X.0/24 with X in `octets`,
    /// starting at one picked by pid and count, so two runs rarely try the same ones.
    pub fn create(prefix: &str, octets: RangeInclusive<u8>, reach: Reach) -> Result<Network, Error> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = unique_name(prefix);
        let (first, count) = (u32::from(*octets.start()), u32::from(*octets.end()) - u32::from(*octets.start()) + 1);
        let offset = (std::process::id() * 7 + NEXT.fetch_add(1, Ordering::SeqCst) * 13) % count;
        for step in 0..count {
            let subnet = format!("198.18.{}.0/24", first + (offset + step) % count);
            let mut args = vec!["network", "create", "--subnet", &subnet];
            if reach == Reach::Internal {
                args.push("--internal");
            }
            args.push(&name);
            match stdout(&args) {
                Ok(_) => return Ok(Network { name, subnet }),
                // Another network holds this subnet: try the next.
                Err(Error::Failed { stderr, .. }) if stderr.contains("overlap") => continue,
                Err(err) => return Err(err),
            }
        }
        Err(Error::NoFreeSubnet { octets })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `198.18.X.0/24`.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove(&["network", "rm", &self.name], &format!("network {}", self.name));
    }
}

/// A detached container, force-removed on drop.
pub struct Container {
    name: String,
    /// The network it was started on (its eth0).
    network: String,
}

impl Container {
    /// `docker` with the arguments `args` makes from the container's name (`run -d --name
    /// NAME --network NETWORK ...`; vial's `contract::DockerRun::args` makes them for an
    /// endpoint). The guard exists before `docker run`, so a container that was created but
    /// failed to start is removed too.
    pub fn run(prefix: &str, network: &Network, args: impl FnOnce(&str) -> Vec<String>) -> Result<Container, Error> {
        let container = Container { name: unique_name(prefix), network: network.name.clone() };
        let args = args(&container.name);
        stdout(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(container)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker inspect --format FORMAT`, trimmed.
    pub fn inspect(&self, format: &str) -> Result<String, Error> {
        stdout(&["inspect", "--format", format, &self.name])
    }

    /// Its address on the network it was started on.
    pub fn address(&self) -> Result<std::net::Ipv4Addr, Error> {
        let format = format!("{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}", self.network);
        let text = self.inspect(&format)?;
        text.parse().map_err(|_| Error::NoAddress { container: self.name.clone(), network: self.network.clone(), text })
    }

    /// Plugs `network` in, as an orchestrator does after the start (it becomes eth1, ...).
    pub fn connect(&self, network: &Network) -> Result<(), Error> {
        stdout(&["network", "connect", &network.name, &self.name]).map(drop)
    }

    /// `docker logs`, stdout then stderr (vial logs to stderr); the last `lines` when given.
    /// A log that cannot be read says why instead.
    pub fn logs(&self, lines: Option<usize>) -> String {
        let tail = lines.map(|n| n.to_string());
        let mut args = vec!["logs"];
        if let Some(tail) = &tail {
            args.extend(["--tail", tail]);
        }
        args.push(&self.name);
        match output(&args) {
            Ok(output) => {
                format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
            }
            Err(err) => format!("(no log: {err:?})"),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        remove(&["rm", "--force", &self.name], &format!("container {}", self.name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_say_whose_they_are() {
        let (one, two) = (unique_name("vialtest-net"), unique_name("vialtest-net"));
        assert_ne!(one, two);
        assert!(one.starts_with(&format!("vialtest-net-{}-", std::process::id())), "{one}");
    }

    #[test]
    fn a_failed_command_names_itself_and_its_stderr() {
        let err = Error::Failed {
            args: "network rm x".into(),
            status: ExitStatus::default(),
            stderr: "Error: No such network: x".into(),
        };
        assert_eq!(format!("{err:?}"), "`docker network rm x` failed (exit status: 0): Error: No such network: x");
    }
}
