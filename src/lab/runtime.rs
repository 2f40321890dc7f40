//! The container runtime a lesson runs on, behind one interface: what `vialctl` asks of an
//! engine (images, networks, containers, their logs), in the lesson's own words. The Docker
//! Engine backend is `lab::docker`; a Kubernetes backend (Pods plus Multus network
//! attachments, as Antidote ran) would be a second implementation of [`Runtime`].
//!
//! Plain data and one trait: this file never talks to an engine.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// What the runtime knows of an image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageInfo {
    /// Its labels (`vial.profile`, `vial.credentials`, `vial.snapshot`).
    pub labels: BTreeMap<String, String>,
}

/// A management network for one lesson.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// Its name.
    pub name: String,
    /// Its subnet, or `None` for the engine's own pool.
    pub subnet: Option<ipnetwork::Ipv4Network>,
    /// Labels (lesson, owner).
    pub labels: BTreeMap<String, String>,
}

/// A container port published on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The port in the container.
    pub container_port: u16,
    /// The host address it is published on (loopback by default).
    pub host_address: Ipv4Addr,
    /// The host port, or `None` for a free one the engine picks.
    pub host_port: Option<u16>,
}

/// A bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path.
    pub host: PathBuf,
    /// The path in the container.
    pub container: String,
    /// Read-only.
    pub read_only: bool,
}

/// One container to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    /// Its name (unique on the engine).
    pub name: String,
    /// Its host name.
    pub hostname: String,
    /// The image reference.
    pub image: String,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Labels (lesson, endpoint, owner).
    pub labels: BTreeMap<String, String>,
    /// The network its management interface joins, and its alias there.
    pub network: String,
    /// Ports published on the host.
    pub publish: Vec<Publish>,
    /// Bind mounts.
    pub binds: Vec<Bind>,
    /// Devices passed through (`/dev/net/tun`, `/dev/kvm`).
    pub devices: Vec<String>,
    /// Capabilities added (`NET_ADMIN`).
    pub cap_add: Vec<String>,
    /// Namespaced sysctls set at creation (`net.bridge.bridge-nf-call-iptables=0`).
    pub sysctls: BTreeMap<String, String>,
    /// A command instead of the image's (a configurator's script).
    pub cmd: Option<Vec<String>>,
}

/// What the runtime knows of a container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerInfo {
    /// Whether it runs.
    pub running: bool,
    /// Its init's pid on the host (its network namespace is `/proc/PID/ns/net`), while it runs.
    pub pid: Option<u32>,
    /// Its exit code, once it exited.
    pub exit_code: Option<i64>,
    /// Its address on its management network.
    pub address: Option<Ipv4Addr>,
    /// Published ports: container port → host port.
    pub ports: BTreeMap<u16, u16>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its image reference.
    pub image: String,
}

/// Why the runtime could not do something; `what` says what was asked.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct RuntimeError {
    /// What was asked (`create container vial-ospf-r1`).
    pub what: String,
    /// What the engine said.
    pub message: String,
    /// Whether the object does not exist (404).
    pub not_found: bool,
}

/// A container runtime. Every method is one request to the engine; none waits for more than
/// the engine's own answer, except [`Runtime::wait`], which waits for a container to exit.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// The image `reference`, or `None` when the engine does not have it.
    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError>;
    /// The subnets of every network the engine has.
    async fn network_subnets(&self) -> Result<Vec<ipnetwork::Ipv4Network>, RuntimeError>;
    /// Creates a network.
    async fn create_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError>;
    /// Removes a network; one that does not exist is not an error.
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError>;
    /// Names of the networks that carry `label=value`.
    async fn networks_labelled(&self, label: &str, value: &str) -> Result<Vec<String>, RuntimeError>;
    /// Creates a container (not started).
    async fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError>;
    /// Starts a created container.
    async fn start(&self, name: &str) -> Result<(), RuntimeError>;
    /// Removes a container, killing it if it runs; one that does not exist is not an error.
    async fn remove(&self, name: &str) -> Result<(), RuntimeError>;
    /// The container `name`, or `None` when there is none.
    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, RuntimeError>;
    /// Names of the containers (running or not) that carry `label=value`.
    async fn containers_labelled(&self, label: &str, value: &str) -> Result<Vec<String>, RuntimeError>;
    /// The last `lines` lines of its output.
    async fn logs(&self, name: &str, lines: usize) -> Result<String, RuntimeError>;
    /// Waits until the container exits; its exit code.
    async fn wait(&self, name: &str) -> Result<i64, RuntimeError>;
}
