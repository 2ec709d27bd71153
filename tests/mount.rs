//! Mounted tests: a real `keyfs mount` per test in a temp dir, driven with
//! real syscalls and the tools operators and backup jobs use (`ls`, `stat`,
//! `cat`, `cp`, `mv`, `rm`, `tar`, `openssl`, `setpriv`, `getfattr`).
//!
//! Every test asserts what a user would see: exit status, the error text a
//! tool prints (strerror of the errno keyfs returned), file contents, modes,
//! owners, inode numbers, the audit trail, and — after unmounting — what the
//! store itself says (`keyfs list --store … --versions --json`, `keyfs check`).
//!
//! Needs root and /dev/fuse (a non-root run fails loudly; CI runs as root).
//! The [`Mounted`] guard always unmounts, also when a test panics.
//!
//! Run: `cargo test --test tests mount -- --test-threads=2`.

use crate::common::{assert_check_clean, errno_of, history, rand_bytes, stat_c, xattr};
use crate::common::{
    is_mounted, keyfs, master_key_file, run, run_as_nobody, sh, sha256_hex, tree_digest, Mounted,
};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

const C: &str = "clients/alice01";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// Read a file through the mount (a real open/read/close).
#[track_caller]
fn read(m: &Mounted, rel: &str) -> Vec<u8> {
    std::fs::read(m.path(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// `cat MNT/rel`, which must succeed.
#[track_caller]
fn cat(m: &Mounted, rel: &str) -> Vec<u8> {
    run("cat", &[m.p(rel)]).assert_ok().stdout.clone()
}

/// Write `data` to a file outside the mount (a source for `cp`).
fn outside(m: &Mounted, name: &str, data: &[u8]) -> String {
    let p = m.dir.path().join(name);
    std::fs::write(&p, data).unwrap();
    p.to_str().unwrap().to_owned()
}

/// Contents of every archived version of `rel`, in name (= time) order.
#[track_caller]
fn history_contents(m: &Mounted, rel: &str) -> Vec<Vec<u8>> {
    history(m, rel)
        .iter()
        .map(|n| read(m, &format!("{rel}.old/{n}")))
        .collect()
}

/// Names in a directory as `ls -A` prints them.
#[track_caller]
fn ls_names(m: &Mounted, rel: &str) -> Vec<String> {
    let o = run("ls", &["-A", &m.p(rel)]);
    o.assert_ok();
    o.text().lines().map(str::to_owned).collect()
}

/// `ls -ln --time-style=+%s DIR`: name → (mode string, links, uid, gid, size).
#[track_caller]
fn ls_ln(m: &Mounted, rel: &str) -> BTreeMap<String, (String, u64, u32, u32, u64)> {
    let o = run("ls", &["-ln", "--time-style=+%s", &m.p(rel)]);
    o.assert_ok();
    o.text()
        .lines()
        .filter(|l| !l.starts_with("total"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 7, "unexpected ls -l line: {l}");
            (
                f[6].to_owned(),
                (
                    f[0].trim_end_matches(['.', '+']).to_owned(),
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                    f[4].parse().unwrap(),
                ),
            )
        })
        .collect()
}

/// The hidden audit log as text.
fn audit(m: &Mounted) -> String {
    String::from_utf8(read(m, ".keyfs/audit")).expect("audit is text")
}

/// Wait (up to 5 s) for an audit line matching `pred`: reads are audited
/// asynchronously, in batches. Returns the line.
#[track_caller]
fn wait_audit(m: &Mounted, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let start = std::time::Instant::now();
    loop {
        let a = audit(m);
        if let Some(l) = a.lines().find(|l| pred(l)) {
            return l.to_owned();
        }
        if start.elapsed() > std::time::Duration::from_secs(5) {
            panic!("no audit entry for {what} within 5 s:\n{a}");
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

/// The key a `list` path belongs to: `k.old/<ts>` → `k`.
fn key_path(p: &str) -> &str {
    match p.rsplit_once('/') {
        Some((dir, last)) if is_archive_name(last) && dir.ends_with(".old") => {
            &dir[..dir.len() - 4]
        }
        _ => p,
    }
}

/// True when `name` looks like an archive name: RFC 3339, UTC, 9 fractional
/// digits, `Z` (e.g. 2026-11-28T21:40:05.123456789Z).
fn is_archive_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 30
        && b[29] == b'Z'
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| [4, 7, 10, 13, 16, 19, 29].contains(&i) || c.is_ascii_digit())
}

/// Every path under `root` (relative), with (inode, type char).
fn walk_inodes(root: &Path) -> BTreeMap<String, u64> {
    fn go(root: &Path, d: &Path, out: &mut BTreeMap<String, u64>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            out.insert(
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                md.ino(),
            );
            if md.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// Relative path → (file type, mode, uid, gid, sha256 or link target) of
/// everything under `root`: what a backup must reproduce.
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, u32, u32, String)> {
    fn go(root: &Path, d: &Path, out: &mut BTreeMap<String, (char, u32, u32, u32, String)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mode = md.permissions().mode() & 0o7777;
            let (t, content) = if md.is_dir() {
                ('d', String::new())
            } else if md.file_type().is_symlink() {
                (
                    'l',
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned(),
                )
            } else {
                ('f', sha256_hex(&std::fs::read(&p).unwrap()))
            };
            out.insert(rel, (t, mode, md.uid(), md.gid(), content));
            if md.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// The entries of `list --versions --json` for one path.
fn versions_of<'a>(list: &'a serde_json::Value, path: &str) -> Vec<&'a serde_json::Value> {
    list.as_array()
        .expect("list is an array")
        .iter()
        .filter(|e| e["path"] == path)
        .flat_map(|e| e["versions"].as_array().expect("versions").iter())
        .collect()
}

// ---------------------------------------------------------------------------
// the tree as `ls`, `stat`, `cat` and `openssl` see it
// ---------------------------------------------------------------------------

#[test]
fn ls_and_stat_show_a_generated_client() {
    let m = Mounted::with_client("alice01");
    let top = ls_ln(&m, "");
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        ["audit", "clients", "poison"],
        "top level (and .keyfs must not be listed)"
    );
    assert_eq!(top["clients"].0, "drwxr-xr-x");
    assert_eq!(top["poison"].0, "drwx------");
    assert_eq!(top["audit"].0, "drwx------");
    assert!(
        !ls_names(&m, "").contains(&".keyfs".to_owned()),
        "ls -A must not show .keyfs"
    );

    let clients = ls_ln(&m, "clients");
    assert_eq!(clients.keys().collect::<Vec<_>>(), ["alice01"]);
    assert_eq!(clients["alice01"].0, "drwx------");

    let l = ls_ln(&m, C);
    assert_eq!(
        l.keys().collect::<Vec<_>>(),
        ["hmac", "storage", "storage.pub", "storage_sym"]
    );
    for (name, mode, size) in [
        ("hmac", "-rw-------", Some(32)),
        ("storage_sym", "-rw-------", Some(32)),
        ("storage", "-rw-------", None),
        ("storage.pub", "-rw-r--r--", None),
    ] {
        let (m_, links, uid, gid, sz) = &l[name];
        assert_eq!(m_, mode, "{name} mode in ls -l");
        assert_eq!(*links, 1, "{name} link count");
        assert_eq!((*uid, *gid), (0, 0), "{name} owner (created by root)");
        if let Some(s) = size {
            assert_eq!(*sz, s, "{name} size");
        }
        // ls's size is the real size of what cat returns.
        assert_eq!(
            *sz,
            cat(&m, &format!("{C}/{name}")).len() as u64,
            "{name}: st_size must equal the bytes read"
        );
    }

    // stat(1): octal modes, types, sizes.
    assert_eq!(
        stat_c(&m, "%a %s %F", &format!("{C}/hmac")),
        "600 32 regular file"
    );
    assert_eq!(
        stat_c(&m, "%a %s %F", &format!("{C}/storage_sym")),
        "600 32 regular file"
    );
    assert_eq!(
        stat_c(&m, "%a %F", &format!("{C}/storage")),
        "600 regular file"
    );
    assert_eq!(
        stat_c(&m, "%a %F", &format!("{C}/storage.pub")),
        "644 regular file"
    );
    assert_eq!(stat_c(&m, "%a %F %U", C), "700 directory root");
    assert_eq!(stat_c(&m, "%a %F", "clients"), "755 directory");
    // Distinct inodes for distinct keys.
    let inos: BTreeSet<String> = ["hmac", "storage", "storage.pub", "storage_sym", ""]
        .iter()
        .map(|n| stat_c(&m, "%i", &format!("{C}/{n}")))
        .collect();
    assert_eq!(
        inos.len(),
        5,
        "every file and the directory have their own inode"
    );
    // statfs answers.
    run("stat", &["-f", m.mnt_str()]).assert_ok();
    run("df", &[m.mnt_str()]).assert_ok();
}

#[test]
fn cat_reads_keys_and_openssl_parses_the_p256_pair() {
    let m = Mounted::with_client("alice01");
    let storage = cat(&m, &format!("{C}/storage"));
    assert!(
        storage.starts_with(b"-----BEGIN PRIVATE KEY-----\n"),
        "storage is PKCS#8 PEM: {}",
        String::from_utf8_lossy(&storage[..storage.len().min(40)])
    );
    let sym = cat(&m, &format!("{C}/storage_sym"));
    let hmac = cat(&m, &format!("{C}/hmac"));
    assert_eq!((sym.len(), hmac.len()), (32, 32));
    assert_ne!(sym, hmac, "independent random keys");
    assert_ne!(sym, vec![0u8; 32]);

    // openssl reads the private key straight from the mount.
    run(
        "openssl",
        &["pkey", "-in", &m.p(&format!("{C}/storage")), "-noout"],
    )
    .assert_ok();
    let text = run(
        "openssl",
        &[
            "pkey",
            "-in",
            &m.p(&format!("{C}/storage")),
            "-noout",
            "-text",
        ],
    );
    text.assert_ok();
    assert!(
        text.text().contains("prime256v1") || text.text().contains("P-256"),
        "not a P-256 key:\n{}",
        text.text()
    );
    // The derived public key is exactly what openssl derives.
    let pubout = run(
        "openssl",
        &["pkey", "-in", &m.p(&format!("{C}/storage")), "-pubout"],
    );
    pubout.assert_ok();
    assert_eq!(
        pubout.text(),
        String::from_utf8(cat(&m, &format!("{C}/storage.pub"))).unwrap(),
        "storage.pub must equal `openssl pkey -pubout` of storage"
    );
    run(
        "openssl",
        &[
            "pkey",
            "-pubin",
            "-in",
            &m.p(&format!("{C}/storage.pub")),
            "-noout",
        ],
    )
    .assert_ok();

    // Reads are audited with who read.
    wait_audit(&m, "openssl reading storage", |l| {
        l.contains("op=read")
            && l.contains(&format!("path=\"{C}/storage\""))
            && l.contains("comm=\"openssl\"")
            && l.contains("uid=0")
            && l.contains("pid=")
    });
}

// ---------------------------------------------------------------------------
// rotation, rollback, destruction
// ---------------------------------------------------------------------------

#[test]
fn cp_over_a_key_rotates_it() {
    let m = Mounted::with_client("alice01");
    let key = format!("{C}/hmac");
    let old = read(&m, &key);
    let ino = stat_c(&m, "%i", &key);
    let new = rand_bytes(32);
    let src = outside(&m, "new-hmac", &new);
    assert!(history(&m, &key).is_empty());

    run("cp", &[src.as_str(), &m.p(&key)]).assert_ok();

    assert_eq!(cat(&m, &key), new, "cp must leave the new content current");
    let h = history(&m, &key);
    assert_eq!(h.len(), 1, "exactly one archived version: {h:?}");
    assert!(is_archive_name(&h[0]), "archive name format: {}", h[0]);
    let v = format!("{key}.old/{}", h[0]);
    assert_eq!(cat(&m, &v), old, "the previous content is archived");
    assert_eq!(stat_c(&m, "%a %s", &v), "400 32");
    assert_eq!(stat_c(&m, "%a", &format!("{key}.old")), "700");
    assert_eq!(
        stat_c(&m, "%i", &key),
        ino,
        "rotation keeps the key's inode"
    );
    assert_eq!(stat_c(&m, "%a", &key), "600", "rotation keeps the mode");

    // Archived versions are immutable, even for root.
    let e = errno_of(
        std::fs::OpenOptions::new().write(true).open(m.path(&v)),
        "open(archived version, O_WRONLY)",
    );
    assert_eq!(e, libc::EROFS, "writing an archived version");
    run("cp", &[src.as_str(), &m.p(&v)]).assert_fails_with("Read-only file system");
    assert_eq!(cat(&m, &v), old);

    // A second cp of identical content is still a rotation (a new version).
    run("cp", &[src.as_str(), &m.p(&key)]).assert_ok();
    assert_eq!(history(&m, &key).len(), 2);

    // `cp -p` rotates too, and the key keeps the source's time and mode.
    let src3 = outside(&m, "old-mtime", &rand_bytes(32));
    run("touch", &["-d", "2020-01-02 03:04:05 UTC", &src3]).assert_ok();
    run("chmod", &["640", &src3]).assert_ok();
    run("cp", &["-p", &src3, &m.p(&key)]).assert_ok();
    assert_eq!(cat(&m, &key), std::fs::read(&src3).unwrap());
    assert_eq!(history(&m, &key).len(), 3);
    assert_eq!(stat_c(&m, "%Y %a", &key), "1577934245 640");

    let a = audit(&m);
    assert_eq!(
        a.lines()
            .filter(|l| l.contains("op=rotate")
                && l.contains(&format!("path=\"{key}\""))
                && l.contains("comm=\"cp\""))
            .count(),
        3,
        "three rotations by cp in the audit log:\n{a}"
    );
}

#[test]
fn mv_of_a_temp_file_over_a_key_is_an_atomic_rotation() {
    let m = Mounted::with_client("alice01");
    // An opaque secret, replaced the way editors/Ansible do it.
    let key = format!("{C}/db-password");
    std::fs::write(m.path(&key), b"v1").unwrap();
    let ino = stat_c(&m, "%i", &key);
    let tmp = format!("{C}/.db-password.tmp");
    std::fs::write(m.path(&tmp), b"v2-new").unwrap();
    std::fs::set_permissions(m.path(&tmp), std::fs::Permissions::from_mode(0o640)).unwrap();

    run("mv", &[m.p(&tmp), m.p(&key)]).assert_ok();

    assert_eq!(cat(&m, &key), b"v2-new");
    assert!(!m.path(&tmp).exists(), "the temp file is gone after mv");
    assert!(!ls_names(&m, C).contains(&".db-password.tmp".to_owned()));
    assert_eq!(history_contents(&m, &key), vec![b"v1".to_vec()]);
    assert_eq!(
        stat_c(&m, "%a", &key),
        "640",
        "the key takes the temp file's mode"
    );
    assert_eq!(stat_c(&m, "%i", &key), ino, "the key keeps its identity");
    assert!(
        history(&m, ".db-password.tmp").is_empty(),
        "the temp name leaves no history behind"
    );

    // The same with a real P-256 key from openssl, through rename(2): the
    // derived public key follows the new private key.
    let storage = format!("{C}/storage");
    let old_storage = read(&m, &storage);
    let newkey = format!("{C}/storage.new");
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &m.p(&newkey),
        ],
    )
    .assert_ok();
    let new_storage = read(&m, &newkey);
    std::fs::rename(m.path(&newkey), m.path(&storage)).unwrap();
    assert_eq!(read(&m, &storage), new_storage);
    assert_eq!(history_contents(&m, &storage), vec![old_storage]);
    let pubout = run("openssl", &["pkey", "-in", &m.p(&storage), "-pubout"]);
    pubout.assert_ok();
    assert_eq!(
        cat(&m, &format!("{C}/storage.pub")),
        pubout.stdout,
        "storage.pub is re-derived from the rotated private key"
    );
}

#[test]
fn mv_of_an_archived_version_over_its_key_rolls_back() {
    let m = Mounted::with_client("alice01");
    let key = format!("{C}/hmac");
    let v1 = read(&m, &key);
    let v2 = rand_bytes(32);
    let v3 = rand_bytes(32);
    run("cp", &[outside(&m, "v2", &v2).as_str(), &m.p(&key)]).assert_ok();
    run("cp", &[outside(&m, "v3", &v3).as_str(), &m.p(&key)]).assert_ok();
    let h = history(&m, &key);
    assert_eq!(history_contents(&m, &key), vec![v1.clone(), v2.clone()]);
    assert_eq!(xattr(&m, &key, "user.keyfs.version"), "3");

    run("mv", &[m.p(&format!("{key}.old/{}", h[0])), m.p(&key)]).assert_ok();

    assert_eq!(cat(&m, &key), v1, "the chosen version is current again");
    assert_eq!(xattr(&m, &key, "user.keyfs.version"), "1");
    let h2 = history(&m, &key);
    assert_eq!(h2.len(), 2, "{h2:?}");
    assert!(
        !h2.contains(&h[0]),
        "the rolled-back version left the history"
    );
    assert!(h2.contains(&h[1]), "the other archived version stays");
    assert_eq!(
        history_contents(&m, &key),
        vec![v2, v3],
        "the displaced current (v3) is archived, newest last"
    );
    assert!(
        audit(&m)
            .lines()
            .any(|l| l.contains("op=rollback") && l.contains("comm=\"mv\"")),
        "rollback is audited"
    );
}

#[test]
fn rm_destroys_the_current_version_and_keeps_history() {
    let mut m = Mounted::with_client("alice01");
    let key = format!("{C}/api-token");
    std::fs::write(m.path(&key), b"token-v1").unwrap();
    run("cp", &[outside(&m, "v2", b"token-v2").as_str(), &m.p(&key)]).assert_ok();
    assert_eq!(history_contents(&m, &key), vec![b"token-v1".to_vec()]);

    run("rm", &[m.p(&key)]).assert_ok();

    let e = errno_of(std::fs::metadata(m.path(&key)), "stat of a destroyed key");
    assert_eq!(e, libc::ENOENT);
    run("cat", &[m.p(&key)]).assert_fails_with("No such file or directory");
    let names = ls_names(&m, C);
    assert!(!names.contains(&"api-token".to_owned()), "{names:?}");
    assert!(names.contains(&"api-token.old".to_owned()), "{names:?}");
    assert_eq!(history_contents(&m, &key), vec![b"token-v1".to_vec()]);

    // A tombstone in the audit log, with who did it.
    let a = audit(&m);
    let line = a
        .lines()
        .find(|l| l.contains("op=destroy") && l.contains(&format!("path=\"{key}\"")))
        .unwrap_or_else(|| panic!("no destroy entry for {key}:\n{a}"));
    for field in ["uid=0", "gid=0", "comm=\"rm\"", "version=2", "pid="] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    assert!(
        !line.contains("token-v2"),
        "the audit log must not contain material"
    );

    // Still so after a remount.
    m.remount();
    assert!(!m.path(&key).exists());
    assert_eq!(history_contents(&m, &key), vec![b"token-v1".to_vec()]);

    // Destroying the last archived version leaves an empty history
    // directory, as any directory stays until rmdir; then nothing is left.
    let h = history(&m, &key);
    run("rm", &[m.p(&format!("{key}.old/{}", h[0]))]).assert_ok();
    assert!(history(&m, &key).is_empty());
    assert_eq!(stat_c(&m, "%F", &format!("{key}.old")), "directory");
    run("rmdir", &[m.p(&format!("{key}.old"))]).assert_ok();
    assert!(
        !ls_names(&m, C).iter().any(|n| n.starts_with("api-token")),
        "nothing left of api-token"
    );

    m.unmount_clean();
    let list = m.list_versions();
    let vs: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| key_path(e["path"].as_str().unwrap()) == key)
        .flat_map(|e| e["versions"].as_array().unwrap())
        .collect();
    assert_eq!(vs.len(), 2, "both versions are tombstoned: {list:#}");
    assert!(vs.iter().all(|v| v["state"] == "destroyed"), "{vs:?}");
    assert_check_clean(&m);
}

