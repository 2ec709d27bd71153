//! etcd implementation of [`Backend`]: several hosts share one inventory.
//!
//! Every key of a store lives under one prefix (`etcd://h1:2379,…/PREFIX`
//! stores its records as `PREFIX/<record key>`). Each process keeps a local
//! mirror of the prefix: it loads it at one revision, then follows a watch
//! from the next revision, so reads never leave the host and keep being
//! served from the last synchronised state while the cluster is down.
//! Changes are etcd transactions guarded by the values they read; after a
//! transaction the mirror is brought up to its revision before the call
//! returns, so a process always reads its own writes. A heartbeat (a
//! linearizable read once a second) tells how current the mirror is.

use super::{Backend, Change, Health, Listener, Txn, TxnOutcome};
use crate::error::{Error, Kind, Result};
use etcd_client as ec;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long one request to the cluster may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Heartbeat period (a linearizable read that confirms the mirror is current).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// The mirror counts as synchronised while confirmed within this long.
const SYNC_WINDOW: Duration = Duration::from_secs(2);
/// How long a change waits out an outage (an election takes about a second)
/// before it is refused; once an outage is older, changes are refused at once.
const GRACE: Duration = Duration::from_secs(5);
/// A record every transaction of keyfs also writes (under the prefix; the
/// 0xff byte keeps it apart from the store's own records, which it never
/// shows). Its revision is the revision of the last change of the store, which
/// tells how current the mirror is without etcd's progress notifications:
/// etcd before 3.4.25 can send those ahead of events still to come
/// (etcd-io/etcd#15220).
const MARK: &[u8] = b"\xffkeyfs-last-change";
/// Records per page when loading the prefix. etcd 3.4 walks the rest of the
/// range for every page (etcd-io/etcd#11057), so pages are large.
const PAGE: i64 = 5000;
/// Largest gRPC message accepted (a page of up to 500 sealed 64 KiB keys).
const MAX_MESSAGE: usize = 64 << 20;

/// TLS files for the client (`?cacert=…&cert=…&key=…` in the store URL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate (PEM) that signed the members' certificates.
    pub cacert: Option<String>,
    /// Client certificate (PEM), for clusters that require one.
    pub cert: Option<String>,
    /// Client private key (PEM).
    pub key: Option<String>,
}

/// A parsed `etcd://host:port,…/PREFIX[?options]` store name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each member.
    pub endpoints: Vec<String>,
    /// The namespace inside etcd (without the trailing `/`).
    pub prefix: String,
    /// TLS settings; `None` for plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// Is `s` a store URL rather than a directory?
pub fn is_url(s: &str) -> bool {
    s.starts_with("etcd://")
}

fn usage(msg: String) -> Error {
    Error::new(Kind::Usage, msg)
}

impl EtcdUrl {
    /// Parse a store name. Errors say what a valid one looks like.
    pub fn parse(s: &str) -> Result<EtcdUrl> {
        const FORM: &str = "write etcd://HOST:PORT[,HOST:PORT…]/PREFIX[?cacert=CA.pem[&cert=CERT.pem&key=KEY.pem]]";
        let rest = s
            .strip_prefix("etcd://")
            .ok_or_else(|| usage(format!("{s:?} is not an etcd store URL; {FORM}")))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (hosts, prefix) = rest.split_once('/').ok_or_else(|| {
            usage(format!(
                "{s:?} names no prefix: every store lives under its own prefix; {FORM}"
            ))
        })?;
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
            || prefix
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(usage(format!(
                "{s:?}: the prefix {prefix:?} must be non-empty and made of letters, digits, '-', '_', '.' and '/' separated names; {FORM}"
            )));
        }
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let ok = match h.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !ok {
                return Err(usage(format!(
                    "{s:?}: {h:?} is not HOST:PORT (etcd's client port, usually 2379); {FORM}"
                )));
            }
            endpoints.push(h.to_string());
        }
        let mut tls = None;
        if let Some(q) = query {
            let mut t = TlsFiles::default();
            for kv in q.split('&').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                if v.is_empty() {
                    return Err(usage(format!(
                        "{s:?}: option {k:?} needs a file path; {FORM}"
                    )));
                }
                match k {
                    "cacert" => t.cacert = Some(v.to_string()),
                    "cert" => t.cert = Some(v.to_string()),
                    "key" => t.key = Some(v.to_string()),
                    _ => {
                        return Err(usage(format!(
                            "{s:?}: unknown option {k:?} (known: cacert, cert, key); {FORM}"
                        )))
                    }
                }
            }
            if t.cert.is_some() != t.key.is_some() {
                return Err(usage(format!(
                    "{s:?}: a client certificate needs both cert= and key=; {FORM}"
                )));
            }
            tls = Some(t);
        }
        Ok(EtcdUrl {
            endpoints,
            prefix: prefix.to_string(),
            tls,
        })
    }

    /// The name without options (for messages and the mount's fsname).
    pub fn display(&self) -> String {
        format!("etcd://{}/{}", self.endpoints.join(","), self.prefix)
    }
}

