//! The `keyfs` command: clap definitions and what each subcommand does.
//! With `--store` a command opens the store directly; without it, paths are
//! files inside a mounted tree and the command uses ordinary file operations.

use crate::crypto::master::{self, MasterKeySource};
use crate::error::{err, Error, Kind, Result};
use crate::fs::MountOptions;
use crate::inventory::admin::{read_export_key, KeyInfo};
use crate::inventory::audit::Ctx;
use crate::inventory::kinds::{self, KeyKind};
use crate::inventory::names::{parse_ts, ClientId};
use crate::inventory::node::Ino;
use crate::inventory::{Inventory, OpenOptions, DEFAULT_CLIENT_KEYS, GLOBAL_KEYS};
use crate::secret::SecretBytes;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// keyfs: an encrypted key inventory, mounted as a directory tree.
#[derive(Parser, Debug)]
#[command(name = "keyfs", version, about, long_about = None)]
pub struct Cli {
    /// Master key file (raw 32 bytes or base64; must not be group/other-readable).
    #[arg(long, global = true, value_name = "FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Command that prints the base64 master key (KMS, Vault, HSM hook).
    #[arg(long, global = true, value_name = "CMD")]
    pub master_key_command: Option<String>,
    /// More log output (-v info, -vv debug, -vvv trace). Logs never contain key material.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `--mkdir-generates`
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum MkdirGenerates {
    /// `mkdir clients/ID` generates storage, storage.pub, storage_sym, hmac.
    Default,
    /// `mkdir` only makes the directory (use for restores).
    None,
}

/// `--layout`
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Layout {
    /// clients/<id>/<key>
    Tree,
    /// Acra's v1 file names.
    AcraV1,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create a store (a 0700 directory, or an empty etcd prefix).
    Init {
        /// Store to create: a directory (made 0700), or etcd://HOST:PORT[,…]/PREFIX.
        store: PathBuf,
        /// Write a fresh master key to FILE (0600) and use it.
        #[arg(long, value_name = "FILE")]
        generate_master_key: Option<PathBuf>,
    },
    /// Serve the store as a directory tree (foreground; Ctrl-C unmounts).
    Mount {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        store: PathBuf,
        /// Empty directory to mount on.
        mountpoint: PathBuf,
        /// Refuse every change.
        #[arg(long)]
        read_only: bool,
        /// What `mkdir clients/<ID>` does.
        #[arg(long, value_enum, default_value = "default")]
        mkdir_generates: MkdirGenerates,
        /// Kernel page cache and long TTLs, with explicit invalidation on change.
        #[arg(long)]
        cache: bool,
        /// Show each key version as its sealed record (ciphertext bound to its path) instead of plaintext.
        #[arg(long)]
        sealed: bool,
        /// File layout.
        #[arg(long, value_enum, default_value = "tree")]
        layout: Layout,
        /// Keep unlinked versions recoverable this long under .keyfs/pending/ (e.g. 30s, 15m, 7d).
        #[arg(long, value_name = "DURATION", default_value = "0")]
        destroy_delay: String,
    },
    /// Unmount a keyfs mountpoint.
    Umount {
        /// Mountpoint.
        mountpoint: PathBuf,
    },
    /// Generate a client's default key set, or the given kinds; rotates existing keys.
    Generate {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount at ROOT).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Mountpoint (without --store).
        root: Option<PathBuf>,
        /// Client to generate keys for.
        #[arg(long)]
        client_id: Option<String>,
        /// Generate the global poison and audit keys.
        #[arg(long)]
        global: bool,
        /// Key names to generate (default: storage, storage_sym, hmac).
        #[arg(long = "kind")]
        kinds: Vec<String>,
    },
    /// Rotate a key to fresh or supplied material.
    Rotate {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Tree path (with --store) or file in a mount.
        key: String,
        /// New material from FILE, or - for stdin.
        #[arg(long, value_name = "FILE|-")]
        from: Option<String>,
    },
    /// Make an archived version current again.
    Rollback {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Key.
        key: String,
        /// Version: archive timestamp (as `list --versions` shows) or number.
        #[arg(long)]
        version: String,
    },
    /// Show the inventory.
    List {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Subtree (tree path with --store, mountpoint or directory otherwise).
        root: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Show every version.
        #[arg(long)]
        versions: bool,
    },
    /// Print key bytes to stdout.
    Read {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Key.
        key: String,
        /// Archived version (timestamp or number).
        #[arg(long)]
        version: Option<String>,
    },
    /// Destroy a key's current version, or one version.
    Destroy {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX (omit to work through a mount).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Key.
        key: String,
        /// Archived version (timestamp or number).
        #[arg(long)]
        version: Option<String>,
    },
    /// Export keys in a bundle encrypted under a fresh export key.
    Export {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Subtree.
        root: Option<String>,
        /// Bundle file to write.
        #[arg(long)]
        out: PathBuf,
        /// Export key file to write (0600); keep it apart from the bundle.
        #[arg(long)]
        key_out: PathBuf,
        /// Include private and symmetric keys.
        #[arg(long)]
        private: bool,
    },
    /// Import a bundle (refuses to overwrite existing keys).
    Import {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Where to import (default: the paths in the bundle).
        root: Option<String>,
        /// Bundle file.
        #[arg(long)]
        bundle: PathBuf,
        /// Export key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Rotate the master key: re-wrap every data key.
    Rewrap {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: PathBuf,
        /// The new master key.
        #[arg(long, value_name = "FILE")]
        new_master_key_file: PathBuf,
    },
    /// Rewrite the store so destroyed material is physically gone.
    Compact {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: PathBuf,
    },
    /// Verify every record and the audit chain.
    Check {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: PathBuf,
    },
    /// Print or verify the audit log.
    Audit {
        /// Store: directory or etcd://HOST:PORT[,…]/PREFIX.
        #[arg(long)]
        store: PathBuf,
        /// Verify the HMAC chain.
        #[arg(long)]
        verify: bool,
    },
}

struct StderrLogger(log::LevelFilter);

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata())
            && (r.target().starts_with("keyfs") || r.level() <= log::Level::Error)
        {
            eprintln!("keyfs[{}] {}: {}", std::process::id(), r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

/// Install the stderr logger for `-v` count (or `KEYFS_LOG=error|warn|info|debug|trace`).
pub fn init_logging(verbose: u8) {
    let from_env = std::env::var("KEYFS_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok());
    let level = from_env.unwrap_or(match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    if log::set_boxed_logger(Box::new(StderrLogger(level))).is_ok() {
        log::set_max_level(level);
    }
}

fn usage(msg: impl Into<String>) -> Error {
    Error::new(Kind::Usage, msg)
}

impl Cli {
    fn source(&self) -> MasterKeySource {
        MasterKeySource {
            file: self.master_key_file.clone(),
            command: self.master_key_command.clone(),
        }
    }

    fn open(&self, store: &Path) -> Result<Inventory> {
        let mk = self.source().load()?;
        Inventory::open(store, &mk, OpenOptions::default())
    }
}

/// Parse `--destroy-delay`: a number with an optional unit (s, m, h, d); plain numbers are seconds.
fn parse_duration(s: &str) -> Result<i64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let mult: i64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => 0,
    };
    match num.parse::<i64>() {
        Ok(n) if mult > 0 && n <= 3650 * 86400 / mult => Ok(n * mult * 1_000_000_000),
        _ => err(Kind::Usage, format!("--destroy-delay={s}: give a duration such as 0, 30s, 15m, 12h or 7d (at most ten years)")),
    }
}

/// Resolve `V` (archive timestamp or version number) for key `id`.
fn version_of(inv: &Inventory, key: &str, v: &str) -> Result<(u64, u32)> {
    let id = key_id(inv, key)?;
    if let Some(ts) = parse_ts(v.as_bytes()) {
        let old = inv
            .lookup(
                Ino::Old(id),
                crate::inventory::names::format_ts(ts).as_bytes(),
            )
            .map_err(|_| {
                Error::new(
                    Kind::NotFound,
                    format!("{key} has no archived version {v}; see `keyfs list --versions`"),
                )
            })?;
        if let Ino::Ver(_, n) = old {
            return Ok((id, n));
        }
    }
    match v.parse::<u32>() {
        Ok(n) => {
            let known = inv
                .get_node(id)?
                .is_some_and(|nd| nd.key().is_some_and(|k| k.version(n).is_some()));
            if known {
                Ok((id, n))
            } else {
                err(
                    Kind::NotFound,
                    format!("{key} has no version {v}; see `keyfs list --versions`"),
                )
            }
        }
        Err(_) => err(Kind::Usage, format!("--version {v:?}: give an archive timestamp as `keyfs list --versions` shows it (e.g. 2026-11-28T21:40:05.123456789Z) or a version number")),
    }
}

/// The entry id of the key at `key`, also when only its history is left
/// (its current version destroyed).
fn key_id(inv: &Inventory, key: &str) -> Result<u64> {
    let key = key.trim_end_matches('/');
    match inv.resolve(key) {
        Ok(Ino::Node(id)) => Ok(id),
        Ok(other) => err(
            Kind::Invalid,
            format!("{} is not a key", inv.ino_path(other)),
        ),
        Err(e) if e.kind() == Kind::NotFound => match inv.resolve(&format!("{key}.old")) {
            Ok(Ino::Old(id)) => Ok(id),
            _ => Err(e),
        },
        Err(e) => Err(e),
    }
}

/// Is version `n` the current version of entry `id`?
fn is_current(inv: &Inventory, id: u64, n: u32) -> Result<bool> {
    Ok(inv.get_node(id)?.is_some_and(|nd| {
        nd.key()
            .and_then(|k| k.current.as_ref())
            .is_some_and(|c| c.ver == n)
    }))
}

fn read_input(from: &str) -> Result<SecretBytes> {
    let mut buf = Vec::new();
    if from == "-" {
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| usage(format!("cannot read stdin: {e}")))?;
    } else {
        buf = std::fs::read(from)
            .map_err(|e| Error::new(Kind::NotFound, format!("cannot read {from}: {e}")))?;
    }
    Ok(SecretBytes::new(buf))
}

fn write_stdout(b: &[u8]) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(b)
        .and_then(|_| o.flush())
        .map_err(|e| Error::new(Kind::Store, format!("cannot write to stdout: {e}")))
}

