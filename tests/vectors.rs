//! Known-answer vectors for the on-disk format (docs/FORMAT.md).
//!
//! Every test here reads FIXED bytes from `tests/data/vectors-v1.txt` and checks
//! that today's code opens, decodes and lays them out exactly as stated there.
//! Nothing is sealed at test time: a change to the sealed-record format, the key
//! derivation, the associated data, the metadata codec, the audit chain or the
//! export bundle makes these tests fail. Such a change needs a new format
//! version and a new vectors file, never an edit of vectors-v1.txt.
//!
//! `generate_vectors_v1` (ignored) is the generator that wrote the file; it is
//! kept only for producing the vectors of a future format version.

use keyfs::crypto::{self, RecordId, Sealed, StoreKeys};
use keyfs::inventory::audit::{self, Ctx, Head, Rec};
use keyfs::inventory::kinds::{self, KeyKind};
use keyfs::inventory::node::{self, Body, Ino, KeyBody, Node, Special, Tombstone, Ver};
use keyfs::secret::{Key32, MasterKey, SecretBytes};
use keyfs::store::{Backend, Txn, TxnOutcome};
use keyfs::Kind;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// The vectors file, relative to the package root.
const VECTORS: &str = "tests/data/vectors-v1.txt";
/// AES-GCM overhead of one `seal_raw` output: nonce + tag.
const GCM_OVERHEAD: usize = crypto::NONCE_LEN + crypto::TAG_LEN;

// ---------------------------------------------------------------------------
// The file: `# comment`, `[type name]` section headers, `key = value` fields.
// Top-level fields (before the first section) form the header. Every field of
// every section must be consumed by a test, so a misspelt or stray field fails.
// ---------------------------------------------------------------------------

struct Field {
    value: String,
    line: usize,
}

struct Section {
    kind: String,
    name: String,
    line: usize,
    fields: BTreeMap<String, Field>,
    used: RefCell<BTreeSet<String>>,
}

impl Section {
    fn new(kind: &str, name: &str, line: usize) -> Self {
        Section {
            kind: kind.to_string(),
            name: name.to_string(),
            line,
            fields: BTreeMap::new(),
            used: RefCell::new(BTreeSet::new()),
        }
    }

    fn here(&self) -> String {
        format!("{VECTORS}:{}: [{} {}]", self.line, self.kind, self.name)
    }

    fn opt(&self, key: &str) -> Option<&str> {
        let f = self.fields.get(key)?;
        self.used.borrow_mut().insert(key.to_string());
        Some(f.value.as_str())
    }

    fn str(&self, key: &str) -> &str {
        self.opt(key)
            .unwrap_or_else(|| panic!("{}: required field `{key}` is missing", self.here()))
    }

    fn bad(&self, key: &str, what: &str) -> ! {
        let line = self.fields.get(key).map(|f| f.line).unwrap_or(self.line);
        panic!(
            "{VECTORS}:{line}: [{} {}] field `{key}` is not {what}: {:?}",
            self.kind,
            self.name,
            self.fields.get(key).map(|f| f.value.as_str()).unwrap_or("")
        )
    }

    fn hex(&self, key: &str) -> Vec<u8> {
        let v = self.str(key);
        crypto::unhex(v).unwrap_or_else(|| self.bad(key, "hex"))
    }

    fn num<T: std::str::FromStr>(&self, key: &str) -> T {
        self.str(key)
            .parse()
            .unwrap_or_else(|_| self.bad(key, "a decimal number in range"))
    }

    fn octal(&self, key: &str) -> u16 {
        u16::from_str_radix(self.str(key), 8).unwrap_or_else(|_| self.bad(key, "an octal mode"))
    }

    fn bool(&self, key: &str) -> bool {
        match self.str(key) {
            "true" => true,
            "false" => false,
            _ => self.bad(key, "true or false"),
        }
    }

    fn arr32(&self, key: &str) -> [u8; 32] {
        self.hex(key)
            .try_into()
            .unwrap_or_else(|_| self.bad(key, "32 bytes of hex"))
    }

    fn kind_code(&self, key: &str) -> KeyKind {
        KeyKind::from_code(self.num(key)).unwrap_or_else(|_| self.bad(key, "a key kind code"))
    }

    /// Fail on fields nothing read (typos, leftovers of an edit).
    fn finish(&self) {
        let used = self.used.borrow();
        let stray: Vec<String> = self
            .fields
            .iter()
            .filter(|(k, _)| !used.contains(*k))
            .map(|(k, f)| format!("`{k}` (line {})", f.line))
            .collect();
        assert!(
            stray.is_empty(),
            "{}: unknown or unused fields: {}",
            self.here(),
            stray.join(", ")
        );
    }
}

struct Vectors {
    header: Section,
    sections: Vec<Section>,
}

impl Vectors {
    fn of(&self, kind: &str) -> Vec<&Section> {
        self.sections.iter().filter(|s| s.kind == kind).collect()
    }
}

const SECTION_KINDS: &[&str] = &[
    "seal",
    "audit-key",
    "audit",
    "node",
    "tombstone",
    "layout",
    "export",
];

fn parse(text: &str) -> Vectors {
    let mut header = Section::new("header", "", 1);
    let mut sections: Vec<Section> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let ln = i + 1;
        let line = raw.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(inner) = line.strip_prefix('[') {
            let inner = inner
                .strip_suffix(']')
                .unwrap_or_else(|| panic!("{VECTORS}:{ln}: section header lacks `]`: {line:?}"));
            let (kind, name) = inner.split_once(' ').unwrap_or_else(|| {
                panic!("{VECTORS}:{ln}: section header must be `[type name]`: {line:?}")
            });
            assert!(
                SECTION_KINDS.contains(&kind),
                "{VECTORS}:{ln}: unknown section type {kind:?} (known: {SECTION_KINDS:?})"
            );
            assert!(
                !name.trim().is_empty(),
                "{VECTORS}:{ln}: section has no name"
            );
            assert!(
                !sections.iter().any(|s| s.kind == kind && s.name == name),
                "{VECTORS}:{ln}: duplicate section [{kind} {name}]"
            );
            sections.push(Section::new(kind, name, ln));
            continue;
        }
        let (key, rest) = line
            .split_once(" =")
            .unwrap_or_else(|| panic!("{VECTORS}:{ln}: expected `key = value`, got {line:?}"));
        let value = if rest.is_empty() {
            ""
        } else {
            rest.strip_prefix(' ')
                .unwrap_or_else(|| panic!("{VECTORS}:{ln}: expected `key = value`, got {line:?}"))
        };
        let key = key.trim();
        assert!(!key.is_empty(), "{VECTORS}:{ln}: empty field name");
        let target = sections.last_mut().unwrap_or(&mut header);
        let prev = target.fields.insert(
            key.to_string(),
            Field {
                value: value.to_string(),
                line: ln,
            },
        );
        assert!(
            prev.is_none(),
            "{VECTORS}:{ln}: field `{key}` is given twice in [{} {}]",
            target.kind,
            target.name
        );
    }
    Vectors { header, sections }
}

