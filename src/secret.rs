//! Secret-holding types. Every buffer that may hold key material or a master
//! key lives in one of these: zeroized on drop, `Debug` redacted, contents
//! reachable only through an explicit accessor, long-lived ones `mlock`ed.

use zeroize::{Zeroize, Zeroizing};

/// A 32-byte key (master key, key-encryption key, data key, audit key).
pub struct Key32(Box<[u8; 32]>);

impl Key32 {
    /// Take ownership of key bytes; the source array is zeroized.
    pub fn new(mut bytes: [u8; 32]) -> Self {
        let mut b = Box::new([0u8; 32]);
        b.copy_from_slice(&bytes);
        bytes.zeroize();
        crate::sys::mlock(b.as_ptr(), 32);
        Key32(b)
    }
    /// Copy from a slice of exactly 32 bytes.
    pub fn from_slice(s: &[u8]) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        Some(Key32::new(a))
    }
    /// Fresh random key from the OS.
    pub fn random() -> Self {
        let mut a = [0u8; 32];
        crate::crypto::fill_random(&mut a);
        Key32::new(a)
    }
    /// The key bytes. Callers hand them to a cipher and do not copy them.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for Key32 {
    fn drop(&mut self) {
        self.0.zeroize();
        crate::sys::munlock(self.0.as_ptr(), 32);
    }
}

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32([REDACTED])")
    }
}

/// The master key: a [`Key32`] that only the crypto layer may open.
pub struct MasterKey(pub(crate) Key32);

impl MasterKey {
    /// Wrap 32 bytes as a master key.
    pub fn from_key(k: Key32) -> Self {
        MasterKey(k)
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

/// Plaintext key material of arbitrary length (0..=64 KiB).
#[derive(Clone, Default)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Take ownership of a buffer.
    pub fn new(v: Vec<u8>) -> Self {
        SecretBytes(Zeroizing::new(v))
    }
    /// Copy a slice.
    pub fn from_slice(s: &[u8]) -> Self {
        SecretBytes(Zeroizing::new(s.to_vec()))
    }
    /// The bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    /// Mutable access for building the buffer in place (write handles).
    /// Growth reallocates; the old allocation is zeroized first.
    pub fn expose_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Resize, zeroizing any allocation that is given up.
    pub fn resize(&mut self, n: usize) {
        if n > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(n.max(self.0.len() * 2)));
            bigger.extend_from_slice(&self.0);
            self.0 = bigger; // old Zeroizing buffer is wiped on drop
        }
        if n < self.0.len() {
            self.0[n..].zeroize();
        }
        self.0.resize(n, 0);
    }
    /// Write `data` at `offset`, growing as needed.
    pub fn write_at(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if end > self.0.len() {
            self.resize(end);
        }
        self.0[offset..end].copy_from_slice(data);
    }
}

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let k = Key32::new([0x41; 32]);
        let s = SecretBytes::from_slice(b"hunter2hunter2");
        let m = MasterKey::from_key(Key32::new([0x42; 32]));
        let out = format!("{k:?} {s:?} {m:?}");
        assert!(!out.contains("41") && !out.contains("hunter2") && !out.contains("42"));
        assert!(out.contains("REDACTED"));
    }

    #[test]
    fn resize_and_write_at() {
        let mut s = SecretBytes::default();
        s.write_at(3, b"abc");
        assert_eq!(s.expose(), b"\0\0\0abc");
        s.resize(4);
        assert_eq!(s.expose(), b"\0\0\0a");
        s.write_at(0, b"xyz12");
        assert_eq!(s.expose(), b"xyz12");
    }
}
