//! sled implementation of [`Backend`].

use super::{Backend, Txn, TxnOutcome};
use crate::error::{Error, Kind, Result};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::path::Path;

/// A sled database holding one keyfs store.
///
/// sled does not recover from a failed write inside a running process: after
/// an I/O error (a full disk) the next flush can block forever, and what it
/// serves from memory may differ from what is on disk. So the first write
/// error *fences* the backend: every later call fails at once with that
/// error, and the process must reopen the store (remount), when sled
/// recovers the last durable state from its log.
pub struct SledBackend {
    db: std::mem::ManuallyDrop<sled::Db>,
    fenced: std::sync::Mutex<Option<Error>>,
    /// `fenced` is set (checked first, so the read path takes no lock).
    is_fenced: std::sync::atomic::AtomicBool,
}

impl Drop for SledBackend {
    fn drop(&mut self) {
        if self.fence_error().is_none() {
            // SAFETY: dropped once, here; `db` is not used afterwards.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.db) };
        }
        // Fenced: sled's drop flushes, and after a failed write that flush
        // can block forever. Leave it to the process exit.
    }
}

impl SledBackend {
    /// Open (or create) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // sled releases its flock on `db/db` only when the background threads
        // of a dropped `Db` finish (spacejam/sled#1234), so a reopen in the
        // same process can find it held for a moment. Callers hold the store's
        // own lock, so the holder is most likely such a lingering handle: wait
        // up to 2 s before calling the store busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let r = sled::Config::new()
                .path(path)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(Some(500))
                // Bounded page cache: memory stays O(what is in use), not O(inventory).
                .cache_capacity(32 * 1024 * 1024)
                .open();
            match r {
                Ok(db) => {
                    return Ok(SledBackend {
                        db: std::mem::ManuallyDrop::new(db),
                        fenced: std::sync::Mutex::new(None),
                        is_fenced: std::sync::atomic::AtomicBool::new(false),
                    })
                }
                Err(sled::Error::Io(ref io)) if is_lock_error(io) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(Error::new(
                            Kind::Busy,
                            format!("the store database {} is in use by another process; stop the other keyfs (or `keyfs umount` its mountpoint) and retry", path.display()),
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(Error::from(e).context(format!("opening {}", path.display()))),
            }
        }
    }
}

impl SledBackend {
    fn fence_error(&self) -> Option<Error> {
        self.fenced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fail at once when an earlier write failed.
    fn check(&self) -> Result<()> {
        if !self.is_fenced.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        match self.fence_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A write failed: remember why, and refuse everything from now on.
    fn fence(&self, e: sled::Error) -> Error {
        let enospc = matches!(&e, sled::Error::Io(io) if io.raw_os_error() == Some(libc::ENOSPC));
        let err = if enospc {
            Error::new(
                Kind::NoSpace,
                "the disk holding the store is full (No space left on device): this change was not made, and keyfs stopped using the store so that what is on disk stays consistent; free space, then remount (`keyfs umount MNT`, `keyfs mount STORE MNT`)",
            )
        } else {
            Error::new(
                Kind::Store,
                format!("writing the store failed ({e}): this change was not made, and keyfs stopped using the store so that what is on disk stays consistent; check the disk and the store directory, then remount (`keyfs umount MNT`, `keyfs mount STORE MNT`)"),
            )
        };
        log::error!("{}", err.message());
        let mut f = self.fenced.lock().unwrap_or_else(|p| p.into_inner());
        let e = f.get_or_insert(err).clone();
        self.is_fenced
            .store(true, std::sync::atomic::Ordering::Release);
        e
    }
}

/// sled reports a held lock as `ErrorKind::Other` "could not acquire lock …".
fn is_lock_error(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock")
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.check()?;
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.check()?;
        self.db
            .scan_prefix(prefix)
            .map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(Error::from)
            })
            .collect()
    }

    fn transact(&self, txn: &Txn) -> Result<TxnOutcome> {
        self.check()?;
        let r = self.db.transaction(|t| {
            for (k, expected) in &txn.guards {
                let cur = t.get(k)?;
                if cur.as_deref() != expected.as_deref() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
            }
            for (k, v) in &txn.writes {
                match v {
                    Some(v) => {
                        t.insert(k.as_slice(), v.as_slice())?;
                    }
                    None => {
                        t.remove(k.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match r {
            Ok(()) => Ok(TxnOutcome::Committed),
            Err(TransactionError::Abort(())) => Ok(TxnOutcome::Conflict),
            Err(TransactionError::Storage(e)) => Err(self.fence(e)),
        }
    }

    fn flush(&self) -> Result<()> {
        self.check()?;
        match self.db.flush() {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fence(e)),
        }
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_transactions() {
        let d = tempfile::tempdir().unwrap();
        let b = SledBackend::open(&d.path().join("db")).unwrap();
        let mut t = Txn::default();
        t.guard(b"a".to_vec(), None);
        t.put(b"a".to_vec(), b"1".to_vec());
        t.put(b"p/1".to_vec(), b"x".to_vec());
        t.put(b"p/2".to_vec(), b"y".to_vec());
        assert_eq!(b.transact(&t).unwrap(), TxnOutcome::Committed);
        // Same guard now fails and writes nothing.
        let mut t2 = Txn::default();
        t2.guard(b"a".to_vec(), None);
        t2.put(b"b".to_vec(), b"2".to_vec());
        assert_eq!(b.transact(&t2).unwrap(), TxnOutcome::Conflict);
        assert_eq!(b.get(b"b").unwrap(), None);
        let mut t3 = Txn::default();
        t3.guard(b"a".to_vec(), Some(b"1".to_vec()));
        t3.delete(b"p/1".to_vec());
        assert_eq!(b.transact(&t3).unwrap(), TxnOutcome::Committed);
        b.flush().unwrap();
        let s = b.scan_prefix(b"p/").unwrap();
        assert_eq!(s, vec![(b"p/2".to_vec(), b"y".to_vec())]);
    }
}
