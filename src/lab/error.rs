//! Everything that can go wrong operating a lesson, and the exit code of each.

use std::time::Duration;

use ipnetwork::Ipv4Network;

use super::catalog::CatalogError;
use super::configure::ConfigureError;
use super::runtime::RuntimeError;
use super::state::StateError;
use super::wire::WireError;
use crate::lesson::LessonError;

/// Everything that can go wrong operating a lesson.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lesson is not valid (every problem listed).
    #[error(transparent)]
    Lesson(#[from] LessonError),
    /// An image slug has no image.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// The kernel refused a wiring step.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A stage configuration failed.
    #[error(transparent)]
    Configure(#[from] ConfigureError),
    /// An image is not on the engine.
    #[error("endpoint {endpoint}: image {reference} (slug {slug:?}) is not on this Docker engine: build it (cargo xtask image {slug}) or name another with --image {slug}=REPOSITORY:TAG")]
    ImageMissing {
        /// The endpoint.
        endpoint: String,
        /// Its slug.
        slug: String,
        /// The reference looked for.
        reference: String,
    },
    /// The configurator image is not on the engine.
    #[error("the configurator image {reference} is not on this Docker engine (endpoints {endpoints} have a configurationType): build it (cargo xtask image configurator) or name another with --configurator")]
    ConfiguratorMissing {
        /// The reference.
        reference: String,
        /// The endpoints that need it.
        endpoints: String,
    },
    /// The lesson is up already.
    #[error("lesson {lesson} is already up: run `vialctl down {lesson}` first")]
    AlreadyUp {
        /// The lesson.
        lesson: String,
    },
    /// The pool has no free /24.
    #[error("--mgmt-pool {pool}: every /24 in it is taken by another network; give a larger or another pool")]
    PoolExhausted {
        /// The pool.
        pool: Ipv4Network,
    },
    /// The stage does not exist.
    #[error("--stage {stage}: the lesson has stages 0..{}", stages.saturating_sub(1))]
    NoStage {
        /// The stage asked for.
        stage: usize,
        /// How many there are.
        stages: usize,
    },
    /// No endpoint or link by that name.
    #[error("{what}: the lesson has {known}")]
    NotInLesson {
        /// What was asked for (`endpoint r9`, `link r1:eth7`).
        what: String,
        /// What there is.
        known: String,
    },
    /// `down`/`status` without a lesson while several are up.
    #[error("several lessons are up ({lessons}): name one")]
    WhichLesson {
        /// The lessons.
        lessons: String,
    },
    /// An endpoint failed.
    #[error("endpoint {endpoint} failed in phase {phase}: {message}{}", if log.is_empty() { String::new() } else { format!("\n--- the last lines of its console and log ---\n{log}") })]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Its phase then.
        phase: &'static str,
        /// What happened.
        message: String,
        /// Its last words.
        log: String,
    },
    /// An endpoint was not usable in time.
    #[error("endpoint {endpoint} was not usable within {timeout:?} (it was {phase}){}", if log.is_empty() { String::new() } else { format!("\n--- the last lines of its console and log ---\n{log}") })]
    Timeout {
        /// The endpoint.
        endpoint: String,
        /// Its phase then.
        phase: &'static str,
        /// The bound.
        timeout: Duration,
        /// Its last words.
        log: String,
    },
}

impl LabError {
    /// The exit code of `vialctl` for this failure (sysexits.h).
    pub fn exit_code(&self) -> u8 {
        match self {
            LabError::Lesson(err) => err.exit() as u8,
            LabError::Catalog(_)
            | LabError::NoStage { .. }
            | LabError::NotInLesson { .. }
            | LabError::WhichLesson { .. } => 64,
            LabError::ImageMissing { .. } | LabError::ConfiguratorMissing { .. } | LabError::Runtime(_) => 69,
            LabError::AlreadyUp { .. } | LabError::PoolExhausted { .. } => 75,
            LabError::State(StateError::NotUp { .. }) => 66,
            LabError::State(_) | LabError::Wire(_) => 71,
            LabError::Configure(_) | LabError::Endpoint { .. } => 70,
            LabError::Timeout { .. } => 75,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_table() {
        let not_up = StateError::NotUp { lesson: "x".into(), path: "/s/x.json".into() };
        let io = StateError::Io { what: "read", path: "/s".into(), source: std::io::Error::from_raw_os_error(13) };
        let runtime = RuntimeError { what: "create".into(), message: "no".into(), not_found: false };
        let endpoint =
            |phase| LabError::Endpoint { endpoint: "r1".into(), phase, message: "m".into(), log: String::new() };
        let table: Vec<(LabError, u8)> = vec![
            (LessonError::MissingDir { dir: "/l".into() }.into(), 66),
            (LabError::NoStage { stage: 3, stages: 1 }, 64),
            (LabError::NotInLesson { what: "endpoint r9".into(), known: "r1".into() }, 64),
            (LabError::WhichLesson { lessons: "a, b".into() }, 64),
            (LabError::ImageMissing { endpoint: "r1".into(), slug: "frr".into(), reference: "vial/frr".into() }, 69),
            (runtime.into(), 69),
            (LabError::AlreadyUp { lesson: "x".into() }, 75),
            (not_up.into(), 66),
            (io.into(), 71),
            (endpoint("booting"), 70),
            (
                LabError::Timeout {
                    endpoint: "r1".into(),
                    phase: "probing",
                    timeout: Duration::from_secs(1),
                    log: String::new(),
                },
                75,
            ),
        ];
        for (error, code) in table {
            assert_eq!(error.exit_code(), code, "{error}");
        }
    }
}
