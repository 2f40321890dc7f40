//! Property tests over hostile configuration: arbitrary and mutated profile text through
//! [`ProfileFile::parse`] and [`ProfileFile::validate`], and arbitrary values for every
//! `VIAL_*` setting through [`Overrides::from_env`] and [`Config::from_file`]. The property:
//! no panic, and every problem is a clear message (a field, a fix, one line each). A profile
//! that validates must also yield a QEMU argv. Case counts are bounded so that they run in
//! seconds with `cargo test`.

use super::*;
use proptest::prelude::*;
use std::path::Path;

fn repo_profiles() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm-profiles");
    let mut profiles: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .map(|path| (path.display().to_string(), std::fs::read_to_string(&path).unwrap()))
        .collect();
    profiles.sort();
    profiles
}

/// A problem a person can act on: it names where, and says what to do, each on one line.
fn assert_clear(problem: &Problem) {
    assert!(!problem.field.trim().is_empty(), "a problem without a field: {problem:?}");
    assert!(!problem.fix.trim().is_empty(), "a problem without a fix: {problem:?}");
    assert!(!problem.field.contains('\n') && !problem.fix.contains('\n'), "a problem over lines: {problem:?}");
}

/// Parses and validates `text` as a profile; what validates must give a QEMU command line.
fn check_profile_text(text: &str) {
    let file = match ProfileFile::parse(text, "profile.toml") {
        Ok(file) => file,
        Err(problem) => {
            assert_clear(&problem);
            assert!(problem.field.starts_with("profile.toml"), "{problem:?}");
            return;
        }
    };
    let overrides = Overrides::default();
    match Config::from_file(file, "/etc/vial/profile.toml".into(), &overrides, "r1") {
        Ok(config) => {
            let start = crate::vm::qemu::Start {
                accel: crate::vm::Accel::Tcg,
                disks: Vec::new(),
                share: None,
                data_nics: Vec::new(),
                restore: false,
                user: None,
            };
            let launch = crate::vm::Launch { sandbox: true, ..start.launch(&config, 3) };
            assert_deadlines_fit(&config.profile);
            let argv = crate::vm::qemu_argv(&config.profile, &launch);
            assert!(argv.len() > 10);
        }
        Err(ConfigError(problems)) => {
            assert!(!problems.is_empty());
            problems.iter().for_each(assert_clear);
        }
    }
}

/// Every duration of a validated profile can be a deadline: `Instant + Duration` panics on
/// overflow, and the supervisor adds each of them to `Instant::now()`.
fn assert_deadlines_fit(profile: &Profile) {
    let now = std::time::Instant::now();
    let durations = [profile.link_timeout, profile.stop_timeout, profile.probe_interval]
        .into_iter()
        .chain(profile.first_boot.iter().map(|step| step.timeout))
        .chain(profile.snapshot.iter().map(|snapshot| snapshot.settle));
    for duration in durations {
        assert!(now.checked_add(duration).is_some(), "{duration:?} overflows a deadline");
        assert!(tokio::time::Instant::now().checked_add(duration).is_some(), "{duration:?}");
    }
}

/// Durations near the limits of u64 seconds, milliseconds and hours.
fn huge_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        (u64::MAX / 7200..=u64::MAX / 3600).prop_map(|n| format!("{n}h")),
        (u64::MAX / 120..=u64::MAX / 60).prop_map(|n| format!("{n}m")),
        (u64::MAX / 2..=u64::MAX).prop_map(|n| format!("{n}s")),
        (u64::MAX / 2..=u64::MAX).prop_map(|n| format!("{n}ms")),
        (0u64..=u64::MAX).prop_map(|n| format!("{n}s")),
    ]
}

/// A value of any TOML type that a profile field might get: the type checks and the range
/// checks both get exercised.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        any::<i64>().prop_map(|n| n.to_string()),
        (any::<u64>(), prop::sample::select(vec!["", "ms", "s", "m", "h", "d", "M", "G", "T", "GiB"]))
            .prop_map(|(n, unit)| format!("\"{n}{unit}\"")),
        (0u32..100_000, prop::sample::select(vec!["ms", "s", "m", "h"])).prop_map(|(n, unit)| format!("\"{n}{unit}\"")),
        huge_duration().prop_map(|d| format!("\"{d}\"")),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("\"\"".to_string()),
    ]
}

