//! Where the master key comes from: a file, a command (KMS/Vault/HSM hook),
//! or `KEYFS_MASTER_KEY`. First match wins.

use crate::error::{Error, Kind, Result};
use crate::secret::{Key32, MasterKey};
use base64::Engine;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Environment variable holding a base64 master key.
pub const ENV_VAR: &str = "KEYFS_MASTER_KEY";

/// A configured master-key source.
#[derive(Debug, Clone, Default)]
pub struct MasterKeySource {
    /// `--master-key-file`
    pub file: Option<PathBuf>,
    /// `--master-key-command`
    pub command: Option<String>,
}

fn mk_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::MasterKey, msg)
}

/// Decode base64 text (surrounding whitespace allowed) into exactly 32 bytes.
pub fn decode_base64_key(text: &[u8], origin: &str) -> Result<MasterKey> {
    let trimmed: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let trimmed = Zeroizing::new(trimmed);
    if trimmed.is_empty() {
        return Err(mk_err(format!("master key from {origin} is empty; generate one with `keyfs init STORE --generate-master-key FILE`")));
    }
    let raw = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(&*trimmed)
            .map_err(|_| mk_err(format!("master key from {origin} is not valid base64; it must be 32 random bytes, base64-encoded (as written by `keyfs init --generate-master-key`)")))?,
    );
    Key32::from_slice(&raw).map(MasterKey::from_key).ok_or_else(|| {
        mk_err(format!(
            "master key from {origin} decodes to {} bytes, but keyfs needs exactly 32; generate one with `keyfs init STORE --generate-master-key FILE`",
            raw.len()
        ))
    })
}

/// Read a master-key file: raw 32 bytes or base64. Refused when group/other can access it.
pub fn read_key_file(path: &Path) -> Result<MasterKey> {
    let meta = std::fs::metadata(path).map_err(|e| {
        mk_err(format!(
            "cannot read master key file {}: {e}; check the path given to --master-key-file or --new-master-key-file",
            path.display()
        ))
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(mk_err(format!(
            "master key file {} has mode {mode:04o}, readable by group or others; run `chmod 600 {}`",
            path.display(),
            path.display()
        )));
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| {
        mk_err(format!(
            "cannot read master key file {}: {e}; it must be a regular file this user can read (mode 0600)",
            path.display()
        ))
    })?);
    if bytes.len() == 32 && decode_base64_key(&bytes, "").is_err() {
        return Ok(MasterKey::from_key(
            Key32::from_slice(&bytes).expect("length checked"),
        ));
    }
    decode_base64_key(&bytes, &format!("file {}", path.display()))
}

impl MasterKeySource {
    /// True when any source is configured (flags or environment).
    pub fn is_configured(&self) -> bool {
        self.file.is_some() || self.command.is_some() || std::env::var_os(ENV_VAR).is_some()
    }

    /// Load the master key from the first configured source.
    pub fn load(&self) -> Result<MasterKey> {
        if let Some(f) = &self.file {
            return read_key_file(f);
        }
        if let Some(cmd) = &self.command {
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(cmd)
                .stderr(std::process::Stdio::inherit())
                .output()
                .map_err(|e| mk_err(format!("cannot run --master-key-command: {e}")))?;
            let stdout = Zeroizing::new(out.stdout);
            if !out.status.success() {
                return Err(mk_err(format!(
                    "--master-key-command exited with {}; run it by hand to see why",
                    out.status
                )));
            }
            return decode_base64_key(&stdout, "--master-key-command");
        }
        if let Some(v) = std::env::var_os(ENV_VAR) {
            use std::os::unix::ffi::OsStrExt;
            let v = Zeroizing::new(v.as_bytes().to_vec());
            return decode_base64_key(&v, ENV_VAR);
        }
        Err(mk_err(format!(
            "no master key given; pass --master-key-file FILE, --master-key-command CMD, or set {ENV_VAR} (base64 of 32 bytes)"
        )))
    }
}

/// Write a fresh random master key, base64, to `path` with mode 0600.
/// Refuses to overwrite an existing file.
pub fn generate_key_file(path: &Path) -> Result<MasterKey> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = Key32::random();
    let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                mk_err(format!("{} already exists; keyfs will not overwrite a master key — choose another path", path.display()))
            } else {
                mk_err(format!("cannot create master key file {}: {e}", path.display()))
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| {
            mk_err(format!(
                "cannot write master key file {}: {e}",
                path.display()
            ))
        })?;
    Ok(MasterKey::from_key(key))
}

/// Base64 of a master key (used to write export keys and test fixtures).
pub fn encode_base64(k: &Key32) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(k.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_lengths() {
        let b64 = base64::engine::general_purpose::STANDARD;
        assert!(decode_base64_key(b64.encode([1u8; 32]).as_bytes(), "t").is_ok());
        let short = decode_base64_key(b64.encode([1u8; 16]).as_bytes(), "t").unwrap_err();
        assert_eq!(short.kind(), Kind::MasterKey);
        assert!(short.message().contains("16 bytes"));
        assert!(decode_base64_key(b64.encode([1u8; 33]).as_bytes(), "t")
            .unwrap_err()
            .message()
            .contains("33 bytes"));
        assert!(decode_base64_key(b"!!!not base64", "t")
            .unwrap_err()
            .message()
            .contains("not valid base64"));
        assert!(decode_base64_key(b"  \n", "t")
            .unwrap_err()
            .message()
            .contains("empty"));
    }

    #[test]
    fn file_modes_and_raw() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mk");
        generate_key_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(read_key_file(&p).is_ok());
        assert_eq!(generate_key_file(&p).unwrap_err().kind(), Kind::MasterKey);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_key_file(&p)
            .unwrap_err()
            .message()
            .contains("chmod 600"));
        let raw = d.path().join("raw");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = read_key_file(&raw).unwrap();
        assert_eq!(k.0.expose(), &[7u8; 32]);
    }
}
