//! vial: run a virtual network appliance as a well-behaved container.
//!
//! Code map (one module per kernel or protocol object; the binaries in `src/bin/` only parse,
//! call and map to an exit code):

/// `vial snapshot`: boot the guest once and save it as the image's RAM snapshot.
pub mod capture;
/// The endpoint's configuration: the profile file, `VIAL_*` overrides, flags; validation.
pub mod config;
/// The endpoint container contract as `docker run` arguments, for tools that start endpoints.
pub mod contract;
/// The endpoint's data links over its life: waiting, stitching, hot-plug and unplug.
pub mod dataplane;
/// Exit codes of `vial`, as a documented enum mapped by a pure function.
pub mod exit;
/// Management forwards: relays from the management address to QEMU's loopback `hostfwd`.
pub mod forward;
/// The health socket: an HTTP/1.0 responder over a Unix socket, and the `vial health` client.
pub mod health;
/// Lessons (antidote-core v0.6+): the `lesson.meta.yaml` and `image.meta.yaml` models, validation
/// that reports every problem as `file:line:column`, and conversion of Syringe-era lessons.
pub mod lesson;
/// Logging set-up (tracing to stderr).
pub mod logging;
/// The container's interfaces: the management address, data-link discovery and waiting, TAP and
/// macvtap descriptors, and stitching links to VM NICs (tc, bridge, macvtap).
pub mod net;
/// The QEMU Machine Protocol client: commands, events and the run state they imply.
pub mod qmp;
/// Reaping orphans and the child-subreaper role.
pub mod reaper;
/// The endpoint's life cycle and the status that health reports.
pub mod state;
/// The supervisor: starts QEMU, watches it, stops it cleanly; the only place that ties it together.
pub mod supervisor;
/// Every `unsafe` block of the crate, behind safe wrappers.
pub mod sys;
/// The QEMU process: its argv (a pure function), acceleration probing, disk overlays, launch,
/// RAM snapshots.
pub mod vm;
