//! The filesystem core: file handles, write buffering with commit at
//! close/fsync, files staged inside `<key>.old/` by backup tools, and the
//! kernel-cache invalidations each change needs. No `fuser` types here, so
//! this is callable from tests without the kernel.

use super::acra;
use crate::error::{err, Error, Kind, Result};
use crate::inventory::audit::Ctx;
use crate::inventory::kinds::{self, MAX_SECRET};
use crate::inventory::names::{format_ts, history_of, now_ns, parse_ts, validate_component};
use crate::inventory::node::{self, Ino};
use crate::inventory::{Attr, DirEntry, FType, Inventory, NewAttrs, SetAttr};
use crate::secret::SecretBytes;
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// How the mount behaves.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Refuse every change (`EROFS`).
    pub read_only: bool,
    /// `mkdir clients/<id>` generates the default key set.
    pub mkdir_generates: bool,
    /// Kernel page cache and long TTLs (with explicit invalidation).
    pub cache: bool,
    /// Files hold sealed records instead of plaintext (SPEC §5 sealed view).
    pub sealed: bool,
    /// Acra v1 file names at the top level (SPEC §5).
    pub acra: bool,
    /// Keep unlinked versions recoverable this long (ns) under `.keyfs/pending/`.
    pub destroy_delay_ns: i64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            mkdir_generates: true,
            cache: false,
            sealed: false,
            acra: false,
            destroy_delay_ns: 0,
        }
    }
}

impl MountOptions {
    /// How long the kernel may keep entries and attributes. Every change made
    /// through the mount also invalidates them explicitly.
    pub fn ttl(&self) -> Duration {
        if self.cache {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(1)
        }
    }
}

/// A kernel cache invalidation, performed asynchronously after the reply
/// (doing it inside a handler can deadlock on the kernel's inode locks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// Forget the dentry `name` in directory `parent`.
    Entry(u64, Vec<u8>),
    /// Drop cached attributes and pages of an inode.
    Inode(u64),
}

enum Target {
    /// An existing key, archived version, derived public key or `.keyfs` file.
    Ino(Ino),
    /// A new file, committed at close as an import.
    New {
        parent: Ino,
        name: Vec<u8>,
        attrs: NewAttrs,
    },
    /// A temp file inside `<key>.old/` (rsync's pattern), kept in memory until
    /// renamed to a timestamp name.
    Staged(u64),
}

struct Handle {
    ino: u64,
    target: Target,
    data: SecretBytes,
    write: bool,
    /// The buffer differs from what is committed.
    dirty: bool,
    /// A write(2) happened since the last commit (a bare O_TRUNC or create
    /// commits only at release, so a shell's dup-and-close does not archive
    /// an empty version).
    written: bool,
    /// A write was refused (over 64 KiB): the whole handle is abandoned, so a
    /// failed `cp` never commits a truncated or partial key.
    failed: bool,
    /// chmod/utimens made through this handle before its content was
    /// committed (`tar -xp` does write, futimens, fchmod, close): applied
    /// again after the commit, which would otherwise cap the mode at 0600 and
    /// set mtime to the commit time.
    post: SetAttr,
    /// The empty version this handle committed at an early close (a shell
    /// redirection closes a dup of the descriptor before it writes): the next
    /// commit through this handle replaces it instead of archiving it.
    amend: Option<(u64, u32)>,
    /// The name was unlinked while open: reads and writes go on, nothing is committed.
    discarded: bool,
    /// Why the content of this new file was refused at a close: every later
    /// close of a descriptor of the same open file reports it too (a copy
    /// inherited by a forked child can be closed first).
    refused: Option<Error>,
    /// Attributes when opened, served by fstat after the file is unlinked.
    snapshot: Option<Attr>,
    /// When uncommitted content last changed (write, truncate): stat shows it
    /// as mtime/ctime until the commit makes it the stored time.
    touched: Option<i64>,
    /// Resized by an explicit (f)truncate: stat shows the new size at once. A
    /// bare O_TRUNC is not shown until committed, so a truncation refused at
    /// close (invalid for the key's kind) never appears.
    resized: bool,
    ctx: Ctx,
}

struct Staged {
    /// Directory it was created in (`<key>.old/`, or any directory in the sealed view).
    dir: Ino,
    name: Vec<u8>,
    data: SecretBytes,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: i64,
    ctime: i64,
    /// chmod/utimens made on the temp file (rsync makes them before its
    /// rename): re-applied to the key it becomes, as `commit` does with a
    /// handle's `post`.
    post: SetAttr,
}

#[derive(Default)]
struct State {
    next: u64,
    handles: HashMap<u64, Handle>,
    staged: HashMap<u64, Staged>,
    forward: HashMap<u64, Ino>,
    /// Acra layout: `<file>.old/<ts>` hard links made by Acra's writer,
    /// (key id, name) → archive instant, until the rotation that follows.
    links: HashMap<(u64, Vec<u8>), i64>,
    /// `--cache`: the kernel sends no open (FUSE_NO_OPEN_SUPPORT), so reads and
    /// writes arrive without a file handle; a truncate waiting for its write is
    /// kept here, inode → handle.
    implicit: HashMap<u64, u64>,
}

impl State {
    fn alloc(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

/// The filesystem core over one inventory.
pub struct Core {
    inv: Arc<Inventory>,
    opts: MountOptions,
    st: Mutex<State>,
    inval: Mutex<Option<mpsc::Sender<Inval>>>,
    /// One commit at a time: two flushes of one open file (duplicated
    /// descriptors closed together) must not both commit its buffer.
    commit_lock: Mutex<()>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Core({:?})", self.inv)
    }
}

/// How a file was opened.
#[derive(Debug, Clone, Copy)]
pub struct Opened {
    /// File handle.
    pub fh: u64,
    /// Bypass the page cache (plaintext of secrets is not cached by default).
    pub direct_io: bool,
    /// Read-only open: close needs no flush.
    pub read_only: bool,
}

fn with_ino(mut a: Attr, raw: u64) -> (Attr, u64) {
    let r = raw;
    a.ino = Ino::from_raw(raw).unwrap_or(a.ino);
    (a, r)
}

impl Core {
    /// A core serving `inv`.
    pub fn new(inv: Arc<Inventory>, opts: MountOptions) -> Self {
        let read_only = opts.read_only || inv.is_read_only();
        Core {
            inv,
            opts: MountOptions { read_only, ..opts },
            st: Mutex::new(State::default()),
            commit_lock: Mutex::new(()),
            inval: Mutex::new(None),
        }
    }

    /// The inventory.
    pub fn inventory(&self) -> &Arc<Inventory> {
        &self.inv
    }

    /// Options in force.
    pub fn options(&self) -> &MountOptions {
        &self.opts
    }

    /// Where invalidations go (set by the FUSE adapter once the session exists).
    pub fn set_invalidator(&self, tx: mpsc::Sender<Inval>) {
        *self.inval.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalidate(&self, items: Vec<Inval>) {
        if let Some(tx) = self
            .inval
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            for i in items {
                let _ = tx.send(i);
            }
        }
    }

