//! The domain: clients, keys, versions, rotation, rollback, destruction and
//! audit, over a [`Backend`]. The FUSE layer and the CLI both call this API;
//! it never sees the kernel and the store never sees plaintext.

pub mod admin;
pub mod audit;
mod cache;
pub mod kinds;
pub mod names;
pub mod node;
pub mod sealed;

use crate::crypto::{self, RecordId, Sealed, StoreKeys};
use crate::error::{err, Error, Kind, Result};
use crate::secret::{Key32, MasterKey, SecretBytes};
use crate::store::etcd_backend::{self, EtcdBackend, EtcdUrl};
use crate::store::sled_backend::SledBackend;
use crate::store::{Backend, Change, Txn, TxnOutcome};
use audit::{Ctx, Head, Rec};
use kinds::KeyKind;
use names::{format_ts, history_of, now_ns, parse_ts, validate_component, ClientId};
use node::{
    blob_key, dirent_key, dirent_prefix, node_key, pending_key, tomb_key, Body, Ino, KeyBody, Node,
    Pending, Special, Tombstone, Ver,
};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const META_FORMAT: &[u8] = b"m/format";
const META_STORE_ID: &[u8] = b"m/store_id";
const META_KCV: &[u8] = b"m/kcv";
const META_AUDIT_KEY: &[u8] = b"m/audit_key";
const META_NEXT_ID: &[u8] = b"m/next_id";

/// File type as the tree shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FType {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
}

/// Attributes of one tree entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// What it is.
    pub ino: Ino,
    /// Type.
    pub ftype: FType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Times, ns since the epoch.
    pub atime: i64,
    /// Modification time.
    pub mtime: i64,
    /// Status change time.
    pub ctime: i64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Name.
    pub name: Vec<u8>,
    /// Inode.
    pub ino: Ino,
    /// Type.
    pub ftype: FType,
}

/// Attribute changes (chmod, chown, utimens).
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    /// New permission bits.
    pub perm: Option<u16>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New access time, ns.
    pub atime: Option<i64>,
    /// New modification time, ns.
    pub mtime: Option<i64>,
}

/// Owner and mode of something new.
#[derive(Debug, Clone, Copy)]
pub struct NewAttrs {
    /// Requested permission bits (capped: keys at most 0600, directories 0700).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

impl NewAttrs {
    /// Defaults for CLI-created things: owned by the caller, 0600/0700.
    pub fn for_ctx(ctx: &Ctx) -> Self {
        NewAttrs {
            perm: 0o700,
            uid: ctx.uid,
            gid: ctx.gid,
        }
    }
}

/// How the store is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Refuse every change with `EROFS`.
    pub read_only: bool,
}

/// The default key set of a new client.
pub const DEFAULT_CLIENT_KEYS: &[&str] = &["storage", "storage_sym", "hmac"];
/// Global keys: (directory id, name).
pub const GLOBAL_KEYS: &[(u64, &str)] = &[
    (node::POISON, "poison_key"),
    (node::POISON, "poison_key_sym"),
    (node::AUDIT_DIR, "secure_log_key"),
];

/// What another writer changed, as the mount needs it to invalidate the
/// kernel's caches (shared stores only).
#[derive(Debug, Clone)]
pub enum Changed {
    /// A node (key, directory or symlink) changed, appeared or went away.
    Node {
        /// Its id.
        id: u64,
        /// Before the change.
        before: Option<Box<Node>>,
        /// After it.
        after: Option<Box<Node>>,
    },
    /// A name in a directory was added or removed.
    Dirent {
        /// The directory's id.
        parent: u64,
        /// The name.
        name: Vec<u8>,
    },
}

/// Receives other writers' changes (the mount's kernel-cache invalidation).
pub type ChangeListener = Box<dyn Fn(&[Changed]) + Send + Sync>;

/// Records a shared store's processes do not keep in memory: the audit log
/// (it grows with every read and is read only by `keyfs audit` and
/// `.keyfs/audit`). Its head is mirrored.
const UNMIRRORED: &[&[u8]] = &[b"a/"];

/// Read audits kept in memory while a shared store is unreachable.
const MAX_QUEUED_READS: usize = 100_000;

/// Entry ids a process of a shared store reserves at a time.
const ID_BLOCK: u64 = 256;

/// An open store.
pub struct Inventory {
    backend: Box<dyn Backend>,
    keys: StoreKeys,
    master: MasterKey,
    audit_key: Key32,
    store_id: Vec<u8>,
    head: Mutex<Head>,
    cache: Arc<cache::Caches>,
    /// Shared stores: ids reserved for this process, `next..end`.
    id_block: Mutex<(u64, u64)>,
    /// Shared stores: who hears of other writers' changes.
    listener: Arc<Mutex<Option<ChangeListener>>>,
    /// Read audits waiting to be appended (mount mode: batched off the read path).
    pending_reads: Mutex<Vec<(Rec, Ctx, i64)>>,
    async_read_audit: std::sync::atomic::AtomicBool,
    /// Archive instants requested for the next rotation of a key (Acra's
    /// writer hard-links the current file to `<file>.old/<ts>` before it
    /// renames the new file over it).
    next_archive: Mutex<std::collections::HashMap<u64, i64>>,
    /// `--destroy-delay`, ns (0: destruction is immediate).
    destroy_delay: std::sync::atomic::AtomicI64,
    writer: Mutex<u64>,
    dir: PathBuf,
    read_only: bool,
    _lock: Option<std::fs::File>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inventory({})", self.dir.display())
    }
}

impl Drop for Inventory {
    fn drop(&mut self) {
        if let Err(e) = self.flush_read_audits() {
            log::error!("could not append the last read audits: {e}");
        }
        let _ = self.backend.flush();
    }
}

/// keyfs never makes a public key on its own: its private key would be lost.
fn refuse_public(kind: KeyKind, path: &str) -> Result<()> {
    if kind.is_public() {
        return err(
            Kind::Invalid,
            format!("{path} is a public key and keyfs cannot make one without its private key: generate the key pair (`storage`) instead, or copy the host's public key into the mount (`cp host.pub MOUNT/clients/ID/storage.pub`)"),
        );
    }
    Ok(())
}

fn store_err(msg: impl Into<String>) -> Error {
    Error::new(Kind::Store, msg)
}

fn lock_store(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&p)
        .map_err(|e| {
            store_err(format!(
                "cannot open {}: {e}; check the store directory's owner and mode",
                p.display()
            ))
        })?;
    // A process that just forked (to exec something else) can hold a copy of
    // a descriptor we closed for a moment: retry briefly before calling the
    // store busy.
    let mut locked = crate::sys::try_flock(&f);
    for _ in 0..25 {
        if locked {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        locked = crate::sys::try_flock(&f);
    }
    if !locked {
        let mut holder = String::new();
        f.read_to_string(&mut holder).ok();
        return Err(Error::new(
            Kind::Busy,
            format!(
                "store {} is in use by another process ({}); while a mount serves it, use the files under the mountpoint (omit --store), or `keyfs umount` it first",
                dir.display(),
                holder.trim()
            ),
        ));
    }
    f.set_len(0).ok();
    f.rewind().ok();
    let pid = std::process::id();
    write!(f, "pid {pid} {}", crate::sys::process_name(pid)).ok();
    Ok(f)
}

/// The etcd URL `dir` names, if it names one (`etcd://…`).
fn etcd_url(dir: &Path) -> Result<Option<EtcdUrl>> {
    match dir.to_str() {
        Some(s) if etcd_backend::is_url(s) => EtcdUrl::parse(s).map(Some),
        _ => Ok(None),
    }
}

/// Make (or check) an empty 0700 directory for a new sled store.
fn init_store_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return err(
                Kind::Exists,
                format!(
                    "{} already exists and is not empty; choose a new directory for the store",
                    dir.display()
                ),
            );
        }
    } else {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                store_err(format!(
                    "cannot create store directory {}: {e}",
                    dir.display()
                ))
            })?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| store_err(format!("cannot set mode 0700 on {}: {e}", dir.display())))
}

/// Another writer's changes: forget what the caches hold of them, then tell the mount.
fn on_remote(cache: &cache::Caches, listener: &Mutex<Option<ChangeListener>>, changes: &[Change]) {
    let keys: Vec<crate::store::Write> = changes.iter().map(|c| (c.key.clone(), None)).collect();
    cache.invalidate(&keys);
    // (Its first write, by `keyfs init`, is not a change of key.)
    if changes
        .iter()
        .any(|c| c.key == META_KCV && c.before.is_some() && c.before != c.after)
    {
        log::error!("the master key of this store was changed on another host (`keyfs rewrap`): this process still has the old one and cannot open keys written from now on; restart it (remount) with the new master key");
    }
    let mut out = Vec::new();
    for c in changes {
        let k = &c.key;
        match k.get(..2) {
            Some(b"n/") if k.len() == 10 => {
                let id = u64::from_be_bytes(k[2..10].try_into().expect("8 bytes"));
                let dec = |v: &Option<Vec<u8>>| {
                    v.as_deref()
                        .and_then(|b| Node::decode(b).ok())
                        .map(Box::new)
                };
                out.push(Changed::Node {
                    id,
                    before: dec(&c.before),
                    after: dec(&c.after),
                });
            }
            Some(b"d/") if k.len() > 10 => out.push(Changed::Dirent {
                parent: u64::from_be_bytes(k[2..10].try_into().expect("8 bytes")),
                name: k[10..].to_vec(),
            }),
            _ => {}
        }
    }
    if out.is_empty() {
        return;
    }
    if let Some(l) = listener.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        l(&out);
    }
}

