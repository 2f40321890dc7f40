//! Starting from a RAM snapshot (`vial snapshot`, then `vial run`) with the real `linux`
//! guest under TCG: the saved guest resumes, the lesson share and the data links are
//! hot-plugged into it, and a snapshot that does not fit or does not load gives a cold boot
//! that says why.

use crate::support::*;
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `vial snapshot` in the sandbox's network namespace (QEMU's forwards listen on its
/// loopback, where the readiness probe looks) and returns the snapshot directory.
fn capture(sandbox: &Sandbox) -> PathBuf {
    capture_with(sandbox, &[])
}

/// [`capture`] with `extra` settings.
fn capture_with(sandbox: &Sandbox, extra: &[(&str, &str)]) -> PathBuf {
    let output = Command::new("ip")
        .args(["netns", "exec", &sandbox.netns])
        .arg(vial_bin())
        .arg("snapshot")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(sandbox.env())
        .env("VIAL_RUN_DIR", sandbox.dir.path().join("capture-run"))
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "vial snapshot failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("snapshot saved in"), "{stdout}");
    let dir = sandbox.profile.parent().unwrap().join("snapshot");
    for file in ["vmstate", "snapshot.json"] {
        assert!(dir.join(file).is_file(), "{file} missing after vial snapshot");
    }
    dir
}

fn boot(sandbox: &Sandbox) -> serde_json::Value {
    sandbox.status().expect("status")["boot"].clone()
}

fn stop_cleanly(sandbox: &mut Sandbox, vial: u32) {
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(0), "clean power-off\n{}", sandbox.log());
    wait_until(Duration::from_secs(10), "qemu to be gone", || sandbox.qemu_processes().is_empty().then_some(()));
}

#[test]
fn a_snapshot_start_resumes_the_guest_and_hot_plugs_the_share_and_the_links() {
    let mut sandbox = Sandbox::new("snap");
    capture(&sandbox);

    let peer = Netns::new("snap");
    let net = 100 + (sandbox.addr.octets()[2] % 100);
    let (guest, outside) = (format!("198.18.{net}.2"), format!("198.18.{net}.1"));
    veth_between(&sandbox.netns, "eth1", &peer.0, "eth1", 1500);
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    let token = format!("lesson file {}", sandbox.netns);
    std::fs::write(sandbox.lesson.join("hello.txt"), &token).unwrap();
    std::fs::write(sandbox.lesson.join("guest-hotplug.sh"), format!("ip addr add {guest}/24 dev \"$1\"\n")).unwrap();

    let vial = sandbox.start(&[("VIAL_DATA_IFACES", "1")], "");
    sandbox.wait_ready();
    let boot = boot(&sandbox);
    assert_eq!(boot["from"], "snapshot", "{boot}\n{}", sandbox.log());
    assert!(boot["note"].is_null(), "{boot}");
    // The guest resumed where it was saved: it did not boot again.
    assert!(!sandbox.console().contains("Linux version"), "{}", sandbox.console());

    // The share was hot-plugged and mounted after the resume (the snapshot has none), and
    // `ready` waited for the guest to say it serves it: no retry needed.
    assert_eq!(http_get(sandbox.addr, 80, "/hello.txt").as_deref(), Some(token.as_str()));
    // The data link was hot-plugged into its slot and carries traffic.
    let url = format!("http://{guest}/hello.txt");
    wait_until(Duration::from_secs(30), "the lesson file over the data link", || {
        peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]).then_some(())
    });
    let status = sandbox.status().unwrap();
    assert_eq!(status["links"][0]["interface"], "eth1", "{status}");
    assert_eq!(status["links"][0]["nic"], 1, "{status}");
    stop_cleanly(&mut sandbox, vial);
}

