//! The rules between fields of a lesson (unique names, connections that name real endpoints,
//! endpoints that can be reached, subnets that do not overlap), and the checks against the lesson
//! directory (each configured endpoint's file in every stage). Never writes anything.

use std::collections::HashMap;
use std::path::Path;

use ipnetwork::IpNetwork;

use super::model::{ConfigurationType, Lesson, NAPALM_DRIVERS};
use super::yaml::{Diagnostic, Pos};

impl Lesson {
    /// The rules that span fields. `Lesson::parse` runs them; they run on a partly built lesson
    /// too, where a bad value was left empty, so they skip empty names.
    pub(crate) fn check_rules(&self) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut push = |pos: Pos, message: String| out.push(Diagnostic { pos, message });

        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            if ep.name.is_empty() {
                continue;
            }
            if let Some(first) = seen.get(ep.name.as_str()) {
                push(
                    ep.name.pos,
                    format!(
                        "`endpoints[{i}].name` is `{}`, already the name of the endpoint at line {}: give each endpoint its own name",
                        ep.name.value, first.line
                    ),
                );
            } else {
                seen.insert(&ep.name, ep.name.pos);
            }
        }

        for (i, ep) in self.endpoints.iter().enumerate() {
            if ep.presentations.is_empty() && ep.additional_ports.is_empty() {
                push(
                    ep.pos,
                    format!(
                        "endpoint `{}` (`endpoints[{i}]`) has neither `presentations` nor `additionalPorts`, so nothing can reach it: \
                         add a presentation (`presentations: [{{name: cli, port: 22, type: ssh}}]`) or `additionalPorts`",
                        ep.name.value
                    ),
                );
            }
            let mut names: HashMap<&str, Pos> = HashMap::new();
            for (j, p) in ep.presentations.iter().enumerate() {
                if p.name.is_empty() {
                    continue;
                }
                if let Some(first) = names.get(p.name.as_str()) {
                    push(
                        p.name.pos,
                        format!(
                            "`endpoints[{i}].presentations[{j}].name` is `{}`, already a presentation of endpoint `{}` (line {}): \
                             give each presentation of an endpoint its own name",
                            p.name.value, ep.name.value, first.line
                        ),
                    );
                } else {
                    names.insert(&p.name, p.name.pos);
                }
            }
        }

        let mut known: Vec<&str> = seen.keys().copied().collect();
        known.sort_unstable();
        for (i, c) in self.connections.iter().enumerate() {
            for (end, name) in [("a", &c.a), ("b", &c.b)] {
                if !name.is_empty() && !seen.contains_key(name.as_str()) {
                    push(
                        name.pos,
                        format!(
                            "`connections[{i}].{end}` is `{}`, which is not an endpoint of this lesson: use one of {}",
                            name.value,
                            known.join(", ")
                        ),
                    );
                }
            }
            if !c.a.is_empty() && c.a.value == c.b.value {
                push(
                    c.b.pos,
                    format!(
                        "`connections[{i}]` connects endpoint `{}` to itself: set `b` to another endpoint",
                        c.a.value
                    ),
                );
            }
        }

        for (i, c) in self.connections.iter().enumerate() {
            let Some(net) = &c.subnet else { continue };
            let earlier = self.connections[..i]
                .iter()
                .enumerate()
                .find_map(|(k, o)| o.subnet.as_ref().filter(|o| overlaps(o.value, net.value)).map(|o| (k, o)));
            if let Some((k, other)) = earlier {
                push(
                    net.pos,
                    format!(
                        "`connections[{i}].subnet` is `{}`, which overlaps `{}` of `connections[{k}]`: give each connection its own subnet",
                        net.value, other.value
                    ),
                );
            }
        }

        for p in &self.prereqs {
            if !self.slug.is_empty() && p.value == self.slug.value {
                push(p.pos, format!("`prereqs` lists `{}`, this lesson itself: remove it", p.value));
            }
        }
        out
    }

    /// Checks the lesson directory: every endpoint with a `configurationType` has its file in
    /// `stage<i>/configs/` of every stage (python `<endpoint>.py`, ansible `<endpoint>.yml`,
    /// napalm `<endpoint>-<driver>.txt`). Guides (`stage<i>/guide.md`) are not checked.
    pub fn check_files(&self, dir: &Path) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for ep in &self.endpoints {
            let Some(kind) = &ep.configuration_type else { continue };
            for stage in 0..self.stages.len() {
                let configs = dir.join(format!("stage{stage}")).join("configs");
                if let Some(missing) = missing_config(&configs, &ep.name, kind.value) {
                    out.push(Diagnostic {
                        pos: kind.pos,
                        message: format!(
                            "endpoint `{}` has `configurationType: {}` but stage{stage}/configs/{missing} is missing: \
                             add the file, or remove `configurationType`",
                            ep.name.value, kind.value
                        ),
                    });
                }
            }
        }
        out
    }
}