fn load() -> Vectors {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(VECTORS);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the known-answer vectors {}: {e}; this file is part of the test suite \
             and pins on-disk format version 1 — restore it from version control",
            path.display()
        )
    });
    let v = parse(&text);
    assert!(
        !v.sections.is_empty(),
        "{VECTORS} holds no vectors (empty or malformed)"
    );
    let fv: u16 = v.header.num("format_version");
    assert_eq!(
        fv,
        crypto::FORMAT_VERSION,
        "{VECTORS} pins format version {fv} but the code writes {}; a new format version \
         needs its own vectors file",
        crypto::FORMAT_VERSION
    );
    v.header.finish();
    v
}

fn master(b: &[u8]) -> MasterKey {
    MasterKey::from_key(Key32::from_slice(b).expect("master key must be 32 bytes"))
}

// ---------------------------------------------------------------------------
// [seal NAME]: sealed key versions (Sealed::encode output) and key-check values.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Entry,
    Version,
    Kind,
    Master,
    StoreId,
    SealedFlip,
    SealedTruncate,
    SealedHeader,
}

impl Change {
    const ALL: [(&'static str, Change); 8] = [
        ("entry", Change::Entry),
        ("version", Change::Version),
        ("kind", Change::Kind),
        ("master", Change::Master),
        ("store_id", Change::StoreId),
        ("sealed-flip", Change::SealedFlip),
        ("sealed-truncate", Change::SealedTruncate),
        ("sealed-header", Change::SealedHeader),
    ];
}

struct SealCase {
    name: String,
    here: String,
    master: Vec<u8>,
    store_id: Vec<u8>,
    id: RecordId,
    sealed: Vec<u8>,
    kcv: Vec<u8>,
    /// `Some` for `expect = ok`: (plaintext, fingerprint).
    ok: Option<(Vec<u8>, Vec<u8>)>,
    /// `Some` for `expect = integrity`: (base case, what differs from it).
    negative: Option<(String, Change)>,
}

impl SealCase {
    fn from(s: &Section) -> Self {
        let expect = s.str("expect");
        let (ok, negative) = match expect {
            "ok" => (Some((s.hex("plaintext"), s.hex("fingerprint"))), None),
            "integrity" => {
                let c = s.str("changes");
                let change = Change::ALL
                    .iter()
                    .find(|(n, _)| *n == c)
                    .map(|(_, ch)| *ch)
                    .unwrap_or_else(|| s.bad("changes", "a known change"));
                (None, Some((s.str("base").to_string(), change)))
            }
            _ => s.bad("expect", "`ok` or `integrity`"),
        };
        let c = SealCase {
            name: s.name.clone(),
            here: s.here(),
            master: s.hex("master"),
            store_id: s.hex("store_id"),
            id: RecordId {
                entry: s.num("entry"),
                version: s.num("version"),
                kind: s.num("kind"),
            },
            sealed: s.hex("sealed"),
            kcv: s.hex("kcv"),
            ok,
            negative,
        };
        assert_eq!(c.master.len(), 32, "{}: master must be 32 bytes", c.here);
        s.finish();
        c
    }

