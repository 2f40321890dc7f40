//! `vial`: PID 1 of a VM endpoint container. Parses the command line, loads the
//! configuration, runs the supervisor (or a probe) and maps the outcome to an exit code.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vial::config::{Config, Key, Overrides};
use vial::exit::Outcome;
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

/// Settings; each also reads its `VIAL_*` variable, and a flag wins over it.
#[derive(Args, Clone, Default)]
struct RunArgs {
    /// Profile file [env: VIAL_PROFILE; default /etc/vial/profile.toml].
    #[arg(long)]
    profile: Option<String>,
    /// auto, kvm or tcg [env: VIAL_ACCEL].
    #[arg(long)]
    accel: Option<String>,
    /// Guest memory, e.g. 2G [env: VIAL_MEMORY].
    #[arg(long)]
    memory: Option<String>,
    /// Virtual CPUs [env: VIAL_VCPUS].
    #[arg(long)]
    vcpus: Option<String>,
    /// Time the guest gets to power off, e.g. 8s [env: VIAL_STOP_TIMEOUT].
    #[arg(long)]
    stop_timeout: Option<String>,
    /// Let the guest connect out through the container: on or off [env: VIAL_EGRESS].
    #[arg(long)]
    egress: Option<String>,
    /// Lesson directory exported over 9p [env: VIAL_LESSON_DIR; default /antidote].
    #[arg(long)]
    lesson_dir: Option<String>,
    /// Socket directory [env: VIAL_RUN_DIR; default /run/vial].
    #[arg(long)]
    run_dir: Option<String>,
    /// Disk overlay directory [env: VIAL_STATE_DIR; default /var/lib/vial].
    #[arg(long)]
    state_dir: Option<String>,
    /// Management interface [env: VIAL_MGMT_IFACE; default eth0].
    #[arg(long)]
    mgmt_iface: Option<String>,
    /// Expected data links [env: VIAL_DATA_IFACES or CLAB_INTFS].
    #[arg(long)]
    data_ifaces: Option<String>,
    /// Data plane: tc, bridge or macvtap [env: VIAL_PLUMBING].
    #[arg(long)]
    plumbing: Option<String>,
    /// How long to wait for the data links, e.g. 120s [env: VIAL_LINK_TIMEOUT].
    #[arg(long)]
    link_timeout: Option<String>,
    /// QEMU binary [env: VIAL_QEMU].
    #[arg(long)]
    qemu: Option<String>,
    /// Extra QEMU arguments, space-separated [env: VIAL_QEMU_ARGS].
    #[arg(long, allow_hyphen_values = true)]
    qemu_args: Option<String>,
    /// Endpoint name, told to the guest [env: VIAL_NAME; default the hostname].
    #[arg(long)]
    name: Option<String>,
    /// Start from the image's RAM snapshot: auto, off, or a snapshot directory [env: VIAL_SNAPSHOT].
    #[arg(long)]
    snapshot: Option<String>,
}

impl RunArgs {
    fn apply(self, overrides: &mut Overrides) {
        let flags = [
            (Key::Profile, self.profile),
            (Key::Accel, self.accel),
            (Key::Memory, self.memory),
            (Key::Vcpus, self.vcpus),
            (Key::StopTimeout, self.stop_timeout),
            (Key::Egress, self.egress),
            (Key::LessonDir, self.lesson_dir),
            (Key::RunDir, self.run_dir),
            (Key::StateDir, self.state_dir),
            (Key::MgmtIface, self.mgmt_iface),
            (Key::DataIfaces, self.data_ifaces),
            (Key::Plumbing, self.plumbing),
            (Key::LinkTimeout, self.link_timeout),
            (Key::Qemu, self.qemu),
            (Key::QemuArgs, self.qemu_args),
            (Key::Name, self.name),
            (Key::Snapshot, self.snapshot),
        ];
        for (key, value) in flags {
            if let Some(value) = value {
                overrides.set_flag(key, value);
            }
        }
    }
}

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
    #[arg(long, env = "VIAL_RUN_DIR", default_value = "/run/vial")]
    run_dir: PathBuf,
    /// How long to wait for an answer.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            std::process::exit(if usage { Outcome::Usage.code() } else { 0 });
        }
    };
    match cli.command {
        Some(Command::Health(args)) => {
            let check = if args.live {
                Check::Live
            } else if args.status {
                Check::Status
            } else {
                Check::Ready
            };
            let (code, text) =
                health::run_check(&args.run_dir.join("health.sock"), check, Duration::from_secs(args.timeout_secs));
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
    args.apply(&mut overrides);
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
    vial::supervisor::run(config).code()
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
        Err(failure) => {
            eprintln!("{}", failure.message);
            failure.outcome.code()
        }
    }
}

fn snapshot(args: RunArgs) -> i32 {
    let config = match load(args) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let dir = config.profile.snapshot.as_ref().map(|s| s.dir.display().to_string()).unwrap_or_default();
    match vial::capture::run(config) {
        Ok(manifest) => {
            println!(
                "snapshot saved in {dir}: {} MiB of guest state, QEMU {}",
                manifest.vmstate_bytes >> 20,
                manifest.qemu
            );
            0
        }
        Err(failure) => {
            eprintln!("{}", failure.message);
            failure.outcome.code()
        }
    }
}
