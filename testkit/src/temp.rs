//! Scratch directories for a test or a benchmark, removed with what they hold when dropped.
//! This module never picks where they live: the caller names the parent (`target/itest`, or
//! the system's temporary directory when a socket path must stay short).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory `<parent>/<tag>-<pid>-<n>`, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it (and `parent`), removing what an earlier run with the same pid left there.
    pub fn new(parent: &Path, tag: &str) -> std::io::Result<TempDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = parent.join(format!("{tag}-{}-{n}", std::process::id()));
        match std::fs::remove_dir_all(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        std::fs::create_dir_all(&path)?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("testkit: could not remove {}: {err}", self.0.display())
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_of_one_tag_differ_and_go_away_when_dropped() {
        let parent = std::env::temp_dir();
        let (one, two) =
            (TempDir::new(&parent, "testkit-temp").unwrap(), TempDir::new(&parent, "testkit-temp").unwrap());
        assert_ne!(one.path(), two.path());
        std::fs::write(one.path().join("file"), "x").unwrap();
        let path = one.path().to_path_buf();
        drop(one);
        assert!(!path.exists());
        assert!(two.path().is_dir());
    }
}
