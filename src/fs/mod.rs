//! The mounted view: `core` (filesystem logic, testable without the kernel)
//! and `fuse` (the thin fuser adapter), plus mount/unmount.

pub mod acra;
pub mod core;
pub mod fuse;

use crate::error::{err, Error, Kind, Result};
use crate::inventory::audit::{Ctx, Rec};
use crate::inventory::{Inventory, OpenOptions};
use crate::secret::MasterKey;
use std::path::Path;
use std::sync::Arc;

pub use self::core::{Core, MountOptions};

/// Refuse a missing, non-directory, non-empty or stale mountpoint.
pub fn check_mountpoint(mnt: &Path) -> Result<()> {
    match std::fs::metadata(mnt) {
        Ok(m) if !m.is_dir() => err(Kind::Usage, format!("mountpoint {} is not a directory", mnt.display())),
        Ok(_) => {
            let empty = std::fs::read_dir(mnt).map(|mut d| d.next().is_none()).unwrap_or(false);
            if empty {
                Ok(())
            } else {
                err(Kind::Usage, format!("mountpoint {} is not empty; keyfs mounts only on an empty directory (is keyfs already mounted there? see `mount | grep keyfs`)", mnt.display()))
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => err(
            Kind::Usage,
            format!("{} is a stale mount (Transport endpoint is not connected: its daemon died); run `keyfs umount {}` and mount again", mnt.display(), mnt.display()),
        ),
        Err(e) => err(Kind::Usage, format!("mountpoint {} is not usable: {e}; create it with `mkdir -p {}`", mnt.display(), mnt.display())),
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set; pthread_sigmask
    // only changes this thread's mask (inherited by threads spawned afterwards).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Serve `store` at `mnt` in the foreground until SIGINT/SIGTERM or an
/// external unmount.
pub fn mount(store: &Path, mnt: &Path, master: &MasterKey, opts: MountOptions) -> Result<()> {
    crate::sys::harden_process();
    check_mountpoint(mnt)?;
    let inv = Arc::new(Inventory::open(
        store,
        master,
        OpenOptions {
            read_only: opts.read_only,
        },
    )?);
    let ctx = Ctx::this_process();
    let core = Arc::new(Core::new(inv.clone(), opts.clone()));
    let root = crate::sys::geteuid() == 0;
    let mut mo = vec![
        fuser::MountOption::FSName(format!("keyfs:{}", store.display())),
        fuser::MountOption::Subtype("keyfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
    ];
    if opts.read_only {
        mo.push(fuser::MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = mo;
    config.acl = if root {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(4);
    let sigset = block_signals();
    let session = fuser::Session::new(fuse::KeyFs::new(core.clone()), mnt, &config).map_err(|e| {
        Error::new(Kind::Store, format!("cannot mount at {}: {e}; is fuse3 installed and /dev/fuse present? (without root, fusermount3 must be setuid)", mnt.display()))
    })?;
    core.set_invalidator(fuse::spawn_invalidator(session.notifier()));
    if inv.is_shared() {
        // Other hosts' changes reach the kernel's caches too.
        let weak = Arc::downgrade(&core);
        inv.set_change_listener(Box::new(move |changes| {
            if let Some(core) = weak.upgrade() {
                core.remote_changes(changes);
            }
        }));
    }
    let bg = session
        .spawn()
        .map_err(|e| Error::new(Kind::Store, format!("cannot start the FUSE session: {e}")))?;
    inv.audit_only(
        &[Rec::ok("mount", mnt.display().to_string(), 0, 0)],
        &ctx,
        true,
    )?;
    log::info!("serving {} at {}", store.display(), mnt.display());
    eprintln!(
        "keyfs: serving {} at {} (Ctrl-C or `keyfs umount {}` to stop)",
        store.display(),
        mnt.display(),
        mnt.display()
    );
    let mnt_owned = mnt.to_path_buf();
    std::thread::Builder::new()
        .name("keyfs-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: sigset was initialised above; sig is a valid out-parameter.
            unsafe { libc::sigwait(&sigset, &mut sig) };
            log::info!("signal {sig}: unmounting {}", mnt_owned.display());
            if let Err(e) = umount(&mnt_owned) {
                log::error!("{e}");
            }
        })
        .map_err(|e| Error::new(Kind::Store, format!("cannot start the signal thread: {e}")))?;
    inv.set_async_read_audit(true);
    inv.set_destroy_delay(opts.destroy_delay_ns);
    let flusher_inv = Arc::downgrade(&inv);
    std::thread::Builder::new()
        .name("keyfs-audit".into())
        .spawn(move || {
            // Read audits are appended in batches every 50 ms, off the read path;
            // delayed destructions are carried out once a second.
            let mut tick = 0u64;
            let ctx = Ctx::this_process();
            while let Some(inv) = flusher_inv.upgrade() {
                if let Err(e) = inv.flush_read_audits() {
                    log::error!("appending read audits: {e}");
                }
                tick += 1;
                if tick.is_multiple_of(20) {
                    match inv.purge_expired(&ctx) {
                        Ok(0) => {}
                        Ok(n) => {
                            log::info!("destroyed {n} version(s) whose --destroy-delay passed")
                        }
                        Err(e) => log::error!("carrying out delayed destructions: {e}"),
                    }
                }
                drop(inv);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
        .map_err(|e| Error::new(Kind::Store, format!("cannot start the audit thread: {e}")))?;
    let r = bg.join();
    inv.audit_only(
        &[Rec::ok("unmount", mnt.display().to_string(), 0, 0)],
        &ctx,
        true,
    )?;
    r.map_err(|e| {
        Error::new(
            Kind::Store,
            format!("FUSE session ended with an error: {e}"),
        )
    })
}

/// Unmount a keyfs mountpoint (root: umount2; others: fusermount3 -u).
pub fn umount(mnt: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if crate::sys::geteuid() == 0 {
        let c = std::ffi::CString::new(mnt.as_os_str().as_bytes())
            .map_err(|_| Error::new(Kind::Usage, "mountpoint contains NUL"))?;
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        let stale = is_stale(mnt);
        if stale {
            // The daemon died. Requests it never answered (a rename waiting
            // for its reply, say) keep processes in uninterruptible sleep until
            // the kernel connection is aborted; then the mount can go.
            abort_connection(mnt);
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                log::warn!("{} was a stale mount (its daemon died); aborted its connection and detached it", mnt.display());
                return Ok(());
            }
        }
        if e.raw_os_error() == Some(libc::EBUSY) {
            // SAFETY: as above.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc == 0 {
                log::warn!(
                    "{} was busy; detached it (it disappears when the last user closes it)",
                    mnt.display()
                );
                return Ok(());
            }
        }
        return err(
            Kind::Usage,
            format!(
                "cannot unmount {}: {e}; is it a keyfs mount? (see `mount | grep keyfs`)",
                mnt.display()
            ),
        );
    }
    let st = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mnt)
        .status();
    match st {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => err(
            Kind::Usage,
            format!(
                "fusermount3 -u {} failed ({s}); is it a keyfs mount you own?",
                mnt.display()
            ),
        ),
        Err(e) => err(
            Kind::Usage,
            format!("cannot run fusermount3: {e}; install fuse3"),
        ),
    }
}

/// Is the daemon behind `mnt` gone? Either the kernel says so (ENOTCONN), or
/// a `stat` of the mountpoint gets no answer within 2 s (a killed daemon whose
/// last thread is stuck keeps the connection open but never answers).
fn is_stale(mnt: &Path) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = mnt.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(
            std::fs::metadata(&p)
                .map(|_| ())
                .map_err(|e| e.raw_os_error()),
        );
    });
    match rx.recv_timeout(std::time::Duration::from_secs(2)) {
        Ok(Err(Some(libc::ENOTCONN))) => true,
        Ok(_) => false,
        Err(_) => true,
    }
}

/// Abort the FUSE connection behind `mnt` (fusectl's `abort`), mounting
/// fusectl if needed. Best effort: used only for mounts whose daemon is gone.
fn abort_connection(mnt: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let target = mnt.canonicalize().unwrap_or_else(|_| mnt.to_path_buf());
    let conn = info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let mp = f.get(4)?;
        if Path::new(mp) == target || Path::new(mp) == mnt {
            f.get(2)?.split(':').nth(1).map(str::to_string)
        } else {
            None
        }
    });
    let Some(conn) = conn else { return };
    let ctl = Path::new("/sys/fs/fuse/connections");
    if !ctl.join(&conn).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    if let Err(e) = std::fs::write(ctl.join(&conn).join("abort"), b"1") {
        log::warn!("could not abort FUSE connection {conn}: {e}");
    }
}
