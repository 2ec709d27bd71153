//! Shared helpers for the integration suite.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A fresh temp dir per test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keyfs-test-")
        .tempdir()
        .expect("tempdir")
}

/// Path of the keyfs binary built for this test run.
pub fn keyfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyfs"))
}

/// A base64 master key (fixed per call site) and a 0600 file holding it.
pub fn master_key_file(dir: &Path, byte: u8) -> (PathBuf, String) {
    use base64::Engine;
    use std::os::unix::fs::PermissionsExt;
    let b64 = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let p = dir.join(format!("master-{byte}.key"));
    std::fs::write(&p, &b64).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    (p, b64)
}

// ---------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------

use std::ffi::OsStr;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any single command may take before the test fails (a hung FUSE
/// request must fail the test, not hang CI).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// What a finished command printed and how it ended.
#[derive(Debug, Clone)]
pub struct Out {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Exit code 0.
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panic unless the command succeeded.
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(
            self.ok(),
            "`{}` failed with {:?}\nstdout: {}\nstderr: {}",
            self.cmd,
            self.code,
            self.text(),
            self.stderr
        );
        self
    }

    /// Panic unless the command failed and its stderr contains `msg`
    /// (e.g. the strerror text "Permission denied").
    #[track_caller]
    pub fn assert_fails_with(&self, msg: &str) -> &Self {
        assert!(
            !self.ok(),
            "`{}` should have failed with {msg:?} but succeeded\nstdout: {}\nstderr: {}",
            self.cmd,
            self.text(),
            self.stderr
        );
        assert!(
            self.stderr.contains(msg),
            "`{}` failed ({:?}) but its stderr does not say {msg:?}:\n{}",
            self.cmd,
            self.code,
            self.stderr
        );
        self
    }
}

fn describe(prog: &OsStr, args: &[&OsStr]) -> String {
    let mut s = prog.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Wait for `child` (stdin/stdout/stderr already set up) with a deadline;
/// on timeout kill it and panic.
fn wait_output(child: Child, cmd: String, timeout: Duration) -> Out {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(o)) => Out {
            cmd,
            code: o.status.code(),
            stdout: o.stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for `{cmd}`: {e}"),
        Err(_) => {
            // SAFETY: plain kill(2) of our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("`{cmd}` did not finish within {timeout:?} (a hung mount?); killed it");
        }
    }
}

/// Run `prog args…` and capture its output (never panics on failure, only on
/// a timeout). The environment carries no master key (`KEYFS_MASTER_KEY` is
/// removed) so every test says which key it uses.
pub fn run<S: AsRef<OsStr>>(prog: impl AsRef<OsStr>, args: &[S]) -> Out {
    run_stdin(prog, args, None)
}

/// Like [`run`], feeding `stdin` to the command.
pub fn run_stdin<S: AsRef<OsStr>>(
    prog: impl AsRef<OsStr>,
    args: &[S],
    stdin: Option<&[u8]>,
) -> Out {
    let prog = prog.as_ref();
    let a: Vec<&OsStr> = args.iter().map(|s| s.as_ref()).collect();
    let cmd = describe(prog, &a);
    let mut c = Command::new(prog);
    c.args(&a)
        .env_remove("KEYFS_MASTER_KEY")
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| {
        panic!("cannot run `{cmd}`: {e} (is it installed? see scripts/setup.sh)")
    });
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&input);
        });
    }
    wait_output(child, cmd, CMD_TIMEOUT)
}

/// Run a `sh -c` script (for redirections such as `head -c 70000 /dev/zero > F`).
pub fn sh(script: &str) -> Out {
    run("sh", &["-c", script])
}

/// Run `prog args…` as uid/gid 65534 with no supplementary groups (through
/// `setpriv`), to check what another local user sees.
pub fn run_as_nobody<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Out {
    let mut a: Vec<&OsStr> = vec![
        OsStr::new("--reuid=65534"),
        OsStr::new("--regid=65534"),
        OsStr::new("--clear-groups"),
        OsStr::new(prog),
    ];
    a.extend(args.iter().map(|s| s.as_ref()));
    run("setpriv", &a)
}

