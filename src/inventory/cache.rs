//! In-memory caches that keep sled and AES off the hot paths (lookup,
//! getattr, read), bounded so memory stays O(what is in use), and invalidated
//! by every commit. Decrypted material is held `mlock`ed and zeroized on drop.

use super::node::Node;
use crate::secret::SecretBytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const NODE_CAP: usize = 16_384;
const DIRENT_CAP: usize = 16_384;
const MATERIAL_CAP: usize = 1_024;

/// Plaintext pinned in RAM (best effort `mlock`), wiped when dropped.
struct Locked(SecretBytes);

impl Locked {
    fn new(s: SecretBytes) -> Self {
        crate::sys::mlock(s.expose().as_ptr(), s.len());
        Locked(s)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        let (p, n) = (self.0.expose().as_ptr(), self.0.len());
        self.0.expose_mut().zeroize();
        crate::sys::munlock(p, n);
    }
}

/// (parent id, name) → child id, or `None` when known absent.
type DirentMap = HashMap<(u64, Vec<u8>), Option<u64>>;

/// The caches of one open inventory.
#[derive(Default)]
pub struct Caches {
    epoch: AtomicU64,
    nodes: Mutex<HashMap<u64, Node>>,
    dirents: Mutex<DirentMap>,
    material: Mutex<HashMap<(u64, u32), Locked>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Caches {
    /// Current epoch; take it before reading the store, pass it to `put_*`.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
    /// Cached node.
    pub fn node(&self, id: u64) -> Option<Node> {
        lock(&self.nodes).get(&id).cloned()
    }
    /// Remember a node read at `epoch` (dropped if a commit happened since).
    pub fn put_node(&self, epoch: u64, n: &Node) {
        let mut m = lock(&self.nodes);
        if self.epoch() == epoch {
            if m.len() >= NODE_CAP {
                m.clear();
            }
            m.insert(n.id, n.clone());
        }
    }
    /// Cached directory entry (`Some(None)` = known absent).
    pub fn dirent(&self, parent: u64, name: &[u8]) -> Option<Option<u64>> {
        lock(&self.dirents).get(&(parent, name.to_vec())).copied()
    }
    /// Remember a directory entry read at `epoch`.
    pub fn put_dirent(&self, epoch: u64, parent: u64, name: &[u8], id: Option<u64>) {
        let mut m = lock(&self.dirents);
        if self.epoch() == epoch {
            if m.len() >= DIRENT_CAP {
                m.clear();
            }
            m.insert((parent, name.to_vec()), id);
        }
    }
    /// Cached plaintext of a version (versions are immutable once written).
    pub fn material(&self, id: u64, ver: u32) -> Option<SecretBytes> {
        lock(&self.material).get(&(id, ver)).map(|l| l.0.clone())
    }
    /// Remember plaintext of a version.
    pub fn put_material(&self, epoch: u64, id: u64, ver: u32, m: &SecretBytes) {
        let mut c = lock(&self.material);
        if self.epoch() == epoch {
            if c.len() >= MATERIAL_CAP {
                if let Some(k) = c.keys().next().copied() {
                    c.remove(&k);
                }
            }
            c.insert((id, ver), Locked::new(m.clone()));
        }
    }
    /// After a commit: forget everything the transaction wrote.
    pub fn invalidate(&self, writes: &[crate::store::Write]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let (mut nodes, mut dirents, mut material) =
            (lock(&self.nodes), lock(&self.dirents), lock(&self.material));
        for (k, _) in writes {
            match k.get(..2) {
                Some(b"n/") if k.len() == 10 => {
                    nodes.remove(&u64::from_be_bytes(k[2..10].try_into().expect("8 bytes")));
                }
                Some(b"d/") if k.len() >= 10 => {
                    dirents.remove(&(
                        u64::from_be_bytes(k[2..10].try_into().expect("8 bytes")),
                        k[10..].to_vec(),
                    ));
                }
                Some(b"b/") if k.len() == 14 => {
                    let id = u64::from_be_bytes(k[2..10].try_into().expect("8 bytes"));
                    let ver = u32::from_be_bytes(k[10..14].try_into().expect("4 bytes"));
                    material.remove(&(id, ver));
                }
                _ => {}
            }
        }
    }
    /// Drop everything (master-key rotation, compaction).
    pub fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        lock(&self.nodes).clear();
        lock(&self.dirents).clear();
        lock(&self.material).clear();
    }
}
