//! The VM: QEMU's argv (a pure function of the validated profile and the runtime inputs), the
//! choice of accelerator, the disk overlays, the QEMU process, readiness, and RAM snapshots.
//! Only `snapshot` talks QMP (to save and load a guest); nothing here decides when to stop the
//! VM (that is the supervisor's job).

pub mod accel;
pub mod argv;
pub mod console;
pub mod disk;
pub mod qemu;
pub mod readiness;
pub mod snapshot;
pub mod user;

pub use accel::{resolve_accel, Accel};
pub use argv::{qemu_argv, Launch};
