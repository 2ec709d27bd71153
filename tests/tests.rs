//! The keyfs integration suite: one binary, one module per area.
//! Mounted tests need root and /dev/fuse (run them through `scripts/test.sh`).

mod backup;
mod cli;
mod common;
mod distributed;
mod fuzz_regressions;
mod messages;
mod model;
mod mount;
mod security;
mod vectors;
