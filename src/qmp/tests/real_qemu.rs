use super::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Kills QEMU (by its own pid, through `Child`) if a test ends before QEMU exited.
struct Qemu {
    child: Child,
    socket: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Polls `condition` until it holds; panics after `PATIENCE`.
async fn wait_until(what: &str, condition: impl FnMut() -> bool) {
    testkit::wait_until_async(PATIENCE, what, condition).await
}

async fn start_qemu(tag: &str, args: &[&str]) -> (Qemu, Qmp, Events) {
    let qemu = spawn_qemu(tag, args).await;
    let stream = connect_when_listening(&qemu.socket).await;
    let (qmp, events) =
        tokio::time::timeout(PATIENCE, connect(stream)).await.expect("qmp negotiation timed out").unwrap();
    (qemu, qmp, events)
}

/// `start_qemu`, connected with `connect_unix` so that descriptors can be passed.
async fn start_qemu_unix(tag: &str, args: &[&str]) -> (Qemu, Qmp, Events) {
    let qemu = spawn_qemu(tag, args).await;
    let stream = connect_when_listening(&qemu.socket).await;
    let (qmp, events) =
        tokio::time::timeout(PATIENCE, connect_unix(stream)).await.expect("qmp negotiation timed out").unwrap();
    (qemu, qmp, events)
}

/// Starts QEMU with a QMP socket and waits until the socket exists.
/// QEMU binds its socket before it listens on it: the file can exist while a connect
/// is still refused, so refusals are retried until PATIENCE runs out.
async fn connect_when_listening(path: &Path) -> tokio::net::UnixStream {
    let start = std::time::Instant::now();
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(stream) => return stream,
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused && start.elapsed() < PATIENCE => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(err) => panic!("cannot connect to {}: {err}", path.display()),
        }
    }
}

async fn spawn_qemu(tag: &str, args: &[&str]) -> Qemu {
    let socket = std::env::temp_dir().join(format!("vial-qmp-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-display", "none", "-accel", "tcg", "-qmp", &qmp_arg])
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86): {error}"));
    let mut qemu = Qemu { child, socket };
    let path = qemu.socket.clone();
    wait_until("the qmp socket", || {
        if let Ok(Some(status)) = qemu.child.try_wait() {
            panic!("qemu exited early: {status}");
        }
        Path::new(&path).exists()
    })
    .await;
    qemu
}

/// A firmware image file, removed when the test ends however it ends.
struct Firmware(PathBuf);

