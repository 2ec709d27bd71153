//! The Acra v1 layout (`--layout=acra-v1`, SPEC §5): the same keys under
//! Acra's v1 file names. Only the top level differs from the tree layout, so
//! this module maps top-level names to (directory, name) of the tree:
//!
//! | Acra v1 name               | tree                          |
//! |----------------------------|-------------------------------|
//! | `<ClientID>_storage`       | `clients/<ClientID>/storage`  |
//! | `<ClientID>_storage.pub`   | `clients/<ClientID>/storage.pub` |
//! | `<ClientID>_storage_sym`   | `clients/<ClientID>/storage_sym` |
//! | `<ClientID>_hmac`          | `clients/<ClientID>/hmac`     |
//! | `<file>.old/`              | `<tree file>.old/`            |
//! | `.poison_key/…`            | `poison/…`                    |
//! | `secure_log_key`           | `audit/secure_log_key`        |

use crate::inventory::names::{history_of, ClientId};
use crate::inventory::node;

/// Per-client key names Acra v1 knows, longest first so suffixes match uniquely.
pub const CLIENT_KINDS: &[&str] = &["storage.pub", "storage_sym", "storage", "hmac"];

/// Where a top-level Acra name lives in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// A fixed directory of the tree (`.poison_key` → `poison`).
    Dir(u64),
    /// `name` in the fixed directory `dir` (`secure_log_key` in `audit/`).
    InDir(u64, Vec<u8>),
    /// `name` in `clients/<client>/`.
    Client(ClientId, Vec<u8>),
    /// Not an Acra key name (a writer's temporary file).
    Unmapped,
}

/// Map a top-level name of the Acra layout.
pub fn map(name: &[u8]) -> Mapped {
    if name == b".poison_key" {
        return Mapped::Dir(node::POISON);
    }
    let (base, old) = match history_of(name) {
        Some(b) => (b, true),
        None => (name, false),
    };
    let with_old = |n: &[u8]| {
        let mut v = n.to_vec();
        if old {
            v.extend_from_slice(b".old");
        }
        v
    };
    if base == b"secure_log_key" {
        return Mapped::InDir(node::AUDIT_DIR, with_old(base));
    }
    for kind in CLIENT_KINDS {
        let suffix = format!("_{kind}");
        if let Some(client) = base.strip_suffix(suffix.as_bytes()) {
            if let Ok(c) = ClientId::parse(client) {
                return Mapped::Client(c, with_old(kind.as_bytes()));
            }
        }
    }
    Mapped::Unmapped
}

/// The Acra name of `name` in client `client`'s directory, if Acra has one.
pub fn client_name(client: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let base = history_of(name).unwrap_or(name);
    if CLIENT_KINDS.iter().any(|k| k.as_bytes() == base) {
        let mut v = client.to_vec();
        v.push(b'_');
        v.extend_from_slice(name);
        Some(v)
    } else {
        None
    }
}

/// Parse an archive name as Acra writes it (`2006-01-02T15:04:05.999999999`,
/// UTC, no zone, trailing zeros of the fraction dropped) or as keyfs does.
pub fn parse_archive_name(s: &[u8]) -> Option<i64> {
    if let Some(t) = crate::inventory::names::parse_ts(s) {
        return Some(t);
    }
    let s = std::str::from_utf8(s).ok()?;
    let (secs, frac) = match s.split_once('.') {
        Some((a, f)) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|c| c.is_ascii_digit()) => {
            (a, f)
        }
        Some(_) => return None,
        None => (s, ""),
    };
    let padded = format!("{secs}.{frac:0<9}Z");
    crate::inventory::names::parse_ts(padded.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            map(b"alice01_storage"),
            Mapped::Client(ClientId::parse(b"alice01").unwrap(), b"storage".to_vec())
        );
        assert_eq!(
            map(b"bob_02_storage_sym"),
            Mapped::Client(ClientId::parse(b"bob_02").unwrap(), b"storage_sym".to_vec())
        );
        assert_eq!(
            map(b"bob_02_storage.pub"),
            Mapped::Client(ClientId::parse(b"bob_02").unwrap(), b"storage.pub".to_vec())
        );
        assert_eq!(
            map(b"carol03_hmac.old"),
            Mapped::Client(ClientId::parse(b"carol03").unwrap(), b"hmac.old".to_vec())
        );
        assert_eq!(map(b".poison_key"), Mapped::Dir(node::POISON));
        assert_eq!(
            map(b"secure_log_key.old"),
            Mapped::InDir(node::AUDIT_DIR, b"secure_log_key.old".to_vec())
        );
        assert_eq!(map(b"abc_storage"), Mapped::Unmapped, "ClientID too short");
        assert_eq!(map(b"alice01_storage_sym123456"), Mapped::Unmapped);
        assert_eq!(
            client_name(b"alice01", b"storage_sym.old").unwrap(),
            b"alice01_storage_sym.old"
        );
        assert_eq!(client_name(b"alice01", b"notes"), None);
    }

    #[test]
    fn archive_names() {
        let keyfs = crate::inventory::names::parse_ts(b"2026-11-28T21:40:05.120000000Z").unwrap();
        assert_eq!(parse_archive_name(b"2026-11-28T21:40:05.12"), Some(keyfs));
        assert_eq!(
            parse_archive_name(b"2026-11-28T21:40:05.120000000Z"),
            Some(keyfs)
        );
        assert_eq!(
            parse_archive_name(b"2026-11-28T21:40:05"),
            Some(keyfs - 120_000_000)
        );
        assert_eq!(parse_archive_name(b"2026-11-28T21:40:05."), None);
        assert_eq!(parse_archive_name(b"yesterday"), None);
    }
}
