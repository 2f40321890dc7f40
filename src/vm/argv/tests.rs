use super::*;
use crate::config::{Config, Overrides, ProfileFile};
use std::path::Path;

fn profile(name: &str) -> Profile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-profiles").join(format!("{name}.toml"));
    let file = ProfileFile::load(&path).unwrap();
    // Pinned argv must not depend on where the checkout is: pretend the bundle is /etc/vial.
    Config::from_file(file, "/etc/vial/profile.toml".into(), &Overrides::default(), "h").unwrap().profile
}

fn launch(accel: Accel, disks: usize, data_nics: Vec<DataNic>) -> Launch {
    Launch {
        accel,
        run_dir: "/run/vial".into(),
        disks: (0..disks).map(|i| PathBuf::from(format!("/var/lib/vial/disk{i}.qcow2"))).collect(),
        share: Some("/antidote".into()),
        control_fd: 3,
        listener_fds: None,
        name: "r1".into(),
        data_nics,
        extra_args: Vec::new(),
        restore: false,
        console_log_fd: None,
        sandbox: false,
    }
}

fn joined(profile: &Profile, launch: &Launch) -> String {
    qemu_argv(profile, launch).iter().map(|a| a.to_string_lossy().to_string()).collect::<Vec<_>>().join(" ")
}

const MONITORS: &str =
    "-chardev socket,id=console,path=/run/vial/console.sock,server=on,wait=off,logfile=/run/vial/console.log \
-serial chardev:console \
-chardev socket,id=control,fd=3,server=on,wait=off -mon chardev=control,mode=control \
-chardev socket,id=qmp,path=/run/vial/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control";

#[test]
fn linux_profile_argv_under_tcg() {
    let expected = format!(
        "qemu-system-x86_64 -name r1,process=qemu-r1 -machine pc -accel tcg -cpu max -m 256 -smp 1 \
-nodefaults -no-user-config -display none \
-kernel /etc/vial/guest/vmlinux -initrd /etc/vial/guest/initrd.img -append console=ttyS0 quiet panic=-1 \
-netdev user,id=mgmt,restrict=on,hostname=r1,hostfwd=tcp:127.0.0.1:80-:80 \
-device virtio-net-pci,netdev=mgmt,mac={mac0} \
-fsdev local,id=lesson,path=/antidote,security_model=none,readonly=on \
-device virtio-9p-pci,id=share,fsdev=lesson,mount_tag=antidote,bus=pci.0,addr=0x7 \
-fw_cfg name=opt/vial/name,string=r1 {MONITORS}",
        mac0 = format_mac(nic_mac("r1", 0)),
    );
    assert_eq!(joined(&profile("linux"), &launch(Accel::Tcg, 0, vec![])), expected);
}

#[test]
fn cumulus_profile_argv_under_kvm_with_two_data_links() {
    let nics = (1..=2)
        .map(|index| DataNic {
            index,
            backend: NicBackend::Tap { ifname: format!("tap{index}") },
            mtu: 9000,
            vhost: false,
        })
        .collect();
    let expected = format!(
        "qemu-system-x86_64 -name r1,process=qemu-r1 -machine pc -accel kvm -cpu host -m 2048 -smp 2 \
-nodefaults -no-user-config -display none \
-drive file=/var/lib/vial/disk0.qcow2,format=qcow2,if=ide,index=0,cache=writeback \
-netdev user,id=mgmt,net=10.0.0.0/24,restrict=on,hostname=r1,hostfwd=tcp:127.0.0.1:22-:22,hostfwd=udp:127.0.0.1:161-:161,hostfwd=tcp:127.0.0.1:830-:830,hostfwd=tcp:127.0.0.1:8080-:8080 \
-device virtio-net-pci,netdev=mgmt,mac={mac0} \
-netdev tap,id=data1,ifname=tap1,script=no,downscript=no -device virtio-net-pci,netdev=data1,id=nic1,mac={mac1},host_mtu=9000,bus=pci.0,addr=0x8 \
-netdev tap,id=data2,ifname=tap2,script=no,downscript=no -device virtio-net-pci,netdev=data2,id=nic2,mac={mac2},host_mtu=9000,bus=pci.0,addr=0x9 \
-fsdev local,id=lesson,path=/antidote,security_model=none,readonly=on \
-device virtio-9p-pci,id=share,fsdev=lesson,mount_tag=antidote,bus=pci.0,addr=0x7 \
-fw_cfg name=opt/vial/name,string=r1 {MONITORS}",
        mac0 = format_mac(nic_mac("r1", 0)),
        mac1 = format_mac(nic_mac("r1", 1)),
        mac2 = format_mac(nic_mac("r1", 2)),
    );
    assert_eq!(joined(&profile("cumulus"), &launch(Accel::Kvm, 1, nics)), expected);
}

