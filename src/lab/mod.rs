//! A lesson running on one container host: what `vialctl` does. `up` turns a valid lesson
//! into a plan (`plan`, pure), writes it down (`state`) before making anything, then makes the
//! management network, one veth pair per connection, one container per endpoint, and walks
//! every endpoint through start, wiring, readiness (`probe`), its presentations and its stage
//! configuration (`configure`) side by side, at most `--max-booting` cold VM boots at once.
//! Every wait is bounded by one deadline; a failure names the endpoint, its phase and its last
//! words, and removes what `up` made. `down`, `status`, `link`, `restart` and `stage` work
//! from the state file alone.
//!
//! The engine is behind [`runtime::Runtime`] (Docker in `docker`); the kernel work (veths,
//! addresses, link state) is `wire`'s. This module never talks to QEMU: VM endpoints are
//! known only through vial's health socket.

pub mod catalog;
pub mod configure;
pub mod docker;
mod error;
pub mod graph;
mod operate;
pub mod plan;
pub mod probe;
pub mod progress;
pub mod runtime;
pub mod state;
pub mod wire;

pub use error::LabError;
pub use operate::{EndpointStatus, LinkStatus};

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::lesson::{self, LessonError};
use crate::net::plumb::BRIDGE_NF_SYSCTLS;
use catalog::Catalog;
use plan::{EndpointPlan, ImageChoice, Kind, CREDENTIALS_LABEL, ENDPOINT_LABEL, LESSON_LABEL, PROFILE_LABEL};
use progress::{Phase, Progress};
use runtime::{Bind, ContainerSpec, NetworkSpec, Publish, Runtime, RuntimeError};
use state::{LessonState, StateDir, StateError};
use wire::Side;

/// The configurator image when `--configurator` names none.
pub const CONFIGURATOR: &str = "vial/configurator:latest";
/// How many lines of an endpoint's console or log a failure shows.
const LOG_LINES: usize = 20;

/// Everything `up` can be told.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The lesson directory.
    pub lesson_dir: PathBuf,
    /// The stage to configure (0-based, as `stage<N>/` directories are numbered).
    pub stage: usize,
    /// `--image SLUG=REF` overrides.
    pub images: Vec<String>,
    /// Cold VM boots at once.
    pub max_booting: usize,
    /// The bound on the whole `up`.
    pub timeout: Duration,
    /// Keep what was made when `up` fails.
    pub keep: bool,
    /// The MTU of every data link.
    pub mtu: u32,
    /// A pool to take the management network's /24 from; the engine's own pool when `None`.
    pub mgmt_pool: Option<Ipv4Network>,
    /// The host address presentations are published on.
    pub publish_address: Ipv4Addr,
    /// Publish on consecutive host ports from this one (endpoints in lesson order, each
    /// endpoint's ports in order), so addresses are known beforehand; free ports otherwise.
    pub port_base: Option<u16>,
    /// The accelerator VM endpoints use (`auto`, `kvm`, `tcg`).
    pub accel: String,
    /// The configurator image.
    pub configurator: String,
    /// Bring the topology up without running the stage's configuration.
    pub no_config: bool,
}

/// How long the wiring of one `up` took, recorded as it goes.
#[derive(Default)]
struct Wiring {
    pairs: std::sync::Mutex<Duration>,
    slowest_moves: std::sync::Mutex<Duration>,
}

impl Wiring {
    fn record_pairs(&self, took: Duration) {
        *self.pairs.lock().unwrap_or_else(|e| e.into_inner()) = took;
    }

    fn record_moves(&self, took: Duration) {
        let mut slowest = self.slowest_moves.lock().unwrap_or_else(|e| e.into_inner());
        *slowest = (*slowest).max(took);
    }

    fn seconds(&self) -> f64 {
        let pairs = *self.pairs.lock().unwrap_or_else(|e| e.into_inner());
        let moves = *self.slowest_moves.lock().unwrap_or_else(|e| e.into_inner());
        (pairs + moves).as_secs_f64()
    }
}

/// One presentation as `up` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    /// The endpoint.
    pub endpoint: String,
    /// The presentation (`cli`), or `port` for an additional port.
    pub name: String,
    /// `ssh`, `http`, `tcp`.
    pub kind: String,
    /// Where it is on the host.
    pub address: SocketAddr,
}

