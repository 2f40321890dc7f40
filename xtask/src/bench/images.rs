//! `cargo xtask bench images`, the last section of `cargo xtask bench`: what the endpoint
//! images cost to build and to start, as figures and as ratios against a baseline measured in
//! the same run. It prints figures and asserts nothing.
//!
//! - build time of `linux` and `frr`: cold, then cached. Cold is [`image::build`] with the
//!   image's tag removed, `rebuild` (this command's caches: base image, root filesystem, first
//!   boot) and `no_cache` (Docker's layer cache); cached is the same build again right after,
//!   with every cache in place. The baseline is the cold build. Both include what every build
//!   runs (the package check, cargo's no-op build of the static `vial`, the smoke check);
//! - container start to ready: `docker run -d` of the image to the first 200 on `GET /ready`,
//!   for a cold boot (`VIAL_SNAPSHOT=off`, the baseline) and for a start from the RAM snapshot
//!   the image ships (no setting: vial restores it by default), alternating over the rounds,
//!   then `docker stop`. An image without a snapshot (a profile without `[snapshot]`) gets
//!   the boot alone, a figure without a ratio.
//!
//! Readiness is read from the host without `docker exec` or any traffic to the container: the
//! container's `/run/vial` is a bind-mounted temporary directory, so vial's health socket
//! (`health.sock`, HTTP/1.0, see `vial::health`) appears on the host and the bench asks it
//! with vial's own client every [`POLL`]. The engine must therefore be local (it is the one
//! [`docker::ensure_dockerd`] finds or starts), and the containers run under TCG like every
//! test and bench (DEVELOPERS.md).
//!
//! Each container sits alone on a user-defined network in 198.18.X.0/24 (RFC 2544's
//! benchmarking range, never routed; never Docker's default bridge), with an empty lesson
//! directory at `/antidote`. The network, every container and the temporary directory are
//! guards removed on drop, so every path out of this module, errors included, removes them; a
//! first Ctrl-C while containers run is turned into such an error, a second one ends xtask at
//! once.
//!
//! A cold build removes the image's tag and replaces `vial/base:bookworm`, so do not run this
//! section while image tests run on the same engine; it removes the base it replaced when
//! nothing uses it any more.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use testkit::docker::{Container, Network, Reach};
use testkit::stats::{median_by, secs_since as secs};
use testkit::TempDir;

use crate::docker;
use crate::image;

/// The images of the section, in the order they are measured.
const PROFILES: [&str; 2] = ["linux", "frr"];
/// Rounds of the start measurement; figures are medians.
const ROUNDS: usize = 3;
/// How often the health socket is asked while a container starts.
const POLL: Duration = Duration::from_millis(50);
/// How long a container may take to become ready: a cold `frr` boot under TCG on a loaded
/// two-core machine takes minutes.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one question to the health socket may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the container's state is read while it starts, to stop waiting for one that
/// exited (a `docker inspect` costs tens of milliseconds of CPU, so not at every poll).
const STATE_EVERY: Duration = Duration::from_secs(1);
/// The target for a start from the snapshot, in seconds.
const TARGET_SNAPSHOT_S: f64 = 2.0;
/// Third octets of the bench's network: 198.18.0.0/24 is `cargo xtask demo`'s and the image
/// tests take 40 to 239, so the bench keeps out of their way (and steps over whatever is taken).
const SUBNET_OCTETS: std::ops::RangeInclusive<u8> = 240..=254;
/// Lines of `docker logs` shown when a container fails.
const LOG_LINES: usize = 40;