#[test]
fn vqfx_profile_argv_has_reserved_nics_and_e1000_without_host_mtu() {
    let nics = vec![DataNic { index: 1, backend: NicBackend::TapFd { fd: 7 }, mtu: 9000, vhost: true }];
    let expected = format!(
        "qemu-system-x86_64 -name r1,process=qemu-r1 -machine pc -accel tcg -cpu max -m 2048 -smp 1 \
-nodefaults -no-user-config -display none \
-drive file=/var/lib/vial/disk0.qcow2,format=qcow2,if=ide,index=0,cache=writeback \
-netdev user,id=mgmt,net=10.0.0.0/24,restrict=on,hostname=r1,hostfwd=tcp:127.0.0.1:22-:22,hostfwd=udp:127.0.0.1:161-:161,hostfwd=tcp:127.0.0.1:830-:830,hostfwd=tcp:127.0.0.1:8080-:8080 \
-device e1000,netdev=mgmt,mac={mac0} -device e1000,mac={r0} -device e1000,mac={r1} \
-netdev tap,id=data1,fd=7,vhost=on -device e1000,netdev=data1,id=nic1,mac={mac1},bus=pci.0,addr=0x8 \
-fsdev local,id=lesson,path=/antidote,security_model=none,readonly=on \
-device virtio-9p-pci,id=share,fsdev=lesson,mount_tag=antidote,bus=pci.0,addr=0x7 \
-fw_cfg name=opt/vial/name,string=r1 {MONITORS}",
        mac0 = format_mac(nic_mac("r1", 0)),
        r0 = format_mac(nic_mac("r1", 200)),
        r1 = format_mac(nic_mac("r1", 201)),
        mac1 = format_mac(nic_mac("r1", 1)),
    );
    assert_eq!(joined(&profile("vqfx"), &launch(Accel::Tcg, 1, nics)), expected);
}

#[test]
fn egress_switch_lifts_restrict_and_missing_share_is_omitted() {
    let mut p = profile("linux");
    p.egress = true;
    let mut l = launch(Accel::Tcg, 0, vec![]);
    l.share = None;
    let argv = joined(&p, &l);
    assert!(argv.contains("restrict=off"), "{argv}");
    assert!(!argv.contains("virtio-9p"), "{argv}");
}

#[test]
fn commas_in_paths_are_escaped() {
    let mut l = launch(Accel::Tcg, 0, vec![]);
    l.share = Some("/lessons/a,b".into());
    assert!(joined(&profile("linux"), &l).contains("path=/lessons/a,,b,"));
}

#[test]
fn macs_are_locally_administered_unicast_stable_and_distinct() {
    let a = nic_mac("cvx1", 1);
    assert_eq!(a, nic_mac("cvx1", 1));
    assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    assert_eq!(a[0] & 0x01, 0, "unicast");
    assert_ne!(a, nic_mac("cvx2", 1));
    assert_ne!(a, nic_mac("cvx1", 2));
    // Endpoint names from real lessons do not collide.
    let names = ["vqfx1", "vqfx2", "vqfx3", "cvx1", "linux1", "r1", "r2", "r3", "frr-1", "frr-2", "frr-3"];
    let mut macs: Vec<[u8; 6]> = names.iter().map(|n| nic_mac(n, 0)).collect();
    macs.sort();
    macs.dedup();
    assert_eq!(macs.len(), names.len());
}

