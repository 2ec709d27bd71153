//! Sealed-record parser: `Sealed::decode`, then `StoreKeys::open` under the
//! master key, store id and record id of tests/data/vectors-v1.txt [seal sym32]
//! (so the seed opens and the fuzzer starts from the success path).
//! Invariant: never panics; decode is exact (encode gives the input back).
#![no_main]
use keyfs::crypto::{RecordId, Sealed, StoreKeys};
use keyfs::secret::{Key32, MasterKey};
use libfuzzer_sys::fuzz_target;

const MASTER: [u8; 32] = *b"\xb4\xc6\x5a\x62\x58\xee\x59\x42\x02\x55\x77\xe5\x8e\x21\x02\xae\xad\x32\x44\x73\xcd\x5c\x4a\x56\xd4\xac\x2d\x00\x29\x26\x12\x7d";
const STORE_ID: &[u8] = b"\xeb\xbf\xae\x7a\x26\x43\xd0\xbc\x44\x63\xa6\xcf\x17\xed\x92\xac";

fuzz_target!(|data: &[u8]| {
    let Ok(s) = Sealed::decode(data) else { return };
    assert_eq!(s.encode(), data, "decode is not exact");
    let keys = StoreKeys::derive(&MasterKey::from_key(Key32::new(MASTER)), STORE_ID);
    let id = RecordId {
        entry: 20,
        version: 1,
        kind: 3,
    };
    if let Ok(pt) = keys.open(id, &s) {
        assert_eq!(pt.expose().len() + 12 + 16, s.ciphertext.len());
    }
});
