//! The sealed view's file parser, `SealedFile::decode` (src/inventory/sealed.rs).
//! The outer HMAC would stop random bytes at the header, so each input is
//! tried twice: as a whole file, and as the body of a file that carries a
//! valid MAC under the fixed master key (the fuzzer then reaches the fields).
//! Invariants: never panics; a file that decodes encodes back to the same bytes.
#![no_main]
use keyfs::crypto::hmac_sha256;
use keyfs::inventory::sealed::{mac_key, SealedFile, MAGIC};
use keyfs::secret::{Key32, MasterKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let master = MasterKey::from_key(Key32::new([7; 32]));
    let _ = SealedFile::decode(data, &master);
    // The store id the body declares (u32 length prefix), as decode reads it.
    let n = data
        .get(..4)
        .map_or(0, |l| u32::from_be_bytes(l.try_into().unwrap()) as usize);
    let store_id = data.get(4..4usize.saturating_add(n)).unwrap_or(&[]);
    let mut file = [MAGIC, data].concat();
    let mac = hmac_sha256(&mac_key(&master, store_id), &[file.as_slice()]);
    file.extend_from_slice(&mac);
    if let Ok(f) = SealedFile::decode(&file, &master) {
        assert_eq!(f.encode(&master), file, "decode is not exact");
    }
});