fn print_list(list: &[KeyInfo], json: bool, versions: bool) -> Result<()> {
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|k| {
                let mut k = k.clone();
                if !versions {
                    k.versions.retain(|v| v.state == "current");
                }
                k
            })
            .collect();
        let s =
            serde_json::to_string_pretty(&v).map_err(|e| Error::new(Kind::Store, e.to_string()))?;
        return write_stdout(format!("{s}\n").as_bytes());
    }
    let mut out = format!(
        "{:<44} {:<14} {:>7} {:<9} {:<30} FINGERPRINT\n",
        "PATH", "KIND", "VERSION", "STATE", "CREATED"
    );
    for k in list {
        for v in k
            .versions
            .iter()
            .filter(|v| versions || v.state == "current")
        {
            let name = match (&v.archived, v.state) {
                (Some(a), _) if versions => format!("{}.old/{a}", k.path),
                _ => k.path.clone(),
            };
            out.push_str(&format!(
                "{:<44} {:<14} {:>7} {:<9} {:<30} {}\n",
                name,
                k.kind,
                v.version,
                v.state,
                v.created,
                v.fingerprint.as_deref().map(|f| &f[..16]).unwrap_or("-")
            ));
        }
    }
    write_stdout(out.as_bytes())
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) => Kind::NotFound,
        Some(libc::EINVAL) => Kind::Invalid,
        Some(libc::EEXIST)
        | Some(libc::ENOTEMPTY)
        | Some(libc::EPERM)
        | Some(libc::EACCES)
        | Some(libc::EROFS)
        | Some(libc::EFBIG) => Kind::Perm,
        Some(libc::EIO) => Kind::Integrity,
        _ => Kind::Store,
    };
    Error::new(kind, format!("{}: {e}", path.display()))
}

