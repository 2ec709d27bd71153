//! All cryptography of keyfs: the AEAD, the envelope that seals each key
//! version, key derivation from the master key, and master-key sources.
//! This is the only module that names `aes-gcm`.

pub mod master;

use crate::error::{Error, Kind, Result};
use crate::secret::{Key32, MasterKey, SecretBytes};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Version of the sealed-record format. Part of every record's associated data.
pub const FORMAT_VERSION: u16 = 1;
/// AES-GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Length of a wrapped data key: nonce + 32-byte key + tag.
pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

/// Fill `buf` from the OS CSPRNG. Panics only if the kernel has no entropy source,
/// in which case no key could be generated safely anyway.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("the OS random number generator failed");
}

/// Keys derived from the master key, held for the life of an open store.
pub struct StoreKeys {
    kek: Key32,
}

impl std::fmt::Debug for StoreKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKeys([REDACTED])")
    }
}

fn hkdf(master: &MasterKey, salt: &[u8], info: &[u8]) -> Key32 {
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), master.0.expose());
    let mut out = [0u8; 32];
    hk.expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Key32::new(out)
}

/// The key-check value stored for `master`: HKDF output that cannot be
/// inverted, compared at open so a wrong master key is reported before any
/// record is touched.
pub fn key_check_value(master: &MasterKey, store_id: &[u8]) -> [u8; 32] {
    *hkdf(master, store_id, b"keyfs v1 key-check value").expose()
}

/// Constant-time equality for fixed-size secrets and MACs.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl StoreKeys {
    /// Derive the key-encryption key for a store.
    pub fn derive(master: &MasterKey, store_id: &[u8]) -> Self {
        StoreKeys {
            kek: hkdf(master, store_id, b"keyfs v1 key-encryption key"),
        }
    }

    /// Wrap a 32-byte key (data key, audit key) under the KEK, bound to `aad`.
    pub fn wrap(&self, key: &Key32, aad: &[u8]) -> Vec<u8> {
        seal_raw(&self.kek, key.expose(), aad)
    }

    /// Unwrap a key wrapped by [`wrap`](Self::wrap).
    pub fn unwrap(&self, wrapped: &[u8], aad: &[u8]) -> Result<Key32> {
        let pt = open_raw(&self.kek, wrapped, aad)?;
        Key32::from_slice(pt.expose())
            .ok_or_else(|| Error::new(Kind::Integrity, "wrapped key has the wrong length"))
    }
}

/// AES-256-GCM seal: output is nonce || ciphertext || tag.
pub fn seal_raw(key: &Key32, pt: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.expose().into());
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce);
    let ct = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: pt, aad })
        .expect("AES-GCM encryption of at most 64 KiB cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// AES-256-GCM open of [`seal_raw`] output. Authentication failure is `Integrity`.
pub fn open_raw(key: &Key32, sealed: &[u8], aad: &[u8]) -> Result<SecretBytes> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(Error::new(Kind::Integrity, "sealed data is truncated"));
    }
    let cipher = Aes256Gcm::new(key.expose().into());
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map(SecretBytes::new)
        .map_err(|_| Error::new(Kind::Integrity, "authentication failed (tampered, truncated, moved, or sealed under another master key)"))
}

/// Identity a sealed version is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    /// Stable entry (node) id.
    pub entry: u64,
    /// Version number within the entry.
    pub version: u32,
    /// Kind code of the material.
    pub kind: u8,
}

impl RecordId {
    /// Associated data: domain, format version, entry id, version, kind.
    pub fn aad(&self, domain: &[u8]) -> Vec<u8> {
        let mut a = Vec::with_capacity(domain.len() + 15);
        a.extend_from_slice(domain);
        a.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        a.extend_from_slice(&self.entry.to_be_bytes());
        a.extend_from_slice(&self.version.to_be_bytes());
        a.push(self.kind);
        a
    }
}

const AAD_DATA: &[u8] = b"keyfs-data";
const AAD_WRAP: &[u8] = b"keyfs-wrap";

/// A sealed key version: the wrapped data key and the ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Data key wrapped under the KEK (nonce || ct || tag).
    pub wrapped_dk: Vec<u8>,
    /// Material under the data key (nonce || ct || tag).
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Sealed({} + {} bytes)",
            self.wrapped_dk.len(),
            self.ciphertext.len()
        )
    }
}

