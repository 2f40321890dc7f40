//! Lessons in the antidote-core v0.6+ format: the model of `lesson.meta.yaml` and
//! `image.meta.yaml`, validation that reports every problem at once as `file:line:column:
//! message`, and conversion of Syringe-era lessons. This module never starts an endpoint.
//!
//! - `yaml`: positioned YAML (saphyr marked nodes) and the readers that collect problems.
//! - `model`: the lesson model and building it from YAML.
//! - `image`: the image model.
//! - `validate`: rules between fields, and checks against the lesson directory.
//! - `convert`: Syringe-era lessons to the current format.
//! - `curriculum`: the images of the curriculum checkout a lesson sits in.

mod convert;
mod curriculum;
mod image;
mod model;
mod validate;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};

pub use convert::{convert, is_legacy, slug_from_dir_name, ConvertFailure, Converted};
pub use curriculum::{images_beside, images_dir, load_images, Images, IMAGES_DIR};
pub use image::{Flavor, Image};
pub use model::{
    is_slug, slugify, Author, Category, ConfigurationType, Connection, Endpoint, GuideType, Lesson, Presentation,
    PresentationType, Stage, Tier, NAPALM_DRIVERS,
};
pub use validate::napalm_driver;
pub use yaml::{Diagnostic, Pos, Spanned};

/// The lesson file in a lesson directory.
pub const LESSON_FILE: &str = "lesson.meta.yaml";
/// The image file in an image directory.
pub const IMAGE_FILE: &str = "image.meta.yaml";

/// A problem in a file: `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// Where in the file.
    pub pos: Pos,
    /// What is wrong, with the field, the bad value and the fix.
    pub message: String,
}

impl Problem {
    fn in_file(file: &Path, d: Diagnostic) -> Problem {
        Problem { file: file.to_path_buf(), pos: d.pos, message: d.message }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.pos, self.message)
    }
}

/// What `validate_dir` checks besides the file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidateOptions {
    /// Check that each configured endpoint has its file in `stage<i>/configs/` of every stage.
    pub file_checks: bool,
}

/// Failures of the lesson commands that are not problems inside a lesson file.
#[derive(Debug, thiserror::Error)]
pub enum LessonError {
    /// The lesson directory does not exist.
    #[error("{}: no such directory", dir.display())]
    MissingDir {
        /// The directory given.
        dir: PathBuf,
    },
    /// The directory holds neither a lesson nor an image file.
    #[error("{}: no {LESSON_FILE} (or {IMAGE_FILE}) in this directory", dir.display())]
    NoMetaFile {
        /// The directory given.
        dir: PathBuf,
    },
    /// A file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `convert` was given a lesson that is already in the current format.
    #[error("{}: already in the current format (no `lessonName`/`lessonId`); nothing to convert", file.display())]
    NotLegacy {
        /// The lesson file.
        file: PathBuf,
    },
    /// The lesson to bring up is not valid; each problem is printed on its own line.
    #[error("{} is not a valid lesson ({} problem(s)):\n{}", dir.display(), problems.len(), problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The lesson directory.
        dir: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
    /// The lesson has problems `convert` cannot get past, each printed on its own.
    #[error("{} problem(s) prevent the conversion", problems.len())]
    Unconvertible {
        /// The problems, in the input or in the converted text.
        problems: Vec<Problem>,
    },
}

/// Exit codes of `vialctl` (sysexits.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Everything valid, or done.
    Ok = 0,
    /// Bad command line (EX_USAGE).
    Usage = 64,
    /// A lesson is invalid or cannot be converted (EX_DATAERR).
    DataErr = 65,
    /// A directory or file is missing (EX_NOINPUT).
    NoInput = 66,
    /// The output file cannot be written (EX_CANTCREAT).
    CantCreate = 73,
    /// A file exists but cannot be read (EX_IOERR).
    IoErr = 74,
}

impl LessonError {
    /// The exit code for this failure.
    pub fn exit(&self) -> Exit {
        match self {
            LessonError::MissingDir { .. } | LessonError::NoMetaFile { .. } => Exit::NoInput,
            LessonError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Exit::NoInput,
            LessonError::Read { .. } => Exit::IoErr,
            LessonError::Write { .. } => Exit::CantCreate,
            LessonError::NotLegacy { .. } | LessonError::Unconvertible { .. } | LessonError::Invalid { .. } => {
                Exit::DataErr
            }
        }
    }
}

fn read(path: &Path) -> Result<String, LessonError> {
    std::fs::read_to_string(path).map_err(|source| LessonError::Read { path: path.to_path_buf(), source })
}

fn meta_file(dir: &Path) -> Result<PathBuf, LessonError> {
    if !dir.is_dir() {
        return Err(LessonError::MissingDir { dir: dir.to_path_buf() });
    }
    [LESSON_FILE, IMAGE_FILE]
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.exists())
        .ok_or_else(|| LessonError::NoMetaFile { dir: dir.to_path_buf() })
}

