//! The keyfs integration suite: one binary, one module per area.
//! Mounted tests need root and /dev/fuse (run them through `scripts/test.sh`).

mod cli;
mod common;
mod messages;
mod model;
mod mount;
mod vectors;