#[test]
fn the_multifunction_layout_starts_from_a_snapshot_keeps_a_nic_for_a_returning_link_and_refuses_a_late_one() {
    let mut sandbox = Sandbox::new("snapmf");
    let layout = ("VIAL_NIC_LAYOUT", "multifunction");
    capture_with(&sandbox, &[layout]);

    let peer = Netns::new("snapmf");
    let net = 100 + (sandbox.addr.octets()[2] % 100);
    let (guest, outside) = (format!("198.18.{net}.2"), format!("198.18.{net}.1"));
    let netns = sandbox.netns.clone();
    let cable = |name: &str| veth_between(&netns, name, &peer.0, name, 1500);
    cable("eth1");
    cable("eth2");
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    std::fs::write(sandbox.lesson.join("hello.txt"), "lesson").unwrap();
    std::fs::write(
        sandbox.lesson.join("guest-hotplug.sh"),
        format!("[ \"$1\" = eth1 ] && ip addr add {guest}/24 dev eth1\n"),
    )
    .unwrap();

    let vial = sandbox.start(&[layout, ("VIAL_DATA_IFACES", "2")], "");
    sandbox.wait_ready();
    // From the snapshot, though its machine had no data NICs and the slot cannot gain
    // functions: they were on QEMU's command line, and the share's hot-plug made the guest
    // rescan the bus and find them, each with its own MAC.
    let boot = boot(&sandbox);
    assert_eq!(boot["from"], "snapshot", "{boot}\n{}", sandbox.log());
    wait_until(Duration::from_secs(30), "the guest to find both data NICs", || {
        let text = sandbox.console();
        (text.contains("hot-plugged eth1") && text.contains("hot-plugged eth2")).then_some(())
    });
    let url = format!("http://{guest}/hello.txt");
    let served = || peer.exec(&["curl", "-sf", "-m", "2", "-o", "/dev/null", &url]);
    wait_until(Duration::from_secs(30), "the lesson file over eth1", || served().then_some(()));

    // eth1 goes and comes back (a peer restarted): its NIC stayed, its TAP is stitched to the
    // new link, and traffic flows again.
    ip(&["-n", &peer.0, "link", "del", "eth1"]);
    let link_state = |n: usize| sandbox.status().unwrap()["links"][n]["state"].as_str().unwrap_or("").to_string();
    wait_until(Duration::from_secs(30), "eth1 missing in status", || (link_state(0) == "missing").then_some(()));
    cable("eth1");
    ip(&["-n", &peer.0, "addr", "add", &format!("{outside}/24"), "dev", "eth1"]);
    wait_until(Duration::from_secs(30), "eth1 up again in status", || (link_state(0) == "up").then_some(()));
    wait_until(Duration::from_secs(30), "the lesson file over the returned eth1", || served().then_some(()));

    // A link the VM never had cannot get a function of the slot: failed, and said why.
    cable("eth3");
    wait_until(Duration::from_secs(30), "eth3 failed in status", || (link_state(2) == "failed").then_some(()));
    assert!(sandbox.log().contains("cannot add a NIC to a running VM"), "{}", sandbox.log());
    stop_cleanly(&mut sandbox, vial);
}

/// The backing file of the endpoint's overlay of disk 0 (`qemu-img info`).
fn overlay_backing(state: &std::path::Path) -> String {
    let output = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(state.join("disk0.qcow2"))
        .output()
        .expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&output.stdout).expect("qemu-img info json");
    info["backing-filename"].as_str().unwrap_or_default().to_string()
}

/// Starts vial with `env`, waits until ready, and returns the `boot` status and the backing
/// file of its disk overlay; then stops it.
fn start_once(sandbox: &mut Sandbox, env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let vial = sandbox.start(env, "");
    sandbox.wait_ready();
    let boot_status = boot(sandbox);
    assert_eq!(http_get(sandbox.addr, 80, "/hello.txt").as_deref(), Some("lesson"), "{}", sandbox.log());
    let backing = overlay_backing(&sandbox.dir.path().join("state"));
    stop_cleanly(sandbox, vial);
    (boot_status, backing)
}