    /// Another host changed the shared store: make the kernel forget what
    /// it cached of the entries concerned (names, attributes, and in
    /// `--cache` mode the page cache), so the next access sees the change.
    pub fn remote_changes(&self, changes: &[crate::inventory::Changed]) {
        use crate::inventory::Changed;
        let mut v = Vec::new();
        for c in changes {
            match c {
                Changed::Dirent { parent, name } => {
                    v.extend(self.inval_name(Ino::Node(*parent).raw(), name, &[]));
                }
                Changed::Node { id, before, after } => {
                    let id = *id;
                    v.push(Inval::Inode(Ino::Node(id).raw()));
                    v.push(Inval::Inode(Ino::Pub(id).raw()));
                    v.push(Inval::Inode(Ino::Old(id).raw()));
                    // Its name, when it appeared, went away or moved.
                    let place = |n: &Option<Box<crate::inventory::node::Node>>| {
                        n.as_ref().map(|n| (n.parent, n.name.clone()))
                    };
                    if place(before) != place(after) {
                        for n in before.iter().chain(after.iter()) {
                            v.extend(self.inval_name(Ino::Node(n.parent).raw(), &n.name, &[]));
                        }
                    }
                    // Versions that left `<name>.old/` (rolled back, destroyed)
                    // or whose attributes changed. New ones need nothing: the
                    // kernel does not cache names it never saw.
                    let versions = |n: &Option<Box<crate::inventory::node::Node>>| {
                        n.as_ref()
                            .and_then(|n| n.key().cloned())
                            .map(|k| k.archived)
                            .unwrap_or_default()
                    };
                    let (old, new) = (versions(before), versions(after));
                    for ver in old.iter().filter(|o| !new.contains(o)) {
                        v.push(Inval::Inode(Ino::Ver(id, ver.ver).raw()));
                        v.push(Inval::Entry(
                            Ino::Old(id).raw(),
                            format_ts(ver.archived_at).into_bytes(),
                        ));
                    }
                    let attrs_changed = match (before, after) {
                        (Some(b), Some(a)) => (b.perm, b.uid, b.gid) != (a.perm, a.uid, a.gid),
                        _ => false,
                    };
                    if attrs_changed {
                        // Archived versions take their owner and mode from the key.
                        v.extend(
                            new.iter()
                                .map(|ver| Inval::Inode(Ino::Ver(id, ver.ver).raw())),
                        );
                    }
                }
            }
        }
        v.dedup();
        self.invalidate(v);
    }

    /// Invalidations for a change to `name` in `parent` (and its history and derived public key).
    fn inval_name(&self, parent: u64, name: &[u8], inos: &[u64]) -> Vec<Inval> {
        let mut v = vec![Inval::Entry(parent, name.to_vec())];
        let mut old = name.to_vec();
        old.extend_from_slice(b".old");
        v.push(Inval::Entry(parent, old));
        if let Some(p) = kinds::public_name(name) {
            v.push(Inval::Entry(parent, p.to_vec()));
        }
        if let Some(p) = kinds::private_name(name) {
            v.push(Inval::Entry(parent, p.to_vec()));
        }
        v.extend(inos.iter().map(|i| Inval::Inode(*i)));
        v.push(Inval::Inode(parent));
        v
    }

    fn check_rw(&self) -> Result<()> {
        if self.opts.read_only {
            return err(
                Kind::ReadOnly,
                "mounted read-only; remount without --read-only to change keys",
            );
        }
        self.inv.check_reachable()
    }

    fn resolve(&self, raw: u64) -> Result<Ino> {
        if let Some(i) = self.state().forward.get(&raw) {
            return Ok(*i);
        }
        Ino::from_raw(raw)
            .ok_or_else(|| Error::new(Kind::NotFound, format!("inode {raw} is not known")))
    }

    fn staged_attr(s: &Staged, raw: u64) -> Attr {
        Attr {
            ino: Ino::from_raw(raw).expect("staged ino"),
            ftype: FType::File,
            size: s.data.len() as u64,
            perm: s.perm,
            nlink: 1,
            uid: s.uid,
            gid: s.gid,
            atime: s.mtime,
            mtime: s.mtime,
            ctime: s.ctime,
        }
    }

    /// In the Acra layout, translate a top-level name to (directory, name) of
    /// the tree; `ensure_client` creates `clients/<ClientID>/` when a key of a
    /// new client is written. Everything else passes through unchanged.
    fn map_top(
        &self,
        parent: u64,
        name: &[u8],
        ensure_client: bool,
        ctx: Option<&Ctx>,
    ) -> Result<(u64, Vec<u8>)> {
        if !self.opts.acra || parent != node::ROOT || name == b".keyfs" {
            return Ok((parent, name.to_vec()));
        }
        match acra::map(name) {
            acra::Mapped::Dir(id) => {
                let (_, n) = self.inv.parent_and_name(Ino::Node(id));
                Ok((node::ROOT, n))
            }
            acra::Mapped::InDir(dir, n) => Ok((dir, n)),
            acra::Mapped::Client(c, n) => {
                let clients = Ino::Node(node::CLIENTS);
                let dir = match self.inv.lookup(clients, c.as_str().as_bytes()) {
                    Ok(Ino::Node(d)) => d,
                    Err(e) if e.kind() == Kind::NotFound && ensure_client => {
                        let ctx = ctx.cloned().unwrap_or_else(Ctx::this_process);
                        match self.inv.mkdir(
                            clients,
                            c.as_str().as_bytes(),
                            NewAttrs {
                                perm: 0o700,
                                uid: ctx.uid,
                                gid: ctx.gid,
                            },
                            false,
                            &ctx,
                        )? {
                            Ino::Node(d) => d,
                            _ => {
                                return err(Kind::Store, "client directory has an unexpected inode")
                            }
                        }
                    }
                    Err(e) => return Err(e),
                    Ok(_) => {
                        return err(
                            Kind::NotDir,
                            format!("clients/{} is not a directory", c.as_str()),
                        )
                    }
                };
                Ok((dir, n))
            }
            acra::Mapped::Unmapped => Ok((parent, name.to_vec())),
        }
    }

