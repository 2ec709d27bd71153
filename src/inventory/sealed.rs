//! The sealed view's file format: one key version as a self-describing,
//! authenticated record that can be copied by backup tools and restored into
//! any store that has the same master key. Layout in docs/FORMAT.md §8.

use super::kinds::KeyKind;
use crate::crypto::{self, ct_eq, hmac_sha256};
use crate::error::{Error, Kind, Result};
use crate::secret::{Key32, MasterKey};
use crate::store::codec::{Dec, Enc};

/// First bytes of every sealed file.
pub const MAGIC: &[u8] = b"KEYFS-SEALED-1\n";
const MAC_LEN: usize = 32;

/// One key version, sealed, with the identity it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedFile {
    /// Id of the store that sealed it (selects the key-encryption key).
    pub store_id: Vec<u8>,
    /// Tree path of the key (`clients/alice01/storage`).
    pub path: String,
    /// Entry id in the sealing store (part of the record's AAD).
    pub entry: u64,
    /// Version number (part of the AAD).
    pub version: u32,
    /// Kind (part of the AAD).
    pub kind: KeyKind,
    /// Created, ns.
    pub created: i64,
    /// Archive instant, ns; 0 for a current version.
    pub archived_at: i64,
    /// `Sealed::encode` of the version.
    pub sealed: Vec<u8>,
}

/// Key of the outer MAC: HKDF(master, salt = store_id, "keyfs v1 sealed-file mac").
pub fn mac_key(master: &MasterKey, store_id: &[u8]) -> Key32 {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(store_id), master.0.expose());
    let mut out = [0u8; 32];
    hk.expand(b"keyfs v1 sealed-file mac", &mut out)
        .expect("32 is a valid HKDF length");
    Key32::new(out)
}

/// Size of the encoded file for a key path and plaintext size, without building it.
pub fn encoded_len(store_id_len: usize, path_len: usize, material_len: usize) -> u64 {
    let sealed = 2 + crypto::WRAPPED_LEN + crypto::NONCE_LEN + material_len + crypto::TAG_LEN;
    (MAGIC.len() + 4 + store_id_len + 4 + path_len + 8 + 4 + 1 + 8 + 8 + 4 + sealed + MAC_LEN)
        as u64
}

impl SealedFile {
    /// Encode and authenticate under `master`.
    pub fn encode(&self, master: &MasterKey) -> Vec<u8> {
        let mut e = Enc::default();
        e.bytes(&self.store_id)
            .bytes(self.path.as_bytes())
            .u64(self.entry)
            .u32(self.version)
            .u8(self.kind as u8)
            .i64(self.created)
            .i64(self.archived_at)
            .bytes(&self.sealed);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&e.done());
        let mac = hmac_sha256(&mac_key(master, &self.store_id), &[&out]);
        out.extend_from_slice(&mac);
        out
    }

    /// Parse and authenticate. A file not made under `master`, or altered, is `Integrity`;
    /// one that is not a sealed file at all is `Invalid`.
    pub fn decode(b: &[u8], master: &MasterKey) -> Result<SealedFile> {
        let not_sealed = || {
            Error::new(Kind::Invalid, "not a keyfs sealed file (bad header); a sealed mount accepts only files copied from a sealed mount")
        };
        if !b.starts_with(MAGIC) || b.len() < MAGIC.len() + MAC_LEN {
            return Err(not_sealed());
        }
        let (body, mac) = b.split_at(b.len() - MAC_LEN);
        let mut d = Dec::new(&body[MAGIC.len()..], "sealed file");
        let store_id = d.bytes().map_err(|_| not_sealed())?.to_vec();
        if store_id.len() != 16 {
            return Err(not_sealed());
        }
        if !ct_eq(&hmac_sha256(&mac_key(master, &store_id), &[body]), mac) {
            return Err(Error::new(
                Kind::Integrity,
                "sealed file does not authenticate: it was altered, truncated, or sealed under another master key",
            ));
        }
        let f = SealedFile {
            store_id,
            path: String::from_utf8(d.bytes()?.to_vec()).map_err(|_| not_sealed())?,
            entry: d.u64()?,
            version: d.u32()?,
            kind: KeyKind::from_code(d.u8()?)?,
            created: d.i64()?,
            archived_at: d.i64()?,
            sealed: d.bytes()?.to_vec(),
        };
        d.end()?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk(b: u8) -> MasterKey {
        MasterKey::from_key(Key32::new([b; 32]))
    }

    #[test]
    fn roundtrip_tamper_and_foreign_key() {
        let f = SealedFile {
            store_id: vec![7; 16],
            path: "clients/alice01/hmac".into(),
            entry: 20,
            version: 3,
            kind: KeyKind::Sym32,
            created: 5,
            archived_at: 0,
            sealed: vec![1, 2, 3],
        };
        let e = f.encode(&mk(1));
        assert_eq!(
            e.len() as u64,
            encoded_len(16, f.path.len(), 3) - (2 + 60 + 12 + 16) as u64
        );
        assert_eq!(SealedFile::decode(&e, &mk(1)).unwrap(), f);
        assert_eq!(
            SealedFile::decode(&e, &mk(2)).unwrap_err().kind(),
            Kind::Integrity
        );
        for i in [MAGIC.len() + 5, e.len() / 2, e.len() - 1] {
            let mut t = e.clone();
            t[i] ^= 1;
            assert_eq!(
                SealedFile::decode(&t, &mk(1)).unwrap_err().kind(),
                Kind::Integrity,
                "flip at {i}"
            );
        }
        assert_eq!(
            SealedFile::decode(&e[..e.len() - 3], &mk(1))
                .unwrap_err()
                .kind(),
            Kind::Integrity
        );
        assert_eq!(
            SealedFile::decode(b"hello", &mk(1)).unwrap_err().kind(),
            Kind::Invalid
        );
    }
}
