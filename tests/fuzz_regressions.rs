//! Regression tests for the parsers fuzzed under fuzz/ (run them with
//! `scripts/fuzz.sh`): every crash a fuzz target found is replayed here with
//! its exact input, next to hand-picked nasty inputs (empty input, u32::MAX
//! length prefixes, truncated UTF-8, out-of-range timestamps). Each asserts
//! the documented result — an `Err` (or `None`) instead of a panic, and no
//! change to the store after a refused import.
//!
//! Fuzz targets (fuzz/fuzz_targets/): `sealed` (Sealed::decode +
//! StoreKeys::open), `node` and `tombstone` (record decoders, round trips),
//! `names` (ClientId::parse, validate_component, history_of, parse_ts),
//! `import` (the export bundle's JSON through Inventory::import) and
//! `sealed_file` (the sealed view's file format, SealedFile::decode).

use keyfs::crypto::{self, RecordId, Sealed, StoreKeys};
use keyfs::inventory::audit::Ctx;
use keyfs::inventory::names::{format_ts, history_of, parse_ts, validate_component, ClientId};
use keyfs::inventory::node::{Ino, Node, Tombstone, ROOT};
use keyfs::inventory::sealed;
use keyfs::inventory::{FType, Inventory, OpenOptions};
use keyfs::secret::{Key32, MasterKey};
use keyfs::Kind;

// ---------------------------------------------------------------------------
// Sealed records (fuzz target `sealed`)
// ---------------------------------------------------------------------------

/// Shortest input `Sealed::decode` accepts: format (2) + wrapped key (60) +
/// nonce and tag of an empty ciphertext (28).
const SEALED_MIN: usize = 2 + crypto::WRAPPED_LEN + crypto::NONCE_LEN + crypto::TAG_LEN;

fn store_keys() -> StoreKeys {
    StoreKeys::derive(&MasterKey::from_key(Key32::new([7; 32])), b"fuzz-store")
}

const RID: RecordId = RecordId {
    entry: 20,
    version: 1,
    kind: 3,
};

#[test]
fn sealed_decode_rejects_empty_short_and_foreign_format() {
    for len in [0, 1, 2, SEALED_MIN - 1] {
        let mut b = vec![0u8; len];
        if len >= 2 {
            b[1] = 1;
        }
        let e = Sealed::decode(&b).unwrap_err();
        assert_eq!(e.kind(), Kind::Integrity, "{len} bytes");
    }
    for fv in [0u16, 2, u16::MAX] {
        let mut b = vec![0u8; SEALED_MIN];
        b[..2].copy_from_slice(&fv.to_be_bytes());
        let e = Sealed::decode(&b).unwrap_err();
        assert_eq!(e.kind(), Kind::Integrity);
        assert!(e.message().contains("format version"), "{}", e.message());
    }
}

#[test]
fn sealed_open_of_garbage_is_an_integrity_error() {
    let keys = store_keys();
    for fill in [0x00u8, 0xff] {
        for len in [SEALED_MIN, SEALED_MIN + 1, 4096] {
            let mut b = vec![fill; len];
            b[..2].copy_from_slice(&crypto::FORMAT_VERSION.to_be_bytes());
            let s = Sealed::decode(&b).expect("long enough to decode");
            assert_eq!(s.encode(), b, "decode is exact");
            assert_eq!(keys.open(RID, &s).unwrap_err().kind(), Kind::Integrity);
        }
    }
    // Built directly, bypassing decode's length check: still only an error.
    for (w, c) in [(0, 0), (crypto::WRAPPED_LEN, 0), (0, 100), (27, 27)] {
        let s = Sealed {
            wrapped_dk: vec![1; w],
            ciphertext: vec![2; c],
        };
        assert_eq!(keys.open(RID, &s).unwrap_err().kind(), Kind::Integrity);
    }
    // A real record with its data part cut below nonce + tag.
    let mut s = keys.seal(RID, b"material");
    s.ciphertext
        .truncate(crypto::NONCE_LEN + crypto::TAG_LEN - 1);
    assert_eq!(keys.open(RID, &s).unwrap_err().kind(), Kind::Integrity);
}

// ---------------------------------------------------------------------------
// Sealed-view files (fuzz target `sealed_file`)
// ---------------------------------------------------------------------------

