//! The QEMU process: its argv (a pure function of the validated profile and the runtime
//! inputs), the choice of accelerator, the disk overlays, and the launch itself. This module
//! never talks QMP and never decides when to stop the VM (that is the supervisor's job).

pub mod accel;
pub mod argv;
pub mod disk;
pub mod launch;
pub mod snapshot;

pub use accel::{resolve_accel, Accel};
pub use argv::{qemu_argv, Launch};
