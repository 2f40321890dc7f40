//! vial: run virtual network appliances as well-behaved containers, and lessons made of them.
//!
//! Code map. Two programs share this library; `src/bin/*.rs` only parse, call and map to an
//! exit code. ARCHITECTURE.md tells how a start and a stop flow through these modules.
//!
//! **`vial`, PID 1 of an endpoint container** (inside the container only):
//! `supervisor` drives the endpoint's life from `config` through `net` (its links), `vm` (QEMU,
//! readiness, snapshots) and `qmp`, and reports through `status` and `health`.
//!
//! **`vialctl`, the host companion** (on the Docker host only): `lesson`, the lesson format.
//!
//! **Shared**: `exit`, `logging`, `rundir`, `contract`, `sys`.

/// The endpoint's configuration: the settings table (`VIAL_*`, flags), the profile, validation.
pub mod config;
/// The endpoint container contract as `docker run` arguments, for tools that start endpoints.
pub mod contract;
/// Exit codes: every setup failure as one typed error, and outcomes mapped to codes.
pub mod exit;
/// Management forwards: relays from the management address to QEMU's loopback `hostfwd`.
pub mod forward;
/// The health socket: an HTTP/1.0 responder over a Unix socket, and the `vial health` client.
pub mod health;
/// A lesson running on one container host (`vialctl`): plan, runtime (Docker), wiring,
/// readiness, stage configuration, state.
pub mod lab;
/// Lessons (antidote-core v0.6+): the `lesson.meta.yaml` and `image.meta.yaml` models, validation
/// that reports every problem as `file:line:column`, and conversion of Syringe-era lessons.
pub mod lesson;
/// Resource limits vial sets for itself at start (open descriptors).
pub mod limits;
/// Logging set-up (tracing to stderr) and error chains.
pub mod logging;
/// The container's interfaces: the management address, data links (discovery, waiting, TAP and
/// macvtap descriptors, stitching per plumbing mode, self-checks) and the data plane over the
/// endpoint's life.
pub mod net;
/// The QEMU Machine Protocol client: the wire, commands, events, NIC hot-plug, migration.
pub mod qmp;
/// Reaping orphans and the child-subreaper role.
pub mod reaper;
/// The run directory's files: the one place that names them.
pub mod rundir;
/// The endpoint's life cycle and the status that health reports (serde enums).
pub mod status;
/// The supervisor: starts QEMU, watches it, stops it cleanly; the only place that ties it together.
pub mod supervisor;
/// Every `unsafe` block of the crate, behind safe wrappers.
pub mod sys;
/// The VM: QEMU's argv (pure), accelerator, disk overlays, the QEMU process, readiness, RAM
/// snapshots (save and restore).
pub mod vm;
