//! `vial` as PID 1 of a sandbox with the real `linux` guest under TCG: boot, 9p, DHCP,
//! forwards, readiness, clean stop, forced stop, QEMU crash, reaping.

use crate::support::*;
use nix::sys::signal::Signal;
use std::time::Duration;

const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn assert_no_qemu_left(sandbox: &Sandbox) {
    let left = wait_until(Duration::from_secs(10), "qemu to be gone", || {
        let left = sandbox.qemu_processes();
        left.is_empty().then_some(left)
    });
    assert!(left.is_empty());
}

#[test]
fn boots_serves_the_lesson_over_9p_and_stops_cleanly_on_sigterm() {
    let mut sandbox = Sandbox::new("boot");
    let token = format!("lesson file {}", sandbox.netns);
    std::fs::write(sandbox.lesson.join("hello.txt"), &token).unwrap();
    let vial = sandbox.start(&[], "");

    // While the guest boots, the supervisor answers and says it is not ready.
    let booting = wait_until(Duration::from_secs(30), "the health socket", || sandbox.status());
    assert_ne!(booting["state"], "ready", "{booting}");
    let (code, _) = sandbox.health(&[]);
    assert_ne!(code, 0, "vial health must fail while booting");
    assert_eq!(sandbox.health(&["--live"]).0, 0);

    sandbox.wait_ready();
    let status = sandbox.status().expect("status");
    assert_eq!(status["state"], "ready", "{status}");
    // Nobody set VIAL_ACCEL: on this machine KVM opens but runs no guest, and vial saw that.
    assert_eq!(status["accel"], "tcg", "{status}");
    if std::path::Path::new("/dev/kvm").exists() {
        assert!(status["accel_note"].as_str().unwrap_or("").contains("KVM"), "{status}");
    }
    assert!(status["qemu_pid"].is_u64(), "{status}");
    assert_eq!(status["vm"], "running");
    assert_eq!(status["forwards"][0]["address"], sandbox.addr.to_string());
    assert_eq!(status["forwards"][0]["container_port"], 80);

    // Least privilege: QEMU's public sockets are owner-only, health is open to all, and QEMU
    // runs under its seccomp filter (Debian's QEMU 7.2 has one; mode 2 is "filter").
    let mode = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(sandbox.run_dir.join(name)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!((mode("qmp.sock"), mode("console.sock"), mode("health.sock")), (0o600, 0o600, 0o666));
    let confined = sandbox
        .qemu_processes()
        .into_iter()
        .any(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| s.contains("Seccomp:\t2")));
    assert!(confined, "qemu runs without its seccomp filter\n{}", sandbox.log());

    // One GET proves 9p (the file), DHCP (the guest's address), the forward and readiness.
    let body =
        wait_until(Duration::from_secs(30), "the lesson file over HTTP", || http_get(sandbox.addr, 80, "/hello.txt"));
    assert_eq!(body, token);

    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "clean power-off exits 0\n{}", sandbox.log());
    assert!(sandbox.log().contains("guest shut down"), "{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
    let (code, out) = sandbox.health(&["--status"]);
    assert_ne!(code, 0);
    assert!(out.contains("\"stopped\""), "{out}");
}

/// The ids of `pid` as `/proc/PID/status` gives them: (real, effective, saved, filesystem).
fn uids(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// QEMU runs as the user `VIAL_QEMU_USER` names (here `nobody`: this machine's images add
/// `vial-qemu`, the host has none) and still gets everything it needs: the kernel, the lesson
/// over 9p, its forward on port 80 (a privileged port, which vial makes bindable in the
/// endpoint's namespace), the public sockets vial bound for it (root's, 0600).
#[test]
fn qemu_runs_as_an_unprivileged_user_and_still_serves_the_lesson() {
    let mut sandbox = Sandbox::new("user");
    let token = format!("served by an unprivileged qemu {}", sandbox.netns);
    std::fs::write(sandbox.lesson.join("hello.txt"), &token).unwrap();
    let vial = sandbox.start(&[("VIAL_QEMU_USER", "nobody")], "");
    sandbox.wait_ready();
    let status = sandbox.status().unwrap();
    assert_eq!(
        (&status["qemu_user"], &status["qemu_user_note"]),
        (&"nobody".into(), &serde_json::Value::Null),
        "{status}"
    );
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid.to_string();
    let qemu = sandbox.qemu_processes();
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    assert_eq!(uids(qemu[0]), [nobody.as_str(); 4].join(" "), "qemu's real, effective, saved and fs uid");
    let body =
        wait_until(Duration::from_secs(30), "the lesson file over HTTP", || http_get(sandbox.addr, 80, "/hello.txt"));
    assert_eq!(body, token);
    for name in ["qmp.sock", "console.sock"] {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let meta = std::fs::metadata(sandbox.run_dir.join(name)).unwrap();
        assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600), "{name}");
    }
    assert!(qmp_command(&sandbox, "query-status").contains("running"), "the public monitor works");
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(0), "{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}