/// The command: `[profile]` limits both parts to one image (not in the help; for checking the
/// section without the slow `frr` builds).
pub(crate) fn run(args: &[&str]) -> Result<()> {
    let profiles: Vec<&str> = match args {
        [] => PROFILES.to_vec(),
        [profile] if PROFILES.contains(profile) => vec![*profile],
        _ => bail!(
            "unknown arguments `cargo xtask bench images {}`; it takes one of {PROFILES:?} or nothing",
            args.join(" ")
        ),
    };
    if !nix::unistd::geteuid().is_root() {
        bail!("the image bench needs root (debootstrap, a local dockerd, bind mounts): run `cargo xtask bench images` as root");
    }
    docker::ensure_dockerd()?;

    println!("\nimages: build time, cold (no caches: this command's nor Docker's) and cached (the same build again)");
    let mut builds = Vec::new();
    let mut replaced_bases = Vec::new();
    for profile in &profiles {
        let (times, replaced) = measure_build(profile).with_context(|| format!("image bench, building {profile}"))?;
        println!("{profile}: cold {:.1} s, cached {:.1} s", times.cold, times.cached);
        builds.push((*profile, times));
        replaced_bases.extend(replaced);
    }
    remove_replaced_bases(&replaced_bases);

    println!("\nimages: container start to ready (first 200 on GET /ready), TCG, {ROUNDS} rounds");
    let interrupted = Arc::new(AtomicBool::new(false));
    let signals = Signals::catch(&interrupted)?;
    let mut starts = Vec::new();
    for profile in &profiles {
        let figures =
            measure_starts(profile, &interrupted).with_context(|| format!("image bench, starting {profile}"))?;
        starts.push((*profile, figures));
    }
    drop(signals);

    println!("\nimage build (one cold and one cached build each):");
    for (profile, times) in &builds {
        println!(
            "  {profile:<6} cold {:7.1} s, cached {:6.1} s: cached/cold {:.3}",
            times.cold,
            times.cached,
            times.cached / times.cold
        );
    }
    println!("\ncontainer start to ready, medians of {ROUNDS} rounds (TCG):");
    for (profile, figures) in &starts {
        summarize_starts(profile, figures);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Build time.
// ---------------------------------------------------------------------------------------------

/// Seconds of one cold and one cached build.
struct BuildTimes {
    cold: f64,
    cached: f64,
}

/// Builds `profile` cold, then cached; returns the times and the id of the base image the
/// cold build replaced, if it did.
fn measure_build(profile: &str) -> Result<(BuildTimes, Option<String>)> {
    let tag = format!("vial/{profile}:latest");
    remove_tag(&tag)?;
    let base_before = docker::inspect_image(image::base::IMAGE, "{{.Id}}");
    let cold_options = image::Options { profile: profile.into(), rebuild: true, no_cache: true, ..Default::default() };
    let started = Instant::now();
    image::build(&cold_options).context("the cold build")?;
    let cold = secs(started);
    let base_after = docker::inspect_image(image::base::IMAGE, "{{.Id}}");
    let replaced = base_before.filter(|before| Some(before) != base_after.as_ref());

    let cached_options = image::Options { profile: profile.into(), ..Default::default() };
    let started = Instant::now();
    image::build(&cached_options).context("the cached build")?;
    let cached = secs(started);
    Ok((BuildTimes { cold, cached }, replaced))
}

/// Removes the tag `tag` (and the image, when nothing else holds it), so the cold build
/// cannot stop at an existing image. A tag held by a container stays: with `--no-cache` the
/// build is cold all the same, so that is worth a note, not a failure.
fn remove_tag(tag: &str) -> Result<()> {
    let output = testkit::docker::output(&["image", "rm", tag])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && !stderr.contains("No such image") {
        println!(
            "images: could not remove {tag} before its cold build ({}); building it with --no-cache anyway",
            stderr.trim()
        );
    }
    Ok(())
}

/// The cold builds re-import `vial/base:bookworm`; the bases they replaced are untagged and
/// left behind by Docker. Removed here when no image or container uses them any more (Docker
/// refuses otherwise, and then they stay).
fn remove_replaced_bases(ids: &[String]) {
    for id in ids {
        match testkit::docker::output(&["image", "rm", id]) {
            Ok(output) if output.status.success() => println!("images: removed the replaced base image {id}"),
            Ok(output) => println!(
                "images: kept the replaced base image {id} ({})",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(err) => println!("images: kept the replaced base image {id} ({err:#})"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Start to ready.
// ---------------------------------------------------------------------------------------------

/// How a container is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `VIAL_SNAPSHOT=off`: a full boot although the image ships a snapshot. The baseline.
    Cold,
    /// No setting: vial restores the image's RAM snapshot.
    Snapshot,
    /// No setting, for an image that ships no snapshot: a full boot.
    Boot,
}

impl Start {
    fn name(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Snapshot => "snapshot",
            Start::Boot => "boot",
        }
    }

    /// The `docker run` arguments that select this start.
    fn args(self) -> &'static [&'static str] {
        match self {
            Start::Cold => &["-e", "VIAL_SNAPSHOT=off"],
            Start::Snapshot | Start::Boot => &[],
        }
    }
}

/// The starts measured for a profile, baseline first: cold against snapshot when its image
/// ships a snapshot (its profile has `[snapshot]`), else the boot alone.
fn starts_of(has_snapshot: bool) -> &'static [Start] {
    if has_snapshot {
        &[Start::Cold, Start::Snapshot]
    } else {
        &[Start::Boot]
    }
}

/// One container's start and stop.
struct StartFigures {
    start: Start,
    /// `docker run -d` to the first 200 on `/ready`, in seconds.
    ready: f64,
    /// `docker stop`, in seconds.
    stop: f64,
    /// The container's exit code after the stop (0: the guest powered off within the grace).
    exit_code: String,
    /// The `boot` field of `/status` once ready, when vial reports one.
    boot: Option<String>,
}

/// Starts and stops `profile`'s image [`ROUNDS`] times per start kind, alternating the kinds
/// within each round so drift over the run spreads over all of them.
fn measure_starts(profile: &str, interrupted: &AtomicBool) -> Result<Vec<StartFigures>> {
    let tag = format!("vial/{profile}:latest");
    if docker::inspect_image(&tag, "{{.Id}}").is_none() {
        bail!("there is no image {tag}: build it with `cargo xtask image {profile}`");
    }
    // Under the system's temporary directory: the health socket's path must fit in a
    // `sockaddr_un`.
    let scratch = TempDir::new(&std::env::temp_dir(), &format!("vialbench-{profile}"))
        .context("creating the bench's scratch directory")?;
    let lesson = scratch.path().join("lesson");
    std::fs::create_dir_all(&lesson).with_context(|| format!("creating {}", lesson.display()))?;
    let network = Network::create("vialbench-images", SUBNET_OCTETS, Reach::Host)?;
    println!(
        "{profile}: containers on network {} ({}), run directories under {}",
        network.name(),
        network.subnet(),
        scratch.path().display()
    );
    let has_snapshot = crate::image::load_profile(profile)?.profile.snapshot.is_some();
    let mut figures = Vec::new();
    for round in 1..=ROUNDS {
        for &start in starts_of(has_snapshot) {
            let run_dir = scratch.path().join(format!("run-{}-{round}", start.name()));
            let measured = measure_start(&tag, start, &network, &lesson, &run_dir, interrupted)
                .with_context(|| format!("round {round}, {} start", start.name()))?;
            println!(
                "round {round}: {profile} {:<8} ready {:6.1} s | docker stop {:4.1} s, exit {} | boot: {}",
                start.name(),
                measured.ready,
                measured.stop,
                measured.exit_code,
                measured.boot.as_deref().unwrap_or("(no `boot` in /status)")
            );
            figures.push(measured);
        }
    }
    Ok(figures)
}

/// One container: `docker run -d`, wait for `/ready`, read `/status`, `docker stop`.
fn measure_start(
    image: &str,
    start: Start,
    network: &Network,
    lesson: &Path,
    run_dir: &Path,
    interrupted: &AtomicBool,
) -> Result<StartFigures> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let started = Instant::now();
    let container = run_container(image, network, lesson, run_dir, start.args())?;
    let socket = run_dir.join(vial::rundir::HEALTH);
    let ready = wait_ready(&container, &socket, started, interrupted)?;
    let boot = boot_field(&socket);

    let stopping = Instant::now();
    testkit::docker::stdout(&["stop", container.name()])?;
    let stop = secs(stopping);
    let exit_code = container.inspect("{{.State.ExitCode}}")?;
    Ok(StartFigures { start, ready, stop, exit_code, boot })
}

/// Asks `/ready` every [`POLL`] until it answers 200; returns the seconds since `started`.
/// Stops waiting when the container exits, at [`READY_TIMEOUT`], or on Ctrl-C.
fn wait_ready(container: &Container, socket: &Path, started: Instant, interrupted: &AtomicBool) -> Result<f64> {
    let mut last = String::from("the health socket does not exist yet");
    let mut state_read = Instant::now();
    loop {
        match vial::health::query(socket, "/ready", QUERY_TIMEOUT) {
            Ok((200, _)) => return Ok(secs(started)),
            Ok((code, body)) => last = format!("/ready answered {code}: {}", body.trim()),
            // Before vial binds it the socket is missing: that is the wait, not news.
            Err(err) if socket.exists() => last = err.to_string(),
            Err(_) => {}
        }
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted (Ctrl-C) while waiting for {} to become ready", container.name());
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "{} not ready after {READY_TIMEOUT:?} (last: {last}); the end of its log:\n{}",
                container.name(),
                container.logs(Some(LOG_LINES))
            );
        }
        if state_read.elapsed() >= STATE_EVERY {
            state_read = Instant::now();
            let state = container.inspect("{{.State.Status}} {{.State.ExitCode}}")?;
            if state.starts_with("exited") || state.starts_with("dead") {
                bail!(
                    "{} stopped before it was ready ({state}; last: {last}); the end of its log:\n{}",
                    container.name(),
                    container.logs(Some(LOG_LINES))
                );
            }
        }
        std::thread::sleep(POLL);
    }
}

