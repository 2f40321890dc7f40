use super::*;
use std::path::Path;

fn repo_profile(name: &str) -> (ProfileFile, PathBuf) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-profiles").join(format!("{name}.toml"));
    (ProfileFile::load(&path).unwrap(), path)
}

fn env(pairs: &[(&str, &str)]) -> Overrides {
    Overrides::from_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
}

#[test]
fn every_repo_profile_parses_and_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-profiles");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let file = ProfileFile::load(&path).unwrap_or_else(|p| panic!("{}: {p}", path.display()));
            file.validate().unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 3, "expected the linux, cumulus and vqfx profiles");
}

#[test]
fn unknown_field_is_one_line_naming_field_and_line() {
    let text = "name = \"x\"\n[machine]\nmemory = \"1G\"\nmemroy = \"2G\"\n[readiness]\nprobe = \"serial\"\npattern = \"login:\"\n";
    let problem = ProfileFile::parse(text, "p.toml").unwrap_err();
    let line = problem.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(line.contains("p.toml:4"), "{line}");
    assert!(line.contains("memroy"), "{line}");
    assert!(line.contains("correct or remove"), "{line}");
}

#[test]
fn bad_memory_size_names_field_value_and_fix() {
    let (mut file, _) = repo_profile("linux");
    file.machine.memory = "lots".into();
    let problems = file.validate().unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].field, "machine.memory");
    assert_eq!(problems[0].value, "lots");
    assert!(problems[0].fix.contains("512M"));
}

#[test]
fn all_problems_are_reported_at_once() {
    let (mut file, _) = repo_profile("linux");
    file.machine.memory = "0".into();
    file.machine.accel = "fast".into();
    file.network.plumbing = "wire".into();
    file.readiness.port = Some(9999);
    let fields: Vec<String> = file.validate().unwrap_err().into_iter().map(|p| p.field).collect();
    assert_eq!(fields, ["machine.memory", "machine.accel", "network.plumbing", "readiness.port"]);
}

#[test]
fn missing_disk_is_reported_with_its_path() {
    let (mut file, path) = repo_profile("cumulus");
    file.disks[0].path = "/nonexistent/cvx.qcow2".into();
    let config = Config::from_file(file, path, &Overrides::default(), "cvx1").unwrap();
    let text = ConfigError(config.profile.missing_files()).to_string();
    assert!(
        text.contains("disks[0].path") && text.contains("/nonexistent/cvx.qcow2") && text.contains("missing"),
        "{text}"
    );
}

