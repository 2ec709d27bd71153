//! The keyfs integration suite: one binary, one module per area.
//! Mounted tests need root and /dev/fuse (run them through `scripts/test.sh`).

mod common;
mod vectors;
mod model;
mod cli;
mod mount;