    /// Acra layout: the top-level listing under Acra v1 names.
    fn acra_root(&self) -> Result<Vec<DirEntry>> {
        let mut out = vec![DirEntry {
            name: b".poison_key".to_vec(),
            ino: Ino::Node(node::POISON),
            ftype: FType::Dir,
        }];
        for e in self.inv.readdir(Ino::Node(node::AUDIT_DIR))? {
            if e.name.starts_with(b"secure_log_key") {
                out.push(e);
            }
        }
        for c in self.inv.readdir(Ino::Node(node::CLIENTS))? {
            if c.ftype != FType::Dir {
                continue;
            }
            for e in self.inv.readdir(c.ino)? {
                if let Some(n) = acra::client_name(&c.name, &e.name) {
                    out.push(DirEntry { name: n, ..e });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `link(2)`: only Acra v1's writer step — the current file linked into its
    /// own `<file>.old/<ts>` — which names the archive entry of the rotation
    /// that follows. Everything else is EPERM.
    pub fn link(&self, raw: u64, newparent: u64, newname: &[u8]) -> Result<(Attr, u64)> {
        self.check_rw()?;
        let ino = self.resolve(raw)?;
        let dir = self.resolve(newparent)?;
        match (self.opts.acra, ino, dir) {
            (true, Ino::Node(id), Ino::Old(kid)) if id == kid => {
                let ts = acra::parse_archive_name(newname).ok_or_else(|| {
                    Error::new(Kind::Invalid, format!("{}: archive names are timestamps (2006-01-02T15:04:05.999999999)", String::from_utf8_lossy(newname)))
                })?;
                self.inv.set_next_archive(id, ts)?;
                self.state().links.insert((id, newname.to_vec()), ts);
                let (mut a, r) = self.getattr(raw)?;
                a.nlink = 2;
                Ok((a, r))
            }
            _ => err(Kind::Perm, "hard links are not supported (only Acra v1's link of a key into its own history, with --layout=acra-v1)"),
        }
    }

    /// Attributes of `raw`, reflecting uncommitted writes of open handles.
    pub fn getattr(&self, raw: u64) -> Result<(Attr, u64)> {
        let ino = self.resolve(raw)?;
        {
            let st = self.state();
            if let Ino::Staged(_) = ino {
                if let Some(s) = st.staged.get(&raw) {
                    return Ok((Self::staged_attr(s, raw), raw));
                }
                for h in st.handles.values() {
                    if h.ino == raw {
                        if let Target::New { attrs, .. } = &h.target {
                            let nlink = if h.discarded { 0 } else { 1 };
                            // Times of a file being created are those of its creation.
                            let now = h
                                .touched
                                .or(h.snapshot.as_ref().map(|a| a.mtime))
                                .unwrap_or_else(now_ns);
                            let a = Attr {
                                ino,
                                ftype: FType::File,
                                size: h.data.len() as u64,
                                perm: attrs.perm,
                                nlink,
                                uid: attrs.uid,
                                gid: attrs.gid,
                                atime: now,
                                mtime: now,
                                ctime: now,
                            };
                            return Ok((a, raw));
                        }
                    }
                }
                return err(Kind::NotFound, "this file is gone (it was never committed)");
            }
        }
        let mut a = match self.inv.attr(ino) {
            Ok(a) => a,
            Err(e) if e.kind() == Kind::NotFound => {
                // Unlinked while open: fstat on the descriptor still answers.
                let st = self.state();
                let h = st
                    .handles
                    .values()
                    .find(|h| h.ino == raw && h.snapshot.is_some())
                    .ok_or(e)?;
                let mut a = h.snapshot.clone().expect("checked");
                a.nlink = 0;
                a.size = h.data.len() as u64;
                return Ok((a, raw));
            }
            Err(e) => return Err(e),
        };
        if self.opts.cache && matches!(ino, Ino::Special(_)) && a.ftype == FType::File {
            // Without open there is no direct I/O: the page cache needs the real size.
            a.size = self
                .inv
                .read(ino, &Ctx::this_process())
                .map(|d| d.len() as u64)
                .unwrap_or(0);
        }
        if self.opts.acra && ino == Ino::Node(node::ROOT) {
            a.perm = 0o700; // Acra refuses a keystore directory that is not exactly 0700
        }
        if self.opts.sealed && a.ftype == FType::File && matches!(ino, Ino::Node(_) | Ino::Ver(..))
        {
            a.size = self.inv.sealed_size(ino)?;
        }
        let st = self.state();
        if let Some(h) = st.handles.values().find(|h| {
            h.dirty && (h.written || h.resized) && matches!(h.target, Target::Ino(i) if i == ino)
        }) {
            a.size = h.data.len() as u64;
            if let Some(t) = h.touched {
                a.mtime = t;
                a.ctime = t;
            }
        }
        Ok(with_ino(a, raw))
    }

    /// Look `name` up in `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<(Attr, u64)> {
        if name.len() > 255 {
            return err(Kind::NameTooLong, "a name is at most 255 bytes");
        }
        if self.opts.acra
            && parent == node::ROOT
            && self
                .state()
                .staged
                .values()
                .all(|s| !(s.dir == Ino::Node(node::ROOT) && s.name == name))
        {
            let (p, n) = self.map_top(parent, name, false, None)?;
            if p != parent || n != name {
                return self.lookup(p, &n);
            }
        }
        let p = self.resolve(parent)?;
        if let Ino::Old(kid) = p {
            // Acra's hard link of the current file, until the rotation that follows.
            if self.state().links.contains_key(&(kid, name.to_vec())) {
                let (mut a, r) = self.getattr(Ino::Node(kid).raw())?;
                a.nlink = 2;
                return Ok((a, r));
            }
        }
        {
            // A file being created is visible (empty) to lookups from creation on.
            let st = self.state();
            let pending = st.handles.values().find(|h| !h.discarded && matches!(&h.target, Target::New { parent: pp, name: n, .. } if *pp == p && n == name));
            if let Some(h) = pending {
                let raw = h.ino;
                drop(st);
                return self.getattr(raw);
            }
        }
        {
            let st = self.state();
            if let Some((raw, s)) = st.staged.iter().find(|(_, s)| s.dir == p && s.name == name) {
                return Ok((Self::staged_attr(s, *raw), *raw));
            }
        }
        let ino = self.inv.lookup(p, name)?;
        if self.opts.sealed && matches!(ino, Ino::Pub(_)) {
            // Derived public keys are not stored: the sealed view has nothing to show.
            return err(
                Kind::NotFound,
                "derived public keys are not part of the sealed view",
            );
        }
        self.getattr(ino.raw())
    }

    /// Directory listing (without `.` and `..`).
    pub fn readdir(&self, raw: u64) -> Result<Vec<DirEntry>> {
        let ino = self.resolve(raw)?;
        let mut out = if self.opts.acra && ino == Ino::Node(node::ROOT) {
            self.acra_root()?
        } else {
            self.inv.readdir(ino)?
        };
        if self.opts.sealed {
            out.retain(|e| !matches!(e.ino, Ino::Pub(_)));
        }
        {
            let st = self.state();
            for (r, s) in st.staged.iter().filter(|(_, s)| s.dir == ino) {
                out.push(DirEntry {
                    name: s.name.clone(),
                    ino: Ino::from_raw(*r).expect("staged"),
                    ftype: FType::File,
                });
            }
        }
        Ok(out)
    }

    /// Target of a symlink.
    pub fn readlink(&self, raw: u64) -> Result<Vec<u8>> {
        self.inv.readlink(self.resolve(raw)?)
    }

    /// Create and open a new file. Nothing is visible to others until it is
    /// committed at close/fsync.
    pub fn create(
        &self,
        parent: u64,
        name: &[u8],
        perm: u16,
        flags: i32,
        ctx: Ctx,
    ) -> Result<(Attr, u64, Opened)> {
        self.check_rw()?;
        validate_component(name)?;
        let (parent, name) = &self.map_top(parent, name, true, Some(&ctx))?;
        let (parent, name) = (*parent, name.as_slice());
        let p = self.resolve(parent)?;
        if let Ok((_, raw)) = self.lookup(parent, name) {
            // A derived public key accepts its identical content even from an
            // exclusive create: `cp -a` and tar restore storage.pub after storage.
            let derived = matches!(Ino::from_raw(raw), Some(Ino::Pub(_)));
            if flags & libc::O_EXCL != 0 && !derived {
                return err(
                    Kind::Exists,
                    format!(
                        "{}/{} already exists",
                        self.inv.ino_path(p),
                        String::from_utf8_lossy(name)
                    ),
                );
            }
            let o = self.open(raw, flags, ctx)?;
            let (a, raw) = self.getattr(raw)?;
            return Ok((a, raw, o));
        }
        let now = now_ns();
        let mut st = self.state();
        let raw = Ino::Staged(st.alloc()).raw();
        let fh = st.alloc();
        let attrs = NewAttrs {
            perm,
            uid: ctx.uid,
            gid: ctx.gid,
        };
        let acra_temp = self.opts.acra
            && p == Ino::Node(node::ROOT)
            && acra::map(name) == acra::Mapped::Unmapped
            && name != b".keyfs";
        let target = match p {
            Ino::Node(_) if acra_temp => {
                // Acra's writer's temporary file: kept in memory until renamed to a key name.
                st.staged.insert(
                    raw,
                    Staged {
                        dir: p,
                        name: name.to_vec(),
                        data: SecretBytes::default(),
                        perm: perm & 0o600,
                        uid: ctx.uid,
                        gid: ctx.gid,
                        mtime: now,
                        ctime: now,
                        post: SetAttr::default(),
                    },
                );
                Target::Staged(raw)
            }
            Ino::Old(kid) if parse_ts(name).is_none() => {
                // A temp file of a backup tool inside a history directory.
                st.staged.insert(
                    raw,
                    Staged {
                        dir: Ino::Old(kid),
                        name: name.to_vec(),
                        data: SecretBytes::default(),
                        perm: perm & 0o600,
                        uid: ctx.uid,
                        gid: ctx.gid,
                        mtime: now,
                        ctime: now,
                        post: SetAttr::default(),
                    },
                );
                Target::Staged(raw)
            }
            _ => {
                drop(st);
                self.inv.check_new_file(p, name)?;
                st = self.state();
                Target::New {
                    parent: p,
                    name: name.to_vec(),
                    attrs: NewAttrs {
                        perm: kinds_cap(name, perm),
                        ..attrs
                    },
                }
            }
        };
        let a = Attr {
            ino: Ino::from_raw(raw).expect("staged"),
            ftype: FType::File,
            size: 0,
            perm: kinds_cap(name, perm),
            nlink: 1,
            uid: ctx.uid,
            gid: ctx.gid,
            atime: now,
            mtime: now,
            ctime: now,
        };
        st.handles.insert(
            fh,
            Handle {
                ino: raw,
                target,
                data: SecretBytes::default(),
                write: true,
                dirty: true,
                written: false,
                failed: false,
                amend: None,
                discarded: false,
                refused: None,
                touched: None,
                resized: false,
                snapshot: Some(a.clone()),
                post: SetAttr::default(),
                ctx,
            },
        );
        Ok((
            a,
            raw,
            Opened {
                fh,
                direct_io: !self.opts.cache,
                read_only: false,
            },
        ))
    }

    /// Open an existing file.
    pub fn open(&self, raw: u64, flags: i32, ctx: Ctx) -> Result<Opened> {
        let ino = self.resolve(raw)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let trunc = write && flags & libc::O_TRUNC != 0;
        if write {
            self.check_rw()?;
        }
        let (target, data) = match ino {
            Ino::Staged(_) => {
                let st = self.state();
                let s = st
                    .staged
                    .get(&raw)
                    .ok_or_else(|| Error::new(Kind::NotFound, "this file is gone"))?;
                (
                    Target::Staged(raw),
                    if trunc {
                        SecretBytes::default()
                    } else {
                        s.data.clone()
                    },
                )
            }
            Ino::Ver(..) | Ino::Special(_) if write => {
                return err(Kind::ReadOnly, format!("{} is read-only; to make an archived version current, `mv` it over its key", self.inv.ino_path(ino)));
            }
            Ino::Old(_) => return err(Kind::IsDir, "is a directory"),
            _ => {
                let data = if trunc {
                    SecretBytes::default()
                } else if self.opts.sealed && matches!(ino, Ino::Node(_) | Ino::Ver(..)) {
                    SecretBytes::new(self.inv.export_sealed(ino, &ctx)?)
                } else {
                    self.inv.read(ino, &ctx)?
                };
                (Target::Ino(ino), data)
            }
        };
        let snapshot = self.inv.attr(ino).ok().map(|a| with_ino(a, raw).0);
        let mut st = self.state();
        let fh = st.alloc();
        st.handles.insert(
            fh,
            Handle {
                ino: raw,
                target,
                data,
                write,
                dirty: trunc,
                written: false,
                failed: false,
                amend: None,
                discarded: false,
                refused: None,
                touched: None,
                resized: false,
                snapshot,
                post: SetAttr::default(),
                ctx,
            },
        );
        // .keyfs files report size 0, so they must bypass the page cache to be readable.
        let direct_io = !self.opts.cache || matches!(ino, Ino::Special(_));
        Ok(Opened {
            fh,
            direct_io,
            read_only: !write,
        })
    }

    /// `--cache` mode read without a file handle (the kernel fills its page
    /// cache; the daemon sees only misses, each audited).
    pub fn read_ino(&self, raw: u64, offset: u64, size: u32, ctx: Ctx) -> Result<Vec<u8>> {
        let open = {
            let st = self.state();
            st.implicit.get(&raw).copied().or_else(|| {
                st.handles
                    .iter()
                    .find(|(_, h)| h.ino == raw && !matches!(h.target, Target::Ino(_)))
                    .map(|(f, _)| *f)
            })
        };
        if let Some(fh) = open {
            // A truncate waiting for its write, or a file still being created.
            return self.read(fh, offset, size);
        }
        let ino = self.resolve(raw)?;
        let data = if self.opts.sealed && matches!(ino, Ino::Node(_) | Ino::Ver(..)) {
            SecretBytes::new(self.inv.export_sealed(ino, &ctx)?)
        } else {
            self.inv.read(ino, &ctx)?
        };
        Ok(slice(data.expose(), offset, size))
    }

    fn implicit_handle(&self, raw: u64, ctx: &Ctx, truncate_to: Option<usize>) -> Result<u64> {
        if let Some(fh) = self.state().implicit.get(&raw).copied() {
            return Ok(fh);
        }
        let ino = self.resolve(raw)?;
        if matches!(ino, Ino::Ver(..) | Ino::Special(_)) {
            return err(
                Kind::ReadOnly,
                format!("{} is read-only", self.inv.ino_path(ino)),
            );
        }
        let data = match truncate_to {
            Some(0) => SecretBytes::default(),
            _ => self.inv.read(ino, ctx)?,
        };
        let mut st = self.state();
        let fh = st.alloc();
        st.handles.insert(
            fh,
            Handle {
                ino: raw,
                target: Target::Ino(ino),
                data,
                write: true,
                dirty: false,
                written: false,
                failed: false,
                amend: None,
                discarded: false,
                refused: None,
                touched: None,
                resized: false,
                snapshot: None,
                post: SetAttr::default(),
                ctx: ctx.clone(),
            },
        );
        st.implicit.insert(raw, fh);
        Ok(fh)
    }

    /// `--cache` mode write without a file handle: with no open and no flush
    /// from the kernel, each write(2) is committed as one rotation (a pending
    /// truncate, as from `O_TRUNC`, is applied first).
    pub fn write_ino(&self, raw: u64, offset: u64, data: &[u8], ctx: Ctx) -> Result<u32> {
        self.check_rw()?;
        let fh = self.implicit_handle(raw, &ctx, None)?;
        let r = self
            .write(fh, offset, data)
            .and_then(|n| self.commit(fh).map(|_| n));
        let mut st = self.state();
        st.implicit.remove(&raw);
        st.handles.remove(&fh);
        r
    }

    /// Read from an open handle.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let st = self.state();
        let h = st
            .handles
            .get(&fh)
            .ok_or_else(|| Error::new(Kind::Invalid, "bad file handle"))?;
        Ok(slice(h.data.expose(), offset, size))
    }

    /// Write into an open handle's buffer (committed at close/fsync).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let mut st = self.state();
        let h = st
            .handles
            .get_mut(&fh)
            .ok_or_else(|| Error::new(Kind::Invalid, "bad file handle"))?;
        if !h.write {
            return err(Kind::Perm, "file is not open for writing");
        }
        let end = offset as usize + data.len();
        if end > MAX_SECRET {
            h.failed = true;
            // Undo the empty version this open file committed at an early close.
            if let (Some((id, ver)), false) = (h.amend.take(), h.discarded) {
                let ctx = h.ctx.clone();
                drop(st);
                if let Err(e) = self.inv.undo_empty_current(id, ver, &ctx) {
                    log::warn!("undoing an empty commit after a refused write: {e}");
                }
            }
            return err(
                Kind::TooBig,
                format!("a key or secret is at most 64 KiB; this write would make it {end} bytes; nothing will be committed from this open file"),
            );
        }
        h.data.write_at(offset as usize, data);
        h.dirty = true;
        h.written = true;
        h.touched = Some(now_ns());
        Ok(data.len() as u32)
    }

    /// `close` (flush): commit. A handle that was only created or truncated
    /// (no write yet) is committed too, so `close` returns with the file in
    /// the store and its times final; if its (empty) content is invalid for
    /// its kind the error is returned and the commit waits for a write.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let pending = {
            let st = self.state();
            if st.handles.get(&fh).is_some_and(|h| h.failed) {
                return Self::failed_err();
            }
            match st.handles.get(&fh) {
                Some(h) if h.dirty && !h.written => Some((h.data.clone(), self.name_of(&h.target))),
                _ => None,
            }
        };
        if self.opts.sealed && pending.is_some() {
            return Ok(()); // sealed files are checked whole when they are committed
        }
        if let Some((data, Some(name))) = pending {
            kinds::validate(
                kinds::KeyKind::for_name(&name),
                data.expose(),
                &String::from_utf8_lossy(&name),
            )?;
        }
        if let Some(e) = self
            .state()
            .handles
            .get(&fh)
            .and_then(|h| h.refused.clone())
        {
            return Err(e);
        }
        let r = self.commit(fh);
        if let Err(e) = &r {
            self.drop_refused_new(fh, e);
        }
        r
    }