#[test]
fn rm_r_of_a_client_destroys_everything_below() {
    let mut m = Mounted::with_client("alice01");
    run(
        "cp",
        &[
            outside(&m, "h", &rand_bytes(32)).as_str(),
            &m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    std::fs::create_dir(m.path(&format!("{C}/tls"))).unwrap();
    std::fs::write(m.path(&format!("{C}/tls/server.key")), b"tls secret").unwrap();
    run("ln", &["-s", "storage", &m.p(&format!("{C}/link"))]).assert_ok();

    run("rm", &["-r", &m.p(C)]).assert_ok();

    assert_eq!(
        errno_of(std::fs::metadata(m.path(C)), "stat of removed client"),
        libc::ENOENT
    );
    assert!(ls_names(&m, "clients").is_empty());
    let status: serde_json::Value = serde_json::from_slice(&read(&m, ".keyfs/status")).unwrap();
    assert_eq!(status["clients"], 0, "{status}");

    m.unmount_clean();
    let list = m.list_versions();
    let entries: Vec<&serde_json::Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"].as_str().unwrap().starts_with("clients/alice01/"))
        .collect();
    let paths: BTreeSet<&str> = entries
        .iter()
        .map(|e| key_path(e["path"].as_str().unwrap()))
        .collect();
    for p in [
        "clients/alice01/storage",
        "clients/alice01/storage_sym",
        "clients/alice01/hmac",
        "clients/alice01/tls/server.key",
    ] {
        assert!(paths.contains(p), "{p} missing from list: {paths:?}");
    }
    let states: Vec<&serde_json::Value> = entries
        .iter()
        .flat_map(|e| e["versions"].as_array().unwrap())
        .collect();
    assert!(
        states.len() >= 5,
        "storage, storage_sym, hmac ×2, tls/server.key: {states:?}"
    );
    assert!(
        states.iter().all(|v| v["state"] == "destroyed"),
        "every version below the client must be destroyed: {list:#}"
    );
    assert!(
        states.iter().all(|v| v.get("fingerprint").is_none()),
        "a tombstone keeps no fingerprint of destroyed material"
    );
    assert_check_clean(&m);
}

#[test]
fn list_names_an_entirely_destroyed_key_by_its_key_path() {
    let mut m = Mounted::with_client("alice01");
    run(
        "cp",
        &[
            outside(&m, "h", &rand_bytes(32)).as_str(),
            &m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    run("rm", &["-r", &m.p(C)]).assert_ok();
    m.unmount_clean();
    let list = m.list_versions();
    let paths: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"clients/alice01/hmac"), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains(".old/")), "{paths:?}");
    assert_eq!(versions_of(&list, "clients/alice01/hmac").len(), 2);
}

// ---------------------------------------------------------------------------
// mkdir
// ---------------------------------------------------------------------------

#[test]
fn mkdir_of_a_client_generates_the_default_set() {
    let m = Mounted::new(&[]);
    run("mkdir", &[m.p("clients/bob_02")]).assert_ok();
    assert_eq!(stat_c(&m, "%a %F", "clients/bob_02"), "700 directory");
    let l = ls_ln(&m, "clients/bob_02");
    assert_eq!(
        l.keys().collect::<Vec<_>>(),
        ["hmac", "storage", "storage.pub", "storage_sym"]
    );
    assert_eq!(l["hmac"].0, "-rw-------");
    assert_eq!(l["storage.pub"].0, "-rw-r--r--");
    assert_eq!(read(&m, "clients/bob_02/hmac").len(), 32);
    assert_eq!(read(&m, "clients/bob_02/storage_sym").len(), 32);
    run(
        "openssl",
        &["pkey", "-in", &m.p("clients/bob_02/storage"), "-noout"],
    )
    .assert_ok();

    // Free grouping below a client: an empty 0700 directory, keys inside work.
    run("mkdir", &[m.p("clients/bob_02/tls")]).assert_ok();
    assert_eq!(stat_c(&m, "%F", "clients/bob_02/tls"), "directory");
    assert!(ls_names(&m, "clients/bob_02/tls").is_empty());
    std::fs::write(m.path("clients/bob_02/tls/ca.pem"), b"not secret").unwrap();
    assert_eq!(cat(&m, "clients/bob_02/tls/ca.pem"), b"not secret");

    // mkdir of an existing client: EEXIST.
    run("mkdir", &[m.p("clients/bob_02")]).assert_fails_with("File exists");
    // Directories outside clients/ are refused.
    assert!(!run("mkdir", &[m.p("toplevel")]).ok());
}

#[test]
fn mkdir_modes_clients_at_most_0700_subdirectories_as_requested() {
    let m = Mounted::with_client("alice01");
    // A client directory is at most 0700 whatever mkdir(2) asks for (the
    // umask gives 0755 here; `mkdir -m` would chmod afterwards, which widens).
    sh(&format!("umask 022; mkdir '{}'", m.p("clients/bob00002"))).assert_ok();
    assert_eq!(stat_c(&m, "%a", "clients/bob00002"), "700");
    // A grouping subdirectory takes the requested mode, like on any filesystem.
    run("mkdir", &["-m", "750", &m.p(&format!("{C}/tls"))]).assert_ok();
    assert_eq!(stat_c(&m, "%a", &format!("{C}/tls")), "750");
    run("chmod", &["700", &m.p(&format!("{C}/tls"))]).assert_ok();
    assert_eq!(stat_c(&m, "%a", &format!("{C}/tls")), "700");
}

#[test]
fn mkdir_of_an_invalid_client_id_is_einval() {
    let m = Mounted::new(&[]);
    let long = "a".repeat(255);
    for bad in [
        "abcd",
        "a.b.c.d",
        "bad:name",
        "tab\there",
        "ünïcödé",
        "x*y*z",
    ] {
        run("mkdir", &[m.p(&format!("clients/{bad}"))]).assert_fails_with("Invalid argument");
        assert_eq!(
            errno_of(
                std::fs::create_dir(m.path(&format!("clients/{bad}"))),
                &format!("mkdir clients/{bad:?}")
            ),
            libc::EINVAL,
            "mkdir clients/{bad:?}"
        );
    }
    assert!(ls_names(&m, "clients").is_empty(), "nothing was created");
    // The boundaries that are valid: 5 characters, and 255 (Linux's NAME_MAX:
    // Acra's 256-character limit cannot be reached through a mount).
    for good in ["abcde", "with space", "A-Z_0-9", long.as_str()] {
        std::fs::create_dir(m.path(&format!("clients/{good}")))
            .unwrap_or_else(|e| panic!("mkdir clients/{good}: {e}"));
    }
    assert_eq!(ls_names(&m, "clients").len(), 4);
    let e = errno_of(
        std::fs::create_dir(m.path(&format!("clients/{}", "b".repeat(256)))),
        "mkdir of a 256-byte name",
    );
    assert_eq!(e, libc::ENAMETOOLONG);
}

// ---------------------------------------------------------------------------
// ownership, permissions, identity
// ---------------------------------------------------------------------------

#[test]
fn chmod_and_chown_persist_across_remount() {
    let mut m = Mounted::with_client("alice01");
    run("chmod", &["640", &m.p(&format!("{C}/hmac"))]).assert_ok();
    run("chown", &["65534:65534", &m.p(&format!("{C}/storage_sym"))]).assert_ok();
    run("chown", &["1000:1001", &m.p(C)]).assert_ok();
    run("chmod", &["750", &m.p(C)]).assert_ok();
    std::fs::write(m.path(&format!("{C}/note")), b"x").unwrap();
    run("chmod", &["0400", &m.p(&format!("{C}/note"))]).assert_ok();

    let expect = |m: &Mounted| {
        assert_eq!(stat_c(m, "%a %u %g", &format!("{C}/hmac")), "640 0 0");
        assert_eq!(
            stat_c(m, "%a %u %g", &format!("{C}/storage_sym")),
            "600 65534 65534"
        );
        assert_eq!(stat_c(m, "%a %u %g", C), "750 1000 1001");
        assert_eq!(stat_c(m, "%a", &format!("{C}/note")), "400");
    };
    expect(&m);
    m.remount();
    expect(&m);

    let a = audit(&m);
    assert!(a.contains("op=chmod"), "chmod is audited:\n{a}");
    assert!(a.contains("op=chown"), "chown is audited:\n{a}");

    // chmod of a file a rotation replaces: the mode survives the rotation.
    run(
        "cp",
        &[
            outside(&m, "h", &rand_bytes(32)).as_str(),
            &m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    assert_eq!(stat_c(&m, "%a", &format!("{C}/hmac")), "640");
}

#[test]
fn inode_numbers_are_stable_across_remount() {
    let mut m = Mounted::with_client("alice01");
    run(
        "cp",
        &[
            outside(&m, "h", &rand_bytes(32)).as_str(),
            &m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    std::fs::create_dir(m.path(&format!("{C}/tls"))).unwrap();
    std::fs::write(m.path(&format!("{C}/tls/k")), b"k").unwrap();
    std::os::unix::fs::symlink("storage", m.path(&format!("{C}/cur"))).unwrap();
    let before = walk_inodes(&m.mnt);
    assert!(before.len() >= 11, "{before:?}");
    let distinct: BTreeSet<u64> = before.values().copied().collect();
    assert_eq!(
        distinct.len(),
        before.len(),
        "inodes are unique: {before:?}"
    );
    // ls -i agrees with stat(2).
    let ls = run("ls", &["-i", &m.p(C)]).assert_ok().text();
    assert!(
        ls.contains(&format!("{} hmac", before[&format!("{C}/hmac")])),
        "{ls}"
    );

    m.remount();
    assert_eq!(
        walk_inodes(&m.mnt),
        before,
        "every inode number survives a remount"
    );
}

#[test]
fn another_uid_is_denied_a_0600_key_until_chmod_or_chown() {
    let m = Mounted::with_client("alice01");
    let key = m.p(&format!("{C}/hmac"));
    // The client directory is 0700 root: nobody cannot even reach the keys.
    run_as_nobody("cat", &[&key]).assert_fails_with("Permission denied");
    run("chmod", &["755", &m.p(C)]).assert_ok();

    run_as_nobody("cat", &[&key]).assert_fails_with("Permission denied");
    run_as_nobody("cat", &[m.p(&format!("{C}/storage"))]).assert_fails_with("Permission denied");
    // The public key is 0644: readable.
    let pubk = run_as_nobody("cat", &[m.p(&format!("{C}/storage.pub"))]);
    pubk.assert_ok();
    assert!(pubk.text().starts_with("-----BEGIN PUBLIC KEY-----"));

    run("chmod", &["644", &key]).assert_ok();
    let o = run_as_nobody("cat", &[&key]);
    o.assert_ok();
    assert_eq!(o.stdout, read(&m, &format!("{C}/hmac")));
    // Readable is not writable.
    run_as_nobody("sh", &["-c", &format!("printf x > '{key}'")])
        .assert_fails_with("Permission denied");

    run("chmod", &["600", &key]).assert_ok();
    run_as_nobody("cat", &[&key]).assert_fails_with("Permission denied");

    let sym = m.p(&format!("{C}/storage_sym"));
    run_as_nobody("cat", &[&sym]).assert_fails_with("Permission denied");
    run("chown", &["65534", &sym]).assert_ok();
    let o = run_as_nobody("cat", &[&sym]);
    o.assert_ok();
    assert_eq!(o.stdout.len(), 32);
    // The owner (nobody) may rotate its key, and the result is its own.
    let newsym = m.dir.path().join("newsym");
    std::fs::write(&newsym, rand_bytes(32)).unwrap();
    std::fs::set_permissions(&newsym, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    run_as_nobody("cp", &[newsym.to_str().unwrap(), &sym]).assert_ok();
    assert_eq!(
        read(&m, &format!("{C}/storage_sym")),
        std::fs::read(&newsym).unwrap()
    );
    // nobody may not create clients.
    run_as_nobody("mkdir", &[m.p("clients/nobody01")]).assert_fails_with("Permission denied");

    wait_audit(&m, "nobody reading hmac", |l| {
        l.contains("op=read")
            && l.contains(&format!("path=\"{C}/hmac\""))
            && l.contains("uid=65534")
            && l.contains("gid=65534")
            && l.contains("comm=\"cat\"")
    });
    // The audit log itself is root-only.
    assert_eq!(stat_c(&m, "%a %u", ".keyfs/audit"), "400 0");
    run_as_nobody("cat", &[m.p(".keyfs/audit")]).assert_fails_with("Permission denied");
}

// ---------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------

#[test]
fn invalid_material_is_refused_and_nothing_changes() {
    let m = Mounted::with_client("alice01");
    let hmac = format!("{C}/hmac");
    let before = read(&m, &hmac);

    let o = run(
        "cp",
        &[outside(&m, "b31", &rand_bytes(31)).as_str(), &m.p(&hmac)],
    );
    o.assert_fails_with("Invalid argument");
    assert_eq!(read(&m, &hmac), before, "content unchanged");
    assert!(history(&m, &hmac).is_empty(), "no archived version");
    assert_eq!(xattr(&m, &hmac, "user.keyfs.version"), "1");

    // 33 bytes through write(2)+close(2): close reports EINVAL.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path(&format!("{C}/storage_sym")))
            .unwrap();
        f.write_all(&rand_bytes(33)).unwrap();
        let fd = std::os::unix::io::IntoRawFd::into_raw_fd(f);
        // SAFETY: fd was just taken from the File; closed exactly once here.
        let rc = unsafe { libc::close(fd) };
        assert_eq!(rc, -1, "close must report the invalid key");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
    assert_eq!(read(&m, &format!("{C}/storage_sym")).len(), 32);
    assert!(history(&m, &format!("{C}/storage_sym")).is_empty());

    // storage must be a P-256 private key.
    let storage = format!("{C}/storage");
    let st_before = read(&m, &storage);
    run(
        "cp",
        &[
            outside(&m, "junk", b"-----BEGIN PRIVATE KEY-----\nnope\n").as_str(),
            &m.p(&storage),
        ],
    )
    .assert_fails_with("Invalid argument");
    let p384 = m.dir.path().join("p384.pem");
    run(
        "openssl",
        &[
            OsStr::new("genpkey"),
            OsStr::new("-algorithm"),
            OsStr::new("EC"),
            OsStr::new("-pkeyopt"),
            OsStr::new("ec_paramgen_curve:P-384"),
            OsStr::new("-out"),
            p384.as_os_str(),
        ],
    )
    .assert_ok();
    run("cp", &[p384.to_str().unwrap(), &m.p(&storage)]).assert_fails_with("Invalid argument");
    assert_eq!(read(&m, &storage), st_before);
    assert!(history(&m, &storage).is_empty());

    // storage.pub is derived: identical content accepted, different refused.
    let pubk = format!("{C}/storage.pub");
    let pub_before = read(&m, &pubk);
    run(
        "cp",
        &[outside(&m, "same.pub", &pub_before).as_str(), &m.p(&pubk)],
    )
    .assert_ok();
    run(
        "cp",
        &[outside(&m, "other.pub", b"garbage\n").as_str(), &m.p(&pubk)],
    )
    .assert_fails_with("Operation not permitted");
    assert_eq!(read(&m, &pubk), pub_before);

    // A new key of a known kind with bad material never appears.
    std::fs::create_dir(m.path(&format!("{C}/sub"))).unwrap();
    run(
        "cp",
        &[
            outside(&m, "b5", b"short").as_str(),
            &m.p(&format!("{C}/sub/hmac")),
        ],
    )
    .assert_fails_with("Invalid argument");
    assert!(!m.path(&format!("{C}/sub/hmac")).exists());

    // Reserved and misplaced names.
    sh(&format!("printf x > '{}'", m.p(&format!("{C}/foo.old"))))
        .assert_fails_with("Invalid argument");
    sh(&format!("printf x > '{}'", m.p("clients/file")))
        .assert_fails_with("Operation not permitted");
    sh(&format!("printf x > '{}'", m.p("file"))).assert_fails_with("Operation not permitted");
    assert_eq!(
        ls_names(&m, C),
        ["hmac", "storage", "storage.pub", "storage_sym", "sub"],
        "nothing new appeared"
    );
}

#[test]
fn oversize_writes_are_efbig_and_commit_nothing() {
    let m = Mounted::with_client("alice01");
    let big = format!("{C}/big");
    sh(&format!("head -c 70000 /dev/zero > '{}'", m.p(&big))).assert_fails_with("File too large");
    assert!(
        !m.path(&big).exists(),
        "a failed oversize write must not leave a truncated secret behind"
    );

    // Exactly 64 KiB is fine.
    let max = format!("{C}/max");
    let data = rand_bytes(64 * 1024);
    std::fs::write(m.path(&max), &data).unwrap();
    assert_eq!(stat_c(&m, "%s", &max), "65536");
    assert_eq!(read(&m, &max), data);

    // cp of an oversize file over an existing secret: refused, unchanged.
    let sec = format!("{C}/secret");
    std::fs::write(m.path(&sec), b"keep me").unwrap();
    let src = outside(&m, "70000", &rand_bytes(70000));
    run("cp", &[src.as_str(), &m.p(&sec)]).assert_fails_with("File too large");
    assert_eq!(read(&m, &sec), b"keep me", "the secret is unchanged");
    assert!(history(&m, &sec).is_empty(), "no rotation happened");
    run("truncate", &["-s", "70000", &m.p(&sec)]).assert_fails_with("File too large");
    assert_eq!(read(&m, &sec), b"keep me");
    assert!(history(&m, &sec).is_empty());

    // At the syscall level: write(2) past 64 KiB is EFBIG.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(m.path(&format!("{C}/seek"))).unwrap();
        f.seek(SeekFrom::Start(65536)).unwrap();
        let e = errno_of(f.write(b"x"), "write at offset 64 KiB");
        assert_eq!(e, libc::EFBIG);
    }
    assert!(!m.path(&format!("{C}/seek")).exists());
}

#[test]
fn link_and_mknod_are_eperm() {
    let m = Mounted::with_client("alice01");
    let hmac = m.p(&format!("{C}/hmac"));
    run("ln", &[hmac.as_str(), &m.p(&format!("{C}/hard"))])
        .assert_fails_with("Operation not permitted");
    assert_eq!(
        errno_of(
            std::fs::hard_link(m.path(&format!("{C}/hmac")), m.path(&format!("{C}/hard2"))),
            "link(2)"
        ),
        libc::EPERM
    );
    run("mkfifo", &[m.p(&format!("{C}/fifo"))]).assert_fails_with("Operation not permitted");
    run(
        "mknod",
        &[
            m.p(&format!("{C}/null")),
            "c".into(),
            "1".into(),
            "3".into(),
        ],
    )
    .assert_fails_with("Operation not permitted");
    assert_eq!(
        ls_names(&m, C),
        ["hmac", "storage", "storage.pub", "storage_sym"],
        "nothing was created"
    );
    assert_eq!(stat_c(&m, "%h", &format!("{C}/hmac")), "1");
}

// ---------------------------------------------------------------------------
// concurrency and crashes
// ---------------------------------------------------------------------------

#[test]
fn concurrent_mv_rotations_leave_a_consistent_history() {
    let mut m = Mounted::with_client("alice01");
    let key = format!("{C}/shared");
    std::fs::write(m.path(&key), b"base").unwrap();
    const N: usize = 50;
    // Two shell processes, each doing N write-temp + `mv` rotations with
    // distinct contents.
    let workers: Vec<_> = ["a", "b"]
        .iter()
        .map(|w| {
            let script = format!(
                "set -e; i=1; while [ $i -le {N} ]; do printf '{w}-%d' $i > '{tmp}'; mv '{tmp}' '{key}'; i=$((i+1)); done",
                tmp = m.p(&format!("{C}/tmp-{w}")),
                key = m.p(&key),
            );
            std::thread::spawn(move || sh(&script))
        })
        .collect();
    for w in workers {
        w.join().unwrap().assert_ok();
    }

    let mut all: Vec<String> = history_contents(&m, &key)
        .into_iter()
        .map(|c| String::from_utf8(c).unwrap())
        .collect();
    let current = String::from_utf8(read(&m, &key)).unwrap();
    assert!(
        current == format!("a-{N}") || current == format!("b-{N}"),
        "the last rotation of one worker is current: {current}"
    );
    all.push(current);
    let expected: BTreeSet<String> = std::iter::once("base".to_owned())
        .chain((1..=N).flat_map(|i| [format!("a-{i}"), format!("b-{i}")]))
        .collect();
    let got: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(got.len(), all.len(), "no content appears twice");
    assert_eq!(
        got, expected,
        "every rotation's content is current or archived"
    );
    assert_eq!(all.len(), 2 * N + 1);
    // Each worker's contents appear in its own order in the history.
    for w in ["a", "b"] {
        let seq: Vec<usize> = all
            .iter()
            .filter_map(|c| c.strip_prefix(&format!("{w}-")))
            .map(|n| n.parse().unwrap())
            .collect();
        assert!(seq.windows(2).all(|p| p[0] < p[1]), "{w}: {seq:?}");
    }
    assert!(!m.path(&format!("{C}/tmp-a")).exists());
    assert!(!m.path(&format!("{C}/tmp-b")).exists());

    m.unmount_clean();
    let list = m.list_versions();
    let vs = versions_of(&list, &key);
    let vs: Vec<_> = vs
        .into_iter()
        .filter(|v| v["state"] != "destroyed")
        .collect();
    assert_eq!(vs.len(), 2 * N + 1, "versions of {key} in the store");
    assert_eq!(vs.iter().filter(|v| v["state"] == "current").count(), 1);
    assert_check_clean(&m);
}

#[test]
fn kill_9_right_after_a_rotation_loses_nothing() {
    let mut m = Mounted::with_client("alice01");
    let key = format!("{C}/hmac");
    let mut expected_history = vec![read(&m, &key)];
    for round in 0..3 {
        let new = rand_bytes(32);
        let tmp = format!("{C}/hmac.tmp{round}");
        std::fs::write(m.path(&tmp), &new).unwrap();
        run("mv", &[m.p(&tmp), m.p(&key)]).assert_ok();
        // A new import, committed at close, just before the crash too.
        std::fs::write(
            m.path(&format!("{C}/import{round}")),
            format!("import {round}"),
        )
        .unwrap();
        m.kill9();
        let opts: Vec<String> = m.opts.clone();
        m.mount(&opts.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            read(&m, &key),
            new,
            "round {round}: the rotation survived kill -9"
        );
        assert_eq!(
            history_contents(&m, &key),
            expected_history,
            "round {round}"
        );
        assert_eq!(
            read(&m, &format!("{C}/import{round}")),
            format!("import {round}").as_bytes()
        );
        assert!(!m.path(&tmp).exists());
        expected_history.push(new);
    }
    m.unmount_clean();
    assert_check_clean(&m);
}

// ---------------------------------------------------------------------------
// mount options and refusals
// ---------------------------------------------------------------------------

#[test]
fn read_only_mount_refuses_writes_with_erofs() {
    let mut m = Mounted::with_client("alice01");
    std::fs::write(m.path(&format!("{C}/secret")), b"s").unwrap();
    m.unmount_clean();
    m.mount(&["--read-only"]);
    let line = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.contains(m.mnt_str()))
        .unwrap()
        .to_owned();
    assert!(
        line.split(' ')
            .nth(3)
            .unwrap()
            .split(',')
            .any(|o| o == "ro"),
        "{line}"
    );

    let snap = snapshot(&m.mnt);
    let hmac = m.p(&format!("{C}/hmac"));
    assert_eq!(read(&m, &format!("{C}/hmac")).len(), 32, "reads work");
    let src = outside(&m, "h", &rand_bytes(32));
    let ro = "Read-only file system";
    run("cp", &[src.as_str(), &hmac]).assert_fails_with(ro);
    sh(&format!("printf x > '{}'", m.p(&format!("{C}/new")))).assert_fails_with(ro);
    run("rm", &[m.p(&format!("{C}/secret"))]).assert_fails_with(ro);
    run("mv", &[hmac.clone(), m.p(&format!("{C}/hmac2"))]).assert_fails_with(ro);
    run("mkdir", &[m.p("clients/bob_02")]).assert_fails_with(ro);
    run("chmod", &["644", &hmac]).assert_fails_with(ro);
    run("chown", &["65534", &hmac]).assert_fails_with(ro);
    run("touch", &[&hmac]).assert_fails_with(ro);
    run("ln", &["-s", "x", &m.p(&format!("{C}/l"))]).assert_fails_with(ro);
    run("rmdir", &[m.p(C)]).assert_fails_with(ro);
    assert_eq!(
        errno_of(
            std::fs::OpenOptions::new()
                .write(true)
                .open(m.path(&format!("{C}/hmac"))),
            "open O_WRONLY on a read-only mount"
        ),
        libc::EROFS
    );
    assert_eq!(snapshot(&m.mnt), snap, "nothing changed");
    let status: serde_json::Value = serde_json::from_slice(&read(&m, ".keyfs/status")).unwrap();
    assert_eq!(status["read_only"], true);
}

#[test]
fn mount_refuses_a_non_empty_mountpoint_and_a_wrong_master_key() {
    let m = Mounted::unmounted();
    m.keyfs_mk(&[
        "generate",
        "--store",
        m.store_str(),
        "--client-id",
        "alice01",
    ])
    .assert_ok();
    // What must not change: the database and its config. Excluded: `lock`
    // (records the pid of the last opener) and sled's `snap.*` files (sled
    // rewrites its snapshot whenever the database is opened, even by a
    // process that then refuses the master key).
    let digest = |m: &Mounted| {
        let mut d = tree_digest(&m.store, &["lock"]);
        d.retain(|p, _| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("snap."))
        });
        d
    };
    let store_before = digest(&m);
    let list_before = m.list_versions();
    let audit_before = m.keyfs_mk(&["audit", "--store", m.store_str()]);
    audit_before.assert_ok();

    // Non-empty mountpoint: usage error, exit 1.
    std::fs::write(m.mnt.join("leftover"), b"user data").unwrap();
    let o = m.keyfs_mk(&["mount", m.store_str(), m.mnt_str()]);
    assert_eq!(o.code, Some(1), "non-empty mountpoint: {o:?}");
    assert!(o.stderr.contains("not empty"), "{}", o.stderr);
    assert!(!is_mounted(&m.mnt));
    assert_eq!(std::fs::read(m.mnt.join("leftover")).unwrap(), b"user data");
    std::fs::remove_file(m.mnt.join("leftover")).unwrap();
    assert_eq!(digest(&m), store_before);

    // Wrong master key: exit 2, said as such, store untouched.
    let (wrong, _) = master_key_file(m.dir.path(), 7);
    let o = keyfs(&[
        OsStr::new("--master-key-file"),
        wrong.as_os_str(),
        OsStr::new("mount"),
        m.store.as_os_str(),
        m.mnt.as_os_str(),
    ]);
    assert_eq!(o.code, Some(2), "wrong master key: {o:?}");
    assert!(o.stderr.contains("wrong master key"), "{}", o.stderr);
    assert!(!is_mounted(&m.mnt));
    assert!(std::fs::read_dir(&m.mnt).unwrap().next().is_none());
    assert_eq!(digest(&m), store_before, "store unchanged");
    assert_eq!(m.list_versions(), list_before);
    assert_eq!(
        m.keyfs_mk(&["audit", "--store", m.store_str()]).stdout,
        audit_before.stdout,
        "no audit entry for refused mounts"
    );

    // A missing mountpoint: exit 1.
    let o = m.keyfs_mk(&[
        "mount",
        m.store_str(),
        m.dir.path().join("nope").to_str().unwrap(),
    ]);
    assert_eq!(o.code, Some(1), "{o:?}");

    // The right key still mounts, and the failed attempts left no audit entry.
    let mut m = m;
    m.mount(&[]);
    // (the mount entry is appended just after the mount appears)
    wait_audit(&m, "the mount", |l| l.contains("op=mount"));
    let a = audit(&m);
    assert_eq!(
        a.lines().filter(|l| l.contains("op=mount")).count(),
        1,
        "only the successful mount is audited:\n{a}"
    );
}

#[test]
fn a_served_store_refuses_a_second_mount_and_store_cli() {
    let m = Mounted::with_client("alice01");
    let other = m.dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let o = m.keyfs_mk(&["mount", m.store_str(), other.to_str().unwrap()]);
    assert_eq!(o.code, Some(3), "second mount: {o:?}");
    assert!(o.stderr.contains("in use"), "{}", o.stderr);
    assert!(!is_mounted(&other));
    let o = m.keyfs_mk(&["list", "--store", m.store_str()]);
    assert_eq!(o.code, Some(3), "list --store while mounted: {o:?}");
    assert!(
        o.stderr.contains("umount"),
        "the message says what to do: {}",
        o.stderr
    );
    // The mount keeps working.
    assert_eq!(read(&m, &format!("{C}/hmac")).len(), 32);
}

// ---------------------------------------------------------------------------
// status, xattrs, symlinks
// ---------------------------------------------------------------------------

#[test]
fn keyfs_status_is_json_with_counts() {
    let m = Mounted::with_client("alice01");
    let status = |m: &Mounted| -> serde_json::Value {
        let raw = cat(m, ".keyfs/status");
        serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "status is not JSON ({e}): {}",
                String::from_utf8_lossy(&raw)
            )
        })
    };
    let s = status(&m);
    assert_eq!(s["clients"], 1, "{s}");
    assert_eq!(s["keys"], 3, "storage, storage_sym, hmac: {s}");
    assert!(s["version"].is_string(), "{s}");
    assert!(s["store"].is_string(), "{s}");
    assert_eq!(s["read_only"], false);
    let versions = s["versions"].as_u64().expect("versions count");

    run("mkdir", &[m.p("clients/bob_02")]).assert_ok();
    run(
        "cp",
        &[
            outside(&m, "h", &rand_bytes(32)).as_str(),
            &m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    let s2 = status(&m);
    assert_eq!(s2["clients"], 2, "{s2}");
    assert_eq!(s2["keys"], 6, "{s2}");
    assert_eq!(s2["versions"].as_u64().unwrap(), versions + 3 + 1, "{s2}");

    // Hidden from readdir, reachable by path, read-only.
    assert!(!ls_names(&m, "").iter().any(|n| n == ".keyfs"));
    assert_eq!(
        ls_names(&m, ".keyfs"),
        ["audit", "pending", "status"],
        "the hidden directory lists its own files"
    );
    assert_eq!(stat_c(&m, "%a", ".keyfs/status"), "444");
    sh(&format!("printf x > '{}'", m.p(".keyfs/status")))
        .assert_fails_with("Read-only file system");
}

#[test]
fn getfattr_shows_key_metadata() {
    let m = Mounted::with_client("alice01");
    let key = format!("{C}/hmac");
    let o = run(
        "getfattr",
        &["--absolute-names", "-d", "-m", "-", &m.p(&key)],
    );
    o.assert_ok();
    let text = o.text();
    let names: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(n, _)| n))
        .collect();
    for n in [
        "user.keyfs.kind",
        "user.keyfs.version",
        "user.keyfs.created",
        "user.keyfs.fingerprint",
        "user.keyfs.state",
    ] {
        assert!(text.contains(n), "{n} missing:\n{text}");
    }
    assert_eq!(names.len(), 5, "{names:?}");

    let content = read(&m, &key);
    assert_eq!(
        xattr(&m, &key, "user.keyfs.fingerprint"),
        sha256_hex(&content)
    );
    assert_eq!(xattr(&m, &key, "user.keyfs.kind"), "symmetric-32");
    assert_eq!(xattr(&m, &key, "user.keyfs.version"), "1");
    assert_eq!(xattr(&m, &key, "user.keyfs.state"), "current");
    assert!(is_archive_name(&xattr(&m, &key, "user.keyfs.created")));
    assert_eq!(
        xattr(&m, &format!("{C}/storage"), "user.keyfs.kind"),
        "p256-private"
    );
    assert_eq!(
        xattr(&m, &format!("{C}/storage.pub"), "user.keyfs.kind"),
        "p256-public"
    );
    std::fs::write(m.path(&format!("{C}/note")), b"n").unwrap();
    assert_eq!(xattr(&m, &format!("{C}/note"), "user.keyfs.kind"), "opaque");

    // After a rotation: the current and the archived version each describe themselves.
    let new = rand_bytes(32);
    run("cp", &[outside(&m, "n", &new).as_str(), &m.p(&key)]).assert_ok();
    assert_eq!(xattr(&m, &key, "user.keyfs.version"), "2");
    assert_eq!(xattr(&m, &key, "user.keyfs.fingerprint"), sha256_hex(&new));
    let v = format!("{key}.old/{}", history(&m, &key)[0]);
    assert_eq!(xattr(&m, &v, "user.keyfs.state"), "archived");
    assert_eq!(xattr(&m, &v, "user.keyfs.version"), "1");
    assert_eq!(
        xattr(&m, &v, "user.keyfs.fingerprint"),
        sha256_hex(&content)
    );

    // Read-only metadata.
    let o = run(
        "setfattr",
        &["-n", "user.keyfs.state", "-v", "x", &m.p(&key)],
    );
    assert!(!o.ok(), "setfattr must fail: {o:?}");
    run("getfattr", &["-n", "user.nope", &m.p(&key)]).assert_fails_with("No such attribute");
}

