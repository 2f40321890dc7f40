//! What vial's tests and benchmarks share, written once: `integration/`, `xtask`'s benches and
//! demo, and vial's own unit tests use it. It never depends on `vial` (vial dev-depends on it)
//! and never decides what a test asserts; it only sets up, polls, measures and cleans up.
//!
//! Set-up that can fail for a reason outside the test (not root, no `ip`, no Docker engine)
//! returns an error whose `Debug` is its message and causes, so `.unwrap()` in a test fails
//! with the reason; a benchmark passes it on with `?`.

/// Docker networks in 198.18.X.0/24 and containers, removed on drop.
pub mod docker;
/// Anonymous network namespaces, each lived in by a thread of its own.
pub mod netns;
/// The endpoint sandbox: `vial` as PID 1 of its own namespaces, eth0 a veth to the host.
pub mod sandbox;
/// Figures of a benchmark: medians and elapsed times.
pub mod stats;
/// Directories that are removed when dropped.
pub mod temp;
/// Poll with a timeout, never sleep as a way to wait: `wait_until`, sync and async.
pub mod wait;

pub use temp::TempDir;
pub use wait::{wait_until, wait_until_async};

use std::fmt;

/// Writes `error` and each of its causes, for the `Debug` of testkit's errors: a test's
/// `.unwrap()` then prints what went wrong instead of a struct dump.
pub(crate) fn write_chain(error: &dyn std::error::Error, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{error}")?;
    let mut source = error.source();
    while let Some(cause) = source {
        write!(f, ": {cause}")?;
        source = cause.source();
    }
    Ok(())
}

/// `Debug` as the message and its causes (see [`write_chain`]).
macro_rules! debug_as_chain {
    ($error:ty) => {
        impl std::fmt::Debug for $error {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                crate::write_chain(self, f)
            }
        }
    };
}
pub(crate) use debug_as_chain;