    /// A new file whose content was refused at close: free its name now,
    /// not when the kernel's asynchronous RELEASE arrives, so that an
    /// immediate retry (`cp` creates with O_CREAT|O_EXCL) does not get EEXIST.
    fn drop_refused_new(&self, fh: u64, why: &Error) {
        let mut st = self.state();
        let Some(h) = st.handles.get_mut(&fh) else {
            return;
        };
        let Target::New { parent, name, .. } = &h.target else {
            return;
        };
        let inv = vec![
            Inval::Entry(parent.raw(), name.clone()),
            Inval::Inode(h.ino),
        ];
        h.discarded = true;
        h.refused = Some(why.clone());
        drop(st);
        self.invalidate(inv);
    }

    fn name_of(&self, t: &Target) -> Option<Vec<u8>> {
        match t {
            Target::New { name, .. } => Some(name.clone()),
            Target::Ino(i @ Ino::Node(_)) => Some(self.inv.parent_and_name(*i).1),
            _ => None,
        }
    }

    fn failed_err() -> Result<()> {
        err(
            Kind::TooBig,
            "a write to this file was refused (a key or secret is at most 64 KiB); nothing was changed",
        )
    }

    /// Commit a handle's buffer if it changed (fsync, release).
    pub fn commit(&self, fh: u64) -> Result<()> {
        let _one_at_a_time = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (target, data, ctx, raw, post, amend, written, created) = {
            let st = self.state();
            let Some(h) = st.handles.get(&fh) else {
                return Ok(());
            };
            if h.failed {
                return Self::failed_err();
            }
            if !h.dirty || h.discarded {
                return Ok(());
            }
            let t = match &h.target {
                Target::Ino(i) => Target::Ino(*i),
                Target::New {
                    parent,
                    name,
                    attrs,
                } => Target::New {
                    parent: *parent,
                    name: name.clone(),
                    attrs: *attrs,
                },
                Target::Staged(r) => Target::Staged(*r),
            };
            (
                t,
                h.data.clone(),
                h.ctx.clone(),
                h.ino,
                h.post,
                h.amend,
                h.written,
                h.touched.or(h.snapshot.as_ref().map(|a| a.mtime)),
            )
        };
        let was_empty = data.is_empty();
        let committed = match target {
            Target::Staged(r) => {
                let mut st = self.state();
                if let Some(s) = st.staged.get_mut(&r) {
                    s.data = data;
                    s.mtime = now_ns();
                }
                None
            }
            Target::Ino(ino) => {
                let replaced = match (ino, amend) {
                    (Ino::Node(id), Some((aid, ver))) if aid == id => {
                        self.inv.replace_empty_current(id, ver, &data, &ctx)?
                    }
                    _ => false,
                };
                let r = if replaced {
                    ino
                } else if self.opts.sealed {
                    let (parent, name) = self.inv.parent_and_name(ino);
                    self.inv.import_sealed(
                        Ino::Node(parent),
                        &name,
                        data.expose(),
                        NewAttrs {
                            perm: 0o600,
                            uid: ctx.uid,
                            gid: ctx.gid,
                        },
                        &ctx,
                    )?
                } else {
                    self.inv.write_existing(ino, &data, &ctx)?
                };
                let (parent, name) = self.inv.parent_and_name(ino);
                self.invalidate(self.inval_name(parent, &name, &[raw, ino.raw()]));
                Some(r)
            }
            Target::New {
                parent,
                name,
                attrs,
            } => {
                let r = if self.opts.sealed {
                    match self
                        .inv
                        .import_sealed(parent, &name, data.expose(), attrs, &ctx)
                    {
                        // A backup tool's temp name (".name.XXXXXX"): keep the file
                        // in memory until it is renamed to the path it belongs to.
                        Err(e)
                            if e.kind() == Kind::Invalid
                                && name.starts_with(b".")
                                && !data.is_empty() =>
                        {
                            let now = now_ns();
                            let mut st = self.state();
                            st.staged.insert(
                                raw,
                                Staged {
                                    dir: parent,
                                    name: name.clone(),
                                    data,
                                    perm: attrs.perm,
                                    uid: attrs.uid,
                                    gid: attrs.gid,
                                    mtime: now,
                                    ctime: now,
                                    post: SetAttr::default(),
                                },
                            );
                            if let Some(h) = st.handles.get_mut(&fh) {
                                h.target = Target::Staged(raw);
                                h.dirty = false;
                                h.written = false;
                            }
                            return Ok(());
                        }
                        other => other?,
                    }
                } else {
                    self.inv
                        .write_new_at(parent, &name, &data, attrs, created, &ctx)?
                };
                self.state().forward.insert(raw, r);
                self.invalidate(self.inval_name(parent.raw(), &name, &[raw]));
                Some(r)
            }
        };
        {
            let mut st = self.state();
            let empty_commit = !written && was_empty;
            let current = match committed {
                Some(Ino::Node(id)) if empty_commit => {
                    self.inv.current_version(id).map(|v| (id, v))
                }
                _ => None,
            };
            if let Some(h) = st.handles.get_mut(&fh) {
                h.dirty = false;
                h.written = false;
                h.touched = None;
                h.resized = false;
                h.post = SetAttr::default();
                h.amend = current;
                if let Some(r) = committed {
                    h.target = Target::Ino(r);
                }
            }
        }
        if let Some(r) = committed {
            if post.perm.is_some() || post.atime.is_some() || post.mtime.is_some() {
                // Attributes set on the open file before its content existed
                // in the store. The content is committed (and the handle
                // clean, so nothing is committed twice); a failure here is
                // reported but changes nothing else.
                self.inv.setattr(r, post, &ctx)?;
                self.invalidate(vec![Inval::Inode(raw), Inval::Inode(r.raw())]);
            }
        }
        Ok(())
    }