#[test]
fn symlinks_work_and_persist() {
    let mut m = Mounted::with_client("alice01");
    let link = format!("{C}/current-key");
    run("ln", &["-s", "storage", &m.p(&link)]).assert_ok();
    assert_eq!(
        run("readlink", &[m.p(&link)]).assert_ok().text(),
        "storage\n"
    );
    let l = ls_ln(&m, C);
    assert!(
        l["current-key"].0.starts_with('l'),
        "{:?}",
        l["current-key"]
    );
    let ls = run("ls", &["-l", &m.p(&link)]).assert_ok().text();
    assert!(ls.contains("-> storage"), "{ls}");
    assert_eq!(cat(&m, &link), read(&m, &format!("{C}/storage")));
    run("openssl", &["pkey", "-in", &m.p(&link), "-noout"]).assert_ok();
    // A link to a path outside the tree: the target is only metadata.
    std::os::unix::fs::symlink("/etc/hostname", m.path(&format!("{C}/elsewhere"))).unwrap();
    assert_eq!(
        std::fs::read_link(m.path(&format!("{C}/elsewhere"))).unwrap(),
        Path::new("/etc/hostname")
    );

    m.remount();
    assert_eq!(
        std::fs::read_link(m.path(&link)).unwrap(),
        Path::new("storage")
    );
    assert_eq!(cat(&m, &link), read(&m, &format!("{C}/storage")));

    // Removing the link does not touch the key.
    run("rm", &[m.p(&link)]).assert_ok();
    assert!(std::fs::symlink_metadata(m.path(&link)).is_err());
    run(
        "openssl",
        &["pkey", "-in", &m.p(&format!("{C}/storage")), "-noout"],
    )
    .assert_ok();
    assert!(history(&m, &format!("{C}/storage")).is_empty());
}