/// MAGIC || `body` || a valid MAC under `master()` for the store id `sid`.
fn sealed_file(sid: &[u8], body: &[u8]) -> Vec<u8> {
    let mut f = [sealed::MAGIC, body].concat();
    let mac = crypto::hmac_sha256(&sealed::mac_key(&master(), sid), &[f.as_slice()]);
    f.extend_from_slice(&mac);
    f
}

/// A sealed file's body up to (not including) the path.
fn sealed_head(sid: &[u8]) -> Vec<u8> {
    let mut b = (sid.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(sid);
    b
}

#[test]
fn sealed_file_decode_refuses_short_foreign_and_unauthenticated_input() {
    let m = master();
    let invalid = |b: &[u8], what: &str| {
        let e = sealed::SealedFile::decode(b, &m).unwrap_err();
        assert_eq!(e.kind(), Kind::Invalid, "{what}: {}", e.message());
    };
    invalid(b"", "empty");
    invalid(sealed::MAGIC, "magic only");
    invalid(&[sealed::MAGIC, &[0; 31]].concat(), "magic + 31 bytes");
    invalid(
        &[sealed::MAGIC, &[0; 32]].concat(),
        "magic + an all-zero MAC",
    );
    invalid(
        &[b"KEYFS-EXPORT-1\n", &[0; 64][..]].concat(),
        "an export bundle",
    );
    // Store id length u32::MAX, or not 16 bytes: not a sealed file.
    let mut huge = sealed::MAGIC.to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    huge.extend_from_slice(&[0; 40]);
    invalid(&huge, "store id length u32::MAX");
    invalid(
        &sealed_file(&[1; 15], &sealed_head(&[1; 15])),
        "15-byte store id",
    );
    // A well-formed head under another master key, or a flipped MAC.
    let sid = [3u8; 16];
    let mut f = sealed_file(&sid, &sealed_head(&sid));
    *f.last_mut().unwrap() ^= 1;
    let e = sealed::SealedFile::decode(&f, &m).unwrap_err();
    assert_eq!(e.kind(), Kind::Integrity);
}

#[test]
fn sealed_file_decode_of_authenticated_garbage_is_an_error() {
    let m = master();
    let sid = [3u8; 16];
    // Authenticated, but the fields stop after the store id / have a path of
    // length u32::MAX / a path that is truncated UTF-8 / a trailing byte.
    let mut u32max = sealed_head(&sid);
    u32max.extend_from_slice(&u32::MAX.to_be_bytes());
    u32max.extend_from_slice(b"clients/x");
    let mut bad_utf8 = sealed_head(&sid);
    bad_utf8.extend_from_slice(&2u32.to_be_bytes());
    bad_utf8.extend_from_slice(b"a\xc3");
    bad_utf8.extend_from_slice(&[0; 8 + 4 + 1 + 8 + 8 + 4]);
    let mut ok = sealed_head(&sid);
    ok.extend_from_slice(&1u32.to_be_bytes());
    ok.push(b'k');
    ok.extend_from_slice(&[0; 8 + 4 + 1 + 8 + 8]);
    ok.extend_from_slice(&0u32.to_be_bytes());
    let good = sealed_file(&sid, &ok);
    let f = sealed::SealedFile::decode(&good, &m).expect("a minimal file decodes");
    assert_eq!(f.encode(&m), good, "decode is exact");
    let mut trailing = ok.clone();
    trailing.push(0);
    let mut kind9 = ok.clone();
    kind9[sealed_head(&sid).len() + 4 + 1 + 8 + 4] = 9;
    for (body, kind, what) in [
        (
            sealed_head(&sid),
            Kind::Integrity,
            "no fields after the store id",
        ),
        (u32max, Kind::Integrity, "path length u32::MAX"),
        (bad_utf8, Kind::Invalid, "truncated UTF-8 path"),
        (trailing, Kind::Integrity, "trailing byte"),
        (kind9, Kind::Integrity, "kind code 9"),
    ] {
        let e = sealed::SealedFile::decode(&sealed_file(&sid, &body), &m).unwrap_err();
        assert_eq!(e.kind(), kind, "{what}: {}", e.message());
    }
}

// ---------------------------------------------------------------------------
// Node and tombstone records (fuzz targets `node`, `tombstone`)
// ---------------------------------------------------------------------------

/// A node record's fixed head (version 1, id 20, parent 2) up to the name.
fn node_head() -> Vec<u8> {
    let mut b = vec![1u8];
    b.extend_from_slice(&20u64.to_be_bytes());
    b.extend_from_slice(&2u64.to_be_bytes());
    b
}

/// Head + name "k" + perm, uid, gid, three times: a complete prefix up to the type byte.
fn node_prefix() -> Vec<u8> {
    let mut b = node_head();
    b.extend_from_slice(&1u32.to_be_bytes());
    b.push(b'k');
    b.extend_from_slice(&0o600u16.to_be_bytes());
    b.extend_from_slice(&[0; 4 + 4 + 8 * 3]);
    b
}

fn assert_integrity<T: std::fmt::Debug>(r: keyfs::Result<T>, what: &str) {
    match r {
        Err(e) => assert_eq!(e.kind(), Kind::Integrity, "{what}: {}", e.message()),
        Ok(v) => panic!("{what}: decoded {v:?}"),
    }
}

#[test]
fn node_decode_empty_truncated_and_unknown_versions_are_errors() {
    assert_integrity(Node::decode(&[]), "empty");
    assert_integrity(Node::decode(&[1]), "version byte only");
    for v in [0u8, 2, 0xff] {
        let mut b = node_prefix();
        b[0] = v;
        b.extend_from_slice(&[0, 0, 0, 0, 0]);
        assert_integrity(Node::decode(&b), "record version");
    }
    // Every proper prefix of a valid directory record.
    let mut dir = node_prefix();
    dir.extend_from_slice(&[0, 0, 0, 0, 3]);
    Node::decode(&dir).expect("the full directory record decodes");
    for cut in 0..dir.len() {
        assert_integrity(Node::decode(&dir[..cut]), "truncated directory record");
    }
    // Trailing bytes and an unknown node type.
    let mut trailing = dir.clone();
    trailing.push(0);
    assert_integrity(Node::decode(&trailing), "trailing byte");
    let mut ty = node_prefix();
    ty.extend_from_slice(&[9, 0, 0, 0, 0]);
    assert_integrity(Node::decode(&ty), "node type 9");
}

#[test]
fn node_decode_u32_max_length_prefixes_are_errors() {
    // Name length u32::MAX with almost nothing after it: no huge allocation, no panic.
    let mut b = node_head();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    b.extend_from_slice(b"abc");
    assert_integrity(Node::decode(&b), "name length u32::MAX");
    // Symlink target length u32::MAX.
    let mut s = node_prefix();
    s.push(2);
    s.extend_from_slice(&u32::MAX.to_be_bytes());
    s.extend_from_slice(b"../x");
    assert_integrity(Node::decode(&s), "symlink length u32::MAX");
    // Key with no current version and u32::MAX archived versions announced.
    let mut k = node_prefix();
    k.extend_from_slice(&[1, 3, 0, 0, 0, 1, 0, 0]); // key, sym32, next_ver 1, flags, no current
    k.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_integrity(Node::decode(&k), "archived count u32::MAX");
    // A current version whose fingerprint length is u32::MAX, then one of 31 bytes.
    for fp_len in [u32::MAX, 31] {
        let mut v = node_prefix();
        v.extend_from_slice(&[1, 3, 0, 0, 0, 2, 0, 1]); // key, sym32, next_ver 2, flags, current
        v.extend_from_slice(&1u32.to_be_bytes()); // ver
        v.push(3); // kind
        v.extend_from_slice(&[0; 16]); // created, archived_at
        v.extend_from_slice(&32u32.to_be_bytes()); // size
        v.extend_from_slice(&fp_len.to_be_bytes());
        v.extend_from_slice(&[0xaa; 40]);
        assert_integrity(Node::decode(&v), "fingerprint length");
    }
}

#[test]
fn node_decode_lenient_bytes_still_round_trip() {
    // Type Key, "current" tag 7 (read as absent), flags 0xff (only two bits mean anything).
    let mut b = node_prefix();
    b.extend_from_slice(&[1, 0, 0, 0, 0, 1, 0xff, 7]);
    b.extend_from_slice(&0u32.to_be_bytes());
    let n = Node::decode(&b).expect("decodes");
    let e = n.encode();
    assert_eq!(Node::decode(&e).unwrap(), n);
    assert_eq!(Node::decode(&e).unwrap().encode(), e);
}

#[test]
fn tombstone_decode_u32_max_path_length_and_truncation_are_errors() {
    assert_integrity(Tombstone::decode(&[]), "empty");
    let mut b = u32::MAX.to_be_bytes().to_vec();
    b.extend_from_slice(b"clients/x");
    assert_integrity(Tombstone::decode(&b), "path length u32::MAX");
    let t = Tombstone {
        path: "clients/alice01/hmac".into(),
        entry: 20,
        ver: 1,
        kind: keyfs::inventory::kinds::KeyKind::Sym32,
        created: -1,
        destroyed: i64::MAX,
        uid: u32::MAX,
    };
    let e = t.encode();
    assert_eq!(Tombstone::decode(&e).unwrap(), t);
    for cut in 0..e.len() {
        assert_integrity(Tombstone::decode(&e[..cut]), "truncated tombstone");
    }
    let mut bad_kind = e.clone();
    let kind_at = 4 + t.path.len() + 8 + 4;
    bad_kind[kind_at] = 4;
    assert_integrity(Tombstone::decode(&bad_kind), "kind code 4");
}

#[test]
fn tombstone_with_invalid_utf8_path_decodes_lossily_and_round_trips() {
    let mut b = 6u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"ab\xc3\xff\xfez"); // truncated sequence + invalid bytes
    b.extend_from_slice(&[0; 8 + 4]);
    b.push(0);
    b.extend_from_slice(&[0; 8 + 8 + 4]);
    let t = Tombstone::decode(&b).expect("decodes");
    assert!(
        t.path.starts_with("ab") && t.path.ends_with('z'),
        "{:?}",
        t.path
    );
    assert_eq!(Tombstone::decode(&t.encode()).unwrap(), t);
}