/// Whether two networks share an address: one of them holds the other's network address.
fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// The file an endpoint's configuration needs in `configs` and lacks, as a name to show.
fn missing_config(configs: &Path, endpoint: &str, kind: ConfigurationType) -> Option<String> {
    let wanted = match kind {
        ConfigurationType::Python => format!("{endpoint}.py"),
        ConfigurationType::Ansible => format!("{endpoint}.yml"),
        ConfigurationType::Napalm => {
            return napalm_driver(configs, endpoint)
                .is_none()
                .then(|| format!("{endpoint}-<driver>.txt (driver one of {})", NAPALM_DRIVERS.join(", ")));
        }
    };
    (!configs.join(&wanted).is_file()).then_some(wanted)
}

/// The NAPALM driver that the endpoint's file in `configs` names (`vqfx1-junos.txt` → `junos`).
pub fn napalm_driver(configs: &Path, endpoint: &str) -> Option<String> {
    let mut drivers: Vec<String> = std::fs::read_dir(configs)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.path().is_file())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let driver = name.strip_prefix(endpoint)?.strip_prefix('-')?.strip_suffix(".txt")?;
            NAPALM_DRIVERS.contains(&driver).then(|| driver.to_string())
        })
        .collect();
    drivers.sort();
    drivers.into_iter().next()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A valid lesson; every broken case below is this text with one edit. Line numbers:
    /// 12 endpoint r1, 19 endpoint r2, 23 the connection, 27 the stage.
    const BASE: &str = "\
name: Broken Lessons
slug: broken-lessons
category: fundamentals
tier: local
description: A lesson for tests.
shortDescription: Tests
readyDelay: 5
authors:
- name: Vial
  link: https://example.com
endpoints:
- name: r1
  image: utility
  configurationType: python
  presentations:
  - name: cli
    port: 22
    type: ssh
- name: r2
  image: utility
  additionalPorts: [830]
connections:
- a: r1
  b: r2
  subnet: 198.18.0.0/24
stages:
- description: One
  guideType: markdown
  stageVideo: https://example.com/v
