//! The inventory's records: nodes (directories, keys, symlinks) with their
//! versions' metadata, and the storage keys they live under. Encoded with
//! [`crate::store::codec`]; layout in docs/FORMAT.md.

use super::kinds::KeyKind;
use crate::error::{Error, Kind, Result};
use crate::store::codec::{Dec, Enc};

/// Node id of the root directory.
pub const ROOT: u64 = 1;
/// Node id of `clients/`.
pub const CLIENTS: u64 = 2;
/// Node id of `poison/`.
pub const POISON: u64 = 3;
/// Node id of `audit/`.
pub const AUDIT_DIR: u64 = 4;
/// First id handed to user-created nodes.
pub const FIRST_FREE_ID: u64 = 16;
/// Node ids stay below this so inode numbers can encode versions.
pub const MAX_ID: u64 = 1 << 40;
/// Versions per key stay below this.
pub const MAX_VER: u32 = 1 << 20;

const OLD_BIT: u64 = 1 << 62;
const VER_BIT: u64 = 1 << 63;
const PUB_BIT: u64 = 1 << 61;
const STAGE_BIT: u64 = 1 << 60;
const SPECIAL_BIT: u64 = 1 << 59;

/// The hidden `.keyfs` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Special {
    /// `.keyfs/`
    Dir,
    /// `.keyfs/status`
    Status,
    /// `.keyfs/audit`
    Audit,
    /// `.keyfs/pending/`: unlinked versions waiting for `--destroy-delay`.
    Pending,
}

/// What an inode number names. Numbers are derived from stable node ids and
/// version numbers, so they survive remounts without an inode table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ino {
    /// A stored node (directory, key, symlink).
    Node(u64),
    /// `<key>.old/` of key node.
    Old(u64),
    /// An archived version of a key.
    Ver(u64, u32),
    /// The derived public key next to a private key node.
    Pub(u64),
    /// A file being written that is not committed yet (daemon memory only).
    Staged(u64),
    /// `.keyfs` entries.
    Special(Special),
}

impl Ino {
    /// Encode as an inode number.
    pub fn raw(self) -> u64 {
        match self {
            Ino::Node(id) => id,
            Ino::Old(id) => OLD_BIT | id,
            Ino::Ver(id, v) => VER_BIT | (id << 20) | v as u64,
            Ino::Pub(id) => PUB_BIT | id,
            Ino::Staged(n) => STAGE_BIT | n,
            Ino::Special(s) => {
                SPECIAL_BIT
                    | match s {
                        Special::Dir => 1,
                        Special::Status => 2,
                        Special::Audit => 3,
                        Special::Pending => 4,
                    }
            }
        }
    }
    /// Decode an inode number.
    pub fn from_raw(r: u64) -> Option<Ino> {
        if r & VER_BIT != 0 {
            let rest = r & !VER_BIT;
            return Some(Ino::Ver(rest >> 20, (rest & (MAX_VER as u64 - 1)) as u32));
        }
        if r & OLD_BIT != 0 {
            return Some(Ino::Old(r & !OLD_BIT));
        }
        if r & PUB_BIT != 0 {
            return Some(Ino::Pub(r & !PUB_BIT));
        }
        if r & STAGE_BIT != 0 {
            return Some(Ino::Staged(r & !STAGE_BIT));
        }
        if r & SPECIAL_BIT != 0 {
            return match r & !SPECIAL_BIT {
                1 => Some(Ino::Special(Special::Dir)),
                2 => Some(Ino::Special(Special::Status)),
                3 => Some(Ino::Special(Special::Audit)),
                4 => Some(Ino::Special(Special::Pending)),
                _ => None,
            };
        }
        if r == 0 || r >= MAX_ID {
            return None;
        }
        Some(Ino::Node(r))
    }
}

/// Metadata of one key version (the material itself is in a sealed blob).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ver {
    /// Version number, from 1, never reused within a key.
    pub ver: u32,
    /// Kind the material was validated and sealed as (part of the AAD).
    pub kind: KeyKind,
    /// When this version was created (imported, generated or rotated in), ns.
    pub created: i64,
    /// When it was archived (0 for the current version), ns; names it in `.old/`.
    pub archived_at: i64,
    /// Plaintext length.
    pub size: u32,
    /// SHA-256 of the material.
    pub fingerprint: [u8; 32],
    /// For a private key: its public key (SPKI PEM); public data, not secret.
    pub public: Vec<u8>,
}

