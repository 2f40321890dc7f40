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
    let output = Command::new("ip")
        .args(["netns", "exec", &sandbox.netns])
        .arg(vial_bin())
        .arg("snapshot")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(sandbox.env())
        .env("VIAL_RUN_DIR", sandbox.dir.path().join("capture-run"))
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
    let needle = sandbox.run_dir.display().to_string();
    wait_until(Duration::from_secs(10), "qemu to be gone", || processes_mentioning(&needle).is_empty().then_some(()));
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
fn a_snapshot_that_does_not_fit_or_does_not_load_gives_a_cold_boot_that_says_why() {
    let mut sandbox = Sandbox::new("snapx");
    let dir = capture(&sandbox);
    std::fs::write(sandbox.lesson.join("hello.txt"), "cold").unwrap();
    let state = sandbox.dir.path().join("state");

    // Other memory than the snapshot's: the machine differs, named in the note.
    let vial = sandbox.start(&[("VIAL_MEMORY", "320M")], "");
    sandbox.wait_ready();
    let boot_status = boot(&sandbox);
    assert_eq!(boot_status["from"], "cold", "{boot_status}");
    let note = boot_status["note"].as_str().unwrap_or_default().to_string();
    assert!(note.contains("`320`") && note.contains("`256`"), "{note}");
    assert_eq!(wait_until(Duration::from_secs(30), "the lesson", || http_get(sandbox.addr, 80, "/hello.txt")), "cold");
    stop_cleanly(&mut sandbox, vial);
    let _ = std::fs::remove_dir_all(&state);

    // A damaged state file: QEMU fails to load it and exits; vial boots cold instead.
    let vmstate = dir.join("vmstate");
    let len = std::fs::metadata(&vmstate).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&vmstate).unwrap().set_len(len / 2).unwrap();
    let vial = sandbox.start(&[], "");
    sandbox.wait_ready();
    let boot_status = boot(&sandbox);
    assert_eq!(boot_status["from"], "cold", "{boot_status}");
    assert!(boot_status["note"].as_str().unwrap_or_default().contains("loading the snapshot"), "{boot_status}");
    assert_eq!(wait_until(Duration::from_secs(30), "the lesson", || http_get(sandbox.addr, 80, "/hello.txt")), "cold");
    stop_cleanly(&mut sandbox, vial);
    let _ = std::fs::remove_dir_all(&state);

    // VIAL_SNAPSHOT=off: cold, and no note (nothing was tried).
    let vial = sandbox.start(&[("VIAL_SNAPSHOT", "off")], "");
    sandbox.wait_ready();
    let boot_status = boot(&sandbox);
    assert_eq!(boot_status, serde_json::json!({"from": "cold", "note": null}));
    stop_cleanly(&mut sandbox, vial);
}