// ---------------------------------------------------------------------------
// Names (fuzz target `names`)
// ---------------------------------------------------------------------------

#[test]
fn client_id_rejects_truncated_utf8_and_out_of_range_lengths() {
    for bad in [
        &b"alice\xc3"[..], // truncated UTF-8 sequence at the end
        b"\xc3\xa9mile",   // complete but non-ASCII
        b"\xe2\x82alice",  // truncated 3-byte sequence at the start
        b"alice\0",        // NUL
        b"",
        b"abcd",
        &[b'x'; 257],
        &[0xff; 300],
    ] {
        let e = ClientId::parse(bad).unwrap_err();
        assert_eq!(e.kind(), Kind::Invalid, "{bad:?}");
    }
    assert_eq!(ClientId::parse(b"a b-c").unwrap().as_str(), "a b-c");
    assert_eq!(ClientId::parse(&[b'Z'; 256]).unwrap().as_str().len(), 256);
}

#[test]
fn validate_component_takes_any_bytes_but_nul_and_slash() {
    // Names are bytes: truncated or invalid UTF-8 is allowed (the documented rule).
    for ok in [
        &b"\xc3"[..],
        b"\xff\xfe",
        b"a\xe2\x82",
        b"...",
        b" ",
        &[b'a'; 255],
    ] {
        validate_component(ok).unwrap_or_else(|e| panic!("{ok:?}: {}", e.message()));
    }
    for bad in [&b""[..], b".", b"..", b"/", b"a/b", b"\0", b"\xc3\0"] {
        assert_eq!(
            validate_component(bad).unwrap_err().kind(),
            Kind::Invalid,
            "{bad:?}"
        );
    }
    assert_eq!(
        validate_component(&[0xc3; 256]).unwrap_err().kind(),
        Kind::NameTooLong
    );
    assert_eq!(
        validate_component(&vec![b'a'; 1 << 20]).unwrap_err().kind(),
        Kind::NameTooLong
    );
}

