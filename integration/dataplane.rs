//! Data links stitched to VM NICs, end to end: two `linux` guests cabled through their
//! containers' eth1 ping each other in every plumbing mode that passes IP, a link that
//! arrives after the VM is ready is hot-plugged and carries traffic, and a missing link
//! ends the wait with an error that names it.

use crate::support::*;
use nix::sys::signal::Signal;
use std::time::Duration;

/// The guest side of a data link: address eth1 from the lesson directory (read over 9p),
/// then report on the console once the peer answers.
fn guest_init(own: &str, peer: &str) -> String {
    format!(
        "ip addr add {own}/24 dev eth1\n\
         (i=0; while [ $i -lt 600 ]; do if ping -c 1 -W 1 {peer} >/dev/null 2>&1; then echo \"vial-guest: peer {peer} reachable\"; break; fi; i=$((i+1)); done) &\n"
    )
}

fn two_guests_ping_each_other(mode: &str) {
    let mut a = Sandbox::new(&format!("dp-{mode}-a"));
    let mut b = Sandbox::new(&format!("dp-{mode}-b"));
    // Each endpoint's eth1 is one end of the same veth: the lesson's connection.
    veth_between(&a.netns, "eth1", &b.netns, "eth1", 9000);
    let net = 100 + (a.addr.octets()[2] % 100);
    let (addr_a, addr_b) = (format!("198.18.{net}.1"), format!("198.18.{net}.2"));
    std::fs::write(a.lesson.join("guest-init.sh"), guest_init(&addr_a, &addr_b)).unwrap();
    std::fs::write(b.lesson.join("guest-init.sh"), guest_init(&addr_b, &addr_a)).unwrap();
    let env = [("VIAL_DATA_IFACES", "1"), ("VIAL_PLUMBING", mode)];
    let vial_a = a.start(&env, "");
    let vial_b = b.start(&env, "");
    a.wait_ready();
    b.wait_ready();
    let status = a.status().unwrap();
    assert_eq!(status["links"][0]["interface"], "eth1", "{status}");
    assert_eq!(status["links"][0]["mode"], mode, "{status}");
    assert_eq!(status["links"][0]["state"], "up", "{status}");
    for (sandbox, peer) in [(&a, &addr_b), (&b, &addr_a)] {
        let line = format!("peer {peer} reachable");
        wait_until(BOOT_TIMEOUT, &line, || sandbox.console().contains(&line).then_some(()));
    }
    signal(vial_a, Signal::SIGTERM);
    signal(vial_b, Signal::SIGTERM);
    assert_eq!(a.wait(Duration::from_secs(60)).code(), Some(0), "{}", a.log());
    assert_eq!(b.wait(Duration::from_secs(60)).code(), Some(0), "{}", b.log());
    // Everything vial made is gone: only the veth end and the management interface remain.
    for sandbox in [&a, &b] {
        let out = std::process::Command::new("ip").args(["-n", &sandbox.netns, "-o", "link"]).output().unwrap();
        let links = String::from_utf8_lossy(&out.stdout);
        assert!(!links.contains("vtap") && !links.contains("vbr") && !links.contains("vmvt"), "{links}");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &sandbox.netns, "tc", "qdisc", "show", "dev", "eth1"])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ingress"), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn two_guests_cabled_through_tc_redirect_ping_each_other() {
    two_guests_ping_each_other("tc");
}

#[test]
fn two_guests_cabled_through_macvtap_ping_each_other() {
    two_guests_ping_each_other("macvtap");
}