impl Drop for Firmware {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes a 64 KiB firmware image whose reset vector (the last 16 bytes) runs `code`:
/// the smallest guest that can make QEMU emit guest-initiated events.
fn firmware(tag: &str, code: &[u8]) -> Firmware {
    let mut image = vec![0xf4_u8; 64 * 1024]; // hlt everywhere else
    let start = image.len() - 16;
    image[start..start + code.len()].copy_from_slice(code);
    let path = std::env::temp_dir().join(format!("vial-qmp-{}-{tag}.bin", std::process::id()));
    std::fs::write(&path, image).unwrap();
    Firmware(path)
}

async fn wait_exit(qemu: &mut Qemu) -> std::process::ExitStatus {
    let mut status = None;
    wait_until("qemu to exit", || {
        status = qemu.child.try_wait().unwrap();
        status.is_some()
    })
    .await;
    status.unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn commands_events_and_quit() {
    let (mut qemu, qmp, mut events) = start_qemu("basic", &["-machine", "none"]).await;
    let mut state = qmp.query_status().await.unwrap();
    assert_eq!(state, RunState::Running);
    assert!(!qmp.query_kvm().await.unwrap(), "-accel tcg must not report kvm");

    qmp.execute(qapi::qmp::stop {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    assert_eq!(event, VmEvent::Stop);
    state = next_run_state(&state, &event);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    assert_eq!(event, VmEvent::Resume);
    state = next_run_state(&state, &event);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    // A reset of a VM that is not running leaves it in prelaunch until cont.
    qmp.execute(qapi::qmp::stop {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    state = next_run_state(&state, &event);
    qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    assert_eq!(event, VmEvent::Reset { guest: false });
    state = next_run_state(&state, &event);
    assert_eq!(state, RunState::Prelaunch);
    assert_eq!(qmp.query_status().await.unwrap(), state);
    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    state = next_run_state(&state, &event);
    assert_eq!(state, RunState::Running);
    // A reset of a running VM (a reboot) keeps it running.
    qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    assert_eq!(event, VmEvent::Reset { guest: false });
    state = next_run_state(&state, &event);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    qmp.system_powerdown().await.unwrap();
    assert_eq!(next_event(&mut events).await, Some(VmEvent::Powerdown));

    let error = qmp.execute_raw("vial-no-such-command", Value::Null).await.unwrap_err();
    assert!(matches!(&error, QmpError::Command { class, .. } if class == "CommandNotFound"), "{error:?}");
    let version = qmp.execute(qapi::qmp::query_version {}).await.unwrap();
    assert_eq!(version.qemu.major, 7, "these checks were written against QEMU 7.2");

    qmp.quit().await.unwrap();
    let shutdown = VmEvent::Shutdown { guest: false, reason: "host-qmp-quit".into() };
    assert_eq!(next_event(&mut events).await, Some(shutdown));
    assert_eq!(next_event(&mut events).await, None);
    assert!(matches!(qmp.query_status().await, Err(QmpError::Closed)));
    assert!(wait_exit(&mut qemu).await.success());
}

#[tokio::test(flavor = "current_thread")]
async fn guest_reset_turned_into_shutdown_then_stop() {
    // mov al, 0xfe; out 0x64, al (i8042 CPU reset); hlt; jmp back to hlt.
    let bios = firmware("reset", &[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]);
    let bios_arg = bios.0.to_str().unwrap();
    let args = ["-machine", "pc", "-m", "16", "-bios", bios_arg, "-S", "-action", "reboot=shutdown,shutdown=pause"];
    let (mut qemu, qmp, mut events) = start_qemu("reset", &args).await;
    let mut state = qmp.query_status().await.unwrap();
    assert_eq!(state, RunState::Prelaunch);
    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    let expected = [VmEvent::Resume, VmEvent::Shutdown { guest: true, reason: "guest-reset".into() }, VmEvent::Stop];
    for want in expected {
        let event = next_event(&mut events).await.unwrap();
        assert_eq!(event, want);
        state = next_run_state(&state, &event);
    }
    assert_eq!(state, RunState::Shutdown);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    // reboot=shutdown turns a host reset into a shutdown too; no STOP follows it, since
    // the VM is not running.
    qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
    let event = next_event(&mut events).await.unwrap();
    let host_reset = VmEvent::Shutdown { guest: false, reason: "host-qmp-system-reset".into() };
    assert_eq!(event, host_reset);
    state = next_run_state(&state, &event);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    qmp.quit().await.unwrap();
    assert!(wait_exit(&mut qemu).await.success());
}

#[tokio::test(flavor = "current_thread")]
async fn guest_panic_then_stop() {
    // mov al, 1; mov dx, 0x505; out dx, al (pvpanic "panicked"); hlt; jmp back to hlt.
    let code = [0xb0, 0x01, 0xba, 0x05, 0x05, 0xee, 0xf4, 0xeb, 0xfd];
    let bios = firmware("panic", &code);
    let bios_arg = bios.0.to_str().unwrap();
    let args = ["-machine", "pc", "-m", "16", "-bios", bios_arg, "-S", "-device", "pvpanic", "-action", "panic=pause"];
    let (mut qemu, qmp, mut events) = start_qemu("panic", &args).await;
    let mut state = qmp.query_status().await.unwrap();
    qmp.execute(qapi::qmp::cont {}).await.unwrap();
    for want in [VmEvent::Resume, VmEvent::GuestPanicked, VmEvent::Stop] {
        let event = next_event(&mut events).await.unwrap();
        assert_eq!(event, want);
        state = next_run_state(&state, &event);
    }
    assert_eq!(state, RunState::Panicked);
    assert_eq!(qmp.query_status().await.unwrap(), state);

    qmp.quit().await.unwrap();
    assert!(wait_exit(&mut qemu).await.success());
}

/// Runs `test` on a thread of its own in a new network namespace (testkit's), so that the
/// TAPs and QEMU it makes are gone with it.
fn in_new_network_namespace<F, T>(test: F)
where
    F: FnOnce() -> T + Send + 'static,
    T: std::future::Future<Output = ()>,
{
    testkit::netns::Netns::new(testkit::netns::Filesystem::Host).unwrap().block_on(|_| test());
}

/// Creates TAP `name` (IFF_TAP | IFF_NO_PI, as QEMU's own tap code asks) in the current
/// network namespace and returns its descriptor; the interface lives while one is open.
fn open_tap(name: &str) -> OwnedFd {
    use nix::libc::{IFF_NO_PI, IFF_TAP};
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap_or_else(|error| panic!("cannot open /dev/net/tun (these tests need it): {error}"));
    crate::sys::tun_set_iff(tun.as_fd(), name, (IFF_TAP | IFF_NO_PI) as i16)
        .unwrap_or_else(|error| panic!("TUNSETIFF {name} failed (needs CAP_NET_ADMIN): {error}"));
    OwnedFd::from(tun)
}

fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The ids of every PCI device QEMU reports, behind bridges and root ports too.
async fn pci_device_ids(qmp: &Qmp) -> Vec<String> {
    fn collect(devices: &Value, ids: &mut Vec<String>) {
        for device in devices.as_array().into_iter().flatten() {
            if let Some(id) = device["qdev_id"].as_str().filter(|id| !id.is_empty()) {
                ids.push(id.to_string());
            }
            collect(&device["pci_bridge"]["devices"], ids);
        }
    }
    let buses = qmp.execute_raw("query-pci", Value::Null).await.unwrap();
    let mut ids = Vec::new();
    for bus in buses.as_array().unwrap() {
        collect(&bus["devices"], &mut ids);
    }
    ids
}

/// The ids of the devices created with an id (`-device`, `device_add`), from QOM's
/// `/machine/peripheral`. Unlike `query-pci`, it sees devices behind a root port whose
/// secondary bus no firmware has numbered yet (`-S`).
async fn peripheral_ids(qmp: &Qmp) -> Vec<String> {
    let children = qmp.execute_raw("qom-list", json!({"path": "/machine/peripheral"})).await.unwrap();
    children
        .as_array()
        .unwrap()
        .iter()
        .filter(|child| child["type"].as_str().is_some_and(|kind| kind.starts_with("child<")))
        .filter_map(|child| child["name"].as_str().map(str::to_string))
        .collect()
}

/// The netdevs QEMU has, from `info network` (QEMU 7.2 has no `query-netdev`); each is a
/// line `<id>: index=...,type=tap,...`, indented under the NIC it is peered with.
async fn netdev_ids(qmp: &Qmp) -> Vec<String> {
    let arguments = json!({"command-line": "info network"});
    let text = qmp.execute_raw("human-monitor-command", arguments).await.unwrap();
    text.as_str()
        .unwrap()
        .lines()
        .filter(|line| line.contains("type=tap"))
        .filter_map(|line| line.trim_start_matches([' ', '\\']).split(':').next())
        .map(str::to_string)
        .collect()
}

fn tap_nic(id: &str, device_id: &str, tap: &str, bus: Option<&str>) -> HotplugNic {
    let mut nic = test_nic(id, device_id, open_tap(tap), None);
    if let Some(bus) = bus {
        nic.device.props.push(("bus", bus.into()));
    }
    nic
}

/// Unplugs `nic3`/`data3` from a VM started with `-S`, whose guest never runs: QEMU asks
/// the guest to eject the device (ACPI) and keeps it until the guest does, so the first
/// `unplug_nic` times out and leaves everything in place. A system reset completes the
/// pending unplug (QEMU's tests/qtest/device-plug-test.c relies on that), and a second
/// `unplug_nic`, which waits for the unplug already pending, then deletes the netdev.
async fn unplug_through_a_reset(qmp: &Qmp, events: &mut Events, tap: &str) {
    let error = qmp.unplug_nic("nic3", "data3", Duration::from_millis(500)).await.unwrap_err();
    assert!(
        matches!(&error, QmpError::UnplugNic { source, .. } if matches!(**source, QmpError::DeviceDeletedTimeout { .. })),
        "{error:?}"
    );
    assert!(peripheral_ids(qmp).await.contains(&"nic3".to_string()));
    assert_eq!(netdev_ids(qmp).await, ["data3"]);
    assert!(interface_exists(tap));

    let reset = async {
        // unplug_nic registers its waiter and queues device_del in one step, and the
        // writer keeps order, so QEMU sees the reset after that device_del.
        let start = std::time::Instant::now();
        while !watching(qmp, "nic3") {
            assert!(start.elapsed() < PATIENCE, "unplug_nic never started waiting");
            tokio::task::yield_now().await;
        }
        qmp.execute(qapi::qmp::system_reset {}).await.unwrap();
    };
    let (result, ()) = tokio::join!(qmp.unplug_nic("nic3", "data3", PATIENCE), reset);
    result.unwrap();

    // The supervisor's receiver saw the reset and both deletions, the backend's first.
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next_event(events).await.expect("the connection closed") {
            VmEvent::DeviceDeleted { device, path } => deleted.push((device, path)),
            VmEvent::Reset { guest: false } => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
    let backend = (None, "/machine/peripheral/nic3/virtio-backend".to_string());
    let device = (Some("nic3".to_string()), "/machine/peripheral/nic3".to_string());
    assert_eq!(deleted, [backend, device]);

    assert!(!peripheral_ids(qmp).await.contains(&"nic3".to_string()));
    assert!(!pci_device_ids(qmp).await.contains(&"nic3".to_string()));
    assert!(netdev_ids(qmp).await.is_empty());
    // netdev_del closed QEMU's descriptor, the last one, so the TAP went away.
    wait_until("the tap to go", || !interface_exists(tap)).await;
    // Unplugging again finds nothing to do.
    qmp.unplug_nic("nic3", "data3", PATIENCE).await.unwrap();
}

#[test]
fn hotplug_and_unplug_a_tap_nic_on_pc() {
    in_new_network_namespace(|| async {
        let (mut qemu, qmp, mut events) = start_qemu_unix("hotplug-pc", &["-machine", "pc", "-m", "16", "-S"]).await;
        let tap = format!("vqt{}", std::process::id());

        // A device model QEMU does not have: the netdev is deleted again, which closes
        // the tap QEMU had taken.
        let mut bad = tap_nic("data3", "nic3", &tap, None);
        bad.device.driver = "vial-no-such-nic".into();
        let error = qmp.hotplug_nic(&bad).await.unwrap_err();
        assert!(
            matches!(&error, QmpError::HotplugNic { source, .. } if matches!(&**source, QmpError::Command { command, .. } if command == "device_add")),
            "{error:?}"
        );
        drop(bad);
        assert!(netdev_ids(&qmp).await.is_empty());
        wait_until("the tap of the failed hot-plug to go", || !interface_exists(&tap)).await;

        let nic = tap_nic("data3", "nic3", &tap, None);
        qmp.hotplug_nic(&nic).await.unwrap();
        // QEMU holds its own descriptor: the TAP outlives vial's.
        drop(nic);
        assert!(interface_exists(&tap));
        assert!(pci_device_ids(&qmp).await.contains(&"nic3".to_string()));
        assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
        assert_eq!(netdev_ids(&qmp).await, ["data3"]);

        unplug_through_a_reset(&qmp, &mut events, &tap).await;
        qmp.quit().await.unwrap();
        assert!(wait_exit(&mut qemu).await.success());
    });
}

#[test]
fn q35_hotplugs_only_behind_a_root_port() {
    in_new_network_namespace(|| async {
        let args = ["-machine", "q35", "-S", "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"];
        let (mut qemu, qmp, mut events) = start_qemu_unix("hotplug-q35", &args).await;
        let tap = format!("vqt{}", std::process::id());

        // q35's root complex takes no hot-plugged device.
        let nic = tap_nic("data3", "nic3", &tap, None);
        let error = qmp.hotplug_nic(&nic).await.unwrap_err();
        match &error {
            QmpError::HotplugNic { source, .. } => match &**source {
                QmpError::Command { command, desc, .. } if command == "device_add" => {
                    assert!(desc.contains("does not support hotplugging"), "{desc}")
                }
                other => panic!("expected device_add to fail, got {other:?}"),
            },
            other => panic!("expected a hot-plug error, got {other:?}"),
        }
        drop(nic);
        assert!(netdev_ids(&qmp).await.is_empty());

        // A pcie-root-port created at launch does.
        let nic = tap_nic("data3", "nic3", &tap, Some("rp1"));
        qmp.hotplug_nic(&nic).await.unwrap();
        drop(nic);
        assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
        assert_eq!(netdev_ids(&qmp).await, ["data3"]);

        unplug_through_a_reset(&qmp, &mut events, &tap).await;
        qmp.quit().await.unwrap();
        assert!(wait_exit(&mut qemu).await.success());
    });
}

#[test]
fn q35_native_pcie_hotplug_unplugs_an_unpowered_slot_at_once() {
    in_new_network_namespace(|| async {
        // With ACPI hot-plug off, the root port uses PCIe native hot-plug; no guest has
        // powered its slot, so QEMU removes the device at once on device_del
        // (pcie_cap_slot_unplug_request_cb) instead of asking the guest.
        let args = [
            "-machine",
            "q35",
            "-S",
            "-global",
            "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
            "-device",
            "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
        ];
        let (mut qemu, qmp, mut events) = start_qemu_unix("hotplug-q35-native", &args).await;
        let tap = format!("vqt{}", std::process::id());
        let nic = tap_nic("data3", "nic3", &tap, Some("rp1"));
        qmp.hotplug_nic(&nic).await.unwrap();
        drop(nic);
        assert!(peripheral_ids(&qmp).await.contains(&"nic3".to_string()));

        qmp.unplug_nic("nic3", "data3", PATIENCE).await.unwrap();
        let device = VmEvent::DeviceDeleted { device: Some("nic3".into()), path: "/machine/peripheral/nic3".into() };
        let backend = VmEvent::DeviceDeleted { device: None, path: "/machine/peripheral/nic3/virtio-backend".into() };
        assert_eq!(next_event(&mut events).await, Some(backend));
        assert_eq!(next_event(&mut events).await, Some(device));
        assert!(!peripheral_ids(&qmp).await.contains(&"nic3".to_string()));
        assert!(netdev_ids(&qmp).await.is_empty());
        wait_until("the tap to go", || !interface_exists(&tap)).await;

        qmp.quit().await.unwrap();
        assert!(wait_exit(&mut qemu).await.success());
    });
}