/// Run the keyfs binary.
pub fn keyfs<S: AsRef<OsStr>>(args: &[S]) -> Out {
    run(keyfs_bin(), args)
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every regular file under `dir` (relative path → (mode, SHA-256)), skipping
/// relative paths listed in `skip`: a snapshot to show "nothing changed".
pub fn tree_digest(
    dir: &Path,
    skip: &[&str],
) -> std::collections::BTreeMap<PathBuf, (u32, String)> {
    use std::os::unix::fs::PermissionsExt;
    fn walk(
        root: &Path,
        d: &Path,
        skip: &[&str],
        out: &mut std::collections::BTreeMap<PathBuf, (u32, String)>,
    ) {
        for e in std::fs::read_dir(d).unwrap_or_else(|e| panic!("read_dir {}: {e}", d.display())) {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if skip.iter().any(|s| rel == Path::new(s)) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.insert(rel.clone(), (m.permissions().mode(), String::new()));
                walk(root, &p, skip, out);
            } else {
                let data = std::fs::read(&p).unwrap_or_default();
                out.insert(rel, (m.permissions().mode(), sha256_hex(&data)));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, skip, &mut out);
    out
}

// ---------------------------------------------------------------------------
// Real mounts
// ---------------------------------------------------------------------------

/// How long a mount may take to appear in /proc/mounts.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon may take to exit after an unmount.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Mounted tests need root (allow_other, chown, setpriv) and /dev/fuse. CI
/// runs as root: anything else is a loud failure, never a silent pass.
#[track_caller]
pub fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "mounted tests need root and /dev/fuse (euid is {euid}); run them as root, e.g. \
         `sudo -E cargo test --test tests mount` or scripts/test.sh"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "mounted tests need /dev/fuse; run scripts/setup.sh (modprobe fuse / mknod /dev/fuse c 10 229)"
    );
}