#[test]
fn a_link_added_after_ready_is_hot_plugged_and_carries_traffic() {
    let mut sandbox = Sandbox::new("late");
    let peer = Netns::new("late");
    let net = 100 + (sandbox.addr.octets()[2] % 100);
    let (guest, outside) = (format!("198.18.{net}.2"), format!("198.18.{net}.1"));
    std::fs::write(sandbox.lesson.join("guest-hotplug.sh"), format!("ip addr add {guest}/24 dev \"$1\"\n")).unwrap();
    // QEMU unprivileged (as in the images): a hot-plug hands it the TAP over QMP.
    let vial = sandbox.start(&[("VIAL_QEMU_USER", "nobody")], "");
    sandbox.wait_ready();
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    std::fs::write(sandbox.lesson.join("hello.txt"), "over the late link").unwrap();
    // The guest's HTTP server answers on every address, so a GET over the data link proves
    // ARP, IP and TCP through the hot-plugged NIC.
    let url = format!("http://{guest}/hello.txt");
    wait_until(BOOT_TIMEOUT, "the lesson file over the late link", || {
        peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]).then_some(())
    });
    let status = sandbox.status().unwrap();
    assert_eq!(status["links"][0]["interface"], "eth1", "{status}");
    assert_eq!(status["state"], "ready", "{status}");
    assert!(sandbox.console().contains("hot-plugged eth1"), "{}", sandbox.console());

    // The cable is pulled: the NIC is unplugged and health says the link is missing...
    ip(&["-n", &peer.0, "link", "del", "eth1"]);
    wait_until(Duration::from_secs(60), "the link reported missing", || {
        sandbox.status().filter(|s| s["links"][0]["state"] == "missing").map(|_| ())
    });
    // ...and plugged back into the same slot when the cable returns.
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    wait_until(BOOT_TIMEOUT, "the lesson file over the re-plugged link", || {
        peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]).then_some(())
    });
    assert_eq!(sandbox.status().unwrap()["links"][0]["nic"], 1);
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(Duration::from_secs(60)).code(), Some(0), "{}", sandbox.log());
}

