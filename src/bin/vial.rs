//! `vial`: PID 1 of a VM endpoint container. Parses the command line, loads the
//! configuration, runs the supervisor (or a probe) and maps the outcome to an exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vial::config::{Config, Flags, Overrides};
use vial::exit::{Outcome, SetupError};
use vial::health::{self, Check};

/// Run a virtual network appliance as a container: QEMU supervised by PID 1.
#[derive(Parser)]
#[command(name = "vial", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Start the VM and supervise it (the default).
    Run(RunArgs),
    /// Probe the running supervisor: exit 0 when ready (Docker HEALTHCHECK).
    Health(HealthArgs),
    /// Print the QEMU command line the current configuration yields, without starting it.
    Argv(RunArgs),
    /// Boot the guest once, wait until it is ready and save it as the profile's RAM snapshot
    /// (image build time; `vial run` then starts from it).
    Snapshot(RunArgs),
}

/// Settings; each also reads its `VIAL_*` variable, and a flag wins over it (the table is
/// `vial::config::SETTINGS`).
type RunArgs = Flags;

#[derive(Args)]
struct HealthArgs {
    /// Exit 0 while the supervisor answers at all.
    #[arg(long, conflicts_with_all = ["ready", "status"])]
    live: bool,
    /// Exit 0 when the guest is ready (the default).
    #[arg(long)]
    ready: bool,
    /// Print the JSON status; exit 0 when ready.
    #[arg(long, conflicts_with = "ready")]
    status: bool,
    /// Socket directory [env: VIAL_RUN_DIR; default /run/vial].
    #[arg(long, env = "VIAL_RUN_DIR", default_value = vial::rundir::DEFAULT)]
    run_dir: PathBuf,
    /// How long to wait for an answer.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

fn main() {
    let cli: Cli = vial::exit::parse_command_line();
    match cli.command {
        Some(Command::Health(args)) => {
            let check = if args.live {
                Check::Live
            } else if args.status {
                Check::Status
            } else {
                Check::Ready
            };
            let (code, text) = health::run_check(
                &args.run_dir.join(vial::rundir::HEALTH),
                check,
                Duration::from_secs(args.timeout_secs),
            );
            println!("{}", text.trim_end());
            std::process::exit(code);
        }
        Some(Command::Argv(args)) => std::process::exit(print_argv(args)),
        Some(Command::Snapshot(args)) => std::process::exit(snapshot(args)),
        Some(Command::Run(args)) => std::process::exit(run(args)),
        None => std::process::exit(run(cli.run)),
    }
}

fn load(args: RunArgs) -> Result<Config, i32> {
    vial::logging::init();
    let mut overrides = match Overrides::from_env(std::env::vars()) {
        Ok(overrides) => overrides,
        Err(problems) => {
            eprintln!("{}", vial::config::ConfigError(problems));
            return Err(Outcome::Config.code());
        }
    };
    overrides.set_flags(args);
    let hostname = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "vial".into());
    Config::load(&overrides, &hostname).map_err(|err| {
        eprintln!("{err}");
        Outcome::Config.code()
    })
}

fn run(args: RunArgs) -> i32 {
    if let Err(err) = vial::reaper::become_subreaper() {
        eprintln!("cannot become a child subreaper: {err}");
        return Outcome::SetupFailed.code();
    }
    let config = match load(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    tracing::info!(profile = %config.profile_path.display(), name = %config.name, pid = std::process::id(), "vial starting");
    match vial::limits::raise_fd_limit() {
        Ok((before, after)) if before != after => tracing::info!(before, after, "raised the open-file limit"),
        Ok(_) => {}
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
    vial::supervisor::run(config).code()
}

/// Prints a setup failure's whole cause chain once and returns its exit code.
fn failed(err: SetupError) -> i32 {
    eprintln!("{}", vial::logging::error_chain(&err));
    err.outcome().code()
}

fn print_argv(args: RunArgs) -> i32 {
    let config = match load(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match vial::supervisor::dry_run_argv(&config) {
        Ok(argv) => {
            let words: Vec<String> = argv.iter().map(|a| a.to_string_lossy().to_string()).collect();
            println!("{}", words.join(" "));
            0
        }
        Err(err) => failed(err),
    }
}

fn snapshot(args: RunArgs) -> i32 {
    let config = match load(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let dir = config.profile.snapshot.as_ref().map(|s| s.dir.display().to_string()).unwrap_or_default();
    match vial::vm::snapshot::save::run(config) {
        Ok(manifest) => {
            println!(
                "snapshot saved in {dir}: {} MiB of guest state, QEMU {}",
                manifest.vmstate_bytes >> 20,
                manifest.qemu
            );
            0
        }
        Err(err) => failed(err.into()),
    }
}
