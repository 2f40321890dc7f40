//! `cargo xtask lint`: shellcheck over every shell script of the repository, then clippy over
//! the workspace with warnings as errors. `cargo xtask test` runs the shellcheck part first.
//!
//! A shell script is a file named `*.sh` or one whose first line is a `sh` or `bash` shebang
//! (`.ci/run`), anywhere in the repository but `target/` and `.git/`, or a script that a
//! profile's `[[first_boot]]` step writes into its guest with a here-document
//! (`cat > FILE <<'EOF'` and a shebang; frr's `vial-lesson-config`). This module never edits
//! a file: findings are fixed by hand, or silenced next to the line with a
//! `# shellcheck disable=SCxxxx # reason` when they are false positives.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context, Result};
use vial::config::ProfileFile;

/// The command: shellcheck, then clippy.
pub(crate) fn run() -> Result<()> {
    crate::setup::run()?;
    shellcheck()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::run_cmd(&cargo, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
        .context("clippy found problems")
}

/// Runs shellcheck over every shell script (see the module docs); fails naming the findings.
pub(crate) fn shellcheck() -> Result<()> {
    let root = crate::project_root();
    let scripts = shell_scripts(&root)?;
    ensure!(!scripts.is_empty(), "no shell scripts found under {}", root.display());
    let relative: Vec<String> =
        scripts.iter().map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).collect();
    // Paths relative to the root (run_cmd runs there), so findings name files as in the tree.
    let fix = "shellcheck found problems (fix them, or disable a false positive with its reason)";
    crate::run_cmd("shellcheck", &relative).context(fix)?;
    let embedded = profile_scripts(&root.join("vm-profiles"))?;
    for (origin, script) in &embedded {
        shellcheck_text(script).with_context(|| format!("in {origin}")).context(fix)?;
    }
    println!("lint: shellcheck passed on {} scripts and {} in profiles", relative.len(), embedded.len());
    Ok(())
}

/// The scripts that profiles' first-boot steps write with a quoted here-document, each with
/// where it comes from (`vm-profiles/frr.toml, step "..."`).
fn profile_scripts(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut scripts = Vec::new();
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    for path in paths {
        let file = ProfileFile::load(&path).map_err(|problem| anyhow::anyhow!("{problem}"))?;
        for step in &file.first_boot {
            for script in here_document_scripts(step.send.as_deref().unwrap_or_default()) {
                scripts.push((format!("{}, step \"{}\"", path.display(), step.name), script));
            }
        }
    }
    Ok(scripts)
}

/// The bodies of `<<'EOF'` here-documents in `text` that start with a shell shebang.
fn here_document_scripts(text: &str) -> Vec<String> {
    let mut scripts = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("<<'EOF'\n") {
        let body = &rest[start + "<<'EOF'\n".len()..];
        let end = body.find("\nEOF\n").or_else(|| body.strip_suffix("\nEOF").map(str::len)).unwrap_or(body.len());
        let script = &body[..end];
        if is_shell_shebang(script.lines().next().unwrap_or_default()) {
            scripts.push(format!("{script}\n"));
        }
        rest = &body[end..];
    }
    scripts
}

/// shellcheck over a script given as text (on its standard input).
fn shellcheck_text(script: &str) -> Result<()> {
    let mut child = Command::new("shellcheck")
        .arg("-")
        .stdin(Stdio::piped())
        .spawn()
        .context("running shellcheck (apt-get install shellcheck)")?;
    child.stdin.take().expect("stdin is piped").write_all(script.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "`shellcheck -` failed ({status})");
    Ok(())
}

/// Every shell script under `root`, sorted.
fn shell_scripts(root: &Path) -> Result<Vec<PathBuf>> {
    let mut scripts = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                if dir != root || !matches!(entry.file_name().to_str(), Some("target" | ".git")) {
                    dirs.push(path);
                }
            } else if kind.is_file() && is_shell_script(&path) {
                scripts.push(path);
            }
        }
    }
    scripts.sort();
    Ok(scripts)
}

fn is_shell_script(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "sh") {
        return true;
    }
    // The shebang is in the first bytes; nothing more is read.
    let mut head = [0u8; 128];
    let Ok(len) = fs::File::open(path).and_then(|mut file| file.read(&mut head)) else { return false };
    let first = head[..len].split(|b| *b == b'\n').next().unwrap_or_default();
    is_shell_shebang(&String::from_utf8_lossy(first))
}

/// `#!/bin/sh`, `#!/bin/bash`, `#!/usr/bin/env bash` and the like.
fn is_shell_shebang(line: &str) -> bool {
    let Some(command) = line.strip_prefix("#!") else { return false };
    let mut words = command.split_whitespace();
    let mut program = words.next().unwrap_or_default();
    if program.ends_with("/env") {
        program = words.next().unwrap_or_default();
    }
    matches!(program.rsplit('/').next(), Some("sh" | "bash" | "dash"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebangs() {
        assert!(is_shell_shebang("#!/bin/sh"));
        assert!(is_shell_shebang("#!/usr/bin/env bash"));
        assert!(is_shell_shebang("#! /bin/bash -e"));
        assert!(!is_shell_shebang("#!/usr/bin/env python3"));
        assert!(!is_shell_shebang("# /bin/sh"));
        assert!(!is_shell_shebang("#!/bin/busybox"));
    }

    #[test]
    fn here_documents() {
        let send = "cat > /a <<'EOF'\n#!/bin/sh\necho a\nEOF\nchmod 0755 /a; cat > /b <<'EOF'\n[Unit]\nEOF\n\
                    cat > /c <<'EOF'\n#!/bin/sh\necho c\nEOF";
        assert_eq!(here_document_scripts(send), ["#!/bin/sh\necho a\n", "#!/bin/sh\necho c\n"]);
        assert!(here_document_scripts("echo hi").is_empty());
    }

    /// Repository check: frr's first boot writes three scripts (vial-lesson-config,
    /// vial-lesson-resumed and vial-frr-exec), and lint finds them.
    #[test]
    fn finds_the_scripts_in_profiles() {
        let scripts = profile_scripts(&crate::project_root().join("vm-profiles")).unwrap();
        let frr = scripts.iter().filter(|(origin, _)| origin.contains("frr.toml")).count();
        assert_eq!(frr, 3, "{scripts:#?}");
        assert!(scripts.iter().any(|(_, script)| script.contains("all_wrap")), "{scripts:#?}");
    }

    /// Repository check: the scripts lint covers include CI's entry point and the guest's.
    #[test]
    fn finds_the_repository_scripts() {
        let root = crate::project_root();
        let scripts = shell_scripts(&root).unwrap();
        for expected in [".ci/run", "xtask/guest/linux/init.sh", "xtask/guest/linux/hotplug.sh"] {
            assert!(scripts.contains(&root.join(expected)), "{expected} not in {scripts:?}");
        }
        assert!(!scripts.iter().any(|p| p.starts_with(root.join("target"))), "{scripts:?}");
    }
}