#[test]
fn history_of_strips_exactly_one_suffix() {
    assert_eq!(history_of(b""), None);
    assert_eq!(history_of(b".old"), None);
    assert_eq!(history_of(b"old"), None);
    assert_eq!(history_of(b"\xc3.old"), Some(&b"\xc3"[..]));
    assert_eq!(history_of(b"k.old.old"), Some(&b"k.old"[..]));
    assert_eq!(history_of(b"..old"), Some(&b"."[..]));
}

#[test]
fn parse_ts_rejects_truncated_utf8_and_near_misses() {
    for bad in [
        &b""[..],
        b"2026-11-28T21:40:05.12345678\xc3Z", // truncated UTF-8 inside the fraction
        b"2026-11-28T21:40:05.1234567\xc3\xa9Z", // 30 bytes, a 2-byte char in the fraction
        b"\xd9\xa2\xd9\xa0\xd9\xa2-11-28T21:40:05.1234567Z", // Arabic-Indic digits
        b"2026-11-28T21:40:05.123456789z",
        b"2026-11-28T21:40:05.+23456789Z", // sign accepted by i64::parse, not by the format
        b"+026-11-28T21:40:05.123456789Z",
        b"2026-00-28T21:40:05.123456789Z",
        b"2026-11-00T21:40:05.123456789Z",
        b"2026-11-31T21:40:05.123456789Z",
        b"2026-11-28T21:60:05.123456789Z",
        b"2026-11-28T21:40:60.123456789Z",
        b"2026-11-28T21:40:05.123456789Z\n",
    ] {
        assert_eq!(parse_ts(bad), None, "{:?}", String::from_utf8_lossy(bad));
    }
}

