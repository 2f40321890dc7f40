//! Logging set-up: `tracing` to stderr (Docker keeps it as the container's log), filtered by
//! `VIAL_LOG` (e.g. `debug`, `vial=debug`); `info` by default.

/// Installs the subscriber once (`VIAL_LOG`, `info` by default); later calls do nothing.
pub fn init() {
    init_with("VIAL_LOG", "info");
}

/// Installs the subscriber once, filtered by the variable `var` or else by `default`.
pub fn init_with(var: &str, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(var)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal; container logs and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

/// An error and its causes on one line (`a: b: c`), for logs and status reasons.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
