//! `cargo xtask test`: the whole check, as CI runs it. Installs what is missing, runs `cargo
//! xtask lint` (shellcheck over the repository's shell scripts, clippy with warnings as
//! errors), builds the static binary and the test guest, then runs every test of the
//! workspace.

use anyhow::{Context, Result};

pub(crate) fn run(extra: &[&str]) -> Result<()> {
    crate::setup::run()?;
    // Before the tests, so that the run's last lines stay cargo test's summary.
    crate::lint::run()?;
    crate::dist::run()?;
    crate::guest::run()?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // No doc tests: there are none, and their empty summary would be the run's last line.
    let mut args = vec!["test", "--workspace", "--no-fail-fast", "--lib", "--bins", "--tests"];
    args.extend_from_slice(extra);
    crate::run_cmd(&cargo, &args).context("tests failed")
}
