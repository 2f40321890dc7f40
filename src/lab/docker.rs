//! The Docker Engine backend of [`Runtime`], through the Engine API (`bollard`), never the
//! `docker` CLI. It connects to `DOCKER_HOST` (a `unix://` socket) or `/var/run/docker.sock`,
//! and speaks the API version the engine offers.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkingConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

use super::runtime::{ContainerInfo, ContainerSpec, ImageInfo, NetworkSpec, Runtime, RuntimeError};

/// How long one request to the engine may take.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// A connection to a Docker engine.
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects to the engine and agrees on an API version.
    pub async fn connect() -> Result<DockerRuntime, RuntimeError> {
        let socket = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        let path = socket.as_deref().unwrap_or("unix:///var/run/docker.sock");
        let failed = |err: bollard::errors::Error| RuntimeError {
            what: format!("connect to the Docker engine at {path}"),
            message: format!("{err} (is dockerd running? `cargo xtask setup` installs it; DOCKER_HOST names another)"),
            not_found: false,
        };
        let docker =
            Docker::connect_with_socket(path, REQUEST_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION).map_err(failed)?;
        let docker = docker.negotiate_version().await.map_err(failed)?;
        Ok(DockerRuntime { docker })
    }
}

/// The error of one request, saying what was asked.
fn error(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    let what = what.into();
    move |err| match err {
        bollard::errors::Error::DockerResponseServerError { status_code, message } => {
            RuntimeError { what, message, not_found: status_code == 404 }
        }
        other => RuntimeError { what, message: other.to_string(), not_found: false },
    }
}

fn label_filter(label: &str, value: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([("label".to_string(), vec![format!("{label}={value}")])])
}