/// A real profile with one change: a value replaced, a line dropped or duplicated, bytes
/// inserted or cut.
fn mutated_profile() -> impl Strategy<Value = String> {
    let profiles = repo_profiles();
    (
        0..profiles.len(),
        any::<prop::sample::Index>(),
        0u8..5,
        toml_value(),
        any::<String>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(which, line_at, how, value, junk, byte_at)| {
            let text = &profiles[which].1;
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            let i = line_at.index(lines.len());
            match how {
                0 => {
                    // Replace the value of a `key = value` line (or the nearest one above).
                    if let Some(j) = (0..=i).rev().find(|&j| lines[j].contains(" = ") && !lines[j].starts_with('#')) {
                        let key = lines[j].split(" = ").next().unwrap().to_string();
                        lines[j] = format!("{key} = {value}");
                    }
                }
                1 => {
                    lines.remove(i);
                }
                2 => {
                    let line = lines[i].clone();
                    lines.insert(i, line);
                }
                3 => lines.insert(i, junk),
                _ => {
                    let joined = lines.join("\n");
                    let mut cut = byte_at.index(joined.len().max(1));
                    while !joined.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    return format!("{}{}", &joined[..cut], &joined[cut..].chars().skip(3).collect::<String>());
                }
            }
            lines.join("\n")
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_is_a_profile_or_a_clear_problem(text in any::<String>()) {
        check_profile_text(&text);
    }

    #[test]
    fn toml_shaped_text_is_a_profile_or_a_clear_problem(
        entries in prop::collection::vec(
            (prop::sample::select(vec!["", "[machine]\n", "[network]\n", "[[forwards]]\n", "[readiness]\n", "[stop]\n",
                                       "[share]\n", "[boot]\n", "[[disks]]\n", "[snapshot]\n", "[[first_boot]]\n"]),
             "[a-z_]{1,14}", toml_value()),
            0..12)
    ) {
        let text: String = entries.iter().map(|(table, key, value)| format!("{table}{key} = {value}\n")).collect();
        check_profile_text(&format!("name = \"x\"\n{text}"));
    }

    #[test]
    fn a_mutated_real_profile_is_a_profile_or_a_clear_problem(text in mutated_profile()) {
        check_profile_text(&text);
    }

    #[test]
    fn any_value_of_any_setting_is_applied_or_named_as_a_problem(
        settings in prop::collection::vec((0..SETTINGS.len(), prop_oneof![
            any::<String>(),
            toml_value(),
            "[0-9]{1,25}(ms|s|m|h|M|G|T)?",
            "/[ -~]{0,40}",
            huge_duration(),
        ]), 1..4),
        hostname in "[ -~]{0,70}",
    ) {
        let vars: Vec<(String, String)> =
            settings.iter().map(|(i, value)| (SETTINGS[*i].env.to_string(), value.clone())).collect();
        let overrides = Overrides::from_env(vars.clone()).expect("every variable here is a setting");
        let (path, text) = repo_profiles().into_iter().find(|(path, _)| path.ends_with("linux.toml")).unwrap();
        let file = ProfileFile::parse(&text, &path).unwrap();
        match Config::from_file(file, path.into(), &overrides, &hostname) {
            Ok(config) => assert_deadlines_fit(&config.profile),
            Err(ConfigError(problems)) => {
                prop_assert!(!problems.is_empty());
                for problem in &problems {
                    assert_clear(problem);
                }
                // With one setting given, each problem is named by it (or by the host name,
                // which stands in for VIAL_NAME).
                if let [(name, _)] = vars.as_slice() {
                    for problem in &problems {
                        prop_assert!(
                            problem.field.contains(name.as_str()) || problem.field == "the hostname",
                            "{name}: {problem:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn an_unknown_vial_variable_is_refused_by_name(name in "VIAL_[A-Z_]{1,20}", value in any::<String>()) {
        prop_assume!(!SETTINGS.iter().any(|s| s.env == name) && !settings::OTHER_VARS.contains(&name.as_str()));
        let problems = Overrides::from_env([(name.clone(), value)]).unwrap_err();
        prop_assert_eq!(problems.len(), 1);
        prop_assert_eq!(&problems[0].field, &name);
        assert_clear(&problems[0]);
    }
}