fn check_store_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        store_err(format!(
            "no keyfs store at {}: {e}; create one with `keyfs init {}`",
            dir.display(),
            dir.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(store_err(format!(
            "{} is not a directory; a store is a directory made by `keyfs init`",
            dir.display()
        )));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(store_err(format!(
            "store directory {} has mode {mode:04o}, accessible by group or others; run `chmod 700 {}`",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

/// A change being prepared: the transaction, the audit records, and the time.
struct Work<'a> {
    inv: &'a Inventory,
    nodes: std::collections::BTreeMap<u64, Option<Node>>,
    txn: Txn,
    recs: Vec<Rec>,
    now: i64,
    ctx: &'a Ctx,
}

impl<'a> Work<'a> {
    fn load(&mut self, id: u64) -> Result<Node> {
        if let Some(pending) = self.nodes.get(&id) {
            return pending
                .clone()
                .ok_or_else(|| Error::new(Kind::NotFound, format!("entry {id} was removed")));
        }
        let raw = self.inv.backend.get(&node_key(id))?;
        self.txn.guard(node_key(id), raw.clone());
        match raw {
            Some(b) => Node::decode(&b).map_err(|e| e.context(format!("node {id}"))),
            None => err(Kind::NotFound, format!("entry {id} no longer exists")),
        }
    }
    fn save(&mut self, n: &Node) {
        self.nodes.insert(n.id, Some(n.clone()));
    }
    fn delete_node(&mut self, id: u64) {
        self.nodes.insert(id, None);
    }
    fn link(&mut self, parent: u64, name: &[u8], id: u64) {
        self.txn.guard(dirent_key(parent, name), None);
        self.txn
            .put(dirent_key(parent, name), id.to_be_bytes().to_vec());
    }
    fn unlink_entry(&mut self, parent: u64, name: &[u8]) {
        self.txn.delete(dirent_key(parent, name));
    }
    fn touch_dir(&mut self, id: u64, subdirs_delta: i32) -> Result<()> {
        let mut d = self.load(id)?;
        d.mtime = self.now;
        d.ctime = self.now;
        if let Body::Dir { subdirs } = &mut d.body {
            *subdirs = (*subdirs as i64 + subdirs_delta as i64).max(0) as u32;
        }
        self.save(&d);
        Ok(())
    }
    fn seal(&mut self, id: u64, v: &Ver, material: &[u8]) {
        let rid = RecordId {
            entry: id,
            version: v.ver,
            kind: v.kind as u8,
        };
        self.txn.put(
            blob_key(id, v.ver),
            self.inv.keys.seal(rid, material).encode(),
        );
    }
    fn audit(&mut self, rec: Rec) {
        self.recs.push(rec);
    }
    fn new_ver(
        &mut self,
        key: &mut KeyBody,
        kind: KeyKind,
        material: &[u8],
        public: Option<Vec<u8>>,
    ) -> Result<Ver> {
        Ok(Ver {
            ver: key.alloc_ver()?,
            kind,
            created: self.now,
            archived_at: 0,
            size: material.len() as u32,
            fingerprint: crypto::fingerprint(material),
            public: public.unwrap_or_default(),
        })
    }
    /// Destroy one version: blob removed, tombstone written, audited.
    fn destroy_version(&mut self, n: &Node, v: &Ver, path: &str) {
        self.txn.delete(blob_key(n.id, v.ver));
        let t = Tombstone {
            path: path.to_string(),
            entry: n.id,
            ver: v.ver,
            kind: v.kind,
            created: v.created,
            destroyed: self.now,
            uid: self.ctx.uid,
        };
        self.txn.put(tomb_key(n.id, v.ver), t.encode());
        self.audit(Rec::ok("destroy", path, n.id, v.ver));
    }
    /// Remove a key node whose last version is gone.
    fn drop_node(&mut self, n: &Node) -> Result<()> {
        self.delete_node(n.id);
        self.unlink_entry(n.parent, &n.name);
        self.touch_dir(n.parent, 0)
    }
    fn commit(self, durable: bool) -> Result<()> {
        let Work {
            inv,
            nodes,
            mut txn,
            recs,
            now,
            ctx,
        } = self;
        for (id, n) in nodes {
            match n {
                Some(n) => txn.put(node_key(id), n.encode()),
                None => txn.delete(node_key(id)),
            }
        }
        inv.commit(&mut txn, &recs, ctx, now, durable)
    }
}

impl Inventory {
    /// Create a new store: in directory `dir` (made 0700; must be absent or
    /// empty), or under an `etcd://…/PREFIX` URL (the prefix must be empty).
    pub fn init(dir: &Path, master: &MasterKey) -> Result<()> {
        let (backend, lock): (Box<dyn Backend>, _) = match etcd_url(dir)? {
            Some(u) => {
                let b = EtcdBackend::open(&u, UNMIRRORED)?;
                if !b.scan_prefix(b"")?.is_empty() {
                    return err(
                        Kind::Exists,
                        format!(
                            "{} already holds data (another keyfs store?); choose a new prefix for the store",
                            u.display()
                        ),
                    );
                }
                (Box::new(b), None)
            }
            None => {
                init_store_dir(dir)?;
                let lock = lock_store(dir)?;
                (Box::new(SledBackend::open(&dir.join("db"))?), Some(lock))
            }
        };
        let mut store_id = vec![0u8; 16];
        crypto::fill_random(&mut store_id);
        let keys = StoreKeys::derive(master, &store_id);
        let audit_key = Key32::random();
        let mut txn = Txn::default();
        txn.guard(META_FORMAT.to_vec(), None);
        txn.put(
            META_FORMAT.to_vec(),
            crypto::FORMAT_VERSION.to_be_bytes().to_vec(),
        );
        txn.put(META_STORE_ID.to_vec(), store_id.clone());
        txn.put(
            META_KCV.to_vec(),
            crypto::key_check_value(master, &store_id).to_vec(),
        );
        txn.put(
            META_AUDIT_KEY.to_vec(),
            keys.wrap(&audit_key, b"keyfs-audit-key"),
        );
        txn.put(
            META_NEXT_ID.to_vec(),
            node::FIRST_FREE_ID.to_be_bytes().to_vec(),
        );
        let ctx = Ctx::this_process();
        let now = now_ns();
        let mk = |id, parent, name: &str, perm| Node {
            id,
            parent,
            name: name.as_bytes().to_vec(),
            perm,
            uid: ctx.uid,
            gid: ctx.gid,
            atime: now,
            mtime: now,
            ctime: now,
            body: Body::Dir { subdirs: 0 },
        };
        let mut root = mk(node::ROOT, 0, "", 0o755);
        root.body = Body::Dir { subdirs: 3 };
        txn.put(node_key(node::ROOT), root.encode());
        for (id, name, perm) in [
            (node::CLIENTS, "clients", 0o755),
            (node::POISON, "poison", 0o700),
            (node::AUDIT_DIR, "audit", 0o700),
        ] {
            txn.put(node_key(id), mk(id, node::ROOT, name, perm).encode());
            txn.put(
                dirent_key(node::ROOT, name.as_bytes()),
                id.to_be_bytes().to_vec(),
            );
        }
        let inv = Inventory::assemble(
            backend,
            keys,
            master,
            audit_key,
            store_id,
            Head {
                seq: 0,
                mac: [0; 32],
            },
            node::FIRST_FREE_ID,
            dir,
            false,
            lock,
        );
        inv.commit(&mut txn, &[Rec::ok("init", "", 0, 0)], &ctx, now, true)
            .map_err(|e| {
                if e.kind() == Kind::Conflict {
                    Error::new(
                        Kind::Exists,
                        format!("{}: another `keyfs init` created a store there at the same moment; use that store, or choose a new prefix", dir.display()),
                    )
                } else {
                    e
                }
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        backend: Box<dyn Backend>,
        keys: StoreKeys,
        master: &MasterKey,
        audit_key: Key32,
        store_id: Vec<u8>,
        head: Head,
        next: u64,
        dir: &Path,
        read_only: bool,
        lock: Option<std::fs::File>,
    ) -> Inventory {
        let inv = Inventory {
            backend,
            keys,
            master: MasterKey::from_key(Key32::new(*master.0.expose())),
            audit_key,
            store_id,
            head: Mutex::new(head),
            writer: Mutex::new(next),
            dir: dir.to_path_buf(),
            read_only,
            _lock: lock,
            cache: Default::default(),
            id_block: Mutex::new((0, 0)),
            listener: Default::default(),
            pending_reads: Mutex::new(Vec::new()),
            async_read_audit: Default::default(),
            next_archive: Default::default(),
            destroy_delay: Default::default(),
        };
        if inv.backend.shared() {
            let cache = inv.cache.clone();
            let listener = inv.listener.clone();
            inv.backend.watch(Box::new(move |changes| {
                on_remote(&cache, &listener, changes)
            }));
        }
        inv
    }

    /// Open an existing store with `master`. A wrong key is refused before any record is read.
    pub fn open(dir: &Path, master: &MasterKey, opts: OpenOptions) -> Result<Inventory> {
        let (backend, lock): (Box<dyn Backend>, _) = match etcd_url(dir)? {
            Some(u) => {
                let b = EtcdBackend::open(&u, UNMIRRORED)?;
                if b.get(META_FORMAT)?.is_none() {
                    return Err(store_err(format!(
                        "no keyfs store under {}{}; create one with `keyfs init {}` (or check the prefix)",
                        u.display(),
                        if b.scan_prefix(b"")?.is_empty() { "" } else { " (the prefix holds other data)" },
                        u.display()
                    )));
                }
                (Box::new(b), None)
            }
            None => {
                check_store_dir(dir)?;
                let lock = lock_store(dir)?;
                if !dir.join("db").exists() {
                    return Err(store_err(format!(
                        "{} is not a keyfs store (no db/); create one with `keyfs init`",
                        dir.display()
                    )));
                }
                (Box::new(SledBackend::open(&dir.join("db"))?), Some(lock))
            }
        };
        let fv = backend.get(META_FORMAT)?.ok_or_else(|| {
            store_err(format!(
                "{} has a db/ without keyfs metadata: not a keyfs store, or its database is damaged; restore it from a backup (do not run `keyfs init` over it)",
                dir.display()
            ))
        })?;
        if fv != crypto::FORMAT_VERSION.to_be_bytes() {
            return Err(store_err(format!(
                "store {} has an unsupported format version; use the keyfs release that wrote it",
                dir.display()
            )));
        }
        let store_id = backend.get(META_STORE_ID)?.ok_or_else(|| {
            Error::new(Kind::Integrity, "store id is missing; the store is damaged")
        })?;
        let kcv = backend.get(META_KCV)?.ok_or_else(|| {
            Error::new(
                Kind::Integrity,
                "key-check value is missing; the store is damaged",
            )
        })?;
        if !crypto::ct_eq(&kcv, &crypto::key_check_value(master, &store_id)) {
            return Err(Error::new(
                Kind::MasterKey,
                format!("wrong master key: it does not match store {}; check KEYFS_MASTER_KEY, --master-key-file or --master-key-command", dir.display()),
            ));
        }
        let keys = StoreKeys::derive(master, &store_id);
        let wrapped = backend.get(META_AUDIT_KEY)?.ok_or_else(|| {
            Error::new(
                Kind::Integrity,
                "audit key is missing; the store is damaged",
            )
        })?;
        let audit_key = keys
            .unwrap(&wrapped, b"keyfs-audit-key")
            .map_err(|e| e.context("audit key"))?;
        let next = backend
            .get(META_NEXT_ID)?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .ok_or_else(|| {
                Error::new(
                    Kind::Integrity,
                    "id counter is missing; the store is damaged",
                )
            })?;
        let head = Head::load(&*backend)?;
        if head.seq == 0 && !backend.scan_prefix(b"a/")?.is_empty() {
            return Err(Error::new(
                Kind::Integrity,
                format!("the audit log of {} has entries but its head record is missing (deleted); the store was tampered with — restore the store directory from a backup copy", dir.display()),
            ));
        }
        let inv = Inventory::assemble(
            backend,
            keys,
            master,
            audit_key,
            store_id,
            head,
            next,
            dir,
            opts.read_only,
            lock,
        );
        // Destructions whose delay passed while nothing had the store open.
        if !inv.read_only {
            inv.purge_expired(&Ctx::this_process())?;
        }
        Ok(inv)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Does another process or host share this store (etcd)?
    pub fn is_shared(&self) -> bool {
        self.backend.shared()
    }

    /// Bytes the backend holds for this store.
    pub fn size_on_disk(&self) -> u64 {
        self.backend.size_on_disk()
    }

    /// How current this process's view of the store is.
    pub fn health(&self) -> crate::store::Health {
        self.backend.health()
    }

    /// Hear of other writers' changes (after the caches forgot them).
    pub fn set_change_listener(&self, l: ChangeListener) {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
    }

    /// Is the inventory read-only?
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn commit(
        &self,
        txn: &mut Txn,
        recs: &[Rec],
        ctx: &Ctx,
        now: i64,
        durable: bool,
    ) -> Result<()> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        if self.backend.shared() {
            // Other hosts append too: start from the head the mirror has.
            *head = Head::load(&*self.backend)?;
        }
        let reads =
            std::mem::take(&mut *self.pending_reads.lock().unwrap_or_else(|p| p.into_inner()));
        // On a shared store another host may append to the audit chain
        // between our read of its head and our commit: then the change is
        // re-chained onto the new head, as long as everything else it read
        // is unchanged.
        let mut rebases = 0;
        loop {
            let mut t = txn.clone();
            head.guard(&self.audit_key, &mut t);
            let mut h = *head;
            for (r, c, ts) in &reads {
                h = h.stage(&self.audit_key, &mut t, r, c, *ts);
            }
            for r in recs {
                h = h.stage(&self.audit_key, &mut t, r, ctx, now);
            }
            let outcome = match self.backend.transact(&t) {
                Ok(o) => o,
                Err(e) => {
                    self.requeue_reads(reads);
                    return Err(e);
                }
            };
            match outcome {
                TxnOutcome::Committed => {
                    *head = h;
                    drop(head);
                    self.cache.invalidate(&t.writes);
                    *txn = t;
                    if durable {
                        self.backend.flush()?;
                    }
                    return Ok(());
                }
                TxnOutcome::Conflict => {
                    let now_head = Head::load(&*self.backend)?;
                    let others_hold = txn
                        .guards
                        .iter()
                        .all(|(k, v)| self.backend.get(k).ok().as_ref() == Some(v));
                    if self.backend.shared() && now_head != *head && others_hold && rebases < 64 {
                        *head = now_head;
                        rebases += 1;
                        continue;
                    }
                    if self.backend.shared() {
                        *head = now_head;
                    }
                    drop(head);
                    self.requeue_reads(reads);
                    return err(Kind::Conflict, "the store changed while this operation ran (another writer changed what it read); nothing was changed — retry; if this repeats on a store only this process writes, the audit chain head was altered: run `keyfs audit --store STORE --verify`");
                }
            }
        }
    }

    /// Put read audits back in the queue after a failed commit.
    fn requeue_reads(&self, reads: Vec<(Rec, Ctx, i64)>) {
        if reads.is_empty() {
            return;
        }
        let mut q = self.pending_reads.lock().unwrap_or_else(|p| p.into_inner());
        let later = std::mem::replace(&mut *q, reads);
        q.extend(later);
    }

    /// Run a change, retrying it when another writer of a shared store
    /// changed what it read (each attempt re-reads everything).
    fn retrying<T>(&self, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0u32;
        loop {
            match f() {
                Err(e) if e.kind() == Kind::Conflict && self.backend.shared() && attempt < 24 => {
                    attempt += 1;
                    // Jittered backoff so two hosts do not collide in step.
                    let cap = 1u64 << attempt.min(6);
                    let mut r = [0u8; 1];
                    crypto::fill_random(&mut r);
                    std::thread::sleep(std::time::Duration::from_micros(
                        (u64::from(r[0]) * cap * 1000) / 256,
                    ));
                }
                Err(e) if e.kind() == Kind::Conflict && attempt > 0 => {
                    return Err(Error::new(
                        Kind::Conflict,
                        format!("other hosts kept changing the same entries ({} attempts); nothing was changed — retry", attempt + 1),
                    ))
                }
                r => return r,
            }
        }
    }

    /// Audit reads in batches, off the read path (the mount turns this on and
    /// calls [`flush_read_audits`](Self::flush_read_audits) periodically).
    pub fn set_async_read_audit(&self, on: bool) {
        self.async_read_audit
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Append queued read audits now (no fsync).
    pub fn flush_read_audits(&self) -> Result<()> {
        if self
            .pending_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return Ok(());
        }
        if !self.backend.health().reachable {
            // Kept queued until the cluster is back.
            return Ok(());
        }
        let ctx = Ctx::this_process();
        // Durable: a crash loses at most the reads of the last batch interval.
        self.commit(&mut Txn::default(), &[], &ctx, now_ns(), true)
    }

    fn audit_read(&self, rec: Rec, ctx: &Ctx) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        if self
            .async_read_audit
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let mut q = self.pending_reads.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= MAX_QUEUED_READS {
                // Only while a shared store is unreachable for a long time.
                if q.len() == MAX_QUEUED_READS {
                    log::error!("{MAX_QUEUED_READS} read audit records are waiting for the store to be reachable again; further reads are served but not audited until it is");
                    q.push((Rec::ok("audit-gap", "", 0, 0), ctx.clone(), now_ns()));
                }
                return Ok(());
            }
            q.push((rec, ctx.clone(), now_ns()));
            return Ok(());
        }
        self.audit_only(&[rec], ctx, false)
    }

    /// Append audit records on their own (reads, mount, unmount). Not fsynced:
    /// sled flushes within 500 ms, keeping fsync off the read path.
    pub fn audit_only(&self, recs: &[Rec], ctx: &Ctx, durable: bool) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.commit(&mut Txn::default(), recs, ctx, now_ns(), durable)
    }

    fn check_rw(&self) -> Result<()> {
        if self.read_only {
            return err(
                Kind::ReadOnly,
                "the store is mounted read-only; remount without --read-only to change keys",
            );
        }
        self.check_reachable()
    }

    /// A shared store that cannot be reached refuses changes at once
    /// (instead of after a timeout), and says why.
    pub fn check_reachable(&self) -> Result<()> {
        self.backend.writable()
    }

    fn work<'a>(&'a self, ctx: &'a Ctx) -> Work<'a> {
        Work {
            inv: self,
            nodes: Default::default(),
            txn: Txn::default(),
            recs: Vec::new(),
            now: now_ns(),
            ctx,
        }
    }

    fn alloc_id(&self, next: &mut u64, txn: &mut Txn) -> Result<u64> {
        if self.backend.shared() {
            return self.alloc_shared_id();
        }
        let id = *next;
        if id >= node::MAX_ID {
            return err(Kind::Store, "the store has run out of entry ids");
        }
        *next += 1;
        txn.put(META_NEXT_ID.to_vec(), next.to_be_bytes().to_vec());
        Ok(id)
    }

    /// On a shared store each process reserves a block of ids in a
    /// transaction of its own (guarded by the counter), so that two hosts
    /// never hand out the same id and ordinary changes never contend on
    /// the counter. Ids of a block left unused are simply skipped.
    fn alloc_shared_id(&self) -> Result<u64> {
        let mut b = self.id_block.lock().unwrap_or_else(|p| p.into_inner());
        if b.0 >= b.1 {
            for _ in 0..64 {
                let cur = self.backend.get(META_NEXT_ID)?;
                let start = cur
                    .as_deref()
                    .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
                    .ok_or_else(|| {
                        Error::new(
                            Kind::Integrity,
                            "id counter is missing; the store is damaged",
                        )
                    })?;
                let end = start + ID_BLOCK;
                if end > node::MAX_ID {
                    return err(Kind::Store, "the store has run out of entry ids");
                }
                let mut t = Txn::default();
                t.guard(META_NEXT_ID.to_vec(), cur);
                t.put(META_NEXT_ID.to_vec(), end.to_be_bytes().to_vec());
                if self.backend.transact(&t)? == TxnOutcome::Committed {
                    *b = (start, end);
                    break;
                }
            }
            if b.0 >= b.1 {
                return err(
                    Kind::Conflict,
                    "other hosts kept reserving entry ids at the same moment; nothing was changed — retry",
                );
            }
        }
        let id = b.0;
        b.0 += 1;
        Ok(id)
    }

    // ----- reading -----

    /// A node by id.
    pub fn get_node(&self, id: u64) -> Result<Option<Node>> {
        if let Some(n) = self.cache.node(id) {
            return Ok(Some(n));
        }
        let epoch = self.cache.epoch();
        match self.backend.get(&node_key(id))? {
            Some(b) => {
                let n = Node::decode(&b).map_err(|e| e.context(format!("entry {id}")))?;
                self.cache.put_node(epoch, &n);
                Ok(Some(n))
            }
            None => Ok(None),
        }
    }

    fn node(&self, id: u64) -> Result<Node> {
        self.get_node(id)?.ok_or_else(|| {
            Error::new(
                Kind::NotFound,
                format!("entry {id} does not exist (it was removed)"),
            )
        })
    }

    fn child(&self, parent: u64, name: &[u8]) -> Result<Option<u64>> {
        if let Some(c) = self.cache.dirent(parent, name) {
            return Ok(c);
        }
        let epoch = self.cache.epoch();
        let id = self
            .backend
            .get(&dirent_key(parent, name))?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes));
        self.cache.put_dirent(epoch, parent, name, id);
        Ok(id)
    }

    fn child_node(&self, parent: u64, name: &[u8]) -> Result<Option<Node>> {
        match self.child(parent, name)? {
            Some(id) => self.get_node(id),
            None => Ok(None),
        }
    }

    /// Tree path of a node, like `clients/alice01/storage`.
    pub fn path_of(&self, id: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = id;
        while cur != node::ROOT && cur != 0 {
            match self.get_node(cur) {
                Ok(Some(n)) => {
                    parts.push(String::from_utf8_lossy(&n.name).into_owned());
                    cur = n.parent;
                }
                _ => {
                    parts.push(format!("<entry {cur}>"));
                    break;
                }
            }
        }
        parts.reverse();
        parts.join("/")
    }

    /// Path of any inode, for messages and audit.
    pub fn ino_path(&self, ino: Ino) -> String {
        match ino {
            Ino::Node(id) => self.path_of(id),
            Ino::Old(id) => format!("{}.old", self.path_of(id)),
            Ino::Ver(id, v) if matches!(self.pending_of(id, v), Ok(Some(_))) => {
                format!(
                    ".keyfs/pending/{}",
                    String::from_utf8_lossy(
                        &self
                            .pending_of(id, v)
                            .ok()
                            .flatten()
                            .expect("checked")
                            .name()
                    )
                )
            }
            Ino::Ver(id, v) => match self
                .get_node(id)
                .ok()
                .flatten()
                .and_then(|n| n.key().and_then(|k| k.version(v).map(|x| x.archived_at)))
            {
                Some(ts) => format!("{}.old/{}", self.path_of(id), format_ts(ts)),
                None => format!("{}.old/<version {v}>", self.path_of(id)),
            },
            Ino::Pub(id) => {
                let p = self.path_of(id);
                format!("{p}.pub")
            }
            Ino::Staged(n) => format!("<file being written {n}>"),
            Ino::Special(Special::Dir) => ".keyfs".into(),
            Ino::Special(Special::Status) => ".keyfs/status".into(),
            Ino::Special(Special::Audit) => ".keyfs/audit".into(),
            Ino::Special(Special::Pending) => ".keyfs/pending".into(),
        }
    }

    fn sibling_pub_visible(&self, n: &Node) -> Result<bool> {
        let Some(k) = n.key() else { return Ok(false) };
        let Some(pn) = kinds::public_name(&n.name) else {
            return Ok(false);
        };
        Ok(k.kind == KeyKind::EcPrivate
            && k.current.is_some()
            && !k.pub_hidden
            && self.child(n.parent, pn)?.is_none())
    }

    /// Resolve `name` in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Ino> {
        let nf = || {
            Error::new(
                Kind::NotFound,
                format!(
                    "{}/{} does not exist",
                    self.ino_path(parent),
                    String::from_utf8_lossy(name)
                ),
            )
        };
        match parent {
            Ino::Node(pid) => {
                if pid == node::ROOT && name == b".keyfs" {
                    return Ok(Ino::Special(Special::Dir));
                }
                let p = self.node(pid)?;
                if !p.is_dir() {
                    return err(
                        Kind::NotDir,
                        format!("{} is not a directory", self.path_of(pid)),
                    );
                }
                if let Some(n) = self.child_node(pid, name)? {
                    return match n.key() {
                        Some(k) if k.current.is_none() => Err(nf()),
                        _ => Ok(Ino::Node(n.id)),
                    };
                }
                if let Some(base) = history_of(name) {
                    if let Some(n) = self.child_node(pid, base)? {
                        if n.key().is_some_and(|k| k.history_visible()) {
                            return Ok(Ino::Old(n.id));
                        }
                    }
                }
                if let Some(pn) = kinds::private_name(name) {
                    if let Some(n) = self.child_node(pid, pn)? {
                        if self.sibling_pub_visible(&n)? {
                            return Ok(Ino::Pub(n.id));
                        }
                    }
                }
                Err(nf())
            }
            Ino::Old(kid) => {
                let n = self.node(kid)?;
                let k = n.key().ok_or_else(nf)?;
                let ts = parse_ts(name).ok_or_else(nf)?;
                k.archived_at(ts)
                    .map(|v| Ino::Ver(kid, v.ver))
                    .ok_or_else(nf)
            }
            Ino::Special(Special::Dir) => match name {
                b"status" => Ok(Ino::Special(Special::Status)),
                b"audit" => Ok(Ino::Special(Special::Audit)),
                b"pending" => Ok(Ino::Special(Special::Pending)),
                _ => Err(nf()),
            },
            Ino::Special(Special::Pending) => self
                .pending()?
                .into_iter()
                .find(|p| p.name() == name)
                .map(|p| Ino::Ver(p.entry, p.ver.ver))
                .ok_or_else(nf),
            _ => err(
                Kind::NotDir,
                format!("{} is not a directory", self.ino_path(parent)),
            ),
        }
    }

    /// Attributes of an inode.
    pub fn attr(&self, ino: Ino) -> Result<Attr> {
        let gone = || {
            Error::new(
                Kind::NotFound,
                format!("{} no longer exists", self.ino_path(ino)),
            )
        };
        match ino {
            Ino::Node(id) => {
                let n = self.node(id)?;
                let (ftype, size, nlink, perm) = match &n.body {
                    Body::Dir { subdirs } => (FType::Dir, 4096, 2 + subdirs, n.perm),
                    Body::Symlink(t) => (FType::Symlink, t.len() as u64, 1, n.perm),
                    Body::Key(k) => match &k.current {
                        Some(v) => (FType::File, v.size as u64, 1, n.perm),
                        None => return Err(gone()),
                    },
                };
                Ok(Attr {
                    ino,
                    ftype,
                    size,
                    perm,
                    nlink,
                    uid: n.uid,
                    gid: n.gid,
                    atime: n.atime,
                    mtime: n.mtime,
                    ctime: n.ctime,
                })
            }
            Ino::Old(id) => {
                let n = self.node(id)?;
                if !n.key().is_some_and(|k| k.history_visible()) {
                    return Err(gone());
                }
                Ok(Attr {
                    ino,
                    ftype: FType::Dir,
                    size: 4096,
                    perm: 0o700,
                    nlink: 2,
                    uid: n.uid,
                    gid: n.gid,
                    atime: n.mtime,
                    mtime: n.mtime,
                    ctime: n.ctime,
                })
            }
            Ino::Ver(id, ver) if self.pending_of(id, ver)?.is_some() => {
                let p = self.pending_of(id, ver)?.expect("checked");
                Ok(Attr {
                    ino,
                    ftype: FType::File,
                    size: p.ver.size as u64,
                    perm: 0o400,
                    nlink: 1,
                    uid: p.uid,
                    gid: p.gid,
                    atime: p.unlinked,
                    mtime: p.unlinked,
                    ctime: p.unlinked,
                })
            }
            Ino::Ver(id, ver) => {
                let n = self.node(id)?;
                let v = n
                    .key()
                    .and_then(|k| k.archived.iter().find(|v| v.ver == ver))
                    .ok_or_else(gone)?;
                Ok(Attr {
                    ino,
                    ftype: FType::File,
                    size: v.size as u64,
                    perm: 0o400,
                    nlink: 1,
                    uid: n.uid,
                    gid: n.gid,
                    atime: v.archived_at,
                    mtime: v.archived_at,
                    ctime: v.archived_at,
                })
            }
            Ino::Pub(id) => {
                let n = self.node(id)?;
                if !self.sibling_pub_visible(&n)? {
                    return Err(gone());
                }
                let size = n
                    .key()
                    .and_then(|k| k.current.as_ref())
                    .map(|v| v.public.len())
                    .unwrap_or(0) as u64;
                Ok(Attr {
                    ino,
                    ftype: FType::File,
                    size,
                    perm: 0o644,
                    nlink: 1,
                    uid: n.uid,
                    gid: n.gid,
                    atime: n.atime,
                    mtime: n.mtime,
                    ctime: n.ctime,
                })
            }
            Ino::Special(s) => {
                let root = self.node(node::ROOT)?;
                let (ftype, perm, nlink) = match s {
                    Special::Dir => (FType::Dir, 0o555, 2),
                    Special::Status => (FType::File, 0o444, 1),
                    Special::Audit => (FType::File, 0o400, 1),
                    Special::Pending => (FType::Dir, 0o500, 2),
                };
                Ok(Attr {
                    ino,
                    ftype,
                    size: 0,
                    perm,
                    nlink,
                    uid: root.uid,
                    gid: root.gid,
                    atime: root.ctime,
                    mtime: root.ctime,
                    ctime: root.ctime,
                })
            }
            Ino::Staged(_) => Err(gone()),
        }
    }

    /// List a directory (without `.` and `..`), sorted by name.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        match ino {
            Ino::Node(pid) => {
                let p = self.node(pid)?;
                if !p.is_dir() {
                    return err(
                        Kind::NotDir,
                        format!("{} is not a directory", self.path_of(pid)),
                    );
                }
                let prefix = dirent_prefix(pid);
                for (k, v) in self.backend.scan_prefix(&prefix)? {
                    let name = k[prefix.len()..].to_vec();
                    let id = u64::from_be_bytes(v.as_slice().try_into().map_err(|_| {
                        Error::new(
                            Kind::Integrity,
                            "directory entry is corrupted; run `keyfs check`",
                        )
                    })?);
                    let n = match self.get_node(id) {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(e) => {
                            log::error!("{}: {}", self.path_of(pid), e);
                            continue;
                        }
                    };
                    match &n.body {
                        Body::Dir { .. } => out.push(DirEntry {
                            name,
                            ino: Ino::Node(id),
                            ftype: FType::Dir,
                        }),
                        Body::Symlink(_) => out.push(DirEntry {
                            name,
                            ino: Ino::Node(id),
                            ftype: FType::Symlink,
                        }),
                        Body::Key(k) => {
                            if k.current.is_some() {
                                out.push(DirEntry {
                                    name: name.clone(),
                                    ino: Ino::Node(id),
                                    ftype: FType::File,
                                });
                            }
                            if k.history_visible() {
                                let mut on = name.clone();
                                on.extend_from_slice(names::OLD_SUFFIX);
                                out.push(DirEntry {
                                    name: on,
                                    ino: Ino::Old(id),
                                    ftype: FType::Dir,
                                });
                            }
                            if self.sibling_pub_visible(&n)? {
                                let pn = kinds::public_name(&name)
                                    .expect("private kind has a public name");
                                out.push(DirEntry {
                                    name: pn.to_vec(),
                                    ino: Ino::Pub(id),
                                    ftype: FType::File,
                                });
                            }
                        }
                    }
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
            }
            Ino::Old(kid) => {
                let n = self.node(kid)?;
                let k = n.key().ok_or_else(|| {
                    Error::new(Kind::NotFound, "history directory no longer exists")
                })?;
                for v in &k.archived {
                    out.push(DirEntry {
                        name: format_ts(v.archived_at).into_bytes(),
                        ino: Ino::Ver(kid, v.ver),
                        ftype: FType::File,
                    });
                }
            }
            Ino::Special(Special::Pending) => {
                for p in self.pending()? {
                    out.push(DirEntry {
                        name: p.name(),
                        ino: Ino::Ver(p.entry, p.ver.ver),
                        ftype: FType::File,
                    });
                }
            }
            Ino::Special(Special::Dir) => {
                out.push(DirEntry {
                    name: b"pending".to_vec(),
                    ino: Ino::Special(Special::Pending),
                    ftype: FType::Dir,
                });
                out.push(DirEntry {
                    name: b"audit".to_vec(),
                    ino: Ino::Special(Special::Audit),
                    ftype: FType::File,
                });
                out.push(DirEntry {
                    name: b"status".to_vec(),
                    ino: Ino::Special(Special::Status),
                    ftype: FType::File,
                });
            }
            _ => {
                return err(
                    Kind::NotDir,
                    format!("{} is not a directory", self.ino_path(ino)),
                )
            }
        }
        Ok(out)
    }

    /// Target of a symlink.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        if let Ino::Node(id) = ino {
            if let Body::Symlink(t) = self.node(id)?.body {
                return Ok(t);
            }
        }
        err(
            Kind::Invalid,
            format!("{} is not a symbolic link", self.ino_path(ino)),
        )
    }

    fn open_blob_id(&self, id: u64, v: &Ver) -> Result<SecretBytes> {
        let raw = self.backend.get(&blob_key(id, v.ver))?.ok_or_else(|| {
            Error::new(
                Kind::Integrity,
                format!("sealed record of version {} is missing", v.ver),
            )
        })?;
        self.keys.open(
            RecordId {
                entry: id,
                version: v.ver,
                kind: v.kind as u8,
            },
            &Sealed::decode(&raw)?,
        )
    }

    fn open_blob(&self, n: &Node, v: &Ver) -> Result<SecretBytes> {
        if let Some(m) = self.cache.material(n.id, v.ver) {
            return Ok(m);
        }
        let epoch = self.cache.epoch();
        let m = self.open_blob_uncached(n, v)?;
        self.cache.put_material(epoch, n.id, v.ver, &m);
        Ok(m)
    }

    fn open_blob_uncached(&self, n: &Node, v: &Ver) -> Result<SecretBytes> {
        let raw = self.backend.get(&blob_key(n.id, v.ver))?.ok_or_else(|| {
            Error::new(
                Kind::Integrity,
                format!("sealed record of version {} is missing", v.ver),
            )
        })?;
        let sealed = Sealed::decode(&raw)?;
        self.keys.open(
            RecordId {
                entry: n.id,
                version: v.ver,
                kind: v.kind as u8,
            },
            &sealed,
        )
    }

    /// Read the material behind a file inode, audited as `read`.
    pub fn read(&self, ino: Ino, ctx: &Ctx) -> Result<SecretBytes> {
        let (n, v, public) = match ino {
            Ino::Node(id) => {
                let n = self.node(id)?;
                let v = n.key().and_then(|k| k.current.clone());
                match v {
                    Some(v) => (n, v, false),
                    None => return err(Kind::IsDir, format!("{} is not a key", self.path_of(id))),
                }
            }
            Ino::Ver(id, ver) if self.pending_of(id, ver)?.is_some() => {
                let p = self.pending_of(id, ver)?.expect("checked");
                let m = self.open_blob_id(id, &p.ver)?;
                self.audit_read(
                    Rec::ok(
                        "read",
                        format!(".keyfs/pending/{}", String::from_utf8_lossy(&p.name())),
                        id,
                        ver,
                    ),
                    ctx,
                )?;
                return Ok(m);
            }
            Ino::Ver(id, ver) => {
                let n = self.node(id)?;
                let v = n
                    .key()
                    .and_then(|k| k.archived.iter().find(|v| v.ver == ver).cloned());
                match v {
                    Some(v) => (n, v, false),
                    None => {
                        return err(
                            Kind::NotFound,
                            format!("{} no longer exists", self.ino_path(ino)),
                        )
                    }
                }
            }
            Ino::Pub(id) => {
                let n = self.node(id)?;
                match n.key().and_then(|k| k.current.clone()) {
                    Some(v) => (n, v, true),
                    None => {
                        return err(
                            Kind::NotFound,
                            format!("{} no longer exists", self.ino_path(ino)),
                        )
                    }
                }
            }
            Ino::Special(Special::Status) => {
                return Ok(SecretBytes::new(self.status_json()?.into_bytes()))
            }
            Ino::Special(Special::Audit) => {
                let mut s = audit::lines(&*self.backend)?.join("\n");
                s.push('\n');
                return Ok(SecretBytes::new(s.into_bytes()));
            }
            _ => {
                return err(
                    Kind::IsDir,
                    format!("{} is a directory", self.ino_path(ino)),
                )
            }
        };
        let path = self.ino_path(ino);
        if public {
            self.audit_read(Rec::ok("read", path, n.id, v.ver), ctx)?;
            return Ok(SecretBytes::new(v.public.clone()));
        }
        match self.open_blob(&n, &v) {
            Ok(m) => {
                self.audit_read(Rec::ok("read", path, n.id, v.ver), ctx)?;
                Ok(m)
            }
            // The store could not be read at all (a fenced or unreachable
            // backend): say that, not that the record is damaged.
            Err(e) if e.kind() != Kind::Integrity => Err(e.context(&path)),
            Err(e) => {
                log::error!(
                    "integrity failure reading {path} (version {}): {}",
                    v.ver,
                    e.message()
                );
                let mut r = Rec::ok("read", path.clone(), n.id, v.ver);
                r.result = "integrity-failure".into();
                self.audit_only(&[r], ctx, true).ok();
                Err(Error::new(
                    Kind::Integrity,
                    format!(
                        "{path}: {}; run `keyfs check` and restore this key from a backup",
                        e.message()
                    ),
                ))
            }
        }
    }

    /// Read a specific version of a key node by number (CLI `read --version`).
    pub fn read_version(&self, id: u64, ver: u32, ctx: &Ctx) -> Result<SecretBytes> {
        let n = self.node(id)?;
        match n.key().and_then(|k| k.current.as_ref()) {
            Some(c) if c.ver == ver => self.read(Ino::Node(id), ctx),
            _ => self.read(Ino::Ver(id, ver), ctx),
        }
    }

    fn status_json(&self) -> Result<String> {
        let mut keys = 0u64;
        let mut versions = 0u64;
        let mut dirs = 0u64;
        for (_, v) in self.backend.scan_prefix(b"n/")? {
            if let Ok(n) = Node::decode(&v) {
                match &n.body {
                    Body::Key(k) => {
                        keys += k.current.is_some() as u64;
                        versions += k.current.is_some() as u64 + k.archived.len() as u64;
                    }
                    Body::Dir { .. } => dirs += 1,
                    _ => {}
                }
            }
        }
        let clients = self
            .backend
            .scan_prefix(&dirent_prefix(node::CLIENTS))?
            .len();
        let head = if self.backend.shared() {
            // Other hosts append too: the mirror has the current head.
            Head::load(&*self.backend)?
        } else {
            *self.head.lock().unwrap_or_else(|p| p.into_inner())
        };
        let h = self.backend.health();
        let mut j = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "format": crypto::FORMAT_VERSION,
            "store": self.dir.display().to_string(),
            "backend": h.backend,
            "read_only": self.read_only,
            "clients": clients,
            "directories": dirs,
            "keys": keys,
            "versions": versions,
            "audit_entries": head.seq,
        });
        if self.backend.shared() {
            // How current what this host serves is: `synced` false means the
            // cluster cannot be reached (or has no quorum) and reads come
            // from the state of `lag_ms` ago; changes are refused meanwhile.
            j["synced"] = h.synced.into();
            j["lag_ms"] = h.lag_ms.into();
            j["revision"] = h.revision.into();
        }
        Ok(j.to_string() + "\n")
    }

    // ----- changing -----

    fn parent_dir_for_new(&self, pid: u64, name: &[u8], is_dir: bool) -> Result<Node> {
        validate_component(name)?;
        let p = self.node(pid)?;
        if !p.is_dir() {
            return err(
                Kind::NotDir,
                format!("{} is not a directory", self.path_of(pid)),
            );
        }
        if pid == node::ROOT {
            return err(Kind::Perm, "the top level holds only clients/, poison/ and audit/; put keys under clients/<ClientID>/");
        }
        if !is_dir && name.len() > 251 {
            return err(Kind::NameTooLong, format!("a key's name is at most 251 bytes (this one has {}), so that its history directory <name>.old fits in 255", name.len()));
        }
        if is_dir && (pid == node::POISON || pid == node::AUDIT_DIR) {
            return err(
                Kind::Perm,
                format!(
                    "{}/ holds only its global keys, no directories",
                    self.path_of(pid)
                ),
            );
        }
        if pid == node::CLIENTS {
            if !is_dir {
                return err(Kind::Perm, "clients/ holds only client directories; create one with `mkdir clients/<ClientID>`");
            }
            ClientId::parse(name)?;
        }
        Ok(p)
    }

    /// Size of the sealed-view file of a key version (no I/O beyond metadata).
    pub fn sealed_size(&self, ino: Ino) -> Result<u64> {
        let (id, v) = self.version_of_ino(ino)?;
        Ok(sealed::encoded_len(
            self.store_id.len(),
            self.path_of(id).len(),
            v.size as usize,
        ))
    }

    fn version_of_ino(&self, ino: Ino) -> Result<(u64, Ver)> {
        let gone = || {
            Error::new(
                Kind::NotFound,
                format!("{} no longer exists", self.ino_path(ino)),
            )
        };
        match ino {
            Ino::Node(id) => Ok((
                id,
                self.node(id)?
                    .key()
                    .and_then(|k| k.current.clone())
                    .ok_or_else(gone)?,
            )),
            Ino::Ver(id, ver) => Ok((
                id,
                self.node(id)?
                    .key()
                    .and_then(|k| k.archived.iter().find(|v| v.ver == ver).cloned())
                    .ok_or_else(gone)?,
            )),
            _ => err(
                Kind::Invalid,
                format!("{} has no sealed form", self.ino_path(ino)),
            ),
        }
    }

    /// The sealed-view content of a key version: its sealed record with the
    /// identity it is bound to, authenticated. Never plaintext. Audited as `read-sealed`.
    pub fn export_sealed(&self, ino: Ino, ctx: &Ctx) -> Result<Vec<u8>> {
        let (id, v) = self.version_of_ino(ino)?;
        let raw = self.backend.get(&blob_key(id, v.ver))?.ok_or_else(|| {
            Error::new(
                Kind::Integrity,
                format!(
                    "{}: sealed record of version {} is missing; run `keyfs check`",
                    self.ino_path(ino),
                    v.ver
                ),
            )
        })?;
        let f = sealed::SealedFile {
            store_id: self.store_id.clone(),
            path: self.path_of(id),
            entry: id,
            version: v.ver,
            kind: v.kind,
            created: v.created,
            archived_at: v.archived_at,
            sealed: raw,
        };
        self.audit_read(Rec::ok("read-sealed", self.ino_path(ino), id, v.ver), ctx)?;
        Ok(f.encode(&self.master))
    }

    /// Restore a sealed-view file written as `name` in `parent`. The file must
    /// authenticate under this store's master key and belong exactly to this
    /// path (and, in `<key>.old/`, to this archive instant); its material is
    /// then imported as by [`write_new`](Self::write_new).
    pub fn import_sealed(
        &self,
        parent: Ino,
        name: &[u8],
        bytes: &[u8],
        attrs: NewAttrs,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.retrying(|| self.import_sealed_once(parent, name, bytes, attrs, ctx))
    }

    fn import_sealed_once(
        &self,
        parent: Ino,
        name: &[u8],
        bytes: &[u8],
        attrs: NewAttrs,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.check_rw()?;
        let f = sealed::SealedFile::decode(bytes, &self.master)?;
        let (target, archived) = match parent {
            Ino::Node(pid) => (
                format!("{}/{}", self.path_of(pid), String::from_utf8_lossy(name))
                    .trim_start_matches('/')
                    .to_string(),
                0,
            ),
            Ino::Old(kid) => (self.path_of(kid), parse_ts(name).unwrap_or(-1)),
            _ => {
                return err(
                    Kind::NotDir,
                    format!("{} is not a directory", self.ino_path(parent)),
                )
            }
        };
        if f.path != target || f.archived_at != archived {
            let what = if f.archived_at == 0 {
                f.path.clone()
            } else {
                format!("{}.old/{}", f.path, format_ts(f.archived_at))
            };
            return err(Kind::Invalid, format!("this sealed file belongs to {what}; a sealed record can only be restored at its own path"));
        }
        let keys = StoreKeys::derive(&self.master, &f.store_id);
        let material = keys
            .open(
                RecordId {
                    entry: f.entry,
                    version: f.version,
                    kind: f.kind as u8,
                },
                &Sealed::decode(&f.sealed)?,
            )
            .map_err(|e| e.context(format!("sealed file for {target}")))?;
        self.write_new(parent, name, &material, attrs, ctx)
    }

    /// Would creating file `name` in `parent` be allowed? (Checked at `create`
    /// so a refused name fails at open, not only at close.)
    pub fn check_new_file(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.check_rw()?;
        validate_component(name)?;
        match parent {
            Ino::Node(pid) => {
                if history_of(name).is_some() {
                    return err(
                        Kind::Invalid,
                        format!(
                            "{:?}: names ending in .old are reserved for version histories",
                            String::from_utf8_lossy(name)
                        ),
                    );
                }
                self.parent_dir_for_new(pid, name, false).map(|_| ())
            }
            Ino::Old(kid) => {
                let n = self.node(kid)?;
                let ts = parse_ts(name).ok_or_else(|| Error::new(Kind::Invalid, format!("{}.old/{}: archived versions are named by their archive time, e.g. 2026-11-28T21:40:05.123456789Z", self.path_of(kid), String::from_utf8_lossy(name))))?;
                if n.key().is_some_and(|k| k.archived_at(ts).is_some()) {
                    return err(Kind::Exists, "archived versions are immutable");
                }
                Ok(())
            }
            Ino::Special(_) => err(Kind::ReadOnly, ".keyfs is read-only"),
            _ => err(
                Kind::NotDir,
                format!("{} is not a directory", self.ino_path(parent)),
            ),
        }
    }

    /// The directory inode and name an inode is listed under (for cache invalidation).
    pub fn parent_and_name(&self, ino: Ino) -> (u64, Vec<u8>) {
        match ino {
            Ino::Node(id) | Ino::Pub(id) | Ino::Old(id) => match self.get_node(id) {
                Ok(Some(n)) => {
                    let mut name = n.name.clone();
                    match ino {
                        Ino::Pub(_) => {
                            name = kinds::public_name(&n.name)
                                .map(|p| p.to_vec())
                                .unwrap_or(name)
                        }
                        Ino::Old(_) => name.extend_from_slice(names::OLD_SUFFIX),
                        _ => {}
                    }
                    (n.parent, name)
                }
                _ => (node::ROOT, Vec::new()),
            },
            Ino::Ver(id, ver) => {
                let name = self
                    .get_node(id)
                    .ok()
                    .flatten()
                    .and_then(|n| {
                        n.key().and_then(|k| {
                            k.version(ver)
                                .map(|v| format_ts(v.archived_at).into_bytes())
                        })
                    })
                    .unwrap_or_default();
                (Ino::Old(id).raw(), name)
            }
            _ => (node::ROOT, Vec::new()),
        }
    }

    /// Write `data` as the content of a new file `name` in `parent`: an import,
    /// a rotation if a key of that name exists, or — in `<key>.old/` — the import
    /// of an archived version. Returns the committed inode.
    pub fn write_new(
        &self,
        parent: Ino,
        name: &[u8],
        data: &SecretBytes,
        attrs: NewAttrs,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.write_new_at(parent, name, data, attrs, None, ctx)
    }

    /// [`write_new`](Self::write_new), giving a new key node the times of
    /// `time` (when the file was created or last written through the mount)
    /// instead of the commit time.
    pub fn write_new_at(
        &self,
        parent: Ino,
        name: &[u8],
        data: &SecretBytes,
        attrs: NewAttrs,
        time: Option<i64>,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.retrying(|| self.write_new_at_once(parent, name, data, attrs, time, ctx))
    }

    fn write_new_at_once(
        &self,
        parent: Ino,
        name: &[u8],
        data: &SecretBytes,
        attrs: NewAttrs,
        time: Option<i64>,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match parent {
            Ino::Node(pid) => {
                if history_of(name).is_some() {
                    return err(
                        Kind::Invalid,
                        format!(
                            "{:?}: names ending in .old are reserved for version histories",
                            String::from_utf8_lossy(name)
                        ),
                    );
                }
                self.parent_dir_for_new(pid, name, false)?;
                if let Some(existing) = self.child_node(pid, name)? {
                    return match existing.body {
                        Body::Dir { .. } => err(
                            Kind::IsDir,
                            format!("{} is a directory", self.path_of(existing.id)),
                        ),
                        Body::Symlink(_) => err(
                            Kind::Exists,
                            format!("{} is a symbolic link", self.path_of(existing.id)),
                        ),
                        Body::Key(_) => self
                            .rotate_locked(existing.id, data, ctx)
                            .map(|_| Ino::Node(existing.id)),
                    };
                }
                if let Some(pn) = kinds::private_name(name) {
                    if let Some(priv_node) = self.child_node(pid, pn)? {
                        if priv_node.key().is_some_and(|k| k.current.is_some()) {
                            return self.write_derived_pub(priv_node, data, ctx);
                        }
                    }
                }
                let kind = KeyKind::for_name(name);
                let path = format!("{}/{}", self.path_of(pid), String::from_utf8_lossy(name));
                let public = kinds::validate(kind, data.expose(), &path)?;
                let mut w = self.work(ctx);
                let id = self.alloc_id(&mut next, &mut w.txn)?;
                let mut kb = KeyBody::new(kind);
                let v = w.new_ver(&mut kb, kind, data.expose(), public)?;
                w.seal(id, &v, data.expose());
                w.audit(Rec::ok("import", path.clone(), id, v.ver));
                kb.current = Some(v);
                let cap = if kind.is_public() { 0o644 } else { 0o600 };
                let n = Node {
                    id,
                    parent: pid,
                    name: name.to_vec(),
                    perm: attrs.perm & cap,
                    uid: attrs.uid,
                    gid: attrs.gid,
                    atime: time.unwrap_or(w.now),
                    mtime: time.unwrap_or(w.now),
                    ctime: time.unwrap_or(w.now),
                    body: Body::Key(kb),
                };
                w.save(&n);
                w.link(pid, name, id);
                w.touch_dir(pid, 0)?;
                if kind == KeyKind::EcPrivate {
                    self.drop_real_pub(&mut w, &n)?;
                }
                w.commit(true)?;
                Ok(Ino::Node(id))
            }
            Ino::Old(kid) => {
                let n = self.node(kid)?;
                let path = format!(
                    "{}.old/{}",
                    self.path_of(kid),
                    String::from_utf8_lossy(name)
                );
                let ts = parse_ts(name).ok_or_else(|| {
                    Error::new(Kind::Invalid, format!("{path}: archived versions are named by their archive time in RFC 3339 UTC with nine fractional digits, e.g. 2026-11-28T21:40:05.123456789Z"))
                })?;
                let k = n
                    .key()
                    .ok_or_else(|| Error::new(Kind::NotDir, "not a history directory"))?;
                if k.archived_at(ts).is_some() {
                    return err(
                        Kind::Exists,
                        format!("{path} already exists; archived versions are immutable"),
                    );
                }
                let kind = k.kind;
                let public = kinds::validate(kind, data.expose(), &path)?;
                let mut w = self.work(ctx);
                let mut n = w.load(kid)?;
                let kb = n.key_mut().expect("key");
                let mut v = w.new_ver(kb, kind, data.expose(), public)?;
                v.archived_at = ts;
                v.created = ts;
                w.seal(kid, &v, data.expose());
                w.audit(Rec::ok("import-archived", path, kid, v.ver));
                let ver = v.ver;
                kb.push_archived(v);
                n.ctime = w.now;
                w.save(&n);
                w.commit(true)?;
                Ok(Ino::Ver(kid, ver))
            }
            Ino::Ver(..) | Ino::Pub(..) => err(
                Kind::NotDir,
                format!("{} is not a directory", self.ino_path(parent)),
            ),
            Ino::Special(_) | Ino::Staged(_) => err(Kind::ReadOnly, ".keyfs is read-only"),
        }
    }

    /// Replace the content of an existing file inode (rotation at close).
    pub fn write_existing(&self, ino: Ino, data: &SecretBytes, ctx: &Ctx) -> Result<Ino> {
        self.retrying(|| self.write_existing_once(ino, data, ctx))
    }

    fn write_existing_once(&self, ino: Ino, data: &SecretBytes, ctx: &Ctx) -> Result<Ino> {
        self.check_rw()?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        match ino {
            Ino::Node(id) => {
                // A handle opened before the key was destroyed must not bring
                // it back (with no history left the node is gone: NotFound too).
                if self.node(id)?.key().is_some_and(|k| k.current.is_none()) {
                    return err(Kind::NotFound, format!("{} no longer exists", self.path_of(id)));
                }
                self.rotate_locked(id, data, ctx).map(|_| ino)
            }
            Ino::Pub(id) => {
                let n = self.node(id)?;
                self.write_derived_pub(n, data, ctx)
            }
            Ino::Ver(..) => err(Kind::ReadOnly, format!("{} is an archived version and read-only; to make it current, `mv` it over its key", self.ino_path(ino))),
            _ => err(Kind::ReadOnly, format!("{} is read-only", self.ino_path(ino))),
        }
    }

    /// Name the archive entry the next rotation of key `id` gives its current
    /// version (Acra v1's writer links the current file into `<file>.old/<ts>`
    /// first). Kept in memory: if no rotation follows, nothing changes.
    pub fn set_next_archive(&self, id: u64, ts: i64) -> Result<()> {
        let n = self.node(id)?;
        let k = n.key().ok_or_else(|| {
            Error::new(
                Kind::Perm,
                format!(
                    "{} is not a key; only keys can be linked into their history",
                    self.path_of(id)
                ),
            )
        })?;
        if k.current.is_none() {
            return err(
                Kind::NotFound,
                format!("{} has no current version to archive", self.path_of(id)),
            );
        }
        if k.archived_at(ts).is_some() {
            return err(
                Kind::Exists,
                format!("{}.old/{} already exists", self.path_of(id), format_ts(ts)),
            );
        }
        self.next_archive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, ts);
        Ok(())
    }

    /// Forget a requested archive name (the link was removed before a rotation).
    pub fn clear_next_archive(&self, id: u64) {
        self.next_archive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// `--destroy-delay` for unlinks made from now on (0 = immediate).
    pub fn set_destroy_delay(&self, ns: i64) {
        self.destroy_delay
            .store(ns.max(0), std::sync::atomic::Ordering::Release);
    }

    fn destroy_or_defer(&self, w: &mut Work<'_>, n: &Node, v: &Ver, path: &str) {
        let delay = self
            .destroy_delay
            .load(std::sync::atomic::Ordering::Acquire);
        if delay == 0 {
            w.destroy_version(n, v, path);
            return;
        }
        let full = if v.archived_at == 0 || path.contains(".old/") {
            path.to_string()
        } else {
            format!("{path}.old/{}", format_ts(v.archived_at))
        };
        let p = Pending {
            entry: n.id,
            path: full.clone(),
            deadline: w.now + delay,
            unlinked: w.now,
            uid: n.uid,
            gid: n.gid,
            ver: v.clone(),
        };
        w.txn.put(pending_key(n.id, v.ver), p.encode());
        w.audit(Rec::ok(
            "destroy-scheduled",
            format!("{full} until {}", format_ts(p.deadline)),
            n.id,
            v.ver,
        ));
    }

    fn destroy_pending_in(&self, w: &mut Work<'_>, p: &Pending) {
        w.txn.delete(blob_key(p.entry, p.ver.ver));
        let t = Tombstone {
            path: p.path.clone(),
            entry: p.entry,
            ver: p.ver.ver,
            kind: p.ver.kind,
            created: p.ver.created,
            destroyed: w.now,
            uid: w.ctx.uid,
        };
        w.txn.put(tomb_key(p.entry, p.ver.ver), t.encode());
        w.audit(Rec::ok("destroy", p.path.clone(), p.entry, p.ver.ver));
    }

    /// Versions waiting for destruction.
    pub fn pending(&self) -> Result<Vec<Pending>> {
        self.backend
            .scan_prefix(b"p/")?
            .into_iter()
            .map(|(_, v)| Pending::decode(&v))
            .collect()
    }

    fn pending_of(&self, id: u64, ver: u32) -> Result<Option<Pending>> {
        match self.backend.get(&pending_key(id, ver))? {
            Some(v) => Pending::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    /// Destroy every pending version whose delay has passed (also when it
    /// passed while nothing was mounted). Returns how many were destroyed.
    pub fn purge_expired(&self, ctx: &Ctx) -> Result<usize> {
        self.retrying(|| self.purge_expired_once(ctx))
    }

    fn purge_expired_once(&self, ctx: &Ctx) -> Result<usize> {
        if self.read_only {
            return Ok(0);
        }
        let now = now_ns();
        let expired: Vec<Pending> = self
            .pending()?
            .into_iter()
            .filter(|p| p.deadline <= now)
            .collect();
        if expired.is_empty() {
            return Ok(0);
        }
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        for p in &expired {
            w.txn
                .guard(pending_key(p.entry, p.ver.ver), Some(p.encode()));
            w.txn.delete(pending_key(p.entry, p.ver.ver));
            self.destroy_pending_in(&mut w, p);
        }
        w.commit(true)?;
        Ok(expired.len())
    }

    /// `mv .keyfs/pending/<entry> PATH`: bring a version back before its
    /// destruction, as an import (or rotation) at `PATH`.
    fn restore_pending(
        &self,
        id: u64,
        ver: u32,
        parent: Ino,
        name: &[u8],
        ctx: &Ctx,
    ) -> Result<()> {
        let p = self.pending_of(id, ver)?.ok_or_else(|| {
            Error::new(
                Kind::NotFound,
                "that pending destruction no longer exists (its delay passed)",
            )
        })?;
        let material = self.open_blob_id(id, &p.ver)?;
        let ino = self.write_new(
            parent,
            name,
            &material,
            NewAttrs {
                perm: 0o600,
                uid: p.uid,
                gid: p.gid,
            },
            ctx,
        )?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        w.txn.delete(pending_key(id, ver));
        // Same entry and version: the record is now the restored version's, keep it.
        if ino != Ino::Node(id) || self.current_version(id) != Some(ver) {
            w.txn.delete(blob_key(id, ver));
        }
        w.audit(Rec::ok(
            "restore",
            format!("{} -> {}", p.path, self.ino_path(ino)),
            id,
            ver,
        ));
        w.commit(true)
    }

    /// Version number of a key's current version.
    pub fn current_version(&self, id: u64) -> Option<u32> {
        self.get_node(id)
            .ok()
            .flatten()
            .and_then(|n| n.key().and_then(|k| k.current.as_ref().map(|v| v.ver)))
    }

    /// Replace the current version `ver` of key `id` if it is still current and
    /// empty — the version an open file committed at an early close (a shell
    /// redirection closes a duplicate descriptor before writing). Returns false
    /// (changing nothing) when that is no longer the case.
    pub fn replace_empty_current(
        &self,
        id: u64,
        ver: u32,
        data: &SecretBytes,
        ctx: &Ctx,
    ) -> Result<bool> {
        self.retrying(|| self.replace_empty_current_once(id, ver, data, ctx))
    }

    fn replace_empty_current_once(
        &self,
        id: u64,
        ver: u32,
        data: &SecretBytes,
        ctx: &Ctx,
    ) -> Result<bool> {
        self.check_rw()?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        let mut n = w.load(id)?;
        let path = self.path_of(id);
        let Some(kb) = n.key_mut() else {
            return Ok(false);
        };
        match &kb.current {
            Some(c) if c.ver == ver && c.size == 0 => {}
            _ => return Ok(false),
        }
        let kind = kb.kind;
        let public = kinds::validate(kind, data.expose(), &path)?;
        let now = w.now;
        let v = Ver {
            ver,
            kind,
            created: now,
            archived_at: 0,
            size: data.len() as u32,
            fingerprint: crypto::fingerprint(data.expose()),
            public: public.unwrap_or_default(),
        };
        w.seal(id, &v, data.expose());
        kb.current = Some(v);
        n.mtime = now;
        n.ctime = now;
        w.save(&n);
        w.audit(Rec::ok("import", path, id, ver));
        w.commit(true)?;
        Ok(true)
    }

    /// Undo [`replace_empty_current`](Self::replace_empty_current)'s
    /// precondition: the empty current version `ver` that an open file
    /// committed is removed again (the previous version, if any, becomes
    /// current again; a key that had no other version disappears). Used when
    /// that open file then fails, so a refused write leaves the key as it was.
    pub fn undo_empty_current(&self, id: u64, ver: u32, ctx: &Ctx) -> Result<()> {
        self.retrying(|| self.undo_empty_current_once(id, ver, ctx))
    }

    fn undo_empty_current_once(&self, id: u64, ver: u32, ctx: &Ctx) -> Result<()> {
        self.check_rw()?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        let mut n = w.load(id)?;
        let path = self.path_of(id);
        let Some(kb) = n.key_mut() else { return Ok(()) };
        let cur = match &kb.current {
            Some(c) if c.ver == ver && c.size == 0 => c.clone(),
            _ => return Ok(()),
        };
        kb.current = None;
        if let Some(prev) = kb.archived.pop() {
            let mut prev = prev;
            prev.archived_at = 0;
            w.audit(Rec::ok("rollback", path.clone(), id, prev.ver));
            kb.current = Some(prev);
        }
        let empty = kb.is_empty();
        w.destroy_version(&n, &cur, &path);
        if empty {
            w.drop_node(&n)?;
        } else {
            w.save(&n);
        }
        w.commit(true)
    }

    /// Rotate a key to fresh material of its kind (CLI `rotate` without `--from`).
    pub fn rotate_fresh(&self, id: u64, ctx: &Ctx) -> Result<u32> {
        self.retrying(|| self.rotate_fresh_once(id, ctx))
    }

    fn rotate_fresh_once(&self, id: u64, ctx: &Ctx) -> Result<u32> {
        self.check_rw()?;
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.node(id)?;
        let k = n
            .key()
            .ok_or_else(|| Error::new(Kind::IsDir, format!("{} is not a key", self.path_of(id))))?;
        refuse_public(k.kind, &self.path_of(id))?;
        let fresh = kinds::generate(k.kind);
        self.rotate_locked(id, &fresh, ctx)
    }

    fn write_derived_pub(&self, priv_node: Node, data: &SecretBytes, ctx: &Ctx) -> Result<Ino> {
        let cur = priv_node
            .key()
            .and_then(|k| k.current.clone())
            .ok_or_else(|| Error::new(Kind::NotFound, "private key has no current version"))?;
        let path = format!("{}.pub", self.path_of(priv_node.id));
        if data.expose() != cur.public.as_slice() {
            return err(
                Kind::Perm,
                format!("{path} is derived from its private key and read-only; rotate the private key instead (writing the identical public key is accepted)"),
            );
        }
        if priv_node.key().is_some_and(|k| k.pub_hidden) {
            let mut w = self.work(ctx);
            let mut n = w.load(priv_node.id)?;
            n.key_mut().expect("key").pub_hidden = false;
            w.save(&n);
            w.audit(Rec::ok("restore-derived-public", path, n.id, cur.ver));
            w.commit(true)?;
        }
        Ok(Ino::Pub(priv_node.id))
    }

    /// A real `storage.pub` node next to a private key that now has a current
    /// version is superseded by the derived one: destroy it in the same change.
    fn drop_real_pub(&self, w: &mut Work<'_>, priv_node: &Node) -> Result<()> {
        let Some(pn) = kinds::public_name(&priv_node.name) else {
            return Ok(());
        };
        if let Some(pid) = self.child(priv_node.parent, pn)? {
            let p = w.load(pid)?;
            if let Some(k) = p.key() {
                let path = self.path_of(pid);
                for v in k.current.iter().chain(k.archived.iter()) {
                    w.destroy_version(&p, v, &path);
                }
                w.delete_node(pid);
                w.unlink_entry(p.parent, &p.name);
            }
        }
        Ok(())
    }

    fn rotate_locked(&self, id: u64, data: &SecretBytes, ctx: &Ctx) -> Result<u32> {
        let mut w = self.work(ctx);
        let ver = self.rotate_in(&mut w, id, data, "")?;
        w.commit(true)?;
        Ok(ver)
    }

    fn rotate_in(&self, w: &mut Work<'_>, id: u64, data: &SecretBytes, note: &str) -> Result<u32> {
        let mut n = w.load(id)?;
        let path = self.path_of(id);
        let kind = n
            .key()
            .ok_or_else(|| Error::new(Kind::IsDir, format!("{path} is not a key")))?
            .kind;
        let public = kinds::validate(kind, data.expose(), &path)?;
        let now = w.now;
        let kb = n.key_mut().expect("key");
        let v = w.new_ver(kb, kind, data.expose(), public)?;
        let had_current = kb.current.is_some();
        let requested = self
            .next_archive
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(mut old) = kb.current.take() {
            old.archived_at = kb.free_archive_ts(requested.unwrap_or(now));
            kb.push_archived(old);
        }
        kb.pub_hidden = false;
        let ver = v.ver;
        w.seal(id, &v, data.expose());
        kb.current = Some(v);
        n.mtime = now;
        n.ctime = now;
        w.save(&n);
        w.audit(Rec::ok(
            if had_current { "rotate" } else { "import" },
            format!("{path}{note}"),
            id,
            ver,
        ));
        if kind == KeyKind::EcPrivate {
            self.drop_real_pub(w, &n)?;
        }
        Ok(ver)
    }

    /// Make archived version `ver` of key `id` current; the displaced current is archived.
    pub fn rollback(&self, id: u64, ver: u32, ctx: &Ctx) -> Result<()> {
        self.retrying(|| self.rollback_once(id, ver, ctx))
    }

    fn rollback_once(&self, id: u64, ver: u32, ctx: &Ctx) -> Result<()> {
        self.check_rw()?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.work(ctx);
        self.rollback_in(&mut w, id, ver)?;
        w.commit(true)
    }

    fn rollback_in(&self, w: &mut Work<'_>, id: u64, ver: u32) -> Result<()> {
        let mut n = w.load(id)?;
        let path = self.path_of(id);
        let now = w.now;
        let kb = n
            .key_mut()
            .ok_or_else(|| Error::new(Kind::IsDir, format!("{path} is not a key")))?;
        let pos = kb
            .archived
            .iter()
            .position(|v| v.ver == ver)
            .ok_or_else(|| {
                Error::new(
                    Kind::NotFound,
                    format!("{path} has no archived version {ver}; see `keyfs list --versions`"),
                )
            })?;
        let mut v = kb.archived.remove(pos);
        v.archived_at = 0;
        if let Some(mut old) = kb.current.take() {
            old.archived_at = kb.free_archive_ts(now);
            kb.push_archived(old);
        }
        kb.current = Some(v);
        kb.pub_hidden = false;
        n.mtime = now;
        n.ctime = now;
        w.save(&n);
        w.audit(Rec::ok("rollback", path, id, ver));
        if n.key().is_some_and(|k| k.kind == KeyKind::EcPrivate) {
            self.drop_real_pub(w, &n)?;
        }
        Ok(())
    }

    /// Create a directory. Under `clients/` the name must be a ClientID and,
    /// with `generate`, the default key set is generated in the same change.
    /// `<key>.old` makes an (empty) history directory for restores.
    pub fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        attrs: NewAttrs,
        generate: bool,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.retrying(|| self.mkdir_once(parent, name, attrs, generate, ctx))
    }

    fn mkdir_once(
        &self,
        parent: Ino,
        name: &[u8],
        attrs: NewAttrs,
        generate: bool,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Ino::Node(pid) = parent else {
            return err(
                Kind::Perm,
                format!("cannot create directories in {}", self.ino_path(parent)),
            );
        };
        self.parent_dir_for_new(pid, name, true)?;
        let mut w = self.work(ctx);
        if let Some(base) = history_of(name) {
            if pid == node::CLIENTS {
                return err(
                    Kind::Invalid,
                    "history directories belong next to a key, not in clients/",
                );
            }
            validate_component(base)?;
            return match self.child_node(pid, base)? {
                Some(n) => match n.key() {
                    Some(k) if k.history_visible() => err(
                        Kind::Exists,
                        format!("{}.old already exists", self.path_of(n.id)),
                    ),
                    Some(_) => {
                        let mut n = w.load(n.id)?;
                        n.key_mut().expect("key").pinned = true;
                        w.save(&n);
                        w.commit(true)?;
                        Ok(Ino::Old(n.id))
                    }
                    None => err(
                        Kind::Exists,
                        format!("{} exists and is not a key", self.path_of(n.id)),
                    ),
                },
                None => {
                    let id = self.alloc_id(&mut next, &mut w.txn)?;
                    let mut kb = KeyBody::new(KeyKind::for_name(base));
                    kb.pinned = true;
                    let n = Node {
                        id,
                        parent: pid,
                        name: base.to_vec(),
                        perm: 0o600,
                        uid: attrs.uid,
                        gid: attrs.gid,
                        atime: w.now,
                        mtime: w.now,
                        ctime: w.now,
                        body: Body::Key(kb),
                    };
                    w.save(&n);
                    w.link(pid, base, id);
                    w.touch_dir(pid, 0)?;
                    w.commit(true)?;
                    Ok(Ino::Old(id))
                }
            };
        }
        if self.child(pid, name)?.is_some() || (pid == node::ROOT && name == b".keyfs") {
            return err(
                Kind::Exists,
                format!(
                    "{}/{} already exists",
                    self.path_of(pid),
                    String::from_utf8_lossy(name)
                ),
            );
        }
        if let Some(pn) = kinds::private_name(name) {
            if let Some(p) = self.child_node(pid, pn)? {
                if self.sibling_pub_visible(&p)? {
                    return err(
                        Kind::Exists,
                        format!("{}.pub already exists", self.path_of(p.id)),
                    );
                }
            }
        }
        let id = self.alloc_id(&mut next, &mut w.txn)?;
        let path = format!("{}/{}", self.path_of(pid), String::from_utf8_lossy(name));
        let n = Node {
            id,
            parent: pid,
            name: name.to_vec(),
            // Client directories are created at most 0700 (SPEC §1); other
            // directories take the requested mode, as on any filesystem.
            perm: if pid == node::CLIENTS {
                attrs.perm & 0o700
            } else {
                attrs.perm & 0o7777
            },
            uid: attrs.uid,
            gid: attrs.gid,
            atime: w.now,
            mtime: w.now,
            ctime: w.now,
            body: Body::Dir { subdirs: 0 },
        };
        w.save(&n);
        w.link(pid, name, id);
        w.touch_dir(pid, 1)?;
        w.audit(Rec::ok("mkdir", path.clone(), id, 0));
        if pid == node::CLIENTS && generate {
            for kname in DEFAULT_CLIENT_KEYS {
                self.generate_into(&mut w, &mut next, id, &path, kname.as_bytes(), attrs)?;
            }
        }
        w.commit(true)?;
        Ok(Ino::Node(id))
    }

    fn generate_into(
        &self,
        w: &mut Work<'_>,
        next: &mut u64,
        dir: u64,
        dir_path: &str,
        name: &[u8],
        attrs: NewAttrs,
    ) -> Result<()> {
        let kind = KeyKind::for_name(name);
        let material = kinds::generate(kind);
        let public = kinds::validate(kind, material.expose(), "generated")?;
        let id = self.alloc_id(next, &mut w.txn)?;
        let mut kb = KeyBody::new(kind);
        let v = w.new_ver(&mut kb, kind, material.expose(), public)?;
        w.seal(id, &v, material.expose());
        let path = format!("{dir_path}/{}", String::from_utf8_lossy(name));
        w.audit(Rec::ok("generate", path, id, v.ver));
        kb.current = Some(v);
        let perm = if kind.is_public() { 0o644 } else { 0o600 };
        let n = Node {
            id,
            parent: dir,
            name: name.to_vec(),
            perm,
            uid: attrs.uid,
            gid: attrs.gid,
            atime: w.now,
            mtime: w.now,
            ctime: w.now,
            body: Body::Key(kb),
        };
        w.save(&n);
        w.link(dir, name, id);
        Ok(())
    }

    /// Generate keys `names` in directory `dir` (rotating those that exist), in one change.
    pub fn generate(&self, dir: u64, names: &[&str], ctx: &Ctx) -> Result<()> {
        self.retrying(|| self.generate_once(dir, names, ctx))
    }

    fn generate_once(&self, dir: u64, names: &[&str], ctx: &Ctx) -> Result<()> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let d = self.node(dir)?;
        if !d.is_dir() || dir == node::ROOT || dir == node::CLIENTS {
            return err(
                Kind::Invalid,
                format!("{} cannot hold keys", self.path_of(dir)),
            );
        }
        let mut w = self.work(ctx);
        let dir_path = self.path_of(dir);
        let attrs = NewAttrs {
            perm: 0o600,
            uid: d.uid,
            gid: d.gid,
        };
        for name in names {
            validate_component(name.as_bytes())?;
            if history_of(name.as_bytes()).is_some() {
                return err(
                    Kind::Invalid,
                    format!("{name}: names ending in .old are reserved"),
                );
            }
            if let Some(pn) = kinds::private_name(name.as_bytes()) {
                if self.child(dir, pn)?.is_none() {
                    refuse_public(KeyKind::EcPublic, &format!("{dir_path}/{name}"))?;
                }
            }
            match self.child_node(dir, name.as_bytes())? {
                Some(n) if n.key().is_some() => {
                    let fresh = kinds::generate(n.key().expect("key").kind);
                    self.rotate_in(&mut w, n.id, &fresh, "")?;
                }
                Some(n) => {
                    return err(
                        Kind::Exists,
                        format!("{} exists and is not a key", self.path_of(n.id)),
                    )
                }
                None => {
                    if let Some(pn) = kinds::private_name(name.as_bytes()) {
                        if self.child(dir, pn)?.is_some() {
                            return err(
                                Kind::Invalid,
                                format!(
                                    "{dir_path}/{name} is derived from {}; generate that instead",
                                    String::from_utf8_lossy(pn)
                                ),
                            );
                        }
                    }
                    self.generate_into(&mut w, &mut next, dir, &dir_path, name.as_bytes(), attrs)?;
                }
            }
        }
        w.touch_dir(dir, 0)?;
        w.commit(true)
    }

    /// Make a client directory if needed (CLI `generate --client-id`).
    pub fn ensure_client(&self, id: &ClientId, ctx: &Ctx) -> Result<u64> {
        if let Some(c) = self.child(node::CLIENTS, id.as_str().as_bytes())? {
            return Ok(c);
        }
        match self.mkdir(
            Ino::Node(node::CLIENTS),
            id.as_str().as_bytes(),
            NewAttrs::for_ctx(ctx),
            false,
            ctx,
        )? {
            Ino::Node(c) => Ok(c),
            _ => unreachable!("mkdir in clients/ makes a node"),
        }
    }

    /// Remove an empty directory (or an empty `<key>.old`).
    pub fn rmdir(&self, parent: Ino, name: &[u8], ctx: &Ctx) -> Result<()> {
        self.retrying(|| self.rmdir_once(parent, name, ctx))
    }

    fn rmdir_once(&self, parent: Ino, name: &[u8], ctx: &Ctx) -> Result<()> {
        self.check_rw()?;
        let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let target = self.lookup(parent, name)?;
        let mut w = self.work(ctx);
        match target {
            Ino::Node(id) => {
                if matches!(
                    id,
                    node::ROOT | node::CLIENTS | node::POISON | node::AUDIT_DIR
                ) {
                    return err(
                        Kind::Perm,
                        format!(
                            "{} is part of the fixed tree and cannot be removed",
                            self.path_of(id)
                        ),
                    );
                }
                let n = w.load(id)?;
                if !n.is_dir() {
                    return err(
                        Kind::NotDir,
                        format!("{} is not a directory", self.path_of(id)),
                    );
                }
                if !self.backend.scan_prefix(&dirent_prefix(id))?.is_empty() {
                    return err(
                        Kind::NotEmpty,
                        format!(
                            "{} is not empty; remove its keys first (`rm -r` destroys them)",
                            self.path_of(id)
                        ),
                    );
                }
                w.audit(Rec::ok("rmdir", self.path_of(id), id, 0));
                w.delete_node(id);
                w.unlink_entry(n.parent, &n.name);
                w.touch_dir(n.parent, -1)?;
                w.commit(true)
            }
            Ino::Old(kid) => {
                let mut n = w.load(kid)?;
                let kb = n.key_mut().expect("key");
                if !kb.archived.is_empty() {
                    return err(
                        Kind::NotEmpty,
                        format!(
                            "{}.old still holds archived versions; rm them first",
                            self.path_of(kid)
                        ),
                    );
                }
                kb.pinned = false;
                if kb.is_empty() {
                    w.drop_node(&n)?;
                } else {
                    w.save(&n);
                }
                w.commit(true)
            }
            Ino::Special(_) => err(Kind::Perm, ".keyfs cannot be removed"),
            _ => err(
                Kind::NotDir,
                format!("{} is not a directory", self.ino_path(target)),
            ),
        }
    }

    /// Unlink: destroy a key's current version, an archived version, a symlink;
    /// hide a derived public key.
    pub fn unlink(&self, parent: Ino, name: &[u8], ctx: &Ctx) -> Result<()> {
        self.retrying(|| self.unlink_once(parent, name, ctx))
    }

    fn unlink_once(&self, parent: Ino, name: &[u8], ctx: &Ctx) -> Result<()> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let target = self.lookup(parent, name)?;
        let mut w = self.work(ctx);
        if let (Ino::Special(Special::Pending), Ino::Ver(id, ver)) = (parent, target) {
            // `rm .keyfs/pending/<entry>`: destroy it now.
            let p = self.pending_of(id, ver)?.ok_or_else(|| {
                Error::new(Kind::NotFound, "that pending destruction no longer exists")
            })?;
            w.txn.delete(pending_key(id, ver));
            self.destroy_pending_in(&mut w, &p);
            return w.commit(true);
        }
        match target {
            Ino::Node(id) => {
                let mut n = w.load(id)?;
                let path = self.path_of(id);
                match &n.body {
                    Body::Dir { .. } => {
                        return err(Kind::IsDir, format!("{path} is a directory; use rmdir"))
                    }
                    Body::Symlink(_) => {
                        w.delete_node(id);
                        w.unlink_entry(n.parent, &n.name);
                        w.touch_dir(n.parent, 0)?;
                        return w.commit(true);
                    }
                    Body::Key(_) => {}
                }
                let pub_visible = self.sibling_pub_visible(&n)?;
                let kb = n.key_mut().expect("key");
                let cur = kb
                    .current
                    .take()
                    .expect("visible key has a current version");
                let kind = kb.kind;
                let empty = kb.is_empty();
                let now = w.now;
                self.destroy_or_defer(&mut w, &n, &cur, &path);
                if empty {
                    w.drop_node(&n)?;
                } else {
                    n.ctime = now;
                    w.save(&n);
                    w.touch_dir(n.parent, 0)?;
                }
                if kind == KeyKind::EcPrivate && pub_visible && !cur.public.is_empty() {
                    // The public half is not secret: it stays, as a stored public key.
                    self.keep_public(&mut w, &mut next, &n, &cur)?;
                }
                w.commit(true)
            }
            Ino::Ver(kid, ver) => {
                let mut n = w.load(kid)?;
                let path = self.ino_path(target);
                let kb = n.key_mut().expect("key");
                let pos = kb
                    .archived
                    .iter()
                    .position(|v| v.ver == ver)
                    .ok_or_else(|| {
                        Error::new(Kind::NotFound, format!("{path} no longer exists"))
                    })?;
                let v = kb.archived.remove(pos);
                // Like any directory, `<key>.old/` stays (empty) until rmdir,
                // so `rm -r` (unlink entries, then rmdir) works.
                kb.pinned = true;
                self.destroy_or_defer(&mut w, &n, &v, &path);
                n.ctime = w.now;
                w.save(&n);
                w.commit(true)
            }
            Ino::Pub(id) => {
                let mut n = w.load(id)?;
                n.key_mut().expect("key").pub_hidden = true;
                w.save(&n);
                w.touch_dir(n.parent, 0)?;
                w.audit(Rec::ok("hide-derived-public", self.ino_path(target), id, 0));
                w.commit(true)
            }
            Ino::Old(_) => err(
                Kind::IsDir,
                format!("{} is a directory", self.ino_path(target)),
            ),
            _ => err(
                Kind::Perm,
                format!("{} cannot be removed", self.ino_path(target)),
            ),
        }
    }

    fn keep_public(
        &self,
        w: &mut Work<'_>,
        next: &mut u64,
        priv_node: &Node,
        cur: &Ver,
    ) -> Result<()> {
        let pn = kinds::public_name(&priv_node.name).expect("private kind has a public name");
        let id = self.alloc_id(next, &mut w.txn)?;
        let mut kb = KeyBody::new(KeyKind::EcPublic);
        let v = w.new_ver(&mut kb, KeyKind::EcPublic, &cur.public, None)?;
        w.seal(id, &v, &cur.public);
        let path = format!(
            "{}/{}",
            self.path_of(priv_node.parent),
            String::from_utf8_lossy(pn)
        );
        w.audit(Rec::ok("keep-public", path, id, v.ver));
        kb.current = Some(v);
        let n = Node {
            id,
            parent: priv_node.parent,
            name: pn.to_vec(),
            perm: 0o644,
            uid: priv_node.uid,
            gid: priv_node.gid,
            atime: w.now,
            mtime: w.now,
            ctime: w.now,
            body: Body::Key(kb),
        };
        w.save(&n);
        w.link(priv_node.parent, pn, id);
        Ok(())
    }

    fn is_ancestor(&self, anc: u64, mut id: u64) -> Result<bool> {
        while id != 0 {
            if id == anc {
                return Ok(true);
            }
            id = self.get_node(id)?.map(|n| n.parent).unwrap_or(0);
        }
        Ok(false)
    }

    /// `rename(p1/n1, p2/n2)`: a move, a rotation (key over key), a rollback
    /// (`<key>.old/<ts>` over its key), or the import of a key's current
    /// material as an archived version (file into `<key>.old/<ts>`).
    pub fn rename(
        &self,
        p1: Ino,
        n1: &[u8],
        p2: Ino,
        n2: &[u8],
        noreplace: bool,
        ctx: &Ctx,
    ) -> Result<()> {
        self.retrying(|| self.rename_once(p1, n1, p2, n2, noreplace, ctx))
    }

    fn rename_once(
        &self,
        p1: Ino,
        n1: &[u8],
        p2: Ino,
        n2: &[u8],
        noreplace: bool,
        ctx: &Ctx,
    ) -> Result<()> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let src = self.lookup(p1, n1)?;
        validate_component(n2)?;
        let (dst, dst_visible) = match self.lookup(p2, n2) {
            Ok(i) => (Some(i), true),
            // A key that has only history (its `.old/` was restored first) is
            // still the key this name belongs to: renaming onto it imports.
            Err(e) if e.kind() == Kind::NotFound => match p2 {
                Ino::Node(pid2) => (self.child(pid2, n2)?.map(Ino::Node), false),
                _ => (None, false),
            },
            Err(e) => return Err(e),
        };
        if dst == Some(src) {
            return Ok(());
        }
        // NOREPLACE protects what lookup shows: a name with only history is
        // free (stat says ENOENT), and renaming onto it imports, like create.
        if let (Some(d), true, true) = (dst, dst_visible, noreplace) {
            return err(Kind::Exists, format!("{} already exists", self.ino_path(d)));
        }
        let mut w = self.work(ctx);
        if let (Ino::Special(Special::Pending), Ino::Ver(id, ver)) = (p1, src) {
            drop(next);
            return self.restore_pending(id, ver, p2, n2, ctx);
        }
        let sid = match src {
            Ino::Ver(kid, ver) => {
                let n = self.node(kid)?;
                let onto_own_key = match dst {
                    Some(Ino::Node(d)) => d == kid,
                    None => p2 == Ino::Node(n.parent) && n2 == n.name.as_slice(),
                    _ => false,
                };
                if !onto_own_key {
                    return err(Kind::Invalid, format!("{}: an archived version can only be moved over its own key (a rollback); use cp to copy it elsewhere", self.ino_path(src)));
                }
                self.rollback_in(&mut w, kid, ver)?;
                return w.commit(true);
            }
            Ino::Node(id) => id,
            Ino::Pub(_) => {
                return err(
                    Kind::Perm,
                    format!(
                        "{} is derived from its private key and cannot be moved; use cp",
                        self.ino_path(src)
                    ),
                )
            }
            Ino::Old(_) => {
                return err(
                    Kind::Perm,
                    format!(
                        "{} moves with its key; rename the key instead",
                        self.ino_path(src)
                    ),
                )
            }
            _ => {
                return err(
                    Kind::Perm,
                    format!("{} cannot be moved", self.ino_path(src)),
                )
            }
        };
        let s = w.load(sid)?;
        if matches!(sid, node::CLIENTS | node::POISON | node::AUDIT_DIR) {
            return err(
                Kind::Perm,
                format!(
                    "{} is part of the fixed tree and cannot be moved",
                    self.path_of(sid)
                ),
            );
        }
        let pid2 = match p2 {
            Ino::Node(p) => p,
            Ino::Old(kid) => {
                // A file renamed into history: import its material as an archived version.
                if let Some(d) = dst {
                    return err(
                        Kind::Exists,
                        format!(
                            "{} already exists; archived versions are immutable",
                            self.ino_path(d)
                        ),
                    );
                }
                let Some(cur) = s.key().and_then(|k| k.current.clone()) else {
                    return err(
                        Kind::Invalid,
                        "only a file can be moved into a history directory",
                    );
                };
                if s.key().is_some_and(|k| !k.archived.is_empty()) {
                    return err(Kind::Invalid, format!("{} has its own history; only a plain file can become an archived version", self.path_of(sid)));
                }
                let material = self.open_blob(&s, &cur)?;
                let path = format!("{}.old/{}", self.path_of(kid), String::from_utf8_lossy(n2));
                let ts = parse_ts(n2).ok_or_else(|| Error::new(Kind::Invalid, format!("{path}: archived versions are named by their archive time, e.g. 2026-11-28T21:40:05.123456789Z")))?;
                if kid == sid {
                    // `mv key key.old/<ts>`: the current version is archived
                    // under that name; the key keeps its identity and history.
                    drop(material);
                    let mut k = w.load(kid)?;
                    let kb = k.key_mut().expect("key");
                    let mut v = kb.current.take().expect("checked above");
                    v.archived_at = ts;
                    let ver = v.ver;
                    kb.push_archived(v);
                    k.mtime = w.now;
                    k.ctime = w.now;
                    w.save(&k);
                    w.touch_dir(k.parent, 0)?;
                    w.audit(Rec::ok("archive", path, kid, ver));
                    return w.commit(true);
                }
                let mut k = w.load(kid)?;
                let kind = k
                    .key()
                    .ok_or_else(|| Error::new(Kind::NotDir, "not a history directory"))?
                    .kind;
                let public = kinds::validate(kind, material.expose(), &path)?;
                let kb = k.key_mut().expect("key");
                let mut v = w.new_ver(kb, kind, material.expose(), public)?;
                v.archived_at = ts;
                v.created = cur.created;
                w.seal(kid, &v, material.expose());
                w.audit(Rec::ok(
                    "import-archived",
                    format!("{path} from {}", self.path_of(sid)),
                    kid,
                    v.ver,
                ));
                kb.push_archived(v);
                k.ctime = w.now;
                w.save(&k);
                w.txn.delete(blob_key(sid, cur.ver));
                w.delete_node(sid);
                w.unlink_entry(s.parent, &s.name);
                w.touch_dir(s.parent, 0)?;
                return w.commit(true);
            }
            _ => {
                return err(
                    Kind::NotDir,
                    format!("{} is not a directory", self.ino_path(p2)),
                )
            }
        };
        if history_of(n2).is_some() {
            return err(
                Kind::Invalid,
                "names ending in .old are reserved for version histories",
            );
        }
        self.parent_dir_for_new(pid2, n2, s.is_dir())?;
        if s.is_dir() && self.is_ancestor(sid, pid2)? {
            return err(
                Kind::Invalid,
                format!("cannot move {} into itself", self.path_of(sid)),
            );
        }
        let s_path = self.path_of(sid);
        match dst {
            None => {}
            Some(Ino::Node(did)) => {
                let d = w.load(did)?;
                match (&s.body, &d.body) {
                    (Body::Key(sk), Body::Key(_)) => {
                        // The atomic-replace pattern: rotate the target to the source's material.
                        let cur = sk.current.clone().ok_or_else(|| {
                            Error::new(Kind::NotFound, format!("{s_path} has no current version"))
                        })?;
                        let material = self.open_blob(&s, &cur)?;
                        self.rotate_in(&mut w, did, &material, &format!(" from {s_path}"))?;
                        // POSIX: after rename the name has the source's mode, owner and
                        // mtime. But a key's history belongs to the key's owner: someone
                        // who may only write the directory must not become the owner of
                        // the key — and so of its archived versions — by renaming their
                        // own file over it. Only root (restores) or the key's owner take
                        // the source's owner and mode along.
                        let mut d = w.load(did)?;
                        if ctx.uid == 0 || (s.uid == d.uid && s.gid == d.gid) {
                            d.perm = s.perm;
                            d.uid = s.uid;
                            d.gid = s.gid;
                        }
                        d.mtime = s.mtime;
                        w.save(&d);
                        w.txn.delete(blob_key(sid, cur.ver));
                        for v in &sk.archived {
                            w.destroy_version(
                                &s,
                                v,
                                &format!("{s_path}.old/{}", format_ts(v.archived_at)),
                            );
                        }
                        w.delete_node(sid);
                        w.unlink_entry(s.parent, &s.name);
                        w.touch_dir(s.parent, 0)?;
                        return w.commit(true);
                    }
                    (Body::Dir { .. }, Body::Dir { .. }) => {
                        if !self.backend.scan_prefix(&dirent_prefix(did))?.is_empty() {
                            return err(
                                Kind::NotEmpty,
                                format!("{} is not empty", self.path_of(did)),
                            );
                        }
                        w.unlink_entry(pid2, n2);
                        w.delete_node(did);
                        w.touch_dir(pid2, -1)?;
                    }
                    (Body::Dir { .. }, _) => {
                        return err(
                            Kind::NotDir,
                            format!("{} is not a directory", self.path_of(did)),
                        )
                    }
                    (_, Body::Dir { .. }) => {
                        return err(Kind::IsDir, format!("{} is a directory", self.path_of(did)))
                    }
                    (_, Body::Symlink(_)) => {
                        w.delete_node(did);
                        w.unlink_entry(pid2, n2);
                    }
                    (Body::Symlink(_), Body::Key(_)) => {
                        return err(Kind::Perm, format!("replacing key {} with a symlink would destroy it; rm the key first", self.path_of(did)));
                    }
                }
            }
            Some(Ino::Pub(pid)) => {
                let pubm = self
                    .node(pid)?
                    .key()
                    .and_then(|k| k.current.as_ref().map(|v| v.public.clone()))
                    .unwrap_or_default();
                let same = match s.key().and_then(|k| k.current.clone()) {
                    Some(cur) if s.key().is_some_and(|k| k.archived.is_empty()) => {
                        self.open_blob(&s, &cur)?.expose() == pubm.as_slice()
                    }
                    _ => false,
                };
                if !same {
                    return err(Kind::Perm, format!("{} is derived from its private key and read-only; writing the identical public key is accepted", self.ino_path(dst.expect("some"))));
                }
                let cur = s.key().and_then(|k| k.current.clone()).expect("checked");
                let mut p = w.load(pid)?;
                p.key_mut().expect("key").pub_hidden = false;
                w.save(&p);
                w.txn.delete(blob_key(sid, cur.ver));
                w.delete_node(sid);
                w.unlink_entry(s.parent, &s.name);
                w.touch_dir(s.parent, 0)?;
                return w.commit(true);
            }
            Some(Ino::Old(_)) => {
                return err(
                    Kind::IsDir,
                    format!(
                        "{} is a history directory",
                        self.ino_path(dst.expect("some"))
                    ),
                )
            }
            Some(other) => {
                return err(
                    Kind::ReadOnly,
                    format!("{} cannot be replaced", self.ino_path(other)),
                )
            }
        }
        // A move: same identity and history, new name.
        let mut s = s;
        let new_kind = KeyKind::for_name(n2);
        if let Some(kb) = s.key() {
            if kb.kind != new_kind {
                // Every version, not only the current one, must be valid for
                // the new kind: a later rollback must not make invalid material
                // current (nor a private key without its public half).
                let dst_path = format!("{}/{}", self.path_of(pid2), String::from_utf8_lossy(n2));
                let mut publics = Vec::new();
                for v in kb.current.iter().chain(kb.archived.iter()) {
                    let material = self.open_blob(&s, v)?;
                    let what = if v.archived_at == 0 {
                        dst_path.clone()
                    } else {
                        format!("{dst_path}.old/{}", format_ts(v.archived_at))
                    };
                    let public = kinds::validate(new_kind, material.expose(), &what)?;
                    publics.push((v.ver, public.unwrap_or_default()));
                }
                let kbm = s.key_mut().expect("key");
                for v in kbm.current.iter_mut().chain(kbm.archived.iter_mut()) {
                    if let Some((_, p)) = publics.iter_mut().find(|(n, _)| *n == v.ver) {
                        v.public = std::mem::take(p);
                    }
                }
                kbm.kind = new_kind;
            }
        }
        let is_dir = s.is_dir();
        let old_parent = s.parent;
        w.unlink_entry(s.parent, &s.name);
        w.txn.put(dirent_key(pid2, n2), sid.to_be_bytes().to_vec());
        s.parent = pid2;
        s.name = n2.to_vec();
        s.ctime = w.now;
        w.save(&s);
        if old_parent == pid2 {
            w.touch_dir(pid2, 0)?;
        } else {
            w.touch_dir(old_parent, if is_dir { -1 } else { 0 })?;
            w.touch_dir(pid2, if is_dir { 1 } else { 0 })?;
        }
        w.audit(Rec::ok(
            "rename",
            format!(
                "{s_path} -> {}",
                self.path_of(pid2) + "/" + &String::from_utf8_lossy(n2)
            ),
            sid,
            0,
        ));
        if new_kind == KeyKind::EcPrivate && s.key().is_some_and(|k| k.current.is_some()) {
            self.drop_real_pub(&mut w, &s)?;
        }
        let _ = &mut next;
        w.commit(true)
    }

    /// Symbolic link.
    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        attrs: NewAttrs,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.retrying(|| self.symlink_once(parent, name, target, attrs, ctx))
    }

    fn symlink_once(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        attrs: NewAttrs,
        ctx: &Ctx,
    ) -> Result<Ino> {
        self.check_rw()?;
        let mut next = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Ino::Node(pid) = parent else {
            return err(
                Kind::Perm,
                format!("cannot create links in {}", self.ino_path(parent)),
            );
        };
        if history_of(name).is_some() {
            return err(
                Kind::Invalid,
                "names ending in .old are reserved for version histories",
            );
        }
        self.parent_dir_for_new(pid, name, false)?;
        if target.len() > 4095 || target.is_empty() {
            return err(Kind::NameTooLong, "symlink target must be 1 to 4095 bytes");
        }
        if self.lookup(parent, name).is_ok() || self.child(pid, name)?.is_some() {
            return err(
                Kind::Exists,
                format!(
                    "{}/{} already exists",
                    self.path_of(pid),
                    String::from_utf8_lossy(name)
                ),
            );
        }
        let mut w = self.work(ctx);
        let id = self.alloc_id(&mut next, &mut w.txn)?;
        let n = Node {
            id,
            parent: pid,
            name: name.to_vec(),
            perm: 0o777,
            uid: attrs.uid,
            gid: attrs.gid,
            atime: w.now,
            mtime: w.now,
            ctime: w.now,
            body: Body::Symlink(target.to_vec()),
        };
        w.save(&n);
        w.link(pid, name, id);
        w.touch_dir(pid, 0)?;
        w.commit(true)?;
        Ok(Ino::Node(id))
    }

    /// chmod / chown / utimens.
    pub fn setattr(&self, ino: Ino, s: SetAttr, ctx: &Ctx) -> Result<Attr> {
        self.retrying(|| self.setattr_once(ino, s, ctx))
    }

    fn setattr_once(&self, ino: Ino, s: SetAttr, ctx: &Ctx) -> Result<Attr> {
        let cur = self.attr(ino)?;
        match ino {
            Ino::Node(id) => {
                self.check_rw()?;
                let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let mut w = self.work(ctx);
                let mut n = w.load(id)?;
                let path = self.path_of(id);
                let is_key = n.key().is_some();
                if let Some(p) = s.perm {
                    if p & 0o7777 != n.perm {
                        n.perm = p & 0o7777;
                        if is_key {
                            w.audit(Rec::ok(
                                "chmod",
                                format!("{path} mode={:04o}", n.perm),
                                id,
                                0,
                            ));
                        }
                    }
                    n.ctime = w.now;
                }
                if s.uid.is_some() || s.gid.is_some() {
                    n.uid = s.uid.unwrap_or(n.uid);
                    n.gid = s.gid.unwrap_or(n.gid);
                    n.ctime = w.now;
                    if is_key {
                        w.audit(Rec::ok(
                            "chown",
                            format!("{path} owner={}:{}", n.uid, n.gid),
                            id,
                            0,
                        ));
                    }
                }
                if let Some(a) = s.atime {
                    n.atime = a;
                    n.ctime = w.now;
                }
                if let Some(m) = s.mtime {
                    n.mtime = m;
                    n.ctime = w.now;
                }
                w.save(&n);
                w.commit(true)?;
                self.attr(ino)
            }
            Ino::Old(id)
                if (s.atime.is_some() || s.mtime.is_some())
                    && s.perm.is_none_or(|p| p & 0o7777 == cur.perm)
                    && s.uid.is_none_or(|u| u == cur.uid)
                    && s.gid.is_none_or(|g| g == cur.gid)
                    && self.node(id)?.key().is_some_and(|k| k.current.is_none()) =>
            {
                // A key with only a history shows its times on `<key>.old/`
                // alone: keep the times a restore (tar, rsync) sets there.
                self.check_rw()?;
                let _l = self.writer.lock().unwrap_or_else(|p| p.into_inner());
                let mut w = self.work(ctx);
                let mut n = w.load(id)?;
                if let Some(a) = s.atime {
                    n.atime = a;
                }
                if let Some(m) = s.mtime {
                    n.mtime = m;
                }
                n.ctime = w.now;
                w.save(&n);
                w.commit(true)?;
                self.attr(ino)
            }
            Ino::Old(_) | Ino::Ver(..) | Ino::Pub(_) => {
                let perm_ok = s.perm.is_none_or(|p| p & 0o7777 == cur.perm);
                let own_ok =
                    s.uid.is_none_or(|u| u == cur.uid) && s.gid.is_none_or(|g| g == cur.gid);
                if perm_ok && own_ok {
                    Ok(cur) // times of derived entries follow their key
                } else {
                    err(
                        Kind::Perm,
                        format!(
                            "{} takes its mode and owner from its key; chmod/chown the key instead",
                            self.ino_path(ino)
                        ),
                    )
                }
            }
            _ => err(Kind::Perm, ".keyfs is read-only"),
        }
    }

    /// Extended attributes of a key entry: (name, value).
    pub fn xattrs(&self, ino: Ino) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let (n, v, state) = match ino {
            Ino::Node(id) => {
                let n = self.node(id)?;
                let v = n.key().and_then(|k| k.current.clone());
                (n, v, "current")
            }
            Ino::Ver(id, ver) => {
                let n = self.node(id)?;
                let v = n
                    .key()
                    .and_then(|k| k.archived.iter().find(|v| v.ver == ver).cloned());
                (n, v, "archived")
            }
            Ino::Pub(id) => {
                let n = self.node(id)?;
                let v = n.key().and_then(|k| k.current.clone()).map(|mut v| {
                    v.kind = KeyKind::EcPublic;
                    v.fingerprint = crypto::fingerprint(&v.public);
                    v
                });
                (n, v, "derived")
            }
            _ => return Ok(Vec::new()),
        };
        let Some(v) = v else { return Ok(Vec::new()) };
        let _ = n;
        Ok(vec![
            ("user.keyfs.kind", v.kind.label().as_bytes().to_vec()),
            ("user.keyfs.version", v.ver.to_string().into_bytes()),
            ("user.keyfs.created", format_ts(v.created).into_bytes()),
            (
                "user.keyfs.fingerprint",
                crypto::hex(&v.fingerprint).into_bytes(),
            ),
            ("user.keyfs.state", state.as_bytes().to_vec()),
        ])
    }

    /// Resolve a tree path (`clients/alice01/storage`, `clients/a/storage.old/<ts>`).
    pub fn resolve(&self, path: &str) -> Result<Ino> {
        let mut cur = Ino::Node(node::ROOT);
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            cur = self.lookup(cur, comp.as_bytes())?;
        }
        Ok(cur)
    }

    /// Split a tree path into (parent inode, last name).
    pub fn resolve_parent<'p>(&self, path: &'p str) -> Result<(Ino, &'p str)> {
        let trimmed = path.trim_end_matches('/');
        let (dir, name) = match trimmed.rfind('/') {
            Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
            None => ("", trimmed),
        };
        if name.is_empty() {
            return err(Kind::Invalid, format!("{path:?} does not name an entry"));
        }
        Ok((self.resolve(dir)?, name))
    }
}