/// Fuzz target `names`, crash-3af3c5b1e64a9656c0098f745194a63c5739fb87 (the
/// exact input, already minimal): `parse_ts` multiplied seconds by 10^9 in
/// i64, which overflows for years outside 1677..=2262 — a panic in debug and
/// fuzz builds, a wrapped (wrong) instant in release. Fixed when such names
/// give `None`, and both ends of the i64 range still parse and round-trip.
#[test]
fn parse_ts_out_of_i64_range_is_none_not_overflow() {
    for s in [
        "1485-01-01T00:00:00.000000000Z", // the fuzzer's input
        "0000-01-01T00:00:00.000000000Z",
        "1677-09-21T00:12:43.145224191Z", // one ns before i64::MIN
        "2262-04-11T23:47:16.854775808Z", // one ns after i64::MAX
        "2263-01-01T00:00:00.000000000Z",
        "9999-12-31T23:59:59.999999999Z",
    ] {
        assert_eq!(parse_ts(s.as_bytes()), None, "{s}");
    }
    for ns in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
        let s = format_ts(ns);
        assert_eq!(parse_ts(s.as_bytes()), Some(ns), "{s}");
    }
}

// ---------------------------------------------------------------------------
// Export bundles (fuzz target `import`)
// ---------------------------------------------------------------------------

const MAGIC: &[u8] = b"KEYFS-EXPORT-1\n";

struct Scratch {
    inv: Inventory,
    _dir: tempfile::TempDir,
}

fn master() -> MasterKey {
    MasterKey::from_key(Key32::new([7; 32]))
}

fn scratch() -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix("keyfs-fuzzreg-")
        .tempdir()
        .unwrap();
    let store = dir.path().join("store");
    Inventory::init(&store, &master()).unwrap();
    // sled frees the lock of the handle `init` dropped only when its background
    // thread ends (see tests/model.rs `open`): retry that error alone.
    let mut tries = 0;
    let inv = loop {
        match Inventory::open(&store, &master(), OpenOptions::default()) {
            Err(e) if tries < 200 && e.message().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r.unwrap(),
        }
    };
    Scratch { inv, _dir: dir }
}

fn ctx() -> Ctx {
    Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
        comm: "fuzz-regressions".into(),
    }
}

fn export_key() -> Key32 {
    Key32::new([9; 32])
}

/// A bundle holding `json` as the export would write it.
fn bundle(json: &[u8]) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&crypto::seal_raw(&export_key(), json, MAGIC));
    b
}

fn dirs(inv: &Inventory, ino: Ino, path: &str, out: &mut Vec<String>) {
    for e in inv.readdir(ino).unwrap() {
        if e.ftype == FType::Dir && matches!(e.ino, Ino::Node(_)) {
            let p = format!("{path}/{}", String::from_utf8_lossy(&e.name));
            out.push(p.clone());
            dirs(inv, e.ino, &p, out);
        }
    }
}

