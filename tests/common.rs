//! Shared helpers for the integration suite.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fresh temp dir per test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("keyfs-test-").tempdir().expect("tempdir")
}

/// Path of the keyfs binary built for this test run.
pub fn keyfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyfs"))
}

/// A base64 master key (fixed per call site) and a 0600 file holding it.
pub fn master_key_file(dir: &Path, byte: u8) -> (PathBuf, String) {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let b64 = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let p = dir.join(format!("master-{byte}.key"));
    std::fs::write(&p, &b64).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    (p, b64)
}
