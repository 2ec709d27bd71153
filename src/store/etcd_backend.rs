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
/// Records per page when loading the prefix.
const PAGE: i64 = 500;
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
    kv: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Every change up to this revision is in `kv`.
    rev: i64,
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
    /// Where `request_progress` goes (the live watch stream's sender).
    progress: tokio::sync::Mutex<Option<ec::WatchRequestSender>>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mirror> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn strip<'a>(&self, k: &'a [u8]) -> Option<&'a [u8]> {
        k.strip_prefix(self.prefix.as_slice())
    }

    /// Apply watch events (already stripped of the prefix) and advance to `rev`.
    fn apply(&self, events: Vec<(Vec<u8>, Option<Vec<u8>>)>, rev: i64) {
        let mut changes = Vec::with_capacity(events.len());
        {
            let mut m = self.lock();
            for (k, v) in events {
                let before = match &v {
                    Some(v) => m.kv.insert(k.clone(), v.clone()),
                    None => m.kv.remove(&k),
                };
                if before != v {
                    changes.push(Change {
                        key: k,
                        before,
                        after: v,
                    });
                }
            }
            if rev > m.rev {
                m.rev = rev;
            }
            Self::confirm(&mut m);
        }
        self.moved.notify_all();
        self.tell(&changes);
    }

    /// Replace the whole mirror (after a compaction made the watch's
    /// revision unavailable), reporting every difference.
    fn replace(&self, kv: BTreeMap<Vec<u8>, Vec<u8>>, rev: i64) {
        let mut changes = Vec::new();
        {
            let mut m = self.lock();
            for (k, v) in &m.kv {
                match kv.get(k) {
                    Some(n) if n == v => {}
                    n => changes.push(Change {
                        key: k.clone(),
                        before: Some(v.clone()),
                        after: n.cloned(),
                    }),
                }
            }
            for (k, v) in &kv {
                if !m.kv.contains_key(k) {
                    changes.push(Change {
                        key: k.clone(),
                        before: None,
                        after: Some(v.clone()),
                    });
                }
            }
            m.kv = kv;
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

/// Load every record under `prefix` at one revision, a page at a time.
async fn load(
    client: &ec::Client,
    prefix: &[u8],
) -> std::result::Result<(BTreeMap<Vec<u8>, Vec<u8>>, i64), ec::Error> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let end = prefix_end(prefix);
    let mut out = BTreeMap::new();
    let mut from = prefix.to_vec();
    let mut rev = 0i64;
    loop {
        let mut o = ec::GetOptions::new()
            .with_range(end.clone())
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
            out.insert(e.key()[prefix.len()..].to_vec(), e.value().to_vec());
            last = Some(e.key().to_vec());
        }
        match (more, last) {
            (true, Some(mut l)) => {
                l.push(0);
                from = l;
            }
            _ => return Ok((out, rev)),
        }
    }
}

impl EtcdBackend {
    /// Connect, load the prefix and start following it.
    pub fn open(url: &EtcdUrl) -> Result<EtcdBackend> {
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
                async move { load(&c, &prefix).await }
            }))
            .map_err(|e| unavailable(&name, &e))?;
        let shared = Arc::new(Shared {
            m: Mutex::new(Mirror {
                kv,
                rev,
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
            progress: tokio::sync::Mutex::new(None),
        });
        rt.spawn(follow(pool.clone(), shared.clone()));
        rt.spawn(heartbeat(pool.clone(), shared.clone()));
        Ok(EtcdBackend { rt, pool, shared })
    }

    /// Ask the watch to report its progress, so the mirror's revision
    /// advances even when nothing under the prefix changed.
    fn request_progress(&self) {
        let shared = self.shared.clone();
        self.rt.spawn(async move {
            if let Some(s) = shared.progress.lock().await.as_mut() {
                let _ = s.request_progress().await;
            }
        });
    }

    fn key(&self, k: &[u8]) -> Vec<u8> {
        [self.shared.prefix.as_slice(), k].concat()
    }

    /// Ask the cluster now whether it has a quorum (a linearizable read).
    fn probe(&self) -> bool {
        let probe = self.key(b"m/format");
        // The timer must be made inside the runtime (it needs its reactor).
        let r = self.rt.block_on(async {
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.pool.run(is_transport, |c| {
                    let probe = probe.clone();
                    async move {
                        c.kv_client()
                            .get(probe, Some(ec::GetOptions::new().with_count_only()))
                            .await
                    }
                }),
            )
            .await
        });
        match r {
            Ok(Ok(_)) => {
                self.shared.set_reachable(true, "");
                true
            }
            Ok(Err(e)) => {
                self.shared.set_reachable(false, &brief(&e));
                false
            }
            Err(_) => false,
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
        for (k, r) in keys.iter().zip(resp.op_responses()) {
            if let ec::TxnOpResponse::Get(g) = r {
                now.insert(k, g.kvs().first().map(|kv| kv.value().to_vec()));
            }
        }
        let is = |k: &[u8], v: &Option<&[u8]>| now.get(k).map(|n| n.as_deref()) == Some(*v);
        if writes.iter().all(|(k, v)| is(k, v)) {
            Ok(Fate::Applied(rev))
        } else if guards.iter().all(|(k, v)| is(k, v)) {
            Ok(Fate::NotApplied)
        } else {
            Ok(Fate::Conflict(rev))
        }
    }
}

