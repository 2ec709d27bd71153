//! keyfs: a FUSE filesystem that mounts a sealed key inventory as a directory tree.
//!
//! Layers, each calling only downwards:
//! `fs` (FUSE adapter and filesystem core) → `inventory` (the domain) →
//! `crypto` and `store` → `secret`.

#![deny(missing_docs)]

pub mod cli;
pub mod crypto;
pub mod error;
pub mod fs;
pub mod inventory;
pub mod secret;
pub mod store;
pub mod sys;

pub use error::{Error, Kind, Result};