/// A user QEMU cannot run as is a configuration error naming the setting and the fix.
#[test]
fn a_qemu_user_that_does_not_exist_is_a_configuration_error() {
    let mut sandbox = Sandbox::new("nouser");
    sandbox.start(&[("VIAL_QEMU_USER", "no-such-user")], "");
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(78), "{}", sandbox.log());
    let log = sandbox.log();
    assert!(
        log.contains("VIAL_QEMU_USER") && log.contains("\"no-such-user\"") && log.contains("useradd --system"),
        "{log}"
    );
    assert!(sandbox.qemu_processes().is_empty());
}

#[test]
fn a_guest_that_ignores_the_power_button_is_quit_after_the_stop_timeout() {
    let mut sandbox = Sandbox::new("deaf");
    std::fs::write(sandbox.lesson.join("ignore-power-button"), "").unwrap();
    let vial = sandbox.start(&[("VIAL_STOP_TIMEOUT", "2s")], "");
    sandbox.wait_ready();
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(2), "quit after the stop timeout exits 2\n{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}

#[test]
fn sigint_stops_like_sigterm_and_a_second_signal_forces() {
    let mut sandbox = Sandbox::new("sigint");
    std::fs::write(sandbox.lesson.join("ignore-power-button"), "").unwrap();
    let vial = sandbox.start(&[("VIAL_STOP_TIMEOUT", "10m")], "");
    sandbox.wait_ready();
    signal(vial, Signal::SIGINT);
    wait_until(Duration::from_secs(10), "state stopping", || sandbox.status().filter(|s| s["state"] == "stopping"));
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(128 + 15), "a second signal forces the stop\n{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}

#[test]
fn qemu_killed_is_reported_failed_with_a_reason() {
    let mut sandbox = Sandbox::new("crash");
    let vial = sandbox.start(&[], "");
    wait_until(Duration::from_secs(30), "state booting", || sandbox.status().filter(|s| s["qemu_pid"].is_u64()));
    let qemu = wait_until(Duration::from_secs(10), "qemu as vial's child", || children(vial).first().copied());
    signal(qemu, Signal::SIGKILL);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(4), "qemu crash exits 4\n{}", sandbox.log());
    let (code, out) = sandbox.health(&["--status"]);
    assert_ne!(code, 0);
    assert!(out.contains("\"failed\"") && out.contains("SIGKILL"), "{out}");
    assert_no_qemu_left(&sandbox);
}

#[test]
fn a_hundred_orphaned_grandchildren_are_all_reaped() {
    let mut sandbox = Sandbox::new("orphans");
    // A QEMU wrapper that leaves 100 orphans behind (each subshell exits at once, so its
    // child is re-parented to vial), then becomes QEMU.
    let wrapper = sandbox.dir.path().join("qemu-with-orphans");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\ni=0\nwhile [ $i -lt 100 ]; do ( sleep 0.2 & ) ; i=$((i+1)); done\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&wrapper).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let vial = sandbox.start(&[("VIAL_QEMU", wrapper.to_str().unwrap())], "");
    sandbox.wait_ready();
    // Every orphan has exited by now or will soon; none may stay a zombie.
    wait_until(Duration::from_secs(30), "only qemu left as vial's child", || {
        let kids = children(vial);
        (kids.len() == 1 && proc_state(kids[0]) != Some('Z')).then_some(())
    });
    assert!(sandbox.log().contains("reaped"), "{}", sandbox.log());
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(0), "{}", sandbox.log());
}

#[test]
fn missing_dev_net_tun_is_a_one_line_error_with_its_exit_code() {
    let mut sandbox = Sandbox::new("notun");
    sandbox.start(&[], "mount -t tmpfs none /dev/net");
    let exit = sandbox.wait(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(72), "{}", sandbox.log());
    let log = sandbox.log();
    let line = log.lines().find(|l| l.contains("/dev/net/tun")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("--device /dev/net/tun"), "{line}");
}