impl Sealed {
    /// Encode: format (2) || wrapped_dk (60) || ciphertext.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.wrapped_dk.len() + self.ciphertext.len());
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&self.wrapped_dk);
        out.extend_from_slice(&self.ciphertext);
        out
    }
    /// Decode [`encode`](Self::encode) output.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < 2 + WRAPPED_LEN + NONCE_LEN + TAG_LEN {
            return Err(Error::new(Kind::Integrity, "sealed record is truncated"));
        }
        let fv = u16::from_be_bytes([b[0], b[1]]);
        if fv != FORMAT_VERSION {
            return Err(Error::new(
                Kind::Integrity,
                format!("sealed record has format version {fv}, this keyfs reads {FORMAT_VERSION}; upgrade keyfs"),
            ));
        }
        Ok(Sealed {
            wrapped_dk: b[2..2 + WRAPPED_LEN].to_vec(),
            ciphertext: b[2 + WRAPPED_LEN..].to_vec(),
        })
    }
}

impl StoreKeys {
    /// Seal one key version under a fresh random data key.
    pub fn seal(&self, id: RecordId, material: &[u8]) -> Sealed {
        let dk = Key32::random();
        Sealed {
            wrapped_dk: self.wrap(&dk, &id.aad(AAD_WRAP)),
            ciphertext: seal_raw(&dk, material, &id.aad(AAD_DATA)),
        }
    }

    /// Open a sealed version; fails with `Integrity` if anything was changed or moved.
    pub fn open(&self, id: RecordId, s: &Sealed) -> Result<SecretBytes> {
        let dk = self.unwrap(&s.wrapped_dk, &id.aad(AAD_WRAP))?;
        open_raw(&dk, &s.ciphertext, &id.aad(AAD_DATA))
    }

    /// Re-wrap the data key of `s` from `self` to `to` (master-key rotation).
    pub fn rewrap(&self, to: &StoreKeys, id: RecordId, s: &Sealed) -> Result<Sealed> {
        let dk = self.unwrap(&s.wrapped_dk, &id.aad(AAD_WRAP))?;
        Ok(Sealed {
            wrapped_dk: to.wrap(&dk, &id.aad(AAD_WRAP)),
            ciphertext: s.ciphertext.clone(),
        })
    }
}

/// SHA-256 of key material, hex (the `user.keyfs.fingerprint` value).
pub fn fingerprint(material: &[u8]) -> [u8; 32] {
    Sha256::digest(material).into()
}

/// HMAC-SHA256.
pub fn hmac_sha256(key: &Key32, parts: &[&[u8]]) -> [u8; 32] {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(key.expose()).expect("HMAC accepts any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parse lower/upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(b: u8) -> StoreKeys {
        StoreKeys::derive(&MasterKey::from_key(Key32::new([b; 32])), b"store-id")
    }

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let k = keys(1);
        let id = RecordId {
            entry: 7,
            version: 2,
            kind: 3,
        };
        let s = k.seal(id, b"material");
        assert_eq!(k.open(id, &s).unwrap().expose(), b"material");
        for other in [
            RecordId { entry: 8, ..id },
            RecordId { version: 3, ..id },
            RecordId { kind: 4, ..id },
        ] {
            assert_eq!(k.open(other, &s).unwrap_err().kind(), Kind::Integrity);
        }
        assert_eq!(keys(2).open(id, &s).unwrap_err().kind(), Kind::Integrity);
        let mut t = s.clone();
        let n = t.ciphertext.len();
        t.ciphertext[n - 1] ^= 1;
        assert_eq!(k.open(id, &t).unwrap_err().kind(), Kind::Integrity);
    }

    #[test]
    fn encode_decode_and_truncation() {
        let k = keys(1);
        let id = RecordId {
            entry: 1,
            version: 1,
            kind: 1,
        };
        let s = k.seal(id, b"");
        let e = s.encode();
        assert_eq!(Sealed::decode(&e).unwrap(), s);
        assert_eq!(
            Sealed::decode(&e[..20]).unwrap_err().kind(),
            Kind::Integrity
        );
        let mut bad = e.clone();
        bad[1] = 9;
        assert!(Sealed::decode(&bad)
            .unwrap_err()
            .message()
            .contains("format version"));
    }

    #[test]
    fn rewrap_keeps_material() {
        let (a, b) = (keys(1), keys(2));
        let id = RecordId {
            entry: 1,
            version: 1,
            kind: 1,
        };
        let s = a.seal(id, b"x");
        let r = a.rewrap(&b, id, &s).unwrap();
        assert_eq!(b.open(id, &r).unwrap().expose(), b"x");
        assert!(a.open(id, &r).is_err());
    }

    #[test]
    fn hex_roundtrip() {
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), vec![0, 255, 16]);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }
}