    /// Close a handle; commits if a flush did not.
    pub fn release(&self, fh: u64) -> Result<()> {
        let r = self.commit(fh);
        self.state().handles.remove(&fh);
        r
    }

    /// chmod/chown/utimens/truncate.
    pub fn setattr(
        &self,
        raw: u64,
        s: SetAttr,
        size: Option<u64>,
        fh: Option<u64>,
        ctx: Ctx,
    ) -> Result<(Attr, u64)> {
        let ino = self.resolve(raw)?;
        if let Some(size) = size {
            self.check_rw()?;
            if size as usize > MAX_SECRET {
                return err(Kind::TooBig, "a key or secret is at most 64 KiB");
            }
            let mut st = self.state();
            let handle = match fh.filter(|f| st.handles.get(f).is_some_and(|h| h.write)) {
                Some(f) => Some(f),
                None => st
                    .handles
                    .iter()
                    .find(|(_, h)| h.write && h.ino == raw)
                    .map(|(f, _)| *f),
            };
            if let Some(f) = handle {
                let h = st.handles.get_mut(&f).expect("found");
                // A truncate that changes nothing does not make a new version,
                // but it does update the times shown until the next commit.
                if h.data.len() != size as usize || size == 0 {
                    h.data.resize(size as usize);
                    h.dirty = true;
                }
                h.resized = true;
                h.touched = Some(now_ns());
            } else if self.opts.cache
                && !st.staged.contains_key(&raw)
                && matches!(ino, Ino::Node(_))
            {
                // No open reaches the daemon in --cache mode: keep the truncate
                // for the write that follows (O_TRUNC then write, as cp does).
                drop(st);
                let fh = self.implicit_handle(raw, &ctx, Some(size as usize))?;
                let mut st = self.state();
                if let Some(h) = st.handles.get_mut(&fh) {
                    h.data.resize(size as usize);
                    h.dirty = true;
                    h.touched = Some(now_ns());
                }
            } else if let Some(sf) = st.staged.get_mut(&raw) {
                sf.data.resize(size as usize);
            } else {
                drop(st);
                match ino {
                    Ino::Node(_) | Ino::Pub(_) => {
                        let mut data = self.inv.read(ino, &ctx)?;
                        if data.len() != size as usize {
                            data.resize(size as usize);
                            self.inv.write_existing(ino, &data, &ctx)?;
                            let (parent, name) = self.inv.parent_and_name(ino);
                            self.invalidate(self.inval_name(parent, &name, &[raw]));
                        }
                    }
                    Ino::Ver(..) | Ino::Special(_) => {
                        return err(Kind::ReadOnly, "archived versions are read-only")
                    }
                    _ => return err(Kind::IsDir, "not a file"),
                }
            }
        }
        if s.perm.is_some()
            || s.uid.is_some()
            || s.gid.is_some()
            || s.atime.is_some()
            || s.mtime.is_some()
        {
            let mut st = self.state();
            let now = now_ns();
            if let Some(sf) = st.staged.get_mut(&raw) {
                sf.perm = s.perm.unwrap_or(sf.perm) & 0o7777;
                sf.uid = s.uid.unwrap_or(sf.uid);
                sf.gid = s.gid.unwrap_or(sf.gid);
                sf.mtime = s.mtime.unwrap_or(sf.mtime);
                sf.ctime = now;
                sf.post.perm = s.perm.map(|p| p & 0o7777).or(sf.post.perm);
                sf.post.atime = s.atime.or(sf.post.atime);
                sf.post.mtime = s.mtime.or(sf.post.mtime);
            } else if let Some(h) = st
                .handles
                .values_mut()
                .find(|h| h.ino == raw && matches!(h.target, Target::New { .. }))
            {
                if let Target::New { attrs, .. } = &mut h.target {
                    attrs.perm = s.perm.unwrap_or(attrs.perm) & 0o7777;
                    attrs.uid = s.uid.unwrap_or(attrs.uid);
                    attrs.gid = s.gid.unwrap_or(attrs.gid);
                }
                // An explicit chmod is not capped like a creation mode, and
                // times must survive the commit: re-applied after it.
                h.post.perm = s.perm.map(|p| p & 0o7777).or(h.post.perm);
                h.post.atime = s.atime.or(h.post.atime);
                h.post.mtime = s.mtime.or(h.post.mtime);
            } else {
                drop(st);
                if !matches!(ino, Ino::Old(_) | Ino::Ver(..) | Ino::Pub(_)) {
                    self.check_rw()?;
                }
                self.inv.setattr(ino, s, &ctx)?;
                // Times set on a key whose new content is still buffered in
                // an open handle (`cp -p` over a key) must survive the
                // rotation committed at close.
                if s.atime.is_some() || s.mtime.is_some() {
                    let mut st = self.state();
                    for h in st
                        .handles
                        .values_mut()
                        .filter(|h| h.ino == raw && h.write && h.dirty)
                    {
                        h.post.atime = s.atime.or(h.post.atime);
                        h.post.mtime = s.mtime.or(h.post.mtime);
                    }
                }
                let mut inval = vec![Inval::Inode(raw)];
                if let Ino::Node(id) = ino {
                    // Archived versions take their owner and mode from the key:
                    // the kernel must forget what it cached about them too.
                    if let Ok(vs) = self.inv.readdir(Ino::Old(id)) {
                        inval.push(Inval::Inode(Ino::Old(id).raw()));
                        inval.extend(vs.into_iter().map(|e| Inval::Inode(e.ino.raw())));
                    }
                }
                self.invalidate(inval);
            }
        }
        self.getattr(raw)
    }

