//! A running lesson's topology as a picture description: Graphviz DOT and Mermaid, from the
//! plan alone (endpoints, their images, connections with interface names and subnets). Pure.

use super::plan::{Kind, Plan};

/// The topology in Graphviz DOT (`vialctl graph | dot -Tsvg`).
pub fn dot(plan: &Plan) -> String {
    let mut out = format!("graph \"{}\" {{\n  node [shape=box];\n", plan.lesson);
    for endpoint in &plan.endpoints {
        let shape = match endpoint.kind {
            Kind::Vm { .. } => "box3d",
            Kind::Container => "box",
        };
        out.push_str(&format!(
            "  \"{}\" [shape={shape}, label=\"{}\\n{}\"];\n",
            endpoint.name, endpoint.name, endpoint.slug
        ));
    }
    for link in &plan.links {
        let subnet = link.subnet.map(|s| format!("\\n{s}")).unwrap_or_default();
        out.push_str(&format!(
            "  \"{}\" -- \"{}\" [taillabel=\"{}\", headlabel=\"{}\", label=\"{subnet}\"];\n",
            link.a.endpoint, link.b.endpoint, link.a.iface, link.b.iface
        ));
    }
    out.push_str("}\n");
    out
}

/// The topology as a Mermaid flowchart (renders in Markdown on most forges).
pub fn mermaid(plan: &Plan) -> String {
    let id = |name: &str| name.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
    let mut out = String::from("flowchart LR\n");
    for endpoint in &plan.endpoints {
        let (open, close) = match endpoint.kind {
            Kind::Vm { .. } => ("[[", "]]"),
            Kind::Container => ("[", "]"),
        };
        out.push_str(&format!("  {}{open}\"{}<br/>{}\"{close}\n", id(&endpoint.name), endpoint.name, endpoint.slug));
    }
    for link in &plan.links {
        let subnet = link.subnet.map(|s| format!(" {s}")).unwrap_or_default();
        out.push_str(&format!(
            "  {} ---|\"{} - {}{subnet}\"| {}\n",
            id(&link.a.endpoint),
            link.a.iface,
            link.b.iface,
            id(&link.b.endpoint)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::plan::{End, EndpointPlan, LinkPlan};

    fn plan() -> Plan {
        let endpoint = |name: &str, kind: Kind| EndpointPlan {
            name: name.into(),
            container: format!("vial-l-{name}"),
            slug: "frr".into(),
            image: "vial/frr".into(),
            kind,
            credentials: None,
            links: vec!["eth1".into()],
            presentations: Vec::new(),
            ports: Vec::new(),
            configuration: None,
        };
        let end = |e: &str| End { endpoint: e.into(), iface: "eth1".into(), address: None };
        Plan {
            lesson: "l".into(),
            network: "vial-l".into(),
            endpoints: vec![
                endpoint("r1", Kind::Vm { profile: "frr".into(), snapshot: true }),
                endpoint("c-1", Kind::Container),
            ],
            links: vec![LinkPlan {
                index: 0,
                a: end("r1"),
                b: end("c-1"),
                subnet: Some("198.18.1.0/24".parse().unwrap()),
                mtu: 9000,
            }],
        }
    }

    #[test]
    fn dot_and_mermaid_name_every_endpoint_and_connection() {
        let dot = dot(&plan());
        assert!(dot.starts_with("graph \"l\" {"), "{dot}");
        assert!(dot.contains("\"r1\" [shape=box3d"), "{dot}");
        assert!(
            dot.contains("\"r1\" -- \"c-1\" [taillabel=\"eth1\", headlabel=\"eth1\", label=\"\\n198.18.1.0/24\"]"),
            "{dot}"
        );
        let mermaid = mermaid(&plan());
        assert!(mermaid.contains("r1[[\"r1<br/>frr\"]]"), "{mermaid}");
        assert!(mermaid.contains("r1 ---|\"eth1 - eth1 198.18.1.0/24\"| c_1"), "{mermaid}");
    }
}