    /// What keyfs does for a read: decode the stored bytes, derive the KEK, open.
    fn open(&self) -> keyfs::Result<SecretBytes> {
        let s = Sealed::decode(&self.sealed)?;
        StoreKeys::derive(&master(&self.master), &self.store_id).open(self.id, &s)
    }
}

fn seal_cases(v: &Vectors) -> Vec<SealCase> {
    v.of("seal").into_iter().map(SealCase::from).collect()
}

/// Check that a negative case is the base case with exactly the stated change,
/// so it fails for the reason it claims and not for some unrelated one.
fn check_mutation(c: &SealCase, base: &SealCase, change: Change) {
    let h = &c.here;
    let same = |field: &str, eq: bool, should_differ: bool| {
        assert_eq!(
            !eq,
            should_differ,
            "{h}: field `{field}` must {} base case `{}` for changes = {change:?}",
            if should_differ {
                "differ from"
            } else {
                "equal"
            },
            base.name
        );
    };
    same("master", c.master == base.master, change == Change::Master);
    same(
        "store_id",
        c.store_id == base.store_id,
        change == Change::StoreId,
    );
    same(
        "entry",
        c.id.entry == base.id.entry,
        change == Change::Entry,
    );
    same(
        "version",
        c.id.version == base.id.version,
        change == Change::Version,
    );
    same("kind", c.id.kind == base.id.kind, change == Change::Kind);
    let sealed_change = matches!(
        change,
        Change::SealedFlip | Change::SealedTruncate | Change::SealedHeader
    );
    same("sealed", c.sealed == base.sealed, sealed_change);
    match change {
        Change::SealedFlip => {
            assert_eq!(
                c.sealed.len(),
                base.sealed.len(),
                "{h}: a flip keeps the length"
            );
            let diffs: Vec<usize> = (0..c.sealed.len())
                .filter(|&i| c.sealed[i] != base.sealed[i])
                .collect();
            assert_eq!(diffs.len(), 1, "{h}: a flip changes exactly one byte");
            assert!(diffs[0] >= 2, "{h}: a flip is past the format header");
        }
        Change::SealedTruncate => assert!(
            c.sealed.len() < base.sealed.len() && base.sealed.starts_with(&c.sealed),
            "{h}: a truncated record is a proper prefix of the base record"
        ),
        Change::SealedHeader => assert!(
            c.sealed.len() == base.sealed.len() && c.sealed[2..] == base.sealed[2..],
            "{h}: a header change touches only the 2-byte format version"
        ),
        _ => {}
    }
}

#[test]
fn vectors_file_is_well_formed_and_complete() {
    let v = load();
    // Parse every section once, so a malformed one fails here with its line.
    let cases = seal_cases(&v);
    for s in v.of("node") {
        node_from(s);
    }
    for s in v.of("tombstone") {
        tombstone_from(s);
    }

    let positive: Vec<&SealCase> = cases.iter().filter(|c| c.ok.is_some()).collect();
    let pt = |c: &SealCase| c.ok.as_ref().expect("positive").0.clone();
    assert!(
        positive
            .iter()
            .any(|c| c.id.kind == KeyKind::Sym32 as u8 && pt(c).len() == 32),
        "{VECTORS} must hold a 32-byte symmetric key (kind 3)"
    );
    assert!(
        positive
            .iter()
            .any(|c| c.id.kind == KeyKind::Opaque as u8 && pt(c).is_empty()),
        "{VECTORS} must hold an empty opaque secret (kind 0)"
    );
    assert!(
        positive
            .iter()
            .any(|c| c.id.kind == KeyKind::EcPrivate as u8
                && pt(c).starts_with(b"-----BEGIN PRIVATE KEY-----\n")),
        "{VECTORS} must hold a P-256 PKCS#8 PEM private key (kind 1)"
    );
    let changes: BTreeSet<String> = cases
        .iter()
        .filter_map(|c| c.negative.as_ref().map(|(_, ch)| format!("{ch:?}")))
        .collect();
    for (name, ch) in Change::ALL {
        assert!(
            changes.contains(&format!("{ch:?}")),
            "{VECTORS} must hold a negative seal case with changes = {name}"
        );
    }
    let nodes = v.of("node");
    assert!(
        nodes.iter().any(|s| {
            let n = node_from(s);
            n.key()
                .is_some_and(|k| k.current.is_some() && !k.archived.is_empty())
        }),
        "{VECTORS} must hold a key node with a current and an archived version"
    );
    for kind in ["audit-key", "audit", "tombstone", "layout", "export"] {
        assert!(
            !v.of(kind).is_empty(),
            "{VECTORS} must hold at least one [{kind} …] section"
        );
    }
}

#[test]
fn sealed_records_open_to_expected_plaintext() {
    let v = load();
    let mut n = 0;
    for c in seal_cases(&v) {
        let Some((plaintext, fingerprint)) = &c.ok else {
            continue;
        };
        let h = &c.here;
        // Layout: format version (u16 BE) || wrapped data key (60) || nonce || ct || tag.
        assert_eq!(
            c.sealed[..2],
            crypto::FORMAT_VERSION.to_be_bytes(),
            "{h}: format header"
        );
        assert_eq!(
            c.sealed.len(),
            2 + crypto::WRAPPED_LEN + GCM_OVERHEAD + plaintext.len(),
            "{h}: sealed record length"
        );
        let decoded = Sealed::decode(&c.sealed).unwrap_or_else(|e| panic!("{h}: decode: {e}"));
        assert_eq!(decoded.wrapped_dk.len(), crypto::WRAPPED_LEN, "{h}");
        assert_eq!(decoded.encode(), c.sealed, "{h}: decode/encode roundtrip");
        let opened = c
            .open()
            .unwrap_or_else(|e| panic!("{h}: a fixed record no longer opens: {e:?}"));
        assert_eq!(opened.expose(), &plaintext[..], "{h}: plaintext");
        assert_eq!(
            &crypto::fingerprint(opened.expose())[..],
            &fingerprint[..],
            "{h}: fingerprint"
        );
        let kind = KeyKind::from_code(c.id.kind).unwrap_or_else(|e| panic!("{h}: {e}"));
        kinds::validate(kind, opened.expose(), &c.name)
            .unwrap_or_else(|e| panic!("{h}: material is not a valid {kind:?}: {e}"));
        n += 1;
    }
    assert!(n >= 3, "{VECTORS}: only {n} positive seal cases");
}

#[test]
fn sealed_records_negative_cases_fail_with_integrity() {
    let v = load();
    let cases = seal_cases(&v);
    let mut n = 0;
    for c in &cases {
        let Some((base_name, change)) = &c.negative else {
            continue;
        };
        let base = cases
            .iter()
            .find(|b| &b.name == base_name && b.ok.is_some())
            .unwrap_or_else(|| {
                panic!("{}: base `{base_name}` is not a positive seal case", c.here)
            });
        check_mutation(c, base, *change);
        base.open()
            .unwrap_or_else(|e| panic!("{}: base case must open: {e:?}", base.here));
        match c.open() {
            Ok(_) => panic!(
                "{}: opened although {change:?} differs from `{base_name}`; the record is not \
                 bound to its identity any more",
                c.here
            ),
            Err(e) => assert_eq!(
                e.kind(),
                Kind::Integrity,
                "{}: must fail with Kind::Integrity, got {:?}: {}",
                c.here,
                e.kind(),
                e.message()
            ),
        }
        n += 1;
    }
    assert!(n >= 6, "{VECTORS}: only {n} negative seal cases");
}

#[test]
fn key_check_values_match() {
    let v = load();
    let cases = seal_cases(&v);
    for c in &cases {
        assert_eq!(
            crypto::key_check_value(&master(&c.master), &c.store_id).to_vec(),
            c.kcv,
            "{}: key-check value",
            c.here
        );
    }
    // A wrong master key must be told apart before any record is read.
    for a in &cases {
        for b in &cases {
            if a.store_id == b.store_id && a.master != b.master {
                assert_ne!(a.kcv, b.kcv, "{} vs {}", a.here, b.here);
            }
        }
    }
    for s in v.of("audit-key") {
        let kcv = crypto::key_check_value(&master(&s.hex("master")), &s.hex("store_id"));
        assert_eq!(kcv.to_vec(), s.hex("kcv"), "{}: key-check value", s.here());
    }
}

// ---------------------------------------------------------------------------
// [audit-key NAME]: the audit key as stored in m/audit_key.
// ---------------------------------------------------------------------------

#[test]
fn audit_key_unwraps_under_the_kek() {
    let v = load();
    for s in v.of("audit-key") {
        let h = s.here();
        let keys = StoreKeys::derive(&master(&s.hex("master")), &s.hex("store_id"));
        let aad = s.str("aad").as_bytes().to_vec();
        let wrapped = s.hex("wrapped");
        assert_eq!(wrapped.len(), crypto::WRAPPED_LEN, "{h}: wrapped length");
        let k = keys
            .unwrap(&wrapped, &aad)
            .unwrap_or_else(|e| panic!("{h}: unwrap: {e:?}"));
        assert_eq!(k.expose().to_vec(), s.hex("audit_key"), "{h}: audit key");
        let wrong = StoreKeys::derive(&master(&[0x5a; 32]), &s.hex("store_id"));
        assert_eq!(
            wrong.unwrap(&wrapped, &aad).unwrap_err().kind(),
            Kind::Integrity,
            "{h}: another master key must not unwrap it"
        );
        assert_eq!(
            keys.unwrap(&wrapped, b"keyfs-wrap").unwrap_err().kind(),
            Kind::Integrity,
            "{h}: the audit-key AAD must be bound"
        );
        s.hex("kcv"); // checked in key_check_values_match
        s.finish();
    }
}

// ---------------------------------------------------------------------------
// [audit NAME]: a chain of entries as Head::stage writes them.
// ---------------------------------------------------------------------------

/// A `Backend` over a map, to run audit::verify on the fixed entries.
#[derive(Default)]
struct MemBackend(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> keyfs::Result<Option<Vec<u8>>> {
        Ok(self.0.lock().unwrap().get(key).cloned())
    }
    fn scan_prefix(&self, prefix: &[u8]) -> keyfs::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
    fn transact(&self, txn: &Txn) -> keyfs::Result<TxnOutcome> {
        let mut m = self.0.lock().unwrap();
        if txn.guards.iter().any(|(k, v)| m.get(k) != v.as_ref()) {
            return Ok(TxnOutcome::Conflict);
        }
        for (k, v) in &txn.writes {
            match v {
                Some(v) => m.insert(k.clone(), v.clone()),
                None => m.remove(k),
            };
        }
        Ok(TxnOutcome::Committed)
    }
    fn flush(&self) -> keyfs::Result<()> {
        Ok(())
    }
    fn size_on_disk(&self) -> u64 {
        0
    }
}

#[test]
fn audit_chain_entries_match_and_verify() {
    let v = load();
    for s in v.of("audit") {
        let h = s.here();
        let key = Key32::from_slice(&s.hex("audit_key"))
            .unwrap_or_else(|| panic!("{h}: audit_key must be 32 bytes"));
        let count: u64 = s.num("entries");
        assert!(count >= 2, "{h}: a chain vector needs at least 2 entries");
        let mut head = Head {
            seq: 0,
            mac: [0; 32],
        };
        let mut txn = Txn::default();
        for seq in 1..=count {
            let f = |name: &str| format!("entry.{seq}.{name}");
            let op: &'static str = Box::leak(s.str(&f("op")).to_string().into_boxed_str());
            let rec = Rec {
                op,
                path: s.str(&f("path")).to_string(),
                entry: s.num(&f("entry")),
                version: s.num(&f("version")),
                result: s.str(&f("result")).to_string(),
            };
            let ctx = Ctx {
                uid: s.num(&f("uid")),
                gid: s.num(&f("gid")),
                pid: s.num(&f("pid")),
                comm: s.str(&f("comm")).to_string(),
            };
            let now: i64 = s.num(&f("now"));
            assert_eq!(
                audit::format_line(now, &rec, &ctx),
                s.str(&f("line")),
                "{h}: entry {seq} text"
            );
            let before = txn.writes.len();
            head = head.stage(&key, &mut txn, &rec, &ctx, now);
            assert_eq!(head.seq, seq, "{h}: entry {seq} sequence number");
            assert_eq!(head.mac.to_vec(), s.hex(&f("mac")), "{h}: entry {seq} MAC");
            let (k, val) = &txn.writes[before];
            assert_eq!(k, &s.hex(&f("key")), "{h}: entry {seq} store key");
            assert_eq!(
                val.as_ref(),
                Some(&s.hex(&f("value"))),
                "{h}: entry {seq} stored value (line || mac)"
            );
        }
        let (hk, hv) = txn.writes.last().expect("a staged head");
        assert_eq!(&hk[..], audit::HEAD_KEY, "{h}: head key");
        assert_eq!(hv.as_ref(), Some(&s.hex("head")), "{h}: head value");
        s.finish();

        // The fixed entries verify, and an edited or deleted entry is detected.
        let db = MemBackend::default();
        assert_eq!(db.transact(&txn).unwrap(), TxnOutcome::Committed);
        assert_eq!(
            audit::verify(&db, &key).unwrap(),
            Vec::<String>::new(),
            "{h}: the fixed chain must verify"
        );
        assert_eq!(audit::lines(&db).unwrap().len() as u64, count, "{h}");
        let first = txn.writes[0].0.clone();
        let mut edited = db.get(&first).unwrap().expect("entry 1");
        edited[0] ^= 1;
        db.0.lock().unwrap().insert(first.clone(), edited);
        assert!(
            !audit::verify(&db, &key).unwrap().is_empty(),
            "{h}: an edited entry must be reported"
        );
        db.0.lock().unwrap().remove(&first);
        assert!(
            !audit::verify(&db, &key).unwrap().is_empty(),
            "{h}: a deleted entry must be reported"
        );
    }
}

// ---------------------------------------------------------------------------
// [node NAME] and [tombstone NAME]: the metadata codec.
// ---------------------------------------------------------------------------

fn ver_from(s: &Section, p: &str) -> Ver {
    Ver {
        ver: s.num(&format!("{p}.ver")),
        kind: s.kind_code(&format!("{p}.kind")),
        created: s.num(&format!("{p}.created")),
        archived_at: s.num(&format!("{p}.archived_at")),
        size: s.num(&format!("{p}.size")),
        fingerprint: s.arr32(&format!("{p}.fingerprint")),
        public: s.hex(&format!("{p}.public")),
    }
}

fn node_from(s: &Section) -> Node {
    let body = match s.str("body") {
        "dir" => Body::Dir {
            subdirs: s.num("subdirs"),
        },
        "symlink" => Body::Symlink(s.hex("target")),
        "key" => {
            let current = match s.str("current") {
                "none" => None,
                "present" => Some(ver_from(s, "current")),
                _ => s.bad("current", "`none` or `present`"),
            };
            let n: usize = s.num("archived");
            Body::Key(KeyBody {
                kind: s.kind_code("key.kind"),
                next_ver: s.num("key.next_ver"),
                current,
                archived: (0..n)
                    .map(|i| ver_from(s, &format!("archived.{i}")))
                    .collect(),
                pinned: s.bool("key.pinned"),
                pub_hidden: s.bool("key.pub_hidden"),
            })
        }
        _ => s.bad("body", "`dir`, `symlink` or `key`"),
    };
    Node {
        id: s.num("id"),
        parent: s.num("parent"),
        name: s.hex("name"),
        perm: s.octal("perm"),
        uid: s.num("uid"),
        gid: s.num("gid"),
        atime: s.num("atime"),
        mtime: s.num("mtime"),
        ctime: s.num("ctime"),
        body,
    }
}

#[test]
fn node_records_decode_and_reencode() {
    let v = load();
    let nodes = v.of("node");
    assert!(!nodes.is_empty(), "{VECTORS}: no [node …] sections");
    for s in nodes {
        let h = s.here();
        let encoded = s.hex("encoded");
        let expected = node_from(s);
        s.finish();
        let decoded = Node::decode(&encoded).unwrap_or_else(|e| panic!("{h}: decode: {e}"));
        assert_eq!(decoded, expected, "{h}: decoded node");
        assert_eq!(
            crypto::hex(&expected.encode()),
            crypto::hex(&encoded),
            "{h}: encoding"
        );
        for cut in [0, 1, encoded.len() / 2, encoded.len() - 1] {
            assert_eq!(
                Node::decode(&encoded[..cut]).unwrap_err().kind(),
                Kind::Integrity,
                "{h}: truncated to {cut} bytes"
            );
        }
        let mut long = encoded.clone();
        long.push(0);
        assert_eq!(
            Node::decode(&long).unwrap_err().kind(),
            Kind::Integrity,
            "{h}: trailing byte"
        );
        let mut other = encoded.clone();
        other[0] = 2;
        assert_eq!(
            Node::decode(&other).unwrap_err().kind(),
            Kind::Integrity,
            "{h}: node record version 2 must be refused"
        );
    }
}

fn tombstone_from(s: &Section) -> Tombstone {
    Tombstone {
        path: s.str("path").to_string(),
        entry: s.num("entry"),
        ver: s.num("ver"),
        kind: s.kind_code("kind"),
        created: s.num("created"),
        destroyed: s.num("destroyed"),
        uid: s.num("uid"),
    }
}

#[test]
fn tombstone_records_decode_and_reencode() {
    let v = load();
    for s in v.of("tombstone") {
        let h = s.here();
        let encoded = s.hex("encoded");
        let expected = tombstone_from(s);
        s.finish();
        let decoded = Tombstone::decode(&encoded).unwrap_or_else(|e| panic!("{h}: decode: {e}"));
        assert_eq!(decoded, expected, "{h}: decoded tombstone");
        assert_eq!(
            crypto::hex(&expected.encode()),
            crypto::hex(&encoded),
            "{h}: encoding"
        );
        assert_eq!(
            Tombstone::decode(&encoded[..encoded.len() - 1])
                .unwrap_err()
                .kind(),
            Kind::Integrity,
            "{h}: truncated"
        );
    }
}

// ---------------------------------------------------------------------------
// [layout NAME]: sled keys, meta values and inode numbers.
// ---------------------------------------------------------------------------

fn ino_from(s: &Section, key: &str, args: &[&str]) -> Ino {
    let n = |i: usize| -> u64 {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| s.bad(key, "followed by numeric arguments"))
    };
    match args.first().copied() {
        Some("node") => Ino::Node(n(1)),
        Some("old") => Ino::Old(n(1)),
        Some("ver") => Ino::Ver(n(1), n(2) as u32),
        Some("pub") => Ino::Pub(n(1)),
        Some("staged") => Ino::Staged(n(1)),
        Some("special") => Ino::Special(match args.get(1).copied() {
            Some("dir") => Special::Dir,
            Some("status") => Special::Status,
            Some("audit") => Special::Audit,
            _ => s.bad(key, "a special entry (dir, status, audit)"),
        }),
        _ => s.bad(key, "an inode variant"),
    }
}

