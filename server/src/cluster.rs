//! Many servers over one bucket: membership, document leases and placement. No coordinator:
//! the object store's conditional create is the only agreement there is.
//!
//! - **Membership.** Each server writes `cluster/members/<id>` (its advertised URL and a beat
//!   counter) every third of the lease and lists the prefix as often. A server whose record
//!   stayed the same for a whole lease, as timed by the observer's own clock, is gone; so is
//!   one whose record was deleted (a graceful shutdown). No server compares another's clock
//!   with its own, so clock skew cannot make a live server look dead.
//! - **Self-fencing.** A server whose last successful renewal was sent more than two thirds of
//!   a lease ago stops writing every document at once (`may_write` fails, its journals refuse
//!   appends) and forgets which documents it owned: others may take them over once a whole
//!   lease passed since they last saw its record change, which is later.
//! - **Leases.** `cluster/leases/<doc>/<epoch, 20 digits>-<server id>`, created with
//!   `PutMode::Create`: the highest epoch names the document's server. Taking a document over
//!   is creating the next epoch; of two servers racing for it, exactly one succeeds. A lease
//!   needs no renewal of its own: it holds while its server's membership does, so an idle
//!   server costs a few requests per lease period, however many documents it owns.
//! - **Placement.** A document without a live leaseholder goes to the live server that
//!   rendezvous hashing picks (highest `sha256(doc, server id)`), so documents spread and only
//!   those of a server that leaves move. Others redirect its clients there; the picked server
//!   takes the lease when they arrive.
//! - **Last line of defence.** Every storage batch is still created with `PutMode::Create`: if
//!   two servers ever wrote one document, one of them loses the LSN and reopens.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pagesync::DocId;
use pagesync::journal::{Journal, JournalError, JournalId, Lsn, LsnRange, ObjectBackend};
use serde::{Deserialize, Serialize};

/// Where the servers' records are, below the store's root.
pub const MEMBERS: &str = "cluster/members";
/// Where the documents' leases are: `LEASES/<doc>/<epoch>-<server id>`.
pub const LEASES: &str = "cluster/leases";

/// The membership lease by default: 6 s. A server renews every 2 s, stops writing 4 s after
/// its last renewal went out, and is taken over 6 s after others last saw its record change.
pub const DEFAULT_LEASE_MS: u64 = 6_000;

/// The shortest lease accepted: renewals every 300 ms are already a lot of requests.
pub const MIN_LEASE_MS: u64 = 900;

/// A record older than this many leases by the store's clock, on first sight, is a server
/// long gone (a `kill -9` last week): it is not waited for.
const STALE_LEASES: i64 = 10;

/// How long a graceful shutdown spends handing its documents over one by one; the rest are
/// taken over as soon as the others see its record deleted.
const HANDOVER_BUDGET: Duration = Duration::from_secs(3);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    /// Leases this server took (new documents and takeovers).
    pub leases_taken: AtomicU64,
    /// Of those, leases taken from a server that was gone.
    pub takeovers: AtomicU64,
    /// Leases given to another server on a graceful shutdown.
    pub handovers: AtomicU64,
    /// Times this server's own membership lapsed (it stopped writing until it renewed).
    pub lapses: AtomicU64,
}

/// A server's membership record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    url: String,
    beat: u64,
    started_ms: i64,
}

/// Another server as this one has seen it.
#[derive(Debug)]
struct Seen {
    url: String,
    version: String,
    /// When its record was first seen as it is now, by this server's clock.
    changed: Instant,
    /// Its record was far older than a lease when first seen.
    stale: bool,
}

#[derive(Debug)]
struct State {
    /// When the last renewal that succeeded was sent.
    renewed: Option<Instant>,
    beat: u64,
    members: BTreeMap<String, Seen>,
    /// Documents whose lease this server holds (as far as it knows: cleared on a lapse).
    owned: BTreeSet<DocId>,
    leaving: bool,
}