    /// mkdir.
    pub fn mkdir(&self, parent: u64, name: &[u8], perm: u16, ctx: Ctx) -> Result<(Attr, u64)> {
        self.check_rw()?;
        let (parent, name) = &self.map_top(parent, name, true, Some(&ctx))?;
        let (parent, name) = (*parent, name.as_slice());
        let p = self.resolve(parent)?;
        let ino = self.inv.mkdir(
            p,
            name,
            NewAttrs {
                perm,
                uid: ctx.uid,
                gid: ctx.gid,
            },
            self.opts.mkdir_generates,
            &ctx,
        )?;
        self.invalidate(self.inval_name(parent, name, &[]));
        let a = self.inv.attr(ino)?;
        Ok((a, ino.raw()))
    }

    /// unlink.
    pub fn unlink(&self, parent: u64, name: &[u8], ctx: Ctx) -> Result<()> {
        self.check_rw()?;
        let staged_here = self
            .state()
            .staged
            .values()
            .any(|s| s.dir == Ino::Node(parent) && s.name == name);
        let (parent, name) = &if staged_here {
            (parent, name.to_vec())
        } else {
            self.map_top(parent, name, false, None)?
        };
        let (parent, name) = (*parent, name.as_slice());
        if let Ok(Ino::Old(kid)) = self.resolve(parent) {
            // Unlinking Acra's hard link only forgets it (the key is untouched).
            let mut st = self.state();
            if st.links.remove(&(kid, name.to_vec())).is_some() {
                drop(st);
                self.inv.clear_next_archive(kid);
                return Ok(());
            }
        }
        let p = self.resolve(parent)?;
        {
            let mut st = self.state();
            if let Some(raw) = st
                .staged
                .iter()
                .find(|(_, s)| s.dir == p && s.name == name)
                .map(|(r, _)| *r)
            {
                st.staged.remove(&raw);
                return Ok(());
            }
        }
        {
            let mut st = self.state();
            let mut found = false;
            for h in st.handles.values_mut() {
                if !h.discarded
                    && matches!(&h.target, Target::New { parent: pp, name: n, .. } if *pp == p && n == name)
                {
                    h.discarded = true;
                    found = true;
                }
            }
            if found {
                return Ok(());
            }
        }
        let target = self.inv.lookup(p, name).ok();
        self.inv.unlink(p, name, &ctx)?;
        let inos: Vec<u64> = target.iter().map(|i| i.raw()).collect();
        let mut inval = self.inval_name(parent, name, &inos);
        if let Ino::Old(kid) = p {
            // The history directory itself changed (possibly now empty).
            let (gp, dir_name) = self.inv.parent_and_name(Ino::Old(kid));
            inval.push(Inval::Entry(gp, dir_name));
            inval.push(Inval::Inode(gp));
        }
        self.invalidate(inval);
        Ok(())
    }

