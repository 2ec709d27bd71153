//! Storage: a narrow `Backend` trait (get, scan by prefix, guarded atomic
//! transaction, durable flush) and the sled implementation. The store only
//! ever sees ciphertext and metadata; it knows nothing of keys or kinds.

pub mod codec;
pub mod sled_backend;

use crate::error::Result;

/// One write of a transaction: `Some(value)` puts, `None` deletes.
pub type Write = (Vec<u8>, Option<Vec<u8>>);

/// An atomic multi-key change, guarded by what the caller read: it applies only
/// if every guarded key still has the expected value (`None` = absent).
#[derive(Default, Debug)]
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

/// The storage backend. Implementations: sled (embedded default).
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
}
