//! `cargo xtask bench lesson`: what bringing a whole lesson up costs, as ratios in one run.
//!
//! - The example lesson (`examples/lessons/ospf-basics`) up to ready (`vialctl up
//!   --no-config`) against the slowest of its endpoints brought up alone (a one-endpoint
//!   lesson of the same image and presentations); target ratio 1.1 or less. The endpoints
//!   start from their images' RAM snapshots, so the whole lesson should be ready in under 5 s
//!   on a 2-core TCG machine. The full `up` (with the stage's OSPF configuration) is shown too.
//! - Wiring: 20 plain `utility` containers and 40 links (a ring and chords); `vialctl`'s own
//!   wiring time (every veth pair, then the slowest endpoint's moves) and `up` to ready;
//!   targets under 1 s and under 5 s.
//!
//! Rounds alternate between the variants so that a drift in the machine's load touches both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use testkit::stats::median;

/// Rounds of each measurement.
const ROUNDS: usize = 3;
/// The example lesson.
const EXAMPLE: &str = "examples/lessons/ospf-basics";

struct Vialctl {
    binary: PathBuf,
    state: PathBuf,
}

impl Vialctl {
    /// `vialctl up DIR --json ...`'s summary; the lesson is taken down again.
    fn up(&self, dir: &Path, slug: &str, extra: &[&str]) -> Result<serde_json::Value> {
        let _ = self.run(&["down", slug]);
        let mut args = vec!["up", dir.to_str().context("a UTF-8 path")?, "--json", "--mgmt-pool", "198.18.250.0/24"];
        args.extend_from_slice(extra);
        let output = self.run(&args)?;
        let down = self.run(&["down", slug])?;
        if !output.status.success() {
            bail!("vialctl up {} failed: {}", dir.display(), String::from_utf8_lossy(&output.stderr));
        }
        if !down.status.success() {
            bail!("vialctl down {slug} failed: {}", String::from_utf8_lossy(&down.stderr));
        }
        let summary = String::from_utf8_lossy(&output.stdout);
        let line = summary.lines().last().context("vialctl up printed no summary")?;
        serde_json::from_str(line).with_context(|| format!("vialctl up's summary: {line}"))
    }

    fn run(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(&self.binary)
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .env("VIALCTL_ACCEL", std::env::var("VIAL_ACCEL").unwrap_or_else(|_| "tcg".into()))
            .current_dir(crate::project_root())
            .stdin(Stdio::null())
            .output()
            .context("running vialctl")
    }
}

/// A one-endpoint lesson of `image` with an SSH presentation, named after `endpoint`.
fn alone(dir: &Path, endpoint: &str, image: &str) -> Result<(PathBuf, String)> {
    let slug = format!("bench-alone-{endpoint}");
    let lesson = dir.join(&slug);
    std::fs::create_dir_all(&lesson)?;
    std::fs::write(
        lesson.join("lesson.meta.yaml"),
        format!(
            "name: {endpoint} alone\nslug: {slug}\ncategory: fundamentals\ntier: local\ndescription: One endpoint.\n\
             shortDescription: Alone\nendpoints:\n- name: {endpoint}\n  image: {image}\n  presentations:\n  \
             - name: cli\n    port: 22\n    type: ssh\nstages:\n- description: One\n  guideType: markdown\n"
        ),
    )?;
    Ok((lesson, slug))
}