#[test]
fn a_restore_starts_paused_for_a_snapshot_without_the_9p_device_but_with_its_fsdev() {
    let profile = profile("linux");
    let argv = joined(&profile, &Launch { restore: true, ..launch(Accel::Tcg, 0, Vec::new()) });
    assert!(argv.contains("-fsdev local,id=lesson,path=/antidote"), "{argv}");
    assert!(!argv.contains("virtio-9p-pci"), "{argv}");
    assert!(argv.contains(" -S -incoming defer"), "{argv}");
    // What the hot-plug adds is what a cold boot has on its command line.
    let device = share_device(&profile, "antidote").to_arg();
    assert_eq!(device, "virtio-9p-pci,id=share,fsdev=lesson,mount_tag=antidote,bus=pci.0,addr=0x7");
    let cold = joined(&profile, &launch(Accel::Tcg, 0, Vec::new()));
    assert!(cold.contains(&format!("-device {device} ")), "{cold}");
}

#[test]
fn the_9p_device_leaves_its_slot_to_qemu_when_the_devices_before_it_need_slot_7() {
    let mut profile = profile("linux");
    profile.reserved_nics = 5;
    assert_eq!(share_device(&profile, "antidote").prop("addr"), None);
    profile.reserved_nics = 4;
    assert_eq!(share_device(&profile, "antidote").prop("addr"), Some(&"0x7".into()));
}

#[test]
fn qemu_gets_its_sandbox_and_the_console_logs_pipe_when_given() {
    let profile = profile("linux");
    let argv =
        joined(&profile, &Launch { console_log_fd: Some(7), sandbox: true, ..launch(Accel::Tcg, 0, Vec::new()) });
    assert!(argv.contains(&format!("-sandbox {SANDBOX} ")), "{argv}");
    assert!(
        argv.contains(
            "-chardev socket,id=console,path=/run/vial/console.sock,server=on,wait=off,logfile=/proc/self/fd/7 "
        ),
        "{argv}"
    );
    // Extra arguments that choose a sandbox of their own win.
    let mut own = launch(Accel::Tcg, 0, Vec::new());
    own.sandbox = true;
    own.extra_args = vec!["-sandbox".into(), "off".into()];
    let argv = joined(&profile, &own);
    assert_eq!(argv.matches("-sandbox").count(), 1, "{argv}");
    assert!(argv.ends_with("-sandbox off"), "{argv}");
}

#[test]
fn the_multifunction_layout_puts_management_at_3_0_and_data_nic_n_at_3_n() {
    let overrides = Overrides::from_env([("VIAL_NIC_LAYOUT".to_string(), "multifunction".to_string())]).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-profiles/linux.toml");
    let file = ProfileFile::load(&path).unwrap();
    let profile = Config::from_file(file, "/etc/vial/profile.toml".into(), &overrides, "h").unwrap().profile;
    let nics = (1..=2)
        .map(|index| DataNic { index, backend: NicBackend::TapFd { fd: 10 + index as i32 }, mtu: 1500, vhost: false })
        .collect();
    let argv = joined(&profile, &launch(Accel::Tcg, 0, nics));
    let mac = |n| format_mac(nic_mac("r1", n));
    for device in [
        format!("-device virtio-net-pci,netdev=mgmt,mac={},bus=pci.0,addr=0x3.0,multifunction=on ", mac(0)),
        format!("-device virtio-net-pci,netdev=data1,id=nic1,mac={},bus=pci.0,addr=0x3.1 ", mac(1)),
        format!("-device virtio-net-pci,netdev=data2,id=nic2,mac={},bus=pci.0,addr=0x3.2 ", mac(2)),
        // The share keeps its slot: a snapshot start hot-plugs it, which makes the guest
        // rescan the bus and find the data functions (see vm::snapshot::restore).
        "-device virtio-9p-pci,id=share,fsdev=lesson,mount_tag=antidote,bus=pci.0,addr=0x7 ".to_string(),
    ] {
        assert!(argv.contains(&device), "no `{device}` in\n{argv}");
    }
}