#[test]
fn sigterm_early_in_boot_still_powers_the_guest_off_cleanly() {
    // A power-button press before the guest's ACPI handler runs is lost; vial presses again.
    let mut sandbox = Sandbox::new("early");
    let vial = sandbox.start(&[("VIAL_STOP_TIMEOUT", "120s")], "");
    wait_until(Duration::from_secs(30), "qmp negotiated", || sandbox.status().filter(|s| s["vm"] == "running"));
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(Duration::from_secs(180));
    assert_eq!(exit.code(), Some(0), "{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}

#[test]
fn a_vm_paused_after_ready_turns_health_unready_with_the_reason_and_ready_again_when_resumed() {
    let mut sandbox = Sandbox::new("pause");
    let vial = sandbox.start(&[], "");
    sandbox.wait_ready();

    assert!(qmp_command(&sandbox, "stop").contains("\"return\""));
    let status = wait_until(Duration::from_secs(30), "health to say unready", || {
        sandbox.status().filter(|s| s["state"] == "unready")
    });
    assert!(status["reason"].as_str().unwrap_or("").contains("the VM is paused"), "{status}");
    assert_ne!(sandbox.health(&[]).0, 0, "vial health must fail while the VM is paused");

    assert!(qmp_command(&sandbox, "cont").contains("\"return\""));
    wait_until(Duration::from_secs(60), "health to say ready again", || {
        sandbox.status().filter(|s| s["state"] == "ready")
    });
    assert_eq!(sandbox.health(&[]).0, 0);

    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(0), "{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}

#[test]
fn sigterm_during_the_link_wait_ends_at_once_with_0_and_says_so_in_the_last_status() {
    let mut sandbox = Sandbox::new("termwait");
    let vial = sandbox.start(&[("VIAL_DATA_IFACES", "1"), ("VIAL_LINK_TIMEOUT", "10m")], "");
    wait_until(Duration::from_secs(30), "the wait for data links", || {
        sandbox.status().filter(|s| s["state"] == "waiting-for-interfaces")
    });
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "a stop before the VM started exits 0\n{}", sandbox.log());
    let (code, out) = sandbox.health(&["--status"]);
    assert_ne!(code, 0);
    assert!(out.contains("\"stopped\"") && out.contains("SIGTERM received before the VM started"), "{out}");
    assert_no_qemu_left(&sandbox);
}

#[test]
fn a_wedged_qemu_is_killed_and_vial_exits_3() {
    let mut sandbox = Sandbox::new("wedged");
    let vial = sandbox.start(&[("VIAL_STOP_TIMEOUT", "2s")], "");
    sandbox.wait_ready();
    let qemu = wait_until(Duration::from_secs(10), "qemu as vial's child", || children(vial).first().copied());
    // QEMU answers nothing now, not the power button, not `quit`: every QMP command of the
    // stop is bounded, and SIGKILL ends it.
    signal(qemu, Signal::SIGSTOP);
    signal(vial, Signal::SIGTERM);
    let exit = sandbox.wait(STOP_TIMEOUT);
    assert_eq!(exit.code(), Some(3), "a wedged qemu is killed: exit 3\n{}", sandbox.log());
    let (_, out) = sandbox.health(&["--status"]);
    assert!(out.contains("\"state\""), "no last status: {out}");
    assert_no_qemu_left(&sandbox);
}

#[test]
fn a_guest_that_stops_answering_after_ready_turns_health_unready_and_ready_when_it_answers() {
    let mut sandbox = Sandbox::new("hung");
    let vial = sandbox.start(&[], "");
    sandbox.wait_ready();
    let qemu = wait_until(Duration::from_secs(10), "qemu as vial's child", || children(vial).first().copied());
    // A hung guest, as far as anyone outside can tell: QEMU answers nothing, and no QMP event
    // says so.
    signal(qemu, Signal::SIGSTOP);
    let status = wait_until(Duration::from_secs(120), "health to say unready", || {
        sandbox.status().filter(|s| s["state"] == "unready")
    });
    assert!(status["reason"].as_str().unwrap_or("").contains("has not answered its readiness probe"), "{status}");
    signal(qemu, Signal::SIGCONT);
    wait_until(Duration::from_secs(60), "health to say ready again", || {
        sandbox.status().filter(|s| s["state"] == "ready")
    });
    signal(vial, Signal::SIGTERM);
    assert_eq!(sandbox.wait(STOP_TIMEOUT).code(), Some(0), "{}", sandbox.log());
    assert_no_qemu_left(&sandbox);
}