/// An unplug waits up to 10 s for the guest to release its NIC; a paused guest never does.
/// A stop meanwhile is carried out at once, not after the wait: health says `stopping` while
/// the link's unplug is still pending (its state changes only when the unplug ends).
#[test]
fn a_stop_during_an_unplug_the_guest_cannot_answer_is_not_held_up_by_it() {
    let mut sandbox = Sandbox::new("unplug-stop");
    let peer = Netns::new("unps");
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    // A stop timeout near the unplug's 10 s keeps `stopping` visible long enough on a
    // loaded machine: QEMU quits when it runs out.
    let vial = sandbox.start(&[("VIAL_DATA_IFACES", "1"), ("VIAL_STOP_TIMEOUT", "8s")], "");
    sandbox.wait_ready();
    assert!(qmp_command(&sandbox, "stop").contains("\"return\""));
    ip(&["-n", &peer.0, "link", "del", "eth1"]);
    wait_until(Duration::from_secs(30), "the unplug started", || {
        sandbox.log().contains("unplugging its NIC").then_some(())
    });
    signal(vial, Signal::SIGTERM);
    let status = wait_until(Duration::from_secs(30), "health says stopping", || {
        sandbox.status().filter(|s| s["state"] == "stopping")
    });
    assert_ne!(status["links"][0]["state"], "missing", "the stop must not wait for the unplug: {status}");
    // The paused guest ignores the power button: QEMU quits after the stop timeout (exit 2),
    // the pending unplug ends with QEMU, and vial removes what it stitched.
    assert_eq!(sandbox.wait(Duration::from_secs(60)).code(), Some(2), "{}", sandbox.log());
    let out = std::process::Command::new("ip").args(["-n", &sandbox.netns, "-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(!links.contains("vtap"), "{links}");
    wait_until(Duration::from_secs(10), "qemu to be gone", || sandbox.qemu_processes().is_empty().then_some(()));
}

#[test]
fn waiting_for_three_links_when_two_exist_names_the_missing_one() {
    let mut sandbox = Sandbox::new("missing");
    let peer = Netns::new("miss");
    veth_between(&sandbox.netns, "eth1", &peer.0, "p1", 1500);
    veth_between(&sandbox.netns, "eth2", &peer.0, "p2", 1500);
    sandbox.start(&[("VIAL_DATA_IFACES", "3"), ("VIAL_LINK_TIMEOUT", "2s")], "");
    let exit = sandbox.wait(Duration::from_secs(60));
    assert_eq!(exit.code(), Some(75), "{}", sandbox.log());
    let log = sandbox.log();
    let line = log.lines().find(|l| l.contains("timed out")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("missing eth3") && line.contains("eth1") && line.contains("eth2"), "{line}");
}

/// Guest side: report every change of eth1's carrier, as the guest's kernel sees it, on the
/// console.
const CARRIER_WATCH: &str = "(last=; while :; do c=$(cat /sys/class/net/eth1/carrier 2>/dev/null); \
    if [ \"$c\" != \"$last\" ]; then echo \"vial-guest: eth1 carrier $c\" > /dev/console; last=$c; fi; \
    sleep 0.2; done) &\n";

#[test]
fn a_link_whose_peer_comes_up_later_goes_from_no_carrier_to_up_and_the_guest_sees_it() {
    let mut sandbox = Sandbox::new("carrier");
    let peer = Netns::new("carr");
    veth_between(&sandbox.netns, "eth1", &peer.0, "p1", 1500);
    std::fs::write(sandbox.lesson.join("guest-init.sh"), CARRIER_WATCH).unwrap();
    // The cable is in, the far end is not up yet: eth1 has no carrier.
    ip(&["-n", &peer.0, "link", "set", "p1", "down"]);
    let vial = sandbox.start(&[("VIAL_DATA_IFACES", "1")], "");
    sandbox.wait_ready();
    let link_state = |sandbox: &Sandbox| sandbox.status().map(|s| s["links"][0]["state"].clone());
    assert_eq!(link_state(&sandbox).unwrap(), "no-carrier");
    // The guest's own NIC has no carrier either (vial set its link down over QMP).
    let guest_saw =
        |sandbox: &Sandbox, carrier: &str| sandbox.console().matches(&format!("eth1 carrier {carrier}")).count();
    wait_until(Duration::from_secs(30), "the guest to see eth1 without carrier", || {
        (guest_saw(&sandbox, "0") >= 1).then_some(())
    });

    ip(&["-n", &peer.0, "link", "set", "p1", "up"]);
    wait_until(Duration::from_secs(30), "the link reported up", || {
        link_state(&sandbox).filter(|state| state == "up").map(|_| ())
    });
    wait_until(Duration::from_secs(30), "the guest to see eth1's carrier", || {
        (guest_saw(&sandbox, "1") >= 1).then_some(())
    });
    ip(&["-n", &peer.0, "link", "set", "p1", "down"]);
    wait_until(Duration::from_secs(30), "the link reported without carrier", || {
        link_state(&sandbox).filter(|state| state == "no-carrier").map(|_| ())
    });
    wait_until(Duration::from_secs(30), "the guest to see eth1 lose its carrier", || {
        (guest_saw(&sandbox, "0") >= 2).then_some(())
    });
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(Duration::from_secs(60)).code(), Some(0), "{}", sandbox.log());
}

/// Someone removes part of a link's plumbing after ready (`sabotage`, run in the endpoint's
/// namespace): vial notices, restores it, counts the repair in health, and traffic flows again.
fn broken_plumbing_is_restored(mode: &str, sabotage: &[&str]) {
    let mut sandbox = Sandbox::new(&format!("fix-{mode}"));
    let peer = Netns::new(&format!("fix-{mode}"));
    let net = 100 + (sandbox.addr.octets()[2] % 100);
    let (guest, outside) = (format!("198.18.{net}.2"), format!("198.18.{net}.1"));
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    std::fs::write(sandbox.lesson.join("guest-init.sh"), format!("ip addr add {guest}/24 dev eth1\n")).unwrap();
    std::fs::write(sandbox.lesson.join("hello.txt"), "over the data link").unwrap();
    let vial = sandbox.start(&[("VIAL_DATA_IFACES", "1"), ("VIAL_PLUMBING", mode)], "");
    sandbox.wait_ready();
    let url = format!("http://{guest}/hello.txt");
    let served = || peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]);
    wait_until(BOOT_TIMEOUT, "the lesson file over the data link", || served().then_some(()));

    let mut command = vec!["netns", "exec", sandbox.netns.as_str()];
    command.extend_from_slice(sabotage);
    ip(&command);
    let status = wait_until(Duration::from_secs(30), "vial to restore the plumbing", || {
        sandbox.status().filter(|s| s["links"][0]["repairs"] == 1 && s["links"][0]["state"] == "up")
    });
    assert_eq!(status["state"], "ready", "{status}");
    assert!(sandbox.log().contains("plumbing broken after ready"), "{}", sandbox.log());
    wait_until(Duration::from_secs(30), "the lesson file over the restored link", || served().then_some(()));
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(Duration::from_secs(60)).code(), Some(0), "{}", sandbox.log());
}