/// This server's membership in a cluster of servers sharing one object store.
#[derive(Debug)]
pub struct Cluster {
    backend: ObjectBackend,
    id: String,
    url: String,
    lease: Duration,
    started_ms: i64,
    state: Mutex<State>,
    pub stats: ClusterStats,
}

fn wall_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A document's lease object: `(epoch, holder)` from its name.
fn parse_lease(name: &str) -> Option<(u64, &str)> {
    let (epoch, holder) = name.split_once('-')?;
    Some((epoch.parse().ok()?, holder))
}

fn lease_key(doc: DocId, epoch: u64, holder: &str) -> String {
    format!("{LEASES}/{doc}/{epoch:020}-{holder}")
}

/// Rendezvous hashing: the score of `server` for `doc`; the highest wins.
fn score(doc: DocId, server: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(doc.to_string().as_bytes());
    h.update(b"/");
    h.update(server.as_bytes());
    h.finalize().into()
}

/// `ws://host:port` or `ws://host:port/v1/sync` -> the websocket URL clients connect to.
pub fn sync_url(advertise: &str) -> Result<String, String> {
    let rest = advertise
        .strip_prefix("ws://")
        .or_else(|| advertise.strip_prefix("wss://"))
        .ok_or_else(|| format!("--advertise {advertise:?}: expected ws://HOST:PORT or wss://HOST:PORT"))?;
    let (host, path) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("--advertise {advertise:?}: no host"));
    }
    match path.trim_end_matches('/') {
        "" => Ok(format!("{}/v1/sync", advertise.trim_end_matches('/'))),
        "v1/sync" => Ok(advertise.trim_end_matches('/').to_owned()),
        other => Err(format!("--advertise {advertise:?}: the path must be /v1/sync or empty, not /{other}")),
    }
}

