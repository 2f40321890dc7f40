//! `vialctl`: the lesson launcher's command line. Parses, calls `vial::lesson`, prints, and maps
//! the outcome to an exit code (sysexits: 64 usage, 65 invalid lesson, 66 missing input).
//! Each noun is a subcommand with its own verbs, so `up`, `down`, `status`, `graph`, `link`,
//! `restart` and `stage` can join `lesson` without changing it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use vial::lesson::{self, Exit, LessonError, ValidateOptions, LESSON_FILE};

/// Run NRE Labs / Antidote-style lessons whose endpoints are vial containers.
#[derive(Parser)]
#[command(name = "vialctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lesson files: check them, convert old ones.
    #[command(subcommand)]
    Lesson(LessonCommand),
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            std::process::exit(if usage { Exit::Usage as i32 } else { 0 });
        }
    };
    let exit = match cli.command {
        Command::Lesson(LessonCommand::Validate(args)) => validate(&args),
        Command::Lesson(LessonCommand::Convert(args)) => convert(&args),
    };
    std::process::exit(exit as i32);
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
