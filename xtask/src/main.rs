//! Build automation for vial, in the style of rust-analyzer's xtask: plain Rust instead of
//! shell scripts or a Makefile, so it runs wherever cargo runs and errors can say what to do.
//!
//! Run it as `cargo xtask <command>` (the alias lives in `.cargo/config.toml`). Each command
//! lives in its own module and exposes a `run()` so commands can build on each other.

mod bench;
mod demo;
mod dist;
mod docker;
mod guest;
mod image;
mod lint;
mod setup;
mod test;

use std::{
    env,
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};

const HELP: &str = "\
Usage: cargo xtask <command>

Commands:
  dist    build a fully static vial into target/dist/vial
          (cargo build --release --target x86_64-unknown-linux-musl -p vial --bin vial)
  guest   build the `linux` test guest (vmlinuz + initrd.img) into target/guest/linux
          from the host's Debian packages; cached, a no-op when nothing changed
  bench   what vial costs, as ratios against baselines measured in the same run; every
          section in turn, or one: `cargo xtask bench [vm|net|images|lesson]`
            vm      supervisor overhead and time to ready, against QEMU launched directly
            net     the data plane of each plumbing mode, against a plain veth pair (root)
            images  image build time, cold against cached, and container start to ready,
                    cold boot against the RAM snapshot (linux, frr; slow: builds from scratch)
            lesson  vialctl up of the example lesson against its slowest endpoint alone, and
                    the wiring of 20 containers with 40 links
  demo    set up, build the images and bring up the example lesson (two frr routers and a
          utility container, OSPF) with vialctl; Ctrl-C takes it down
          (`demo endpoint`: one endpoint alone in a sandbox; --exit-when-ready: stop once ready)
  image   build the endpoint image of a profile (linux, frr, cumulus, vqfx) offline,
          first boot included: `cargo xtask image <profile> [--tag T] [--push]`; or a
          plain-container image (utility, configurator); --help
  lint    shellcheck over every shell script, then cargo clippy --workspace --all-targets
          -- -D warnings
  setup   install the Debian packages building and testing need (as root)
  test    setup, dist, guest, then every test of the workspace (what CI runs);
          arguments after `--` go to `cargo test`
  help    print this message
";

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Printed by hand instead of returning the error from `main`: that prints its
            // Debug form, which appends a backtrace whenever RUST_BACKTRACE is set and buries
            // the message that says what to fix.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    // Hand-rolled on purpose: a handful of commands with few options do not justify an
    // argument parser dependency that every `cargo xtask` run would have to compile.
    let args: Vec<String> = env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["dist"] => {
            dist::run()?;
        }
        ["guest"] => {
            guest::run()?;
        }
        ["bench"] => {
            bench::vm::run()?;
            bench::net::run()?;
            bench::images::run(&[])?;
            bench::lesson::run()?;
        }
        ["bench", "vm"] => bench::vm::run()?,
        ["bench", "lesson"] => bench::lesson::run()?,
        // The packages it drives (iperf3, ethtool); `bench vm` installs them when run first.
        ["bench", "net"] => {
            setup::run()?;
            bench::net::run()?;
        }
        // Not in the help: `bench images <profile>` limits the section to one profile.
        ["bench", "images", rest @ ..] => bench::images::run(rest)?,
        ["demo", rest @ ..] => demo::run(rest)?,
        ["image", rest @ ..] => image::run(rest)?,
        ["lint"] => lint::run()?,
        ["setup"] => setup::run()?,
        ["test", rest @ ..] => test::run(rest.strip_prefix(&["--"]).unwrap_or(rest))?,
        [] | ["help" | "-h" | "--help"] => print!("{HELP}"),
        _ => bail!("unknown arguments `cargo xtask {}`\n\n{HELP}", args.join(" ")),
    }
    Ok(())
}

/// The workspace root. xtask is always built from `<root>/xtask`, so the compile-time
/// manifest dir is reliable no matter which directory `cargo xtask` is run from.
pub(crate) fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask's manifest dir has a parent").to_path_buf()
}

/// Where cargo puts build artifacts: `CARGO_TARGET_DIR` if set (relative to the workspace
/// root, as cargo does when run from there), else `<root>/target`.
pub(crate) fn cargo_target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => project_root().join(dir),
        _ => project_root().join("target"),
    }
}

/// Runs `program args...` with inherited stdio in the workspace root and fails with the
/// full command line if it cannot be started or exits unsuccessfully.
pub(crate) fn run_cmd<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> Result<()> {
    let mut cmd = Command::new(program.as_ref());
    cmd.args(args).current_dir(project_root());
    let status = cmd.status().with_context(|| format!("could not start `{}`", display_cmd(&cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display_cmd(&cmd));
    }
    Ok(())
}

pub(crate) fn display_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