/// A key node's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBody {
    /// The kind its name implies.
    pub kind: KeyKind,
    /// Next version number to assign.
    pub next_ver: u32,
    /// The current version, if any (a key may hold only history).
    pub current: Option<Ver>,
    /// Archived versions, oldest first, unique `archived_at`.
    pub archived: Vec<Ver>,
    /// `<name>.old/` was made explicitly (mkdir) and stays until rmdir.
    pub pinned: bool,
    /// The derived public key was unlinked; hidden until written back or rotated.
    pub pub_hidden: bool,
}

impl KeyBody {
    /// A new key with no versions.
    pub fn new(kind: KeyKind) -> Self {
        KeyBody {
            kind,
            next_ver: 1,
            current: None,
            archived: Vec::new(),
            pinned: false,
            pub_hidden: false,
        }
    }
    /// Is `<name>.old/` visible?
    pub fn history_visible(&self) -> bool {
        self.pinned || !self.archived.is_empty()
    }
    /// Is the node still needed at all?
    pub fn is_empty(&self) -> bool {
        self.current.is_none() && self.archived.is_empty() && !self.pinned
    }
    /// Find an archived version by its archive instant.
    pub fn archived_at(&self, ts: i64) -> Option<&Ver> {
        self.archived.iter().find(|v| v.archived_at == ts)
    }
    /// Any version (current or archived) by number.
    pub fn version(&self, ver: u32) -> Option<&Ver> {
        self.current
            .iter()
            .chain(self.archived.iter())
            .find(|v| v.ver == ver)
    }
    /// A free archive instant at or after `ts`.
    pub fn free_archive_ts(&self, ts: i64) -> i64 {
        // Upwards from `ts`; at the end of the range, downwards instead.
        let mut t = ts;
        while self.archived_at(t).is_some() {
            match t.checked_add(1) {
                Some(n) => t = n,
                None => {
                    t = ts;
                    while self.archived_at(t).is_some() {
                        t -= 1;
                    }
                    return t;
                }
            }
        }
        t
    }
    /// Insert an archived version keeping time order.
    pub fn push_archived(&mut self, v: Ver) {
        let pos = self
            .archived
            .partition_point(|a| a.archived_at < v.archived_at);
        self.archived.insert(pos, v);
    }
    /// Allocate a version number.
    pub fn alloc_ver(&mut self) -> Result<u32> {
        let v = self.next_ver;
        if v >= MAX_VER - 1 {
            return Err(Error::new(Kind::Perm, "this key has reached the limit of 1,048,574 versions; destroy it and import a new key"));
        }
        self.next_ver += 1;
        Ok(v)
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A directory with its number of subdirectories (for `st_nlink`).
    Dir {
        /// Child directories.
        subdirs: u32,
    },
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A key with its versions.
    Key(KeyBody),
}

/// A stored node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Stable id (inode number).
    pub id: u64,
    /// Parent directory's id (0 for the root).
    pub parent: u64,
    /// Name in the parent.
    pub name: Vec<u8>,
    /// Permission bits (07777).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time, ns.
    pub atime: i64,
    /// Modification time, ns.
    pub mtime: i64,
    /// Status-change time, ns.
    pub ctime: i64,
    /// Kind-specific part.
    pub body: Body,
}

const NODE_REC_VERSION: u8 = 1;

fn enc_ver(e: &mut Enc, v: &Ver) {
    e.u32(v.ver)
        .u8(v.kind as u8)
        .i64(v.created)
        .i64(v.archived_at)
        .u32(v.size)
        .bytes(&v.fingerprint)
        .bytes(&v.public);
}

fn dec_ver(d: &mut Dec<'_>) -> Result<Ver> {
    let ver = d.u32()?;
    let kind = KeyKind::from_code(d.u8()?)?;
    let created = d.i64()?;
    let archived_at = d.i64()?;
    let size = d.u32()?;
    let fp = d.bytes()?;
    let fingerprint: [u8; 32] = fp.try_into().map_err(|_| {
        Error::new(
            Kind::Integrity,
            "version fingerprint has the wrong length (corrupted record)",
        )
    })?;
    let public = d.bytes()?.to_vec();
    Ok(Ver {
        ver,
        kind,
        created,
        archived_at,
        size,
        fingerprint,
        public,
    })
}