/// The `boot` field of `/status` (how vial started the VM: a full boot or a restored
/// snapshot), as text; `None` when vial does not report it.
fn boot_field(socket: &Path) -> Option<String> {
    let (code, body) = vial::health::query(socket, "/status", QUERY_TIMEOUT).ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
    match status.get("boot")? {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// Prints the medians of one profile's starts and, when it has both, snapshot/cold.
fn summarize_starts(profile: &str, figures: &[StartFigures]) {
    let of = |start: Start| -> Vec<&StartFigures> { figures.iter().filter(|f| f.start == start).collect() };
    let med = |rows: &[&StartFigures], value: fn(&StartFigures) -> f64| median_by(rows, |f| value(f));
    let codes = |rows: &[&StartFigures]| rows.iter().map(|f| f.exit_code.as_str()).collect::<Vec<_>>().join(", ");
    let (cold, snapshot, boot) = (of(Start::Cold), of(Start::Snapshot), of(Start::Boot));
    if !cold.is_empty() && !snapshot.is_empty() {
        let (cold_ready, snapshot_ready) = (med(&cold, |f| f.ready), med(&snapshot, |f| f.ready));
        println!(
            "  {profile:<6} cold {cold_ready:.1} s, snapshot {snapshot_ready:.1} s: snapshot/cold {:.3} \
             (target: snapshot start under {TARGET_SNAPSHOT_S} s under TCG)",
            snapshot_ready / cold_ready
        );
        println!(
            "         docker stop: cold {:.1} s (exit codes {}), snapshot {:.1} s (exit codes {})",
            med(&cold, |f| f.stop),
            codes(&cold),
            med(&snapshot, |f| f.stop),
            codes(&snapshot)
        );
    }
    if !boot.is_empty() {
        println!(
            "  {profile:<6} boot {:.1} s (the image ships no snapshot: no ratio); docker stop {:.1} s (exit codes {})",
            med(&boot, |f| f.ready),
            med(&boot, |f| f.stop),
            codes(&boot)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// What the section creates, each removed on drop.
// ---------------------------------------------------------------------------------------------

/// `docker run -d` of `image` on `network`, with the lesson directory at `/antidote`
/// (read-only) and `run_dir` at `/run/vial`, under TCG, plus `extra` arguments.
fn run_container(image: &str, network: &Network, lesson: &Path, run_dir: &Path, extra: &[&str]) -> Result<Container> {
    let run_mount = format!("{}:/run/vial", run_dir.display());
    let container = Container::run("vialbench", network, |name| {
        let mut own = vec!["-e", "VIAL_ACCEL=tcg", "-v", &run_mount];
        own.extend_from_slice(extra);
        vial::contract::DockerRun { name, image, network: network.name(), lesson, extra: &own }.args()
    });
    container.with_context(|| format!("starting a container of {image}"))
}

/// While containers run, a first Ctrl-C only sets a flag, so the wait ends with an error and
/// the guards remove what the bench made; a second one ends xtask at once. Restored on drop.
struct Signals {
    ids: Vec<signal_hook::SigId>,
}

impl Signals {
    fn catch(flag: &Arc<AtomicBool>) -> Result<Signals> {
        use signal_hook::consts::SIGINT;
        // In this order: the shutdown hook sees the flag as it was before this Ctrl-C.
        let second =
            signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone()).context("catching Ctrl-C")?;
        let first = signal_hook::flag::register(SIGINT, flag.clone()).context("catching Ctrl-C")?;
        Ok(Signals { ids: vec![second, first] })
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_has_its_starts_baseline_first() {
        assert_eq!(starts_of(true), &[Start::Cold, Start::Snapshot]);
        assert_eq!(starts_of(false), &[Start::Boot]);
        // Only the cold start of an image with a snapshot asks vial to skip it.
        assert_eq!(Start::Cold.args(), &["-e", "VIAL_SNAPSHOT=off"]);
        assert!(Start::Snapshot.args().is_empty() && Start::Boot.args().is_empty());
    }

    #[test]
    fn bad_arguments_fail_before_any_work() {
        let err = run(&["cumulus"]).unwrap_err();
        assert!(err.to_string().contains("\"linux\", \"frr\""), "{err}");
        assert!(run(&["linux", "frr"]).is_err());
    }
}
