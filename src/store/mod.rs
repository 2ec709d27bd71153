//! Storage: a narrow `Backend` trait (get, scan by prefix, guarded atomic
//! transaction, durable flush, watch for other writers' changes) with two
//! implementations: sled (embedded, one writer) and etcd (several hosts
//! sharing one inventory). The store only ever sees ciphertext and
//! metadata; it knows nothing of keys or kinds.

pub mod codec;
pub mod etcd_backend;
pub mod sled_backend;

use crate::error::Result;

/// One write of a transaction: `Some(value)` puts, `None` deletes.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// An atomic multi-key change, guarded by what the caller read: it applies only
/// if every guarded key still has the expected value (`None` = absent).
#[derive(Default, Debug, Clone)]
pub struct Txn {
    /// Keys and the values they must still have.
    pub guards: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Writes applied in order when the guards hold.
    pub writes: Vec<Write>,
}

impl Txn {
    /// Guard that `key` still holds `value`.
    pub fn guard(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.guards.push((key, value));
    }
    /// Put a value.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.push((key, Some(value)));
    }
    /// Delete a key.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.push((key, None));
    }
}

/// Outcome of a guarded transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Applied.
    Committed,
    /// A guard did not hold; nothing was written. The caller re-reads and retries.
    Conflict,
}

/// One change made by another writer, as a watch reports it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The key.
    pub key: Vec<u8>,
    /// Its value before the change (`None`: it did not exist).
    pub before: Option<Vec<u8>>,
    /// Its value after the change (`None`: deleted).
    pub after: Option<Vec<u8>>,
}

/// Called with each batch of changes a watch delivers, after local reads
/// already return the new values.
pub type Listener = Box<dyn Fn(&[Change]) + Send + Sync>;

/// How current the local view of a shared store is (for `.keyfs/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// "sled" or "etcd".
    pub backend: &'static str,
    /// Revision the local view reflects (etcd; 0 for sled).
    pub revision: i64,
    /// The local view is known to be current (always true for sled).
    pub synced: bool,
    /// The last attempt to reach the store succeeded (changes can be tried).
    pub reachable: bool,
    /// Why the last attempt failed (empty when reachable).
    pub error: String,
    /// Milliseconds since the local view was last confirmed current.
    pub lag_ms: u64,
}

/// The storage backend. Implementations: sled (embedded default), etcd.
pub trait Backend: Send + Sync {
    /// Read one value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Apply `txn` atomically if its guards hold.
    fn transact(&self, txn: &Txn) -> Result<TxnOutcome>;
    /// Make every committed transaction durable (fsync).
    fn flush(&self) -> Result<()>;
    /// Size on disk in bytes (for statfs and status).
    fn size_on_disk(&self) -> u64;
    /// Can other processes or hosts change the store while it is open? When
    /// they can, the caller re-reads counters before each change and
    /// registers a [`Listener`] to hear of the changes.
    fn shared(&self) -> bool {
        false
    }
    /// Can changes be tried now? A shared store that cannot be reached
    /// refuses them (after waiting out a short outage such as an election),
    /// so that a change fails at once instead of after a timeout.
    fn writable(&self) -> Result<()> {
        Ok(())
    }
    /// Hear of every change made by other writers (a no-op where there are none).
    fn watch(&self, _listener: Listener) {}
    /// How current the local view is.
    fn health(&self) -> Health {
        Health {
            backend: "sled",
            revision: 0,
            synced: true,
            reachable: true,
            error: String::new(),
            lag_ms: 0,
        }
    }
    /// Physically discard destroyed and superseded data kept by the backend
    /// itself (etcd's revision history). `None`: not applicable here (sled
    /// is compacted by rewriting its files). Returns bytes before and after.
    fn reclaim(&self) -> Result<Option<(u64, u64)>> {
        Ok(None)
    }
}