/// True when `mnt` is a mountpoint according to /proc/mounts.
pub fn is_mounted(mnt: &Path) -> bool {
    let want = mnt
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// A store with a master key in a temp dir, served by a `keyfs mount` child
/// process. Dropping it ALWAYS unmounts (`keyfs umount`, then `umount -l`)
/// and reaps or kills the daemon — also when the test panics.
pub struct Mounted {
    /// Everything lives here (removed after the unmount).
    pub dir: tempfile::TempDir,
    /// The store directory.
    pub store: PathBuf,
    /// The mountpoint.
    pub mnt: PathBuf,
    /// The 0600 base64 master key file (made by `keyfs init --generate-master-key`).
    pub master_key: PathBuf,
    /// The daemon's stdout+stderr, appended across remounts.
    pub log: PathBuf,
    /// Extra `keyfs mount` options in force (reused by remount).
    pub opts: Vec<String>,
    child: Option<Child>,
}

impl Mounted {
    /// A new store with one generated client `alice01`, mounted with default options.
    pub fn with_client(client: &str) -> Mounted {
        let m = Mounted::unmounted();
        m.keyfs_mk(&["generate", "--store", m.store_str(), "--client-id", client])
            .assert_ok();
        m.into_mounted(&[])
    }

    /// A new, empty store mounted with `opts` (e.g. `["--read-only"]`).
    pub fn new(opts: &[&str]) -> Mounted {
        Mounted::unmounted().into_mounted(opts)
    }

    /// A new store and master key, not mounted yet (use [`Mounted::mount`]).
    pub fn unmounted() -> Mounted {
        require_root_and_fuse();
        let dir = tempdir();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        let master_key = dir.path().join("master.key");
        let log = dir.path().join("daemon.log");
        std::fs::create_dir(&mnt).unwrap();
        let m = Mounted {
            dir,
            store,
            mnt,
            master_key,
            log,
            opts: Vec::new(),
            child: None,
        };
        let o = keyfs(&[
            OsStr::new("init"),
            m.store.as_os_str(),
            OsStr::new("--generate-master-key"),
            m.master_key.as_os_str(),
        ]);
        o.assert_ok();
        m
    }

    fn into_mounted(mut self, opts: &[&str]) -> Mounted {
        self.mount(opts);
        self
    }

    /// The store path as &str (temp paths are UTF-8).
    pub fn store_str(&self) -> &str {
        self.store.to_str().expect("utf-8 temp path")
    }

    /// The mountpoint as &str.
    pub fn mnt_str(&self) -> &str {
        self.mnt.to_str().expect("utf-8 temp path")
    }

    /// `MNT/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// `MNT/rel` as a String (for tool arguments).
    pub fn p(&self, rel: &str) -> String {
        self.path(rel).to_str().expect("utf-8").to_owned()
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Run `keyfs --master-key-file MK args…`.
    pub fn keyfs_mk<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        let mut a: Vec<&OsStr> = vec![OsStr::new("--master-key-file"), self.master_key.as_os_str()];
        a.extend(args.iter().map(|s| s.as_ref()));
        keyfs(&a)
    }

    /// Start `keyfs mount STORE MNT opts…` and wait until it is in
    /// /proc/mounts (panics with the daemon's log otherwise).
    #[track_caller]
    pub fn mount(&mut self, opts: &[&str]) {
        assert!(self.child.is_none(), "already mounted");
        assert!(
            !is_mounted(&self.mnt),
            "{} is still mounted before mount",
            self.mnt.display()
        );
        self.opts = opts.iter().map(|s| s.to_string()).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(keyfs_bin());
        c.arg("--master-key-file")
            .arg(&self.master_key)
            .arg("mount")
            .arg(&self.store)
            .arg(&self.mnt)
            .args(&self.opts)
            .env_remove("KEYFS_MASTER_KEY")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = c.spawn().expect("spawning keyfs mount");
        let start = Instant::now();
        loop {
            if is_mounted(&self.mnt) {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "keyfs mount {} {} exited ({st}) before mounting; daemon log:\n{}",
                    self.store.display(),
                    self.mnt.display(),
                    self.daemon_log()
                );
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not appear in /proc/mounts within {MOUNT_TIMEOUT:?}; daemon log:\n{}",
                    self.mnt.display(),
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Unmount (`keyfs umount`, falling back to `umount -l`) and wait for the
    /// daemon to exit (killing it after [`EXIT_TIMEOUT`]). Returns the
    /// daemon's exit code. Never panics, so it is safe in Drop.
    pub fn unmount(&mut self) -> Option<i32> {
        if is_mounted(&self.mnt) {
            let o = std::panic::catch_unwind(|| {
                run(keyfs_bin(), &[OsStr::new("umount"), self.mnt.as_os_str()])
            });
            if !matches!(&o, Ok(o) if o.ok()) || is_mounted(&self.mnt) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mnt)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let mut child = self.child.take()?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return st.code(),
                Ok(None) if start.elapsed() < EXIT_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    eprintln!(
                        "keyfs daemon for {} did not exit within {EXIT_TIMEOUT:?} after unmount; killed it",
                        self.mnt.display()
                    );
                    return None;
                }
            }
        }
    }

    /// Unmount and panic unless the daemon exited cleanly (code 0).
    #[track_caller]
    pub fn unmount_clean(&mut self) {
        let code = self.unmount();
        assert_eq!(
            code,
            Some(0),
            "keyfs mount did not exit cleanly after unmount; daemon log:\n{}",
            self.daemon_log()
        );
        assert!(
            !is_mounted(&self.mnt),
            "{} still mounted",
            self.mnt.display()
        );
    }

    /// Unmount and mount the same store again with the same options.
    #[track_caller]
    pub fn remount(&mut self) {
        self.unmount_clean();
        let opts = self.opts.clone();
        self.mount(&opts.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// `kill -9` the daemon, reap it, and clean the stale mount with
    /// `umount -l` (the mountpoint then answers ENOTCONN no more).
    #[track_caller]
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("kill9: not mounted");
        child.kill().expect("kill -9 keyfs");
        let st = child.wait().expect("reaping keyfs");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "daemon ended otherwise than by SIGKILL: {st}"
        );
        // The kernel keeps the dead connection mounted until it is detached.
        let e = std::fs::read_dir(&self.mnt).err();
        assert_eq!(
            e.and_then(|e| e.raw_os_error()),
            Some(libc::ENOTCONN),
            "a mount whose daemon died should answer ENOTCONN"
        );
        run("umount", &[OsStr::new("-l"), self.mnt.as_os_str()]).assert_ok();
        assert!(!is_mounted(&self.mnt));
    }

    /// `keyfs list --store STORE --versions --json` (the store must not be
    /// served: unmount first), parsed.
    #[track_caller]
    pub fn list_versions(&self) -> serde_json::Value {
        let o = self.keyfs_mk(&["list", "--store", self.store_str(), "--versions", "--json"]);
        o.assert_ok();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{}", o.text()))
    }

    /// `keyfs check --store STORE` (unmounted).
    pub fn check(&self) -> Out {
        self.keyfs_mk(&["check", "--store", self.store_str()])
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let mounted = self.child.is_some() || is_mounted(&self.mnt);
        self.unmount();
        if is_mounted(&self.mnt) {
            eprintln!(
                "warning: {} is still mounted after cleanup",
                self.mnt.display()
            );
        }
        if panicking && mounted {
            eprintln!(
                "--- keyfs daemon log ({}) ---\n{}\n--- end of daemon log ---",
                self.log.display(),
                self.daemon_log()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Added for tests/security.rs
// ---------------------------------------------------------------------------

/// Like [`run`], with extra environment variables and a deadline of its own
/// (for long scripts such as scripts/crash-loop.sh).
pub fn run_env<S: AsRef<OsStr>>(
    prog: impl AsRef<OsStr>,
    args: &[S],
    env: &[(&str, &OsStr)],
    timeout: Duration,
) -> Out {
    let prog = prog.as_ref();
    let a: Vec<&OsStr> = args.iter().map(|s| s.as_ref()).collect();
    let cmd = describe(prog, &a);
    let mut c = Command::new(prog);
    c.args(&a)
        .env_remove("KEYFS_MASTER_KEY")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}`: {e}"));
    wait_output(child, cmd, timeout)
}

/// Run `prog args…` as uid/gid `id` with no supplementary groups (through
/// `setpriv`); [`run_as_nobody`] for any uid, e.g. 1 (`daemon`).
pub fn run_as<S: AsRef<OsStr>>(id: u32, prog: &str, args: &[S]) -> Out {
    let uid = format!("--reuid={id}");
    let gid = format!("--regid={id}");
    let mut a: Vec<&OsStr> = vec![
        OsStr::new(&uid),
        OsStr::new(&gid),
        OsStr::new("--clear-groups"),
        OsStr::new(prog),
    ];
    a.extend(args.iter().map(|s| s.as_ref()));
    run("setpriv", &a)
}

impl Mounted {
    /// Like [`Mounted::mount`], but the daemon is started through `wrapper`
    /// (a command that execs its arguments, such as
    /// `setpriv --bounding-set=-sys_ptrace`), so [`Mounted::pid`] is the
    /// daemon's own pid. A later [`Mounted::remount`] mounts without it.
    #[track_caller]
    pub fn mount_via(&mut self, wrapper: &[&str], opts: &[&str]) {
        assert!(self.child.is_none(), "already mounted");
        assert!(!wrapper.is_empty(), "mount_via needs a wrapper command");
        assert!(
            !is_mounted(&self.mnt),
            "{} is still mounted before mount",
            self.mnt.display()
        );
        self.opts = opts.iter().map(|s| s.to_string()).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..])
            .arg(keyfs_bin())
            .arg("--master-key-file")
            .arg(&self.master_key)
            .arg("mount")
            .arg(&self.store)
            .arg(&self.mnt)
            .args(&self.opts)
            .env_remove("KEYFS_MASTER_KEY")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = c.spawn().expect("spawning the wrapped keyfs mount");
        let start = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "{wrapper:?} keyfs mount exited ({st}) before mounting; daemon log:\n{}",
                    self.daemon_log()
                );
            }
            if start.elapsed() > MOUNT_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not appear in /proc/mounts within {MOUNT_TIMEOUT:?}; daemon log:\n{}",
                    self.mnt.display(),
                    self.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }
}

/// A tmpfs of a fixed size mounted on its own temp dir (for full-disk tests).
/// Dropping it ALWAYS unmounts it (`umount`, then `umount -l`), also when the
/// test panics. Create it BEFORE any [`Mounted`] whose store lives on it, so
/// that the FUSE mount is dropped (and its daemon gone) first.
pub struct Tmpfs {
    /// The mountpoint (its temp dir is removed after the unmount).
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE,mode=0700 tmpfs DIR`.
    #[track_caller]
    pub fn new(size: &str) -> Tmpfs {
        require_root_and_fuse();
        let dir = tempdir();
        run(
            "mount",
            &[
                OsStr::new("-t"),
                OsStr::new("tmpfs"),
                OsStr::new("-o"),
                OsStr::new(&format!("size={size},mode=0700")),
                OsStr::new("tmpfs"),
                dir.path().as_os_str(),
            ],
        )
        .assert_ok();
        assert!(is_mounted(dir.path()), "tmpfs not mounted");
        Tmpfs { dir }
    }

    /// The mountpoint.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = self.dir.path().to_path_buf();
        if is_mounted(&p) {
            let ok = Command::new("umount")
                .arg(&p)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&p)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if is_mounted(&p) {
            eprintln!(
                "warning: tmpfs {} is still mounted after cleanup",
                p.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Added for tests/backup.rs
// ---------------------------------------------------------------------------

impl Mounted {
    /// A new store, not mounted yet, for the SAME master key as the file
    /// `master_key` (`keyfs init STORE --master-key-file MK`). The key file is
    /// copied (0600) into this store's own temp dir, so the two guards can be
    /// dropped in any order.
    #[track_caller]
    pub fn unmounted_sharing_key(master_key: &Path) -> Mounted {
        use std::os::unix::fs::PermissionsExt;
        require_root_and_fuse();
        let dir = tempdir();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        let mk = dir.path().join("master.key");
        let log = dir.path().join("daemon.log");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::copy(master_key, &mk).expect("copying the master key file");
        std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let m = Mounted {
            dir,
            store,
            mnt,
            master_key: mk,
            log,
            opts: Vec::new(),
            child: None,
        };
        m.keyfs_mk(&[OsStr::new("init"), m.store.as_os_str()])
            .assert_ok();
        m
    }

    /// [`Mounted::unmounted_sharing_key`], then mounted with `opts` (e.g.
    /// `["--sealed", "--mkdir-generates=none"]`).
    #[track_caller]
    pub fn new_sharing_key(master_key: &Path, opts: &[&str]) -> Mounted {
        let mut m = Mounted::unmounted_sharing_key(master_key);
        m.mount(opts);
        m
    }

    /// Unmount (cleanly) and mount again with other options (e.g. switch a
    /// store between the plaintext and the `--sealed` view).
    #[track_caller]
    pub fn remount_with(&mut self, opts: &[&str]) {
        self.unmount_clean();
        self.mount(opts);
    }

    /// `keyfs list MNT --versions --json` through the mount, parsed.
    #[track_caller]
    pub fn list_mounted(&self) -> serde_json::Value {
        let o = keyfs(&["list", self.mnt_str(), "--versions", "--json"]);
        o.assert_ok();
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{}", o.text()))
    }
}

// ---------------------------------------------------------------------------
// Added for tests/distributed.rs
// ---------------------------------------------------------------------------

impl Mounted {
    /// A guard for a mount of an EXISTING store named by `store` (a directory
    /// or an `etcd://HOST:PORT,…/PREFIX` URL), with the master key of the file
    /// `master_key`. Nothing is initialised (no `keyfs init`): use it for a
    /// second "host" of a store that another guard (or the test) created. The
    /// key file is copied (0600) into this guard's own temp dir, so guards can
    /// be dropped in any order. Not mounted yet: call [`Mounted::mount`].
    #[track_caller]
    pub fn unmounted_on(store: &str, master_key: &Path) -> Mounted {
        use std::os::unix::fs::PermissionsExt;
        require_root_and_fuse();
        let dir = tempdir();
        let mnt = dir.path().join("mnt");
        let mk = dir.path().join("master.key");
        let log = dir.path().join("daemon.log");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::copy(master_key, &mk).expect("copying the master key file");
        std::fs::set_permissions(&mk, std::fs::Permissions::from_mode(0o600)).unwrap();
        Mounted {
            dir,
            store: PathBuf::from(store),
            mnt,
            master_key: mk,
            log,
            opts: Vec::new(),
            child: None,
        }
    }

    /// [`Mounted::unmounted_on`], then mounted with `opts`.
    #[track_caller]
    pub fn new_on(store: &str, master_key: &Path, opts: &[&str]) -> Mounted {
        let mut m = Mounted::unmounted_on(store, master_key);
        m.mount(opts);
        m
    }
}

/// Members of an [`EtcdCluster`].
pub const ETCD_MEMBERS: usize = 3;
/// How long a (re)started cluster may take to report every member healthy.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// Loopback ports for etcd members: consecutive ports from a random base
/// below the kernel's ephemeral range (so that no client connection of this
/// machine can be holding one), never the same port twice in this process,
/// and only ports that can be bound right now. Another process may still
/// take one before etcd binds it: [`EtcdCluster::new`] retries with fresh
/// ports when a member reports "address already in use".
pub fn etcd_free_ports(n: usize) -> Vec<u16> {
    use std::sync::Mutex;
    static NEXT: Mutex<Option<u32>> = Mutex::new(None);
    const LO: u32 = 20_000;
    // The ephemeral range is 32768-60999 on Linux by default.
    let hi: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|lo| *lo > LO + 2_000)
        .unwrap_or(32_768)
        - 1;
    let mut next = NEXT.lock().unwrap_or_else(|e| e.into_inner());
    let mut p = next.unwrap_or_else(|| {
        let mut r = [0u8; 4];
        getrandom::getrandom(&mut r).expect("getrandom");
        LO + u32::from_le_bytes(r) % (hi - LO)
    });
    let mut out = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n {
        tries += 1;
        assert!(tries < 10_000, "no free loopback ports for etcd");
        if p > hi {
            p = LO;
        }
        let port = p as u16;
        p += 1;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            out.push(port);
        }
    }
    *next = Some(p);
    out
}

/// A 3-member etcd cluster (etcd 3.4, `/usr/bin/etcd` from Debian's
/// `etcd-server`) on 127.0.0.1 with free ports, each member with its own data
/// dir and log file in a temp dir. Elections are fast (heartbeat 50 ms,
/// election timeout 500 ms) and requests may be large (`--max-txn-ops 10000`,
/// `--max-request-bytes 10485760`).
///
/// Dropping it ALWAYS kills (SIGKILL) and reaps every member — also when the
/// test panics (then the tail of each member's log is printed). As a second
/// net, members are started with `PR_SET_PDEATHSIG` = SIGKILL, so they die
/// with the test thread that started them even if no destructor runs (a
/// killed test binary): start and restart members from the thread that owns
/// the guard (the test's own thread), not from a short-lived helper thread.
pub struct EtcdCluster {
    /// Data dirs (`m0.etcd`…), logs (`m0.log`…); removed after the members died.
    pub dir: tempfile::TempDir,
    /// Client port of each member (`http://127.0.0.1:PORT`).
    pub client_ports: Vec<u16>,
    /// Peer (Raft) port of each member.
    pub peer_ports: Vec<u16>,
    /// `--initial-cluster-token`, unique per cluster.
    pub token: String,
    members: Vec<Option<Child>>,
}

// No Default: constructing one starts three processes.
#[allow(clippy::new_without_default)]
impl EtcdCluster {
    /// Start a new cluster and wait until `etcdctl endpoint health` reports
    /// every member healthy (panics with the members' logs otherwise). Tries
    /// again with other ports when one was taken meanwhile.
    #[track_caller]
    pub fn new() -> EtcdCluster {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut c = EtcdCluster::spawn_new();
            match c.wait_healthy_for(ETCD_START_TIMEOUT) {
                Ok(()) => return c,
                Err(why) => {
                    let logs = c.logs();
                    c.kill_all();
                    if attempt < 3 && logs.contains("address already in use") {
                        eprintln!("etcd: a port was taken ({why}); retrying with other ports");
                        continue;
                    }
                    panic!("etcd cluster did not become healthy: {why}\n{logs}");
                }
            }
        }
    }

    fn spawn_new() -> EtcdCluster {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = tempdir();
        let ports = etcd_free_ports(2 * ETCD_MEMBERS);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let token = format!(
            "keyfs-test-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = EtcdCluster {
            dir,
            client_ports: ports[..ETCD_MEMBERS].to_vec(),
            peer_ports: ports[ETCD_MEMBERS..].to_vec(),
            token,
            members: (0..ETCD_MEMBERS).map(|_| None).collect(),
        };
        for i in 0..ETCD_MEMBERS {
            c.spawn_member(i, "new");
        }
        c
    }

    /// `m0=http://127.0.0.1:P0,m1=…,m2=…`.
    fn initial_cluster(&self) -> String {
        self.peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Member `i`'s log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.log"))
    }

    /// Member `i`'s data dir.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("m{i}.etcd"))
    }

    fn spawn_member(&mut self, i: usize, state: &str) {
        use std::os::unix::process::CommandExt;
        assert!(self.members[i].is_none(), "etcd member m{i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .unwrap();
        let client = format!("http://127.0.0.1:{}", self.client_ports[i]);
        let peer = format!("http://127.0.0.1:{}", self.peer_ports[i]);
        let mut c = Command::new("etcd");
        c.arg("--name")
            .arg(format!("m{i}"))
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--max-txn-ops", "10000"])
            .args(["--max-request-bytes", "10485760"])
            .args(["--heartbeat-interval", "50"])
            .args(["--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Only our flags: no ETCD_* settings from the environment.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                c.env_remove(k);
            }
        }
        if std::env::consts::ARCH == "aarch64" {
            c.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                Ok(())
            });
        }
        let child = c.spawn().unwrap_or_else(|e| {
            panic!("cannot run etcd: {e} (install etcd-server: scripts/setup.sh)")
        });
        self.members[i] = Some(child);
    }

    /// `127.0.0.1:C` of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.client_ports[i])
    }

    /// `127.0.0.1:C0,127.0.0.1:C1,127.0.0.1:C2` (the host part of a store URL,
    /// and etcdctl's `--endpoints`).
    pub fn endpoints_url_part(&self) -> String {
        (0..ETCD_MEMBERS)
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `etcd://127.0.0.1:C0,127.0.0.1:C1,127.0.0.1:C2/PREFIX`.
    pub fn store_url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints_url_part())
    }

    /// Run `etcdctl --endpoints=ALL --dial-timeout=2s --command-timeout=5s
    /// args…` (API v3). Later `--dial-timeout`/`--command-timeout` flags in
    /// `args` override these (not `--endpoints`, which would be appended to
    /// the list: use [`EtcdCluster::etcdctl_on`] for one member).
    pub fn etcdctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Out {
        self.etcdctl_endpoints(&self.endpoints_url_part(), args)
    }

    /// [`EtcdCluster::etcdctl`] talking to member `i` only.
    pub fn etcdctl_on<S: AsRef<OsStr>>(&self, i: usize, args: &[S]) -> Out {
        self.etcdctl_endpoints(&self.endpoint(i), args)
    }

    fn etcdctl_endpoints<S: AsRef<OsStr>>(&self, endpoints: &str, args: &[S]) -> Out {
        let eps = format!("--endpoints={endpoints}");
        let mut a: Vec<&OsStr> = vec![
            OsStr::new(&eps),
            OsStr::new("--dial-timeout=2s"),
            OsStr::new("--command-timeout=5s"),
        ];
        a.extend(args.iter().map(|s| s.as_ref()));
        run_env(
            "etcdctl",
            &a,
            &[("ETCDCTL_API", OsStr::new("3"))],
            Duration::from_secs(30),
        )
    }

    /// True while member `i`'s process runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        match self.members[i].as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// Pid of member `i`, if started.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].as_ref().map(|c| c.id())
    }

    /// The index of the current leader (`etcdctl endpoint status`), if the
    /// members that answer agree on one.
    pub fn leader(&self) -> Option<usize> {
        let o = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?.iter().find_map(|e| {
            let st = &e["Status"];
            let me = st["header"]["member_id"].as_u64()?;
            if st["leader"].as_u64()? != me {
                return None;
            }
            let ep = e["Endpoint"].as_str()?;
            (0..ETCD_MEMBERS).find(|i| self.endpoint(*i) == ep)
        })
    }

    /// SIGKILL member `i` and reap it (a crash: its data dir stays).
    #[track_caller]
    pub fn kill(&mut self, i: usize) {
        let mut c = self.members[i]
            .take()
            .unwrap_or_else(|| panic!("etcd member m{i} is not running"));
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Start member `i` again with its data dir (`--initial-cluster-state
    /// existing`). Does not wait: a member alone has no quorum; use
    /// [`EtcdCluster::wait_healthy`] once enough members run.
    #[track_caller]
    pub fn start(&mut self, i: usize) {
        self.spawn_member(i, "existing");
    }

    /// Stop every running member and reap them. A crash-stop (SIGKILL): for
    /// the mounts it is the same outage as a clean stop, etcd recovers from
    /// its fsynced WAL either way, and a graceful stop of a whole cluster
    /// takes seconds (leadership transfer attempts without quorum).
    pub fn stop_all(&mut self) {
        self.kill_all();
    }

    /// Start every member that is not running, and wait until all are healthy.
    #[track_caller]
    pub fn start_all(&mut self) {
        for i in 0..ETCD_MEMBERS {
            if !self.is_running(i) {
                self.members[i] = None;
                self.start(i);
            }
        }
        self.wait_healthy();
    }

    /// Wait until every member is healthy (panics with the logs otherwise).
    #[track_caller]
    pub fn wait_healthy(&mut self) {
        if let Err(why) = self.wait_healthy_for(ETCD_START_TIMEOUT) {
            panic!(
                "etcd cluster did not become healthy: {why}\n{}",
                self.logs()
            );
        }
    }

    fn wait_healthy_for(&mut self, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            for i in 0..ETCD_MEMBERS {
                if let Some(c) = self.members[i].as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Err(format!("member m{i} exited ({st})"));
                    }
                }
            }
            let o = self.etcdctl(&["endpoint", "health"]);
            if o.ok() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "not healthy within {timeout:?}: {}{}",
                    o.text(),
                    o.stderr
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last 25 lines of every member's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for i in 0..ETCD_MEMBERS {
            let text = std::fs::read_to_string(self.log_path(i))
                .unwrap_or_else(|e| format!("(no log: {e})"));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            s.push_str(&format!(
                "--- etcd m{i} log ({}), last {} lines ---\n{}\n",
                self.log_path(i).display(),
                tail.len(),
                tail.join("\n")
            ));
        }
        s
    }

    /// SIGKILL every member at once, then reap them.
    fn kill_all(&mut self) {
        for c in self.members.iter_mut().flatten() {
            let _ = c.kill();
        }
        for slot in self.members.iter_mut() {
            if let Some(mut c) = slot.take() {
                let _ = c.wait();
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Open a store's sled database directly from the test process. Another
/// test's forked child can hold a copy of the descriptor that locks it for a
/// moment (until it execs), and a keyfs process that just exited may still be
/// releasing it: retry the lock for up to 5 s.
#[track_caller]
pub fn open_sled(db: &Path) -> sled::Db {
    let start = Instant::now();
    loop {
        match sled::open(db) {
            Ok(d) => return d,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < Duration::from_secs(5) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open the store's sled db {}: {e:?}", db.display()),
        }
    }
}

/// Open the store's sled database directly (no keyfs process may serve the
/// store), run `f`, flush and close.
pub fn with_db<R>(store: &Path, f: impl FnOnce(&sled::Db) -> R) -> R {
    let db = open_sled(&store.join("db"));
    let r = f(&db);
    db.flush().expect("flush");
    drop(db);
    r
}

// ----- helpers shared by the test modules -----

pub fn rand_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("getrandom");
    b
}

/// Sorted names in `MNT/<rel>.old/` (empty when there is no history).
#[track_caller]
pub fn history(m: &Mounted, rel: &str) -> Vec<String> {
    let d = m.path(&format!("{rel}.old"));
    match std::fs::read_dir(&d) {
        Ok(rd) => {
            let mut v: Vec<String> = rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Vec::new(),
        Err(e) => panic!("listing {}: {e}", d.display()),
    }
}

/// One xattr through `getfattr --only-values`.
#[track_caller]
pub fn xattr(m: &Mounted, rel: &str, name: &str) -> String {
    run(
        "getfattr",
        &["--absolute-names", "--only-values", "-n", name, &m.p(rel)],
    )
    .assert_ok()
    .text()
}

/// `stat -c FORMAT MNT/rel`, trimmed.
#[track_caller]
pub fn stat_c(m: &Mounted, fmt: &str, rel: &str) -> String {
    run("stat", &["-c", fmt, &m.p(rel)])
        .assert_ok()
        .text()
        .trim()
        .to_owned()
}

/// The errno a syscall-level operation failed with.
#[track_caller]
pub fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>, what: &str) -> i32 {
    match r {
        Ok(v) => panic!("{what} should have failed, but succeeded: {v:?}"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("{what}: not an OS error: {e}")),
    }
}

#[track_caller]
pub fn assert_check_clean(m: &Mounted) {
    let o = m.check();
    assert!(
        o.ok(),
        "keyfs check reports problems ({:?}):\n{}{}",
        o.code,
        o.text(),
        o.stderr
    );
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