";

    const R2: &str = "- name: r2\n  image: utility\n  additionalPorts: [830]\n";

    /// (what breaks, replace this, with this, expected line:column, fragment of the message)
    const BROKEN: &[(&str, &str, &str, &str, &str)] = &[
        ("unknown top-level field", "tier: local\n", "tier: local\nteir: prod\n", "5:1", "unknown field `teir`: did you mean `tier`?"),
        ("missing name", "name: Broken Lessons\n", "", "1:1", "required field `name` is missing: add `name: "),
        ("empty required value", "shortDescription: Tests", "shortDescription:", "6:1", "required field `shortDescription` is empty"),
        ("bad slug", "slug: broken-lessons", "slug: Broken_Lessons", "2:7", "`slug` is `Broken_Lessons`, not a slug: use lowercase letters and digits joined by single hyphens, e.g. `broken-lessons`"),
        ("bad category", "category: fundamentals", "category: basics", "3:11", "`category` has unknown value `basics`: use one of fundamentals, tools, workflows"),
        ("bad tier", "tier: local", "tier: staging", "4:7", "`tier` has unknown value `staging`: use one of local, ptr, prod"),
        ("quoted readyDelay", "readyDelay: 5", "readyDelay: \"5\"", "7:13", "`readyDelay` must be a whole number from 0 to 3600, found `5` (write it unquoted)"),
        ("author without name", "- name: Vial\n  link:", "- link:", "9:3", "required field `authors[0].name` is missing"),
        ("author link not a URL", "link: https://example.com", "link: example.com", "10:9", "`authors[0].link` is `example.com`, not a URL"),
        ("duplicate endpoint name", R2, "- name: r2\n  image: utility\n  additionalPorts: [830]\n- name: r2\n  image: utility\n  additionalPorts: [22]\n", "22:9", "`endpoints[2].name` is `r2`, already the name of the endpoint at line 19"),
        ("endpoint name not a host name", R2, "- name: r2\n  image: utility\n  additionalPorts: [830]\n- name: R_3\n  image: utility\n  additionalPorts: [22]\n", "22:9", "`endpoints[2].name` is `R_3`, not a valid endpoint name"),
        ("duplicate presentation name", "    type: ssh\n", "    type: ssh\n  - name: cli\n    port: 80\n    type: http\n", "19:11", "`endpoints[0].presentations[1].name` is `cli`, already a presentation of endpoint `r1`"),
        ("connection to an unknown endpoint", "  b: r2", "  b: r3", "24:6", "`connections[0].b` is `r3`, which is not an endpoint of this lesson: use one of r1, r2"),
        ("connection of an endpoint to itself", "  b: r2", "  b: r1", "24:6", "`connections[0]` connects endpoint `r1` to itself"),
        ("endpoint with no way in", "  additionalPorts: [830]\n", "", "19:3", "endpoint `r2` (`endpoints[1]`) has neither `presentations` nor `additionalPorts`"),
        ("subnet not CIDR", "198.18.0.0/24", "198.18.0.0/33", "25:11", "`connections[0].subnet` is `198.18.0.0/33`, not a subnet in CIDR form"),
        ("subnet with host bits", "198.18.0.0/24", "198.18.0.1/24", "25:11", "has host bits set: write the network address `198.18.0.0/24`"),
        ("overlapping subnets", "  subnet: 198.18.0.0/24\n", "  subnet: 198.18.0.0/24\n- a: r2\n  b: r1\n  subnet: 198.18.0.128/25\n", "28:11", "`connections[1].subnet` is `198.18.0.128/25`, which overlaps `198.18.0.0/24` of `connections[0]`"),
        ("port out of range", "port: 22", "port: 70000", "17:11", "`endpoints[0].presentations[0].port` is 70000, out of range"),
        ("bad presentation type", "type: ssh", "type: telnet", "18:11", "`endpoints[0].presentations[0].type` has unknown value `telnet`: use one of ssh, http"),
        ("Syringe-era configurationType", "configurationType: python", "configurationType: napalm-junos", "14:22", "`napalm-<driver>` is the Syringe-era form: write `napalm` and name each stage's file `<endpoint>-junos.txt`"),
        ("bad configurationType", "configurationType: python", "configurationType: bash", "14:22", "use one of python, ansible, napalm"),
        ("bad guideType", "guideType: markdown", "guideType: html", "28:14", "`stages[0].guideType` has unknown value `html`: use one of markdown, jupyter"),
        ("Syringe-era stage id", "- description: One", "- id: 1\n  description: One", "27:3", "unknown field `stages[0].id`: Syringe-era stage number"),
        ("image reference instead of slug", "  image: utility\n  configurationType", "  image: antidotelabs/utility\n  configurationType", "13:10", "name the image's slug, e.g. `utility`"),
        ("tags not a list", "readyDelay: 5\n", "readyDelay: 5\ntags: linux\n", "8:7", "`tags` must be a list of strings, found `linux`"),
        ("numeric prereq", "readyDelay: 5\n", "readyDelay: 5\nprereqs: [23]\n", "8:11", "`prereqs[0]` is `23`, a Syringe-era lesson id: use the lesson's slug"),
        ("numeric collection", "readyDelay: 5\n", "readyDelay: 5\ncollection: 7\n", "8:13", "a Syringe-era collection id: use the collection's slug"),
        ("duplicate key", "tier: local\n", "tier: local\ntier: prod\n", "5:1", "YAML syntax error: duplicated key in mapping"),
        ("missing stages", "stages:\n- description: One\n  guideType: markdown\n  stageVideo: https://example.com/v\n", "", "1:1", "required field `stages` is missing"),
        ("Syringe-era file", "name: Broken Lessons", "lessonName: Broken Lessons", "1:1", "this is a Syringe-era lesson (`lessonName`/`lessonId`, antidote before v0.6), not the current format: run `vialctl lesson convert DIR`"),
        ("unknown endpoint field", "  additionalPorts: [830]\n", "  additionalPorts: [830]\n  flavor: trusted\n", "22:3", "unknown field `endpoints[1].flavor`: remove it (known fields: additionalPorts, configurationType, image, name, presentations)"),
    ];

    #[test]
    fn the_base_lesson_is_valid() {
        let lesson = Lesson::parse(BASE).unwrap();
        assert_eq!(lesson.endpoints.len(), 2);
        assert_eq!(lesson.connections[0].subnet.as_ref().unwrap().to_string(), "198.18.0.0/24");
    }

    #[test]
    fn each_broken_lesson_yields_its_message_at_its_place() {
        assert!(BROKEN.len() >= 20);
        let mut failures = Vec::new();
        for (what, from, to, at, fragment) in BROKEN {
            assert!(BASE.contains(from), "{what}: the base lacks {from:?}");
            let text = BASE.replacen(from, to, 1);
            let problems = match Lesson::parse(&text) {
                Ok(_) => vec![],
                Err(problems) => problems,
            };
            let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
            let hit =
                problems.len() == 1 && problems[0].pos.to_string() == *at && problems[0].message.contains(fragment);
            if !hit {
                failures.push(format!("{what}: expected one problem `{at}: ...{fragment}...`, got {shown:#?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text =
            BASE.replace("tier: local", "tier: staging").replace("  b: r2", "  b: r9").replace("port: 22", "port: 0");
        let problems = Lesson::parse(&text).unwrap_err();
        let places: Vec<String> = problems.iter().map(|p| p.pos.to_string()).collect();
        assert_eq!(places, vec!["4:7", "17:11", "24:6"], "{problems:#?}");
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vial-lesson-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("stage0/configs")).unwrap();
        dir
    }

    #[test]
    fn file_checks_find_each_kind_of_config_file() {
        let text =
            BASE.replace("  additionalPorts: [830]\n", "  configurationType: napalm\n  additionalPorts: [830]\n");
        let lesson = Lesson::parse(&text).unwrap();
        let dir = scratch_dir("files");
        let problems = lesson.check_files(&dir);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].message.contains("stage0/configs/r1.py is missing"), "{}", problems[0]);
        assert_eq!(problems[0].pos.to_string(), "14:22");
        assert!(problems[1].message.contains("stage0/configs/r2-<driver>.txt"), "{}", problems[1]);

        std::fs::write(dir.join("stage0/configs/r1.py"), "").unwrap();
        std::fs::write(dir.join("stage0/configs/r2-bogus.txt"), "").unwrap();
        assert_eq!(lesson.check_files(&dir).len(), 1, "an unknown driver does not count");
        std::fs::write(dir.join("stage0/configs/r2-eos.txt"), "").unwrap();
        assert!(lesson.check_files(&dir).is_empty());
        assert_eq!(napalm_driver(&dir.join("stage0/configs"), "r2").as_deref(), Some("eos"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ansible_wants_a_yml_file() {
        let text = BASE.replace("configurationType: python", "configurationType: ansible");
        let lesson = Lesson::parse(&text).unwrap();
        let dir = scratch_dir("ansible");
        assert!(lesson.check_files(&dir)[0].message.contains("stage0/configs/r1.yml is missing"));
        std::fs::write(dir.join("stage0/configs/r1.yml"), "").unwrap();
        assert!(lesson.check_files(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
