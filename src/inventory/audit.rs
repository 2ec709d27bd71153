//! The audit log: append-only entries in the store, each HMAC-chained to the
//! previous one under the store's audit key, so an edited, reordered or
//! deleted entry is detected.

use super::names::format_ts;
use crate::crypto::{ct_eq, hmac_sha256};
use crate::error::{Error, Kind, Result};
use crate::secret::Key32;
use crate::store::{Backend, Txn};

/// Store key of the chain head (seq u64 || mac 32 || head MAC 32). The head
/// MAC (HMAC under the audit key) stops someone without the key from cutting
/// the log's tail and pointing the head at an earlier entry.
pub const HEAD_KEY: &[u8] = b"m/audit_head";

/// Who asked for an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    /// Caller's uid.
    pub uid: u32,
    /// Caller's gid.
    pub gid: u32,
    /// Caller's pid.
    pub pid: u32,
    /// Caller's process name.
    pub comm: String,
}

impl Ctx {
    /// This process (for CLI commands on a store).
    pub fn this_process() -> Ctx {
        let pid = std::process::id();
        Ctx {
            uid: crate::sys::geteuid(),
            gid: crate::sys::getegid(),
            pid,
            comm: crate::sys::process_name(pid),
        }
    }
}

/// One audit entry before it is written.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Operation: read, import, rotate, rollback, destroy, chmod, chown, mount, …
    pub op: &'static str,
    /// Tree path concerned.
    pub path: String,
    /// Entry id (0 when none).
    pub entry: u64,
    /// Version (0 when none).
    pub version: u32,
    /// "ok" or the failure.
    pub result: String,
}

impl Rec {
    /// A successful operation.
    pub fn ok(op: &'static str, path: impl Into<String>, entry: u64, version: u32) -> Self {
        Rec {
            op,
            path: path.into(),
            entry,
            version,
            result: "ok".into(),
        }
    }
}

fn entry_key(seq: u64) -> Vec<u8> {
    let mut k = b"a/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn chain_mac(key: &Key32, prev: &[u8; 32], seq: u64, line: &[u8]) -> [u8; 32] {
    hmac_sha256(key, &[b"keyfs-audit-v1", prev, &seq.to_be_bytes(), line])
}

/// The chain's head: last sequence number and MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Last written sequence number (0 when empty).
    pub seq: u64,
    /// Its MAC (zeros when empty).
    pub mac: [u8; 32],
}

impl Head {
    /// Read the head from the store.
    pub fn load(b: &dyn Backend) -> Result<Head> {
        match b.get(HEAD_KEY)? {
            None => Ok(Head {
                seq: 0,
                mac: [0; 32],
            }),
            Some(v) if v.len() == 72 => Ok(Head {
                seq: u64::from_be_bytes(v[..8].try_into().expect("8")),
                mac: v[8..40].try_into().expect("32"),
            }),
            Some(_) => Err(Error::new(
                Kind::Integrity,
                "audit chain head is corrupted; the store cannot be used safely — restore the store directory from a backup copy",
            )),
        }
    }

    /// Add `rec` to `txn` as the next entry; returns the new head (apply it after commit).
    pub fn stage(&self, key: &Key32, txn: &mut Txn, rec: &Rec, ctx: &Ctx, now: i64) -> Head {
        let line = format_line(now, rec, ctx);
        let seq = self.seq + 1;
        let mac = chain_mac(key, &self.mac, seq, line.as_bytes());
        let mut v = line.into_bytes();
        v.extend_from_slice(&mac);
        txn.put(entry_key(seq), v);
        let h = Head { seq, mac };
        txn.put(HEAD_KEY.to_vec(), h.encode(key));
        h
    }

    /// Guard a transaction on the head still being `self` (no other writer appended).
    pub fn guard(&self, key: &Key32, txn: &mut Txn) {
        txn.guard(
            HEAD_KEY.to_vec(),
            if self.seq == 0 {
                None
            } else {
                Some(self.encode(key))
            },
        );
    }

    fn head_mac(&self, key: &Key32) -> [u8; 32] {
        hmac_sha256(
            key,
            &[b"keyfs-audit-head-v1", &self.seq.to_be_bytes(), &self.mac],
        )
    }

    /// Stored form: seq || mac || HMAC(audit key, "keyfs-audit-head-v1" || seq || mac).
    pub fn encode(&self, key: &Key32) -> Vec<u8> {
        let mut h = self.seq.to_be_bytes().to_vec();
        h.extend_from_slice(&self.mac);
        h.extend_from_slice(&self.head_mac(key));
        h
    }
}

/// One line of the log as text.
pub fn format_line(now: i64, rec: &Rec, ctx: &Ctx) -> String {
    format!(
        "{} op={} path={:?} entry={} version={} uid={} gid={} pid={} comm={:?} result={}",
        format_ts(now),
        rec.op,
        rec.path,
        rec.entry,
        rec.version,
        ctx.uid,
        ctx.gid,
        ctx.pid,
        ctx.comm,
        rec.result
    )
}

/// All entries as text lines, oldest first (without MACs).
pub fn lines(b: &dyn Backend) -> Result<Vec<String>> {
    Ok(b.scan_prefix(b"a/")?
        .into_iter()
        .map(|(_, v)| String::from_utf8_lossy(&v[..v.len().saturating_sub(32)]).into_owned())
        .collect())
}

/// Verify the whole chain; returns one message per problem (empty = intact).
pub fn verify(b: &dyn Backend, key: &Key32) -> Result<Vec<String>> {
    let head = match Head::load(b) {
        Ok(h) => h,
        Err(e) => return Ok(vec![e.message().to_string()]),
    };
    let mut problems = Vec::new();
    match b.get(HEAD_KEY)? {
        // Every store has at least its `init` entry, so a missing head means deletion.
        None => problems.push("audit chain head is missing: the log was deleted".to_string()),
        Some(raw) => {
            if !ct_eq(&raw, &head.encode(key)) {
                problems.push("audit chain head was altered (head MAC mismatch): entries at the end were probably deleted".to_string());
            }
        }
    }
    let mut prev = [0u8; 32];
    let mut expect_seq = 1u64;
    for (k, v) in b.scan_prefix(b"a/")? {
        let seq = match k.get(2..10).and_then(|s| s.try_into().ok()) {
            Some(s) => u64::from_be_bytes(s),
            None => {
                problems.push("audit log has a malformed entry key".to_string());
                continue;
            }
        };
        if seq < expect_seq {
            problems.push(format!("audit entry {seq} is out of order (inserted)"));
        } else if seq != expect_seq {
            problems.push(format!(
                "audit entries {expect_seq}..{} are missing (deleted)",
                seq - 1
            ));
        }
        if v.len() < 32 {
            problems.push(format!("audit entry {seq} is truncated"));
            expect_seq = seq.saturating_add(1);
            continue;
        }
        let (line, mac) = v.split_at(v.len() - 32);
        if !ct_eq(&chain_mac(key, &prev, seq, line), mac) {
            problems.push(format!(
                "audit entry {seq} was altered or its predecessor was removed (MAC mismatch)"
            ));
        }
        prev = mac.try_into().expect("32");
        expect_seq = seq.saturating_add(1);
    }
    if expect_seq - 1 != head.seq {
        problems.push(format!(
            "audit log ends at entry {} but its head records {}: entries were deleted",
            expect_seq - 1,
            head.seq
        ));
    } else if head.seq > 0 && !ct_eq(&prev, &head.mac) {
        problems.push("audit chain head does not match the last entry".to_string());
    }
    Ok(problems)
}