    /// rmdir.
    pub fn rmdir(&self, parent: u64, name: &[u8], ctx: Ctx) -> Result<()> {
        self.check_rw()?;
        let (parent, name) = &self.map_top(parent, name, false, None)?;
        let (parent, name) = (*parent, name.as_slice());
        let p = self.resolve(parent)?;
        if let Ok(Ino::Old(kid)) = self.inv.lookup(p, name) {
            if self.state().staged.values().any(|s| s.dir == Ino::Old(kid)) {
                return err(
                    Kind::NotEmpty,
                    "the history directory holds files being written",
                );
            }
        }
        self.inv.rmdir(p, name, &ctx)?;
        self.invalidate(self.inval_name(parent, name, &[]));
        Ok(())
    }

    /// symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        ctx: Ctx,
    ) -> Result<(Attr, u64)> {
        self.check_rw()?;
        let p = self.resolve(parent)?;
        let ino = self.inv.symlink(
            p,
            name,
            target,
            NewAttrs {
                perm: 0o777,
                uid: ctx.uid,
                gid: ctx.gid,
            },
            &ctx,
        )?;
        let a = self.inv.attr(ino)?;
        Ok((a, ino.raw()))
    }

    /// rename, with keyfs's meanings (move, rotation, rollback, history import).
    pub fn rename(
        &self,
        p1: u64,
        n1: &[u8],
        p2: u64,
        n2: &[u8],
        noreplace: bool,
        ctx: Ctx,
    ) -> Result<()> {
        self.check_rw()?;
        validate_component(n2)?;
        let staged_src = self
            .state()
            .staged
            .values()
            .any(|s| s.dir == Ino::Node(p1) && s.name == n1);
        let (p1, n1) = &if staged_src {
            (p1, n1.to_vec())
        } else {
            self.map_top(p1, n1, false, None)?
        };
        let (p1, n1) = (*p1, n1.as_slice());
        let (p2, n2) = &self.map_top(p2, n2, true, Some(&ctx))?;
        let (p2, n2) = (*p2, n2.as_slice());
        let sp = self.resolve(p1)?;
        let dp = self.resolve(p2)?;
        // A staged temp file (history directory, or sealed view), renamed into place.
        {
            let staged = {
                let st = self.state();
                st.staged
                    .iter()
                    .find(|(_, s)| s.dir == sp && s.name == n1)
                    .map(|(r, _)| *r)
            };
            if let Some(raw) = staged {
                if dp != sp && !self.opts.sealed && !self.opts.acra {
                    return err(
                        Kind::Invalid,
                        "a file in a history directory can only be renamed within it",
                    );
                }
                let final_name = match dp {
                    Ino::Old(_) => parse_ts(n2).is_some(),
                    _ => !n2.starts_with(b"."),
                };
                if !final_name {
                    let mut st = self.state();
                    if let Some(s) = st.staged.get_mut(&raw) {
                        s.name = n2.to_vec();
                    }
                    return Ok(());
                }
                let data = self
                    .state()
                    .staged
                    .get(&raw)
                    .map(|s| s.data.clone())
                    .unwrap_or_default();
                if let Ok(existing) = self.inv.lookup(dp, n2) {
                    if noreplace {
                        return err(Kind::Exists, "archived version exists");
                    }
                    // Identical content over an existing archived version: accept (rsync re-run).
                    let same = match existing {
                        Ino::Ver(..) if self.opts.sealed => self
                            .inv
                            .export_sealed(existing, &ctx)
                            .is_ok_and(|e| e == data.expose()),
                        Ino::Ver(..) => self.inv.read(existing, &ctx)?.expose() == data.expose(),
                        _ => false,
                    };
                    if same {
                        let mut st = self.state();
                        st.staged.remove(&raw);
                        st.forward.insert(raw, existing);
                        return Ok(());
                    }
                    if matches!(existing, Ino::Ver(..)) {
                        return err(
                            Kind::Exists,
                            format!(
                                "{} exists; archived versions are immutable",
                                self.inv.ino_path(existing)
                            ),
                        );
                    }
                }
                let (perm, uid, gid, post) = self
                    .state()
                    .staged
                    .get(&raw)
                    .map(|s| (s.perm, s.uid, s.gid, s.post))
                    .unwrap_or((0o600, ctx.uid, ctx.gid, SetAttr::default()));
                let ino = if self.opts.sealed {
                    let ino = self.inv.import_sealed(
                        dp,
                        n2,
                        data.expose(),
                        NewAttrs { perm, uid, gid },
                        &ctx,
                    )?;
                    // The mode and times the tool set on its temp file (an
                    // explicit chmod is not capped like a creation mode).
                    // Archived versions take theirs from their key.
                    if !matches!(dp, Ino::Old(_))
                        && (post.perm.is_some() || post.atime.is_some() || post.mtime.is_some())
                    {
                        self.inv.setattr(ino, post, &ctx)?;
                    }
                    ino
                } else {
                    // Into a history directory: an archived version (its mode is 0400);
                    // elsewhere (Acra's temp file renamed over its key): an import or rotation.
                    let attrs = if matches!(dp, Ino::Old(_)) {
                        NewAttrs {
                            perm: 0o400,
                            uid: ctx.uid,
                            gid: ctx.gid,
                        }
                    } else {
                        NewAttrs { perm, uid, gid }
                    };
                    self.inv.write_new(dp, n2, &data, attrs, &ctx)?
                };
                let mut st = self.state();
                st.staged.remove(&raw);
                st.forward.insert(raw, ino);
                let mut inval = vec![
                    Inval::Entry(p2, n2.to_vec()),
                    Inval::Entry(p1, n1.to_vec()),
                    Inval::Inode(ino.raw()),
                ];
                if let Ino::Node(id) = ino {
                    // Acra's link into history has become the archived version.
                    let gone: Vec<_> = st.links.keys().filter(|(k, _)| *k == id).cloned().collect();
                    for key in gone {
                        st.links.remove(&key);
                        inval.push(Inval::Entry(Ino::Old(id).raw(), key.1));
                    }
                    inval.push(Inval::Entry(p2, [n2, b".old"].concat()));
                }
                drop(st);
                self.invalidate(inval);
                return Ok(());
            }
        }
        // A file still being created (its release, which commits it in --cache
        // mode, can come after the rename): commit it now.
        let creating: Vec<u64> = self.state().handles.iter().filter(|(_, h)| !h.discarded && matches!(&h.target, Target::New { parent, name, .. } if *parent == sp && name == n1)).map(|(f, _)| *f).collect();
        for fh in creating {
            self.commit(fh)?;
        }
        let src = self.inv.lookup(sp, n1)?;
        let dst_before = self.inv.lookup(dp, n2).ok();
        self.inv.rename(sp, n1, dp, n2, noreplace, &ctx)?;
        // The kernel now binds n2 to src's inode number: point that number at
        // whatever n2 is in keyfs (the rotated key, the rolled-back key…).
        if let Ok(after) = self.inv.lookup(dp, n2) {
            if after != src {
                self.state().forward.insert(src.raw(), after);
            }
        }
        let mut inv = self.inval_name(p1, n1, &[src.raw()]);
        inv.extend(self.inval_name(
            p2,
            n2,
            &dst_before.iter().map(|i| i.raw()).collect::<Vec<_>>(),
        ));
        if let Ino::Ver(kid, _) = src {
            inv.push(Inval::Inode(Ino::Node(kid).raw()));
        }
        self.invalidate(inv);
        Ok(())
    }

    /// Extended attributes (read-only).
    pub fn xattrs(&self, raw: u64) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let ino = self.resolve(raw)?;
        if matches!(ino, Ino::Staged(_)) {
            return Ok(Vec::new());
        }
        self.inv.xattrs(ino)
    }

    /// statfs: (blocks, bfree, bavail, files, ffree, bsize).
    pub fn statfs(&self) -> (u64, u64, u64, u64, u64, u32) {
        if self.inv.is_shared() {
            // The store is remote: report what it holds, and room to grow.
            let used = self.inv.size_on_disk().div_ceil(4096);
            let total = used.max(1) * 2 + 262_144;
            return (total, total - used, total - used, 1 << 32, 1 << 31, 4096);
        }
        match crate::sys::statvfs(self.inv.dir()) {
            Some((bsize, blocks, bfree, bavail, files, ffree)) => {
                (blocks, bfree, bavail, files, ffree, bsize as u32)
            }
            None => (0, 0, 0, 0, 0, 4096),
        }
    }

    /// Names of archived versions use this format (re-exported for the adapter's logs).
    pub fn version_name(ts: i64) -> String {
        format_ts(ts)
    }

    /// True when `name` is reserved for history directories.
    pub fn is_history_name(name: &[u8]) -> bool {
        history_of(name).is_some()
    }
}

/// Mode a new key file gets: at most owner read/write (public keys 0644).
fn kinds_cap(name: &[u8], perm: u16) -> u16 {
    if kinds::KeyKind::for_name(name).is_public() {
        perm & 0o644
    } else {
        perm & 0o600
    }
}

/// The bytes a read of `size` at `offset` returns (short at the end).
fn slice(d: &[u8], offset: u64, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(d.len());
    let end = start.saturating_add(size as usize).min(d.len());
    d[start..end].to_vec()
}
