//! `vialctl lesson validate|convert` against the real binary: the NRE Labs fixtures in
//! `integration/fixtures/lessons/` (see its SOURCES.md), Syringe-era lessons, and lesson
//! directories made here with and without their stage configuration files. No VM is started.

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn vialctl(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_vialctl")).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn fixtures() -> PathBuf {
    repo().join("integration/fixtures/lessons")
}

/// Subdirectories of `dir`, sorted; `underscore` picks the `_`-prefixed ones or the others.
fn dirs_in(dir: &Path, underscore: bool) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with('_') == underscore)
        .collect();
    dirs.sort();
    dirs
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_current_format_fixture_validates() {
    let lessons = dirs_in(&fixtures(), false);
    assert_eq!(lessons.len(), 7, "{lessons:?}");
    let images = dirs_in(&fixtures().join("_images"), false);
    assert_eq!(images.len(), 5, "{images:?}");
    for dir in lessons.iter().chain(&images) {
        let (code, stdout, stderr) = vialctl(&["lesson", "validate", "--no-file-checks", s(dir)]);
        assert_eq!(code, 0, "{}: {stdout}{stderr}", dir.display());
        assert_eq!(stdout.trim(), format!("{}: ok", dir.display()));
    }
    // All at once, too.
    let mut args = vec!["lesson", "validate", "--no-file-checks"];
    args.extend(lessons.iter().map(|p| s(p)));
    assert_eq!(vialctl(&args).0, 0);
}

