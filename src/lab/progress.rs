//! The live view of `vialctl up`: one line per endpoint with its phase and how long it has
//! taken, redrawn in place on a terminal; on anything else, one plain line per change (logs
//! and CI read those). Only prints.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Where an endpoint is in `up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet (waiting for a cold-boot slot, or for its turn).
    Waiting,
    /// Its container exists.
    Created,
    /// Started, its links moved in.
    Wired,
    /// vial reports it booting (or waiting for links, plumbing).
    Booting,
    /// vial (or the container) reports it ready.
    Ready,
    /// Its presentations are probed.
    Probing,
    /// Its stage configuration runs.
    Configuring,
    /// Usable.
    Done,
    /// It failed.
    Failed,
}

impl Phase {
    /// Its name on screen.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Created => "created",
            Phase::Wired => "wired",
            Phase::Booting => "booting",
            Phase::Ready => "ready",
            Phase::Probing => "probing",
            Phase::Configuring => "configuring",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

struct Row {
    endpoint: String,
    phase: Phase,
    detail: String,
    finished: Option<Instant>,
}

struct Inner {
    started: Instant,
    rows: Vec<Row>,
    /// Lines drawn last time (terminal only).
    drawn: usize,
}

/// The display; clones share it.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Mutex<Inner>>,
    terminal: bool,
}

impl Progress {
    /// A display of `endpoints`, all waiting; on a terminal when stdout is one.
    pub fn new(endpoints: &[String]) -> Progress {
        let rows = endpoints
            .iter()
            .map(|e| Row { endpoint: e.clone(), phase: Phase::Waiting, detail: String::new(), finished: None })
            .collect();
        let inner = Inner { started: Instant::now(), rows, drawn: 0 };
        let progress = Progress { inner: Arc::new(Mutex::new(inner)), terminal: std::io::stdout().is_terminal() };
        if progress.terminal {
            progress.draw();
        }
        progress
    }

    /// Moves `endpoint` to `phase`, with a detail (`cli on 127.0.0.1:32771`).
    pub fn set(&self, endpoint: &str, phase: Phase, detail: impl Into<String>) {
        let detail = detail.into();
        let line = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let elapsed = inner.started.elapsed().as_secs_f64();
            let Some(row) = inner.rows.iter_mut().find(|r| r.endpoint == endpoint) else { return };
            if row.phase == phase && row.detail == detail {
                return;
            }
            row.phase = phase;
            row.detail.clone_from(&detail);
            if matches!(phase, Phase::Done | Phase::Failed) {
                row.finished = Some(Instant::now());
            }
            format!("{elapsed:7.1}s  {endpoint:<16} {:<12} {detail}", phase.as_str())
        };
        if self.terminal {
            self.draw();
        } else {
            println!("{}", line.trim_end());
        }
    }

    /// Redraws the table in place (terminal only); called on each change and by a ticker.
    pub fn draw(&self) {
        if !self.terminal {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let mut out = String::new();
        if inner.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", inner.drawn));
        }
        for row in &inner.rows {
            let elapsed = row.finished.unwrap_or(now).duration_since(inner.started).as_secs_f64();
            out.push_str(&format!(
                "\x1b[2K  {:<16} {:<12} {elapsed:6.1}s  {}\n",
                row.endpoint,
                row.phase.as_str(),
                row.detail
            ));
        }
        inner.drawn = inner.rows.len();
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    /// Whether the display redraws in place.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }
}

/// The `status` table: one line per endpoint, its links below it.
pub fn status_table(lesson: &str, statuses: &[super::EndpointStatus]) -> String {
    let mut out = format!(
        "lesson {lesson}\n{:<14} {:<24} {:<10} {:<12} {:<16} PORTS\n",
        "ENDPOINT", "IMAGE", "CONTAINER", "HEALTH", "ADDRESS"
    );
    for status in statuses {
        let ports: Vec<String> = status.ports.iter().map(|(c, h)| format!("{c}->{h}")).collect();
        let address = status.address.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<14} {:<24} {:<10} {:<12} {:<16} {}\n",
            status.endpoint,
            status.image,
            status.container,
            status.health,
            address,
            ports.join(" ")
        ));
        for link in &status.links {
            out.push_str(&format!("  {:<6} -> {:<20} {}\n", link.iface, link.peer, link.state));
        }
    }
    out
}