impl Node {
    /// Is it a directory?
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }
    /// The key body, if a key.
    pub fn key(&self) -> Option<&KeyBody> {
        match &self.body {
            Body::Key(k) => Some(k),
            _ => None,
        }
    }
    /// Mutable key body, if a key.
    pub fn key_mut(&mut self) -> Option<&mut KeyBody> {
        match &mut self.body {
            Body::Key(k) => Some(k),
            _ => None,
        }
    }

    /// Encode for the store.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u8(NODE_REC_VERSION)
            .u64(self.id)
            .u64(self.parent)
            .bytes(&self.name)
            .u16(self.perm)
            .u32(self.uid)
            .u32(self.gid)
            .i64(self.atime)
            .i64(self.mtime)
            .i64(self.ctime);
        match &self.body {
            Body::Dir { subdirs } => {
                e.u8(0).u32(*subdirs);
            }
            Body::Symlink(t) => {
                e.u8(2).bytes(t);
            }
            Body::Key(k) => {
                e.u8(1)
                    .u8(k.kind as u8)
                    .u32(k.next_ver)
                    .u8(k.pinned as u8 | (k.pub_hidden as u8) << 1);
                match &k.current {
                    Some(v) => {
                        e.u8(1);
                        enc_ver(&mut e, v);
                    }
                    None => {
                        e.u8(0);
                    }
                }
                e.u32(k.archived.len() as u32);
                for v in &k.archived {
                    enc_ver(&mut e, v);
                }
            }
        }
        e.done()
    }

    /// Decode a stored node.
    pub fn decode(b: &[u8]) -> Result<Node> {
        let mut d = Dec::new(b, "node");
        let rv = d.u8()?;
        if rv != NODE_REC_VERSION {
            return Err(Error::new(
                Kind::Integrity,
                format!("node record version {rv} is not supported by this keyfs"),
            ));
        }
        let id = d.u64()?;
        let parent = d.u64()?;
        let name = d.bytes()?.to_vec();
        let perm = d.u16()?;
        let uid = d.u32()?;
        let gid = d.u32()?;
        let atime = d.i64()?;
        let mtime = d.i64()?;
        let ctime = d.i64()?;
        let body = match d.u8()? {
            0 => Body::Dir { subdirs: d.u32()? },
            2 => Body::Symlink(d.bytes()?.to_vec()),
            1 => {
                let kind = KeyKind::from_code(d.u8()?)?;
                let next_ver = d.u32()?;
                let flags = d.u8()?;
                let current = if d.u8()? == 1 {
                    Some(dec_ver(&mut d)?)
                } else {
                    None
                };
                let n = d.u32()? as usize;
                let mut archived = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    archived.push(dec_ver(&mut d)?);
                }
                Body::Key(KeyBody {
                    kind,
                    next_ver,
                    current,
                    archived,
                    pinned: flags & 1 != 0,
                    pub_hidden: flags & 2 != 0,
                })
            }
            t => {
                return Err(Error::new(
                    Kind::Integrity,
                    format!("unknown node type {t} (corrupted record)"),
                ))
            }
        };
        d.end()?;
        Ok(Node {
            id,
            parent,
            name,
            perm,
            uid,
            gid,
            atime,
            mtime,
            ctime,
            body,
        })
    }
}

/// Store key of a node record.
pub fn node_key(id: u64) -> Vec<u8> {
    let mut k = b"n/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Prefix of a directory's entries.
pub fn dirent_prefix(parent: u64) -> Vec<u8> {
    let mut k = b"d/".to_vec();
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

/// Store key of a directory entry (value: child id, 8 bytes).
pub fn dirent_key(parent: u64, name: &[u8]) -> Vec<u8> {
    let mut k = dirent_prefix(parent);
    k.extend_from_slice(name);
    k
}

/// Store key of a sealed version.
pub fn blob_key(id: u64, ver: u32) -> Vec<u8> {
    let mut k = b"b/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&ver.to_be_bytes());
    k
}

/// Store key of a tombstone.
pub fn tomb_key(id: u64, ver: u32) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&ver.to_be_bytes());
    k
}

/// A destroyed version's tombstone: identity, kind, time, uid — never material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Path of the key when destroyed.
    pub path: String,
    /// Entry id.
    pub entry: u64,
    /// Version number.
    pub ver: u32,
    /// Kind.
    pub kind: KeyKind,
    /// Created, ns.
    pub created: i64,
    /// Destroyed, ns.
    pub destroyed: i64,
    /// Who destroyed it.
    pub uid: u32,
}