impl Runtime for DockerRuntime {
    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        match self.docker.inspect_image(reference).await.map_err(error(format!("inspect image {reference}"))) {
            Ok(image) => {
                let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
                Ok(Some(ImageInfo { labels: labels.into_iter().collect() }))
            }
            Err(err) if err.not_found => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn network_subnets(&self) -> Result<Vec<ipnetwork::Ipv4Network>, RuntimeError> {
        let networks = self.docker.list_networks(None).await.map_err(error("list networks"))?;
        Ok(networks
            .into_iter()
            .flat_map(|n| n.ipam.and_then(|i| i.config).unwrap_or_default())
            .filter_map(|c| c.subnet.and_then(|s| s.parse().ok()))
            .collect())
    }

    async fn create_network(&self, spec: &NetworkSpec) -> Result<(), RuntimeError> {
        let ipam = spec.subnet.map(|subnet| Ipam {
            config: Some(vec![IpamConfig { subnet: Some(subnet.to_string()), ..Default::default() }]),
            ..Default::default()
        });
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some("bridge".into()),
            ipam,
            labels: Some(spec.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        self.docker.create_network(request).await.map_err(error(format!("create network {}", spec.name)))?;
        Ok(())
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await.map_err(error(format!("remove network {name}"))) {
            Err(err) if !err.not_found => Err(err),
            _ => Ok(()),
        }
    }

    async fn networks_labelled(&self, label: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let options = ListNetworksOptionsBuilder::new().filters(&label_filter(label, value)).build();
        let networks = self.docker.list_networks(Some(options)).await.map_err(error("list networks"))?;
        Ok(networks.into_iter().filter_map(|n| n.name).collect())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<(), RuntimeError> {
        let port_bindings: HashMap<String, Option<Vec<PortBinding>>> = spec
            .publish
            .iter()
            .map(|p| {
                let host_port = p.host_port.map(|port| port.to_string()).unwrap_or_default();
                let binding = PortBinding { host_ip: Some(p.host_address.to_string()), host_port: Some(host_port) };
                (format!("{}/tcp", p.container_port), Some(vec![binding]))
            })
            .collect();
        let host_config = HostConfig {
            binds: Some(
                spec.binds
                    .iter()
                    .map(|b| format!("{}:{}{}", b.host.display(), b.container, if b.read_only { ":ro" } else { "" }))
                    .collect(),
            ),
            devices: Some(
                spec.devices
                    .iter()
                    .map(|d| DeviceMapping {
                        path_on_host: Some(d.clone()),
                        path_in_container: Some(d.clone()),
                        cgroup_permissions: Some("rwm".into()),
                    })
                    .collect(),
            ),
            cap_add: Some(spec.cap_add.clone()),
            sysctls: (!spec.sysctls.is_empty())
                .then(|| spec.sysctls.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            port_bindings: Some(port_bindings),
            network_mode: Some(spec.network.clone()),
            ..Default::default()
        };
        let endpoint = EndpointSettings { aliases: Some(vec![spec.hostname.clone()]), ..Default::default() };
        let body = ContainerCreateBody {
            hostname: Some(spec.hostname.clone()),
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            exposed_ports: Some(spec.publish.iter().map(|p| format!("{}/tcp", p.container_port)).collect()),
            cmd: spec.cmd.clone(),
            host_config: Some(host_config),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(spec.network.clone(), endpoint)])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(error(format!("create container {} from {}", spec.name, spec.image)))?;
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        self.docker.start_container(name, None).await.map_err(error(format!("start container {name}")))
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match self.docker.remove_container(name, Some(options)).await.map_err(error(format!("remove container {name}")))
        {
            Err(err) if !err.not_found => Err(err),
            _ => Ok(()),
        }
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        let container = match self.docker.inspect_container(name, None).await.map_err(error(format!("inspect {name}")))
        {
            Ok(container) => container,
            Err(err) if err.not_found => return Ok(None),
            Err(err) => return Err(err),
        };
        let state = container.state.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let settings = container.network_settings.unwrap_or_default();
        let address = settings
            .networks
            .unwrap_or_default()
            .into_values()
            .find_map(|n| n.ip_address.filter(|a| !a.is_empty()).and_then(|a| a.parse::<Ipv4Addr>().ok()));
        let mut ports = BTreeMap::new();
        for (port, bindings) in settings.ports.unwrap_or_default() {
            let Some(container_port) = port.split('/').next().and_then(|p| p.parse().ok()) else { continue };
            let host_port = bindings.unwrap_or_default().into_iter().find_map(|b| b.host_port?.parse().ok());
            if let Some(host_port) = host_port {
                ports.insert(container_port, host_port);
            }
        }
        let config = container.config.unwrap_or_default();
        Ok(Some(ContainerInfo {
            running,
            pid: state.pid.filter(|pid| running && *pid > 0).map(|pid| pid as u32),
            exit_code: (!running).then_some(state.exit_code).flatten(),
            address,
            ports,
            labels: config.labels.unwrap_or_default().into_iter().collect(),
            image: config.image.unwrap_or_default(),
        }))
    }

    async fn containers_labelled(&self, label: &str, value: &str) -> Result<Vec<String>, RuntimeError> {
        let options = ListContainersOptionsBuilder::new().all(true).filters(&label_filter(label, value)).build();
        let containers = self.docker.list_containers(Some(options)).await.map_err(error("list containers"))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| c.names.and_then(|n| n.into_iter().next()))
            .map(|n| n.trim_start_matches('/').to_string())
            .collect())
    }

    async fn logs(&self, name: &str, lines: usize) -> Result<String, RuntimeError> {
        let tail = lines.to_string();
        let options = LogsOptionsBuilder::new().stdout(true).stderr(true).tail(&tail).build();
        let mut stream = self.docker.logs(name, Some(options));
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(error(format!("logs of {name}")))?;
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        Ok(text)
    }

    async fn wait(&self, name: &str) -> Result<i64, RuntimeError> {
        let options = WaitContainerOptionsBuilder::new().condition("not-running").build();
        let mut stream = self.docker.wait_container(name, Some(options));
        match stream.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            // bollard reports a non-zero exit as an error carrying the code.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(err)) => Err(error(format!("wait for {name}"))(err)),
            None => {
                Err(RuntimeError { what: format!("wait for {name}"), message: "no answer".into(), not_found: false })
            }
        }
    }
}
