//! `cargo xtask bench`: what vial costs, as ratios against baselines measured in the same run
//! (DEVELOPERS.md). One module per section, named as on the command line: `bench vm`, `bench
//! net`, `bench images`, `bench lesson`; `cargo xtask bench` runs them in that order. The figures are printed,
//! never asserted.

pub(crate) mod images;
pub(crate) mod lesson;
pub(crate) mod net;
pub(crate) mod vm;
