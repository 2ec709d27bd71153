//! The thin fuser adapter: translate requests to [`Core`] calls and results
//! to replies. The only file that names `fuser::Reply*`.

use super::core::{Core, Inval, Opened};
use crate::error::Error;
use crate::inventory::audit::Ctx;
use crate::inventory::{Attr, FType, SetAttr};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The fuser `Filesystem` over a [`Core`].
#[derive(Debug)]
pub struct KeyFs {
    core: Arc<Core>,
}

impl KeyFs {
    /// Wrap a core.
    pub fn new(core: Arc<Core>) -> Self {
        KeyFs { core }
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn fail(op: &str, e: &Error) -> Errno {
    // Expected refusals are debug-level; integrity and store failures are errors.
    match e.kind() {
        crate::Kind::Integrity | crate::Kind::Store | crate::Kind::MasterKey => {
            log::error!("{op}: {e}")
        }
        crate::Kind::Invalid | crate::Kind::Perm | crate::Kind::TooBig => log::warn!("{op}: {e}"),
        _ => log::debug!("{op}: {e}"),
    }
    errno(e)
}

fn ts(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: TimeOrNow) -> i64 {
    match t {
        TimeOrNow::Now => crate::inventory::names::now_ns(),
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        },
    }
}

fn ftype(t: FType) -> FileType {
    match t {
        FType::Dir => FileType::Directory,
        FType::File => FileType::RegularFile,
        FType::Symlink => FileType::Symlink,
    }
}

fn file_attr(a: &Attr, raw: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(raw),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: ts(a.atime),
        mtime: ts(a.mtime),
        ctime: ts(a.ctime),
        crtime: ts(a.ctime),
        kind: ftype(a.ftype),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
        comm: crate::sys::process_name(req.pid()),
    }
}

fn root_ino(i: INodeNo) -> u64 {
    i.0
}

