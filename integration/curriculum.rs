//! Lessons written in the NRE Labs curriculum's style run on `vialctl`: the example lessons
//! `linux-tour` (a `utility` endpoint, two stages, files the learner reads from `/antidote`)
//! and `bgp-hub` (three `frr` routers in eBGP, configured the way the curriculum's FRR
//! lessons are: per-daemon files and ifupdown, copied by a paramiko script). Each test runs
//! the real `vialctl` binary, then the learner's steps from the stage guide over SSH on the
//! published port, and checks what they print. The guides' steps are the fenced blocks
//! followed by Antidote's `runSnippetInTab('<endpoint>', this)` button; blocks without one
//! (sample output, experiments that change the lab) are not run.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::images::{build_image, frr_turn, ssh_at};
use crate::support::{repo, wait_until};
use crate::vialctl::{nothing_left, ssh_port, text, Lab};

/// The commands of each of `endpoint`'s steps in `stage`'s guide, in order.
fn guide_steps(lesson: &Path, stage: usize, endpoint: &str) -> Vec<String> {
    let guide = std::fs::read_to_string(lesson.join(format!("stage{stage}/guide.md"))).unwrap();
    let button = format!("runSnippetInTab('{endpoint}'");
    let mut lines = guide.lines();
    let mut steps = Vec::new();
    while let Some(line) = lines.next() {
        if !line.starts_with("```") {
            continue;
        }
        let block: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
        let next = lines.clone().find(|l| !l.trim().is_empty()).unwrap_or_default();
        if next.contains(&button) {
            steps.push(block.join("\n"));
        }
    }
    assert!(!steps.is_empty(), "stage {stage}'s guide has no steps for {endpoint}");
    steps
}

/// Runs `steps` one after the other in one SSH session on `port`, as a learner's terminal
/// would (the directory and files one step leaves are there for the next); each step with
/// what it printed. A failing step fails the test with everything printed so far.
fn run_steps(port: u16, steps: &[String]) -> Vec<(String, String)> {
    const MARK: &str = "@@vial-step";
    let mut script = String::from("set -e\nexec 2>&1\n");
    for (n, step) in steps.iter().enumerate() {
        script.push_str(&format!("echo {MARK} {n}\n{step}\n"));
    }
    let (ok, output) = ssh_at("127.0.0.1", port, &script);
    println!("{output}");
    assert!(ok, "a step failed:\n{output}");
    let mut printed = vec![String::new(); steps.len()];
    let mut current = None;
    for line in output.lines() {
        match line.strip_prefix(MARK) {
            Some(n) => current = n.trim().parse::<usize>().ok(),
            None => {
                if let Some(n) = current {
                    printed[n].push_str(line);
                    printed[n].push('\n');
                }
            }
        }
    }
    steps.iter().cloned().zip(printed).collect()
}

/// What the step whose commands start with `first` printed.
fn printed<'a>(ran: &'a [(String, String)], first: &str) -> &'a str {
    let found = ran.iter().find(|(step, _)| step.starts_with(first));
    &found.unwrap_or_else(|| panic!("no step starts with {first:?}")).1
}

