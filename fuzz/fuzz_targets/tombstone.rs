//! Tombstone record decoder. Invariants: never panics; when decode succeeds,
//! decode(encode(t)) == t.
#![no_main]
use keyfs::inventory::node::Tombstone;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Tombstone::decode(data) else {
        return;
    };
    let e = t.encode();
    let t2 = Tombstone::decode(&e).expect("re-decoding an encoded tombstone failed");
    assert_eq!(t2, t);
    assert_eq!(t2.encode(), e);
});