/// Validates the lesson (or image) in `dir` and returns every problem found, in file order;
/// an empty list means valid. A Syringe-era lesson is one problem that names `vialctl lesson
/// convert`.
pub fn validate_dir(dir: &Path, options: ValidateOptions) -> Result<Vec<Problem>, LessonError> {
    let file = meta_file(dir)?;
    let text = read(&file)?;
    let diagnostics = if file.ends_with(IMAGE_FILE) {
        Image::parse(&text).err().unwrap_or_default()
    } else {
        match Lesson::parse(&text) {
            Ok(lesson) => {
                let mut problems: Vec<Problem> = Vec::new();
                if options.file_checks {
                    problems.extend(lesson.check_files(dir).into_iter().map(|d| Problem::in_file(&file, d)));
                }
                // In a curriculum checkout, the metadata of the images it uses must be valid.
                if let Some(images_dir) = images_dir(dir) {
                    let (_, image_problems) = load_images(&images_dir)?;
                    problems.extend(curriculum::problems_of_used(&lesson, image_problems));
                }
                return Ok(problems);
            }
            Err(problems) => problems,
        }
    };
    // The model knows no directory; name the one to convert in the Syringe-era message.
    let command = format!("vialctl lesson convert {}", dir.display());
    Ok(diagnostics
        .into_iter()
        .map(|mut d| {
            d.message = d.message.replace(model::CONVERT_COMMAND, &command);
            Problem::in_file(&file, d)
        })
        .collect())
}

/// The lesson in `dir`, valid (with its per-stage files checked), for `vialctl up`; otherwise
/// every problem, as `validate_dir` finds them.
pub fn load(dir: &Path) -> Result<Lesson, LessonError> {
    let problems = validate_dir(dir, ValidateOptions { file_checks: true })?;
    if !problems.is_empty() {
        return Err(LessonError::Invalid { dir: dir.to_path_buf(), problems });
    }
    let file = dir.join(LESSON_FILE);
    let text = read(&file)?;
    Lesson::parse(&text).map_err(|diagnostics| LessonError::Invalid {
        dir: dir.to_path_buf(),
        problems: diagnostics.into_iter().map(|d| Problem::in_file(&file, d)).collect(),
    })
}

/// Converts the Syringe-era lesson in `dir`. The new slug is `slug`, or else derived from the
/// directory's name. `output` names the file the text is meant for, in messages about it.
pub fn convert_dir(dir: &Path, slug: Option<&str>, output: &Path) -> Result<Converted, LessonError> {
    if !dir.is_dir() {
        return Err(LessonError::MissingDir { dir: dir.to_path_buf() });
    }
    let file = dir.join(LESSON_FILE);
    let text = read(&file)?;
    let derived;
    let slug = match slug {
        Some(slug) => slug,
        None => {
            let name = dir.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
            derived = slug_from_dir_name(&name.unwrap_or_default());
            &derived
        }
    };
    convert(&text, slug).map_err(|failure| match failure {
        ConvertFailure::NotLegacy => LessonError::NotLegacy { file },
        ConvertFailure::Input(problems) => {
            LessonError::Unconvertible { problems: problems.into_iter().map(|d| Problem::in_file(&file, d)).collect() }
        }
        ConvertFailure::Output { problems, .. } => {
            LessonError::Unconvertible { problems: problems.into_iter().map(|d| Problem::in_file(output, d)).collect() }
        }
    })
}

/// Writes converted text to `path`.
pub fn write_file(path: &Path, text: &str) -> Result<(), LessonError> {
    std::fs::write(path, text).map_err(|source| LessonError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_sysexits() {
        let io = |kind| std::io::Error::new(kind, "x");
        let p = PathBuf::from("x");
        let table: Vec<(LessonError, u8)> = vec![
            (LessonError::MissingDir { dir: p.clone() }, 66),
            (LessonError::NoMetaFile { dir: p.clone() }, 66),
            (LessonError::Read { path: p.clone(), source: io(std::io::ErrorKind::NotFound) }, 66),
            (LessonError::Read { path: p.clone(), source: io(std::io::ErrorKind::PermissionDenied) }, 74),
            (LessonError::Write { path: p.clone(), source: io(std::io::ErrorKind::PermissionDenied) }, 73),
            (LessonError::NotLegacy { file: p.clone() }, 65),
            (LessonError::Unconvertible { problems: vec![] }, 65),
        ];
        for (error, code) in table {
            assert_eq!(error.exit() as u8, code, "{error}");
        }
        assert_eq!(Exit::Usage as u8, 64);
    }

    #[test]
    fn problems_print_as_file_line_column() {
        let p = Problem { file: "l/lesson.meta.yaml".into(), pos: Pos { line: 3, column: 7 }, message: "m".into() };
        assert_eq!(p.to_string(), "l/lesson.meta.yaml:3:7: m");
    }
}