#[test]
fn linux_tour_runs_both_stages_guides_over_ssh() {
    for image in ["utility", "configurator"] {
        build_image(image);
    }
    let mut lab = Lab::new("curriculum-linux");
    let lesson = repo().join("examples/lessons/linux-tour");
    let up = lab.up(&lesson, "linux-tour", &["--mgmt-pool", "198.18.164.0/24"]);
    assert!(up.status.success());
    let port = ssh_port(&lab, "linux-tour", "linux1");

    // Stage 0: the stage config copied notes.txt in and made scratch/.
    let ran = run_steps(port, &guide_steps(&lesson, 0, "linux1"));
    assert_eq!(printed(&ran, "whoami"), "antidote\nlinux1\n/home/antidote\n");
    let home = printed(&ran, "ls -l");
    assert!(home.contains("notes.txt") && home.contains("scratch"), "{home}");
    let notes = std::fs::read_to_string(lesson.join("stage0/configs/linux1/notes.txt")).unwrap();
    assert_eq!(printed(&ran, "cat notes.txt"), notes);
    assert!(printed(&ran, "grep leaf").ends_with("\n3\n"), "{}", printed(&ran, "grep leaf"));
    assert_eq!(printed(&ran, "awk"), "leaf2\nleaf3\n");
    let copied = printed(&ran, "cp notes.txt scratch/");
    assert!(copied.contains("notes.txt") && copied.ends_with("/home/antidote\n"), "{copied}");
    let share = printed(&ran, "ls /antidote");
    for file in ["lesson.meta.yaml", "stage0", "stage1", "greet.sh", "render.py"] {
        assert!(share.contains(file), "{file} not in /antidote:\n{share}");
    }

    // Stage 1 on the running lesson: its config copied names.txt in and made rendered/.
    assert!(lab.vialctl(&["stage", "1", "--lesson", "linux-tour"]).status.success());
    let ran = run_steps(port, &guide_steps(&lesson, 1, "linux1"));
    let names = std::fs::read_to_string(lesson.join("stage1/configs/linux1/names.txt")).unwrap();
    assert_eq!(printed(&ran, "cat names.txt"), names);
    let greeted = printed(&ran, "bash /antidote/stage1/greet.sh");
    assert!(greeted.starts_with("Hello, Ada, from linux1!\n") && greeted.ends_with("3 greetings\n"), "{greeted}");
    let by_name = printed(&ran, "ls -l /antidote/stage1/greet.sh");
    assert!(by_name.starts_with("-rwxr-xr-x") && by_name.ends_with("3 greetings\n"), "{by_name}");
    let appended = printed(&ran, "echo Vint");
    assert!(appended.contains("Hello, Vint, from linux1!\n") && appended.ends_with("4 greetings\n"), "{appended}");
    let rendered = printed(&ran, "cat /antidote/stage1/render.py");
    for line in ["# leaf1: /etc/network/interfaces", "iface eth1 inet static", "    address 198.18.120.3/31"] {
        assert!(rendered.contains(line), "{line:?} not rendered:\n{rendered}");
    }
    assert!(!rendered.contains("eth3"), "the disabled interface was rendered:\n{rendered}");
    let saved = printed(&ran, "python3 /antidote/stage1/render.py > rendered/leaf1.interfaces");
    assert!(rendered.ends_with(saved) && saved.starts_with("# leaf1:"), "{saved}");
    let heads = printed(&ran, "cp /antidote/stage1/devices.yml leaf2.yml");
    assert!(heads.contains("# leaf1: ") && heads.contains("# leaf2: "), "{heads}");

    assert!(lab.vialctl(&["down", "linux-tour"]).status.success());
    nothing_left(&lab, "linux-tour");
    lab.lessons.clear();
}

/// One of `bgp-hub`'s routers, as its stage configuration sets it up.
struct Router {
    name: &'static str,
    loopback: &'static str,
    /// Its BGP neighbors: address and AS.
    neighbors: &'static [(&'static str, u64)],
}

const ROUTERS: [Router; 3] = [
    Router { name: "hub", loopback: "198.19.254.1/32", neighbors: &[("198.18.110.2", 65001), ("198.18.110.6", 65002)] },
    Router { name: "branch-1", loopback: "198.19.254.2/32", neighbors: &[("198.18.110.1", 65000)] },
    Router { name: "branch-2", loopback: "198.19.254.3/32", neighbors: &[("198.18.110.5", 65000)] },
];

/// What `router` still lacks (sessions not Established, loopbacks not learned by BGP and
/// installed), from `show bgp summary json` and `show ip route json` on `port`; empty when
/// nothing.
fn bgp_missing(router: &Router, port: u16) -> Vec<String> {
    let Router { name, neighbors, .. } = router;
    let (ok, shown) = ssh_at("127.0.0.1", port, "sudo vtysh -c 'show bgp summary json' -c 'show ip route json'");
    let mut documents = serde_json::Deserializer::from_str(&shown).into_iter::<Value>();
    let (Some(Ok(summary)), Some(Ok(routes))) = (documents.next(), documents.next()) else {
        return vec![format!("{name}: no JSON from vtysh (ssh ok: {ok}): {}", shown.trim())];
    };
    let mut missing = Vec::new();
    for (address, remote_as) in neighbors.iter() {
        let peer = &summary["ipv4Unicast"]["peers"][*address];
        if peer["state"] != "Established" || peer["remoteAs"] != *remote_as {
            missing.push(format!("{name}: session to {address} (AS {remote_as}): {peer}"));
        }
    }
    for other in ROUTERS.iter().filter(|other| other.name != *name) {
        let learned = routes[other.loopback]
            .as_array()
            .is_some_and(|entries| entries.iter().any(|e| e["protocol"] == "bgp" && e["installed"] == true));
        if !learned {
            missing.push(format!("{name}: no installed BGP route to {}'s {}", other.name, other.loopback));
        }
    }
    missing
}