/// Atomic replace through a mount: write a temp file, fsync, rename over.
fn replace_through_mount(key: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = key.parent().unwrap_or(Path::new("."));
    let name = key
        .file_name()
        .ok_or_else(|| usage(format!("{} is not a file path", key.display())))?;
    let tmp = dir.join(format!(
        ".{}.keyfs-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    let r = f.write_all(data).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(key, e));
    }
    std::fs::rename(&tmp, key).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(key, e)
    })
}

fn list_mount(root: &Path) -> Result<Vec<KeyInfo>> {
    fn xattr(p: &Path, name: &str) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        let n = std::ffi::CString::new(name).ok()?;
        let mut buf = vec![0u8; 256];
        // SAFETY: valid C strings and a buffer of the stated length.
        let r = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if r < 0 {
            return None;
        }
        buf.truncate(r as usize);
        String::from_utf8(buf).ok()
    }
    fn walk(base: &Path, dir: &Path, out: &mut Vec<KeyInfo>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type().map_err(|er| io_err(&p, er))?;
            if ft.is_dir() && !name.ends_with(".old") {
                walk(base, &p, out)?;
            } else if ft.is_file() {
                let rel = p
                    .strip_prefix(base)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned();
                let mut versions = Vec::new();
                let v = |fp: &Path, state: &'static str, archived: Option<String>| {
                    crate::inventory::admin::VersionInfo {
                        version: xattr(fp, "user.keyfs.version")
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                        state,
                        created: xattr(fp, "user.keyfs.created").unwrap_or_default(),
                        archived,
                        destroyed: None,
                        fingerprint: xattr(fp, "user.keyfs.fingerprint"),
                        size: std::fs::metadata(fp).map(|m| m.len() as u32).unwrap_or(0),
                    }
                };
                versions.push(v(&p, "current", None));
                let old = dir.join(format!("{name}.old"));
                if let Ok(rd) = std::fs::read_dir(&old) {
                    let mut names: Vec<_> = rd
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    names.sort();
                    for n in names.into_iter().rev() {
                        versions.push(v(&old.join(&n), "archived", Some(n)));
                    }
                }
                let kind = KeyKind::for_name(name.as_bytes()).label();
                let client = rel
                    .strip_prefix("clients/")
                    .map(|r| r.split('/').next().unwrap_or("").to_string());
                out.push(KeyInfo {
                    path: rel,
                    client,
                    kind,
                    versions,
                });
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// Find the mountpoint above `p` (the directory holding `.keyfs/status`).
fn mount_root(p: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(p)
        .or_else(|_| std::fs::canonicalize(p.parent().unwrap_or(Path::new("."))))
        .map_err(|e| io_err(p, e))?;
    let mut cur = Some(abs.as_path());
    while let Some(c) = cur {
        if c.join(".keyfs/status").exists() {
            return Ok(c.to_path_buf());
        }
        cur = c.parent();
    }
    err(
        Kind::Usage,
        format!(
            "{} is not inside a keyfs mount; pass --store STORE to open a store directly",
            p.display()
        ),
    )
}

/// Run a parsed command.
pub fn run(cli: &Cli) -> Result<()> {
    let ctx = Ctx::this_process();
    match &cli.cmd {
        Cmd::Init {
            store,
            generate_master_key,
        } => {
            let mk = match generate_master_key {
                Some(f) => master::generate_key_file(f)?,
                None => cli.source().load()?,
            };
            if let Err(e) = Inventory::init(store, &mk) {
                if let Some(f) = generate_master_key {
                    // The key was made for this store only; do not leave it behind.
                    let _ = std::fs::remove_file(f);
                }
                return Err(e);
            }
            eprintln!("keyfs: created store {}", store.display());
            Ok(())
        }
        Cmd::Mount {
            store,
            mountpoint,
            read_only,
            mkdir_generates,
            cache,
            sealed,
            layout,
            destroy_delay,
        } => {
            let destroy_delay_ns = parse_duration(destroy_delay)?;
            let mk = cli.source().load()?;
            crate::fs::mount(
                store,
                mountpoint,
                &mk,
                MountOptions {
                    read_only: *read_only,
                    mkdir_generates: *mkdir_generates == MkdirGenerates::Default,
                    cache: *cache,
                    sealed: *sealed,
                    acra: *layout == Layout::AcraV1,
                    destroy_delay_ns,
                },
            )
        }
        Cmd::Umount { mountpoint } => crate::fs::umount(mountpoint),
        Cmd::Generate {
            store,
            root,
            client_id,
            global,
            kinds: ks,
        } => {
            if client_id.is_none() && !global {
                return err(Kind::Usage, "say what to generate: --client-id ID (a client's keys) or --global (poison and audit keys)");
            }
            let names: Vec<String> = if ks.is_empty() {
                DEFAULT_CLIENT_KEYS.iter().map(|s| s.to_string()).collect()
            } else {
                ks.clone()
            };
            match store {
                Some(s) => {
                    let inv = cli.open(s)?;
                    if let Some(id) = client_id {
                        let cid = ClientId::parse(id.as_bytes())?;
                        let dir = inv.ensure_client(&cid, &ctx)?;
                        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
                        inv.generate(dir, &refs, &ctx)?;
                    }
                    if *global {
                        for (dir, name) in GLOBAL_KEYS {
                            inv.generate(*dir, &[name], &ctx)?;
                        }
                    }
                    Ok(())
                }
                None => {
                    let root = root
                        .clone()
                        .ok_or_else(|| usage("give --store STORE, or the mountpoint as ROOT"))?;
                    let root = mount_root(&root)?;
                    let mut targets: Vec<PathBuf> = Vec::new();
                    if let Some(id) = client_id {
                        let cid = ClientId::parse(id.as_bytes())?;
                        let dir = root.join("clients").join(cid.as_str());
                        if !dir.exists() {
                            std::fs::create_dir(&dir).map_err(|e| io_err(&dir, e))?;
                        }
                        targets.extend(names.iter().map(|n| dir.join(n)));
                    }
                    if *global {
                        targets.extend([
                            root.join("poison/poison_key"),
                            root.join("poison/poison_key_sym"),
                            root.join("audit/secure_log_key"),
                        ]);
                    }
                    for t in targets {
                        let kind = KeyKind::for_name(
                            t.file_name()
                                .map(|n| n.as_encoded_bytes())
                                .unwrap_or_default(),
                        );
                        if t.exists()
                            || kinds::private_name(
                                t.file_name()
                                    .map(|n| n.as_encoded_bytes())
                                    .unwrap_or_default(),
                            )
                            .is_none()
                        {
                            replace_through_mount(&t, kinds::generate(kind).expose())?;
                        }
                    }
                    Ok(())
                }
            }
        }
        Cmd::Rotate { store, key, from } => {
            match store {
                Some(s) => {
                    let inv = cli.open(s)?;
                    let ino = inv.resolve(key)?;
                    let ver = match from {
                        Some(f) => {
                            inv.write_existing(ino, &read_input(f)?, &ctx)?;
                            0
                        }
                        None => match ino {
                            Ino::Node(id) => inv.rotate_fresh(id, &ctx)?,
                            other => {
                                return err(
                                    Kind::Invalid,
                                    format!("{} is not a key", inv.ino_path(other)),
                                )
                            }
                        },
                    };
                    let _ = ver;
                }
                None => {
                    let p = Path::new(key);
                    let data = match from {
                        Some(f) => read_input(f)?,
                        None => kinds::generate(KeyKind::for_name(
                            p.file_name()
                                .map(|n| n.as_encoded_bytes())
                                .unwrap_or_default(),
                        )),
                    };
                    if !p.exists() {
                        return err(Kind::NotFound, format!("{key} does not exist; import a new key with cp, or name an existing one"));
                    }
                    replace_through_mount(p, data.expose())?;
                }
            }
            Ok(())
        }
        Cmd::Rollback {
            store,
            key,
            version,
        } => match store {
            Some(s) => {
                let inv = cli.open(s)?;
                let (id, v) = version_of(&inv, key, version)?;
                inv.rollback(id, v, &ctx)
            }
            None => {
                let p = Path::new(key);
                let old = PathBuf::from(format!("{key}.old")).join(version);
                std::fs::rename(&old, p).map_err(|e| io_err(&old, e))
            }
        },
        Cmd::List {
            store,
            root,
            json,
            versions,
        } => {
            let list = match store {
                Some(s) => {
                    let inv = cli.open(s)?;
                    let r = root.as_deref().unwrap_or("").trim_matches('/');
                    match inv.list(r) {
                        // A key whose current version is destroyed: list it from its directory.
                        Err(e) if e.kind() == Kind::NotFound && !r.is_empty() => {
                            let dir = r.rsplit_once('/').map(|x| x.0).unwrap_or("");
                            let hit: Vec<KeyInfo> = inv
                                .list(dir)
                                .map_err(|_| e.clone())?
                                .into_iter()
                                .filter(|k| k.path == r)
                                .collect();
                            if hit.is_empty() {
                                return Err(e);
                            }
                            hit
                        }
                        other => other?,
                    }
                }
                None => {
                    let r =
                        PathBuf::from(root.clone().ok_or_else(|| {
                            usage("give --store STORE, or a directory of a mount")
                        })?);
                    mount_root(&r)?;
                    list_mount(&r)?
                }
            };
            print_list(&list, *json, *versions)
        }
        Cmd::Read {
            store,
            key,
            version,
        } => {
            let data = match store {
                Some(s) => {
                    let inv = cli.open(s)?;
                    match version {
                        Some(v) => {
                            let (id, n) = version_of(&inv, key, v)?;
                            inv.read_version(id, n, &ctx)?
                        }
                        None => inv.read(inv.resolve(key)?, &ctx)?,
                    }
                }
                None => {
                    let p = match version {
                        Some(v) => PathBuf::from(format!("{key}.old")).join(v),
                        None => PathBuf::from(key),
                    };
                    SecretBytes::new(std::fs::read(&p).map_err(|e| io_err(&p, e))?)
                }
            };
            write_stdout(data.expose())
        }
        Cmd::Destroy {
            store,
            key,
            version,
        } => match store {
            Some(s) => {
                let inv = cli.open(s)?;
                match version {
                    Some(v) => {
                        let (id, n) = version_of(&inv, key, v)?;
                        if is_current(&inv, id, n)? {
                            let (parent, name) = inv.resolve_parent(key)?;
                            inv.unlink(parent, name.as_bytes(), &ctx)
                        } else {
                            let (_, name) = inv.parent_and_name(Ino::Ver(id, n));
                            inv.unlink(Ino::Old(id), &name, &ctx)
                        }
                    }
                    None => {
                        let (parent, name) = inv.resolve_parent(key)?;
                        inv.unlink(parent, name.as_bytes(), &ctx)
                    }
                }
            }
            None => {
                let p = match version {
                    Some(v) => PathBuf::from(format!("{key}.old")).join(v),
                    None => PathBuf::from(key),
                };
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))
            }
        },
        Cmd::Export {
            store,
            root,
            out,
            key_out,
            private,
        } => {
            let s = store.as_ref().ok_or_else(|| {
                usage(
                    "export needs --store STORE (stop the mount first, or export while unmounted)",
                )
            })?;
            let inv = cli.open(s)?;
            let (bundle, key) = inv.export(root.as_deref().unwrap_or(""), *private, &ctx)?;
            write_new_file(key_out, master::encode_base64(&key).as_bytes(), 0o600)?;
            if let Err(e) = write_new_file(out, &bundle, 0o600) {
                // We created the key file just now; a key without its bundle is useless.
                let _ = std::fs::remove_file(key_out);
                return Err(e);
            }
            eprintln!(
                "keyfs: wrote {} and its key {} — store them apart",
                out.display(),
                key_out.display()
            );
            Ok(())
        }
        Cmd::Import {
            store,
            root,
            bundle,
            key,
        } => {
            let s = store
                .as_ref()
                .ok_or_else(|| usage("import needs --store STORE"))?;
            let inv = cli.open(s)?;
            let b = std::fs::read(bundle).map_err(|e| {
                Error::new(
                    Kind::NotFound,
                    format!("cannot read bundle {}: {e}", bundle.display()),
                )
            })?;
            let k = read_export_key(key)?;
            let n = inv.import(&b, &k, root.as_deref().unwrap_or(""), &ctx)?;
            eprintln!("keyfs: imported {n} keys");
            Ok(())
        }
        Cmd::Rewrap {
            store,
            new_master_key_file,
        } => {
            let inv = cli.open(store)?;
            let new = master::read_key_file(new_master_key_file)?;
            let n = inv.rewrap(&new, &ctx)?;
            eprintln!(
                "keyfs: re-wrapped {n} key versions; use {} from now on",
                new_master_key_file.display()
            );
            Ok(())
        }
        Cmd::Compact { store } => {
            let inv = cli.open(store)?;
            let (before, after) = inv.compact(&ctx)?;
            eprintln!(
                "keyfs: compacted {}: {before} -> {after} bytes",
                store.display()
            );
            Ok(())
        }
        Cmd::Check { store } => {
            let inv = cli.open(store)?;
            let problems = inv.check()?;
            if problems.is_empty() {
                write_stdout(b"ok: every record authenticates and the audit chain verifies\n")
            } else {
                for p in &problems {
                    eprintln!("keyfs check: {p}");
                }
                err(Kind::Integrity, format!("{} problem(s) found; restore the named key versions from a backup (`keyfs import`) or destroy them; `audit log:` problems mean the store files were tampered with", problems.len()))
            }
        }
        Cmd::Audit { store, verify } => {
            let inv = cli.open(store)?;
            if *verify {
                let problems = inv.audit_verify()?;
                if problems.is_empty() {
                    write_stdout(
                        format!(
                            "ok: {} audit entries, chain intact\n",
                            inv.audit_lines()?.len()
                        )
                        .as_bytes(),
                    )
                } else {
                    for p in &problems {
                        eprintln!("keyfs audit: {p}");
                    }
                    err(
                        Kind::Integrity,
                        "the audit log was tampered with: see the entries named above",
                    )
                }
            } else {
                let mut s = inv.audit_lines()?.join("\n");
                s.push('\n');
                write_stdout(s.as_bytes())
            }
        }
    }
}

fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    Kind::Exists,
                    format!(
                        "{} already exists; keyfs does not overwrite files — choose another name",
                        path.display()
                    ),
                )
            } else {
                Error::new(
                    Kind::Store,
                    format!("cannot create {}: {e}", path.display()),
                )
            }
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::new(Kind::Store, format!("cannot write {}: {e}", path.display())))
}
