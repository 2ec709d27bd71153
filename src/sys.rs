//! The few places keyfs needs `libc`. Each unsafe block states why it is sound.

use std::ffi::CString;
use std::path::Path;

/// Lock a buffer's pages in memory so key bytes are not swapped out.
/// Best effort: failure (for example RLIMIT_MEMLOCK) is ignored.
pub fn mlock(ptr: *const u8, len: usize) {
    // SAFETY: mlock only reads the address range; ptr/len describe a live allocation.
    unsafe {
        libc::mlock(ptr as *const libc::c_void, len);
    }
}

/// Undo [`mlock`].
pub fn munlock(ptr: *const u8, len: usize) {
    // SAFETY: as for mlock; unlocking a range that is not locked is harmless.
    unsafe {
        libc::munlock(ptr as *const libc::c_void, len);
    }
}

/// Disable core dumps and ptrace attach by non-root (`PR_SET_DUMPABLE=0`,
/// `RLIMIT_CORE=0`), so a crash never writes key material to disk.
pub fn harden_process() {
    // SAFETY: prctl/setrlimit with constant arguments have no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
}

/// Take an exclusive, non-blocking `flock` on an open file.
/// Returns false when another process holds it.
pub fn try_flock(f: &std::fs::File) -> bool {
    use std::os::unix::io::AsRawFd;
    // SAFETY: the fd is owned by `f`, alive for this call.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Effective uid of this process.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Effective gid of this process.
pub fn getegid() -> u32 {
    // SAFETY: getegid cannot fail and touches no memory.
    unsafe { libc::getegid() }
}

/// Process name of `pid` from /proc (empty when gone).
pub fn process_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// `statvfs` of the filesystem holding `path`: (block size, blocks, free, available, files, free files).
pub fn statvfs(path: &Path) -> Option<(u64, u64, u64, u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    Some((
        st.f_frsize,
        st.f_blocks,
        st.f_bfree,
        st.f_bavail,
        st.f_files,
        st.f_ffree,
    ))
}
