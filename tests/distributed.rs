//! Distributed tests (issue 7): one inventory in a 3-member etcd cluster on
//! loopback ports ([`EtcdCluster`]), mounted twice from the same
//! `etcd://…/PREFIX` URL — mount A and mount B play two hosts.
//!
//! Shown, with measured times printed to stderr (`--nocapture` to see them
//! when the tests pass):
//! * a key created, rotated, rolled back and destroyed through A is seen
//!   through B (content, history, absence) within 1 s;
//! * 2 × 200 concurrent rotations of one key through A and B leave one
//!   identical history on both, holding every acknowledged rotation once;
//! * one etcd member killed: everything keeps working; all members stopped:
//!   reads are served, changes fail and change nothing, `.keyfs/status` says
//!   `"synced": false`; members back: both mounts converge;
//! * etcd never holds a key's plaintext or the master key.
//!
//! Every test starts its own cluster (dropped last: it kills and reaps every
//! member) and its own mounts (always unmounted). Needs root, /dev/fuse and
//! etcd/etcdctl (`scripts/setup.sh` installs etcd-server and etcd-client).
//!
//! Run: `cargo test --test tests distributed -- --nocapture`.

use crate::common::{contains, hex, rand_bytes};
use crate::common::{keyfs, require_root_and_fuse, run, sha256_hex, EtcdCluster, Mounted, Out};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A change made on one host must be served by the other within this.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(1);
/// How long we keep polling before declaring a change lost (so that a late
/// change is reported with its delay, not as missing).
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// How long the mounts may take to notice an outage or a recovery.
const SYNC_LIMIT: Duration = Duration::from_secs(15);

const C: &str = "clients/alice01";

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// Two mounts of one etcd store. Fields drop in order: the mounts first,
/// then the cluster (so no daemon outlives its etcd).
struct Hosts {
    a: Mounted,
    b: Mounted,
    /// `etcd://127.0.0.1:C0,…/PREFIX`.
    url: String,
    /// The store's prefix in etcd.
    prefix: String,
    /// The master key file (`keyfs init --generate-master-key`).
    mk: PathBuf,
    cluster: EtcdCluster,
}

impl Hosts {
    /// A new cluster, `keyfs init etcd://…/keyfs-NAME --generate-master-key
    /// MK`, mounted as A (default options) and B (`b_opts`).
    #[track_caller]
    fn new(name: &str, b_opts: &[&str]) -> Hosts {
        require_root_and_fuse();
        let cluster = EtcdCluster::new();
        let prefix = format!("keyfs-{name}");
        let url = cluster.store_url(&prefix);
        let mk = cluster.dir.path().join("master.key");
        keyfs(&[
            OsStr::new("init"),
            OsStr::new(&url),
            OsStr::new("--generate-master-key"),
            mk.as_os_str(),
        ])
        .assert_ok();
        let a = Mounted::new_on(&url, &mk, &[]);
        let b = Mounted::new_on(&url, &mk, b_opts);
        Hosts {
            a,
            b,
            url,
            prefix,
            mk,
            cluster,
        }
    }

    /// `keyfs --master-key-file MK args…`.
    fn keyfs_mk(&self, args: &[&str]) -> Out {
        let mut a: Vec<&OsStr> = vec![OsStr::new("--master-key-file"), self.mk.as_os_str()];
        a.extend(args.iter().map(OsStr::new));
        keyfs(&a)
    }
}

/// Create or overwrite `path` with `data` and commit it (fsync commits an
/// open file at once, so a refused commit is an error here rather than a
/// lost `close(2)` error, which `std::fs::write` would ignore).
fn write_committed(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Write a file outside the mounts (a source for `cp`).
fn outside(m: &Mounted, name: &str, data: &[u8]) -> String {
    let p = m.dir.path().join(name);
    std::fs::write(&p, data).unwrap();
    p.to_str().unwrap().to_owned()
}

fn errno_text(e: &std::io::Error) -> String {
    format!("{e} (errno {:?})", e.raw_os_error())
}

/// Content of `MNT/rel`, `None` when it does not exist.
fn read_opt(m: &Mounted, rel: &str) -> Result<Option<Vec<u8>>, String> {
    match std::fs::read(m.path(rel)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(format!("reading {rel}: {}", errno_text(&e))),
    }
}

/// Content of `MNT/rel`, which must exist.
#[track_caller]
fn read(m: &Mounted, rel: &str) -> Vec<u8> {
    std::fs::read(m.path(rel))
        .unwrap_or_else(|e| panic!("reading {} through the mount: {e}", m.p(rel)))
}

/// Sorted names in `MNT/rel` (empty when it does not exist).
fn names(m: &Mounted, rel: &str) -> Result<Vec<String>, String> {
    match std::fs::read_dir(m.path(rel)) {
        Ok(rd) => {
            let mut v = Vec::new();
            for e in rd {
                let e = e.map_err(|e| format!("listing {rel}: {}", errno_text(&e)))?;
                v.push(e.file_name().to_string_lossy().into_owned());
            }
            v.sort();
            Ok(v)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(format!("listing {rel}: {}", errno_text(&e))),
    }
}

/// What one host shows of one key: its current content and its history.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyView {
    /// Content of the current version; `None` when the key is absent.
    current: Option<Vec<u8>>,
    /// `<key>.old/` names and contents, in name (= time) order.
    history: Vec<(String, Vec<u8>)>,
}

impl KeyView {
    /// Every version's content, oldest first, the current one last.
    fn sequence(&self) -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = self.history.iter().map(|(_, c)| c.clone()).collect();
        v.extend(self.current.clone());
        v
    }
}

fn key_view(m: &Mounted, rel: &str) -> Result<KeyView, String> {
    let current = read_opt(m, rel)?;
    let old = format!("{rel}.old");
    let mut history = Vec::new();
    for n in names(m, &old)? {
        let c = read_opt(m, &format!("{old}/{n}"))?
            .ok_or_else(|| format!("{old}/{n} listed but absent"))?;
        history.push((n, c));
    }
    Ok(KeyView { current, history })
}

/// What one host shows of a directory: its listing and the view of every key
/// in it (keys known only by their `.old` directory included).
type DirView = (Vec<String>, BTreeMap<String, KeyView>);

fn dir_view(m: &Mounted, dir: &str) -> Result<DirView, String> {
    let listing = names(m, dir)?;
    let keys: BTreeSet<&str> = listing
        .iter()
        .map(|n| n.strip_suffix(".old").unwrap_or(n))
        .collect();
    let mut views = BTreeMap::new();
    for k in keys {
        views.insert(k.to_owned(), key_view(m, &format!("{dir}/{k}"))?);
    }
    Ok((listing, views))
}

