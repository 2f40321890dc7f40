//! What bringing a lesson up means, decided before anything is made: one container per
//! endpoint (named and labelled by lesson and endpoint), one veth pair per connection with the
//! interface names each end gets (`eth1..N` in the order of the `connections` that mention
//! the endpoint, Antidote's rule), the addresses plain containers get from a connection's
//! `subnet` (a = first host, b = second, as Antidote's IPAM did), and the ports to publish.
//! `plan` is pure: it never talks to an engine or the kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::lesson::{ConfigurationType, Lesson, PresentationType};

/// The label every object `vialctl` makes carries, with the lesson's slug.
pub const LESSON_LABEL: &str = "vial.lesson";
/// The label of an endpoint's container, with the endpoint's name.
pub const ENDPOINT_LABEL: &str = "vial.endpoint";
/// The label that marks a VM endpoint's image, with its profile's name.
pub const PROFILE_LABEL: &str = "vial.profile";
/// The label of an image that ships a RAM snapshot.
pub const SNAPSHOT_LABEL: &str = "vial.snapshot";
/// The label of an image's credentials, `user/password`.
pub const CREDENTIALS_LABEL: &str = "vial.credentials";

/// What kind of endpoint an image makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Kind {
    /// `vial` is its PID 1 and runs a VM (the image has a `vial.profile` label).
    Vm {
        /// The profile's name.
        profile: String,
        /// Whether the image ships a RAM snapshot (its starts are not counted as cold boots).
        snapshot: bool,
    },
    /// A plain container.
    Container,
}

/// An image as the engine has it, for one slug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageChoice {
    /// The reference.
    pub reference: String,
    /// What it makes.
    pub kind: Kind,
    /// `user`, `password` the image's configuration logs in with (its `vial.credentials`).
    pub credentials: Option<(String, String)>,
}

/// One presentation, as the lesson names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentationPlan {
    /// Its name (`cli`).
    pub name: String,
    /// The container port.
    pub port: u16,
    /// `ssh` or `http`.
    pub kind: String,
}

/// One endpoint's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPlan {
    /// The lesson's name for it.
    pub name: String,
    /// Its container's name.
    pub container: String,
    /// The image slug the lesson names.
    pub slug: String,
    /// The image reference.
    pub image: String,
    /// VM or plain container.
    #[serde(flatten)]
    pub kind: Kind,
    /// The credentials its configuration uses.
    pub credentials: Option<(String, String)>,
    /// Its data links, in order (`eth1`, `eth2`).
    pub links: Vec<String>,
    /// Presentations.
    pub presentations: Vec<PresentationPlan>,
    /// Every container port to publish: presentations and `additionalPorts`, sorted, once each.
    pub ports: Vec<u16>,
    /// How it is configured at each stage.
    pub configuration: Option<String>,
}

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    /// The endpoint.
    pub endpoint: String,
    /// Its interface for this connection (`eth1`).
    pub iface: String,
    /// The address the plain container gets on it, with the subnet's prefix.
    pub address: Option<IpNetwork>,
}

/// One connection: a veth pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkPlan {
    /// Its place in the lesson's `connections` (0-based).
    pub index: usize,
    /// The `a` end.
    pub a: End,
    /// The `b` end.
    pub b: End,
    /// The subnet the lesson gives it.
    pub subnet: Option<IpNetwork>,
    /// The MTU of both ends.
    pub mtu: u32,
}

impl LinkPlan {
    /// The ends, `a` first.
    pub fn ends(&self) -> [&End; 2] {
        [&self.a, &self.b]
    }

    /// Whether `endpoint` is one of its ends.
    pub fn touches(&self, endpoint: &str) -> bool {
        self.a.endpoint == endpoint || self.b.endpoint == endpoint
    }
}

/// The whole lesson on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The lesson's slug.
    pub lesson: String,
    /// Its management network.
    pub network: String,
    /// Endpoints, in the lesson's order.
    pub endpoints: Vec<EndpointPlan>,
    /// Connections, in the lesson's order.
    pub links: Vec<LinkPlan>,
}