impl Cluster {
    /// Joins the cluster on `backend`'s bucket as the server clients reach at `advertise`: a
    /// first renewal (which must succeed) and a first look at the others. Blocking.
    pub fn join(backend: ObjectBackend, advertise: &str, lease_ms: u64) -> anyhow::Result<Cluster> {
        anyhow::ensure!(lease_ms >= MIN_LEASE_MS, "the lease must be at least {MIN_LEASE_MS} ms");
        let url = sync_url(advertise).map_err(anyhow::Error::msg)?;
        let id = JournalId::from_u128(
            (u128::from(random_u64()) << 64) | u128::from(random_u64() ^ wall_ms() as u64),
        )
        .to_string();
        let cluster = Cluster {
            backend,
            id,
            url,
            lease: Duration::from_millis(lease_ms),
            started_ms: wall_ms(),
            state: Mutex::new(State {
                renewed: None,
                beat: 0,
                members: BTreeMap::new(),
                owned: BTreeSet::new(),
                leaving: false,
            }),
            stats: ClusterStats::default(),
        };
        cluster.renew().map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;
        cluster.refresh().map_err(|e| anyhow::anyhow!("cannot list the cluster's servers: {e}"))?;
        Ok(cluster)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How often `tick` should run: a third of the lease.
    pub fn period(&self) -> Duration {
        self.lease / 3
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("BUG: cluster lock poisoned")
    }

    /// One renewal and one look at the others. Errors are counted and logged; the lease
    /// lapses on its own if they go on.
    pub fn tick(&self) {
        if self.state().leaving {
            return;
        }
        if let Err(e) = self.renew() {
            tracing::warn!("renewing this server's cluster membership failed: {e}");
        }
        if let Err(e) = self.refresh() {
            tracing::warn!("listing the cluster's servers failed: {e}");
        }
        self.check_lapse();
    }

    fn renew(&self) -> pagesync::journal::Result<()> {
        let sent = Instant::now();
        let beat = {
            let mut st = self.state();
            st.beat += 1;
            st.beat
        };
        let record = Record { url: self.url.clone(), beat, started_ms: self.started_ms };
        let bytes = serde_json::to_vec(&record).expect("BUG: a record always serializes");
        match self.backend.put_object(&format!("{MEMBERS}/{}", self.id), bytes) {
            Ok(()) => {
                self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                let mut st = self.state();
                if !st.leaving {
                    st.renewed = Some(st.renewed.map_or(sent, |r| r.max(sent)));
                }
                Ok(())
            }
            Err(e) => {
                self.stats.renewal_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Lists the servers' records and notes which changed since the last look.
    fn refresh(&self) -> pagesync::journal::Result<()> {
        let listed = self.backend.list_objects(MEMBERS)?;
        let now = Instant::now();
        let known: BTreeMap<String, String> =
            self.state().members.iter().map(|(id, s)| (id.clone(), s.version.clone())).collect();
        let mut fresh = BTreeMap::new();
        for info in &listed {
            if info.name == self.id {
                continue;
            }
            match known.get(&info.name) {
                Some(v) if *v == info.version => {}
                Some(_) => {
                    fresh.insert(info.name.clone(), (None, info.version.clone(), false));
                }
                None => {
                    // A server not seen before: its URL is in its record.
                    let Some(bytes) = self.backend.read_object(&format!("{MEMBERS}/{}", info.name))? else {
                        continue;
                    };
                    let Ok(record) = serde_json::from_slice::<Record>(&bytes) else {
                        tracing::warn!("ignoring a malformed cluster record {MEMBERS}/{}", info.name);
                        continue;
                    };
                    let stale = info.modified_ms < wall_ms() - STALE_LEASES * self.lease.as_millis() as i64;
                    fresh.insert(info.name.clone(), (Some(record.url), info.version.clone(), stale));
                }
            }
        }
        let listed: BTreeSet<&str> = listed.iter().map(|i| i.name.as_str()).collect();
        let mut st = self.state();
        st.members.retain(|id, _| listed.contains(id.as_str()));
        for (id, (url, version, stale)) in fresh {
            match (st.members.get_mut(&id), url) {
                (Some(seen), _) => {
                    seen.version = version;
                    seen.changed = now;
                    seen.stale = false;
                }
                (None, Some(url)) => {
                    st.members.insert(id, Seen { url, version, changed: now, stale });
                }
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Whether this server may serve documents: its membership is fresh and it is not leaving.
    pub fn may_serve(&self) -> bool {
        let st = self.state();
        !st.leaving && st.renewed.is_some_and(|t| t.elapsed() < self.lease * 2 / 3)
    }

    /// Whether this server may append to `doc`'s journal now.
    pub fn may_write(&self, doc: DocId) -> bool {
        self.check_lapse();
        self.may_serve() && self.state().owned.contains(&doc)
    }

    /// A lapsed membership forgets every lease: each must be read again before a write.
    fn check_lapse(&self) {
        if self.may_serve() {
            return;
        }
        let mut st = self.state();
        if !st.owned.is_empty() {
            st.owned.clear();
            drop(st);
            self.stats.lapses.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                "this server's cluster membership lapsed (no renewal for two thirds of a lease): it stopped writing every document"
            );
        }
    }

    /// The URL of a live server other than this one.
    fn live_url(&self, st: &State, id: &str) -> Option<String> {
        let seen = st.members.get(id)?;
        (!seen.stale && seen.changed.elapsed() < self.lease).then(|| seen.url.clone())
    }

    /// The live server rendezvous hashing picks for `doc` (this one included): (id, url).
    fn pick(&self, doc: DocId, excluding_me: bool) -> Option<(String, String)> {
        let st = self.state();
        let others = st.members.keys().filter_map(|id| Some((id.clone(), self.live_url(&st, id)?)));
        let me = (!excluding_me).then(|| (self.id.clone(), self.url.clone()));
        others.chain(me).max_by_key(|(id, _)| score(doc, id))
    }

    /// Decides where `doc` is served: `Ok` here (this server holds its lease, taking it if
    /// nobody live does and the hash picks this server), `Err(Moved)` at another server,
    /// `Err(Unavailable)` nowhere now. Blocking (object-store requests).
    pub fn place(&self, doc: DocId) -> pagesync::Result<()> {
        let unavailable = |why: &str| pagesync::Error::Unavailable(why.to_owned());
        for _ in 0..4 {
            if !self.may_serve() {
                return Err(unavailable("its cluster membership lapsed or it is shutting down"));
            }
            let leases = self.backend.list_objects(&format!("{LEASES}/{doc}"))?;
            let top = leases.iter().filter_map(|i| parse_lease(&i.name)).max();
            if let Some((_, holder)) = top {
                if holder == self.id {
                    self.state().owned.insert(doc);
                    return Ok(());
                }
                if let Some(owner) = self.live_url(&self.state(), holder) {
                    return Err(pagesync::Error::Moved { owner });
                }
            }
            let Some((id, url)) = self.pick(doc, false) else {
                return Err(unavailable("no live server"));
            };
            if id != self.id {
                return Err(pagesync::Error::Moved { owner: url });
            }
            let epoch = top.map_or(1, |(e, _)| e + 1);
            if self.backend.create_object(&lease_key(doc, epoch, &self.id), self.url.clone().into_bytes())? {
                self.stats.leases_taken.fetch_add(1, Ordering::Relaxed);
                if let Some((_, was)) = top {
                    self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%doc, from = was, epoch, "took over the document's lease from a server that is gone");
                }
                self.state().owned.insert(doc);
                self.remove_leases_before(doc, epoch, &leases);
                return Ok(());
            }
            // Another server took the next epoch first: look again.
        }
        Err(unavailable("its lease is contended; try again"))
    }

    /// Deletes the lease objects older than `epoch` (best effort: they name no one anymore).
    fn remove_leases_before(&self, doc: DocId, epoch: u64, leases: &[pagesync::journal::ObjectInfo]) {
        for info in leases {
            if parse_lease(&info.name).is_some_and(|(e, _)| e < epoch) {
                let _ = self.backend.delete_object(&format!("{LEASES}/{doc}/{}", info.name));
            }
        }
    }

    /// Documents whose lease this server holds.
    pub fn owned(&self) -> usize {
        self.state().owned.len()
    }

    /// Live servers this server sees, itself included.
    pub fn live_members(&self) -> usize {
        let st = self.state();
        let others = st.members.keys().filter(|id| self.live_url(&st, id).is_some()).count();
        others + usize::from(!st.leaving && st.renewed.is_some_and(|t| t.elapsed() < self.lease * 2 / 3))
    }

    /// Leaves the cluster on a graceful shutdown, once nothing is written anymore: hands each
    /// owned document's lease to the server the hash picks next (within `HANDOVER_BUDGET`),
    /// then deletes this server's record, so the rest are taken over at once rather than a
    /// lease later. Blocking.
    pub fn leave(&self) {
        let owned: Vec<DocId> = {
            let mut st = self.state();
            st.leaving = true;
            std::mem::take(&mut st.owned).into_iter().collect()
        };
        let start = Instant::now();
        let mut handed = 0;
        for doc in owned {
            if start.elapsed() > HANDOVER_BUDGET {
                break;
            }
            match self.hand_over(doc) {
                Ok(true) => handed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%doc, "handing the document over failed: {e}"),
            }
        }
        if let Err(e) = self.backend.delete_object(&format!("{MEMBERS}/{}", self.id)) {
            tracing::warn!("deleting this server's cluster record failed (others wait a lease): {e}");
        }
        tracing::info!(handed, "left the cluster");
    }

    fn hand_over(&self, doc: DocId) -> pagesync::Result<bool> {
        let leases = self.backend.list_objects(&format!("{LEASES}/{doc}"))?;
        let top = leases.iter().filter_map(|i| parse_lease(&i.name)).max();
        let Some((epoch, holder)) = top.filter(|(_, h)| *h == self.id) else { return Ok(false) };
        let _ = holder;
        let Some((next, url)) = self.pick(doc, true) else { return Ok(false) };
        let made = self.backend.create_object(&lease_key(doc, epoch + 1, &next), url.into_bytes())?;
        if made {
            self.stats.handovers.fetch_add(1, Ordering::Relaxed);
            self.remove_leases_before(doc, epoch + 1, &leases);
        }
        Ok(made)
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// A document's journal on a cluster server: every write first checks that this server still
/// holds the document's lease and its membership is fresh, so a server that lost either stops
/// writing at once. (The batch objects' `PutMode::Create` fences whatever slips past.)
pub struct Leased {
    pub inner: Box<dyn Journal>,
    pub cluster: std::sync::Arc<Cluster>,
    pub doc: DocId,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased").field("doc", &self.doc).finish()
    }
}

impl Leased {
    fn check(&self) -> pagesync::journal::Result<()> {
        if self.cluster.may_write(self.doc) {
            return Ok(());
        }
        Err(JournalError::Fenced {
            journal: self.inner.id(),
            message: format!(
                "this server no longer holds the lease of document {} (or its cluster membership lapsed): it writes no more",
                self.doc
            ),
        })
    }
}

impl Journal for Leased {
    fn id(&self) -> JournalId {
        self.inner.id()
    }

    fn range(&self) -> LsnRange {
        self.inner.range()
    }

    fn append(&mut self, payload: &[u8]) -> pagesync::journal::Result<Lsn> {
        self.check()?;
        self.inner.append(payload)
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<LsnRange> {
        self.check()?;
        self.inner.append_batch(payloads)
    }

    fn append_batch_unsynced(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<LsnRange> {
        self.check()?;
        self.inner.append_batch_unsynced(payloads)
    }

    fn sync(&mut self) -> pagesync::journal::Result<()> {
        self.inner.sync()
    }

    fn read(&self, lsn: Lsn) -> pagesync::journal::Result<Vec<u8>> {
        self.inner.read(lsn)
    }

    fn read_range(&self, range: LsnRange) -> pagesync::journal::Result<Vec<Vec<u8>>> {
        self.inner.read_range(range)
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> pagesync::journal::Result<()> {
        self.inner.read_part(lsn, offset, buf)
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> pagesync::journal::Result<()> {
        self.check()?;
        self.inner.remove_prefix(up_to)
    }
}

/// What `pagesync-server cluster` prints: the servers with records, and each document's lease.
#[derive(Debug)]
pub struct ClusterView {
    /// (id, url, ms since its record was written by the store's clock).
    pub members: Vec<(String, String, i64)>,
    /// (document, epoch, holder id).
    pub leases: Vec<(DocId, u64, String)>,
}

/// Reads the cluster's records from the store (one LIST per prefix, a GET per server).
pub fn view(backend: &ObjectBackend) -> anyhow::Result<ClusterView> {
    let now = wall_ms();
    let mut members = Vec::new();
    for info in backend.list_objects(MEMBERS)? {
        let Some(bytes) = backend.read_object(&format!("{MEMBERS}/{}", info.name))? else { continue };
        let url = serde_json::from_slice::<Record>(&bytes).map_or_else(|_| "(malformed)".into(), |r| r.url);
        members.push((info.name, url, now - info.modified_ms));
    }
    let mut leases = Vec::new();
    for doc_dir in backend.list_dirs(LEASES)? {
        let Ok(doc) = doc_dir.parse::<DocId>() else { continue };
        let infos = backend.list_objects(&format!("{LEASES}/{doc}"))?;
        if let Some((epoch, holder)) = infos.iter().filter_map(|i| parse_lease(&i.name)).max() {
            leases.push((doc, epoch, holder.to_owned()));
        }
    }
    Ok(ClusterView { members, leases })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_urls_name_the_sync_route() {
        assert_eq!(sync_url("ws://10.0.0.1:8787").unwrap(), "ws://10.0.0.1:8787/v1/sync");
        assert_eq!(sync_url("ws://a:1/").unwrap(), "ws://a:1/v1/sync");
        assert_eq!(sync_url("wss://a.example/v1/sync").unwrap(), "wss://a.example/v1/sync");
        assert!(sync_url("http://a:1").is_err());
        assert!(sync_url("ws://a:1/other").is_err());
        assert!(sync_url("ws:///v1/sync").is_err());
    }

    #[test]
    fn rendezvous_moves_only_the_documents_of_a_server_that_leaves() {
        let servers = ["a", "b", "c"];
        fn pick(doc: DocId, among: &[&'static str]) -> &'static str {
            among.iter().copied().max_by_key(|s| score(doc, s)).unwrap()
        }
        let docs: Vec<DocId> = (0..300u128).map(DocId::from_u128).collect();
        let before: Vec<&str> = docs.iter().map(|d| pick(*d, &servers)).collect();
        for s in servers {
            let n = before.iter().filter(|p| **p == s).count();
            assert!((60..=140).contains(&n), "{s} got {n} of 300");
        }
        let after: Vec<&str> = docs.iter().map(|d| pick(*d, &["a", "c"])).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != "b" {
                assert_eq!(b, a, "a document of a server that stayed moved");
            }
        }
    }

    fn backend(dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> ObjectBackend {
        ObjectBackend::from_url(&format!("file://{}", dir.display()), rt.handle().clone()).unwrap()
    }

    #[test]
    fn one_lease_per_document_and_takeover_after_the_lease() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", MIN_LEASE_MS).unwrap();
        let b = Cluster::join(backend(dir.path(), &rt), "ws://b:1", MIN_LEASE_MS).unwrap();
        a.refresh().unwrap();
        b.refresh().unwrap();
        assert_eq!((a.live_members(), b.live_members()), (2, 2));
        // Every document is served by exactly one of them, and the other redirects there.
        for n in 0..20u128 {
            let doc = DocId::from_u128(n);
            let (ra, rb) = (a.place(doc), b.place(doc));
            match (ra, rb) {
                (Ok(()), Err(pagesync::Error::Moved { owner })) => assert_eq!(owner, a.url()),
                (Err(pagesync::Error::Moved { owner }), Ok(())) => assert_eq!(owner, b.url()),
                other => panic!("document {n}: {other:?}"),
            }
        }
        assert_eq!(a.owned() + b.owned(), 20);
        // `a` stops renewing: it stops writing before `b` takes its documents.
        let doc = (0..20u128).map(DocId::from_u128).find(|d| a.may_write(*d)).unwrap();
        std::thread::sleep(Duration::from_millis(MIN_LEASE_MS * 2 / 3 + 50));
        assert!(!a.may_write(doc), "a lapsed membership still writes");
        assert!(matches!(a.place(doc), Err(pagesync::Error::Unavailable(_))));
        b.renew().unwrap();
        b.refresh().unwrap();
        assert!(
            matches!(b.place(doc), Err(pagesync::Error::Moved { .. })),
            "taken over before a lease passed"
        );
        std::thread::sleep(Duration::from_millis(MIN_LEASE_MS / 3 + 50));
        b.renew().unwrap();
        b.refresh().unwrap();
        b.place(doc).unwrap();
        assert!(b.may_write(doc));
        assert_eq!(b.stats.takeovers.load(Ordering::Relaxed), 1);
        // `a` comes back: the lease is `b`'s now.
        a.renew().unwrap();
        a.refresh().unwrap();
        match a.place(doc) {
            Err(pagesync::Error::Moved { owner }) => assert_eq!(owner, b.url()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn leaving_hands_documents_over_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", DEFAULT_LEASE_MS).unwrap();
        let b = Cluster::join(backend(dir.path(), &rt), "ws://b:1", DEFAULT_LEASE_MS).unwrap();
        a.refresh().unwrap();
        let docs: Vec<DocId> = (0..20u128).map(DocId::from_u128).collect();
        let mine: Vec<DocId> = docs.iter().copied().filter(|d| a.place(*d).is_ok()).collect();
        assert!(!mine.is_empty());
        a.leave();
        assert_eq!(a.stats.handovers.load(Ordering::Relaxed), mine.len() as u64);
        b.refresh().unwrap();
        for doc in &mine {
            b.place(*doc).unwrap();
        }
        let view = view(&backend(dir.path(), &rt)).unwrap();
        assert_eq!(view.members.len(), 1, "the leaving server's record is gone");
        assert!(view.leases.iter().all(|(_, _, holder)| holder == b.id()));
    }
}