// ---------------------------------------------------------------------------
// backup and restore
// ---------------------------------------------------------------------------

#[test]
fn tar_backup_restores_into_an_empty_mount() {
    let src = Mounted::with_client("alice01");
    // History, a destroyed key whose history remains, a grouping directory,
    // an empty secret, a symlink, non-default modes and owners.
    for _ in 0..2 {
        run(
            "cp",
            &[
                outside(&src, "h", &rand_bytes(32)).as_str(),
                &src.p(&format!("{C}/hmac")),
            ],
        )
        .assert_ok();
    }
    std::fs::write(src.path(&format!("{C}/gone")), b"gone v1").unwrap();
    std::fs::write(src.path(&format!("{C}/gone")), b"gone v2").unwrap();
    run("rm", &[src.p(&format!("{C}/gone"))]).assert_ok();
    std::fs::create_dir(src.path(&format!("{C}/tls"))).unwrap();
    std::fs::write(src.path(&format!("{C}/tls/server.key")), rand_bytes(1000)).unwrap();
    std::fs::write(src.path(&format!("{C}/empty")), b"").unwrap();
    std::os::unix::fs::symlink("storage", src.path(&format!("{C}/cur"))).unwrap();
    run("chmod", &["640", &src.p(&format!("{C}/hmac"))]).assert_ok();
    run(
        "chown",
        &["65534:65534", &src.p(&format!("{C}/storage_sym"))],
    )
    .assert_ok();
    run("mkdir", &[src.p("clients/bob_02")]).assert_ok();
    let mtime = |m: &Mounted, rel: &str| std::fs::metadata(m.path(rel)).unwrap().mtime();

    let tarball = src.dir.path().join("backup.tar");
    let o = run(
        "tar",
        &[
            OsStr::new("-C"),
            src.mnt.as_os_str(),
            OsStr::new("-cpf"),
            tarball.as_os_str(),
            OsStr::new("."),
        ],
    );
    o.assert_ok();
    let listing = run("tar", &[OsStr::new("-tf"), tarball.as_os_str()])
        .assert_ok()
        .text();
    assert!(
        !listing.contains(".keyfs"),
        "the hidden directory is not backed up"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&format!("./{C}/hmac.old/"))),
        "archived versions are in the backup:\n{listing}"
    );

    let dst = Mounted::new(&["--mkdir-generates=none"]);
    // With --mkdir-generates=none, mkdir of a client is just a directory.
    std::fs::create_dir(dst.path("clients/probe01")).unwrap();
    assert!(ls_names(&dst, "clients/probe01").is_empty());
    std::fs::remove_dir(dst.path("clients/probe01")).unwrap();

    let o = run(
        "tar",
        &[
            OsStr::new("-C"),
            dst.mnt.as_os_str(),
            OsStr::new("-xpf"),
            tarball.as_os_str(),
        ],
    );
    o.assert_ok();

    let a = snapshot(&src.mnt);
    let b = snapshot(&dst.mnt);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "same file list, archived versions' names included"
    );
    for (path, sa) in &a {
        let sb = &b[path];
        assert_eq!(sa.0, sb.0, "{path}: type");
        assert_eq!(sa.4, sb.4, "{path}: SHA-256 / link target");
        assert_eq!(sa.1, sb.1, "{path}: mode");
        assert_eq!((sa.2, sa.3), (sb.2, sb.3), "{path}: owner");
    }
    assert!(a.keys().any(|p| p.starts_with(&format!("{C}/gone.old/"))));
    // sha256sum through the mounts agrees with our own hashing.
    let sums = |m: &Mounted| {
        run(
            "sh",
            &[
                "-c",
                &format!(
                    "cd '{}' && find . -type f | sort | xargs sha256sum",
                    m.mnt_str()
                ),
            ],
        )
        .assert_ok()
        .text()
    };
    assert_eq!(sums(&src), sums(&dst));
    // Times of current keys come back too (tar keeps whole seconds).
    for rel in [format!("{C}/hmac"), format!("{C}/tls/server.key")] {
        assert_eq!(mtime(&src, &rel), mtime(&dst, &rel), "{rel}: mtime");
    }
    run(
        "openssl",
        &["pkey", "-in", &dst.p("clients/bob_02/storage"), "-noout"],
    )
    .assert_ok();
}

