//! What `vialctl up` made, written before it makes anything and kept until `down`: the plan
//! (containers, network, connections), where the lesson lives, the stage it is at. `down`,
//! `status`, `link`, `restart` and `stage` work from this file alone, so they work after the
//! lesson file was edited or deleted. One JSON file per lesson in the state directory, and
//! each endpoint's run directory (shared with its container as `/run/vial`) beside it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::plan::Plan;

/// The state directory when neither `--state-dir` nor `VIALCTL_STATE_DIR` names one.
pub const DEFAULT_DIR: &str = "/var/lib/vialctl";
/// The format this vialctl writes and reads.
const FORMAT: u32 = 1;

/// One running lesson.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LessonState {
    /// [`FORMAT`].
    pub format: u32,
    /// The lesson directory (mounted at `/antidote`).
    pub lesson_dir: PathBuf,
    /// What was planned; everything in it may exist.
    pub plan: Plan,
    /// The management network's subnet, when vialctl chose one.
    pub subnet: Option<String>,
    /// The host address ports are published on.
    pub publish_address: std::net::Ipv4Addr,
    /// The first host port of consecutive fixed ones, or `None` for ports the engine picks.
    #[serde(default)]
    pub port_base: Option<u16>,
    /// The environment VM endpoints get beyond their name and links (`VIAL_ACCEL=tcg`).
    pub vm_env: Vec<String>,
    /// Devices VM endpoints get.
    pub vm_devices: Vec<String>,
    /// The configurator image.
    pub configurator: String,
    /// The stage the lesson was last configured for.
    pub stage: Option<usize>,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No lesson of that name is up.
    #[error("no lesson {lesson:?} is up (no {}); `vialctl status` lists the lessons that are", path.display())]
    NotUp {
        /// The lesson.
        lesson: String,
        /// The file looked for.
        path: PathBuf,
    },
    /// Reading, writing or removing failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// `read`, `write`, `remove`.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a state file this vialctl reads.
    #[error("{} is not a vialctl state file of format {FORMAT}", path.display())]
    Format {
        /// The path.
        path: PathBuf,
        /// Why.
        source: Option<serde_json::Error>,
    },
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// The file of `lesson`.
    pub fn file(&self, lesson: &str) -> PathBuf {
        self.0.join("lessons").join(format!("{lesson}.json"))
    }

    /// The run directory of `lesson`'s `endpoint` (its container's `/run/vial`).
    pub fn run_dir(&self, lesson: &str, endpoint: &str) -> PathBuf {
        self.0.join("run").join(lesson).join(endpoint)
    }

    /// Writes `state` (whole or not at all).
    pub fn save(&self, state: &LessonState) -> Result<(), StateError> {
        let path = self.file(&state.plan.lesson);
        let io = |what, source| StateError::Io { what, path: path.clone(), source };
        std::fs::create_dir_all(path.parent().expect("a state file has a folder"))
            .map_err(|e| io("create the folder of", e))?;
        let text = serde_json::to_vec_pretty(state).expect("a state always serializes");
        let temporary = path.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &path)).map_err(|e| io("write", e))
    }

    /// Reads `lesson`'s state.
    pub fn load(&self, lesson: &str) -> Result<LessonState, StateError> {
        let path = self.file(lesson);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotUp { lesson: lesson.into(), path })
            }
            Err(source) => return Err(StateError::Io { what: "read", path, source }),
        };
        let state: LessonState =
            serde_json::from_slice(&text).map_err(|e| StateError::Format { path: path.clone(), source: Some(e) })?;
        if state.format != FORMAT {
            return Err(StateError::Format { path, source: None });
        }
        Ok(state)
    }

    /// Removes `lesson`'s state and run directories; what is already gone is fine.
    pub fn remove(&self, lesson: &str) -> Result<(), StateError> {
        let run = self.0.join("run").join(lesson);
        if let Err(source) = std::fs::remove_dir_all(&run) {
            if source.kind() != std::io::ErrorKind::NotFound {
                return Err(StateError::Io { what: "remove", path: run, source });
            }
        }
        let path = self.file(lesson);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(StateError::Io { what: "remove", path, source })
            }
            _ => Ok(()),
        }
    }

    /// The lessons that are up, by slug.
    pub fn lessons(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.0.join("lessons")) else { return Vec::new() };
        let mut lessons: Vec<String> =
            entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(String::from)).collect();
        lessons.sort();
        lessons
    }
}

impl LessonState {
    /// A new state of `plan`.
    pub fn new(lesson_dir: &Path, plan: Plan) -> LessonState {
        LessonState {
            format: FORMAT,
            lesson_dir: lesson_dir.to_path_buf(),
            plan,
            subnet: None,
            publish_address: std::net::Ipv4Addr::LOCALHOST,
            port_base: None,
            vm_env: Vec::new(),
            vm_devices: Vec::new(),
            configurator: String::new(),
            stage: None,
        }
    }
}
