//! A curriculum checkout around a lesson: `CURRICULUM/lessons/SLUG/lesson.meta.yaml` beside
//! `CURRICULUM/images/*/image.meta.yaml`, as the NRE Labs curriculum lays them out (and
//! vial's `examples/`). When a lesson sits in one, the metadata of the images it uses (the
//! configuration login) is what `vialctl` uses, and validating the lesson validates those
//! files. A slug without metadata there is not an error: the curriculum has none for `frr`,
//! whose lesson ran anyway; vial's own image and its labels stand in. Image files the lesson
//! does not use are not its problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{read, Image, Lesson, LessonError, Problem, IMAGE_FILE};
use crate::lesson::yaml::Pos;

/// The images directory of a curriculum checkout.
pub const IMAGES_DIR: &str = "images";

/// The images of the curriculum checkout a lesson sits in, by slug.
#[derive(Debug, Clone, Default)]
pub struct Images {
    /// `CURRICULUM/images`.
    pub dir: PathBuf,
    /// Each valid image, by its slug.
    pub by_slug: BTreeMap<String, Image>,
}

/// `LESSON/../../images`, when the lesson directory sits two levels below a directory that
/// has one.
pub fn images_dir(lesson_dir: &Path) -> Option<PathBuf> {
    let dir = lesson_dir.canonicalize().ok()?;
    let images = dir.parent()?.parent()?.join(IMAGES_DIR);
    images.is_dir().then_some(images)
}

/// A problem of an image file, with the slug it concerns (its directory's name when the file
/// does not parse).
pub type ImageProblem = (String, Problem);

/// Reads every `DIR/*/image.meta.yaml`; the problems of those that are not valid (or repeat a
/// slug) come back beside the valid ones.
pub fn load_images(dir: &Path) -> Result<(Images, Vec<ImageProblem>), LessonError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LessonError::Read { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path().join(IMAGE_FILE)).filter(|p| p.is_file()).collect();
    files.sort();
    let mut images = Images { dir: dir.to_path_buf(), by_slug: BTreeMap::new() };
    let mut problems = Vec::new();
    for file in files {
        match Image::parse(&read(&file)?) {
            Ok(image) if images.by_slug.contains_key(&image.slug) => problems.push((
                image.slug.clone(),
                Problem {
                    file: file.clone(),
                    pos: Pos { line: 1, column: 1 },
                    message: format!(
                        "slug {:?} is taken by another image in {}: give each image its own slug",
                        image.slug,
                        dir.display()
                    ),
                },
            )),
            Ok(image) => {
                images.by_slug.insert(image.slug.clone(), image);
            }
            Err(diagnostics) => {
                let slug = file.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned());
                let slug = slug.unwrap_or_default();
                problems.extend(diagnostics.into_iter().map(|d| (slug.clone(), Problem::in_file(&file, d))));
            }
        }
    }
    Ok((images, problems))
}

/// The problems, among `problems`, of the image files `lesson` uses.
pub fn problems_of_used(lesson: &Lesson, problems: Vec<ImageProblem>) -> Vec<Problem> {
    let used: Vec<&str> = lesson.endpoints.iter().map(|e| e.image.value.as_str()).collect();
    problems.into_iter().filter(|(slug, _)| used.contains(&slug.as_str())).map(|(_, problem)| problem).collect()
}

/// The images of the curriculum checkout `lesson_dir` sits in, if it sits in one.
pub fn images_beside(lesson_dir: &Path) -> Result<Option<Images>, LessonError> {
    match images_dir(lesson_dir) {
        Some(dir) => Ok(Some(load_images(&dir)?.0)),
        None => Ok(None),
    }
}
