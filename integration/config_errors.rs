//! Inputs a user can get wrong, fed to the real binary: each gives a one-line error naming the
//! problem and its fix, and the documented exit code. No VM is started.

use crate::support::*;
use std::process::Command;

fn vial(env: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let dir = temp_dir("cfg");
    let output = Command::new(vial_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VIAL_RUN_DIR", dir.path().join("run"))
        .env("VIAL_STATE_DIR", dir.path().join("state"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).to_string())
}

fn profile_with(dir: &TempDir, edit: impl FnOnce(String) -> String) -> String {
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let _ = std::os::unix::fs::symlink(guest_dir(), bundle.join("guest"));
    let text = edit(std::fs::read_to_string(repo().join("vm-profiles/linux.toml")).unwrap());
    let path = bundle.join("profile.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("config:") || l.contains("ERROR")).collect()
}

#[test]
fn unknown_profile_field() {
    let dir = temp_dir("unknown");
    let profile = profile_with(&dir, |t| t.replace("vcpus = 1", "vcpus = 1\nmemroy = \"1G\""));
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &[]);
    assert_eq!(code, 78, "{stderr}");
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("memroy") && lines[0].contains("correct or remove"), "{stderr}");
}

#[test]
fn bad_memory_size_in_profile_and_in_env() {
    let dir = temp_dir("mem");
    let profile = profile_with(&dir, |t| t.replace("memory = \"256M\"", "memory = \"lots\""));
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("machine.memory") && stderr.contains("\"lots\"") && stderr.contains("512M"), "{stderr}");

    let profile = profile_with(&dir, |t| t);
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), ("VIAL_MEMORY", "12Q")], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("VIAL_MEMORY") && stderr.contains("12Q"), "{stderr}");
}

#[test]
fn bad_flag_value_names_the_flag() {
    let dir = temp_dir("flag");
    let profile = profile_with(&dir, |t| t);
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &["--accel", "warp"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("--accel") && stderr.contains("warp") && stderr.contains("auto, kvm or tcg"), "{stderr}");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (code, stderr) = vial(&[], &["--memroy", "1G"]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn missing_disk() {
    let dir = temp_dir("disk");
    let profile = profile_with(&dir, |t| {
        let start = t.find("[boot]").unwrap();
        let end = t.find("[network]").unwrap();
        format!("{}[[disks]]\npath = \"/nonexistent/appliance.qcow2\"\n\n{}", &t[..start], &t[end..])
    });
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &[]);
    assert_eq!(code, 78, "{stderr}");
    let lines = error_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("disks[0].path")
            && lines[0].contains("/nonexistent/appliance.qcow2")
            && lines[0].contains("missing"),
        "{stderr}"
    );
}

#[test]
fn missing_profile_file() {
    let (code, stderr) = vial(&[("VIAL_PROFILE", "/nonexistent/profile.toml")], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("VIAL_PROFILE") && stderr.contains("/nonexistent/profile.toml"), "{stderr}");
}

#[test]
fn unknown_vial_variable() {
    let (code, stderr) = vial(&[("VIAL_MEMROY", "1G")], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("VIAL_MEMROY") && stderr.contains("VIAL_MEMORY"), "{stderr}");
}

#[test]
fn missing_qemu_binary() {
    let dir = temp_dir("noqemu");
    let profile = profile_with(&dir, |t| t);
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), ("VIAL_QEMU", "/nonexistent/qemu-system-x86_64")], &[]);
    assert_eq!(code, 69, "{stderr}");
    let line =
        stderr.lines().find(|l| l.contains("/nonexistent/qemu-system-x86_64")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains("install qemu-system-x86"), "{line}");
}

#[test]
fn forced_kvm_without_kvm() {
    // /dev/kvm may work on this host; point the probe's view at a namespace without it.
    let dir = temp_dir("nokvm");
    let profile = profile_with(&dir, |t| t);
    let output = Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", "mount --bind /dev/null /dev/kvm 2>/dev/null; exec \"$0\""])
        .arg(vial_bin())
        .env("VIAL_PROFILE", &profile)
        .env("VIAL_ACCEL", "kvm")
        .env("VIAL_RUN_DIR", dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("VIAL_ACCEL=tcg"), "{stderr}");
}

#[test]
fn snapshot_settings_a_user_can_get_wrong() {
    let dir = temp_dir("snapcfg");
    let profile = profile_with(&dir, |t| t);
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), ("VIAL_SNAPSHOT", "yes")], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("VIAL_SNAPSHOT") && stderr.contains("\"yes\"") && stderr.contains("use off"), "{stderr}");

    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &["run", "--snapshot", "snap"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("--snapshot") && stderr.contains("absolute path"), "{stderr}");

    // `vial snapshot` with nowhere to save: it says so before starting anything.
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), ("VIAL_SNAPSHOT", "off")], &["snapshot"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("has no [snapshot]") && stderr.contains("VIAL_SNAPSHOT=<directory>"), "{stderr}");

    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), ("VIAL_NAME", "r 1")], &[]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("VIAL_NAME") && stderr.contains("\"r 1\""), "{stderr}");
}

/// Durations that would overflow a deadline (`Instant + Duration` panics) are configuration
/// errors naming the setting, through the real binary, never a panic.
#[test]
fn overflowing_durations_are_config_errors_not_panics() {
    let dir = temp_dir("overflow");
    let profile = profile_with(&dir, |t| t);
    for (env, value) in [
        ("VIAL_STOP_TIMEOUT", "99999999999h"),
        ("VIAL_LINK_TIMEOUT", "99999999999h"),
        ("VIAL_LINK_TIMEOUT", "5124095576030431h"),
        ("VIAL_STOP_TIMEOUT", "18446744073709551615s"),
        ("VIAL_LINK_TIMEOUT", "18446744073709551616s"),
    ] {
        let (code, stderr) = vial(&[("VIAL_PROFILE", &profile), (env, value)], &[]);
        assert_eq!(code, 78, "{env}={value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{env}={value}: {stderr}");
        assert!(stderr.contains(env) && stderr.contains(value), "{env}={value}: {stderr}");
    }
    let (code, stderr) = vial(&[("VIAL_PROFILE", &profile)], &["--stop-timeout", "99999999999h"]);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("--stop-timeout"), "{stderr}");
}