/// What `up` reports.
#[derive(Debug, Clone, Serialize)]
pub struct UpSummary {
    /// The lesson.
    pub lesson: String,
    /// The stage it is at.
    pub stage: usize,
    /// Every published port.
    pub published: Vec<Published>,
    /// How long it took.
    pub seconds: f64,
    /// How long the wiring took: making every veth pair, then the slowest endpoint's moves
    /// (endpoints take their ends in side by side).
    pub wiring_seconds: f64,
}

/// Operates lessons on one runtime, keeping their state in one directory.
pub struct Lab<R> {
    runtime: R,
    states: StateDir,
}

impl<R: Runtime> Lab<R> {
    /// A lab on `runtime` with its state in `states`.
    pub fn new(runtime: R, states: StateDir) -> Self {
        Lab { runtime, states }
    }

    /// Brings the lesson in `options.lesson_dir` up: running, wired, ready, configured.
    pub async fn up(&self, options: &UpOptions) -> Result<UpSummary, LabError> {
        let started = Instant::now();
        let lesson_dir = options
            .lesson_dir
            .canonicalize()
            .map_err(|_| LessonError::MissingDir { dir: options.lesson_dir.clone() })?;
        let lesson = lesson::load(&lesson_dir)?;
        let curriculum = lesson::images_beside(&lesson_dir)?;
        if options.stage >= lesson.stages.len() {
            return Err(LabError::NoStage { stage: options.stage, stages: lesson.stages.len() });
        }
        let slug = lesson.slug.value.clone();
        if self.states.file(&slug).exists() {
            return Err(LabError::AlreadyUp { lesson: slug });
        }
        let catalog = Catalog::new(&options.images)?;
        let mut images = BTreeMap::new();
        for endpoint in &lesson.endpoints {
            let slug = &endpoint.image.value;
            if images.contains_key(slug) {
                continue;
            }
            let reference = catalog.resolve(&endpoint.name, slug)?;
            let info = self.runtime.image(&reference).await?.ok_or_else(|| LabError::ImageMissing {
                endpoint: endpoint.name.value.clone(),
                slug: slug.clone(),
                reference: reference.clone(),
            })?;
            let kind = match info.labels.get(PROFILE_LABEL) {
                Some(profile) => {
                    Kind::Vm { profile: profile.clone(), snapshot: info.labels.contains_key(plan::SNAPSHOT_LABEL) }
                }
                None => Kind::Container,
            };
            // A curriculum's image.meta.yaml says how its configuration logs in; else the
            // image's own label does.
            let from_metadata = curriculum
                .as_ref()
                .and_then(|images| images.by_slug.get(slug))
                .filter(|image| !image.config_user.is_empty())
                .map(|image| (image.config_user.clone(), image.config_password.clone()));
            let from_label = || {
                info.labels
                    .get(CREDENTIALS_LABEL)
                    .and_then(|c| c.split_once('/'))
                    .map(|(user, password)| (user.to_string(), password.to_string()))
            };
            let credentials = from_metadata.or_else(from_label);
            images.insert(slug.clone(), ImageChoice { reference, kind, credentials });
        }
        let plan = plan::plan(&lesson, &images, options.mtu);
        let configured: Vec<&str> =
            plan.endpoints.iter().filter(|e| e.configuration.is_some()).map(|e| e.name.as_str()).collect();
        if !configured.is_empty() && self.runtime.image(&options.configurator).await?.is_none() {
            return Err(LabError::ConfiguratorMissing {
                reference: options.configurator.clone(),
                endpoints: configured.join(", "),
            });
        }

        let mut state = LessonState::new(&lesson_dir, plan);
        state.publish_address = options.publish_address;
        state.port_base = options.port_base;
        state.configurator = options.configurator.clone();
        state.vm_env = vec![format!("VIAL_ACCEL={}", options.accel)];
        state.vm_devices = vec!["/dev/net/tun".into()];
        if options.accel != "tcg" && Path::new(crate::sys::KVM_DEVICE).exists() {
            state.vm_devices.push(crate::sys::KVM_DEVICE.into());
        }
        if let Some(pool) = options.mgmt_pool {
            state.subnet = Some(self.free_subnet(pool).await?.to_string());
        }
        // Written before anything is made, so that `down` (or this run's own clean-up) knows
        // everything that may exist.
        self.states.save(&state)?;
        let deadline = tokio::time::Instant::now() + options.timeout;
        let progress = Progress::new(&state.plan.endpoints.iter().map(|e| e.name.clone()).collect::<Vec<_>>());
        let ticker = progress.is_terminal().then(|| {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    progress.draw();
                }
            })
        });
        let wiring = Wiring::default();
        let brought = self.bring_up(&mut state, options, deadline, lesson.ready_delay, &progress, &wiring).await;
        if let Some(ticker) = ticker {
            ticker.abort();
            progress.draw();
        }
        match brought {
            Ok(published) => Ok(UpSummary {
                lesson: slug,
                stage: options.stage,
                published,
                seconds: started.elapsed().as_secs_f64(),
                wiring_seconds: wiring.seconds(),
            }),
            Err(err) => {
                if options.keep {
                    tracing::warn!("--keep: leaving what was made; `vialctl down {slug}` removes it");
                } else {
                    self.remove(&state).await;
                }
                Err(err)
            }
        }
    }

    /// The first /24 of `pool` that no network of the engine overlaps.
    async fn free_subnet(&self, pool: Ipv4Network) -> Result<Ipv4Network, LabError> {
        let taken = self.runtime.network_subnets().await?;
        let start = u32::from(pool.network());
        let count = if pool.prefix() > 24 { 0 } else { 1u32 << (24 - pool.prefix()) };
        (0..count)
            .filter_map(|n| Ipv4Network::new(Ipv4Addr::from(start + (n << 8)), 24).ok())
            .find(|candidate| !taken.iter().any(|t| t.overlaps(*candidate)))
            .ok_or(LabError::PoolExhausted { pool })
    }

    async fn bring_up(
        &self,
        state: &mut LessonState,
        options: &UpOptions,
        deadline: tokio::time::Instant,
        ready_delay: Option<u32>,
        progress: &Progress,
        wiring: &Wiring,
    ) -> Result<Vec<Published>, LabError> {
        let shared: &LessonState = state;
        let plan = &shared.plan;
        let subnet = shared.subnet.as_ref().and_then(|s| s.parse().ok());
        self.runtime
            .create_network(&NetworkSpec { name: plan.network.clone(), subnet, labels: plan.labels(&[]) })
            .await?;
        let host = wire::host_netlink()?;
        let pairs_started = Instant::now();
        let pairs = plan.links.iter().map(|link| wire::create_pair(&host, &plan.lesson, link));
        futures::future::try_join_all(pairs).await?;
        wiring.record_pairs(pairs_started.elapsed());
        let specs: Vec<ContainerSpec> = plan.endpoints.iter().map(|e| self.container_spec(shared, e)).collect();
        futures::future::try_join_all(specs.iter().map(|spec| self.runtime.create(spec))).await?;
        for endpoint in &plan.endpoints {
            progress.set(&endpoint.name, Phase::Created, "");
        }
        let booting = Arc::new(Semaphore::new(options.max_booting.max(1)));
        let stage = Some(options.stage).filter(|_| !options.no_config);
        let tasks = plan.endpoints.iter().map(|endpoint| {
            let booting = Arc::clone(&booting);
            let host = &host;
            async move {
                self.start_endpoint(
                    shared,
                    endpoint,
                    host,
                    booting,
                    stage,
                    deadline,
                    options.timeout,
                    progress,
                    Some(wiring),
                )
                .await
            }
        });
        let published: Vec<Vec<Published>> = futures::future::try_join_all(tasks).await?;
        if let Some(delay) = ready_delay.filter(|d| *d > 0) {
            // The lesson asks for this pause after configuration (antidote-core's readyDelay).
            tracing::info!(seconds = delay, "readyDelay");
            tokio::time::sleep(Duration::from_secs(delay.into())).await;
        }
        state.stage = Some(options.stage);
        self.states.save(state)?;
        Ok(published.into_iter().flatten().collect())
    }

    /// The container of `endpoint`, from the state alone (so `restart` makes the same one).
    fn container_spec(&self, state: &LessonState, endpoint: &EndpointPlan) -> ContainerSpec {
        let plan = &state.plan;
        // With a port base, ports are numbered across the lesson in plan order.
        let before: usize = plan.endpoints.iter().take_while(|e| e.name != endpoint.name).map(|e| e.ports.len()).sum();
        let host_port = |i: usize| state.port_base.and_then(|base| u16::try_from(usize::from(base) + before + i).ok());
        let mut spec = ContainerSpec {
            name: endpoint.container.clone(),
            hostname: endpoint.name.clone(),
            image: endpoint.image.clone(),
            labels: plan.labels(&[(ENDPOINT_LABEL, &endpoint.name)]),
            network: plan.network.clone(),
            publish: endpoint
                .ports
                .iter()
                .enumerate()
                .map(|(i, &port)| Publish {
                    container_port: port,
                    host_address: state.publish_address,
                    host_port: host_port(i),
                })
                .collect(),
            binds: vec![Bind { host: state.lesson_dir.clone(), container: "/antidote".into(), read_only: true }],
            // Lessons change addresses and routes in plain containers too (as root or sudo).
            cap_add: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        if let Kind::Vm { .. } = endpoint.kind {
            spec.env =
                vec![format!("VIAL_NAME={}", endpoint.name), format!("VIAL_DATA_IFACES={}", endpoint.links.len())];
            spec.env.extend(state.vm_env.iter().cloned());
            spec.devices = state.vm_devices.clone();
            // Docker loads br_netfilter, which drops malformed IPv4 on the bridge of a VM
            // endpoint in bridge plumbing; /proc/sys is read-only inside, so vial cannot turn
            // it off there itself.
            if Path::new("/proc/sys/net/bridge").is_dir() {
                spec.sysctls = BRIDGE_NF_SYSCTLS.iter().map(|s| (s.to_string(), "0".to_string())).collect();
            }
            spec.binds.push(Bind {
                host: self.states.run_dir(&plan.lesson, &endpoint.name),
                container: "/run/vial".into(),
                read_only: false,
            });
        }
        spec
    }

    /// Starts `endpoint`'s container, takes its parked link ends in, and waits until it is
    /// usable and configured for `stage`; returns its published ports.
    #[allow(clippy::too_many_arguments)]
    async fn start_endpoint(
        &self,
        state: &LessonState,
        endpoint: &EndpointPlan,
        host: &rtnetlink::Handle,
        booting: Arc<Semaphore>,
        stage: Option<usize>,
        deadline: tokio::time::Instant,
        timeout: Duration,
        progress: &Progress,
        wiring: Option<&Wiring>,
    ) -> Result<Vec<Published>, LabError> {
        let plan = &state.plan;
        let name = endpoint.name.as_str();
        let mut phase = Phase::Created;
        let failed = |phase: Phase, message: String| async move {
            progress.set(name, Phase::Failed, "");
            LabError::Endpoint {
                endpoint: name.to_string(),
                phase: phase.as_str(),
                message,
                log: self.last_words(state, endpoint).await,
            }
        };
        let cold = matches!(endpoint.kind, Kind::Vm { snapshot: false, .. });
        let permit = if cold {
            progress.set(name, Phase::Waiting, "for a cold-boot slot");
            match tokio::time::timeout_at(deadline, booting.acquire_owned()).await {
                Ok(permit) => permit.ok(),
                Err(_) => return Err(self.timed_out(state, endpoint, Phase::Waiting, timeout, progress).await),
            }
        } else {
            None
        };
        if let Err(err) = self.runtime.start(&endpoint.container).await {
            return Err(failed(Phase::Created, format!("{}: {}", err.what, err.message)).await);
        }
        let info = self.runtime.inspect(&endpoint.container).await?.unwrap_or_default();
        let Some(pid) = info.pid else {
            return Err(failed(phase, "the container exited at once".into()).await);
        };
        let moves_started = Instant::now();
        for link in plan.links.iter().filter(|l| l.touches(name)) {
            for side in Side::BOTH {
                let end = match side {
                    Side::A => &link.a,
                    Side::B => &link.b,
                };
                if end.endpoint == name {
                    wire::move_end(host, &plan.lesson, link, side, pid).await?;
                }
            }
        }
        if let Some(wiring) = wiring {
            wiring.record_moves(moves_started.elapsed());
        }
        phase = Phase::Wired;
        progress.set(name, phase, format!("{} link(s)", endpoint.links.len()));

        let exited = async {
            let code = self.runtime.wait(&endpoint.container).await;
            format!("the container exited ({})", code.map_or_else(|e| e.to_string(), |c| format!("code {c}")))
        };
        if let Kind::Vm { .. } = endpoint.kind {
            let socket = self.states.run_dir(&plan.lesson, name).join(crate::rundir::HEALTH);
            let watch = probe::vial_ready(&socket, |state| progress.set(name, Phase::Booting, state.to_string()));
            let ready = tokio::select! {
                ready = tokio::time::timeout_at(deadline, watch) => ready,
                message = exited => return Err(failed(Phase::Booting, message).await),
            };
            match ready {
                Ok(Ok(status)) => {
                    let boot = status["boot"]["from"].as_str().unwrap_or("").to_string();
                    progress.set(name, Phase::Ready, boot);
                }
                Ok(Err(err)) => return Err(failed(Phase::Booting, err.to_string()).await),
                Err(_) => return Err(self.timed_out(state, endpoint, Phase::Booting, timeout, progress).await),
            }
        } else {
            progress.set(name, Phase::Ready, "");
        }
        drop(permit);

        phase = Phase::Probing;
        let info = self.runtime.inspect(&endpoint.container).await?.unwrap_or_default();
        let mut published = Vec::new();
        for port in &endpoint.ports {
            let Some(host_port) = info.ports.get(port) else {
                return Err(failed(phase, format!("port {port} was not published")).await);
            };
            let address = SocketAddr::from((state.publish_address, *host_port));
            let presentation = endpoint.presentations.iter().find(|p| p.port == *port);
            let (label, kind) =
                presentation.map_or(("port".to_string(), "tcp".to_string()), |p| (p.name.clone(), p.kind.clone()));
            published.push(Published { endpoint: name.to_string(), name: label, kind, address });
        }
        for presentation in published.iter().filter(|p| p.name != "port") {
            progress.set(
                name,
                phase,
                format!("{} {} on {}", presentation.name, presentation.kind, presentation.address),
            );
            let exited = async {
                let code = self.runtime.wait(&endpoint.container).await;
                format!("the container exited ({})", code.map_or_else(|e| e.to_string(), |c| format!("code {c}")))
            };
            tokio::select! {
                answered = tokio::time::timeout_at(deadline, probe::presentation(&presentation.kind, presentation.address)) => {
                    if answered.is_err() {
                        return Err(self.timed_out(state, endpoint, phase, timeout, progress).await);
                    }
                }
                message = exited => return Err(failed(phase, message).await),
            }
        }
        if let Some(stage) = stage.filter(|_| endpoint.configuration.is_some()) {
            phase = Phase::Configuring;
            progress.set(name, phase, format!("stage {stage}"));
            let configured =
                configure::configure(&self.runtime, plan, &state.lesson_dir, &state.configurator, endpoint, stage);
            match tokio::time::timeout_at(deadline, configured).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    progress.set(name, Phase::Failed, "");
                    return Err(err.into());
                }
                Err(_) => return Err(self.timed_out(state, endpoint, phase, timeout, progress).await),
            }
        }
        let shown: Vec<String> = published.iter().map(|p| format!("{} {}", p.name, p.address)).collect();
        progress.set(name, Phase::Done, shown.join(", "));
        Ok(published)
    }

    async fn timed_out(
        &self,
        state: &LessonState,
        endpoint: &EndpointPlan,
        phase: Phase,
        timeout: Duration,
        progress: &Progress,
    ) -> LabError {
        progress.set(&endpoint.name, Phase::Failed, "timed out");
        LabError::Timeout {
            endpoint: endpoint.name.clone(),
            phase: phase.as_str(),
            timeout,
            log: self.last_words(state, endpoint).await,
        }
    }

    /// The last lines of an endpoint's serial console (VM) and of its container's log.
    async fn last_words(&self, state: &LessonState, endpoint: &EndpointPlan) -> String {
        let mut words = String::new();
        if let Kind::Vm { .. } = endpoint.kind {
            let console = self.states.run_dir(&state.plan.lesson, &endpoint.name).join(crate::rundir::CONSOLE_LOG);
            let tail = crate::rundir::console_tail(&console, LOG_LINES);
            if !tail.trim().is_empty() {
                words.push_str(&format!("[console]\n{}\n", tail.trim_end()));
            }
        }
        if let Ok(log) = self.runtime.logs(&endpoint.container, LOG_LINES).await {
            if !log.trim().is_empty() {
                words.push_str(&format!("[log]\n{}", log.trim_end()));
            }
        }
        words
    }

    /// Removes everything of `state`'s lesson: containers (also strays that carry its label),
    /// parked veths, the network, the state and run directories. Failures are logged and the
    /// rest goes on; returns what could not be removed.
    async fn remove(&self, state: &LessonState) -> Vec<String> {
        let plan = &state.plan;
        let mut left = Vec::new();
        let mut containers: Vec<String> = plan.endpoints.iter().map(|e| e.container.clone()).collect();
        if let Ok(labelled) = self.runtime.containers_labelled(LESSON_LABEL, &plan.lesson).await {
            containers.extend(labelled.into_iter().filter(|c| !containers.contains(c)).collect::<Vec<_>>());
        }
        let removals = containers.iter().map(|c| self.runtime.remove(c));
        for (container, removed) in containers.iter().zip(futures::future::join_all(removals).await) {
            if let Err(err) = removed {
                tracing::warn!(%err, "cannot remove a container");
                left.push(format!("container {container}: {err}"));
            }
        }
        if let Ok(host) = wire::host_netlink() {
            wire::remove_parked(&host, &plan.lesson, plan.links.len()).await;
        }
        let mut networks = vec![plan.network.clone()];
        if let Ok(labelled) = self.runtime.networks_labelled(LESSON_LABEL, &plan.lesson).await {
            networks.extend(labelled.into_iter().filter(|n| *n != plan.network));
        }
        for network in networks {
            if let Err(err) = self.runtime.remove_network(&network).await {
                left.push(format!("network {network}: {err}"));
            }
        }
        if left.is_empty() {
            if let Err(err) = self.states.remove(&plan.lesson) {
                left.push(err.to_string());
            }
        }
        left
    }

    /// The lesson `lesson` names, or the only one that is up.
    fn which(&self, lesson: Option<&str>) -> Result<Option<String>, LabError> {
        if let Some(lesson) = lesson {
            return Ok(Some(lesson.to_string()));
        }
        let up = self.states.lessons();
        match up.len() {
            0 => Ok(None),
            1 => Ok(up.into_iter().next()),
            _ => Err(LabError::WhichLesson { lessons: up.join(", ") }),
        }
    }

    /// Removes a lesson's containers, veths, network and state. A lesson that is not up (or
    /// no lesson at all) is nothing to do: `down` twice succeeds. Returns the lesson removed.
    pub async fn down(&self, lesson: Option<&str>) -> Result<Option<String>, LabError> {
        let Some(lesson) = self.which(lesson)? else { return Ok(None) };
        let state = match self.states.load(&lesson) {
            Ok(state) => state,
            Err(StateError::NotUp { .. }) => {
                // No state: still remove whatever carries the lesson's label.
                for container in self.runtime.containers_labelled(LESSON_LABEL, &lesson).await? {
                    self.runtime.remove(&container).await?;
                }
                for network in self.runtime.networks_labelled(LESSON_LABEL, &lesson).await? {
                    self.runtime.remove_network(&network).await?;
                }
                return Ok(None);
            }
            Err(err) => return Err(err.into()),
        };
        let left = self.remove(&state).await;
        if !left.is_empty() {
            return Err(LabError::Runtime(RuntimeError {
                what: format!("remove lesson {lesson}"),
                message: left.join("; "),
                not_found: false,
            }));
        }
        Ok(Some(lesson))
    }
}