impl Plan {
    /// The endpoint `name`.
    pub fn endpoint(&self, name: &str) -> Option<&EndpointPlan> {
        self.endpoints.iter().find(|e| e.name == name)
    }

    /// The labels of every object of this lesson, plus `extra`.
    pub fn labels(&self, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([(LESSON_LABEL.to_string(), self.lesson.clone())]);
        labels.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        labels
    }
}

/// The name of lesson `slug`'s endpoint container: `vial-<slug>-<endpoint>`.
pub fn container_name(slug: &str, endpoint: &str) -> String {
    format!("vial-{slug}-{endpoint}")
}

/// The name of lesson `slug`'s management network: `vial-<slug>`.
pub fn network_name(slug: &str) -> String {
    format!("vial-{slug}")
}

/// The `n`th host address (1-based) of `subnet`, with its prefix; `None` past its end.
fn host(subnet: IpNetwork, n: u32) -> Option<IpNetwork> {
    let address = match subnet {
        IpNetwork::V4(net) => IpAddr::V4(net.nth(n)?),
        IpNetwork::V6(net) => {
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(net.network()).checked_add(u128::from(n))?))
        }
    };
    (subnet.contains(address)).then(|| IpNetwork::new(address, subnet.prefix()).ok()).flatten()
}

/// The plan for `lesson` with `images` (slug → the engine's image), links of `mtu`.
pub fn plan(lesson: &Lesson, images: &BTreeMap<String, ImageChoice>, mtu: u32) -> Plan {
    let slug = lesson.slug.value.clone();
    let mut links_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut links = Vec::new();
    for (index, connection) in lesson.connections.iter().enumerate() {
        let subnet = connection.subnet.as_ref().map(|s| s.value);
        let mut end = |endpoint: &str, nth: u32| {
            let ifaces = links_of.entry(lesson_endpoint(lesson, endpoint)).or_default();
            let iface = format!("eth{}", ifaces.len() + 1);
            ifaces.push(iface.clone());
            let container =
                lesson.endpoints.iter().find(|e| e.name.value == endpoint).and_then(|e| images.get(&e.image.value));
            let plain = matches!(container.map(|c| &c.kind), Some(Kind::Container));
            End { endpoint: endpoint.to_string(), iface, address: subnet.filter(|_| plain).and_then(|s| host(s, nth)) }
        };
        let a = end(&connection.a.value, 1);
        let b = end(&connection.b.value, 2);
        links.push(LinkPlan { index, a, b, subnet, mtu });
    }
    let endpoints = lesson
        .endpoints
        .iter()
        .map(|endpoint| {
            let name = endpoint.name.value.clone();
            let image = images.get(&endpoint.image.value);
            let presentations: Vec<PresentationPlan> = endpoint
                .presentations
                .iter()
                .map(|p| PresentationPlan {
                    name: p.name.value.clone(),
                    port: p.port,
                    kind: match p.kind {
                        PresentationType::Ssh => "ssh".into(),
                        PresentationType::Http => "http".into(),
                    },
                })
                .collect();
            let mut ports: Vec<u16> =
                presentations.iter().map(|p| p.port).chain(endpoint.additional_ports.iter().copied()).collect();
            ports.sort_unstable();
            ports.dedup();
            EndpointPlan {
                container: container_name(&slug, &name),
                slug: endpoint.image.value.clone(),
                image: image.map(|i| i.reference.clone()).unwrap_or_default(),
                kind: image.map(|i| i.kind.clone()).unwrap_or(Kind::Container),
                credentials: image.and_then(|i| i.credentials.clone()),
                links: links_of.get(name.as_str()).cloned().unwrap_or_default(),
                presentations,
                ports,
                configuration: endpoint.configuration_type.as_ref().map(|c| match c.value {
                    ConfigurationType::Python => "python".into(),
                    ConfigurationType::Ansible => "ansible".into(),
                    ConfigurationType::Napalm => "napalm".into(),
                }),
                name,
            }
        })
        .collect();
    Plan { network: network_name(&slug), lesson: slug, endpoints, links }
}