// ---------------------------------------------------------------------------
// the guard itself
// ---------------------------------------------------------------------------

#[test]
fn the_mount_guard_unmounts_even_when_a_test_panics() {
    let mnt = std::sync::Arc::new(std::sync::Mutex::new(None));
    let mnt2 = mnt.clone();
    let r = std::thread::spawn(move || {
        let m = Mounted::new(&[]);
        *mnt2.lock().unwrap() = Some((m.mnt.clone(), m.pid().unwrap()));
        panic!("deliberate panic inside a mounted test");
    })
    .join();
    assert!(r.is_err(), "the thread panicked");
    let (path, pid) = mnt
        .lock()
        .unwrap()
        .clone()
        .expect("mounted before the panic");
    assert!(!is_mounted(&path), "{} left mounted", path.display());
    assert!(!path.exists(), "the temp dir is removed");
    // The daemon was reaped: no such process any more.
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
    assert!(!alive, "daemon {pid} still running");
}

/// Acra v1's writer (temp file, hard link into `<file>.old/<ts>`, rename over)
/// against `--layout=acra-v1`: exactly one archived version per rotation.
#[test]
fn acra_v1_writer_sequence_leaves_one_archived_version() {
    let tmp = crate::common::tempdir();
    let out = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/acra-v1-writer.sh"
        ))
        .env("KEYFS_BIN", env!("CARGO_BIN_EXE_keyfs"))
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run scripts/acra-v1-writer.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "acra-v1-writer.sh failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("acra-v1-writer: ok"), "{stdout}");
}