#[test]
fn store_keys_and_inode_numbers_match_layout() {
    let v = load();
    let mut seen = BTreeSet::new();
    for s in v.of("layout") {
        let h = s.here();
        let keys: Vec<String> = s.fields.keys().cloned().collect();
        for key in keys {
            let words: Vec<&str> = key.split_whitespace().collect();
            let want = s.hex(&key);
            let num = |i: usize| -> u64 {
                words
                    .get(i)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| s.bad(&key, "followed by numeric arguments"))
            };
            let got = match words[0] {
                "node_key" => node::node_key(num(1)),
                "dirent_prefix" => node::dirent_prefix(num(1)),
                "dirent_key" => {
                    let name = crypto::unhex(words.get(2).copied().unwrap_or(""))
                        .unwrap_or_else(|| s.bad(&key, "`dirent_key PARENT NAME-HEX`"));
                    node::dirent_key(num(1), &name)
                }
                "blob_key" => node::blob_key(num(1), num(2) as u32),
                "tomb_key" => node::tomb_key(num(1), num(2) as u32),
                "audit_head_key" => audit::HEAD_KEY.to_vec(),
                "meta_format_value" => crypto::FORMAT_VERSION.to_be_bytes().to_vec(),
                "ino" => {
                    let ino = ino_from(s, &key, &words[1..]);
                    let raw = u64::from_be_bytes(
                        want.as_slice()
                            .try_into()
                            .unwrap_or_else(|_| s.bad(&key, "8 bytes of hex")),
                    );
                    assert_eq!(Ino::from_raw(raw), Some(ino), "{h}: `{key}` decodes");
                    ino.raw().to_be_bytes().to_vec()
                }
                _ => s.bad(&key, "a known layout item"),
            };
            assert_eq!(crypto::hex(&got), crypto::hex(&want), "{h}: `{key}`");
            seen.insert(words[0].to_string());
        }
        s.finish();
    }
    for item in [
        "node_key",
        "dirent_key",
        "blob_key",
        "tomb_key",
        "audit_head_key",
        "meta_format_value",
        "ino",
    ] {
        assert!(seen.contains(item), "{VECTORS}: no `{item}` layout vector");
    }
}