#[test]
fn relative_assets_resolve_against_the_profile_folder() {
    let dir = std::env::temp_dir().join(format!("vial-config-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("guest")).unwrap();
    std::fs::write(dir.join("guest/vmlinux"), b"k").unwrap();
    std::fs::write(dir.join("guest/initrd.img"), b"i").unwrap();
    let (file, _) = repo_profile("linux");
    let config = Config::from_file(file, dir.join("profile.toml"), &Overrides::default(), "h").unwrap();
    assert!(config.profile.missing_files().is_empty());
    assert_eq!(config.profile.boot.unwrap().kernel, dir.join("guest/vmlinux"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn env_overrides_apply_and_problems_name_the_variable() {
    let (file, _) = repo_profile("linux");
    let overrides =
        env(&[("VIAL_MEMORY", "512M"), ("VIAL_ACCEL", "tcg"), ("VIAL_STOP_TIMEOUT", "3s"), ("VIAL_EGRESS", "on")]);
    let profile = file.clone().validate_with(&overrides).unwrap();
    assert_eq!(profile.memory_mib, 512);
    assert_eq!(profile.accel, AccelChoice::Tcg);
    assert_eq!(profile.stop_timeout, Duration::from_secs(3));
    assert!(profile.egress);

    let overrides = env(&[("VIAL_MEMORY", "huge"), ("VIAL_EGRESS", "maybe"), ("VIAL_VCPUS", "two")]);
    let err = file.validate_with(&overrides).unwrap_err();
    let fields: Vec<&str> = err.0.iter().map(|p| p.field.as_str()).collect();
    assert!(fields.contains(&"VIAL_MEMORY (overrides machine.memory)"), "{fields:?}");
    assert!(fields.contains(&"VIAL_EGRESS"), "{fields:?}");
    assert!(fields.contains(&"VIAL_VCPUS"), "{fields:?}");
}

#[test]
fn the_qemu_user_is_auto_root_or_a_user_name_and_anything_else_names_the_fix() {
    let (file, _) = repo_profile("linux");
    assert_eq!(file.clone().validate().unwrap().qemu_user, QemuUser::Auto, "auto by default");
    for (value, expected) in [
        ("auto", Some(QemuUser::Auto)),
        ("root", Some(QemuUser::Root)),
        ("vial-qemu", Some(QemuUser::Named("vial-qemu".into()))),
        ("_qemu2", Some(QemuUser::Named("_qemu2".into()))),
        ("", None),
        ("Root", None),
        ("1qemu", None),
        ("qemu user", None),
        ("../etc", None),
        ("a-name-of-thirty-three-characters", None),
    ] {
        let result = file.clone().validate_with(&env(&[("VIAL_QEMU_USER", value)]));
        match expected {
            Some(user) => assert_eq!(result.unwrap().qemu_user, user, "{value:?}"),
            None => {
                let err = result.unwrap_err();
                assert_eq!(err.0.len(), 1, "{value:?}");
                assert_eq!(err.0[0].field, "VIAL_QEMU_USER (overrides machine.user)");
                assert_eq!(err.0[0].value, value);
                assert!(err.0[0].fix.contains("use auto"), "{}", err.0[0].fix);
            }
        }
    }
}

#[test]
fn flags_win_over_environment() {
    let mut overrides = env(&[("VIAL_ACCEL", "kvm")]);
    overrides.set_flag(Key::Accel, "tcg".into());
    assert_eq!(overrides.get(Key::Accel), Some(("tcg", "--accel")));
}

#[test]
fn unknown_vial_variable_is_refused() {
    let problems = Overrides::from_env([("VIAL_MEMROY".to_string(), "1G".to_string())]).unwrap_err();
    assert_eq!(problems[0].field, "VIAL_MEMROY");
    assert!(problems[0].fix.contains("VIAL_MEMORY"));
    // Other programs' variables are none of vial's business.
    assert!(Overrides::from_env([
        ("PATH".to_string(), "/bin".to_string()),
        ("VIAL_LOG".to_string(), "debug".to_string())
    ])
    .is_ok());
}

#[test]
fn clab_intfs_sets_data_links_unless_vial_data_ifaces_does() {
    assert_eq!(env(&[("CLAB_INTFS", "4")]).get(Key::DataIfaces), Some(("4", "CLAB_INTFS")));
    assert_eq!(
        env(&[("CLAB_INTFS", "4"), ("VIAL_DATA_IFACES", "2")]).get(Key::DataIfaces),
        Some(("2", "VIAL_DATA_IFACES"))
    );
}

#[test]
fn relative_run_dir_is_refused() {
    let (file, _) = repo_profile("linux");
    let err = file.validate_with(&env(&[("VIAL_RUN_DIR", "run")])).unwrap_err();
    assert_eq!(err.0[0].field, "VIAL_RUN_DIR");
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_memory_mib("512M"), Some(512));
    assert_eq!(parse_memory_mib("2G"), Some(2048));
    assert_eq!(parse_memory_mib("2GiB"), Some(2048));
    assert_eq!(parse_memory_mib("1024"), Some(1024));
    assert_eq!(parse_memory_mib("2X"), None);
    assert_eq!(parse_memory_mib(""), None);
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("8s"), Some(Duration::from_secs(8)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("8"), None);
    // Past a year, or past u64: a configuration error, never an overflow further on.
    assert_eq!(parse_duration("365d"), None);
    assert_eq!(parse_duration("8760h"), Some(MAX_DURATION));
    assert_eq!(parse_duration("8761h"), None);
    assert_eq!(parse_duration("99999999999h"), None);
    assert_eq!(parse_duration("18446744073709551615s"), None);
    assert_eq!(parse_duration("18446744073709551616s"), None);
    assert_eq!(parse_duration("5124095576030432h"), None);
}

#[test]
fn durations_that_would_overflow_a_deadline_are_problems_named_by_their_setting() {
    for env in ["VIAL_STOP_TIMEOUT", "VIAL_LINK_TIMEOUT"] {
        for value in ["99999999999h", "18446744073709551615s", "5124095576030431h", "25h"] {
            let err = repo_profile("linux").0.validate_with(&self::env(&[(env, value)])).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert!(err.0[0].field.starts_with(env) && err.0[0].value == value, "{err}");
        }
    }
}

impl ProfileFile {
    fn validate_with(self, overrides: &Overrides) -> Result<Profile, ConfigError> {
        Config::from_file(self, PathBuf::from("/nonexistent/profile.toml"), overrides, "h").map(|config| config.profile)
    }
}

#[test]
fn bad_link_timeout_and_first_boot_steps_name_their_fields() {
    let (mut file, _) = repo_profile("linux");
    file.network.link_timeout = "soon".into();
    file.first_boot.push(profile::FirstBootStepFile {
        name: String::new(),
        expect: String::new(),
        send: None,
        timeout: "0s".into(),
    });
    let problems = file.clone().validate().unwrap_err();
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["network.link_timeout", "first_boot[0].name", "first_boot[0]", "first_boot[0].timeout"]);
    assert!(problems[0].fix.contains("120s"), "{}", problems[0]);

    let err = file.validate_with(&env(&[("VIAL_LINK_TIMEOUT", "later")])).unwrap_err();
    assert!(
        err.0.iter().any(|p| p.field == "VIAL_LINK_TIMEOUT (overrides network.link_timeout)" && p.value == "later"),
        "{err}"
    );
}

#[test]
fn snapshot_path_resolves_against_the_profile_and_vial_snapshot_overrides_it() {
    let (file, _) = repo_profile("linux");
    let config = Config::from_file(file.clone(), "/etc/vial/profile.toml".into(), &Overrides::default(), "h").unwrap();
    assert_eq!(config.profile.snapshot.unwrap().dir, Path::new("/etc/vial/snapshot"));
    let off = Config::from_file(file.clone(), "/etc/vial/profile.toml".into(), &env(&[("VIAL_SNAPSHOT", "off")]), "h");
    assert_eq!(off.unwrap().profile.snapshot, None);
    let auto =
        Config::from_file(file.clone(), "/etc/vial/profile.toml".into(), &env(&[("VIAL_SNAPSHOT", "auto")]), "h");
    assert_eq!(auto.unwrap().profile.snapshot.unwrap().dir, Path::new("/etc/vial/snapshot"));
    let other = Config::from_file(file, "/etc/vial/profile.toml".into(), &env(&[("VIAL_SNAPSHOT", "/snap")]), "h");
    assert_eq!(other.unwrap().profile.snapshot.unwrap().dir, Path::new("/snap"));
}

#[test]
fn bad_snapshot_settings_name_the_setting_the_value_and_the_fix() {
    let (file, _) = repo_profile("linux");
    let err = Config::from_file(file.clone(), "/p/profile.toml".into(), &env(&[("VIAL_SNAPSHOT", "yes")]), "h")
        .unwrap_err()
        .to_string();
    assert!(err.contains("VIAL_SNAPSHOT") && err.contains("yes") && err.contains("use off"), "{err}");

    let mut bad = file;
    bad.snapshot.as_mut().unwrap().settle = "forever".into();
    let problems = bad.validate().unwrap_err();
    assert_eq!(problems[0].field, "snapshot.settle");
    assert!(problems[0].fix.contains("5s"), "{:?}", problems[0]);
}

#[test]
fn a_name_the_guest_cannot_take_is_refused_naming_where_it_came_from() {
    let (file, _) = repo_profile("linux");
    let err = Config::from_file(file.clone(), "/p/profile.toml".into(), &env(&[("VIAL_NAME", "r1,evil=1")]), "h")
        .unwrap_err()
        .to_string();
    assert!(err.contains("VIAL_NAME") && err.contains("r1,evil=1") && err.contains("63 letters"), "{err}");
    let err = Config::from_file(file, "/p/profile.toml".into(), &Overrides::default(), "").unwrap_err().to_string();
    assert!(err.contains("the hostname"), "{err}");
}

#[test]
fn readiness_console_goes_with_a_tcp_probe_and_is_not_empty() {
    let (mut file, _) = repo_profile("linux");
    file.readiness.console = Some(String::new());
    let problems = file.validate().unwrap_err();
    assert_eq!(problems[0].field, "readiness.console");

    let text = "name = \"x\"\n[machine]\nmemory = \"1G\"\n[readiness]\nprobe = \"serial\"\npattern = \"login:\"\nconsole = \"up\"\n";
    let problems = ProfileFile::parse(text, "p.toml").unwrap().validate().unwrap_err();
    let problem = problems.iter().find(|p| p.field == "readiness.console").expect("readiness.console refused");
    assert!(problem.fix.contains("only probe = \"tcp\""), "{problem:?}");
}

#[test]
fn the_nic_layout_is_checked_against_the_links_and_the_machine() {
    let problem = |edit: &dyn Fn(&mut ProfileFile)| {
        let (mut file, _) = repo_profile("linux");
        edit(&mut file);
        let problems = file.validate().unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        problems.into_iter().next().unwrap()
    };
    let p = problem(&|f| f.network.nic_layout = "pcie".into());
    assert_eq!((p.field.as_str(), p.value.as_str()), ("network.nic_layout", "pcie"));
    assert!(p.fix.contains("slots or multifunction"), "{}", p.fix);
    let p = problem(&|f| {
        f.network.nic_layout = "multifunction".into();
        f.network.data_nics = 8;
    });
    assert_eq!((p.field.as_str(), p.value.as_str()), ("network.data_nics", "8"));
    assert!(p.fix.contains("at most 7") && p.fix.contains("slots"), "{}", p.fix);
    let p = problem(&|f| {
        f.network.nic_layout = "multifunction".into();
        f.network.reserved_nics = 2;
    });
    assert_eq!(p.field, "network.reserved_nics");
    let p = problem(&|f| {
        f.network.nic_layout = "multifunction".into();
        f.machine.machine_type = "microvm".into();
    });
    assert_eq!((p.field.as_str(), p.value.as_str()), ("network.nic_layout", "multifunction"));
    // The environment reaches the same check, named by its variable's field.
    let (file, path) = repo_profile("linux");
    let err =
        Config::from_file(file, path, &env(&[("VIAL_NIC_LAYOUT", "multifunction"), ("VIAL_DATA_IFACES", "9")]), "x")
            .unwrap_err()
            .to_string();
    assert!(err.contains("VIAL_DATA_IFACES") || err.contains("network.data_nics"), "{err}");
    assert!(err.contains("at most 7"), "{err}");
}