impl KeyFs {
    fn ttl(&self) -> Duration {
        self.core.options().ttl()
    }
    fn open_flags(&self, o: &Opened) -> FopenFlags {
        let mut f = FopenFlags::empty();
        if o.direct_io {
            f |= FopenFlags::FOPEN_DIRECT_IO;
        } else {
            f |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        if o.read_only {
            f |= FopenFlags::FOPEN_NOFLUSH;
        }
        f
    }
}

impl Filesystem for KeyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open (not as a separate truncate), so `cp` over a
        // key is one rotation at close.
        if self.core.options().cache {
            // No open reaches us, so O_TRUNC must come as a separate truncate.
            let _ = config.add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT);
        } else {
            let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(root_ino(parent), name.as_bytes()) {
            Ok((a, raw)) => reply.entry(&self.ttl(), &file_attr(&a, raw), Generation(0)),
            Err(e) => reply.error(fail("lookup", &e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0) {
            Ok((a, raw)) => reply.attr(&self.ttl(), &file_attr(&a, raw)),
            Err(e) => reply.error(fail("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            atime: atime.map(ns_of),
            mtime: mtime.map(ns_of),
        };
        match self.core.setattr(ino.0, s, size, fh.map(|f| f.0), ctx(req)) {
            Ok((a, raw)) => reply.attr(&self.ttl(), &file_attr(&a, raw)),
            Err(e) => reply.error(fail("setattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(fail("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        log::debug!("mknod {name:?} refused: keyfs holds keys, directories and symlinks only");
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self
            .core
            .mkdir(parent.0, name.as_bytes(), (mode & 0o7777) as u16, ctx(req))
        {
            Ok((a, raw)) => reply.entry(&self.ttl(), &file_attr(&a, raw), Generation(0)),
            Err(e) => reply.error(fail("mkdir", &e)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.unlink(parent.0, name.as_bytes(), ctx(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("unlink", &e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.rmdir(parent.0, name.as_bytes(), ctx(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rmdir", &e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match self.core.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            ctx(req),
        ) {
            Ok((a, raw)) => reply.entry(&self.ttl(), &file_attr(&a, raw), Generation(0)),
            Err(e) => reply.error(fail("symlink", &e)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.core.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            noreplace,
            ctx(req),
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("rename", &e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.core.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok((a, raw)) => reply.entry(&self.ttl(), &file_attr(&a, raw), Generation(0)),
            Err(e) => reply.error(fail("link", &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.core.options().cache {
            // --cache: ENOSYS tells the kernel (FUSE_NO_OPEN_SUPPORT) to stop
            // sending opens; reads are then served from its page cache.
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.core.open(ino.0, flags.0, ctx(req)) {
            Ok(o) => reply.opened(FileHandle(o.fh), self.open_flags(&o)),
            Err(e) => reply.error(fail("open", &e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = if fh.0 == 0 {
            self.core.read_ino(ino.0, offset, size, ctx(req))
        } else {
            self.core.read(fh.0, offset, size)
        };
        match r {
            Ok(d) => {
                let d = zeroize::Zeroizing::new(d);
                reply.data(&d)
            }
            Err(e) => reply.error(fail("read", &e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = if fh.0 == 0 {
            self.core.write_ino(ino.0, offset, data, ctx(req))
        } else {
            self.core.write(fh.0, offset, data)
        };
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("write", &e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.core.options().cache {
            // --cache: ENOSYS makes the kernel stop sending flushes (a close
            // costs no round trip); handle-less writes commit as they arrive,
            // created files at release.
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.core.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("close", &e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("release", &e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.commit(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.core.readdir(ino.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(fail("readdir", &e));
                return;
            }
        };
        let dots = [
            (ino.0, FileType::Directory, &b"."[..]),
            (ino.0, FileType::Directory, &b".."[..]),
        ];
        let all = dots.iter().map(|(i, t, n)| (*i, *t, n.to_vec())).chain(
            entries
                .into_iter()
                .map(|e| (e.ino.raw(), ftype(e.ftype), e.name)),
        );
        for (i, (raw, t, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(raw), (i + 1) as u64, t, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every directory change is already durable when its call returns.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, bfree, bavail, files, ffree, bsize) = self.core.statfs();
        reply.statfs(blocks, bfree, bavail, files, ffree, bsize, 255, bsize);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let attrs = match self.core.xattrs(ino.0) {
            Ok(a) => a,
            Err(e) => {
                reply.error(fail("getxattr", &e));
                return;
            }
        };
        match attrs.iter().find(|(n, _)| n.as_bytes() == name.as_bytes()) {
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() <= size as usize => reply.data(v),
            Some(_) => reply.error(Errno::ERANGE),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let attrs = match self.core.xattrs(ino.0) {
            Ok(a) => a,
            Err(e) => {
                reply.error(fail("listxattr", &e));
                return;
            }
        };
        let mut buf = Vec::new();
        for (n, _) in &attrs {
            buf.extend_from_slice(n.as_bytes());
            buf.push(0);
        }
        if size == 0 {
            reply.size(buf.len() as u32);
        } else if buf.len() <= size as usize {
            reply.data(&buf);
        } else {
            reply.error(Errno::ERANGE);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOTSUP);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes before calling us.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if mode & libc::S_IFMT != 0 && mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(Errno::EPERM);
            return;
        }
        // A created file is not in the store until it is committed at close: the
        // kernel must not cache its entry (a refused file must free its name at once).
        match self.core.create(
            parent.0,
            name.as_bytes(),
            (mode & 0o7777) as u16,
            flags,
            ctx(req),
        ) {
            Ok((a, raw, o)) => reply.created(
                &Duration::ZERO,
                &file_attr(&a, raw),
                Generation(0),
                FileHandle(o.fh),
                self.open_flags(&o),
            ),
            Err(e) => reply.error(fail("create", &e)),
        }
    }
}

/// Run cache invalidations on their own thread, after the replies they follow.
pub fn spawn_invalidator(notifier: fuser::Notifier) -> std::sync::mpsc::Sender<Inval> {
    let (tx, rx) = std::sync::mpsc::channel::<Inval>();
    std::thread::Builder::new()
        .name("keyfs-inval".into())
        .spawn(move || {
            for i in rx {
                let r = match &i {
                    Inval::Entry(parent, name) => {
                        notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
                    }
                    Inval::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                };
                if let Err(e) = r {
                    // ENOENT: the kernel had nothing cached — the common case.
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        log::debug!("cache invalidation {i:?}: {e}");
                    }
                }
            }
        })
        .expect("spawning the invalidation thread");
    tx
}