// ---------------------------------------------------------------------------
// [export NAME]: an export bundle and its key.
// ---------------------------------------------------------------------------

/// The bundle schema as docs/FORMAT.md states it (mirrors src/inventory/admin.rs).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleDoc {
    format: String,
    private: bool,
    dirs: Vec<BundleDirDoc>,
    keys: Vec<BundleKeyDoc>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleDirDoc {
    path: String,
    perm: u16,
    uid: u32,
    gid: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleKeyDoc {
    path: String,
    kind: String,
    perm: u16,
    uid: u32,
    gid: u32,
    versions: Vec<BundleVersionDoc>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleVersionDoc {
    version: u32,
    created: String,
    archived: Option<String>,
    material: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

#[test]
fn export_bundle_opens_to_stated_json() {
    use base64::Engine;
    let v = load();
    for s in v.of("export") {
        let h = s.here();
        let magic = s.hex("magic");
        assert_eq!(magic, b"KEYFS-EXPORT-1\n", "{h}: bundle magic");
        let raw_key = b64()
            .decode(s.str("key"))
            .unwrap_or_else(|_| s.bad("key", "base64"));
        let key = Key32::from_slice(&raw_key).unwrap_or_else(|| s.bad("key", "32 bytes"));
        let bundle = s.hex("bundle");
        let json = s.str("json");
        s.finish();
        let body = bundle
            .strip_prefix(&magic[..])
            .unwrap_or_else(|| panic!("{h}: bundle does not start with the magic"));
        assert_eq!(body.len(), GCM_OVERHEAD + json.len(), "{h}: bundle length");
        let opened = crypto::open_raw(&key, body, &magic)
            .unwrap_or_else(|e| panic!("{h}: the fixed bundle no longer opens: {e:?}"));
        assert_eq!(
            String::from_utf8_lossy(opened.expose()),
            json,
            "{h}: bundle JSON"
        );
        let doc: BundleDoc =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{h}: JSON schema: {e}"));
        assert_eq!(doc.format, "keyfs-export-v1", "{h}");
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            json,
            "{h}: field order and encoding"
        );
        for k in &doc.keys {
            for ver in &k.versions {
                b64()
                    .decode(&ver.material)
                    .unwrap_or_else(|_| panic!("{h}: {} material is not base64", k.path));
            }
        }
        // Tampering, a wrong AAD and truncation fail authentication.
        let mut t = body.to_vec();
        t[crypto::NONCE_LEN] ^= 1;
        assert_eq!(
            crypto::open_raw(&key, &t, &magic).unwrap_err().kind(),
            Kind::Integrity,
            "{h}: flipped byte"
        );
        assert_eq!(
            crypto::open_raw(&key, body, b"KEYFS-EXPORT-1")
                .unwrap_err()
                .kind(),
            Kind::Integrity,
            "{h}: AAD without the newline"
        );
        assert_eq!(
            crypto::open_raw(&key, &body[..GCM_OVERHEAD - 1], &magic)
                .unwrap_err()
                .kind(),
            Kind::Integrity,
            "{h}: truncated"
        );
    }
}

// ---------------------------------------------------------------------------
// The generator. Not a test: it wrote tests/data/vectors-v1.txt once, with
// fresh random keys and nonces. Do NOT rerun it to "fix" a failing vector test —
// that would hide exactly the format change the vectors exist to catch. It is
// kept to write the vectors of a future format version:
//   KEYFS_WRITE_VECTORS=tests/data/vectors-vN.txt \
//     cargo test --test tests generate_vectors_v1 -- --ignored --nocapture
// (without the variable it prints the file to stdout).
// ---------------------------------------------------------------------------

struct Out(String);

impl Out {
    fn line(&mut self, s: impl AsRef<str>) {
        self.0.push_str(s.as_ref());
        self.0.push('\n');
    }
    fn kv(&mut self, k: &str, v: impl std::fmt::Display) {
        let v = v.to_string();
        if v.is_empty() {
            self.line(format!("{k} ="));
        } else {
            self.line(format!("{k} = {v}"));
        }
    }
    fn hex(&mut self, k: &str, v: &[u8]) {
        self.kv(k, crypto::hex(v));
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    crypto::fill_random(&mut b);
    b
}

struct GenSeal<'a> {
    name: &'a str,
    master: [u8; 32],
    store_id: [u8; 16],
    id: RecordId,
    sealed: Vec<u8>,
}

fn gen_seal_section(o: &mut Out, c: &GenSeal<'_>, result: Result<&[u8], (&str, &str)>) {
    o.line("");
    o.line(format!("[seal {}]", c.name));
    o.hex("master", &c.master);
    o.hex("store_id", &c.store_id);
    o.kv("entry", c.id.entry);
    o.kv("version", c.id.version);
    o.kv("kind", c.id.kind);
    o.hex(
        "kcv",
        &crypto::key_check_value(&master(&c.master), &c.store_id),
    );
    o.hex("sealed", &c.sealed);
    match result {
        Ok(pt) => {
            o.kv("expect", "ok");
            o.hex("plaintext", pt);
            o.hex("fingerprint", &crypto::fingerprint(pt));
        }
        Err((base, changes)) => {
            o.kv("expect", "integrity");
            o.kv("base", base);
            o.kv("changes", changes);
        }
    }
}

fn gen_ver(o: &mut Out, p: &str, v: &Ver) {
    o.kv(&format!("{p}.ver"), v.ver);
    o.kv(&format!("{p}.kind"), v.kind as u8);
    o.kv(&format!("{p}.created"), v.created);
    o.kv(&format!("{p}.archived_at"), v.archived_at);
    o.kv(&format!("{p}.size"), v.size);
    o.hex(&format!("{p}.fingerprint"), &v.fingerprint);
    o.hex(&format!("{p}.public"), &v.public);
}

fn gen_node(o: &mut Out, name: &str, comment: &str, n: &Node) {
    o.line("");
    o.line(format!("# {comment}"));
    o.line(format!("[node {name}]"));
    o.hex("encoded", &n.encode());
    o.kv("id", n.id);
    o.kv("parent", n.parent);
    o.line(format!("# name: {:?}", String::from_utf8_lossy(&n.name)));
    o.hex("name", &n.name);
    o.kv("perm", format!("{:04o}", n.perm));
    o.kv("uid", n.uid);
    o.kv("gid", n.gid);
    o.kv("atime", n.atime);
    o.kv("mtime", n.mtime);
    o.kv("ctime", n.ctime);
    match &n.body {
        Body::Dir { subdirs } => {
            o.kv("body", "dir");
            o.kv("subdirs", subdirs);
        }
        Body::Symlink(t) => {
            o.kv("body", "symlink");
            o.line(format!("# target: {:?}", String::from_utf8_lossy(t)));
            o.hex("target", t);
        }
        Body::Key(k) => {
            o.kv("body", "key");
            o.kv("key.kind", k.kind as u8);
            o.kv("key.next_ver", k.next_ver);
            o.kv("key.pinned", k.pinned);
            o.kv("key.pub_hidden", k.pub_hidden);
            match &k.current {
                Some(c) => {
                    o.kv("current", "present");
                    gen_ver(o, "current", c);
                }
                None => o.kv("current", "none"),
            }
            o.kv("archived", k.archived.len());
            for (i, a) in k.archived.iter().enumerate() {
                gen_ver(o, &format!("archived.{i}"), a);
            }
        }
    }
}

const HEADER: &str = "\
# keyfs known-answer vectors — on-disk format version 1 (docs/FORMAT.md).
#
# Read by tests/vectors.rs; the bytes here are FIXED and must never be
# regenerated to make a test pass. Expected outcome of every section:
#
#  [seal NAME]       Sealed::decode(sealed), then
#                    StoreKeys::derive(master, store_id).open(RecordId{entry,
#                    version, kind}, …). `expect = ok`: succeeds and yields
#                    `plaintext` (SHA-256 = `fingerprint`). `expect = integrity`:
#                    fails with keyfs::Kind::Integrity; such a case is the case
#                    `base` with exactly the one difference named by `changes`
#                    (entry, version, kind, master, store_id, sealed-flip: one
#                    byte flipped, sealed-truncate: a proper prefix,
#                    sealed-header: another format version).
#                    In every seal case key_check_value(master, store_id) = kcv.
#  [audit-key NAME]  StoreKeys::derive(master, store_id).unwrap(wrapped, aad)
#                    yields `audit_key` (the m/audit_key record).
#  [audit NAME]      Head::stage from the empty head, entry by entry, writes
#                    `key` -> `value` (= line || mac) and finally m/audit_head =
#                    `head`; audit::verify accepts the chain.
#  [node NAME]       Node::decode(encoded) equals the stated fields, and
#                    Node::encode of them gives back `encoded`.
#  [tombstone NAME]  The same for Tombstone.
#  [layout NAME]     Store keys (node_key, dirent_key, blob_key, tomb_key),
#                    the m/audit_head key, the m/format value, and inode
#                    numbers Ino::raw (u64, hex big-endian) equal the stated hex.
#  [export NAME]     bundle = magic || nonce || ct || tag; open_raw(base64-decoded
#                    `key`, bundle minus magic, aad = magic) yields `json`
#                    exactly.
#
# Integers are decimal, perm is octal, byte strings are lower-case hex,
# except the text fields (op, path, comm, result, line, aad, json, and the
# keywords expect, base, changes, body, current) and the export `key`
# (base64, as in an export key file). Kind codes: 0 opaque, 1 P-256 private
# (PKCS#8 PEM), 2 P-256 public (SPKI PEM), 3 symmetric-32.
";

#[test]
#[ignore = "generator for tests/data/vectors-vN.txt, not a test; see the comment above it"]
fn generate_vectors_v1() {
    let mut o = Out(String::new());
    o.0.push_str(HEADER);
    o.line("");
    o.kv("format_version", crypto::FORMAT_VERSION);

    // --- sealed records ---
    let (m1, sid1) = (random::<32>(), random::<16>());
    let (m2, sid2) = (random::<32>(), random::<16>());
    let seal = |m: &[u8; 32], sid: &[u8; 16], id: RecordId, pt: &[u8]| {
        StoreKeys::derive(&master(m), sid).seal(id, pt).encode()
    };
    let sym = random::<32>();
    let pem = kinds::generate(KeyKind::EcPrivate);
    let text = b"-----BEGIN CERTIFICATE-----\nnot really a certificate, 63 bytes\n".to_vec();
    let sym_id = RecordId {
        entry: 20,
        version: 1,
        kind: 3,
    };
    let positives = [
        ("sym32", m1, sid1, sym_id, sym.to_vec()),
        (
            "opaque-empty",
            m1,
            sid1,
            RecordId {
                entry: 21,
                version: 4,
                kind: 0,
            },
            Vec::new(),
        ),
        (
            "p256-pkcs8",
            m1,
            sid1,
            RecordId {
                entry: 22,
                version: 2,
                kind: 1,
            },
            pem.expose().to_vec(),
        ),
        (
            "opaque-text",
            m2,
            sid2,
            RecordId {
                entry: (1 << 40) - 1,
                version: (1 << 20) - 2,
                kind: 0,
            },
            text,
        ),
    ];
    o.line("");
    o.line("# ---- sealed key versions (b/ values) ----");
    let mut sealed_of = BTreeMap::new();
    for (name, m, sid, id, pt) in &positives {
        let c = GenSeal {
            name,
            master: *m,
            store_id: *sid,
            id: *id,
            sealed: seal(m, sid, *id, pt),
        };
        gen_seal_section(&mut o, &c, Ok(pt));
        sealed_of.insert(*name, c.sealed.clone());
    }
    let base = &sealed_of["sym32"];
    let flip = |i: usize| {
        let mut b = base.clone();
        b[i] ^= 0x01;
        b
    };
    let mut header = base.clone();
    header[1] = 2;
    /// (name, changes, master, store_id, record id, sealed bytes)
    type Negative<'a> = (&'a str, &'a str, [u8; 32], [u8; 16], RecordId, Vec<u8>);
    let negatives: Vec<Negative<'_>> = vec![
        (
            "sym32-other-entry",
            "entry",
            m1,
            sid1,
            RecordId {
                entry: 21,
                ..sym_id
            },
            base.clone(),
        ),
        (
            "sym32-other-version",
            "version",
            m1,
            sid1,
            RecordId {
                version: 2,
                ..sym_id
            },
            base.clone(),
        ),
        (
            "sym32-other-kind",
            "kind",
            m1,
            sid1,
            RecordId { kind: 0, ..sym_id },
            base.clone(),
        ),
        (
            "sym32-other-master",
            "master",
            m2,
            sid1,
            sym_id,
            base.clone(),
        ),
        (
            "sym32-other-store",
            "store_id",
            m1,
            sid2,
            sym_id,
            base.clone(),
        ),
        (
            "sym32-flipped-ciphertext",
            "sealed-flip",
            m1,
            sid1,
            sym_id,
            flip(2 + crypto::WRAPPED_LEN + crypto::NONCE_LEN + 5),
        ),
        (
            "sym32-flipped-wrapped-key",
            "sealed-flip",
            m1,
            sid1,
            sym_id,
            flip(2 + crypto::NONCE_LEN + 3),
        ),
        (
            "sym32-flipped-data-nonce",
            "sealed-flip",
            m1,
            sid1,
            sym_id,
            flip(2 + crypto::WRAPPED_LEN),
        ),
        (
            "sym32-flipped-tag",
            "sealed-flip",
            m1,
            sid1,
            sym_id,
            flip(base.len() - 1),
        ),
        (
            "sym32-truncated-tag",
            "sealed-truncate",
            m1,
            sid1,
            sym_id,
            base[..base.len() - 1].to_vec(),
        ),
        (
            "sym32-truncated-short",
            "sealed-truncate",
            m1,
            sid1,
            sym_id,
            base[..2 + crypto::WRAPPED_LEN].to_vec(),
        ),
        ("sym32-format-2", "sealed-header", m1, sid1, sym_id, header),
    ];
    o.line("");
    o.line("# ---- negative cases: each must fail with Kind::Integrity ----");
    for (name, changes, m, sid, id, sealed) in negatives {
        let c = GenSeal {
            name,
            master: m,
            store_id: sid,
            id,
            sealed,
        };
        gen_seal_section(&mut o, &c, Err(("sym32", changes)));
    }
    let empty_id = RecordId {
        entry: 21,
        version: 4,
        kind: 0,
    };
    let pem_id = RecordId {
        entry: 22,
        version: 2,
        kind: 1,
    };
    for (name, base_name, changes, id) in [
        (
            "opaque-empty-as-sym32",
            "opaque-empty",
            "kind",
            RecordId {
                kind: 3,
                ..empty_id
            },
        ),
        (
            "p256-pkcs8-other-entry",
            "p256-pkcs8",
            "entry",
            RecordId {
                entry: 23,
                ..pem_id
            },
        ),
    ] {
        let c = GenSeal {
            name,
            master: m1,
            store_id: sid1,
            id,
            sealed: sealed_of[base_name].clone(),
        };
        gen_seal_section(&mut o, &c, Err((base_name, changes)));
    }

    // --- audit key and chain ---
    let audit_key = Key32::new(random::<32>());
    let wrapped = StoreKeys::derive(&master(&m1), &sid1).wrap(&audit_key, b"keyfs-audit-key");
    o.line("");
    o.line("# ---- m/audit_key of the store of master/store_id of [seal sym32] ----");
    o.line("[audit-key store-1]");
    o.hex("master", &m1);
    o.hex("store_id", &sid1);
    o.hex("kcv", &crypto::key_check_value(&master(&m1), &sid1));
    o.kv("aad", "keyfs-audit-key");
    o.hex("wrapped", &wrapped);
    o.hex("audit_key", audit_key.expose());

    o.line("");
    o.line("# ---- audit log: a/<seq> entries and m/audit_head ----");
    o.line("[audit chain-1]");
    o.hex("audit_key", audit_key.expose());
    let entries = [
        (
            Rec::ok("init", "", 0, 0),
            Ctx {
                uid: 0,
                gid: 0,
                pid: 4242,
                comm: "keyfs".into(),
            },
            1_764_366_005_000_000_001i64,
        ),
        (
            Rec::ok("read", "clients/alice01/storage", 22, 2),
            Ctx {
                uid: 1000,
                gid: 1000,
                pid: 31337,
                comm: "acra-server".into(),
            },
            1_764_366_065_123_456_789,
        ),
        (
            Rec {
                op: "destroy",
                path: "clients/alice01/hmac \"old\"".into(),
                entry: 20,
                version: 1,
                result: "ok".into(),
            },
            Ctx {
                uid: 1000,
                gid: 1000,
                pid: 31338,
                comm: "rm".into(),
            },
            1_764_366_125_999_999_999,
        ),
    ];
    o.kv("entries", entries.len());
    let mut head = Head {
        seq: 0,
        mac: [0; 32],
    };
    let mut txn = Txn::default();
    for (rec, ctx, now) in &entries {
        let before = txn.writes.len();
        head = head.stage(&audit_key, &mut txn, rec, ctx, *now);
        let p = |n: &str| format!("entry.{}.{n}", head.seq);
        o.kv(&p("now"), now);
        o.kv(&p("op"), rec.op);
        o.kv(&p("path"), &rec.path);
        o.kv(&p("entry"), rec.entry);
        o.kv(&p("version"), rec.version);
        o.kv(&p("uid"), ctx.uid);
        o.kv(&p("gid"), ctx.gid);
        o.kv(&p("pid"), ctx.pid);
        o.kv(&p("comm"), &ctx.comm);
        o.kv(&p("result"), &rec.result);
        o.kv(&p("line"), audit::format_line(*now, rec, ctx));
        let (k, v) = &txn.writes[before];
        o.hex(&p("key"), k);
        o.hex(&p("value"), v.as_ref().expect("put"));
        o.hex(&p("mac"), &head.mac);
    }
    o.hex(
        "head",
        txn.writes.last().and_then(|w| w.1.as_ref()).expect("head"),
    );

    // --- metadata records ---
    o.line("");
    o.line("# ---- metadata records (n/ and t/ values) ----");
    let public = kinds::validate(KeyKind::EcPrivate, pem.expose(), "gen")
        .expect("valid")
        .expect("public key");
    let old_pem = kinds::generate(KeyKind::EcPrivate);
    let old_public = kinds::validate(KeyKind::EcPrivate, old_pem.expose(), "gen")
        .expect("valid")
        .expect("public key");
    let t1 = 1_764_366_005_123_456_789i64;
    let t2 = 1_764_452_405_987_654_321i64;
    let key_node = Node {
        id: 22,
        parent: 17,
        name: b"storage".to_vec(),
        perm: 0o600,
        uid: 1000,
        gid: 1001,
        atime: t2 + 7,
        mtime: t2,
        ctime: t2 + 1,
        body: Body::Key(KeyBody {
            kind: KeyKind::EcPrivate,
            next_ver: 3,
            current: Some(Ver {
                ver: 2,
                kind: KeyKind::EcPrivate,
                created: t2,
                archived_at: 0,
                size: pem.len() as u32,
                fingerprint: crypto::fingerprint(pem.expose()),
                public,
            }),
            archived: vec![Ver {
                ver: 1,
                kind: KeyKind::EcPrivate,
                created: t1,
                archived_at: t2,
                size: old_pem.len() as u32,
                fingerprint: crypto::fingerprint(old_pem.expose()),
                public: old_public,
            }],
            pinned: false,
            pub_hidden: false,
        }),
    };
    gen_node(
        &mut o,
        "key-with-history",
        "clients/alice01/storage: current version 2 and archived version 1",
        &key_node,
    );
    let hist_node = Node {
        id: 20,
        parent: 17,
        name: b"hmac".to_vec(),
        perm: 0o640,
        uid: 1000,
        gid: 1001,
        atime: t1,
        mtime: t1,
        ctime: t2,
        body: Body::Key(KeyBody {
            kind: KeyKind::Sym32,
            next_ver: 2,
            current: None,
            archived: Vec::new(),
            pinned: true,
            pub_hidden: true,
        }),
    };
    gen_node(
        &mut o,
        "key-pinned-empty",
        "a key with no current version, no archived ones, flags pinned and pub_hidden (0x03)",
        &hist_node,
    );
    gen_node(
        &mut o,
        "root",
        "the root directory as init writes it",
        &Node {
            id: node::ROOT,
            parent: 0,
            name: Vec::new(),
            perm: 0o755,
            uid: 0,
            gid: 0,
            atime: t1,
            mtime: t1,
            ctime: t1,
            body: Body::Dir { subdirs: 3 },
        },
    );
    gen_node(
        &mut o,
        "symlink",
        "a symbolic link clients/bob01/storage -> ../alice01/storage",
        &Node {
            id: 31,
            parent: 18,
            name: b"storage".to_vec(),
            perm: 0o777,
            uid: 1002,
            gid: 1002,
            atime: t2,
            mtime: t2,
            ctime: t2,
            body: Body::Symlink(b"../alice01/storage".to_vec()),
        },
    );
    let tomb = Tombstone {
        path: "clients/alice01/hmac".into(),
        entry: 20,
        ver: 1,
        kind: KeyKind::Sym32,
        created: t1,
        destroyed: t2,
        uid: 1000,
    };
    o.line("");
    o.line("[tombstone hmac-v1]");
    o.hex("encoded", &tomb.encode());
    o.kv("path", &tomb.path);
    o.kv("entry", tomb.entry);
    o.kv("ver", tomb.ver);
    o.kv("kind", tomb.kind as u8);
    o.kv("created", tomb.created);
    o.kv("destroyed", tomb.destroyed);
    o.kv("uid", tomb.uid);

    // --- layout ---
    o.line("");
    o.line("# ---- sled keys, the m/format value, inode numbers (u64 big-endian) ----");
    o.line("[layout v1]");
    o.hex("node_key 22", &node::node_key(22));
    o.hex("dirent_prefix 17", &node::dirent_prefix(17));
    o.hex(
        &format!("dirent_key 17 {}", crypto::hex(b"storage")),
        &node::dirent_key(17, b"storage"),
    );
    o.hex("blob_key 22 2", &node::blob_key(22, 2));
    o.hex("tomb_key 20 1", &node::tomb_key(20, 1));
    o.hex("audit_head_key", audit::HEAD_KEY);
    o.hex("meta_format_value", &crypto::FORMAT_VERSION.to_be_bytes());
    for (label, ino) in [
        ("node 1", Ino::Node(1)),
        ("node 1099511627775", Ino::Node(node::MAX_ID - 1)),
        ("old 22", Ino::Old(22)),
        ("ver 22 1", Ino::Ver(22, 1)),
        (
            "ver 1099511627775 1048575",
            Ino::Ver(node::MAX_ID - 1, node::MAX_VER - 1),
        ),
        ("pub 22", Ino::Pub(22)),
        ("staged 5", Ino::Staged(5)),
        ("special dir", Ino::Special(Special::Dir)),
        ("special status", Ino::Special(Special::Status)),
        ("special audit", Ino::Special(Special::Audit)),
    ] {
        o.hex(&format!("ino {label}"), &ino.raw().to_be_bytes());
    }

    // --- export bundle ---
    use base64::Engine;
    let old_sym = random::<32>();
    let created = |t: i64| keyfs::inventory::names::format_ts(t);
    let doc = BundleDoc {
        format: "keyfs-export-v1".into(),
        private: true,
        dirs: vec![
            BundleDirDoc {
                path: "clients".into(),
                perm: 0o755,
                uid: 0,
                gid: 0,
            },
            BundleDirDoc {
                path: "clients/alice01".into(),
                perm: 0o700,
                uid: 1000,
                gid: 1001,
            },
        ],
        keys: vec![
            BundleKeyDoc {
                path: "clients/alice01/hmac".into(),
                kind: KeyKind::Sym32.label().into(),
                perm: 0o600,
                uid: 1000,
                gid: 1001,
                versions: vec![
                    BundleVersionDoc {
                        version: 2,
                        created: created(t2),
                        archived: None,
                        material: b64().encode(sym),
                    },
                    BundleVersionDoc {
                        version: 1,
                        created: created(t1),
                        archived: Some(created(t2)),
                        material: b64().encode(old_sym),
                    },
                ],
            },
            BundleKeyDoc {
                path: "clients/alice01/storage".into(),
                kind: KeyKind::EcPrivate.label().into(),
                perm: 0o600,
                uid: 1000,
                gid: 1001,
                versions: vec![BundleVersionDoc {
                    version: 1,
                    created: created(t1),
                    archived: None,
                    material: b64().encode(pem.expose()),
                }],
            },
            BundleKeyDoc {
                path: "clients/alice01/storage.pub".into(),
                kind: KeyKind::EcPublic.label().into(),
                perm: 0o644,
                uid: 1000,
                gid: 1001,
                versions: vec![BundleVersionDoc {
                    version: 1,
                    created: created(t1),
                    archived: None,
                    material: b64().encode(match &key_node.body {
                        Body::Key(k) => k.current.as_ref().expect("current").public.clone(),
                        _ => unreachable!(),
                    }),
                }],
            },
        ],
    };
    let json = serde_json::to_string(&doc).expect("json");
    let export_key = Key32::new(random::<32>());
    let magic = b"KEYFS-EXPORT-1\n";
    let mut bundle = magic.to_vec();
    bundle.extend_from_slice(&crypto::seal_raw(&export_key, json.as_bytes(), magic));
    o.line("");
    o.line("# ---- export bundle (keyfs export --private) and its export key file ----");
    o.line("[export alice01-private]");
    o.kv("key", b64().encode(export_key.expose()));
    o.hex("magic", magic);
    o.hex("bundle", &bundle);
    o.kv("json", &json);

    match std::env::var_os("KEYFS_WRITE_VECTORS") {
        Some(p) => {
            std::fs::write(&p, &o.0).expect("write vectors");
            eprintln!("wrote {}", std::path::Path::new(&p).display());
        }
        None => print!("{}", o.0),
    }
    // The generated file must pass the checks above.
    let v = parse(&o.0);
    assert_eq!(v.of("seal").len(), 4 + 12 + 2);
}
