use super::*;
use crate::config::ProfileFile;
use std::os::unix::fs::PermissionsExt;

/// A profile booting `kernel`, forwarding `port`, with QEMU run as `user`.
fn profile(kernel: &Path, port: u16, user: &str) -> Profile {
    let text = format!(
        "name = \"t\"\n[machine]\nmemory = \"128M\"\nuser = \"{user}\"\n[boot]\nkernel = \"{}\"\n\
         [[forwards]]\nprotocol = \"tcp\"\ncontainer_port = {port}\nguest_port = 22\n\
         [readiness]\nprobe = \"serial\"\npattern = \"login:\"\n",
        kernel.display()
    );
    ProfileFile::parse(&text, "t.toml").unwrap().validate().unwrap()
}

/// A temporary directory holding a kernel file of `mode`, and a sysctl file saying `start`.
fn setup(tag: &str, mode: u32, start: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("vial-user-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = dir.join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(mode)).unwrap();
    let sysctl = dir.join("ip_unprivileged_port_start");
    std::fs::write(&sysctl, start).unwrap();
    (dir, kernel, sysctl)
}

fn who(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
    Credentials {
        uid: Uid::from_raw(uid),
        gid: Gid::from_raw(gid),
        groups: groups.iter().map(|g| Gid::from_raw(*g)).collect(),
    }
}

#[test]
fn the_mode_check_takes_the_owner_class_first_as_the_kernel_does() {
    let (owner, group) = (Uid::from_raw(100), Gid::from_raw(200));
    let r = 0o4;
    let rw = 0o6;
    // (mode, who, want, granted)
    let table = [
        (0o644, who(100, 1, &[]), r, true),
        (0o644, who(7, 1, &[]), r, true),
        (0o640, who(7, 1, &[]), r, false),
        (0o640, who(7, 200, &[]), r, true),
        (0o640, who(7, 1, &[200]), r, true),
        (0o600, who(7, 1, &[200]), r, false),
        // The owner class decides for the owner, even when "other" would allow more.
        (0o047, who(100, 200, &[]), r, false),
        (0o660, who(7, 1, &[200]), rw, true),
        (0o660, who(7, 1, &[]), rw, false),
        (0o666, who(7, 1, &[]), rw, true),
        (0o000, who(0, 0, &[]), rw, true),
    ];
    for (mode, who, want, expected) in table {
        assert_eq!(granted(mode, owner, group, want, &who), expected, "mode {mode:o}, {who:?}, want {want:o}");
    }
}

#[test]
fn root_keeps_root_and_auto_without_the_user_keeps_root_and_says_why() {
    let (dir, kernel, sysctl) = setup("root", 0o644, "1024");
    let root = choose(&profile(&kernel, 2222, "root"), Accel::Tcg, None, &sysctl).unwrap();
    assert_eq!((root.run_as, root.note), (None, None));
    // This machine has no vial-qemu (the images add it).
    if User::from_name(QemuUser::DEFAULT).unwrap().is_none() {
        let auto = choose(&profile(&kernel, 2222, "auto"), Accel::Tcg, None, &sysctl).unwrap();
        assert_eq!(auto.run_as, None);
        assert_eq!(auto.note.as_deref(), Some("qemu runs as root: the image has no user vial-qemu"));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_named_user_that_does_not_exist_is_an_error_naming_the_field_and_the_fix() {
    let (dir, kernel, sysctl) = setup("nouser", 0o644, "1024");
    let err = choose(&profile(&kernel, 2222, "no-such-user-here"), Accel::Tcg, None, &sysctl).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("machine.user (VIAL_QEMU_USER) = \"no-such-user-here\""), "{message}");
    assert!(message.contains("useradd --system"), "{message}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_unprivileged_user_gets_the_files_groups_and_ports_it_needs_or_the_reason() {
    // `nobody` exists on every Debian system.
    let nobody = User::from_name("nobody").unwrap().expect("nobody exists");
    let (dir, kernel, sysctl) = setup("nobody", 0o644, "1024");
    let choice = choose(&profile(&kernel, 22, "nobody"), Accel::Tcg, Some(&dir), &sysctl).unwrap();
    let run_as = choice.run_as.expect("nobody can run this qemu");
    assert_eq!((run_as.credentials.uid, choice.note), (nobody.uid, None));
    assert_eq!(std::fs::read_to_string(&sysctl).unwrap(), "22", "port 22 made bindable");

    // A lesson file only root can read: the guest could not read it through 9p.
    let secret = dir.join("lesson").join("stage0");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("notes.txt"), "root's").unwrap();
    std::fs::set_permissions(secret.join("notes.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let lesson = dir.join("lesson");
    let err = choose(&profile(&kernel, 2222, "nobody"), Accel::Tcg, Some(&lesson), &sysctl).unwrap_err().to_string();
    assert!(err.contains(&format!("{}/notes.txt cannot be read", secret.display())), "{err}");
    assert!(err.contains("chmod -R o+rX"), "{err}");
    std::fs::set_permissions(secret.join("notes.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(choose(&profile(&kernel, 2222, "nobody"), Accel::Tcg, Some(&lesson), &sysctl).is_ok());

    // A kernel only root can read: named, an error that names the file; auto would keep root.
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = choose(&profile(&kernel, 2222, "nobody"), Accel::Tcg, None, &sysctl).unwrap_err().to_string();
    assert!(err.contains(&format!("{} cannot be read by uid {}", kernel.display(), nobody.uid)), "{err}");
    assert!(err.contains("VIAL_QEMU_USER=root"), "{err}");
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();

    // A privileged port that cannot be made bindable.
    std::fs::write(&sysctl, "1024").unwrap();
    let unwritable = dir.join("no-such-dir").join("ip_unprivileged_port_start");
    let err = choose(&profile(&kernel, 22, "nobody"), Accel::Tcg, None, &unwritable).unwrap_err().to_string();
    assert!(err.contains("port 22 is privileged here"), "{err}");
    assert!(err.contains("--sysctl net.ipv4.ip_unprivileged_port_start=0"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_device_open_to_a_group_adds_that_group() {
    let (dir, kernel, _) = setup("kvm", 0o644, "0");
    let device = dir.join("kvm");
    std::fs::write(&device, b"").unwrap();
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o660)).unwrap();
    nix::unistd::chown(&device, Some(Uid::from_raw(0)), Some(Gid::from_raw(4242))).unwrap();
    assert_eq!(device_group(&device, &who(65534, 65534, &[])), Ok(Some(Gid::from_raw(4242))));
    assert_eq!(device_group(&device, &who(65534, 65534, &[4242])), Ok(None));
    std::fs::set_permissions(&device, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = device_group(&device, &who(65534, 65534, &[])).unwrap_err();
    assert!(err.contains("(mode 600) is not open to uid 65534"), "{err}");
    drop(kernel);
    std::fs::remove_dir_all(dir).unwrap();
}