#[test]
fn bgp_hub_routers_establish_ebgp_and_learn_every_loopback() {
    let _turn = frr_turn();
    for image in ["frr", "configurator"] {
        build_image(image);
    }
    let mut lab = Lab::new("curriculum-bgp");
    let lesson = repo().join("examples/lessons/bgp-hub");
    let up = lab.up(&lesson, "bgp-hub", &["--mgmt-pool", "198.18.165.0/24", "--timeout", "900s"]);
    assert!(up.status.success(), "{}", text(&up.stderr));
    let ports: Vec<u16> = ROUTERS.iter().map(|router| ssh_port(&lab, "bgp-hub", router.name)).collect();

    // For the log, should the wait below time out: what the stage configs left in place.
    for (router, port) in ROUTERS.iter().zip(&ports) {
        let (_, shown) = ssh_at("127.0.0.1", *port, "ip -br address; sudo ls -l /etc/frr; systemctl is-active frr");
        println!("{}:\n{shown}", router.name);
    }

    // Every session Established and every loopback learned everywhere. Each change of what
    // is missing is printed, so a timeout shows how far it got.
    let mut last = Vec::new();
    wait_until(Duration::from_secs(300), "every BGP session Established and every loopback learned", || {
        let missing: Vec<String> =
            ROUTERS.iter().zip(&ports).flat_map(|(router, port)| bgp_missing(router, *port)).collect();
        if missing != last {
            println!("still missing:\n  {}", missing.join("\n  "));
            last = missing.clone();
        }
        missing.is_empty()
    });

    for (Router { name, .. }, port) in ROUTERS.iter().zip(&ports) {
        // The stage config installed the lesson's files, as FRR wants them owned, and
        // zebra runs although the daemons file asks for a module Debian's FRR lacks.
        let (ok, shown) = ssh_at(
            "127.0.0.1",
            *port,
            "sudo cat /etc/frr/daemons; sudo stat -c '%U:%G %a %n' /etc/frr/zebra.conf /etc/frr/bgpd.conf \
             /etc/frr/vtysh.conf; pgrep -a zebra",
        );
        assert!(ok, "{name}: {shown}");
        assert!(shown.contains("-M sysrepo") && shown.contains("bgpd=yes"), "{name}'s daemons file:\n{shown}");
        for owned in
            ["frr:frr 640 /etc/frr/zebra.conf", "frr:frr 640 /etc/frr/bgpd.conf", "frr:frrvty 640 /etc/frr/vtysh.conf"]
        {
            assert!(shown.contains(owned), "{name}: {owned:?} expected:\n{shown}");
        }
        assert!(shown.lines().any(|l| l.contains("/usr/lib/frr/zebra")), "{name}: zebra does not run:\n{shown}");
        assert!(!shown.lines().any(|l| l.contains("/usr/lib/frr/zebra") && l.contains("sysrepo")), "{shown}");
        // ... and the console said which module was left out, and why.
        let console =
            testkit::docker::stdout(&["exec", &format!("vial-bgp-hub-{name}"), "cat", "/run/vial/console.log"])
                .unwrap_or_default();
        assert!(
            console.contains("vial: FRR module sysrepo left out of zebra's command line")
                && console.contains("does not ship it"),
            "{name}'s console does not say that sysrepo was left out:\n{console}"
        );

        // The learner's steps for this router, from the guide.
        let ran = run_steps(*port, &guide_steps(&lesson, 0, name));
        if *name == "hub" {
            let table = printed(&ran, "sudo vtysh -c 'show ip bgp'");
            assert!(table.contains("198.19.254.2/32") && table.contains("198.19.254.3/32"), "{table}");
        }
        if *name == "branch-2" {
            let path = printed(&ran, "sudo vtysh -c 'show ip bgp 198.19.254.2/32'");
            assert!(path.contains("65000 65001"), "branch-1's loopback through the hub's AS:\n{path}");
        }
    }

    assert!(lab.vialctl(&["down", "bgp-hub"]).status.success());
    nothing_left(&lab, "bgp-hub");
    lab.lessons.clear();
}