/// A lesson of `count` utility containers, each linked to the next (a ring) and to the one
/// five further on: `2 * count` links.
fn many(dir: &Path, count: usize) -> Result<(PathBuf, String)> {
    let slug = format!("bench-wiring-{count}");
    let lesson = dir.join(&slug);
    std::fs::create_dir_all(&lesson)?;
    let mut text = format!(
        "name: {count} containers\nslug: {slug}\ncategory: fundamentals\ntier: local\ndescription: Wiring.\n\
         shortDescription: Wiring\nendpoints:\n"
    );
    for i in 0..count {
        text.push_str(&format!("- name: c{i}\n  image: utility\n  additionalPorts: [22]\n"));
    }
    text.push_str("connections:\n");
    for i in 0..count {
        text.push_str(&format!("- a: c{i}\n  b: c{}\n", (i + 1) % count));
        text.push_str(&format!("- a: c{i}\n  b: c{}\n", (i + 5) % count));
    }
    text.push_str("stages:\n- description: One\n  guideType: markdown\n");
    std::fs::write(lesson.join("lesson.meta.yaml"), text)?;
    Ok((lesson, slug))
}

fn seconds(summary: &serde_json::Value, key: &str) -> Result<f64> {
    summary[key].as_f64().with_context(|| format!("no {key} in {summary}"))
}

pub(crate) fn run() -> Result<()> {
    crate::setup::run()?;
    crate::docker::ensure_dockerd()?;
    for image in ["frr", "utility", "configurator"] {
        crate::image::run(&[image])?;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::run_cmd(&cargo, &["build", "--quiet", "--release", "--bin", "vialctl"])?;
    let scratch = testkit::TempDir::new(&crate::project_root().join("target"), "bench-lesson")?;
    let vialctl =
        Vialctl { binary: crate::cargo_target_dir().join("release/vialctl"), state: scratch.path().join("state") };
    let example = crate::project_root().join(EXAMPLE);
    let singles = [("r1", "frr"), ("r2", "frr"), ("linux1", "utility")];

    println!("\nbench lesson: {EXAMPLE}, {ROUNDS} rounds (TCG unless VIAL_ACCEL says otherwise)");
    let (mut lesson_ready, mut lesson_full, mut slowest_alone) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let mut alone_times = Vec::new();
        for (endpoint, image) in singles {
            let (dir, slug) = alone(scratch.path(), endpoint, image)?;
            alone_times.push(seconds(&vialctl.up(&dir, &slug, &["--no-config"])?, "seconds")?);
        }
        let slowest = alone_times.iter().copied().fold(0.0, f64::max);
        let ready = seconds(&vialctl.up(&example, "ospf-basics", &["--no-config"])?, "seconds")?;
        let full = seconds(&vialctl.up(&example, "ospf-basics", &[])?, "seconds")?;
        println!(
            "  round {round}: alone {} -> slowest {slowest:.2} s; lesson ready {ready:.2} s; with its configuration {full:.2} s",
            alone_times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>().join(" / ")
        );
        slowest_alone.push(slowest);
        lesson_ready.push(ready);
        lesson_full.push(full);
    }
    let (ready, slowest, full) = (median(lesson_ready), median(slowest_alone), median(lesson_full));
    println!("  | measure | median | target |");
    println!("  |---|---|---|");
    println!("  | slowest endpoint alone, up to ready | {slowest:.2} s | |");
    println!("  | whole lesson, up to ready | {ready:.2} s | under 5 s |");
    println!("  | ratio lesson / slowest alone | {:.2} | 1.1 or less |", ready / slowest);
    println!("  | whole lesson with its stage configuration | {full:.2} s | |");

    let (dir, slug) = many(scratch.path(), 20)?;
    println!("\nbench lesson: 20 utility containers, 40 links, {ROUNDS} rounds");
    let (mut wiring, mut ready) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let summary = vialctl.up(&dir, &slug, &[])?;
        let (w, r) = (seconds(&summary, "wiring_seconds")?, seconds(&summary, "seconds")?);
        println!("  round {round}: wiring {w:.3} s, up to ready {r:.2} s");
        wiring.push(w);
        ready.push(r);
    }
    println!("  | measure | median | target |");
    println!("  |---|---|---|");
    println!("  | wiring (40 veth pairs made and moved) | {:.3} s | under 1 s |", median(wiring));
    println!("  | up to ready | {:.2} s | under 5 s |", median(ready));
    Ok(())
}
