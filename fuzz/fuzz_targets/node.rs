//! Node record decoder (`Node::decode`, over the codec of src/store/codec.rs).
//! Invariants: never panics; when decode succeeds, decode(encode(n)) == n and
//! encode is a fixed point (encode(decode(encode(n))) == encode(n)).
#![no_main]
use keyfs::inventory::node::Node;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(n) = Node::decode(data) else { return };
    let e = n.encode();
    let n2 = Node::decode(&e).expect("re-decoding an encoded node failed");
    assert_eq!(n2, n);
    assert_eq!(n2.encode(), e);
});