/// (key listing, every directory): what a refused import must leave as it was.
fn snapshot(inv: &Inventory) -> (String, Vec<String>) {
    let mut d = Vec::new();
    dirs(inv, Ino::Node(ROOT), "", &mut d);
    (format!("{:?}", inv.list("").unwrap()), d)
}

/// Import `raw`; it must be refused with `kind` and change no key.
fn refused(s: &Scratch, raw: &[u8], kind: Kind, what: &str) {
    let before = snapshot(&s.inv);
    match s.inv.import(raw, &export_key(), "", &ctx()) {
        Ok(n) => panic!("{what}: imported {n} keys"),
        Err(e) => assert_eq!(e.kind(), kind, "{what}: {}", e.message()),
    }
    assert_eq!(
        snapshot(&s.inv).0,
        before.0,
        "{what}: the key listing changed"
    );
}

/// Make clients/alice01 to hold test keys.
fn client_dir(s: &Scratch) {
    let clients = s.inv.resolve("clients").unwrap();
    s.inv
        .mkdir(
            clients,
            b"alice01",
            keyfs::inventory::NewAttrs {
                perm: 0o700,
                uid: 0,
                gid: 0,
            },
            false,
            &ctx(),
        )
        .expect("mkdir clients/alice01");
}

const SYM_B64: &str = "d4Tz436t1GwZDCV/Dsr+YiYbD7l2WevHv0y6wk++4po="; // 32 bytes
const TS: &str = "2025-11-28T21:40:05.123456789Z";

fn key_json(path: &str, versions: &str) -> String {
    format!(
        r#"{{"format":"keyfs-export-v1","private":true,"dirs":[],"keys":[{{"path":"{path}","kind":"opaque","perm":384,"uid":0,"gid":0,"versions":[{versions}]}}]}}"#
    )
}

