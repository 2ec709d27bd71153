//! Whole-inventory operations: list, check, export/import, rewrap, compact, audit.

use super::audit::{self, Ctx, Rec};
use super::kinds::{self, KeyKind};
use super::names::{format_ts, parse_ts, validate_component};
use super::node::{
    self, blob_key, dirent_prefix, node_key, Body, Ino, KeyBody, Node, Tombstone, Ver,
};
use super::{Inventory, NewAttrs, META_AUDIT_KEY, META_KCV};
use crate::crypto::{self, RecordId, Sealed, StoreKeys};
use crate::error::{err, Error, Kind, Result};
use crate::secret::{Key32, MasterKey, SecretBytes};
use crate::store::{Txn, TxnOutcome};
use base64::Engine;
use std::path::Path;
use zeroize::Zeroizing;

/// One version in a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u32,
    /// current, archived or destroyed.
    pub state: &'static str,
    /// Created (RFC 3339).
    pub created: String,
    /// Archive name (RFC 3339), for archived versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived: Option<String>,
    /// Destroyed at (RFC 3339), for tombstones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<String>,
    /// SHA-256 of the material, hex (absent for destroyed versions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Size in bytes.
    pub size: u32,
}

/// One key in a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    /// Tree path.
    pub path: String,
    /// Client id, if under clients/.
    pub client: Option<String>,
    /// Kind label.
    pub kind: &'static str,
    /// Versions, current first, then archived newest first, then destroyed.
    pub versions: Vec<VersionInfo>,
}

fn vinfo(v: &Ver, state: &'static str) -> VersionInfo {
    VersionInfo {
        version: v.ver,
        state,
        created: format_ts(v.created),
        archived: (v.archived_at != 0).then(|| format_ts(v.archived_at)),
        destroyed: None,
        fingerprint: Some(crypto::hex(&v.fingerprint)),
        size: v.size,
    }
}

const EXPORT_MAGIC: &[u8] = b"KEYFS-EXPORT-1\n";