/// The local mirror and what is known about how current it is.
struct Mirror {
    /// Each record's value and the revision that wrote it.
    kv: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
    /// Records deleted at a revision the watch has not passed yet (so that
    /// an older event arriving late cannot bring them back).
    gone: HashMap<Vec<u8>, i64>,
    /// Every change up to this revision is in `kv`.
    rev: i64,
    /// The latest of this process's own commits, in `kv` already (it may be
    /// ahead of `rev` until the watch catches up).
    own_rev: i64,
    /// Last instant the cluster confirmed that `rev` was current.
    synced_at: Instant,
    /// The last heartbeat or watch attempt reached the cluster.
    reachable: bool,
    /// A heartbeat's revision waiting for the mirror to reach it, and when it was read.
    confirm: Option<(i64, Instant)>,
    /// Why the last request failed (for logs and errors).
    last_error: String,
    /// Since when the cluster has been unreachable.
    down_since: Option<Instant>,
}

struct Shared {
    m: Mutex<Mirror>,
    moved: Condvar,
    listener: Mutex<Option<Arc<Listener>>>,
    /// `PREFIX/`
    prefix: Vec<u8>,
    name: String,
    stop: AtomicBool,
    /// Sub-prefixes kept out of the mirror (read from the cluster when asked).
    unmirrored: Vec<Vec<u8>>,
    /// Revisions of this process's own recent commits: their watch events
    /// update the mirror but are not reported as other writers' changes.
    own: Mutex<std::collections::VecDeque<i64>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn strip<'a>(&self, k: &'a [u8]) -> Option<&'a [u8]> {
        k.strip_prefix(self.prefix.as_slice())
    }

    fn is_unmirrored(&self, k: &[u8]) -> bool {
        self.unmirrored.iter().any(|u| k.starts_with(u))
    }

    fn remember_own(&self, rev: i64) {
        let mut o = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if o.len() >= 256 {
            o.pop_front();
        }
        o.push_back(rev);
    }

    /// Apply watch events (already stripped of the prefix, with their
    /// revisions) and advance to `rev`.
    fn apply(&self, events: Vec<(Vec<u8>, Option<Vec<u8>>, i64)>, rev: i64) {
        let mut changes = Vec::with_capacity(events.len());
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner()).clone();
        {
            let mut m = self.lock();
            for (k, v, at) in events {
                let Some(before) = Self::put(&mut m, &k, v.clone(), at) else {
                    continue;
                };
                // Our own commits already invalidated what they changed.
                if before != v && !own.contains(&at) {
                    changes.push(Change {
                        key: k,
                        before,
                        after: v,
                    });
                }
            }
            if rev > m.rev {
                m.rev = rev;
                let r = m.rev;
                m.gone.retain(|_, at| *at > r);
            }
            Self::confirm(&mut m);
        }
        self.moved.notify_all();
        self.tell(&changes);
    }

    /// Set `k` to `v` (`None`: deleted) as of revision `at`, unless the
    /// mirror already has a later state of it. Returns the value before, or
    /// `None` when nothing changed.
    #[allow(clippy::option_option)]
    fn put(m: &mut Mirror, k: &[u8], v: Option<Vec<u8>>, at: i64) -> Option<Option<Vec<u8>>> {
        let known =
            m.kv.get(k)
                .map(|(_, r)| *r)
                .or_else(|| m.gone.get(k).copied())
                .unwrap_or(0);
        if at <= known {
            return None;
        }
        Some(match v {
            Some(v) => {
                m.gone.remove(k);
                m.kv.insert(k.to_vec(), (v, at)).map(|(b, _)| b)
            }
            None => {
                m.gone.insert(k.to_vec(), at);
                m.kv.remove(k).map(|(b, _)| b)
            }
        })
    }

    /// This process's own transaction, committed at revision `rev`: into
    /// the mirror at once, so that the process reads its own writes even
    /// while its watch is reconnecting (its echo is then ignored).
    fn apply_own(&self, writes: &HashMap<&[u8], Option<&[u8]>>, rev: i64) {
        self.remember_own(rev);
        let mut m = self.lock();
        m.own_rev = m.own_rev.max(rev);
        for (k, v) in writes {
            if !self.is_unmirrored(k) {
                Self::put(&mut m, k, v.map(|v| v.to_vec()), rev);
            }
        }
    }

    /// Replace the whole mirror (after a compaction made the watch's
    /// revision unavailable), reporting every difference.
    fn replace(&self, kv: BTreeMap<Vec<u8>, (Vec<u8>, i64)>, rev: i64) {
        let mut changes = Vec::new();
        {
            let mut m = self.lock();
            for (k, (v, _)) in &m.kv {
                match kv.get(k) {
                    Some((n, _)) if n == v => {}
                    n => changes.push(Change {
                        key: k.clone(),
                        before: Some(v.clone()),
                        after: n.map(|(n, _)| n.clone()),
                    }),
                }
            }
            for (k, (v, _)) in &kv {
                if !m.kv.contains_key(k) {
                    changes.push(Change {
                        key: k.clone(),
                        before: None,
                        after: Some(v.clone()),
                    });
                }
            }
            m.kv = kv;
            m.gone.clear();
            m.rev = rev;
            Self::confirm(&mut m);
        }
        self.moved.notify_all();
        self.tell(&changes);
    }

    /// A heartbeat confirmed revision r at instant t: once the mirror has
    /// reached r, it was current at t.
    fn confirm(m: &mut Mirror) {
        if let Some((r, t)) = m.confirm {
            if m.rev >= r {
                m.synced_at = t;
                m.confirm = None;
            }
        }
    }

    fn tell(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let l = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(l) = l {
            l(changes);
        }
    }

    fn set_reachable(&self, ok: bool, why: &str) {
        let mut m = self.lock();
        if m.reachable && !ok {
            log::warn!(
                "etcd cluster {} is unreachable or has no quorum ({why}): serving the state synchronised at revision {} ({} ms ago); changes are refused until it is back",
                self.name,
                m.rev,
                m.synced_at.elapsed().as_millis()
            );
        } else if !m.reachable && ok {
            log::warn!(
                "etcd cluster {} is reachable again; following its changes from revision {}",
                self.name,
                m.rev
            );
        }
        m.reachable = ok;
        if ok {
            m.down_since = None;
        } else {
            m.last_error = why.to_string();
            m.down_since.get_or_insert_with(Instant::now);
        }
    }

    /// How long the cluster has been unreachable (`None`: it is reachable).
    fn outage(&self) -> Option<Duration> {
        self.lock().down_since.map(|t| t.elapsed())
    }

    /// Wait until the mirror has reached `rev` (or `timeout` passed).
    fn wait_for(&self, rev: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut m = self.lock();
        while m.rev < rev {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            m = self
                .moved
                .wait_timeout(m, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// A store in an etcd cluster, mirrored locally.
pub struct EtcdBackend {
    rt: tokio::runtime::Runtime,
    pool: Arc<Pool>,
    shared: Arc<Shared>,
}

/// One client per member, and the member in use. etcd-client's own
/// balancer fails a request when any one of its endpoints is down
/// (etcdv3/etcd-client#39), so keyfs fails over itself: it keeps talking to
/// one member and moves to the next when that one cannot be reached.
struct Pool {
    clients: Vec<ec::Client>,
    cur: std::sync::atomic::AtomicUsize,
}

impl Pool {
    fn connect(url: &EtcdUrl, rt: &tokio::runtime::Runtime) -> Result<Pool> {
        let opts = options(url)?;
        let mut clients = Vec::new();
        for ep in &url.endpoints {
            // With one endpoint the client connects lazily: a member that is
            // down now is tried again on each request.
            let c = rt
                .block_on(ec::Client::connect([ep.as_str()], Some(opts.clone())))
                .map_err(|e| unavailable(&url.display(), &e))?;
            clients.push(c);
        }
        Ok(Pool {
            clients,
            cur: Default::default(),
        })
    }

    /// The member in use (its index and client).
    fn current(&self) -> (usize, ec::Client) {
        let i = self.cur.load(Ordering::Acquire) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Member `i` failed: move on to the next one (unless another request already did).
    fn advance(&self, i: usize) {
        let _ = self.cur.compare_exchange(
            i,
            (i + 1) % self.clients.len(),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Run `f` on the member in use, moving on to the next members while it
    /// fails with `retry(e)` true. Returns the last error when all fail.
    async fn run<T, F, Fut>(
        &self,
        retry: fn(&ec::Error) -> bool,
        f: F,
    ) -> std::result::Result<T, ec::Error>
    where
        F: Fn(ec::Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, ec::Error>>,
    {
        let mut last = None;
        for _ in 0..self.clients.len() {
            let (i, c) = self.current();
            match f(c).await {
                Ok(v) => return Ok(v),
                Err(e) if retry(&e) => {
                    self.advance(i);
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }
}

fn unavailable(name: &str, e: &ec::Error) -> Error {
    Error::new(
        Kind::Unavailable,
        format!("etcd cluster {name} is unreachable or has no quorum ({}); check that its members run, that this host reaches them and, with TLS, that they accept the URL's cacert/cert/key (docs/DISTRIBUTED.md), then retry", brief(e)),
    )
}

/// A short cause for logs and messages: the gRPC message and the
/// innermost error (for example "Connection refused (os error 111)").
fn brief(e: &ec::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    let inner = root.to_string();
    match e {
        ec::Error::GRpcStatus(s) if !s.message().is_empty() => {
            if inner.contains(s.message()) || std::ptr::eq(root, e as &dyn std::error::Error) {
                s.message().to_string()
            } else {
                format!("{}: {inner}", s.message())
            }
        }
        _ => inner,
    }
}

/// Did the request surely not reach the cluster (so nothing was applied)?
fn never_sent(e: &ec::Error) -> bool {
    let b = brief(e);
    b.contains("onnect") || b.contains("refused") || b.contains("no leader")
}

/// Is this etcd error about reaching the cluster (as opposed to a request it refused)?
fn is_transport(e: &ec::Error) -> bool {
    match e {
        ec::Error::TransportError(_) | ec::Error::IoError(_) => true,
        ec::Error::GRpcStatus(s) => {
            matches!(
                s.code() as i32,
                grpc_code::UNAVAILABLE
                    | grpc_code::DEADLINE_EXCEEDED
                    | grpc_code::CANCELLED
                    | grpc_code::UNKNOWN
            ) || s.message().contains("no leader")
                || s.message().contains("timed out")
        }
        _ => false,
    }
}

/// gRPC status codes (tonic's `Code`, which etcd-client does not re-export).
mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const UNAVAILABLE: i32 = 14;
}

fn read_file(what: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::new(
            Kind::Usage,
            format!("cannot read the etcd {what} {path}: {e}; check the path in the store URL"),
        )
    })
}

fn options(url: &EtcdUrl) -> Result<ec::ConnectOptions> {
    let mut o = ec::ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        // Without a leader a member fails requests at once instead of waiting.
        .with_require_leader(true);
    if let Some(t) = &url.tls {
        let mut tls = ec::TlsOptions::new();
        if let Some(ca) = &t.cacert {
            tls = tls.ca_certificate(ec::Certificate::from_pem(read_file("CA certificate", ca)?));
        }
        if let (Some(c), Some(k)) = (&t.cert, &t.key) {
            tls = tls.identity(ec::Identity::from_pem(
                read_file("client certificate", c)?,
                read_file("client key", k)?,
            ));
        }
        o = o.with_tls(tls);
    }
    if let (Ok(u), Ok(p)) = (
        std::env::var("KEYFS_ETCD_USER"),
        std::env::var("KEYFS_ETCD_PASSWORD"),
    ) {
        o = o.with_user(u, p);
    }
    Ok(o)
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every record in `[from, end)` (keys stripped of the first `strip`
/// bytes) at revision `rev` (0: the current one, which is returned), a page
/// at a time.
async fn read_range(
    client: &ec::Client,
    mut from: Vec<u8>,
    end: &[u8],
    strip: usize,
    mut rev: i64,
    out: &mut BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
) -> std::result::Result<i64, ec::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    loop {
        let mut o = ec::GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(PAGE)
            .with_sort(ec::SortTarget::Key, ec::SortOrder::Ascend);
        if rev > 0 {
            o = o.with_revision(rev);
        }
        let r = kv.get(from.clone(), Some(o)).await?;
        if rev == 0 {
            rev = r.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = r.more();
        let mut last = None;
        for e in r.kvs() {
            out.insert(
                e.key()[strip..].to_vec(),
                (e.value().to_vec(), e.mod_revision()),
            );
            last = Some(e.key().to_vec());
        }
        match (more, last) {
            (true, Some(mut l)) => {
                l.push(0);
                from = l;
            }
            _ => return Ok(rev),
        }
    }
}

/// Load every mirrored record under `prefix` at one revision: the prefix
/// minus its `unmirrored` sub-prefixes.
async fn load(
    client: &ec::Client,
    prefix: &[u8],
    unmirrored: &[Vec<u8>],
) -> std::result::Result<(BTreeMap<Vec<u8>, (Vec<u8>, i64)>, i64), ec::Error> {
    let mut out = BTreeMap::new();
    let mut rev = 0;
    let mut start = prefix.to_vec();
    let mut skip: Vec<Vec<u8>> = unmirrored
        .iter()
        .map(|u| [prefix, u.as_slice()].concat())
        .collect();
    skip.sort();
    for u in skip.iter().chain(std::iter::once(&prefix_end(prefix))) {
        if start < *u {
            rev = read_range(client, start.clone(), u, prefix.len(), rev, &mut out).await?;
        }
        start = prefix_end(u);
    }
    if rev == 0 {
        // Nothing was read (everything is unmirrored): learn the revision.
        rev = client
            .kv_client()
            .get(
                prefix.to_vec(),
                Some(ec::GetOptions::new().with_count_only()),
            )
            .await?
            .header()
            .map(|h| h.revision())
            .unwrap_or(0);
    }
    out.remove(MARK);
    Ok((out, rev))
}

impl EtcdBackend {
    /// Connect, load the prefix and start following it. Records under the
    /// `unmirrored` sub-prefixes (an append-only log, say, that is rarely
    /// read and grows without bound) are not kept in memory: reads of them
    /// go to the cluster.
    pub fn open(url: &EtcdUrl, unmirrored: &[&[u8]]) -> Result<EtcdBackend> {
        let unmirrored: Vec<Vec<u8>> = unmirrored.iter().map(|u| u.to_vec()).collect();
        let name = url.display();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keyfs-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::new(Kind::Store, format!("cannot start the etcd client: {e}")))?;
        let pool = Arc::new(Pool::connect(url, &rt)?);
        let mut prefix = url.prefix.as_bytes().to_vec();
        prefix.push(b'/');
        let (kv, rev) = rt
            .block_on(pool.run(is_transport, |c| {
                let prefix = prefix.clone();
                let unmirrored = unmirrored.clone();
                async move { load(&c, &prefix, &unmirrored).await }
            }))
            .map_err(|e| unavailable(&name, &e))?;
        let shared = Arc::new(Shared {
            m: Mutex::new(Mirror {
                kv,
                gone: HashMap::new(),
                rev,
                own_rev: 0,
                synced_at: Instant::now(),
                reachable: true,
                confirm: None,
                last_error: String::new(),
                down_since: None,
            }),
            moved: Condvar::new(),
            listener: Mutex::new(None),
            prefix,
            name,
            stop: AtomicBool::new(false),
            unmirrored,
            own: Default::default(),
        });
        rt.spawn(follow(pool.clone(), shared.clone()));
        rt.spawn(heartbeat(pool.clone(), shared.clone()));
        Ok(EtcdBackend { rt, pool, shared })
    }

    /// The revision of the store's last change, read linearizably (so it
    /// needs a quorum); 0 for a store nothing has written to yet.
    fn last_change(&self) -> std::result::Result<i64, ec::Error> {
        let mark = self.key(MARK);
        self.rt.block_on(async {
            match tokio::time::timeout(REQUEST_TIMEOUT, last_change(&self.pool, &mark)).await {
                Ok(r) => r,
                Err(_) => Err(ec::Error::WatchError("no answer within 3 s".into())),
            }
        })
    }

    /// After a conflict: wait until the mirror has every change up to now,
    /// so that the caller's retry reads what beat it.
    fn catch_up(&self) {
        if let Ok(rev) = self.last_change() {
            self.shared.wait_for(rev, Duration::from_secs(1));
        }
    }

    fn key(&self, k: &[u8]) -> Vec<u8> {
        [self.shared.prefix.as_slice(), k].concat()
    }

    /// Records in `[from, end)` (full etcd keys), read from the cluster at
    /// the revision the mirror is at, so that they agree with every mirrored
    /// record (the audit log with its head, say); keys are returned relative
    /// to the prefix. If that revision was compacted meanwhile, the current
    /// one is read.
    fn read_cluster(&self, from: Vec<u8>, end: Vec<u8>) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
        let strip = self.shared.prefix.len();
        // (At our own latest commit, if the watch has not passed it yet: the
        // mirror holds it, and every write of the prefix before it.)
        let at = {
            let m = self.shared.lock();
            m.rev.max(m.own_rev)
        };
        let read = |rev: i64| {
            self.rt.block_on(self.pool.run(is_transport, |c| {
                let (from, end) = (from.clone(), end.clone());
                async move {
                    let mut out = BTreeMap::new();
                    read_range(&c, from, &end, strip, rev, &mut out).await?;
                    out.remove(MARK);
                    Ok(out.into_iter().map(|(k, (v, _))| (k, v)).collect())
                }
            }))
        };
        match read(at) {
            Err(e) if brief(&e).contains("compacted") => read(0),
            r => r,
        }
        .map_err(|e| unavailable(&self.shared.name, &e))
    }

    /// Ask the cluster now whether it has a quorum (a linearizable read).
    fn probe(&self) -> bool {
        match self.last_change() {
            Ok(_) => {
                self.shared.set_reachable(true, "");
                true
            }
            Err(e) => {
                self.shared.set_reachable(false, &brief(&e));
                false
            }
        }
    }

    /// A transaction's answer was lost: read every key it names, at one
    /// revision, to learn whether it was applied. Its audit-head write makes
    /// every transaction's writes unique, and its guards mean that of two
    /// copies of it at most one can ever apply.
    fn fate(
        &self,
        guards: &HashMap<&[u8], Option<&[u8]>>,
        writes: &HashMap<&[u8], Option<&[u8]>>,
    ) -> std::result::Result<Fate, ec::Error> {
        let keys: Vec<&[u8]> = writes
            .keys()
            .chain(guards.keys())
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let ops: Vec<ec::TxnOp> = keys
            .iter()
            .map(|k| ec::TxnOp::get(self.key(k), None))
            .collect();
        let resp = self.rt.block_on(self.pool.run(is_transport, |c| {
            let t = ec::Txn::new().and_then(ops.clone());
            async move { c.kv_client().txn(t).await }
        }))?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut now: HashMap<&[u8], Option<Vec<u8>>> = HashMap::new();
        // The revision that wrote the transaction's puts (one for all of them).
        let mut wrote = 0;
        for (k, r) in keys.iter().zip(resp.op_responses()) {
            if let ec::TxnOpResponse::Get(g) = r {
                let kv = g.kvs().first();
                if writes.get(k).is_some_and(|v| v.is_some()) {
                    wrote = wrote.max(kv.map(|kv| kv.mod_revision()).unwrap_or(0));
                }
                now.insert(k, kv.map(|kv| kv.value().to_vec()));
            }
        }
        let is = |k: &[u8], v: &Option<&[u8]>| now.get(k).map(|n| n.as_deref()) == Some(*v);
        if writes.iter().all(|(k, v)| is(k, v)) {
            Ok(Fate::Applied(if wrote > 0 { wrote } else { rev }))
        } else if guards.iter().all(|(k, v)| is(k, v)) {
            Ok(Fate::NotApplied)
        } else {
            Ok(Fate::Conflict)
        }
    }
}

/// What became of a transaction whose answer was lost.
enum Fate {
    Applied(i64),
    NotApplied,
    Conflict,
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
    }
}

/// Follow the prefix from the mirror's revision, forever: reconnect after a
/// disconnect from the last revision seen (no change missed); reload the
/// prefix when that revision was compacted away.
async fn follow(pool: Arc<Pool>, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        let (member, client) = pool.current();
        let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let start = shared.lock().rev + 1;
        let opts = ec::WatchOptions::new()
            .with_prefix()
            .with_start_revision(start);
        match wc.watch(shared.prefix.clone(), Some(opts)).await {
            Ok(stream) => {
                let (_sender, mut rx) = stream.split();
                loop {
                    if shared.stop.load(Ordering::Acquire) {
                        return;
                    }
                    match rx.message().await {
                        Ok(Some(resp)) => {
                            if resp.compact_revision() > 0 {
                                log::warn!(
                                    "etcd {}: revision {start} was compacted away before this host saw it; reloading the whole prefix",
                                    shared.name
                                );
                                match pool
                                    .run(is_transport, |c| {
                                        let prefix = shared.prefix.clone();
                                        let unmirrored = shared.unmirrored.clone();
                                        async move { load(&c, &prefix, &unmirrored).await }
                                    })
                                    .await
                                {
                                    Ok((kv, rev)) => shared.replace(kv, rev),
                                    Err(e) => shared.set_reachable(false, &brief(&e)),
                                }
                                break;
                            }
                            if resp.canceled() {
                                log::warn!(
                                    "etcd {}: the watch was cancelled ({}); restarting it",
                                    shared.name,
                                    resp.cancel_reason()
                                );
                                break;
                            }
                            // How far the mirror advances: to the events'
                            // own revisions (every change writes the mark, so
                            // the last change's revision always arrives). A
                            // header's revision is not trusted: on a creation
                            // answer, a batch cut at etcd's 1,000-revision
                            // limit, or a progress notification (#15220),
                            // more events may follow below it.
                            let mut rev = 0;
                            let mut events = Vec::with_capacity(resp.events().len());
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                rev = rev.max(kv.mod_revision());
                                let Some(k) = shared.strip(kv.key()) else {
                                    continue;
                                };
                                if shared.is_unmirrored(k) || k == MARK {
                                    continue;
                                }
                                events.push((
                                    k.to_vec(),
                                    match ev.event_type() {
                                        ec::EventType::Put => Some(kv.value().to_vec()),
                                        ec::EventType::Delete => None,
                                    },
                                    kv.mod_revision(),
                                ));
                            }
                            shared.apply(events, rev);
                        }
                        Ok(None) => {
                            shared.set_reachable(false, "the watch stream ended");
                            pool.advance(member);
                            break;
                        }
                        Err(e) => {
                            shared.set_reachable(false, &brief(&e));
                            pool.advance(member);
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                shared.set_reachable(false, &brief(&e));
                pool.advance(member);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Once per [`HEARTBEAT`], read the cluster's revision linearizably (which
/// needs a quorum); the mirror is current as of that read once it reaches
/// that revision.
/// The revision of the last change of the store (the mark's), read
/// linearizably from the member in use (or the next ones).
async fn last_change(pool: &Pool, mark: &[u8]) -> std::result::Result<i64, ec::Error> {
    let resp = pool
        .run(is_transport, |c| {
            let mark = mark.to_vec();
            async move { c.kv_client().get(mark, None).await }
        })
        .await?;
    Ok(resp.kvs().first().map(|kv| kv.mod_revision()).unwrap_or(0))
}

/// Once per [`HEARTBEAT`], read the revision of the store's last change
/// linearizably (which needs a quorum): the mirror is current as of that
/// read once it has reached that revision.
async fn heartbeat(pool: Arc<Pool>, shared: Arc<Shared>) {
    let mark = [shared.prefix.as_slice(), MARK].concat();
    while !shared.stop.load(Ordering::Acquire) {
        let t = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT * 2, last_change(&pool, &mark)).await {
            Ok(Ok(rev)) => {
                {
                    let mut m = shared.lock();
                    m.confirm = Some((rev, t));
                    Shared::confirm(&mut m);
                }
                shared.set_reachable(true, "");
            }
            Ok(Err(e)) => shared.set_reachable(false, &brief(&e)),
            Err(_) => shared.set_reachable(false, "no answer within 3 s"),
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

impl Backend for EtcdBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if self.shared.is_unmirrored(key) {
            let full = self.key(key);
            let end = [full.as_slice(), b"\0"].concat();
            let mut out = self.read_cluster(full, end)?;
            return Ok(out.remove(key));
        }
        Ok(self.shared.lock().kv.get(key).map(|(v, _)| v.clone()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if self
            .shared
            .unmirrored
            .iter()
            .any(|u| u.starts_with(prefix) || prefix.starts_with(u))
        {
            // (Part of) the range is not mirrored: read all of it, at one
            // revision, from the cluster.
            let full = self.key(prefix);
            let end = prefix_end(&full);
            return Ok(self.read_cluster(full, end)?.into_iter().collect());
        }
        let m = self.shared.lock();
        Ok(m.kv
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect())
    }

    fn transact(&self, txn: &Txn) -> Result<TxnOutcome> {
        // etcd refuses a transaction that names a key twice: keep the last write of each.
        let mut writes: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
        for (k, v) in &txn.writes {
            writes.insert(k, v.as_deref());
        }
        if writes.is_empty() {
            return Ok(TxnOutcome::Committed);
        }
        let mut guards: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
        for (k, v) in &txn.guards {
            if let Some(prev) = guards.insert(k, v.as_deref()) {
                if prev != v.as_deref() {
                    // Two reads of one key disagreed: the caller saw a change.
                    return Ok(TxnOutcome::Conflict);
                }
            }
        }
        let compares: Vec<ec::Compare> = guards
            .iter()
            .map(|(k, v)| match v {
                Some(v) => ec::Compare::value(self.key(k), ec::CompareOp::Equal, v.to_vec()),
                None => ec::Compare::version(self.key(k), ec::CompareOp::Equal, 0),
            })
            .collect();
        let ops: Vec<ec::TxnOp> = writes
            .iter()
            .map(|(k, v)| match v {
                Some(v) => ec::TxnOp::put(self.key(k), v.to_vec(), None),
                None => ec::TxnOp::delete(self.key(k), None),
            })
            .collect();
        let mut ops = ops;
        ops.push(ec::TxnOp::put(self.key(MARK), Vec::new(), None));
        let n_ops = ops.len();
        let t = ec::Txn::new().when(compares).and_then(ops);
        // Whether a lost answer hides an applied change (`Some(cause)`).
        let mut unknown: Option<String> = None;
        let resp = loop {
            // Another member is tried only when this one surely did not get
            // the request; otherwise the fate of the request is read first.
            let r = self.rt.block_on(self.pool.run(never_sent, |c| {
                let t = t.clone();
                async move { c.kv_client().txn(t).await }
            }));
            let e = match r {
                Ok(resp) => break resp,
                Err(e) if is_transport(&e) => e,
                Err(e) => {
                    let msg = brief(&e);
                    let hint = if msg.contains("too many operations") || msg.contains("too large") {
                        format!("; this change writes {n_ops} records at once, more than the cluster accepts in one transaction: raise --max-txn-ops and --max-request-bytes on every etcd member (docs/DISTRIBUTED.md)")
                    } else {
                        String::new()
                    };
                    return Err(Error::new(
                        Kind::Store,
                        format!(
                            "etcd cluster {} refused the change: {msg}{hint}; nothing was changed",
                            self.shared.name
                        ),
                    ));
                }
            };
            self.shared.set_reachable(false, &brief(&e));
            if !never_sent(&e) || unknown.is_some() {
                unknown = Some(brief(&e));
                match self.fate(&guards, &writes) {
                    Ok(Fate::Applied(rev)) => {
                        self.shared.set_reachable(true, "");
                        self.shared.apply_own(&writes, rev);
                        return Ok(TxnOutcome::Committed);
                    }
                    Ok(Fate::Conflict) => {
                        self.shared.set_reachable(true, "");
                        self.catch_up();
                        return Ok(TxnOutcome::Conflict);
                    }
                    // Not applied, and it never can be (its guards would
                    // fail after ours): safe to send again.
                    Ok(Fate::NotApplied) => unknown = None,
                    Err(_) => {}
                }
            }
            // Ride out an election or a member's restart; refuse once the
            // outage is older than GRACE.
            if self.shared.outage().is_none_or(|d| d >= GRACE) {
                let outcome = match &unknown {
                    None => "nothing was changed".to_string(),
                    Some(_) => "the request may have reached the cluster before the answer was lost, so check whether the change took effect (ls, `keyfs list`) before retrying".to_string(),
                };
                return Err(Error::new(
                    Kind::Unavailable,
                    format!("etcd cluster {} is unreachable or has no quorum ({}): changes are refused and {outcome}; reads go on from the last synchronised state; bring the members back (docs/DISTRIBUTED.md)", self.shared.name, unknown.unwrap_or_else(|| brief(&e))),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.shared.set_reachable(true, "");
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            // Read-your-writes without waiting for the watch's echo.
            self.shared.apply_own(&writes, rev);
            Ok(TxnOutcome::Committed)
        } else {
            // Someone else changed what we read: let the mirror catch up
            // before the caller re-reads and retries.
            self.catch_up();
            Ok(TxnOutcome::Conflict)
        }
    }

    fn writable(&self) -> Result<()> {
        loop {
            match self.shared.outage() {
                None => return Ok(()),
                Some(d) if d >= GRACE => {
                    // Refuse at once, unless the cluster is back already.
                    if self.probe() {
                        return Ok(());
                    }
                    let h = self.health();
                    return Err(Error::new(
                        Kind::Unavailable,
                        format!(
                            "{} is unreachable or has no quorum ({}): changes are refused and nothing was changed; reads are served from the state synchronised {} ms ago; bring the etcd members back (docs/DISTRIBUTED.md) and retry",
                            self.shared.name, h.error, h.lag_ms
                        ),
                    ));
                }
                Some(_) => {
                    if self.probe() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn flush(&self) -> Result<()> {
        // A committed etcd transaction is already on a quorum's disks.
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        let m = self.shared.lock();
        m.kv.iter()
            .map(|(k, (v, _))| (k.len() + v.len()) as u64)
            .sum()
    }

    fn shared(&self) -> bool {
        true
    }

    fn watch(&self, listener: Listener) {
        *self
            .shared
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(listener));
    }

    fn health(&self) -> Health {
        let m = self.shared.lock();
        let lag = m.synced_at.elapsed();
        Health {
            backend: "etcd",
            revision: m.rev,
            synced: m.reachable && lag <= SYNC_WINDOW,
            reachable: m.reachable,
            error: if m.reachable {
                String::new()
            } else {
                m.last_error.clone()
            },
            lag_ms: lag.as_millis() as u64,
        }
    }

    fn reclaim(&self) -> Result<Option<(u64, u64)>> {
        let name = self.shared.name.clone();
        let pool = self.pool.clone();
        self.rt.block_on(async move {
            let (_, mut c) = pool.current();
            let st = c.status().await.map_err(|e| unavailable(&name, &e))?;
            let before = st.db_size().max(0) as u64;
            let rev = st.header().map(|h| h.revision()).unwrap_or(0);
            if let Err(e) = c
                .compact(rev, Some(ec::CompactionOptions::new().with_physical()))
                .await
            {
                // Already compacted to this revision: nothing more to drop.
                if !e.to_string().contains("compacted") {
                    return Err(unavailable(&name, &e));
                }
            }
            // Each member keeps its own file: defragment them all.
            for m in &pool.clients {
                m.maintenance_client()
                    .defragment()
                    .await
                    .map_err(|e| unavailable(&name, &e))?;
            }
            let after = c
                .status()
                .await
                .map(|s| s.db_size().max(0) as u64)
                .unwrap_or(before);
            Ok(Some((before, after)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = EtcdUrl::parse("etcd://h1:2379,10.0.0.2:2380/prod/keys").unwrap();
        assert_eq!(u.endpoints, vec!["h1:2379", "10.0.0.2:2380"]);
        assert_eq!(u.prefix, "prod/keys");
        assert_eq!(u.tls, None);
        assert_eq!(u.display(), "etcd://h1:2379,10.0.0.2:2380/prod/keys");
        let t = EtcdUrl::parse("etcd://h:1/p/?cacert=/ca.pem&cert=/c.pem&key=/k.pem").unwrap();
        assert_eq!(t.prefix, "p");
        assert_eq!(t.tls.unwrap().cacert.as_deref(), Some("/ca.pem"));
        for bad in [
            "etcd://h1:2379",
            "etcd://h1:2379/",
            "etcd://h1/p",
            "etcd://h1:0/p",
            "etcd://:2379/p",
            "etcd://h:1/a//b",
            "etcd://h:1/../b",
            "etcd://h:1/a b",
            "etcd://h:1/p?cert=/c.pem",
            "etcd://h:1/p?foo=bar",
            "etcd://h:1/p?cacert=",
            "http://h:1/p",
        ] {
            let e = EtcdUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind(), Kind::Usage, "{bad}");
            assert!(e.message().contains("etcd://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"ab/"), b"ab0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
    }
}