fn ver(n: u64, archived: Option<&str>, material: &str) -> String {
    let a = archived.map_or("null".to_string(), |a| format!("\"{a}\""));
    format!(r#"{{"version":{n},"created":"{TS}","archived":{a},"material":"{material}"}}"#)
}

#[test]
fn import_refuses_bad_headers_and_wrong_keys() {
    let s = scratch();
    let good = bundle(br#"{"format":"keyfs-export-v1","private":false,"dirs":[],"keys":[]}"#);
    refused(&s, b"", Kind::Invalid, "empty bundle");
    refused(&s, &MAGIC[..MAGIC.len() - 1], Kind::Invalid, "cut magic");
    refused(&s, MAGIC, Kind::Integrity, "magic only");
    let mut short = MAGIC.to_vec();
    short.extend_from_slice(&[0; 27]);
    refused(&s, &short, Kind::Integrity, "magic + 27 bytes");
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 1;
    refused(&s, &flipped, Kind::Integrity, "flipped tag");
    refused(&s, &good[..good.len() - 1], Kind::Integrity, "truncated");
    let other = Key32::new([10; 32]);
    let e = s.inv.import(&good, &other, "", &ctx()).unwrap_err();
    assert_eq!(e.kind(), Kind::Integrity);
    assert_eq!(s.inv.import(&good, &export_key(), "", &ctx()).unwrap(), 0);
}

#[test]
fn import_refuses_malformed_json_without_changes() {
    let s = scratch();
    let deep = "[".repeat(100_000);
    let huge_number = format!(
        r#"{{"format":"x","private":true,"dirs":[{{"path":"clients/a","perm":448,"uid":1{},"gid":0}}],"keys":[]}}"#,
        "0".repeat(10_000)
    );
    for (json, what) in [
        ("", "empty plaintext"),
        ("null", "null"),
        ("{}", "empty object"),
        ("\u{feff}{}", "BOM"),
        (deep.as_str(), "100000 nested arrays"),
        (huge_number.as_str(), "a 10000-digit uid"),
        (
            r#"{"format":"x","private":true,"dirs":[],"keys":[{"path":"clients/a","kind":"opaque","perm":65536,"uid":0,"gid":0,"versions":[]}]}"#,
            "perm over u16",
        ),
        (
            r#"{"format":"x","private":true,"dirs":[],"keys":[{"path":"clients/a","kind":"opaque","perm":384,"uid":-1,"gid":0,"versions":[]}]}"#,
            "negative uid",
        ),
        (
            r#"{"format":"x","private":true,"dirs":[],"keys":[{"path":"\ud800","kind":"opaque","perm":384,"uid":0,"gid":0,"versions":[]}]}"#,
            "lone surrogate",
        ),
    ] {
        refused(&s, &bundle(json.as_bytes()), Kind::Invalid, what);
    }
    // Not UTF-8 at all.
    refused(
        &s,
        &bundle(b"{\"format\":\"\xc3\"}"),
        Kind::Invalid,
        "truncated UTF-8",
    );
}

#[test]
fn import_refuses_bad_versions_and_material_without_changes() {
    let s = scratch();
    client_dir(&s); // made before the snapshots
    let p = "clients/alice01/k";
    let cases = [
        (ver(0, None, SYM_B64), Kind::Invalid, "version 0"),
        (
            ver(u32::MAX as u64, None, SYM_B64),
            Kind::Invalid,
            "version u32::MAX",
        ),
        (
            ver((1 << 20) - 1, None, SYM_B64),
            Kind::Invalid,
            "version MAX_VER - 1",
        ),
        (
            ver(1, None, "not base64!"),
            Kind::Invalid,
            "material not base64",
        ),
        (ver(1, None, "QUJD="), Kind::Invalid, "bad base64 padding"),
        (
            format!("{},{}", ver(1, None, SYM_B64), ver(2, None, SYM_B64)),
            Kind::Invalid,
            "two current versions",
        ),
        (
            format!("{},{}", ver(1, Some(TS), SYM_B64), ver(1, None, SYM_B64)),
            Kind::Invalid,
            "duplicate version",
        ),
        (
            ver(1, None, &"A".repeat(4 * 21846)),
            Kind::TooBig,
            "material of 64 KiB + 2 bytes",
        ),
    ];
    for (versions, kind, what) in cases {
        refused(&s, &bundle(key_json(p, &versions).as_bytes()), kind, what);
    }
    // Typed keys validate their material.
    let typed = [
        ("clients/alice01/hmac", "symmetric key of 3 bytes"),
        ("clients/alice01/storage", "private key that is not PEM"),
        ("clients/alice01/storage.pub", "public key that is not PEM"),
    ];
    for (path, what) in typed {
        refused(
            &s,
            &bundle(key_json(path, &ver(1, None, "QUJD")).as_bytes()),
            Kind::Invalid,
            what,
        );
    }
    // Bad paths.
    for (path, what) in [
        ("clients/alice01/", "empty last component"),
        ("clients/nobody01/k", "missing parent"),
        ("clients/alice01/k.old/x", "parent is a history directory"),
        (".keyfs/k", "parent is .keyfs"),
    ] {
        let before = snapshot(&s.inv);
        assert!(
            s.inv
                .import(
                    &bundle(key_json(path, &ver(1, None, SYM_B64)).as_bytes()),
                    &export_key(),
                    "",
                    &ctx()
                )
                .is_err(),
            "{what}"
        );
        assert_eq!(snapshot(&s.inv).0, before.0, "{what}");
    }
}

/// An import refused after its directories were made must not leave them:
/// `import` calls `mkdir` (its own commit) for every bundle directory before it
/// validates the keys, so any key error leaves the new directories behind.
/// Found by fuzz target `import` with KEYFS_FUZZ_STRICT=1 (the bundle of
/// tests/data/vectors-v1.txt with a symmetric key's material cut short).
#[test]
fn failed_import_leaves_no_directories_behind() {
    let s = scratch();
    let json = format!(
        r#"{{"format":"keyfs-export-v1","private":true,"dirs":[{{"path":"clients/alice01","perm":448,"uid":0,"gid":0}}],"keys":[{{"path":"clients/alice01/hmac","kind":"symmetric-32","perm":384,"uid":0,"gid":0,"versions":[{}]}}]}}"#,
        ver(1, None, "QUJD")
    );
    let before = snapshot(&s.inv);
    let e = s
        .inv
        .import(&bundle(json.as_bytes()), &export_key(), "", &ctx())
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Invalid, "{}", e.message());
    assert_eq!(
        snapshot(&s.inv),
        before,
        "a refused import left directories behind"
    );
}

/// Two archived versions named by the same instant: `free_archive_ts` moves
/// the second one to the next free nanosecond, which at i64::MAX
/// (2262-04-11T23:47:16.854775807Z, a name `parse_ts` accepts) overflowed —
/// a panic in debug builds, a wrap to 1677 in release.
#[test]
fn import_of_colliding_archive_instants_at_i64_max_does_not_overflow() {
    let s = scratch();
    client_dir(&s);
    let max = format_ts(i64::MAX);
    let versions = format!(
        "{},{},{}",
        ver(1, Some(&max), SYM_B64),
        ver(2, Some(&max), SYM_B64),
        ver(3, None, SYM_B64)
    );
    let n = s
        .inv
        .import(
            &bundle(key_json("clients/alice01/k", &versions).as_bytes()),
            &export_key(),
            "",
            &ctx(),
        )
        .unwrap();
    assert_eq!(n, 1);
    let list = s.inv.list("clients/alice01").unwrap();
    let k = list.iter().find(|k| k.path == "clients/alice01/k").unwrap();
    assert_eq!(k.versions.len(), 3);
    let archived: Vec<_> = k
        .versions
        .iter()
        .filter_map(|v| v.archived.clone())
        .collect();
    assert_eq!(archived.len(), 2);
    assert_ne!(archived[0], archived[1]);
    assert!(s.inv.check().unwrap().is_empty());
}

/// A bundle naming one key twice (here once as `a/k`, once as `a/./k`, which
/// resolves to the same entry) made two nodes and linked the second over the
/// first: `Ok(2)`, and an orphaned node that `check()` reports ("not linked
/// from its directory"). It must be refused, changing nothing.
#[test]
fn import_refuses_a_key_listed_twice() {
    let s = scratch();
    client_dir(&s);
    let entry = |path: &str| {
        format!(
            r#"{{"path":"{path}","kind":"opaque","perm":384,"uid":0,"gid":0,"versions":[{}]}}"#,
            ver(1, None, SYM_B64)
        )
    };
    for (a, b) in [
        ("clients/alice01/k", "clients/alice01/k"),
        ("clients/alice01/k", "clients/alice01/./k"),
    ] {
        let json = format!(
            r#"{{"format":"keyfs-export-v1","private":true,"dirs":[],"keys":[{},{}]}}"#,
            entry(a),
            entry(b)
        );
        refused(
            &s,
            &bundle(json.as_bytes()),
            Kind::Invalid,
            "a key listed twice",
        );
        assert_eq!(s.inv.check().unwrap(), Vec::<String>::new());
    }
}

/// The tree's rules hold for imported keys as for keys written through the
/// mount: the top level holds only clients/, poison/ and audit/, and clients/
/// only client directories. `import` checked only the name and accepted both.
/// Found by fuzz target `import` (crash-2cd98653b44265bb5ec4a986db737f2f86a5bce9,
/// minimised to `IMPORT_KEY_IN_CLIENTS`: a key `clients/alice01.hmac`).
#[test]
fn import_keeps_keys_out_of_the_top_level_and_clients() {
    let s = scratch();
    refused(
        &s,
        &bundle(IMPORT_KEY_IN_CLIENTS.as_bytes()),
        Kind::Perm,
        "fuzzer input",
    );
    for path in ["top", "clients/k"] {
        let json = key_json(path, &ver(1, None, SYM_B64));
        refused(&s, &bundle(json.as_bytes()), Kind::Perm, path);
    }
}

/// The exact input the `import` target found (after `cargo fuzz tmin`).
const IMPORT_KEY_IN_CLIENTS: &str = r#"{"format":"keyfs-export%v1","private":true,"dirs":[{"path":"clients","perm":493,"uid":0,"gid":0},{"path":"clients/alice01","perm":448,"uid":1000,"gid":1001}],"keys":[{"path":"clients/alice01.hmac","kind":"symmetric-32","perm":384,"uid":1000,"gid":1001,"versions":[{"version":4,"created":"2025-11-29T21:40:05.987654321Z","archived":null,"material":"d4Tz436t1GwZDCV/Dsr+YiYbD4l2WevHv0y6wk++2potLS0tCg=="}]}]}"#;