/// What became of a transaction whose answer was lost.
enum Fate {
    Applied(i64),
    NotApplied,
    Conflict(i64),
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
            .with_start_revision(start)
            .with_progress_notify();
        match wc.watch(shared.prefix.clone(), Some(opts)).await {
            Ok(stream) => {
                let (sender, mut rx) = stream.split();
                *shared.progress.lock().await = Some(sender);
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
                                        async move { load(&c, &prefix).await }
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
                            // How far the mirror may advance. Events carry
                            // their own revisions. The header's revision is
                            // trusted only on a progress notification (sent
                            // when the watch has caught up): on a creation
                            // answer, or a batch cut at etcd's 1,000-revision
                            // limit, more events may follow below it.
                            let mut rev = 0;
                            let mut events = Vec::with_capacity(resp.events().len());
                            for ev in resp.events() {
                                let Some(kv) = ev.kv() else { continue };
                                rev = rev.max(kv.mod_revision());
                                let Some(k) = shared.strip(kv.key()) else {
                                    continue;
                                };
                                events.push((
                                    k.to_vec(),
                                    match ev.event_type() {
                                        ec::EventType::Put => Some(kv.value().to_vec()),
                                        ec::EventType::Delete => None,
                                    },
                                ));
                            }
                            if resp.events().is_empty() && !resp.created() {
                                rev = resp.header().map(|h| h.revision()).unwrap_or(0);
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
                *shared.progress.lock().await = None;
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
async fn heartbeat(pool: Arc<Pool>, shared: Arc<Shared>) {
    let probe = [shared.prefix.as_slice(), b"m/format"].concat();
    while !shared.stop.load(Ordering::Acquire) {
        let t = Instant::now();
        let r = tokio::time::timeout(
            REQUEST_TIMEOUT * 2,
            pool.run(is_transport, |c| {
                let probe = probe.clone();
                async move {
                    c.kv_client()
                        .get(probe, Some(ec::GetOptions::new().with_count_only()))
                        .await
                }
            }),
        )
        .await;
        match r {
            Ok(Ok(resp)) => {
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                {
                    let mut m = shared.lock();
                    m.confirm = Some((rev, t));
                    Shared::confirm(&mut m);
                }
                shared.set_reachable(true, "");
                if let Some(s) = shared.progress.lock().await.as_mut() {
                    let _ = s.request_progress().await;
                }
            }
            Ok(Err(e)) => shared.set_reachable(false, &brief(&e)),
            Err(_) => shared.set_reachable(false, "no answer within 3 s"),
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

impl Backend for EtcdBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.shared.lock().kv.get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let m = self.shared.lock();
        Ok(m.kv
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
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
                        self.shared.wait_for(rev, REQUEST_TIMEOUT);
                        return Ok(TxnOutcome::Committed);
                    }
                    Ok(Fate::Conflict(rev)) => {
                        self.shared.set_reachable(true, "");
                        self.request_progress();
                        self.shared.wait_for(rev, Duration::from_secs(1));
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
            // Read-your-writes: the watch brings our own change into the mirror.
            if !self.shared.wait_for(rev, REQUEST_TIMEOUT) {
                log::warn!(
                    "etcd {}: the watch has not delivered revision {rev} of this host's own change yet; local reads may lag",
                    self.shared.name
                );
            }
            Ok(TxnOutcome::Committed)
        } else {
            // Someone else changed what we read: let the mirror catch up
            // before the caller re-reads and retries.
            self.request_progress();
            self.shared.wait_for(rev, Duration::from_secs(1));
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
        m.kv.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
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
