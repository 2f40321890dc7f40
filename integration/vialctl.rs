//! `vialctl` against a real Docker engine: lessons of plain containers wired as the lesson
//! says, failures that name the endpoint and leave nothing behind, and the example lesson's
//! routers reaching OSPF Full, losing a neighbor when a link is pulled and getting it back
//! after a restart. The tests run the real `vialctl` binary with a state directory of their
//! own; each lesson has its own slug, management /24 in 198.18.0.0/15 and host ports.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::images::{build_image, frr_turn, ssh_at};
use crate::support::{repo, temp_dir, wait_until};

fn vialctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vialctl"))
}

/// One test's lessons: a state directory, removed (after `vialctl down`) on drop. Shared
/// with `curriculum.rs`, as are [`text`], [`nothing_left`] and [`ssh_port`].
pub(crate) struct Lab {
    dir: testkit::TempDir,
    pub(crate) lessons: Vec<String>,
}

impl Lab {
    pub(crate) fn new(tag: &str) -> Lab {
        Lab { dir: temp_dir(tag), lessons: Vec::new() }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `vialctl --state-dir DIR args...`.
    pub(crate) fn vialctl(&self, args: &[&str]) -> Output {
        let output = Command::new(vialctl_bin())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running vialctl");
        println!("vialctl {args:?}: {}\n{}{}", output.status, text(&output.stdout), text(&output.stderr));
        output
    }

    /// `vialctl up` of `lesson`, remembered for `down` on drop.
    pub(crate) fn up(&mut self, lesson: &Path, slug: &str, extra: &[&str]) -> Output {
        self.lessons.push(slug.to_string());
        let mut args = vec!["up", lesson.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.vialctl(&args)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for lesson in std::mem::take(&mut self.lessons) {
            let _ = self.vialctl(&["down", &lesson]);
        }
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `lesson.meta.yaml` (and files under it) into a new directory of `lab`.
fn lesson_dir(lab: &Lab, name: &str, meta: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = lab.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lesson.meta.yaml"), meta).unwrap();
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    dir
}

/// Nothing of `slug` is left: no container, network, parked veth or state.
pub(crate) fn nothing_left(lab: &Lab, slug: &str) {
    let label = format!("label=vial.lesson={slug}");
    let containers = testkit::docker::stdout(&["ps", "-a", "-q", "--filter", &label]).unwrap();
    assert!(containers.trim().is_empty(), "containers of {slug} left: {containers}");
    let networks = testkit::docker::stdout(&["network", "ls", "-q", "--filter", &label]).unwrap();
    assert!(networks.trim().is_empty(), "networks of {slug} left: {networks}");
    assert!(!lab.state_dir().join("lessons").join(format!("{slug}.json")).exists(), "state of {slug} left");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let (a, _) = vial::lab::wire::temporary_names(slug, 0);
    assert!(!text(&links.stdout).contains(&a[..8]), "parked veths of {slug} left");
}

/// `docker exec CONTAINER args...`'s stdout.
fn exec(container: &str, args: &[&str]) -> String {
    let mut all = vec!["exec", container];
    all.extend_from_slice(args);
    testkit::docker::stdout(&all).unwrap()
}

const THREE_CONTAINERS: &str = "\
name: Three containers
slug: vialctl-three
category: fundamentals
tier: local
description: Plain containers wired by subnet.
shortDescription: Three
endpoints:
- name: c1
  image: utility
  presentations:
  - name: cli
    port: 22
    type: ssh
- name: c2
  image: utility
  presentations:
  - name: cli
    port: 22
    type: ssh
- name: c3
  image: utility
  additionalPorts: [22]
connections:
- a: c1
  b: c2
  subnet: 198.18.60.0/24
- a: c3
  b: c1
  subnet: 198.18.61.0/24
- a: c2
  b: c3
  subnet: 198.18.62.0/30
stages:
- description: Look around
  guideType: markdown
";

#[test]
fn plain_containers_are_wired_in_connection_order_with_the_subnets_addresses() {
    build_image("utility");
    let mut lab = Lab::new("vialctl-three");
    let lesson = lesson_dir(&lab, "three", THREE_CONTAINERS, &[]);
    let up = lab.up(&lesson, "vialctl-three", &["--mgmt-pool", "198.18.160.0/24"]);
    assert!(up.status.success());
    assert!(text(&up.stdout).contains("c1             cli"), "the published presentations are printed");
    // eth1..N in the order of the connections that mention the endpoint; a = .1, b = .2.
    let expected = [
        ("c1", [("eth1", "198.18.60.1/24"), ("eth2", "198.18.61.2/24")]),
        ("c2", [("eth1", "198.18.60.2/24"), ("eth2", "198.18.62.1/30")]),
        ("c3", [("eth1", "198.18.61.1/24"), ("eth2", "198.18.62.2/30")]),
    ];
    for (endpoint, links) in expected {
        let container = format!("vial-vialctl-three-{endpoint}");
        for (iface, address) in links {
            let shown = exec(&container, &["ip", "-o", "addr", "show", "dev", iface]);
            assert!(shown.contains(address), "{endpoint}:{iface} should have {address}: {shown}");
            let mtu = exec(&container, &["cat", &format!("/sys/class/net/{iface}/mtu")]);
            assert_eq!(mtu.trim(), "9000", "{endpoint}:{iface}");
        }
    }
    // The wiring carries traffic: c1 reaches c2 and c3 over their own links.
    exec("vial-vialctl-three-c1", &["ping", "-c", "1", "-W", "5", "198.18.60.2"]);
    exec("vial-vialctl-three-c1", &["ping", "-c", "1", "-W", "5", "198.18.61.1"]);
    // The management network came from the pool.
    let subnet = testkit::docker::stdout(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        "vial-vialctl-three",
    ])
    .unwrap();
    assert_eq!(subnet.trim(), "198.18.160.0/24");

    // status --json: every endpoint running, every link up; a pulled link shows at both ends.
    let status: serde_json::Value =
        serde_json::from_slice(&lab.vialctl(&["status", "vialctl-three", "--json"]).stdout).unwrap();
    let endpoints = status["vialctl-three"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3);
    assert!(
        endpoints
            .iter()
            .all(|e| e["health"] == "ready" && e["links"].as_array().unwrap().iter().all(|l| l["state"] == "up")),
        "{status}"
    );
    assert!(lab.vialctl(&["link", "set", "c1:eth1", "down", "--lesson", "vialctl-three"]).status.success());
    let carrier = exec("vial-vialctl-three-c2", &["cat", "/sys/class/net/eth1/carrier"]);
    assert_eq!(carrier.trim(), "0", "c2 lost carrier when c1's end was pulled");
    assert!(lab.vialctl(&["link", "set", "c1:eth1", "up", "--lesson", "vialctl-three"]).status.success());
    wait_until(Duration::from_secs(10), "c2's carrier back", || {
        (exec("vial-vialctl-three-c2", &["cat", "/sys/class/net/eth1/carrier"]).trim() == "1").then_some(())
    });
    // Names that are not in the lesson are refused with what there is.
    let wrong = lab.vialctl(&["link", "set", "c1:eth9", "down", "--lesson", "vialctl-three"]);
    assert_eq!(wrong.status.code(), Some(64));
    assert!(text(&wrong.stderr).contains("link c1:eth9: the lesson has eth1, eth2"), "{}", text(&wrong.stderr));
    let wrong = lab.vialctl(&["restart", "c9", "--lesson", "vialctl-three"]);
    assert_eq!(wrong.status.code(), Some(64));
    assert!(text(&wrong.stderr).contains("endpoint c9: the lesson has c1, c2, c3"), "{}", text(&wrong.stderr));
    let graph = text(&lab.vialctl(&["graph", "vialctl-three"]).stdout);
    assert!(graph.contains("\"c3\" -- \"c1\""), "{graph}");

    assert!(lab.vialctl(&["down", "vialctl-three"]).status.success());
    nothing_left(&lab, "vialctl-three");
    let again = lab.vialctl(&["down", "vialctl-three"]);
    assert!(again.status.success(), "a second down succeeds");
    lab.lessons.clear();
}

/// `vialctl up` of the three-container lesson as `slug`, edited by `edit`, with `args`;
/// the lab (to check what is left) and the failed run's exit code and error output.
fn failing_up(slug: &str, edit: impl Fn(String) -> String, args: &[&str]) -> (Lab, Option<i32>, String) {
    let mut lab = Lab::new(slug);
    let meta = edit(THREE_CONTAINERS.replace("slug: vialctl-three", &format!("slug: {slug}")));
    let lesson = lesson_dir(&lab, slug, &meta, &[]);
    let up = lab.up(&lesson, slug, args);
    assert!(!up.status.success(), "vialctl up {slug} should fail");
    lab.lessons.clear();
    (lab, up.status.code(), text(&up.stderr))
}

#[test]
fn a_missing_image_fails_naming_the_endpoint_and_leaves_nothing() {
    // Builds nothing the test uses, but starts the engine when none answers: the failure
    // below must be the missing image, not a missing engine.
    build_image("utility");
    let (lab, code, err) = failing_up("vialctl-noimage", |m| m, &["--image", "utility=vial/no-such-image:latest"]);
    assert_eq!(code, Some(69));
    assert!(
        err.contains("endpoint c1") && err.contains("vial/no-such-image:latest") && err.contains("--image utility="),
        "{err}"
    );
    nothing_left(&lab, "vialctl-noimage");
}

#[test]
fn a_taken_port_fails_naming_the_endpoint_and_leaves_nothing() {
    build_image("utility");
    // c1 and c2 publish 22 on base and base+1, c3 on base+2: take c2's.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let base = (taken - 1).to_string();
    let (lab, _, err) = failing_up("vialctl-port", |m| m, &["--port-base", &base, "--mgmt-pool", "198.18.161.0/24"]);
    assert!(err.contains("endpoint c2"), "the error names c2: {err}");
    assert!(err.contains(&taken.to_string()), "{err}");
    nothing_left(&lab, "vialctl-port");
}

#[test]
fn an_endpoint_that_never_gets_ready_times_out_naming_it_and_leaves_nothing() {
    build_image("utility");
    // Nothing in the utility image listens on 8080, so its web presentation never answers.
    let never = |meta: String| {
        meta.replace("  additionalPorts: [22]", "  presentations:\n  - name: web\n    port: 8080\n    type: http")
    };
    let (lab, code, err) = failing_up("vialctl-never", never, &["--timeout", "15s", "--mgmt-pool", "198.18.162.0/24"]);
    assert_eq!(code, Some(75));
    assert!(err.contains("endpoint c3 was not usable within 15s (it was probing)"), "{err}");
    nothing_left(&lab, "vialctl-never");
}

/// OSPF neighbor states `r` sees, through its published SSH port.
fn ospf_neighbors(port: u16) -> String {
    let (_, shown) = ssh_at("127.0.0.1", port, "sudo vtysh -c 'show ip ospf neighbor'");
    shown
}

/// The host port of `endpoint`'s SSH presentation, from `vialctl status --json`.
pub(crate) fn ssh_port(lab: &Lab, lesson: &str, endpoint: &str) -> u16 {
    let status: serde_json::Value = serde_json::from_slice(&lab.vialctl(&["status", lesson, "--json"]).stdout).unwrap();
    let found = status[lesson].as_array().unwrap().iter().find(|e| e["endpoint"] == endpoint).unwrap().clone();
    found["ports"]["22"].as_u64().unwrap() as u16
}

#[test]
fn the_example_lesson_reaches_ospf_full_loses_a_pulled_link_and_survives_a_restart() {
    let _turn = frr_turn();
    for image in ["frr", "utility", "configurator"] {
        build_image(image);
    }
    let mut lab = Lab::new("vialctl-ospf");
    let lesson = repo().join("examples/lessons/ospf-basics");
    let up = lab.up(&lesson, "ospf-basics", &["--mgmt-pool", "198.18.163.0/24", "--timeout", "900s"]);
    assert!(up.status.success());
    let status = text(&lab.vialctl(&["status", "ospf-basics"]).stdout);
    for endpoint in ["r1", "r2", "linux1"] {
        assert!(status.lines().any(|l| l.starts_with(endpoint) && l.contains(" ready ")), "{status}");
    }
    let (r1, r2) = (ssh_port(&lab, "ospf-basics", "r1"), ssh_port(&lab, "ospf-basics", "r2"));
    let full = |port: u16| ospf_neighbors(port).contains("Full");
    wait_until(Duration::from_secs(180), "OSPF Full on r1 and r2", || (full(r1) && full(r2)).then_some(()));

    // A pulled link: both guests see carrier loss, and OSPF drops the neighbor on both.
    assert!(lab.vialctl(&["link", "set", "r1:eth1", "down"]).status.success());
    wait_until(Duration::from_secs(120), "OSPF to drop the neighbor on both", || {
        (!full(r1) && !full(r2)).then_some(())
    });
    assert!(lab.vialctl(&["link", "set", "r1:eth1", "up"]).status.success());
    wait_until(Duration::from_secs(180), "OSPF Full again", || (full(r1) && full(r2)).then_some(()));

    // r2 restarts; r1 is not restarted and gets its neighbor back.
    let r1_started =
        testkit::docker::stdout(&["inspect", "-f", "{{.State.StartedAt}}", "vial-ospf-basics-r1"]).unwrap();
    assert!(lab.vialctl(&["restart", "r2"]).status.success());
    let r2 = ssh_port(&lab, "ospf-basics", "r2");
    wait_until(Duration::from_secs(240), "OSPF Full after r2's restart", || (full(r1) && full(r2)).then_some(()));
    let r1_after = testkit::docker::stdout(&["inspect", "-f", "{{.State.StartedAt}}", "vial-ospf-basics-r1"]).unwrap();
    assert_eq!(r1_started, r1_after, "r1 was not restarted");

    assert!(lab.vialctl(&["down"]).status.success());
    nothing_left(&lab, "ospf-basics");
    assert!(lab.vialctl(&["down"]).status.success());
    lab.lessons.clear();
}

#[test]
fn bad_arguments_and_names_are_refused_naming_the_field_and_the_fix() {
    build_image("utility");
    let lab = Lab::new("vialctl-bad");
    let lesson = lesson_dir(&lab, "bad", &THREE_CONTAINERS.replace("slug: vialctl-three", "slug: vialctl-bad"), &[]);
    let lesson = lesson.to_str().unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["up", lesson, "--image", "utility"], 64, "--image \"utility\": give SLUG=REFERENCE"),
        (&["up", lesson, "--stage", "7"], 64, "--stage 7: the lesson has stages 0..0"),
        (&["up", lesson, "--timeout", "10x"], 64, "\"10x\" is not a duration"),
        (&["up", lesson, "--mgmt-pool", "198.18.0.0/33"], 64, "--mgmt-pool"),
        (&["up", "/nonexistent/lesson"], 66, "/nonexistent/lesson: no such directory"),
        (&["link", "set", "c1eth1", "down", "--lesson", "vialctl-bad"], 64, "links named ENDPOINT:IFACE"),
        (&["link", "set", "c1:eth1", "sideways"], 64, "possible values: up, down"),
        (&["restart", "c9", "--lesson", "vialctl-bad"], 66, "no lesson \"vialctl-bad\" is up"),
        (&["status", "vialctl-bad"], 66, "`vialctl status` lists the lessons that are"),
    ];
    for (args, code, message) in cases {
        let output = lab.vialctl(args);
        let err = text(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "vialctl {args:?}: {err}");
        assert!(err.contains(message), "vialctl {args:?} should say {message:?}: {err}");
    }
    nothing_left(&lab, "vialctl-bad");
}