#[test]
fn jsnapy_fixture_passes_file_checks_with_its_napalm_files() {
    let (code, stdout, stderr) = vialctl(&["lesson", "validate", s(&fixtures().join("jsnapy-network-testing"))]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn fixture_without_its_config_files_fails_file_checks_naming_them() {
    let dir = fixtures().join("ansible-network-automation");
    let (code, stdout, stderr) = vialctl(&["lesson", "validate", s(&dir)]);
    assert_eq!(code, 65, "{stdout}{stderr}");
    let file = dir.join("lesson.meta.yaml");
    // vqfx1 has its junos file in stages 0 and 1 only; cvx1.py was never copied.
    let expected = [
        format!(
            "{}:32:22: endpoint `vqfx1` has `configurationType: napalm` but stage2/configs/vqfx1-<driver>.txt",
            file.display()
        ),
        format!(
            "{}:41:22: endpoint `cvx1` has `configurationType: python` but stage0/configs/cvx1.py is missing",
            file.display()
        ),
    ];
    for line in expected {
        assert!(stdout.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("stage0/configs/vqfx1"), "{stdout}");
    assert_eq!(stdout.lines().count(), 6, "{stdout}");
}

#[test]
fn legacy_fixtures_are_recognised_and_point_to_convert() {
    for dir in dirs_in(&fixtures().join("_legacy-syringe"), false) {
        let (code, stdout, stderr) = vialctl(&["lesson", "validate", "--no-file-checks", s(&dir)]);
        assert_eq!(code, 65, "{stdout}{stderr}");
        let expected = format!(
            "{}:2:1: this is a Syringe-era lesson (`lessonName`/`lessonId`, antidote before v0.6), not the current \
             format: run `vialctl lesson convert {}` to rewrite it",
            dir.join("lesson.meta.yaml").display(),
            dir.display()
        );
        assert_eq!(stdout.trim(), expected);
    }
}

#[test]
fn legacy_fixtures_convert_to_lessons_that_validate() {
    let tmp = temp_dir("convert");
    for (legacy, slug) in [("lesson-13-napalm", "napalm"), ("lesson-41-ansible-network", "ansible-network")] {
        let source = fixtures().join("_legacy-syringe").join(legacy);
        let target = tmp.path().join(slug);
        std::fs::create_dir_all(&target).unwrap();
        let out = target.join("lesson.meta.yaml");
        let (code, stdout, stderr) = vialctl(&["lesson", "convert", s(&source), "-o", s(&out)]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        assert!(stderr.contains("note: stages are numbered from 0 now"), "{stderr}");
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains(&format!("slug: {slug}\n")), "{text}");
        assert!(text.contains("image: vqfx-snap1\n") && text.contains("configurationType: napalm\n"), "{text}");
        assert!(!text.contains("lessonName") && !text.contains("antidotelabs/"), "{text}");
        let (code, stdout, stderr) = vialctl(&["lesson", "validate", "--no-file-checks", s(&target)]);
        assert_eq!(code, 0, "{}: {stdout}{stderr}\n{text}", out.display());
    }
}

#[test]
fn convert_in_place_and_to_standard_output() {
    let tmp = temp_dir("inplace");
    let dir = tmp.path().join("lesson-13-napalm");
    std::fs::create_dir_all(&dir).unwrap();
    let legacy = fixtures().join("_legacy-syringe/lesson-13-napalm/lesson.meta.yaml");
    std::fs::copy(&legacy, dir.join("lesson.meta.yaml")).unwrap();

    let (code, stdout, _) = vialctl(&["lesson", "convert", "--slug", "napalm-intro", s(&dir)]);
    assert_eq!(code, 0);
    assert!(stdout.contains("slug: napalm-intro\n"), "{stdout}");
    assert_eq!(std::fs::read(dir.join("lesson.meta.yaml")).unwrap(), std::fs::read(&legacy).unwrap());

    let (code, _, stderr) = vialctl(&["lesson", "convert", "--in-place", s(&dir)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(vialctl(&["lesson", "validate", "--no-file-checks", s(&dir)]).0, 0);
    // Converting again is refused: it is current now.
    let (code, _, stderr) = vialctl(&["lesson", "convert", "--in-place", s(&dir)]);
    assert_eq!(code, 65);
    assert!(stderr.contains("already in the current format"), "{stderr}");
}

const MADE_UP: &str = "\
name: Three Ways to Configure
slug: three-ways
category: tools
tier: local
description: One endpoint per configurationType.
shortDescription: Config
endpoints:
- name: py1
  image: utility
  configurationType: python
  presentations:
  - name: cli
    port: 22
    type: ssh
- name: ans1
  image: utility
  configurationType: ansible
  additionalPorts: [22]
- name: rtr1
  image: crpd
  configurationType: napalm
  additionalPorts: [22, 830]
connections:
- a: py1
  b: rtr1
  subnet: 198.18.1.0/24
- a: ans1
  b: rtr1
  subnet: 198.18.2.0/24
stages:
- description: First
  guideType: markdown
- description: Second
  guideType: jupyter
";

#[test]
fn stage_config_files_present_pass_and_a_missing_one_is_named() {
    let tmp = temp_dir("files");
    let dir = tmp.path().join("three-ways");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lesson.meta.yaml"), MADE_UP).unwrap();
    for stage in 0..2 {
        let configs = dir.join(format!("stage{stage}/configs"));
        std::fs::create_dir_all(&configs).unwrap();
        for file in ["py1.py", "ans1.yml", "rtr1-junos.txt"] {
            std::fs::write(configs.join(file), "").unwrap();
        }
    }
    let (code, stdout, stderr) = vialctl(&["lesson", "validate", s(&dir)]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    std::fs::remove_file(dir.join("stage1/configs/ans1.yml")).unwrap();
    let (code, stdout, _) = vialctl(&["lesson", "validate", s(&dir)]);
    assert_eq!(code, 65);
    assert_eq!(
        stdout.trim(),
        format!(
            "{}:17:22: endpoint `ans1` has `configurationType: ansible` but stage1/configs/ans1.yml is missing: add \
             the file, or remove `configurationType`",
            dir.join("lesson.meta.yaml").display()
        )
    );
    assert_eq!(vialctl(&["lesson", "validate", "--no-file-checks", s(&dir)]).0, 0);
}

#[test]
fn a_broken_lesson_reports_every_problem_with_its_place() {
    let tmp = temp_dir("broken");
    let dir = tmp.path().join("three-ways");
    std::fs::create_dir_all(&dir).unwrap();
    let text = MADE_UP
        .replace("tier: local", "tier: beta")
        .replace("  b: rtr1\n  subnet: 198.18.2.0/24", "  b: rtr9\n  subnet: 198.18.2.0/33");
    std::fs::write(dir.join("lesson.meta.yaml"), text).unwrap();
    let (code, stdout, stderr) = vialctl(&["lesson", "validate", "--no-file-checks", s(&dir)]);
    assert_eq!(code, 65, "{stdout}{stderr}");
    let file = dir.join("lesson.meta.yaml").display().to_string();
    let places: Vec<&str> =
        stdout.lines().map(|l| l.strip_prefix(&file).unwrap().split(": ").next().unwrap()).collect();
    assert_eq!(places, vec![":4:7", ":28:6", ":29:11"], "{stdout}");
    assert!(stderr.contains("3 problem(s) in 1 of 1 lesson(s)"), "{stderr}");
}

#[test]
fn usage_and_missing_input_have_their_exit_codes() {
    assert_eq!(vialctl(&[]).0, 64);
    assert_eq!(vialctl(&["lesson", "validate"]).0, 64);
    assert_eq!(vialctl(&["lesson", "frobnicate"]).0, 64);
    let lesson = fixtures().join("linux-basics");
    assert_eq!(vialctl(&["lesson", "convert", s(&lesson), "-o", "/tmp/x", "--in-place"]).0, 64);
    let (code, _, stderr) = vialctl(&["lesson", "validate", "/nonexistent/lesson"]);
    assert_eq!(code, 66);
    assert_eq!(stderr.trim(), "error: /nonexistent/lesson: no such directory");
    let (code, _, stderr) = vialctl(&["lesson", "validate", s(&fixtures())]);
    assert_eq!(code, 66, "{stderr}");
    assert!(stderr.contains("no lesson.meta.yaml (or image.meta.yaml)"), "{stderr}");
    assert_eq!(vialctl(&["--help"]).0, 0);
}

/// A curriculum checkout made here: `lessons/<slug>/` and `images/<dir>/image.meta.yaml`.
fn curriculum(tag: &str, images: &[(&str, &str)], lesson_image: &str) -> (testkit::TempDir, PathBuf) {
    let root = temp_dir(tag);
    let lesson = root.path().join("lessons/two-images");
    std::fs::create_dir_all(&lesson).unwrap();
    let meta = std::fs::read_to_string(fixtures().join("linux-basics/lesson.meta.yaml")).unwrap();
    let meta = meta.replace("slug: linux-basics", "slug: two-images").replace("image: utility", lesson_image);
    std::fs::write(lesson.join("lesson.meta.yaml"), meta).unwrap();
    for (dir, text) in images {
        std::fs::create_dir_all(root.path().join("images").join(dir)).unwrap();
        std::fs::write(root.path().join("images").join(dir).join("image.meta.yaml"), text).unwrap();
    }
    (root, lesson)
}

const FRR_IMAGE: &str = "slug: frr\ndescription: d\nflavor: trusted\nsshUser: antidote\nsshPassword: p\n\
configUser: antidote\nconfigPassword: p\n";

#[test]
fn in_a_curriculum_checkout_the_metadata_of_the_images_a_lesson_uses_is_validated() {
    let broken = "description: no slug\nflavor: sideways\n";
    let validate = |lesson: &Path| vialctl(&["lesson", "validate", "--no-file-checks", s(lesson)]);

    // Its image's metadata is valid: valid.
    let (_root, lesson) = curriculum("curr-ok", &[("frr", FRR_IMAGE), ("other", broken)], "image: frr");
    let (code, out, err) = validate(&lesson);
    assert_eq!(code, 0, "{out}{err}");
    // No metadata for its image (the real curriculum has none for frr), and a broken file it
    // does not use: valid; vial's image stands in.
    let (_root, lesson) = curriculum("curr-none", &[("other", broken)], "image: frr");
    let (code, out, err) = validate(&lesson);
    assert_eq!(code, 0, "{out}{err}");

    // A broken file it uses, and a slug two images claim: each a problem at its place.
    let (root, lesson) = curriculum("curr-broken", &[("broken", broken)], "image: broken");
    let (code, out, err) = validate(&lesson);
    let images = root.path().join("images").canonicalize().unwrap();
    assert_eq!(code, 65, "{out}{err}");
    assert!(format!("{out}{err}").contains(&format!("{}/broken/image.meta.yaml:", images.display())), "{out}{err}");
    let (_root, lesson) = curriculum("curr-twice", &[("frr", FRR_IMAGE), ("frr-again", FRR_IMAGE)], "image: frr");
    let (code, out, err) = validate(&lesson);
    assert_eq!(code, 65, "{out}{err}");
    assert!(
        format!("{out}{err}").contains("frr-again/image.meta.yaml:1:1: slug \"frr\" is taken by another image"),
        "{out}{err}"
    );
}

#[test]
fn the_examples_are_a_curriculum_checkout_whose_lessons_and_images_validate() {
    let examples = repo().join("examples");
    let mut dirs = dirs_in(&examples.join("lessons"), false);
    assert!(!dirs.is_empty(), "{dirs:?}");
    dirs.extend(dirs_in(&examples.join("images"), false));
    let args: Vec<&str> = ["lesson", "validate"].into_iter().chain(dirs.iter().map(|d| s(d))).collect();
    let (code, out, err) = vialctl(&args);
    assert_eq!(code, 0, "{out}{err}");
}
