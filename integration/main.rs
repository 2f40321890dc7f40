//! End-to-end tests against the real kernel, real QEMU (TCG) and the real `vial` binary.
//! Each test that boots a VM runs `vial` as PID 1 of its own sandbox: new PID, network and
//! mount namespaces, with eth0 a veth whose peer stays with the test. They need root, QEMU
//! and the test guest (`cargo xtask guest`); `cargo xtask test` prepares all of it.

mod support;

mod config_errors;
mod curriculum;
mod dataplane;
mod images;
mod lesson;
mod pid1;
mod snapshot;
mod vialctl;
