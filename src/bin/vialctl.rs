//! `vialctl`: the lesson launcher's command line. Parses, calls `vial::lesson` or `vial::lab`,
//! prints, and maps the outcome to an exit code (sysexits: 64 usage, 65 invalid lesson, 66
//! missing input, 69 engine or image unavailable, 70 an endpoint failed, 71 system error,
//! 75 timed out or already up).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vial::lab::docker::DockerRuntime;
use vial::lab::state::StateDir;
use vial::lab::{Lab, LabError, UpOptions};
use vial::lesson::{self, Exit, LessonError, ValidateOptions, LESSON_FILE};

/// Run NRE Labs / Antidote-style lessons whose endpoints are vial containers.
#[derive(Parser)]
#[command(name = "vialctl", version)]
struct Cli {
    /// Where running lessons are recorded.
    #[arg(long, global = true, env = "VIALCTL_STATE_DIR", default_value = vial::lab::state::DEFAULT_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lesson files: check them, convert old ones.
    #[command(subcommand)]
    Lesson(LessonCommand),
    /// Bring a lesson up: every endpoint running, wired, ready and configured for the stage.
    Up(UpArgs),
    /// Remove a lesson's containers, links, network and state (safe to run twice).
    Down(LessonName),
    /// Show a running lesson: endpoints, health, addresses, ports, links.
    Status(StatusArgs),
    /// Print a running lesson's topology (Graphviz DOT or Mermaid).
    Graph(GraphArgs),
    /// Pull or restore one link of a running lesson (`link set r1:eth1 down`).
    #[command(subcommand)]
    Link(LinkCommand),
    /// Recreate one endpoint and its links; its peers stay up and get their links back.
    Restart(RestartArgs),
    /// Configure a running lesson for another stage.
    Stage(StageArgs),
}