/// The lesson's own spelling of `endpoint` (a key that lives as long as the lesson).
fn lesson_endpoint<'a>(lesson: &'a Lesson, endpoint: &str) -> &'a str {
    lesson.endpoints.iter().find(|e| e.name.value == endpoint).map_or("", |e| e.name.value.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LESSON: &str = "\
name: Three endpoints
slug: three-endpoints
category: fundamentals
tier: local
description: A test lesson.
shortDescription: Three
endpoints:
- name: r1
  image: frr
  configurationType: python
  presentations:
  - name: cli
    port: 22
    type: ssh
- name: c1
  image: utility
  presentations:
  - name: cli
    port: 22
    type: ssh
  additionalPorts: [8080, 22]
- name: c2
  image: utility
  additionalPorts: [80]
connections:
- a: r1
  b: c1
  subnet: 198.18.10.0/24
- a: c1
  b: c2
  subnet: 198.18.11.0/24
- a: c2
  b: r1
stages:
- description: One
  guideType: markdown
";

    fn images() -> BTreeMap<String, ImageChoice> {
        BTreeMap::from([
            (
                "frr".to_string(),
                ImageChoice {
                    reference: "vial/frr:latest".into(),
                    kind: Kind::Vm { profile: "frr".into(), snapshot: true },
                    credentials: Some(("antidote".into(), "antidotepassword".into())),
                },
            ),
            (
                "utility".to_string(),
                ImageChoice { reference: "vial/utility:latest".into(), kind: Kind::Container, credentials: None },
            ),
        ])
    }

    #[test]
    fn interfaces_follow_connection_order_and_plain_containers_get_a_then_b_addresses() {
        let lesson = Lesson::parse(LESSON).unwrap();
        let plan = plan(&lesson, &images(), 9000);
        assert_eq!(plan.network, "vial-three-endpoints");
        let r1 = plan.endpoint("r1").unwrap();
        assert_eq!(r1.container, "vial-three-endpoints-r1");
        assert_eq!(r1.links, ["eth1", "eth2"]);
        assert_eq!(plan.endpoint("c1").unwrap().links, ["eth1", "eth2"]);
        assert_eq!(plan.endpoint("c1").unwrap().ports, [22, 8080]);
        assert_eq!(plan.endpoint("c2").unwrap().links, ["eth1", "eth2"]);
        let link = &plan.links[0];
        // r1 is a VM: its address comes from its stage configuration, not from vialctl.
        assert_eq!((link.a.endpoint.as_str(), link.a.iface.as_str(), link.a.address), ("r1", "eth1", None));
        assert_eq!(link.b.address, Some("198.18.10.2/24".parse().unwrap()));
        let link = &plan.links[1];
        assert_eq!(link.a.address, Some("198.18.11.1/24".parse().unwrap()));
        assert_eq!((link.b.iface.as_str(), link.b.address), ("eth1", Some("198.18.11.2/24".parse().unwrap())));
        let link = &plan.links[2];
        assert_eq!((link.a.iface.as_str(), link.b.iface.as_str(), link.a.address), ("eth2", "eth2", None));
        assert!(plan.links.iter().all(|l| l.mtu == 9000));
        assert!(matches!(r1.kind, Kind::Vm { .. }));
        assert_eq!(r1.configuration.as_deref(), Some("python"));
    }

    #[test]
    fn host_addresses_stay_inside_the_subnet() {
        assert_eq!(host("198.18.0.0/31".parse().unwrap(), 1), Some("198.18.0.1/31".parse().unwrap()));
        assert_eq!(host("198.18.0.0/31".parse().unwrap(), 2), None);
        assert_eq!(host("2001:db8::/64".parse().unwrap(), 2), Some("2001:db8::2/64".parse().unwrap()));
    }
}