impl Tombstone {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        Enc::default()
            .bytes(self.path.as_bytes())
            .u64(self.entry)
            .u32(self.ver)
            .u8(self.kind as u8)
            .i64(self.created)
            .i64(self.destroyed)
            .u32(self.uid)
            .done()
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut d = Dec::new(b, "tombstone");
        let t = Tombstone {
            path: String::from_utf8_lossy(d.bytes()?).into_owned(),
            entry: d.u64()?,
            ver: d.u32()?,
            kind: KeyKind::from_code(d.u8()?)?,
            created: d.i64()?,
            destroyed: d.i64()?,
            uid: d.u32()?,
        };
        d.end()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ino_roundtrip() {
        for i in [
            Ino::Node(1),
            Ino::Node(MAX_ID - 1),
            Ino::Old(17),
            Ino::Ver(MAX_ID - 1, MAX_VER - 1),
            Ino::Ver(5, 1),
            Ino::Pub(9),
            Ino::Staged(3),
            Ino::Special(Special::Audit),
        ] {
            assert_eq!(Ino::from_raw(i.raw()), Some(i), "{i:?}");
        }
        assert_eq!(Ino::from_raw(0), None);
    }

    #[test]
    fn node_roundtrip_and_corruption() {
        let v = Ver {
            ver: 2,
            kind: KeyKind::EcPrivate,
            created: 5,
            archived_at: 0,
            size: 10,
            fingerprint: [3; 32],
            public: b"pub".to_vec(),
        };
        let mut kb = KeyBody::new(KeyKind::EcPrivate);
        kb.current = Some(v.clone());
        kb.push_archived(Ver {
            ver: 1,
            archived_at: 9,
            ..v.clone()
        });
        kb.pinned = true;
        let n = Node {
            id: 20,
            parent: 2,
            name: b"k".to_vec(),
            perm: 0o600,
            uid: 1,
            gid: 2,
            atime: 3,
            mtime: 4,
            ctime: 5,
            body: Body::Key(kb),
        };
        let e = n.encode();
        assert_eq!(Node::decode(&e).unwrap(), n);
        for cut in [1, 10, e.len() - 1] {
            assert_eq!(Node::decode(&e[..cut]).unwrap_err().kind(), Kind::Integrity);
        }
        let d = Node {
            body: Body::Dir { subdirs: 3 },
            ..n.clone()
        };
        assert_eq!(Node::decode(&d.encode()).unwrap(), d);
        let s = Node {
            body: Body::Symlink(b"../x".to_vec()),
            ..n
        };
        assert_eq!(Node::decode(&s.encode()).unwrap(), s);
    }
}

/// Store key of a version scheduled for destruction.
pub fn pending_key(id: u64, ver: u32) -> Vec<u8> {
    let mut k = b"p/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(&ver.to_be_bytes());
    k
}

/// A version unlinked under `--destroy-delay`: still sealed in the store,
/// recoverable until `deadline`, then destroyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Entry id it belonged to (its sealed record is still under this id).
    pub entry: u64,
    /// Tree path it was unlinked from (`…/hmac` or `…/hmac.old/<ts>`).
    pub path: String,
    /// When it will be destroyed, ns.
    pub deadline: i64,
    /// When it was unlinked, ns.
    pub unlinked: i64,
    /// Owner, group and mode of its key.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The version's metadata.
    pub ver: Ver,
}

impl Pending {
    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.entry)
            .bytes(self.path.as_bytes())
            .i64(self.deadline)
            .i64(self.unlinked)
            .u32(self.uid)
            .u32(self.gid);
        enc_ver(&mut e, &self.ver);
        e.done()
    }
    /// Decode.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut d = Dec::new(b, "pending destruction");
        let p = Pending {
            entry: d.u64()?,
            path: String::from_utf8_lossy(d.bytes()?).into_owned(),
            deadline: d.i64()?,
            unlinked: d.i64()?,
            uid: d.u32()?,
            gid: d.u32()?,
            ver: dec_ver(&mut d)?,
        };
        d.end()?;
        Ok(p)
    }
    /// Its name in `.keyfs/pending/`: the path with `%` and `/` escaped, then `@v<version>`.
    pub fn name(&self) -> Vec<u8> {
        format!(
            "{}@v{}",
            self.path.replace('%', "%25").replace('/', "%2F"),
            self.ver.ver
        )
        .into_bytes()
    }
}