/// Poll `view(other)` from `start` until it equals `want`; the time from
/// `start` when it did. Panics (with both views) after [`POLL_LIMIT`].
#[track_caller]
fn seen<T: PartialEq + std::fmt::Debug>(
    what: &str,
    start: Instant,
    other: &Mounted,
    want: &T,
    view: impl Fn(&Mounted) -> Result<T, String>,
) -> Duration {
    let mut last;
    loop {
        last = view(other);
        if matches!(&last, Ok(v) if v == want) {
            return start.elapsed();
        }
        if start.elapsed() > POLL_LIMIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!(
        "{what}: not seen through {} within {POLL_LIMIT:?}\nwant: {want:?}\nlast seen: {last:?}",
        other.mnt.display()
    );
}

/// `MNT/.keyfs/status`, parsed.
fn status(m: &Mounted) -> Result<serde_json::Value, String> {
    let raw = std::fs::read(m.path(".keyfs/status"))
        .map_err(|e| format!("reading .keyfs/status: {}", errno_text(&e)))?;
    serde_json::from_slice(&raw).map_err(|e| {
        format!(
            ".keyfs/status is not JSON ({e}): {}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// Poll both mounts' status until `pred` holds for both; the time it took.
#[track_caller]
fn wait_status(
    what: &str,
    h: &Hosts,
    limit: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let (sa, sb) = (status(&h.a), status(&h.b));
        if matches!((&sa, &sb), (Ok(a), Ok(b)) if pred(a) && pred(b)) {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("{what}: not within {limit:?}\nA: {sa:?}\nB: {sb:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A rotation by the atomic-replace pattern: write `KEY.tmp-TAG` in the same
/// directory, then `rename(2)` it over `KEY`.
fn rotate_by_rename(m: &Mounted, key: &str, tag: &str, data: &[u8]) -> Result<(), String> {
    let tmp = m.path(&format!("{key}.tmp-{tag}"));
    write_committed(&tmp, data)
        .map_err(|e| format!("writing the temp file: {}", errno_text(&e)))?;
    std::fs::rename(&tmp, m.path(key)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("rename over {key}: {}", errno_text(&e))
    })
}

fn report(title: &str, times: &[(String, Duration)]) {
    eprintln!("distributed: {title}");
    for (what, t) in times {
        eprintln!("  {what:<58} {:>8.1} ms", t.as_secs_f64() * 1000.0);
    }
}

#[track_caller]
fn assert_all_within(times: &[(String, Duration)], limit: Duration) {
    let late: Vec<_> = times.iter().filter(|(_, t)| *t >= limit).collect();
    assert!(late.is_empty(), "seen later than {limit:?}: {late:?}");
}

// ---------------------------------------------------------------------------
// the cluster guard itself
// ---------------------------------------------------------------------------

/// The [`EtcdCluster`] guard: 3 healthy members, a put/get, a member killed
/// (the two others keep serving writes), restarted from its data dir, all
/// stopped and started, and every process gone after the drop. Needs only
/// etcd, not keyfs's etcd backend.
#[test]
fn etcd_cluster_guard_survives_a_member_loss_and_cleans_up() {
    let t = Instant::now();
    let mut c = EtcdCluster::new();
    eprintln!(
        "etcd guard: 3 members healthy after {:?} at {}",
        t.elapsed(),
        c.endpoints_url_part()
    );
    assert!(c.store_url("pfx").starts_with("etcd://127.0.0.1:"));
    assert!(c
        .store_url("pfx")
        .ends_with(&format!("{}/pfx", c.endpoint(2))));

    c.etcdctl(&["put", "guard/k", "v1"]).assert_ok();
    for i in 0..3 {
        let o = c.etcdctl_on(i, &["get", "guard/k", "--print-value-only"]);
        assert_eq!(o.assert_ok().text().trim(), "v1", "member m{i}");
    }

    let victim = c.leader().expect("a leader");
    let pid = c.pid(victim).unwrap();
    c.kill(victim);
    assert!(!c.is_running(victim));
    // SAFETY: kill(pid, 0) only checks existence.
    assert_eq!(
        unsafe { libc::kill(pid as i32, 0) },
        -1,
        "killed and reaped"
    );
    let t = Instant::now();
    for i in (0..3).filter(|i| *i != victim) {
        let val = format!("v2-m{i}");
        // A new leader is elected within about a second.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Short attempts: a proposal forwarded to the dead leader before
            // the followers notice is lost and waits for the whole timeout.
            let o = c.etcdctl_on(i, &["--command-timeout=1s", "put", "guard/k", val.as_str()]);
            if o.ok() {
                break;
            }
            assert!(Instant::now() < deadline, "put without m{victim}: {o:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let o = c.etcdctl_on(i, &["get", "guard/k", "--print-value-only"]);
        assert_eq!(o.assert_ok().text().trim(), val);
    }
    eprintln!(
        "etcd guard: leader m{victim} killed; both survivors served a put within {:?}",
        t.elapsed()
    );
    let last = format!("v2-m{}", (0..3).filter(|i| *i != victim).max().unwrap());

    c.start(victim);
    c.wait_healthy();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A serializable read answers from the member's own copy: it caught up.
        let o = c.etcdctl_on(
            victim,
            &["get", "guard/k", "--print-value-only", "--consistency=s"],
        );
        if o.ok() && o.text().trim() == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m{victim} did not catch up: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    c.stop_all();
    assert!((0..3).all(|i| !c.is_running(i)));
    let o = c.etcdctl(&[
        "--dial-timeout=500ms",
        "--command-timeout=1s",
        "endpoint",
        "health",
    ]);
    assert!(!o.ok(), "all stopped: {o:?}");
    c.start_all();
    let o = c.etcdctl(&["get", "guard/k", "--print-value-only"]);
    assert_eq!(
        o.assert_ok().text().trim(),
        last,
        "data survives a full restart"
    );

    let pids: Vec<u32> = (0..3).map(|i| c.pid(i).unwrap()).collect();
    let dir = c.dir.path().to_path_buf();
    drop(c);
    for pid in pids {
        // SAFETY: kill(pid, 0) only checks existence.
        assert_eq!(
            unsafe { libc::kill(pid as i32, 0) },
            -1,
            "etcd pid {pid} still exists after the drop"
        );
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

// ---------------------------------------------------------------------------
// propagation
// ---------------------------------------------------------------------------

/// Create (mkdir, `keyfs generate`, cp), rotate (temp file + mv, cp over),
/// roll back (mv key.old/<ts> key) and destroy (rm) through A; after each
/// step B shows the same directory — listing, contents, histories, absence —
/// within 1 s, measured.
#[test]
fn distributed_changes_through_a_are_seen_through_b_within_1s() {
    let h = Hosts::new("propagation", &[]);
    let (a, b) = (&h.a, &h.b);
    let mut times: Vec<(String, Duration)> = Vec::new();
    let dv = |dir: &'static str| move |m: &Mounted| dir_view(m, dir);

    // A new client: mkdir generates its default keys.
    std::fs::create_dir(a.path(C)).unwrap();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    for k in ["storage", "storage.pub", "storage_sym", "hmac"] {
        assert!(
            want.1.get(k).is_some_and(|v| v.current.is_some()),
            "mkdir generates {k}: {want:?}"
        );
    }
    let d = seen("mkdir clients/alice01", t, b, &want, dv(C));
    times.push((
        "mkdir clients/alice01 (storage pair, storage_sym, hmac)".into(),
        d,
    ));

    // keyfs generate through the mount.
    keyfs(&["generate", a.mnt_str(), "--client-id", "bob0002"]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, "clients/bob0002").unwrap();
    assert!(want.1.contains_key("hmac"), "{want:?}");
    let d = seen("keyfs generate", t, b, &want, dv("clients/bob0002"));
    times.push(("keyfs generate MNT --client-id bob0002".into(), d));

    let key = format!("{C}/api-token");
    let v1 = format!("token v1 {}\n", hex(&rand_bytes(16))).into_bytes();
    let v2 = format!("token v2 {}\n", hex(&rand_bytes(16))).into_bytes();
    let v3 = format!("token v3 {}\n", hex(&rand_bytes(16))).into_bytes();

    // Import by cp.
    let src = outside(a, "v1", &v1);
    run("cp", &[src.as_str(), &a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    assert_eq!(want.1["api-token"].current.as_deref(), Some(&v1[..]));
    let d = seen("cp (import)", t, b, &want, dv(C));
    times.push(("cp new file (import)".into(), d));

    // Rotation: temp file in the same directory + mv over the key.
    std::fs::write(a.path(&format!("{key}.tmp")), &v2).unwrap();
    run("mv", &[a.p(&format!("{key}.tmp")), a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    assert_eq!(want.1["api-token"].sequence(), vec![v1.clone(), v2.clone()]);
    assert!(!want.0.contains(&"api-token.tmp".to_owned()), "{want:?}");
    let d = seen("mv tmp key (rotation)", t, b, &want, dv(C));
    times.push(("write tmp + mv tmp key (rotation)".into(), d));

    // Rotation at close: cp over the key.
    let src = outside(a, "v3", &v3);
    run("cp", &[src.as_str(), &a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    assert_eq!(
        want.1["api-token"].sequence(),
        vec![v1.clone(), v2.clone(), v3.clone()]
    );
    let d = seen("cp over key (rotation)", t, b, &want, dv(C));
    times.push(("cp over the key (rotation at close)".into(), d));

    // Rollback to v1.
    let ts = want.1["api-token"]
        .history
        .iter()
        .find(|(_, c)| *c == v1)
        .map(|(n, _)| n.clone())
        .expect("v1 archived");
    run("mv", &[a.p(&format!("{key}.old/{ts}")), a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    let kv = &want.1["api-token"];
    assert_eq!(kv.current.as_deref(), Some(&v1[..]), "rolled back: {kv:?}");
    assert!(
        kv.history.iter().any(|(_, c)| *c == v3),
        "v3 archived: {kv:?}"
    );
    let d = seen("mv key.old/<ts> key (rollback)", t, b, &want, dv(C));
    times.push(("mv key.old/<ts> key (rollback)".into(), d));

    // Destruction of the current version; the history stays.
    run("rm", &[a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    let kv = &want.1["api-token"];
    assert_eq!(kv.current, None, "{kv:?}");
    assert!(!kv.history.is_empty());
    let d = seen("rm key (destruction)", t, b, &want, dv(C));
    assert_eq!(
        std::fs::metadata(b.path(&key))
            .map_err(|e| e.raw_os_error())
            .err(),
        Some(Some(libc::ENOENT)),
        "stat through B after rm"
    );
    times.push(("rm key (destruction; absence)".into(), d));

    // Destruction of an archived version.
    let (ts, _) = kv.history[0].clone();
    run("rm", &[a.p(&format!("{key}.old/{ts}"))]).assert_ok();
    let t = Instant::now();
    let want = dir_view(a, C).unwrap();
    let d = seen("rm key.old/<ts>", t, b, &want, dv(C));
    times.push(("rm key.old/<ts> (destroy an archived version)".into(), d));

    report(
        "change through mount A -> seen through mount B (elapsed after A's command returned)",
        &times,
    );
    assert_all_within(&times, PROPAGATION_LIMIT);
}

/// The same through a `--cache` mount B: the kernel's page cache of B is
/// invalidated by a rotation and a destruction made through A.
#[test]
fn distributed_cache_mode_mount_sees_rotation_and_destruction_within_1s() {
    let h = Hosts::new("cache", &["--cache"]);
    let (a, b) = (&h.a, &h.b);
    let key = format!("{C}/hmac");
    let mut times: Vec<(String, Duration)> = Vec::new();
    let kv = |m: &Mounted| read_opt(m, &format!("{C}/hmac"));

    std::fs::create_dir(a.path(C)).unwrap();
    let t = Instant::now();
    let want = read_opt(a, &key).unwrap();
    assert_eq!(want.as_ref().map(Vec::len), Some(32));
    times.push((
        "mkdir clients/alice01".into(),
        seen("mkdir", t, b, &want, kv),
    ));
    for _ in 0..3 {
        assert_eq!(
            read(b, &key),
            want.clone().unwrap(),
            "cached read through B"
        );
    }

    let fresh = rand_bytes(32);
    let src = outside(a, "hmac.new", &fresh);
    run("cp", &[src.as_str(), &a.p(&key)]).assert_ok();
    let t = Instant::now();
    let d = seen("cp over hmac", t, b, &Some(fresh.clone()), kv);
    times.push(("cp over hmac (rotation) -> B's cached read".into(), d));

    let fresh2 = rand_bytes(32);
    rotate_by_rename(a, &key, "a", &fresh2).unwrap();
    let t = Instant::now();
    let d = seen("mv over hmac", t, b, &Some(fresh2.clone()), kv);
    times.push(("tmp + mv over hmac (rotation) -> B's cached read".into(), d));

    run("rm", &[a.p(&key)]).assert_ok();
    let t = Instant::now();
    let d = seen("rm hmac", t, b, &None, kv);
    times.push(("rm hmac (destruction) -> B's cached read".into(), d));

    report("through A -> seen through a --cache mount B", &times);
    assert_all_within(&times, PROPAGATION_LIMIT);
}

// ---------------------------------------------------------------------------
// concurrent rotations
// ---------------------------------------------------------------------------

/// What one writer did.
#[derive(Default)]
struct Writer {
    /// Contents whose rename returned Ok.
    acked: Vec<Vec<u8>>,
    /// Contents whose rotation failed, with why.
    failed: Vec<(Vec<u8>, String)>,
}

fn rotator(dir: PathBuf, tag: &'static str, n: usize, go: Arc<Barrier>) -> Writer {
    let mut w = Writer::default();
    let key = dir.join("api-token");
    go.wait();
    for i in 0..n {
        let content = format!("{tag}-{i}\n").into_bytes();
        let tmp = dir.join(format!("api-token.tmp-{tag}-{i}"));
        if let Err(e) = write_committed(&tmp, &content) {
            let _ = std::fs::remove_file(&tmp);
            w.failed.push((
                content,
                format!("writing the temp file: {}", errno_text(&e)),
            ));
            continue;
        }
        match std::fs::rename(&tmp, &key) {
            Ok(()) => w.acked.push(content),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                w.failed
                    .push((content, format!("rename: {}", errno_text(&e))));
            }
        }
    }
    w
}

/// 2 × 200 rotations of ONE key at the same time, 200 through A and 200
/// through B (temp file + rename(2), unique contents). Afterwards both
/// mounts show one identical history; every acknowledged rotation is in it
/// exactly once, no failed one is, nothing is duplicated, and each writer's
/// rotations are in its own order. `keyfs list/check/audit --verify --store
/// URL` agree.
#[test]
fn distributed_concurrent_rotations_leave_one_identical_history() {
    const N: usize = 200;
    let h = Hosts::new("concurrent", &[]);
    let (a, b) = (&h.a, &h.b);
    let key = format!("{C}/api-token");
    std::fs::create_dir(a.path(C)).unwrap();
    write_committed(&a.path(&key), b"initial\n").unwrap();
    let want = key_view(a, &key).unwrap();
    seen("initial key", Instant::now(), b, &want, |m| {
        key_view(m, &key)
    });

    let go = Arc::new(Barrier::new(2));
    let t = Instant::now();
    let ta = {
        let (d, g) = (a.path(C), go.clone());
        std::thread::spawn(move || rotator(d, "A", N, g))
    };
    let tb = {
        let (d, g) = (b.path(C), go.clone());
        std::thread::spawn(move || rotator(d, "B", N, g))
    };
    let wa = ta.join().expect("writer A panicked");
    let wb = tb.join().expect("writer B panicked");
    let took = t.elapsed();
    eprintln!(
        "distributed: 2 x {N} concurrent rotations in {took:?} ({:.0} rotations/s): \
         A acknowledged {}, B acknowledged {}, failed {} (A) + {} (B)",
        (2 * N) as f64 / took.as_secs_f64(),
        wa.acked.len(),
        wb.acked.len(),
        wa.failed.len(),
        wb.failed.len()
    );
    for (tag, w) in [("A", &wa), ("B", &wb)] {
        for (c, why) in w.failed.iter().take(10) {
            eprintln!(
                "  failed through {tag}: {:?}: {why}",
                String::from_utf8_lossy(c).trim()
            );
        }
        assert!(!w.acked.is_empty(), "no rotation through {tag} succeeded");
    }

    // Both hosts converge on one history.
    let t = Instant::now();
    let want = key_view(a, &key).unwrap();
    let d = seen("final history", t, b, &want, |m| key_view(m, &key));
    eprintln!(
        "distributed: B showed A's final history {d:?} after the writers finished \
         (reading every version through both mounts included)"
    );
    // ... and A still shows it (it did not move meanwhile).
    assert_eq!(key_view(a, &key).unwrap(), want);

    let seq = want.sequence();
    let versions: Vec<String> = seq
        .iter()
        .map(|c| String::from_utf8_lossy(c).trim().to_owned())
        .collect();
    eprintln!(
        "distributed: {} versions; oldest {:?}, newest {:?}",
        seq.len(),
        &versions[..versions.len().min(5)],
        &versions[versions.len().saturating_sub(5)..]
    );
    let switches = versions
        .windows(2)
        .filter(|w| {
            w[0].starts_with("A-") && w[1].starts_with("B-")
                || w[0].starts_with("B-") && w[1].starts_with("A-")
        })
        .count();
    eprintln!("distributed: the history switches between A's and B's rotations {switches} times");
    let mut count: BTreeMap<&[u8], usize> = BTreeMap::new();
    for c in &seq {
        *count.entry(c).or_default() += 1;
    }
    let dups: Vec<_> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n))
        .collect();
    assert!(dups.is_empty(), "duplicated versions: {dups:?}");
    assert_eq!(
        count.get(&b"initial\n"[..]),
        Some(&1),
        "the initial version"
    );
    let lost: Vec<_> = wa
        .acked
        .iter()
        .chain(&wb.acked)
        .filter(|c| !count.contains_key(&c[..]))
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert!(lost.is_empty(), "acknowledged rotations missing: {lost:?}");
    let ghosts: Vec<_> = wa
        .failed
        .iter()
        .chain(&wb.failed)
        .filter(|(c, _)| count.contains_key(&c[..]))
        .map(|(c, why)| (String::from_utf8_lossy(c).into_owned(), why.clone()))
        .collect();
    assert!(
        ghosts.is_empty(),
        "rotations reported as failed are in the history (half-applied): {ghosts:?}"
    );
    assert_eq!(
        seq.len(),
        1 + wa.acked.len() + wb.acked.len(),
        "versions = initial + acknowledged rotations"
    );
    // Each writer's rotations are sequential, so history (in time order)
    // holds them in that order.
    for tag in ["A", "B"] {
        let idx: Vec<usize> = versions
            .iter()
            .filter_map(|v| v.strip_prefix(&format!("{tag}-"))?.parse().ok())
            .collect();
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "{tag}'s rotations out of order in the history: {idx:?}"
        );
    }
    // No temp file left on either host.
    for m in [a, b] {
        let left: Vec<String> = names(m, C)
            .unwrap()
            .into_iter()
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(left.is_empty(), "temp files left: {left:?}");
    }

    // The store itself (CLI on the etcd URL, while both mounts run) agrees.
    let o = h.keyfs_mk(&["list", "--store", &h.url, "--versions", "--json"]);
    o.assert_ok();
    let list: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{}", o.text()));
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == key.as_str())
        .unwrap_or_else(|| panic!("{key} not in keyfs list: {list}"));
    let vs = entry["versions"].as_array().unwrap();
    let fps: BTreeSet<&str> = vs
        .iter()
        .map(|v| v["fingerprint"].as_str().unwrap())
        .collect();
    let nums: BTreeSet<u64> = vs.iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(vs.len(), seq.len(), "keyfs list: {entry}");
    assert_eq!(nums.len(), vs.len(), "version numbers unique: {entry}");
    let mine: BTreeSet<String> = seq.iter().map(|c| sha256_hex(c)).collect();
    assert_eq!(
        fps,
        mine.iter().map(String::as_str).collect(),
        "fingerprints in the store = the versions the mounts show"
    );
    h.keyfs_mk(&["check", "--store", &h.url]).assert_ok();
    let o = h.keyfs_mk(&["audit", "--verify", "--store", &h.url]);
    o.assert_ok();
    eprintln!(
        "distributed: keyfs audit --verify --store URL: {} {}",
        o.text().trim(),
        o.stderr.trim()
    );
}

// ---------------------------------------------------------------------------
// failures
// ---------------------------------------------------------------------------

/// One member killed — first a follower (the URL's first endpoint when it
/// does not lead), then the leader: reads, rotations through A and through
/// B, and a new client keep working, and each is seen on the other mount. All members stopped: reads through A and B are
/// served from the last synchronised state, every kind of change fails
/// (non-zero exit) and changes nothing, `.keyfs/status` says `"synced":
/// false` with `"lag_ms"`. Members back: both mounts resynchronise, and a
/// rotation through either is seen through the other within 1 s.
#[test]
fn distributed_member_loss_and_full_outage() {
    let mut h = Hosts::new("failures", &[]);
    let key = format!("{C}/api-token");
    let next = format!("{C}/api-token.next");
    let kv = |rel: &'static str| move |m: &Mounted| key_view(m, rel);
    let mut times: Vec<(String, Duration)> = Vec::new();

    std::fs::create_dir(h.a.path(C)).unwrap();
    write_committed(&h.a.path(&key), b"v0\n").unwrap();
    write_committed(&h.a.path(&next), b"next\n").unwrap();
    let want = dir_view(&h.a, C).unwrap();
    seen("setup", Instant::now(), &h.b, &want, |m| dir_view(m, C));
    let s = status(&h.a).unwrap();
    eprintln!("distributed: status of A: {s}");
    assert_eq!(s["backend"], "etcd", "{s}");
    assert_eq!(s["synced"], true, "{s}");
    assert!(s["revision"].is_u64(), "{s}");
    assert!(s["lag_ms"].is_u64(), "{s}");

    // --- one member killed: first a follower, then the leader (an election
    // happens while the mounts work). Every change must succeed (it may
    // wait for the election; the times are printed).
    let hmac = format!("{C}/hmac");
    for (phase, which) in [(1, "a follower"), (2, "the leader")] {
        let leader = h.cluster.leader().expect("a leader");
        // Phase 1: the first endpoint of the URL (the one a client tries
        // first) unless it leads; phase 2: whichever member leads now.
        let victim = match phase {
            1 if leader != 0 => 0,
            1 => 1,
            _ => leader,
        };
        h.cluster.kill(victim);
        eprintln!("distributed: killed etcd member m{victim} ({which})");
        let label = format!("m{victim} ({which}) down");
        assert_eq!(read(&h.a, &hmac), read(&h.b, &hmac));
        let ka = kv("clients/alice01/api-token");
        for (tag, from, to) in [("a", &h.a, &h.b), ("b", &h.b, &h.a)] {
            let content = format!("v{phase}{tag} ({label})\n");
            let t = Instant::now();
            rotate_by_rename(from, &key, tag, content.as_bytes())
                .unwrap_or_else(|e| panic!("rotation through {tag} with {label}: {e}"));
            times.push((
                format!("{label}: rotation through {tag} (write + rename)"),
                t.elapsed(),
            ));
            let t = Instant::now();
            let want = key_view(from, &key).unwrap();
            assert_eq!(want.current.as_deref(), Some(content.as_bytes()));
            let d = seen(
                &format!("rotation through {tag}, {label}"),
                t,
                to,
                &want,
                ka,
            );
            times.push((format!("{label}: ... seen through the other mount"), d));
        }
        let client = format!("clients/bob000{}", phase + 1);
        let t = Instant::now();
        std::fs::create_dir(h.a.path(&client))
            .unwrap_or_else(|e| panic!("mkdir {client} through A with {label}: {e}"));
        times.push((format!("{label}: mkdir {client} through A"), t.elapsed()));
        let t = Instant::now();
        let want = dir_view(&h.a, &client).unwrap();
        let d = seen(&format!("mkdir, {label}"), t, &h.b, &want, |m| {
            dir_view(m, &client)
        });
        times.push((format!("{label}: ... seen through B"), d));
        h.cluster.start(victim);
        h.cluster.wait_healthy();
        wait_status("synced with every member back", &h, SYNC_LIMIT, |s| {
            s["synced"] == true
        });
    }

    // --- all members stopped.
    let before_a = dir_view(&h.a, C).unwrap();
    let before_b = dir_view(&h.b, C).unwrap();
    assert_eq!(before_a, before_b);
    h.cluster.stop_all();
    eprintln!("distributed: stopped all etcd members");
    let t = Instant::now();
    for m in [&h.a, &h.b] {
        for _ in 0..3 {
            assert_eq!(
                run("cat", &[m.p(&key)]).assert_ok().stdout,
                before_a.1["api-token"].current.clone().unwrap(),
                "cat of a key through {} while etcd is down",
                m.mnt.display()
            );
            assert_eq!(read(m, &hmac), before_a.1["hmac"].current.clone().unwrap());
        }
        assert_eq!(dir_view(m, C).unwrap(), before_a, "everything readable");
    }
    times.push((
        "outage: reads of every key and version, A and B".into(),
        t.elapsed(),
    ));

    let mut refused = Vec::new();
    let mut attempt = |what: &str, o: Out| {
        assert!(
            !o.ok(),
            "{what} succeeded while no etcd member runs:\n{}{}",
            o.text(),
            o.stderr
        );
        eprintln!("distributed: outage: {what} refused: {}", o.stderr.trim());
        refused.push(what.to_owned());
    };
    let src = outside(&h.a, "new-secret", b"new while down\n");
    let t = Instant::now();
    attempt(
        "cp new file (import) through A",
        run("cp", &[src.as_str(), &h.a.p(&format!("{C}/new-secret"))]),
    );
    times.push((
        "outage: cp (import) through A, until refused".into(),
        t.elapsed(),
    ));
    let t = Instant::now();
    attempt(
        "mv tmp key (rotation) through A",
        run("mv", &[h.a.p(&next), h.a.p(&key)]),
    );
    times.push((
        "outage: mv tmp key through A, until refused".into(),
        t.elapsed(),
    ));
    let t = Instant::now();
    attempt(
        "cp over key (rotation) through B",
        run("cp", &[src.as_str(), &h.b.p(&key)]),
    );
    times.push((
        "outage: cp over key through B, until refused".into(),
        t.elapsed(),
    ));
    attempt("rm key through A", run("rm", &[h.a.p(&key)]));
    attempt(
        "mkdir clients/carol03 through B",
        run("mkdir", &[h.b.p("clients/carol03")]),
    );
    // Nothing changed, on either host (a refused import frees its name).
    for m in [&h.a, &h.b] {
        let t = Instant::now();
        loop {
            let now = dir_view(m, C).unwrap();
            if now == before_a {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "{} changed by refused operations:\nbefore: {before_a:?}\nnow: {now:?}",
                m.mnt.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            names(m, "clients").unwrap(),
            ["alice01", "bob0002", "bob0003"],
            "{}",
            m.mnt.display()
        );
    }
    let d = wait_status(
        "status synced:false during the outage",
        &h,
        SYNC_LIMIT,
        |s| s["synced"] == false && s["lag_ms"].is_u64() && s["backend"] == "etcd",
    );
    std::thread::sleep(Duration::from_millis(300));
    let (sa, sb) = (status(&h.a).unwrap(), status(&h.b).unwrap());
    eprintln!("distributed: outage: status A {sa}\ndistributed: outage: status B {sb}");
    assert_eq!(sa["synced"], false, "{sa}");
    assert_eq!(sb["synced"], false, "{sb}");
    times.push(("outage: .keyfs/status synced:false on A and B".into(), d));

    // --- members back: both mounts converge.
    let t = Instant::now();
    h.cluster.start_all();
    times.push(("recovery: etcd cluster healthy again".into(), t.elapsed()));
    let d = wait_status("status synced:true after the outage", &h, SYNC_LIMIT, |s| {
        s["synced"] == true
    });
    times.push(("recovery: .keyfs/status synced:true on A and B".into(), d));
    for m in [&h.a, &h.b] {
        assert_eq!(dir_view(m, C).unwrap(), before_a, "{}", m.mnt.display());
    }
    let mut after: Vec<(String, Duration)> = Vec::new();
    rotate_by_rename(&h.a, &key, "a", b"v3 (after the outage, A)\n")
        .expect("rotation through A after the outage");
    let t = Instant::now();
    let want = key_view(&h.a, &key).unwrap();
    let d = seen(
        "rotation through A after the outage",
        t,
        &h.b,
        &want,
        kv("clients/alice01/api-token"),
    );
    after.push(("recovery: rotation through A, seen through B".into(), d));
    rotate_by_rename(&h.b, &key, "b", b"v4 (after the outage, B)\n")
        .expect("rotation through B after the outage");
    let t = Instant::now();
    let want = key_view(&h.b, &key).unwrap();
    let d = seen(
        "rotation through B after the outage",
        t,
        &h.a,
        &want,
        kv("clients/alice01/api-token"),
    );
    after.push(("recovery: rotation through B, seen through A".into(), d));
    // The mv refused during the outage works now.
    run("mv", &[h.a.p(&next), h.a.p(&key)]).assert_ok();
    let t = Instant::now();
    let want = dir_view(&h.a, C).unwrap();
    assert_eq!(want.1["api-token"].current.as_deref(), Some(&b"next\n"[..]));
    let d = seen("mv refused in the outage, now", t, &h.b, &want, |m| {
        dir_view(m, C)
    });
    after.push(("recovery: mv tmp key through A, seen through B".into(), d));
    // Both mounts end at the same revision.
    let t = Instant::now();
    loop {
        let (sa, sb) = (status(&h.a).unwrap(), status(&h.b).unwrap());
        if sa["synced"] == true && sa["revision"].is_u64() && sa["revision"] == sb["revision"] {
            eprintln!("distributed: converged: A {sa}\ndistributed: converged: B {sb}");
            break;
        }
        assert!(
            t.elapsed() < POLL_LIMIT,
            "A and B at different revisions:\nA {sa}\nB {sb}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    after.push(("recovery: A and B at the same revision".into(), t.elapsed()));
    times.extend(after.iter().cloned());
    report("one member down, all down, all back", &times);
    assert_eq!(refused.len(), 5);
    h.keyfs_mk(&["check", "--store", &h.url]).assert_ok();
    h.keyfs_mk(&["audit", "--verify", "--store", &h.url])
        .assert_ok();
    assert_all_within(&after, PROPAGATION_LIMIT);
}

// ---------------------------------------------------------------------------
// secrecy
// ---------------------------------------------------------------------------

/// Forms in which a secret could leak: itself, hex, base64; for a PEM
/// private key also its DER and its private scalar (in those forms). (Not
/// the PEM's lines: the last ones encode the public key, which is no secret.)
fn leak_forms(secret: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let forms = |b: &[u8]| {
        vec![
            b.to_vec(),
            hex(b).into_bytes(),
            hex(b).to_uppercase().into_bytes(),
            b64.encode(b).into_bytes(),
        ]
    };
    let mut v = forms(secret);
    if let Ok(text) = std::str::from_utf8(secret) {
        if text.starts_with("-----BEGIN") && text.contains("PRIVATE KEY") {
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            let der = b64.decode(body.trim()).expect("PEM body is base64");
            // ECPrivateKey: INTEGER 1, OCTET STRING (32 bytes) = the scalar.
            let at = der
                .windows(5)
                .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
                .expect("an EC private key");
            v.extend(forms(&der[at + 5..at + 37]));
            v.push(der);
        }
    }
    v
}

/// Every regular file below `MNT/rel` (archived versions included), with
/// its content.
fn all_files(m: &Mounted, rel: &str, out: &mut Vec<(String, Vec<u8>)>) {
    for n in names(m, rel).unwrap() {
        let p = format!("{rel}/{n}");
        let md = std::fs::symlink_metadata(m.path(&p)).unwrap();
        if md.is_dir() {
            all_files(m, &p, out);
        } else if md.is_file() {
            out.push((p.clone(), read(m, &p)));
        }
    }
}

/// After creating, rotating and destroying keys, neither etcd's current
/// keyspace (`etcdctl get "" --prefix`, raw values) nor a snapshot of its
/// whole database (every revision not yet compacted) contains any key's
/// plaintext (as read through the mount, raw/hex/base64/DER) or the master
/// key; every etcd key is under the store's prefix.
#[test]
fn distributed_etcd_never_holds_plaintext_or_the_master_key() {
    let h = Hosts::new("secrecy", &[]);
    let (a, b) = (&h.a, &h.b);
    std::fs::create_dir(a.path(C)).unwrap();
    keyfs(&["generate", a.mnt_str(), "--global"]).assert_ok();
    let canary = format!("canary secret {}\n", hex(&rand_bytes(24)));
    let src = outside(a, "canary", canary.as_bytes());
    run("cp", &[src.as_str(), &a.p(&format!("{C}/canary"))]).assert_ok();
    let src = outside(a, "hmac", &rand_bytes(32));
    run("cp", &[src.as_str(), &a.p(&format!("{C}/hmac"))]).assert_ok();
    let doomed = rand_bytes(32);
    let src = outside(a, "doomed", &doomed);
    run("cp", &[src.as_str(), &a.p(&format!("{C}/doomed"))]).assert_ok();
    assert_eq!(read(a, &format!("{C}/doomed")), doomed);
    run("rm", &[a.p(&format!("{C}/doomed"))]).assert_ok();

    let mut files = Vec::new();
    for top in ["clients", "poison", "audit"] {
        all_files(a, top, &mut files);
    }
    let t = Instant::now();
    let mut on_b = Vec::new();
    loop {
        on_b.clear();
        for top in ["clients", "poison", "audit"] {
            all_files(b, top, &mut on_b);
        }
        if on_b == files || t.elapsed() > POLL_LIMIT {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(on_b, files, "B shows the same keys");
    let mut secrets: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .filter(|(p, _)| !p.ends_with(".pub") && !p.contains(".pub.old/"))
        .collect();
    secrets.push((format!("{C}/doomed (destroyed)"), doomed));
    assert!(
        secrets.iter().any(|(p, _)| p.contains("/hmac.old/")),
        "an archived version is among the secrets"
    );
    assert!(secrets.iter().any(|(p, _)| p.starts_with("poison/")));
    let mk_text = std::fs::read_to_string(&h.mk).unwrap();
    let mk_raw = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(mk_text.trim())
            .expect("the master key file is base64")
    };
    assert_eq!(mk_raw.len(), 32);
    secrets.push((
        "master key (file text)".into(),
        mk_text.trim().as_bytes().to_vec(),
    ));
    secrets.push(("master key".into(), mk_raw));

    // The current keyspace, every key and raw value.
    let dump = h.cluster.etcdctl(&["get", "", "--prefix"]);
    dump.assert_ok();
    let o = h
        .cluster
        .etcdctl(&["get", "", "--prefix", "--keys-only", "-w", "json"]);
    o.assert_ok();
    let js: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys: Vec<String> = js["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|kv| {
                    use base64::Engine;
                    let k = base64::engine::general_purpose::STANDARD
                        .decode(kv["key"].as_str().unwrap())
                        .unwrap();
                    String::from_utf8_lossy(&k).into_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(!keys.is_empty(), "nothing in etcd?");
    let outside_prefix: Vec<&String> = keys.iter().filter(|k| !k.contains(&h.prefix)).collect();
    assert!(
        outside_prefix.is_empty(),
        "etcd keys outside the prefix {:?}: {outside_prefix:?}",
        h.prefix
    );
    let under = h.cluster.etcdctl(&["get", "--prefix", &h.prefix]);
    under.assert_ok();

    // The whole database: every revision etcd still keeps.
    let snap = h.cluster.dir.path().join("snapshot.db");
    h.cluster
        .etcdctl_on(0, &["snapshot", "save", snap.to_str().unwrap()])
        .assert_ok();
    let snapshot = std::fs::read(&snap).unwrap();

    eprintln!(
        "distributed: etcd holds {} keys ({} B of raw values, {} B under `get --prefix {}`), \
         snapshot {} B; checking {} secrets",
        keys.len(),
        dump.stdout.len(),
        under.stdout.len(),
        h.prefix,
        snapshot.len(),
        secrets.len()
    );
    let mut leaks = Vec::new();
    for (what, hay) in [
        ("etcdctl get", &dump.stdout),
        ("etcdctl get --prefix", &under.stdout),
        ("etcd snapshot", &snapshot),
    ] {
        for (path, secret) in &secrets {
            for form in leak_forms(secret) {
                if contains(hay, &form) {
                    leaks.push(format!("{path} in {what}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "plaintext in etcd: {leaks:?}");
}

/// A host that was away while the cluster compacted the revisions it had not
/// seen cannot resume its watch: it reloads the whole prefix, and then serves
/// what changed meanwhile.
#[test]
fn distributed_a_host_that_missed_compacted_revisions_resynchronises() {
    let mut h = Hosts::new("compacted", &[]);
    std::fs::create_dir(h.a.path(C)).unwrap();
    let key = format!("{C}/hmac");
    let before = read(&h.b, &key);
    let b_pid = h.b.pid().expect("B's daemon") as i32;

    // B stops (as a host whose network is down would), and the member its
    // watch goes through (the first one) goes away, so that nothing of what
    // follows can reach B on that watch ...
    /// Resumes B however the test ends (a stopped daemon cannot unmount).
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(b_pid, libc::SIGSTOP) }, 0);
    let resume = Resume(b_pid);
    h.cluster.kill(0);
    // ... while A rotates the key and removes another one ...
    let new = rand_bytes(32);
    rotate_by_rename(&h.a, &key, "while-b-away", &new).unwrap();
    std::fs::remove_file(h.a.path(&format!("{C}/storage_sym"))).unwrap();
    // ... and the cluster compacts its history up to now.
    let o = h.cluster.etcdctl_on(1, &["get", "x", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("etcdctl json");
    let rev = v["header"]["revision"].as_i64().expect("revision");
    h.cluster
        .etcdctl_on(1, &["compact", &rev.to_string(), "--physical"])
        .assert_ok();
    drop(resume);

    let t = Instant::now();
    let d = seen(
        "the rotation made while B was away",
        t,
        &h.b,
        &Some(new.clone()),
        |m| read_opt(m, &key),
    );
    assert_ne!(before, new);
    seen("the removal made while B was away", t, &h.b, &None, |m| {
        read_opt(m, &format!("{C}/storage_sym"))
    });
    let log = h.b.daemon_log();
    assert!(
        log.contains("was compacted away before this host saw it; reloading the whole prefix"),
        "B did not say it reloaded:\n{log}"
    );
    report(
        "resynchronisation after compaction",
        &[("B serves the changes it missed".into(), d)],
    );
    // B keeps following changes afterwards.
    let newer = rand_bytes(32);
    rotate_by_rename(&h.a, &key, "after-resync", &newer).unwrap();
    seen(
        "a rotation after the resync",
        Instant::now(),
        &h.b,
        &Some(newer),
        |m| read_opt(m, &key),
    );
}

/// One etcd member that speaks TLS only and requires client certificates,
/// with its CA, server and client certificates made by openssl. Killed and
/// reaped on drop (and with the test thread, by `PR_SET_PDEATHSIG`).
struct TlsEtcd {
    dir: tempfile::TempDir,
    port: u16,
    child: std::process::Child,
}

impl TlsEtcd {
    fn new() -> TlsEtcd {
        use std::os::unix::process::CommandExt;
        let dir = crate::common::tempdir();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        let sh_ok = |script: String| {
            crate::common::sh(&script).assert_ok();
        };
        // A CA, a server certificate for 127.0.0.1, a client certificate,
        // and a second CA that signed nothing of this cluster.
        sh_ok(format!(
            "set -e; cd {d}
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=keyfs-test-ca
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout other-ca.key -out other-ca.pem -days 2 -subj /CN=another-ca
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1
             printf 'subjectAltName=IP:127.0.0.1\\n' > server.ext
             openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout client.key -out client.csr -subj /CN=keyfs
             printf 'extendedKeyUsage=clientAuth\\n' > client.ext
             openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext",
            d = dir.path().display()
        ));
        let ports = crate::common::etcd_free_ports(2);
        let (port, peer) = (ports[0], ports[1]);
        let client_url = format!("https://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let mut c = std::process::Command::new("etcd");
        c.args(["--name", "tls0", "--data-dir", &p("data")])
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("tls0={peer_url}")])
            .args([
                "--cert-file",
                &p("server.pem"),
                "--key-file",
                &p("server.key"),
            ])
            .args(["--trusted-ca-file", &p("ca.pem"), "--client-cert-auth"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl(2) only, between fork and exec.
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
        let child = c
            .spawn()
            .expect("cannot run etcd (scripts/setup.sh installs it)");
        let e = TlsEtcd { dir, port, child };
        let start = Instant::now();
        loop {
            let o = run(
                "etcdctl",
                &[
                    format!("--endpoints={client_url}"),
                    format!("--cacert={}", e.file("ca.pem")),
                    format!("--cert={}", e.file("client.pem")),
                    format!("--key={}", e.file("client.key")),
                    "endpoint".into(),
                    "health".into(),
                ],
            );
            if o.ok() {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "TLS etcd did not become healthy: {}\n{}",
                o.text(),
                std::fs::read_to_string(e.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    /// `etcd://127.0.0.1:PORT/PREFIX?options`.
    fn url(&self, prefix: &str, options: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}?{options}", self.port)
    }
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With TLS options in the store URL, keyfs talks to a cluster that accepts
/// only TLS with client certificates; without a client certificate, or with
/// the wrong CA, it is refused with a store error that names the cluster.
#[test]
fn distributed_tls_with_client_certificates() {
    require_root_and_fuse();
    let e = TlsEtcd::new();
    let full = format!(
        "cacert={}&cert={}&key={}",
        e.file("ca.pem"),
        e.file("client.pem"),
        e.file("client.key")
    );
    let url = e.url("keyfs-tls", &full);
    let mk = e.dir.path().join("master.key");
    keyfs(&[
        OsStr::new("init"),
        OsStr::new(&url),
        OsStr::new("--generate-master-key"),
        mk.as_os_str(),
    ])
    .assert_ok();
    let m = Mounted::new_on(&url, &mk, &[]);
    std::fs::create_dir(m.path(C)).unwrap();
    let secret = rand_bytes(32);
    write_committed(&m.path(&format!("{C}/api-token")), &secret).unwrap();
    assert_eq!(read(&m, &format!("{C}/api-token")), secret);
    let st = status(&m).unwrap();
    assert_eq!(st["backend"], "etcd", "{st}");
    assert_eq!(st["synced"], true, "{st}");
    drop(m);

    let mk_s = mk.to_str().unwrap();
    for (what, options) in [
        (
            "no client certificate",
            format!("cacert={}", e.file("ca.pem")),
        ),
        (
            "a CA that did not sign the cluster",
            format!(
                "cacert={}&cert={}&key={}",
                e.file("other-ca.pem"),
                e.file("client.pem"),
                e.file("client.key")
            ),
        ),
        ("no TLS at all", String::new()),
    ] {
        let url = e.url("keyfs-tls", &options);
        let url = url.trim_end_matches('?');
        let o = keyfs(&["--master-key-file", mk_s, "list", "--store", url]);
        assert_eq!(o.code, Some(3), "{what}: {}{}", o.text(), o.stderr);
        let text = &o.stderr;
        assert!(
            text.contains("is unreachable or has no quorum")
                && text.contains("with TLS, that they accept the URL's cacert/cert/key"),
            "{what}: {text}"
        );
    }
}

/// A change larger than the cluster accepts in one transaction (etcd's
/// default `--max-txn-ops` is 128) is refused whole, with the flags to
/// raise, and the store is left as it was.
#[test]
fn distributed_a_change_too_large_for_the_cluster_is_refused_whole() {
    require_root_and_fuse();
    // The TLS member runs with etcd's default limits.
    let e = TlsEtcd::new();
    let url = e.url(
        "keyfs-big",
        &format!(
            "cacert={}&cert={}&key={}",
            e.file("ca.pem"),
            e.file("client.pem"),
            e.file("client.key")
        ),
    );
    let mk = e.dir.path().join("master.key");
    keyfs(&[
        OsStr::new("init"),
        OsStr::new(&url),
        OsStr::new("--generate-master-key"),
        mk.as_os_str(),
    ])
    .assert_ok();
    let mk_s = mk.to_str().unwrap();
    // 45 clients x 3 stored keys: a rewrap re-wraps 135 data keys at once.
    for i in 0..45 {
        keyfs(&[
            "--master-key-file",
            mk_s,
            "generate",
            "--store",
            &url,
            "--client-id",
            &format!("client{i:03}"),
        ])
        .assert_ok();
    }
    let before = keyfs(&["--master-key-file", mk_s, "list", "--store", &url, "--json"]);
    before.assert_ok();
    let new_mk = e.dir.path().join("new.key");
    keyfs(&[
        OsStr::new("init"),
        OsStr::new(e.dir.path().join("scratch-store").as_os_str()),
        OsStr::new("--generate-master-key"),
        new_mk.as_os_str(),
    ])
    .assert_ok();
    let o = keyfs(&[
        "--master-key-file",
        mk_s,
        "rewrap",
        "--store",
        &url,
        "--new-master-key-file",
        new_mk.to_str().unwrap(),
    ]);
    assert_eq!(o.code, Some(3), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("more than the cluster accepts in one transaction")
            && o.stderr
                .contains("raise --max-txn-ops and --max-request-bytes")
            && o.stderr.contains("nothing was changed"),
        "{}",
        o.stderr
    );
    // Nothing changed: the old master key still opens everything.
    let after = keyfs(&["--master-key-file", mk_s, "list", "--store", &url, "--json"]);
    after.assert_ok();
    assert_eq!(after.stdout, before.stdout);
    keyfs(&["--master-key-file", mk_s, "check", "--store", &url]).assert_ok();
}