/// `--destroy-delay`: rm schedules destruction; the version waits in
/// `.keyfs/pending/`, `mv` brings it back, and once the delay passes it is
/// destroyed — also when it passes while nothing is mounted.
#[test]
fn destroy_delay_keeps_unlinked_versions_recoverable_until_it_passes() {
    let mut m = Mounted::unmounted();
    m.keyfs_mk(&[
        "generate",
        "--store",
        m.store_str(),
        "--client-id",
        "alice01",
    ])
    .assert_ok();
    m.mount(&["--destroy-delay=2s"]);
    let hmac = read(&m, &format!("{C}/hmac"));
    run("rm", &[m.p(&format!("{C}/hmac"))]).assert_ok();
    assert!(
        !m.path(&format!("{C}/hmac")).exists(),
        "rm makes the name disappear"
    );
    let pending = ls_names(&m, ".keyfs/pending");
    assert_eq!(pending, ["clients%2Falice01%2Fhmac@v1"]);
    assert_eq!(
        read(&m, &format!(".keyfs/pending/{}", pending[0])),
        hmac,
        "pending version is readable"
    );
    // mv brings it back.
    run(
        "mv",
        &[
            m.p(&format!(".keyfs/pending/{}", pending[0])),
            m.p(&format!("{C}/hmac")),
        ],
    )
    .assert_ok();
    assert_eq!(read(&m, &format!("{C}/hmac")), hmac);
    assert!(ls_names(&m, ".keyfs/pending").is_empty());
    // Left alone, it is destroyed when the delay passes (the daemon checks every second).
    run("rm", &[m.p(&format!("{C}/storage_sym"))]).assert_ok();
    assert_eq!(ls_names(&m, ".keyfs/pending").len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert!(
        ls_names(&m, ".keyfs/pending").is_empty(),
        "destroyed after the delay"
    );
    // A delay that passes while unmounted is carried out by the next command on the store.
    run("rm", &[m.p(&format!("{C}/hmac"))]).assert_ok();
    m.unmount_clean();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let list = m.list_versions();
    for key in ["clients/alice01/hmac", "clients/alice01/storage_sym"] {
        let vs = versions_of(&list, key);
        assert!(
            !vs.is_empty() && vs.iter().all(|v| v["state"] == "destroyed"),
            "{key}: {vs:?}"
        );
    }
    let log = m.keyfs_mk(&["audit", "--store", m.store_str()]).text();
    assert!(
        log.contains("op=destroy-scheduled")
            && log.contains("op=restore")
            && log.contains("op=destroy "),
        "{log}"
    );
}

/// `--cache`: keys come from the kernel's page cache (no open reaches the
/// daemon), and every change made through the mount invalidates it at once:
/// a rotation through another path, a destruction and a chmod are seen by
/// the very next read.
#[test]
fn cache_mode_never_serves_a_stale_key() {
    let mut m = Mounted::unmounted();
    m.keyfs_mk(&[
        "generate",
        "--store",
        m.store_str(),
        "--client-id",
        "alice01",
    ])
    .assert_ok();
    m.mount(&["--cache"]);
    let key = format!("{C}/storage_sym");
    let first = read(&m, &key);
    assert_eq!(read(&m, &key), first, "cached read");
    // Rotate through another path: a temp file renamed over the key, by the CLI.
    let new = rand_bytes(32);
    let src = outside(&m, "new.key", &new);
    run(
        crate::common::keyfs_bin(),
        &["rotate", &m.p(&key), "--from", &src],
    )
    .assert_ok();
    assert_eq!(read(&m, &key), new, "the next read sees the rotation");
    assert_eq!(history_contents(&m, &key), vec![first]);
    // Rotation by writing the file (cp: truncate, then one write).
    let third = rand_bytes(32);
    run(
        "cp",
        &[outside(&m, "third.key", &third).as_str(), &m.p(&key)],
    )
    .assert_ok();
    assert_eq!(read(&m, &key), third);
    // chmod: another uid is denied at once (the kernel checks the fresh mode).
    run("chmod", &["755", &m.p(C)]).assert_ok();
    run("chmod", &["644", &m.p(&key)]).assert_ok();
    assert_eq!(run_as_nobody("cat", &[m.p(&key)]).stdout, third);
    run("chmod", &["600", &m.p(&key)]).assert_ok();
    run_as_nobody("cat", &[m.p(&key)]).assert_fails_with("Permission denied");
    // Destruction: the next read fails.
    run("rm", &[m.p(&key)]).assert_ok();
    run("cat", &[m.p(&key)]).assert_fails_with("No such file or directory");
}