#[derive(serde::Serialize, serde::Deserialize)]
struct BundleVersion {
    version: u32,
    created: String,
    archived: Option<String>,
    material: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BundleEntry {
    path: String,
    kind: String,
    perm: u16,
    uid: u32,
    gid: u32,
    versions: Vec<BundleVersion>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BundleDir {
    path: String,
    perm: u16,
    uid: u32,
    gid: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BundleLink {
    path: String,
    target: String,
    uid: u32,
    gid: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Bundle {
    format: String,
    private: bool,
    dirs: Vec<BundleDir>,
    keys: Vec<BundleEntry>,
    /// Symbolic links (metadata, not secrets); absent from bundles without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    links: Vec<BundleLink>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// (root id, root path, every node below with its path).
type Subtree = (u64, String, Vec<(String, Node)>);

impl Inventory {
    fn walk(&self, id: u64, path: &str, out: &mut Vec<(String, Node)>) -> Result<()> {
        for (k, v) in self.backend.scan_prefix(&dirent_prefix(id))? {
            let name = String::from_utf8_lossy(&k[10..]).into_owned();
            let cid = u64::from_be_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| Error::new(Kind::Integrity, "corrupted directory entry"))?,
            );
            let n = match self.get_node(cid) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) => {
                    // One damaged record must not hide the rest of the tree.
                    log::error!("{path}/{name}: {e}; run `keyfs check`");
                    continue;
                }
            };
            let p = if path.is_empty() {
                name
            } else {
                format!("{path}/{name}")
            };
            let is_dir = n.is_dir();
            out.push((p.clone(), n));
            if is_dir {
                self.walk(cid, &p, out)?;
            }
        }
        Ok(())
    }

    fn subtree(&self, root: &str) -> Result<Subtree> {
        let root = root.trim_matches('/');
        let id = match self.resolve(root)? {
            Ino::Node(id) => id,
            other => {
                return err(
                    Kind::Invalid,
                    format!("{} is not a directory of the tree", self.ino_path(other)),
                )
            }
        };
        let base = self.path_of(id);
        let mut out = Vec::new();
        let root_node = self.node(id)?;
        if root_node.is_dir() {
            if !matches!(
                id,
                node::ROOT | node::CLIENTS | node::POISON | node::AUDIT_DIR
            ) {
                out.push((base.clone(), root_node));
            }
            self.walk(id, &base, &mut out)?;
        } else {
            out.push((base.clone(), self.node(id)?));
        }
        Ok((id, base, out))
    }

    /// The inventory under `root` ("" for all).
    pub fn list(&self, root: &str) -> Result<Vec<KeyInfo>> {
        let (_, base, nodes) = self.subtree(root)?;
        let mut tombs: std::collections::BTreeMap<u64, Vec<Tombstone>> = Default::default();
        for (_, v) in self.backend.scan_prefix(b"t/")? {
            if let Ok(t) = Tombstone::decode(&v) {
                tombs.entry(t.entry).or_default().push(t);
            }
        }
        let mut out = Vec::new();
        let client_of = |p: &str| {
            p.strip_prefix("clients/")
                .map(|r| r.split('/').next().unwrap_or("").to_string())
        };
        for (path, n) in &nodes {
            let Some(k) = n.key() else { continue };
            let mut versions = Vec::new();
            if let Some(c) = &k.current {
                versions.push(vinfo(c, "current"));
            }
            for a in k.archived.iter().rev() {
                versions.push(vinfo(a, "archived"));
            }
            for t in tombs.remove(&n.id).unwrap_or_default() {
                versions.push(tomb_info(&t));
            }
            out.push(KeyInfo {
                path: path.clone(),
                client: client_of(path),
                kind: k.kind.label(),
                versions,
            });
            if let (Some(c), Some(pn)) = (&k.current, kinds::public_name(&n.name)) {
                if self.sibling_pub_visible(n)? {
                    let pp = format!(
                        "{}/{}",
                        path.rsplit_once('/').map(|x| x.0).unwrap_or(""),
                        String::from_utf8_lossy(pn)
                    );
                    let mut v = vinfo(c, "current");
                    v.fingerprint = Some(crypto::hex(&crypto::fingerprint(&c.public)));
                    v.size = c.public.len() as u32;
                    out.push(KeyInfo {
                        path: pp.clone(),
                        client: client_of(&pp),
                        kind: KeyKind::EcPublic.label(),
                        versions: vec![v],
                    });
                }
            }
        }
        // Keys destroyed entirely: only their tombstones remain.
        for (_, ts) in tombs {
            // A tombstone keeps where the version died: `<key>.old/<ts>` names key `<key>`.
            let path = match ts[0].path.rsplit_once('/') {
                Some((dir, last)) if parse_ts(last.as_bytes()).is_some() => {
                    dir.strip_suffix(".old").unwrap_or(dir).to_string()
                }
                _ => ts[0].path.clone(),
            };
            if base.is_empty() || path.starts_with(&format!("{base}/")) || path == base {
                out.push(KeyInfo {
                    client: client_of(&path),
                    path,
                    kind: ts[0].kind.label(),
                    versions: ts.iter().map(tomb_info).collect(),
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Verify every record and the audit chain; one message per problem.
    pub fn check(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for (k, v) in self.backend.scan_prefix(b"n/")? {
            let id = k
                .get(2..10)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let n = match Node::decode(&v) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("entry {id}: {}", e.message()));
                    continue;
                }
            };
            let path = self.path_of(id);
            if id != node::ROOT && self.child(n.parent, &n.name)? != Some(id) {
                problems.push(format!("{path}: not linked from its directory"));
            }
            if let Some(kb) = n.key() {
                for ver in kb.current.iter().chain(kb.archived.iter()) {
                    let vpath = if ver.archived_at == 0 {
                        path.clone()
                    } else {
                        format!("{path}.old/{}", format_ts(ver.archived_at))
                    };
                    match self.open_blob_uncached(&n, ver) {
                        Ok(m) => {
                            if !crypto::ct_eq(&crypto::fingerprint(m.expose()), &ver.fingerprint) {
                                problems.push(format!(
                                    "{vpath} (version {}): fingerprint does not match",
                                    ver.ver
                                ));
                            }
                        }
                        Err(e) => {
                            problems.push(format!("{vpath} (version {}): {}", ver.ver, e.message()))
                        }
                    }
                }
            }
        }
        for (k, v) in self.backend.scan_prefix(b"d/")? {
            let ok = v
                .as_slice()
                .try_into()
                .ok()
                .map(u64::from_be_bytes)
                .map(|id| self.backend.get(&node_key(id)));
            match ok {
                Some(Ok(Some(_))) => {}
                _ => problems.push(format!(
                    "directory entry {:?} points to a missing entry",
                    String::from_utf8_lossy(&k[10..])
                )),
            }
        }
        for p in audit::verify(&*self.backend, &self.audit_key)? {
            problems.push(format!("audit log: {p}"));
        }
        Ok(problems)
    }

    /// The audit log as text lines.
    pub fn audit_lines(&self) -> Result<Vec<String>> {
        audit::lines(&*self.backend)
    }

    /// Verify the audit chain.
    pub fn audit_verify(&self) -> Result<Vec<String>> {
        audit::verify(&*self.backend, &self.audit_key)
    }

    /// Export the subtree `root` as a bundle sealed under a fresh export key.
    /// Returns (bundle bytes, export key). Public keys only unless `private`.
    pub fn export(&self, root: &str, private: bool, ctx: &Ctx) -> Result<(Vec<u8>, Key32)> {
        let (_, _, nodes) = self.subtree(root)?;
        let mut b = Bundle {
            format: "keyfs-export-v1".into(),
            private,
            dirs: Vec::new(),
            keys: Vec::new(),
            links: Vec::new(),
        };
        let mut recs = Vec::new();
        for (path, n) in &nodes {
            match &n.body {
                Body::Dir { .. } => b.dirs.push(BundleDir {
                    path: path.clone(),
                    perm: n.perm,
                    uid: n.uid,
                    gid: n.gid,
                }),
                Body::Symlink(t) => b.links.push(BundleLink {
                    path: path.clone(),
                    target: String::from_utf8_lossy(t).into_owned(),
                    uid: n.uid,
                    gid: n.gid,
                }),
                Body::Key(k) => {
                    if private || k.kind.is_public() {
                        let mut versions = Vec::new();
                        for v in k.current.iter().chain(k.archived.iter()) {
                            let m = self.open_blob(n, v).map_err(|e| e.context(path))?;
                            versions.push(BundleVersion {
                                version: v.ver,
                                created: format_ts(v.created),
                                archived: (v.archived_at != 0).then(|| format_ts(v.archived_at)),
                                material: b64().encode(m.expose()),
                            });
                        }
                        recs.push(Rec::ok("export", path.clone(), n.id, 0));
                        b.keys.push(BundleEntry {
                            path: path.clone(),
                            kind: k.kind.label().into(),
                            perm: n.perm,
                            uid: n.uid,
                            gid: n.gid,
                            versions,
                        });
                    }
                    if let (Some(c), Some(pn)) = (&k.current, kinds::public_name(&n.name)) {
                        if self.sibling_pub_visible(n)? {
                            let pp = format!(
                                "{}/{}",
                                path.rsplit_once('/').map(|x| x.0).unwrap_or(""),
                                String::from_utf8_lossy(pn)
                            );
                            b.keys.push(BundleEntry {
                                path: pp,
                                kind: KeyKind::EcPublic.label().into(),
                                perm: 0o644,
                                uid: n.uid,
                                gid: n.gid,
                                versions: vec![BundleVersion {
                                    version: 1,
                                    created: format_ts(c.created),
                                    archived: None,
                                    material: b64().encode(&c.public),
                                }],
                            });
                        }
                    }
                }
            }
        }
        let json = Zeroizing::new(
            serde_json::to_vec(&b)
                .map_err(|e| Error::new(Kind::Store, format!("cannot encode bundle: {e}")))?,
        );
        // Base64 strings inside `b` hold material: wipe them.
        for k in b.keys.iter_mut() {
            for v in k.versions.iter_mut() {
                zeroize::Zeroize::zeroize(&mut v.material);
            }
        }
        let key = Key32::random();
        let mut out = EXPORT_MAGIC.to_vec();
        out.extend_from_slice(&crypto::seal_raw(&key, &json, EXPORT_MAGIC));
        self.audit_only(&recs, ctx, true)?;
        Ok((out, key))
    }

    /// Import a bundle under `root` ("" = paths as exported). Refuses, changing
    /// nothing, when any key in it already exists.
    pub fn import(&self, bundle: &[u8], key: &Key32, root: &str, ctx: &Ctx) -> Result<usize> {
        self.check_rw()?;
        let body = bundle.strip_prefix(EXPORT_MAGIC).ok_or_else(|| {
            Error::new(Kind::Invalid, "not a keyfs export bundle (bad header); pass the file written by `keyfs export --out`")
        })?;
        let json = crypto::open_raw(key, body, EXPORT_MAGIC).map_err(|_| {
            Error::new(Kind::Integrity, "the bundle does not decrypt with this export key (wrong --key file, or the bundle was altered)")
        })?;
        let b: Bundle = serde_json::from_slice(json.expose())
            .map_err(|e| Error::new(Kind::Invalid, format!("bundle content is malformed: {e}")))?;
        let prefix = root.trim_matches('/');
        let full = |p: &str| {
            if prefix.is_empty() {
                p.to_string()
            } else {
                format!("{prefix}/{p}")
            }
        };
        // Refuse silently overwriting anything.
        let mut conflicts = Vec::new();
        for k in &b.keys {
            let p = full(&k.path);
            let (dir, name) = p.rsplit_once('/').unwrap_or(("", &p));
            if let Ok(Ino::Node(d)) = self.resolve(dir) {
                if self.child(d, name.as_bytes())?.is_some() || self.resolve(&p).is_ok() {
                    conflicts.push(p.clone());
                }
            }
        }
        for l in &b.links {
            let p = full(&l.path);
            if self.resolve(&p).is_ok() {
                conflicts.push(p);
            }
        }
        if !conflicts.is_empty() {
            return err(
                Kind::Exists,
                format!("import would overwrite existing keys: {}; nothing was imported — destroy or move them first, or import under another root", conflicts.join(", ")),
            );
        }
        // Validate everything before changing anything: a refused import
        // leaves no directories behind.
        let mut seen = std::collections::BTreeSet::new();
        for k in &b.keys {
            let p = full(&k.path);
            let norm: Vec<&str> = p
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            if !seen.insert(norm.join("/")) {
                return err(
                    Kind::Invalid,
                    format!("{p}: the bundle lists this key twice; nothing was imported"),
                );
            }
            match norm.len() {
                0 | 1 => {
                    return err(
                        Kind::Perm,
                        format!("{p}: keys cannot be at the top level; nothing was imported"),
                    )
                }
                2 if norm[0] == "clients" => {
                    return err(
                        Kind::Perm,
                        format!(
                            "{p}: clients/ holds only client directories; nothing was imported"
                        ),
                    )
                }
                _ => {}
            }
            let name = norm.last().expect("checked");
            validate_component(name.as_bytes())?;
            let kind = KeyKind::for_name(name.as_bytes());
            let mut vers = std::collections::BTreeSet::new();
            for bv in &k.versions {
                let m = SecretBytes::new(b64().decode(&bv.material).map_err(|_| {
                    Error::new(
                        Kind::Invalid,
                        format!("{p}: bundle material is not base64; nothing was imported"),
                    )
                })?);
                kinds::validate(kind, m.expose(), &p)?;
                if bv.version == 0 || !vers.insert(bv.version) {
                    return err(Kind::Invalid, format!("{p}: bundle has an invalid or duplicate version number {}; nothing was imported", bv.version));
                }
            }
        }
        let mut dirs: Vec<&BundleDir> = b.dirs.iter().collect();
        dirs.sort_by_key(|d| d.path.matches('/').count());
        for d in dirs {
            let p = full(&d.path);
            if self.resolve(&p).is_ok() {
                continue;
            }
            let (parent, name) = self.resolve_parent(&p)?;
            self.mkdir(
                parent,
                name.as_bytes(),
                NewAttrs {
                    perm: d.perm,
                    uid: d.uid,
                    gid: d.gid,
                },
                false,
                ctx,
            )?;
        }
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        let mut count = 0;
        for k in &b.keys {
            let p = full(&k.path);
            let (parent, name) = self.resolve_parent(&p)?;
            let Ino::Node(pid) = parent else {
                return err(Kind::Invalid, format!("{p}: parent is not a directory"));
            };
            validate_component(name.as_bytes())?;
            let kind = KeyKind::for_name(name.as_bytes());
            if kinds::private_name(name.as_bytes()).is_some_and(|pn| {
                b.keys.iter().any(|o| {
                    full(&o.path)
                        == format!(
                            "{}/{}",
                            p.rsplit_once('/').map(|x| x.0).unwrap_or(""),
                            String::from_utf8_lossy(pn)
                        )
                })
            }) {
                continue; // derived from the private key imported with it
            }
            let id = self.alloc_id(&mut next, &mut w.txn)?;
            let mut kb = KeyBody::new(kind);
            for bv in &k.versions {
                let m = SecretBytes::new(b64().decode(&bv.material).map_err(|_| {
                    Error::new(Kind::Invalid, format!("{p}: bundle material is not base64"))
                })?);
                let public = kinds::validate(kind, m.expose(), &p)?;
                // Keep the bundle's version numbers (they name versions in listings and audit).
                if bv.version == 0
                    || bv.version >= node::MAX_VER - 1
                    || kb.version(bv.version).is_some()
                {
                    return err(
                        Kind::Invalid,
                        format!(
                            "{p}: bundle has an invalid or duplicate version number {}",
                            bv.version
                        ),
                    );
                }
                let mut v = w.new_ver(&mut kb, kind, m.expose(), public)?;
                v.ver = bv.version;
                kb.next_ver = kb.next_ver.max(bv.version + 1);
                v.created = parse_ts(bv.created.as_bytes()).unwrap_or(w.now);
                w.seal(id, &v, m.expose());
                match bv.archived.as_deref().and_then(|a| parse_ts(a.as_bytes())) {
                    Some(ts) => {
                        v.archived_at = kb.free_archive_ts(ts);
                        kb.push_archived(v);
                    }
                    None => {
                        if kb.current.is_some() {
                            return err(
                                Kind::Invalid,
                                format!("{p}: bundle lists two current versions"),
                            );
                        }
                        kb.current = Some(v);
                    }
                }
            }
            w.audit(Rec::ok(
                "import",
                p.clone(),
                id,
                kb.current.as_ref().map(|v| v.ver).unwrap_or(0),
            ));
            let n = Node {
                id,
                parent: pid,
                name: name.as_bytes().to_vec(),
                perm: k.perm & 0o7777,
                uid: k.uid,
                gid: k.gid,
                atime: w.now,
                mtime: w.now,
                ctime: w.now,
                body: Body::Key(kb),
            };
            w.save(&n);
            w.link(pid, name.as_bytes(), id);
            count += 1;
        }
        w.commit(true)?;
        drop(next);
        for l in &b.links {
            let p = full(&l.path);
            let (parent, name) = self.resolve_parent(&p)?;
            self.symlink(
                parent,
                name.as_bytes(),
                l.target.as_bytes(),
                NewAttrs {
                    perm: 0o777,
                    uid: l.uid,
                    gid: l.gid,
                },
                ctx,
            )?;
        }
        Ok(count)
    }

    /// Master-key rotation: re-wrap every data key and the audit key under
    /// `new`, replace the key-check value — one transaction.
    pub fn rewrap(&self, new: &MasterKey, ctx: &Ctx) -> Result<usize> {
        self.retrying(|| self.rewrap_once(new, ctx))
    }

    fn rewrap_once(&self, new: &MasterKey, ctx: &Ctx) -> Result<usize> {
        self.check_rw()?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let to = StoreKeys::derive(new, &self.store_id);
        let mut txn = Txn::default();
        let mut count = 0;
        for (_, v) in self.backend.scan_prefix(b"n/")? {
            let n = Node::decode(&v)?;
            if let Some(k) = n.key() {
                for ver in k.current.iter().chain(k.archived.iter()) {
                    let bk = blob_key(n.id, ver.ver);
                    let raw = self.backend.get(&bk)?.ok_or_else(|| {
                        Error::new(
                            Kind::Integrity,
                            format!(
                                "{}: sealed record missing; run `keyfs check`",
                                self.path_of(n.id)
                            ),
                        )
                    })?;
                    let s = Sealed::decode(&raw)?;
                    let r = self
                        .keys
                        .rewrap(
                            &to,
                            RecordId {
                                entry: n.id,
                                version: ver.ver,
                                kind: ver.kind as u8,
                            },
                            &s,
                        )
                        .map_err(|e| e.context(self.path_of(n.id)))?;
                    txn.guard(bk.clone(), Some(raw));
                    txn.put(bk, r.encode());
                    count += 1;
                }
            }
        }
        txn.put(
            META_AUDIT_KEY.to_vec(),
            to.wrap(&self.audit_key, b"keyfs-audit-key"),
        );
        txn.put(
            META_KCV.to_vec(),
            crypto::key_check_value(new, &self.store_id).to_vec(),
        );
        let now = super::names::now_ns();
        self.commit(&mut txn, &[Rec::ok("rewrap", "", 0, 0)], ctx, now, true)?;
        self.cache.clear();
        Ok(count)
    }

    /// Rewrite the store into fresh files so that destroyed records and
    /// superseded wrapped keys are physically gone. Consumes the handle.
    pub fn compact(self, ctx: &Ctx) -> Result<(u64, u64)> {
        self.audit_only(&[Rec::ok("compact", "", 0, 0)], ctx, true)?;
        if let Some(sizes) = self.backend.reclaim()? {
            return Ok(sizes);
        }
        let before = dir_size(&self.dir.join("db"));
        let all = self.backend.scan_prefix(b"")?;
        let dir = self.dir.clone();
        // Keep the store locked (a dup of the flocked descriptor) while sled closes.
        let lock = self
            ._lock
            .as_ref()
            .map(|l| l.try_clone())
            .transpose()
            .map_err(|e| Error::new(Kind::Store, format!("cannot keep the store lock: {e}")))?;
        drop(self);
        let tmp = dir.join("db.compact");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| {
                Error::new(Kind::Store, format!("cannot remove {}: {e}", tmp.display()))
            })?;
        }
        {
            let nb = crate::store::sled_backend::SledBackend::open(&tmp)?;
            let mut txn = Txn::default();
            for (k, v) in all {
                txn.put(k, v);
            }
            if nb_transact(&nb, &txn)? != TxnOutcome::Committed {
                return err(Kind::Store, "compaction could not write the new database");
            }
        }
        let old = dir.join("db.old");
        std::fs::rename(dir.join("db"), &old)
            .map_err(|e| Error::new(Kind::Store, format!("cannot swap databases: {e}")))?;
        std::fs::rename(&tmp, dir.join("db")).map_err(|e| {
            Error::new(
                Kind::Store,
                format!(
                    "cannot swap databases: {e}; the previous database is at {}",
                    old.display()
                ),
            )
        })?;
        std::fs::remove_dir_all(&old).map_err(|e| {
            Error::new(Kind::Store, format!("cannot remove {}: {e}", old.display()))
        })?;
        let after = dir_size(&dir.join("db"));
        drop(lock);
        Ok((before, after))
    }
}

fn nb_transact(b: &crate::store::sled_backend::SledBackend, t: &Txn) -> Result<TxnOutcome> {
    use crate::store::Backend;
    let r = b.transact(t)?;
    b.flush()?;
    Ok(r)
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

fn tomb_info(t: &Tombstone) -> VersionInfo {
    VersionInfo {
        version: t.ver,
        state: "destroyed",
        created: format_ts(t.created),
        archived: None,
        destroyed: Some(format_ts(t.destroyed)),
        fingerprint: None,
        size: 0,
    }
}

/// Load an export key file (base64 of 32 bytes).
pub fn read_export_key(path: &Path) -> Result<Key32> {
    let text = Zeroizing::new(std::fs::read(path).map_err(|e| {
        Error::new(
            Kind::NotFound,
            format!("cannot read export key {}: {e}", path.display()),
        )
    })?);
    let t: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let raw = Zeroizing::new(b64().decode(&t).map_err(|_| {
        Error::new(
            Kind::Invalid,
            format!(
                "{} is not an export key (expected base64 of 32 bytes)",
                path.display()
            ),
        )
    })?);
    Key32::from_slice(&raw).ok_or_else(|| {
        Error::new(
            Kind::Invalid,
            format!(
                "{} is not an export key (expected 32 bytes)",
                path.display()
            ),
        )
    })
}
