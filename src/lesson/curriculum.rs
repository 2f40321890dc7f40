//! A curriculum checkout around a lesson: `CURRICULUM/lessons/SLUG/lesson.meta.yaml` beside
//! `CURRICULUM/images/*/image.meta.yaml`, as the NRE Labs curriculum lays them out (and
//! vial's `examples/`). When a lesson sits in one, its endpoints' image slugs must be among
//! those images, as antidote-core's ingest required, and the images' metadata (the
//! configuration login) is what `vialctl` uses. A lesson elsewhere has no image metadata.

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

/// Reads every `DIR/*/image.meta.yaml`; the problems of those that are not valid (or repeat a
/// slug) come back beside the valid ones.
pub fn load_images(dir: &Path) -> Result<(Images, Vec<Problem>), LessonError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LessonError::Read { path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> =
        entries.filter_map(|e| e.ok()).map(|e| e.path().join(IMAGE_FILE)).filter(|p| p.is_file()).collect();
    files.sort();
    let mut images = Images { dir: dir.to_path_buf(), by_slug: BTreeMap::new() };
    let mut problems = Vec::new();
    for file in files {
        match Image::parse(&read(&file)?) {
            Ok(image) if images.by_slug.contains_key(&image.slug) => problems.push(Problem {
                file: file.clone(),
                pos: Pos { line: 1, column: 1 },
                message: format!("slug {:?} is taken by another image in {}: give each image its own slug", image.slug, dir.display()),
            }),
            Ok(image) => {
                images.by_slug.insert(image.slug.clone(), image);
            }
            Err(diagnostics) => problems.extend(diagnostics.into_iter().map(|d| Problem::in_file(&file, d))),
        }
    }
    Ok((images, problems))
}

/// The problems of `lesson` (in `lesson_file`) against the curriculum's `images`: every
/// endpoint's image slug must be one of them.
pub fn check_slugs(lesson: &Lesson, lesson_file: &Path, images: &Images) -> Vec<Problem> {
    let known = images.by_slug.keys().cloned().collect::<Vec<_>>().join(", ");
    lesson
        .endpoints
        .iter()
        .filter(|endpoint| !images.by_slug.contains_key(&endpoint.image.value))
        .map(|endpoint| Problem {
            file: lesson_file.to_path_buf(),
            pos: endpoint.image.pos,
            message: format!(
                "endpoints: {}: image {:?} is not among this curriculum's images in {} (it has: {known}): \
                 add {}/{}/{IMAGE_FILE}, or name one of those",
                endpoint.name.value,
                endpoint.image.value,
                images.dir.display(),
                images.dir.display(),
                endpoint.image.value,
            ),
        })
        .collect()
}

/// The images of the curriculum checkout `lesson_dir` sits in, if it sits in one.
pub fn images_beside(lesson_dir: &Path) -> Result<Option<Images>, LessonError> {
    match images_dir(lesson_dir) {
        Some(dir) => Ok(Some(load_images(&dir)?.0)),
        None => Ok(None),
    }
}