#[test]
fn a_snapshot_that_does_not_fit_or_does_not_load_gives_a_cold_boot_that_says_why() {
    let mut sandbox = Sandbox::new("snapx");
    // A disk, so that overlays and the snapshot's disk layer take part (the guest ignores it).
    let bundle = sandbox.profile.parent().unwrap().to_path_buf();
    std::fs::write(bundle.join("scratch.raw"), vec![0u8; 1 << 20]).unwrap();
    let mut profile = std::fs::read_to_string(&sandbox.profile).unwrap();
    profile.push_str("\n[[disks]]\npath = \"scratch.raw\"\nformat = \"raw\"\ninterface = \"virtio\"\n");
    std::fs::write(&sandbox.profile, profile).unwrap();
    let dir = capture(&sandbox);
    assert!(dir.join("disk0.qcow2").is_file(), "the snapshot keeps the disk's layer");
    std::fs::write(sandbox.lesson.join("hello.txt"), "lesson").unwrap();
    let state = sandbox.dir.path().join("state");
    let image_disk = bundle.join("scratch.raw").display().to_string();
    let layer = dir.join("disk0.qcow2").display().to_string();

    // Other memory than the snapshot's: the machine differs, named in the note.
    let (boot_status, backing) = start_once(&mut sandbox, &[("VIAL_MEMORY", "320M")]);
    assert_eq!(boot_status["from"], "cold", "{boot_status}");
    let note = boot_status["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("`320`") && note.contains("`256`"), "{note}");
    assert_eq!(backing, image_disk);
    std::fs::remove_dir_all(&state).unwrap();

    // From the snapshot, the overlay goes over its layer. A restart keeps that overlay (the
    // guest's disk changed since the snapshot), so the second start boots cold on it.
    let (boot_status, backing) = start_once(&mut sandbox, &[]);
    assert_eq!(boot_status["from"], "snapshot", "{boot_status}");
    assert_eq!(backing, layer);
    let (boot_status, backing) = start_once(&mut sandbox, &[]);
    assert_eq!(boot_status["from"], "cold", "{boot_status}");
    assert!(boot_status["note"].as_str().unwrap_or_default().contains("overlay is kept"), "{boot_status}");
    assert_eq!(backing, layer, "the kept overlay is used as it is");
    std::fs::remove_dir_all(&state).unwrap();

    // A damaged state file: QEMU fails to load it and exits; vial removes the overlay it made
    // over the snapshot's layer and boots cold over the image's disk.
    let vmstate = dir.join("vmstate");
    let len = std::fs::metadata(&vmstate).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&vmstate).unwrap().set_len(len / 2).unwrap();
    let (boot_status, backing) = start_once(&mut sandbox, &[]);
    assert_eq!(boot_status["from"], "cold", "{boot_status}");
    assert!(boot_status["note"].as_str().unwrap_or_default().contains("loading the snapshot"), "{boot_status}");
    assert_eq!(backing, image_disk);
    std::fs::remove_dir_all(&state).unwrap();

    // VIAL_SNAPSHOT=off: cold, and no note (nothing was tried).
    let (boot_status, _) = start_once(&mut sandbox, &[("VIAL_SNAPSHOT", "off")]);
    assert_eq!(boot_status, serde_json::json!({"from": "cold", "note": null}));
}

#[test]
fn sigterm_during_a_snapshot_load_removes_the_loading_qemu_and_exits_0() {
    let mut sandbox = Sandbox::new("termload");
    // A QEMU that, once `hold` exists, stops itself as it starts to load a snapshot: vial is
    // then inside the load, waiting for it.
    let hold = sandbox.dir.path().join("hold");
    let wrapper = sandbox.dir.path().join("qemu-that-holds");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \" $* \" in *\" -incoming \"*) [ -e {} ] && kill -STOP $$ ;; esac\nexec qemu-system-x86_64 \"$@\"\n",
            hold.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let qemu = ("VIAL_QEMU", wrapper.to_str().unwrap());
    capture_with(&sandbox, &[qemu]);

    std::fs::write(&hold, "").unwrap();
    let vial = sandbox.start(&[qemu], "");
    wait_until(Duration::from_secs(30), "the snapshot's qemu, held as it loads", || {
        sandbox.qemu_processes().into_iter().find(|&pid| proc_state(pid) == Some('T'))
    });
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "a stop during the load exits 0\n{}", sandbox.log());
    let (_, out) = sandbox.health(&["--status"]);
    assert!(out.contains("\"stopped\"") && out.contains("SIGTERM received before the VM started"), "{out}");
    wait_until(Duration::from_secs(10), "the held qemu to be gone", || {
        sandbox.qemu_processes().is_empty().then_some(())
    });
}