#[test]
fn a_tc_filter_deleted_after_ready_is_restored() {
    broken_plumbing_is_restored("tc", &["tc", "filter", "del", "dev", "eth1", "ingress"]);
}

#[test]
fn a_bridge_port_removed_after_ready_is_restored() {
    broken_plumbing_is_restored("bridge", &["ip", "link", "set", "dev", "eth1", "nomaster"]);
}

/// vial is killed (no clean-up runs) in a network namespace that survives, as a pod's does
/// when its container restarts; a new vial in it cleans up what is vial's and starts. A
/// device of someone else's on the same link is left alone.
fn a_start_over_an_unclean_exit(mode: &str, leftover: &str, stacked: bool) {
    let mut sandbox = Sandbox::new(&format!("left-{mode}"));
    let peer = Netns::new(&format!("left-{mode}"));
    let net = 100 + (sandbox.addr.octets()[2] % 100);
    let (guest, outside) = (format!("198.18.{net}.2"), format!("198.18.{net}.1"));
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    // Not vial's, and must survive every start: a macvlan on the same link (tc mode only: a
    // link with a macvlan can be neither a bridge port nor under a passthru macvtap), and a
    // device whose name only starts like vial's.
    if stacked {
        ip(&[
            "-n",
            &sandbox.netns,
            "link",
            "add",
            "link",
            "eth1",
            "name",
            "other0",
            "type",
            "macvlan",
            "mode",
            "bridge",
        ]);
    }
    ip(&["-n", &sandbox.netns, "link", "add", "vbrother", "type", "bridge"]);
    std::fs::write(sandbox.lesson.join("guest-init.sh"), format!("ip addr add {guest}/24 dev eth1\n")).unwrap();
    std::fs::write(sandbox.lesson.join("hello.txt"), "over the data link").unwrap();
    let env = [("VIAL_DATA_IFACES", "1"), ("VIAL_PLUMBING", mode)];
    let vial = sandbox.start(&env, "");
    sandbox.wait_ready();
    signal(vial, Signal::SIGKILL);
    sandbox.wait(Duration::from_secs(30));
    let netns = sandbox.netns.clone();
    let links = || {
        let out = std::process::Command::new("ip").args(["-n", &netns, "-o", "link"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let qdiscs = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "tc", "qdisc", "show", "dev", "eth1"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        links().contains(leftover) || qdiscs().contains(leftover),
        "no leftover {leftover}:\n{}{}",
        links(),
        qdiscs()
    );

    let vial = sandbox.start(&env, "");
    sandbox.wait_ready();
    let url = format!("http://{guest}/hello.txt");
    wait_until(BOOT_TIMEOUT, "the lesson file over the data link after the restart", || {
        peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]).then_some(())
    });
    assert!(links().contains("vbrother"), "someone else's device was removed:\n{}", links());
    assert!(!stacked || links().contains("other0@eth1"), "someone else's device was removed:\n{}", links());
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(Duration::from_secs(60)).code(), Some(0), "{}", sandbox.log());
}

#[test]
fn a_start_over_an_unclean_exit_in_tc_mode_removes_the_old_ingress_qdisc() {
    a_start_over_an_unclean_exit("tc", "ingress", true);
}

#[test]
fn a_start_over_an_unclean_exit_in_bridge_mode_removes_the_old_bridge() {
    a_start_over_an_unclean_exit("bridge", "vbr1", false);
}

#[test]
fn a_start_over_an_unclean_exit_in_macvtap_mode_removes_the_old_macvtap() {
    a_start_over_an_unclean_exit("macvtap", "vmvt1", false);
}