#[derive(Args)]
struct UpArgs {
    /// The lesson directory (holds lesson.meta.yaml).
    #[arg(value_name = "LESSON_DIR")]
    lesson_dir: PathBuf,
    /// The stage to configure (stage<N>/ of the lesson).
    #[arg(long, default_value_t = 0)]
    stage: usize,
    /// An image for a lesson's image slug: SLUG=REPOSITORY:TAG (repeatable).
    #[arg(long = "image", value_name = "SLUG=REF")]
    images: Vec<String>,
    /// Cold VM boots at once [default: the CPU count].
    #[arg(long)]
    max_booting: Option<usize>,
    /// The bound on the whole start, e.g. 600s or 10m.
    #[arg(long, default_value = "600s", value_parser = duration)]
    timeout: Duration,
    /// Keep what was made when the start fails (to look at it; `vialctl down` removes it).
    #[arg(long)]
    keep: bool,
    /// The MTU of every data link.
    #[arg(long, default_value_t = 9000)]
    mtu: u32,
    /// Take the management network's /24 from this pool (else the engine's own pool).
    #[arg(long, value_name = "CIDR")]
    mgmt_pool: Option<ipnetwork::Ipv4Network>,
    /// The host address presentations are published on.
    #[arg(long, default_value = "127.0.0.1")]
    publish_address: Ipv4Addr,
    /// Publish on consecutive host ports from PORT, in lesson order [default: free ports].
    #[arg(long, value_name = "PORT")]
    port_base: Option<u16>,
    /// The accelerator of VM endpoints.
    #[arg(long, env = "VIALCTL_ACCEL", default_value = "auto")]
    accel: Accel,
    /// The image stage configurations run in.
    #[arg(long, default_value = vial::lab::CONFIGURATOR)]
    configurator: String,
    /// Bring the topology up without running the stage's configuration.
    #[arg(long)]
    no_config: bool,
    /// Print the summary (published ports, timings) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Accel {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Args)]
struct LessonName {
    /// The lesson's slug [default: the only lesson that is up].
    lesson: Option<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// The lesson's slug [default: every lesson that is up].
    lesson: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GraphArgs {
    /// The lesson's slug [default: the only lesson that is up].
    lesson: Option<String>,
    /// The notation.
    #[arg(long, default_value = "dot")]
    format: GraphFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

#[derive(Subcommand)]
enum LinkCommand {
    /// Set one link up or down: ENDPOINT:IFACE up|down.
    Set(LinkSetArgs),
}

#[derive(Args)]
struct LinkSetArgs {
    /// The link, as ENDPOINT:IFACE (r1:eth1).
    #[arg(value_name = "ENDPOINT:IFACE")]
    link: String,
    /// up or down.
    state: LinkState,
    /// The lesson's slug [default: the only lesson that is up].
    #[arg(long)]
    lesson: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LinkState {
    Up,
    Down,
}

#[derive(Args)]
struct RestartArgs {
    /// The endpoint.
    endpoint: String,
    /// The lesson's slug [default: the only lesson that is up].
    #[arg(long)]
    lesson: Option<String>,
    /// The bound on the restart.
    #[arg(long, default_value = "600s", value_parser = duration)]
    timeout: Duration,
}

#[derive(Args)]
struct StageArgs {
    /// The stage (stage<N>/ of the lesson).
    stage: usize,
    /// The lesson's slug [default: the only lesson that is up].
    #[arg(long)]
    lesson: Option<String>,
    /// The bound on each endpoint's configuration.
    #[arg(long, default_value = "600s", value_parser = duration)]
    timeout: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    vial::config::parse_duration(text).ok_or_else(|| format!("{text:?} is not a duration: give e.g. 600s, 10m, 1h"))
}

#[derive(Subcommand)]
enum LessonCommand {
    /// Check lesson directories (lesson.meta.yaml, or image.meta.yaml) and print every problem as
    /// file:line:column: message. Exits 0 when all are valid, 65 when any is not.
    Validate(ValidateArgs),
    /// Rewrite a Syringe-era lesson (lessonName, lessonId) in the current format.
    Convert(ConvertArgs),
}

#[derive(Args)]
struct ValidateArgs {
    /// Do not look for each configured endpoint's stage<i>/configs/ file.
    #[arg(long)]
    no_file_checks: bool,
    /// Lesson directories.
    #[arg(required = true, value_name = "DIR")]
    dirs: Vec<PathBuf>,
}

#[derive(Args)]
struct ConvertArgs {
    /// The Syringe-era lesson directory.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Write the converted lesson to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE", conflicts_with = "in_place")]
    output: Option<PathBuf>,
    /// Replace DIR/lesson.meta.yaml with the converted lesson.
    #[arg(long)]
    in_place: bool,
    /// The new lesson's slug [default: from DIR's name, `lesson-41-x` → `x`].
    #[arg(long)]
    slug: Option<String>,
}

fn main() {
    let cli: Cli = vial::exit::parse_command_line();
    let exit = match cli.command {
        Command::Lesson(LessonCommand::Validate(args)) => validate(&args) as i32,
        Command::Lesson(LessonCommand::Convert(args)) => convert(&args) as i32,
        command => lab(StateDir(cli.state_dir), command),
    };
    std::process::exit(exit);
}

/// Runs a lab command on a Docker engine; its exit code.
fn lab(states: StateDir, command: Command) -> i32 {
    vial::logging::init_with("VIALCTL_LOG", "warn");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            report(&err);
            return 70;
        }
    };
    let result = runtime.block_on(async {
        let lab = Lab::new(DockerRuntime::connect().await?, states);
        run(&lab, command).await
    });
    match result {
        Ok(()) => 0,
        Err(err) => {
            report(&err);
            err.exit_code().into()
        }
    }
}

async fn run(lab: &Lab<DockerRuntime>, command: Command) -> Result<(), LabError> {
    match command {
        Command::Lesson(_) => unreachable!("lesson commands need no engine"),
        Command::Up(args) => {
            let options = UpOptions {
                lesson_dir: args.lesson_dir,
                stage: args.stage,
                images: args.images,
                max_booting: args
                    .max_booting
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
                timeout: args.timeout,
                keep: args.keep,
                mtu: args.mtu,
                mgmt_pool: args.mgmt_pool,
                publish_address: args.publish_address,
                port_base: args.port_base,
                accel: args.accel.to_possible_value().expect("no skipped values").get_name().to_string(),
                configurator: args.configurator,
                no_config: args.no_config,
            };
            let summary = lab.up(&options).await?;
            if args.json {
                println!("{}", serde_json::to_string(&summary).expect("a summary serializes"));
                return Ok(());
            }
            println!("lesson {} is up at stage {} ({:.1} s)", summary.lesson, summary.stage, summary.seconds);
            for published in &summary.published {
                println!(
                    "  {:<14} {:<10} {:<5} {}",
                    published.endpoint, published.name, published.kind, published.address
                );
            }
        }
        Command::Down(args) => match lab.down(args.lesson.as_deref()).await? {
            Some(lesson) => println!("lesson {lesson} is down"),
            None => println!("nothing to take down"),
        },
        Command::Status(args) => {
            let lessons = match args.lesson {
                Some(lesson) => vec![lesson],
                None => lab.lessons(),
            };
            let mut all = serde_json::Map::new();
            for lesson in lessons {
                let statuses = lab.status(&lesson).await?;
                if args.json {
                    all.insert(lesson, serde_json::to_value(&statuses).expect("statuses serialize"));
                } else {
                    print!("{}", vial::lab::progress::status_table(&lesson, &statuses));
                }
            }
            if args.json {
                println!("{}", serde_json::Value::Object(all));
            }
        }
        Command::Graph(args) => {
            let state = lab.state(args.lesson.as_deref())?;
            match args.format {
                GraphFormat::Dot => print!("{}", vial::lab::graph::dot(&state.plan)),
                GraphFormat::Mermaid => print!("{}", vial::lab::graph::mermaid(&state.plan)),
            }
        }
        Command::Link(LinkCommand::Set(args)) => {
            let Some((endpoint, iface)) = args.link.split_once(':') else {
                return Err(LabError::NotInLesson {
                    what: format!("link {:?}", args.link),
                    known: "links named ENDPOINT:IFACE, e.g. r1:eth1".into(),
                });
            };
            let up = matches!(args.state, LinkState::Up);
            lab.link_set(args.lesson.as_deref(), endpoint, iface, up).await?;
            println!("{endpoint}:{iface} is {}", if up { "up" } else { "down" });
        }
        Command::Restart(args) => {
            lab.restart(args.lesson.as_deref(), &args.endpoint, args.timeout).await?;
            println!("{} restarted", args.endpoint);
        }
        Command::Stage(args) => {
            lab.stage(args.lesson.as_deref(), args.stage, args.timeout).await?;
            println!("configured for stage {}", args.stage);
        }
    }
    Ok(())
}

fn validate(args: &ValidateArgs) -> Exit {
    let options = ValidateOptions { file_checks: !args.no_file_checks };
    let (mut invalid, mut problems, mut failure) = (0, 0, None);
    for dir in &args.dirs {
        match lesson::validate_dir(dir, options) {
            Ok(found) if found.is_empty() => println!("{}: ok", dir.display()),
            Ok(found) => {
                invalid += 1;
                problems += found.len();
                for problem in found {
                    println!("{problem}");
                }
            }
            Err(err) => {
                report(&err);
                failure.get_or_insert(err.exit());
            }
        }
    }
    if invalid > 0 {
        eprintln!("{problems} problem(s) in {invalid} of {} lesson(s)", args.dirs.len());
    }
    failure.unwrap_or(if invalid > 0 { Exit::DataErr } else { Exit::Ok })
}

fn convert(args: &ConvertArgs) -> Exit {
    let target = if args.in_place { Some(args.dir.join(LESSON_FILE)) } else { args.output.clone() };
    let shown = target.clone().unwrap_or_else(|| PathBuf::from("<stdout>"));
    let converted = match lesson::convert_dir(&args.dir, args.slug.as_deref(), &shown) {
        Ok(converted) => converted,
        Err(err) => {
            if let LessonError::Unconvertible { problems } = &err {
                for problem in problems {
                    println!("{problem}");
                }
            }
            report(&err);
            return err.exit();
        }
    };
    for note in &converted.notes {
        eprintln!("note: {note}");
    }
    match target {
        None => {
            print!("{}", converted.text);
            Exit::Ok
        }
        Some(path) => match lesson::write_file(&path, &converted.text) {
            Ok(()) => {
                eprintln!("wrote {}", path.display());
                Exit::Ok
            }
            Err(err) => {
                report(&err);
                err.exit()
            }
        },
    }
}

/// Prints an error and its causes once, on one line.
fn report(err: &dyn std::error::Error) {
    let mut line = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{line}");
}
