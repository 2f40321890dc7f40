//! Operating a running lesson from its state file alone: `status`, `link set`, `restart`,
//! `stage`, and the lookups they share.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;

use super::plan::{EndpointPlan, Kind, Plan};
use super::progress::{Phase, Progress};
use super::runtime::Runtime;
use super::state::{LessonState, StateError};
use super::wire::{self, Side};
use super::{configure, Lab, LabError};
use crate::lesson;

/// One endpoint as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    /// The endpoint.
    pub endpoint: String,
    /// Its image reference.
    pub image: String,
    /// `running`, `exited`, `missing`.
    pub container: String,
    /// vial's state for VM endpoints (`ready`, `booting`, ...); `running` for containers.
    pub health: String,
    /// Its management address.
    pub address: Option<Ipv4Addr>,
    /// Published ports (container → host).
    pub ports: BTreeMap<u16, u16>,
    /// Its links: interface, peer, `up`/`down`/`no-carrier`/`missing`.
    pub links: Vec<LinkStatus>,
}

/// One link end as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    /// The interface (`eth1`).
    pub iface: String,
    /// The other end (`r2:eth1`).
    pub peer: String,
    /// `up`, `down` (pulled here), `no-carrier` (pulled at the other end), `missing`.
    pub state: String,
}

impl<R: Runtime> Lab<R> {
    /// Every endpoint of a running lesson, as the engine, vial and the kernel see it now.
    pub async fn status(&self, lesson: &str) -> Result<Vec<EndpointStatus>, LabError> {
        let state = self.states.load(lesson)?;
        let plan = &state.plan;
        let mut statuses = Vec::new();
        for endpoint in &plan.endpoints {
            let info = self.runtime.inspect(&endpoint.container).await?;
            let container = match &info {
                Some(info) if info.running => "running",
                Some(_) => "exited",
                None => "missing",
            };
            let health = match (&endpoint.kind, &info) {
                (Kind::Vm { .. }, Some(info)) if info.running => {
                    let socket = self.states.run_dir(&plan.lesson, &endpoint.name).join(crate::rundir::HEALTH);
                    let answer = tokio::task::spawn_blocking(move || {
                        crate::health::query(&socket, "/status", Duration::from_secs(3))
                    })
                    .await;
                    match answer {
                        Ok(Ok((_, body))) => serde_json::from_str::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|s| s["state"].as_str().map(String::from))
                            .unwrap_or_else(|| "unknown".into()),
                        _ => "no answer".into(),
                    }
                }
                // A plain container is ready when every presentation answers, as at `up`.
                (_, Some(info)) if info.running => {
                    let mut ready = true;
                    for presentation in &endpoint.presentations {
                        let Some(port) = info.ports.get(&presentation.port) else { continue };
                        let address = std::net::SocketAddr::from((state.publish_address, *port));
                        ready &= match presentation.kind.as_str() {
                            "ssh" => super::probe::ssh_answers(address).await,
                            "http" => super::probe::http_answers(address).await,
                            _ => super::probe::tcp_answers(address).await,
                        };
                    }
                    if ready { "ready" } else { "running" }.into()
                }
                _ => container.to_string(),
            };
            let mut links = Vec::new();
            for link in plan.links.iter().filter(|l| l.touches(&endpoint.name)) {
                for (end, other) in [(&link.a, &link.b), (&link.b, &link.a)] {
                    if end.endpoint != endpoint.name {
                        continue;
                    }
                    let state = match info.as_ref().and_then(|i| i.pid) {
                        Some(pid) => match wire::link_state(pid, &end.iface).await {
                            Ok((false, _)) => "down",
                            Ok((true, false)) => "no-carrier",
                            Ok((true, true)) => "up",
                            Err(_) => "missing",
                        },
                        None => "missing",
                    };
                    links.push(LinkStatus {
                        iface: end.iface.clone(),
                        peer: format!("{}:{}", other.endpoint, other.iface),
                        state: state.into(),
                    });
                }
            }
            statuses.push(EndpointStatus {
                endpoint: endpoint.name.clone(),
                image: endpoint.image.clone(),
                container: container.into(),
                health,
                address: info.as_ref().and_then(|i| i.address),
                ports: info.map(|i| i.ports).unwrap_or_default(),
                links,
            });
        }
        Ok(statuses)
    }

    /// The state of a running lesson (for `graph`, `status`).
    pub fn state(&self, lesson: Option<&str>) -> Result<LessonState, LabError> {
        let lesson = self
            .which(lesson)?
            .ok_or_else(|| StateError::NotUp { lesson: "(any)".into(), path: self.states.0.join("lessons") })?;
        Ok(self.states.load(&lesson)?)
    }

    /// The lessons that are up.
    pub fn lessons(&self) -> Vec<String> {
        self.states.lessons()
    }

    /// Pulls (`up = false`) or restores one link of `endpoint`: its interface goes down or up,
    /// so its peer loses or regains carrier too, and a VM endpoint's vial passes that on to
    /// its guest.
    pub async fn link_set(&self, lesson: Option<&str>, endpoint: &str, iface: &str, up: bool) -> Result<(), LabError> {
        let state = self.state(lesson)?;
        let plan = &state.plan;
        let found = self.find_endpoint(plan, endpoint)?;
        if !found.links.iter().any(|l| l == iface) {
            return Err(LabError::NotInLesson {
                what: format!("link {endpoint}:{iface}"),
                known: found.links.join(", "),
            });
        }
        let info = self.runtime.inspect(&found.container).await?;
        let Some(pid) = info.and_then(|i| i.pid) else {
            return Err(LabError::Endpoint {
                endpoint: endpoint.into(),
                phase: "running",
                message: "its container is not running".into(),
                log: String::new(),
            });
        };
        wire::set_admin_state(pid, endpoint, iface, up).await?;
        Ok(())
    }

    fn find_endpoint<'a>(&self, plan: &'a Plan, endpoint: &str) -> Result<&'a EndpointPlan, LabError> {
        plan.endpoint(endpoint).ok_or_else(|| LabError::NotInLesson {
            what: format!("endpoint {endpoint}"),
            known: plan.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    /// Recreates `endpoint`'s container and its links, and waits until it is usable and
    /// configured for the lesson's stage. Its peers are not restarted: their ends of the new
    /// veths go in under the names they had, and their vial plugs them back into the same
    /// VM NIC slots.
    pub async fn restart(&self, lesson: Option<&str>, endpoint: &str, timeout: Duration) -> Result<(), LabError> {
        let state = self.state(lesson)?;
        let plan = &state.plan;
        let found = self.find_endpoint(plan, endpoint)?.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        let progress = Progress::new(std::slice::from_ref(&found.name));
        // The links go first, from the peers' side: a veth whose other end's namespace goes is
        // deleted by the kernel's namespace clean-up, which can lag by seconds on a busy host;
        // deleting one end removes the pair at once.
        for link in plan.links.iter().filter(|l| l.touches(endpoint)) {
            for end in link.ends().into_iter().filter(|e| e.endpoint != endpoint) {
                let peer = self.find_endpoint(plan, &end.endpoint)?;
                if let Some(pid) = self.runtime.inspect(&peer.container).await?.and_then(|i| i.pid) {
                    wire::delete(pid, &end.iface).await?;
                }
            }
        }
        self.runtime.remove(&found.container).await?;
        let host = wire::host_netlink()?;
        for link in plan.links.iter().filter(|l| l.touches(endpoint)) {
            wire::create_pair(&host, &plan.lesson, link).await?;
            // The peer's end goes home at once; this endpoint's waits for its container.
            for (side, end) in [(Side::A, &link.a), (Side::B, &link.b)] {
                if end.endpoint == endpoint {
                    continue;
                }
                let peer = self.find_endpoint(plan, &end.endpoint)?;
                let pid = self.runtime.inspect(&peer.container).await?.and_then(|i| i.pid);
                if let Some(pid) = pid {
                    // The old veth goes with the removed container's namespace, shortly after.
                    if !wire::wait_gone(pid, &end.iface, Duration::from_secs(10)).await? {
                        tracing::warn!(endpoint = %end.endpoint, iface = %end.iface, "the old link is still there");
                    }
                    wire::move_end(&host, &plan.lesson, link, side, pid).await?;
                }
            }
        }
        self.runtime.create(&self.container_spec(&state, &found)).await?;
        progress.set(endpoint, Phase::Created, "");
        let booting = Arc::new(Semaphore::new(1));
        self.start_endpoint(&state, &found, &host, booting, state.stage, deadline, timeout, &progress, None).await?;
        // A plain container's routes over a recreated link went with it (a VM guest keeps its
        // configuration, and its NIC comes back in the same slot): configure such peers again.
        if let Some(stage) = state.stage {
            for link in plan.links.iter().filter(|l| l.touches(endpoint)) {
                for end in link.ends().into_iter().filter(|e| e.endpoint != endpoint) {
                    let peer = self.find_endpoint(plan, &end.endpoint)?;
                    if peer.kind == Kind::Container && peer.configuration.is_some() {
                        let configured = configure::configure(
                            &self.runtime,
                            plan,
                            &state.lesson_dir,
                            &state.configurator,
                            peer,
                            stage,
                        );
                        tokio::time::timeout_at(deadline, configured).await.map_err(|_| LabError::Timeout {
                            endpoint: peer.name.clone(),
                            phase: "configuring",
                            timeout,
                            log: String::new(),
                        })??;
                    }
                }
            }
        }
        Ok(())
    }

    /// Configures every endpoint of a running lesson for `stage`.
    pub async fn stage(&self, lesson: Option<&str>, stage: usize, timeout: Duration) -> Result<(), LabError> {
        let mut state = self.state(lesson)?;
        let stages = lesson::load(&state.lesson_dir).map(|l| l.stages.len())?;
        if stage >= stages {
            return Err(LabError::NoStage { stage, stages });
        }
        let plan = state.plan.clone();
        let progress = Progress::new(&plan.endpoints.iter().map(|e| e.name.clone()).collect::<Vec<_>>());
        let runs = plan.endpoints.iter().map(|endpoint| {
            let state = &state;
            let progress = &progress;
            async move {
                progress.set(&endpoint.name, Phase::Configuring, format!("stage {stage}"));
                let run = configure::configure(
                    &self.runtime,
                    &state.plan,
                    &state.lesson_dir,
                    &state.configurator,
                    endpoint,
                    stage,
                );
                match tokio::time::timeout(timeout, run).await {
                    Ok(Ok(_)) => {
                        progress.set(&endpoint.name, Phase::Done, format!("stage {stage}"));
                        Ok(())
                    }
                    Ok(Err(err)) => {
                        progress.set(&endpoint.name, Phase::Failed, "");
                        Err(LabError::from(err))
                    }
                    Err(_) => Err(LabError::Timeout {
                        endpoint: endpoint.name.clone(),
                        phase: "configuring",
                        timeout,
                        log: String::new(),
                    }),
                }
            }
        });
        futures::future::try_join_all(runs).await?;
        state.stage = Some(stage);
        self.states.save(&state)?;
        Ok(())
    }
}
