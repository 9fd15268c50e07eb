//! Many servers over one bucket: membership, document leases and placement. No coordinator:
//! the object store's conditional create (`PutMode::Create`) is the only agreement there is.
//!
//! - **Membership.** A server renews by *creating* `cluster/members/<id>/<beat>` (its URL), the
//!   next beat every third of the lease, and lists `cluster/members` as often. Another server is
//!   live while its highest beat changed within the last lease *as timed by the observer's own
//!   clock* from when it first saw that beat: no server compares its clock with another's.
//! - **Burial.** An empty object at a server's next beat is its tombstone. A server found
//!   silent for a lease is buried before anything of it is taken: the burier creates the
//!   tombstone at the beat after the last one it saw and lists again to check that it is the
//!   highest. Exactly one of that create and the silent server's own next renewal succeeds, so a
//!   buried server can never renew again (it rejoins under a new id, holding nothing).
//! - **Self-fencing.** A server whose last successful renewal was *sent* more than two thirds
//!   of a lease ago writes nothing (`may_write`) and forgets its leases. Its last renewal was
//!   sent before anyone saw it, and is buried a full lease after that, by which time it stopped.
//! - **Leases.** `cluster/leases/<doc>/<epoch>` holds `{holder, url}`; the highest epoch names
//!   the document's server. Taking a document is creating the next epoch: of two servers racing
//!   for it exactly one succeeds. A lease holds while its holder lives, so an idle server costs
//!   a few requests per lease period however many documents it holds.
//! - **Placement.** A document without a live holder goes to the live server that rendezvous
//!   hashing picks (highest `sha256(doc, server id)`), so documents spread and only those of a
//!   server that leaves move. The others redirect its clients there; it takes the lease when
//!   they arrive.
//! - **Last line of defence.** Every storage batch is still created with `PutMode::Create`: if
//!   two servers ever wrote one document, one of them loses the LSN and reopens.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pagesync::DocId;
use pagesync::journal::{Journal, JournalError, JournalId, Lsn, LsnRange, ObjectBackend, ObjectInfo};
use serde::{Deserialize, Serialize};

/// The servers' beats: `MEMBERS/<server id>/<beat, 20 digits>`, a record or (empty) a tombstone.
pub const MEMBERS: &str = "cluster/members";
/// The documents' leases: `LEASES/<doc>/<epoch, 20 digits>`.
pub const LEASES: &str = "cluster/leases";

/// The membership lease by default: 6 s. A server renews every 2 s, stops writing 4 s after
/// its last renewal went out, and is buried 6 s after others first saw that renewal.
pub const DEFAULT_LEASE_MS: u64 = 6_000;

/// The shortest lease accepted: renewals every 300 ms are already a lot of requests.
pub const MIN_LEASE_MS: u64 = 900;

/// A server deletes its old beats every this many renewals, in one request.
const PRUNE_EVERY: u64 = 10;

/// A server dead for this many leases keeps only its tombstone in the bucket.
const GC_LEASES: u32 = 10;

/// How long a graceful shutdown spends handing its documents over one by one; the rest are
/// taken over as soon as the others see its tombstone.
const HANDOVER_BUDGET: Duration = Duration::from_secs(3);

/// Documents remembered as served elsewhere, so a client asking again and again for them costs
/// no request for `MOVED_FOR` (short: a takeover is not held up by it). Past this many, the
/// memory starts over.
const MAX_MOVED: usize = 1 << 16;
const MOVED_FOR: Duration = Duration::from_millis(500);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub renewals: AtomicU64,
    pub renewal_failures: AtomicU64,
    /// Leases this server took (new documents and takeovers).
    pub leases_taken: AtomicU64,
    /// Of those, leases taken from a server that was gone.
    pub takeovers: AtomicU64,
    /// Silent servers this one buried.
    pub burials: AtomicU64,
    /// Leases given to another server on a graceful shutdown.
    pub handovers: AtomicU64,
    /// Times this server's own membership lapsed (it stopped writing until it renewed).
    pub lapses: AtomicU64,
    /// Times this server found itself buried and joined again under a new id.
    pub rejoins: AtomicU64,
}

/// A server's beat.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    url: String,
    started_ms: i64,
    /// Drawn at each join: tells this server's own beat from anyone else's.
    nonce: u64,
}

/// A document's lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Lease {
    holder: String,
    url: String,
}

/// How a renewal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Beat {
    /// Created now.
    Made,
    /// An earlier try of ours that landed unanswered.
    Landed,
    /// Someone else's: this server was buried.
    Buried,
}

/// What a lease's holder is, as this server has seen it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Live,
    /// Its highest beat (this one) has not changed for a lease: it may be buried.
    Silent(u64),
    /// Its highest beat is a tombstone.
    Dead,
}

/// Another server as this one has seen it.
#[derive(Debug)]
struct Seen {
    /// From its first record this server read.
    url: Option<String>,
    /// Its highest beat.
    beat: u64,
    /// That beat is a tombstone.
    dead: bool,
    /// When this server first saw that beat, by its own clock.
    changed: Instant,
}

#[derive(Debug)]
struct State {
    id: String,
    nonce: u64,
    /// The last beat this server created.
    beat: u64,
    /// When the last renewal that succeeded was sent.
    renewed: Option<Instant>,
    members: BTreeMap<String, Seen>,
    /// Documents whose lease this server holds, as far as it knows (forgotten on a lapse).
    owned: BTreeSet<DocId>,
    /// Documents recently found served elsewhere: when, and where.
    moved: HashMap<DocId, (Instant, String)>,
    leaving: bool,
}

/// This server's membership in a cluster of servers sharing one object store.
#[derive(Debug)]
pub struct Cluster {
    backend: ObjectBackend,
    url: String,
    lease: Duration,
    started_ms: i64,
    state: Mutex<State>,
    /// Bumped whenever this server forgets its leases (a lapse, a burial): the driver then
    /// closes every open document, whose next open reads its lease again.
    generation: AtomicU64,
    pub stats: ClusterStats,
}

use crate::wall_ms;

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

fn new_id() -> String {
    JournalId::from_u128((u128::from(random_u64()) << 64) | u128::from(random_u64())).to_string()
}

fn beat_key(id: &str, beat: u64) -> String {
    format!("{MEMBERS}/{id}/{beat:020}")
}

fn lease_key(doc: DocId, epoch: u64) -> String {
    format!("{LEASES}/{doc}/{epoch:020}")
}

/// The highest numbered object among `infos` (names are numbers): (number, its info).
fn highest(infos: &[ObjectInfo]) -> Option<(u64, &ObjectInfo)> {
    infos.iter().filter_map(|i| Some((i.name.parse::<u64>().ok()?, i))).max_by_key(|(n, _)| *n)
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
        let cluster = Cluster {
            backend,
            url,
            lease: Duration::from_millis(lease_ms),
            started_ms: wall_ms(),
            state: Mutex::new(State {
                id: new_id(),
                nonce: random_u64(),
                beat: 0,
                renewed: None,
                members: BTreeMap::new(),
                owned: BTreeSet::new(),
                moved: HashMap::new(),
                leaving: false,
            }),
            generation: AtomicU64::new(0),
            stats: ClusterStats::default(),
        };
        cluster.renew().map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;
        if let Err(e) = cluster.refresh() {
            // Not joining after all: say so, or the others wait a lease for this server.
            cluster.bury_self();
            anyhow::bail!("cannot list the cluster's servers: {e}");
        }
        Ok(cluster)
    }

    /// This server's id in the cluster (a new one after a burial).
    pub fn id(&self) -> String {
        self.state().id.clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How often `tick` should run: a third of the lease.
    pub fn period(&self) -> Duration {
        self.lease / 3
    }

    /// Bumped whenever this server forgets its leases (a lapse, found here too, or a burial):
    /// open documents must be closed.
    pub fn generation(&self) -> u64 {
        self.check_lapse();
        self.generation.load(Ordering::Acquire)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("BUG: cluster lock poisoned")
    }

    /// Renews every third of the lease, counted from when the last renewal was sent (a slow
    /// one does not push the next back), each given up after two thirds of a lease, until
    /// `stop`. Errors are counted and logged; the membership lapses on its own if they go on.
    pub fn renew_until(&self, stop: &std::sync::atomic::AtomicBool) {
        let mut next = Instant::now() + self.period();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                std::thread::park_timeout(next - now);
                continue;
            }
            next = now + self.period();
            if self.state().leaving {
                return;
            }
            if let Err(e) = self.renew() {
                tracing::warn!("renewing this server's cluster membership failed: {e}");
            }
        }
    }

    /// Looks at the others every third of the lease until `stop` (on a thread of its own, so
    /// a slow list never delays a renewal).
    pub fn refresh_until(&self, stop: &std::sync::atomic::AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.refresh() {
                tracing::warn!("listing the cluster's servers failed: {e}");
            }
            self.check_lapse();
            std::thread::park_timeout(self.period());
        }
    }

    /// Creates this server's next beat. If another server created it first, this server was
    /// buried: it forgets everything and joins again under a new id.
    fn renew(&self) -> pagesync::Result<()> {
        let (id, next, nonce) = {
            let st = self.state();
            (st.id.clone(), st.beat + 1, st.nonce)
        };
        let sent = Instant::now();
        let record = Record { url: self.url.clone(), started_ms: self.started_ms, nonce };
        let bytes = serde_json::to_vec(&record).expect("BUG: a record always serializes");
        let key = beat_key(&id, next);
        let within = Some(self.lease * 2 / 3);
        let outcome = self.backend.create_object_within(&key, bytes, within).and_then(|made| {
            if made {
                return Ok(Beat::Made);
            }
            // Not made: an earlier try of ours landed after all (when, nobody knows), or
            // someone buried us.
            let ours = self
                .backend
                .read_object(&key)?
                .is_some_and(|b| serde_json::from_slice::<Record>(&b).is_ok_and(|r| r.nonce == nonce));
            Ok(if ours { Beat::Landed } else { Beat::Buried })
        });
        match outcome {
            Ok(beat @ (Beat::Made | Beat::Landed)) => {
                self.stats.renewals.fetch_add(1, Ordering::Relaxed);
                let mut st = self.state();
                if st.id == id {
                    st.beat = next;
                    // Only a beat made now counts from when it was sent: one that landed
                    // earlier may have been seen (and buried) long ago.
                    if beat == Beat::Made {
                        st.renewed = Some(st.renewed.map_or(sent, |r| r.max(sent)));
                    }
                }
                drop(st);
                if next % PRUNE_EVERY == 0 {
                    let old: Vec<String> = (next.saturating_sub(PRUNE_EVERY + 1).max(1)..next - 1)
                        .map(|b| beat_key(&id, b))
                        .collect();
                    let _ = self.backend.delete_objects(&old);
                }
                Ok(())
            }
            Ok(Beat::Buried) => {
                self.rejoin(&id);
                Err(pagesync::Error::Unavailable("rejoining the cluster under a new id".into()))
            }
            Err(e) => {
                self.stats.renewal_failures.fetch_add(1, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// Forgets every lease this server held, in one critical section with the generation
    /// (so `hold` cannot slip a lease in between): its open documents are closed and read their
    /// lease again before they write.
    fn forget(&self, why: &str) {
        let mut st = self.state();
        st.owned.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(st);
        tracing::error!("{why}: it stopped writing every document");
    }

    /// This server (as `id`) was buried: it forgets everything and joins again, as a new
    /// server, holding nothing.
    fn rejoin(&self, id: &str) {
        let mut st = self.state();
        if st.id != id {
            return;
        }
        st.owned.clear();
        (st.id, st.nonce, st.beat, st.renewed) = (new_id(), random_u64(), 0, None);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(st);
        self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            "this server ({id}) was buried by another (it was silent for a lease): it stopped writing every document and joins again under a new id"
        );
    }

    /// Writes this server's tombstone (leaving, or failing to join): the others see it gone
    /// at their next list. A renewal of ours that landed unanswered may hold the next beat:
    /// then the one after.
    fn bury_self(&self) {
        let (id, beat) = {
            let st = self.state();
            (st.id.clone(), st.beat)
        };
        for b in beat + 1..beat + 4 {
            match self.backend.create_object(&beat_key(&id, b), Vec::new()) {
                Ok(true) => {
                    let old: Vec<String> =
                        (beat.saturating_sub(PRUNE_EVERY).max(1)..b).map(|b| beat_key(&id, b)).collect();
                    let _ = self.backend.delete_objects(&old);
                    return;
                }
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!("writing this server's tombstone failed (others wait a lease): {e}");
                    return;
                }
            }
        }
    }

    /// Lists every server's beats and notes whose highest beat changed since the last look.
    fn refresh(&self) -> pagesync::Result<()> {
        let listed = self.backend.list_objects(MEMBERS, true)?;
        let now = Instant::now();
        let mut top: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for info in &listed {
            let Some((id, beat)) = info.name.split_once('/') else { continue };
            let Ok(beat) = beat.parse::<u64>() else { continue };
            let t = top.entry(id).or_insert((beat, info.size));
            if beat > t.0 {
                *t = (beat, info.size);
            }
        }
        // A server not seen before: its URL is in its highest record.
        let (me, unknown): (String, Vec<(String, u64)>) = {
            let st = self.state();
            let unknown = top
                .iter()
                .filter(|(id, (_, size))| *size > 0 && st.members.get(**id).is_none_or(|s| s.url.is_none()))
                .map(|(id, (beat, _))| ((*id).to_owned(), *beat))
                .collect();
            (st.id.clone(), unknown)
        };
        let mut urls = HashMap::new();
        for (id, beat) in unknown.into_iter().filter(|(id, _)| *id != me) {
            // One that cannot be read now is read on the next look.
            if let Ok(Some(b)) = self.backend.read_object(&beat_key(&id, beat))
                && let Ok(r) = serde_json::from_slice::<Record>(&b)
            {
                urls.insert(id, r.url);
            }
        }
        // Buried while a renewal of ours still looked fine: stop at once.
        let (my_beat, leaving) = {
            let st = self.state();
            (st.beat, st.leaving)
        };
        if !leaving && top.get(me.as_str()).is_some_and(|(beat, size)| *size == 0 && *beat > my_beat) {
            self.rejoin(&me);
        }
        let mut long_dead = Vec::new();
        let mut st = self.state();
        st.members.retain(|id, _| top.contains_key(id.as_str()));
        for (id, (beat, size)) in top {
            if id == me {
                continue;
            }
            let seen = st.members.entry(id.to_owned()).or_insert(Seen {
                url: None,
                beat,
                dead: size == 0,
                changed: now,
            });
            // Only forward: a burial or a first look may have seen a newer beat than this list.
            if beat > seen.beat {
                (seen.beat, seen.dead, seen.changed) = (beat, size == 0, now);
            }
            if let Some(url) = urls.remove(id) {
                seen.url = Some(url);
            }
            if seen.dead && seen.changed.elapsed() > self.lease * GC_LEASES {
                long_dead.push((id.to_owned(), beat));
            }
        }
        drop(st);
        // A server gone for long keeps only its tombstone (which must stay: it is what stops
        // the server if it ever wakes up).
        let old: Vec<String> = listed
            .iter()
            .filter_map(|i| {
                let (id, beat) = i.name.split_once('/')?;
                let beat = beat.parse::<u64>().ok()?;
                long_dead.iter().any(|(d, top)| d == id && beat < *top).then(|| beat_key(id, beat))
            })
            .collect();
        let _ = self.backend.delete_objects(&old);
        Ok(())
    }

    /// Whether this server may serve documents: its membership is fresh and it is not leaving.
    pub fn may_serve(&self) -> bool {
        let st = self.state();
        self.fresh(&st)
    }

    /// Not leaving, and the last renewal that succeeded was sent within two thirds of a lease.
    fn fresh(&self, st: &State) -> bool {
        !st.leaving && st.renewed.is_some_and(|t| t.elapsed() < self.lease * 2 / 3)
    }

    /// Whether this server may append to `doc`'s journal now, for a journal opened after
    /// `place` answered `generation`: never again once this server forgot its leases since.
    pub fn may_write(&self, doc: DocId, generation: u64) -> bool {
        self.check_lapse();
        if !self.may_serve() {
            return false;
        }
        let st = self.state();
        self.generation.load(Ordering::Acquire) == generation && st.owned.contains(&doc)
    }

    /// Records `doc` as held by this server as `me`, unless this server forgot its leases or
    /// changed its id since `generation` (its lease names a server that no longer is).
    fn hold(&self, doc: DocId, me: &str, generation: u64) -> pagesync::Result<u64> {
        let mut st = self.state();
        if st.id != me || self.generation.load(Ordering::Acquire) != generation {
            return Err(pagesync::Error::Unavailable("its cluster membership changed meanwhile".into()));
        }
        st.owned.insert(doc);
        Ok(generation)
    }

    /// A lapsed membership forgets every lease: each is read again before a write.
    fn check_lapse(&self) {
        let quiet = {
            let st = self.state();
            st.owned.is_empty() || st.leaving
        };
        if quiet || self.may_serve() {
            return;
        }
        self.stats.lapses.fetch_add(1, Ordering::Relaxed);
        self.forget("this server's cluster membership lapsed (no renewal for two thirds of a lease)");
    }

    /// The URL of `id` if it is a live server other than this one.
    fn live_url(&self, st: &State, id: &str) -> Option<String> {
        let seen = st.members.get(id).filter(|s| !s.dead && s.changed.elapsed() < self.lease)?;
        seen.url.clone()
    }

    /// The live server rendezvous hashing picks for `doc` (this one included unless
    /// `excluding_me`): (id, url).
    fn pick(&self, doc: DocId, excluding_me: bool) -> Option<(String, String)> {
        let st = self.state();
        let others = st.members.keys().filter_map(|id| Some((id.clone(), self.live_url(&st, id)?)));
        let me = (!excluding_me).then(|| (st.id.clone(), self.url.clone()));
        others.chain(me).max_by_key(|(id, _)| score(doc, id))
    }

    /// Whether `id` is live, silent for a lease (at this beat) or dead, as this server has
    /// seen it. A server never seen before is looked at once, and is live for a lease from
    /// then on unless it left a tombstone.
    fn status(&self, id: &str) -> pagesync::Result<Status> {
        if let Some(s) = self.state().members.get(id) {
            return Ok(match s {
                s if s.dead => Status::Dead,
                s if s.changed.elapsed() < self.lease => Status::Live,
                s => Status::Silent(s.beat),
            });
        }
        let listed = self.backend.list_objects(&format!("{MEMBERS}/{id}"), false)?;
        // No beats at all: live for a lease all the same (the cautious side).
        let (beat, dead) = highest(&listed).map_or((0, false), |(beat, info)| (beat, info.size == 0));
        let seen = Seen { url: None, beat, dead, changed: Instant::now() };
        self.state().members.insert(id.to_owned(), seen);
        Ok(if dead { Status::Dead } else { Status::Live })
    }

    /// Buries `holder`, last seen at `beat`: creates its tombstone at the next beat and checks
    /// that it is the highest. `true`: it is dead, and can never renew again. `false`: it renewed
    /// (the view now says so).
    fn bury(&self, holder: &str, beat: u64) -> pagesync::Result<bool> {
        self.backend.create_object(&beat_key(holder, beat + 1), Vec::new())?;
        // Whoever made that beat, the highest one now tells.
        let listed = self.backend.list_objects(&format!("{MEMBERS}/{holder}"), false)?;
        let (top, info) = highest(&listed).map_or((0, 0), |(n, i)| (n, i.size));
        let dead = top > beat && info == 0;
        let mut st = self.state();
        if let Some(seen) = st.members.get_mut(holder)
            && seen.beat != top
        {
            (seen.beat, seen.dead, seen.changed) = (top, info == 0, Instant::now());
        }
        if dead {
            drop(st);
            self.stats.burials.fetch_add(1, Ordering::Relaxed);
            tracing::info!(server = holder, beat = top, "buried a server that was silent for a lease");
        } else if !st.members.contains_key(holder) && top > 0 {
            // A server this one had not listed yet: live from now on, for a lease.
            st.members.insert(
                holder.to_owned(),
                Seen { url: None, beat: top, dead: false, changed: Instant::now() },
            );
        }
        Ok(dead)
    }

    /// Where `doc` was recently found served, if elsewhere.
    pub fn moved(&self, doc: DocId) -> Option<String> {
        let st = self.state();
        st.moved.get(&doc).filter(|(at, _)| at.elapsed() < MOVED_FOR).map(|(_, url)| url.clone())
    }

    fn note_moved(&self, doc: DocId, owner: &str) -> pagesync::Error {
        let mut st = self.state();
        st.owned.remove(&doc);
        if st.moved.len() >= MAX_MOVED {
            st.moved.clear();
        }
        st.moved.insert(doc, (Instant::now(), owner.to_owned()));
        pagesync::Error::Moved { owner: owner.to_owned() }
    }

    /// Decides where `doc` is served: `Ok` here (this server holds its lease, taking it if
    /// nobody live does and the hash picks this server), `Err(Moved)` at another server,
    /// `Err(Unavailable)` nowhere now. Blocking (object-store requests).
    pub fn place(&self, doc: DocId) -> pagesync::Result<u64> {
        let unavailable = |why: &str| pagesync::Error::Unavailable(why.to_owned());
        if let Some(owner) = self.moved(doc) {
            return Err(pagesync::Error::Moved { owner });
        }
        let (me, generation) = {
            let st = self.state();
            (st.id.clone(), self.generation.load(Ordering::Acquire))
        };
        for _ in 0..4 {
            if !self.may_serve() {
                return Err(unavailable("its cluster membership lapsed, or it is shutting down"));
            }
            let leases = self.backend.list_objects(&format!("{LEASES}/{doc}"), false)?;
            let top = highest(&leases).map(|(e, _)| e);
            let holder = match top {
                None => None,
                Some(e) => match self.backend.read_object(&lease_key(doc, e))? {
                    // Malformed: nobody holds it (the next epoch replaces it).
                    Some(b) => serde_json::from_slice::<Lease>(&b).ok(),
                    None => continue, // pruned meanwhile: a newer epoch exists
                },
            };
            let mut silent = None;
            if let Some(h) = &holder {
                if h.holder == me {
                    return self.hold(doc, &me, generation);
                }
                match self.status(&h.holder)? {
                    Status::Live => return Err(self.note_moved(doc, &h.url)),
                    Status::Silent(beat) => silent = Some(beat),
                    Status::Dead => {}
                }
            }
            let Some((id, url)) = self.pick(doc, false) else { return Err(unavailable("no live server")) };
            if id != me {
                return Err(self.note_moved(doc, &url));
            }
            if let (Some(h), Some(beat)) = (&holder, silent) {
                // Its holder was silent for a lease: bury it first, so it can never write again.
                if !self.bury(&h.holder, beat)? {
                    continue;
                }
            }
            let epoch = top.map_or(1, |e| e + 1);
            let lease = Lease { holder: me.clone(), url: self.url.clone() };
            let bytes = serde_json::to_vec(&lease).expect("BUG: a lease always serializes");
            if self.backend.create_object(&lease_key(doc, epoch), bytes)? {
                self.stats.leases_taken.fetch_add(1, Ordering::Relaxed);
                if let Some(h) = holder {
                    self.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%doc, from = h.holder, epoch, "took over the document's lease from a server that is gone");
                }
                self.prune_leases(doc, epoch, &leases);
                return self.hold(doc, &me, generation);
            }
            // Another server took that epoch first: look again.
        }
        Err(unavailable("its lease is contended; try again"))
    }

    /// Deletes the lease objects older than `epoch` (best effort: they name no one anymore).
    fn prune_leases(&self, doc: DocId, epoch: u64, leases: &[ObjectInfo]) {
        let old: Vec<String> = leases
            .iter()
            .filter_map(|i| i.name.parse::<u64>().ok())
            .filter(|e| *e < epoch)
            .map(|e| lease_key(doc, e))
            .collect();
        let _ = self.backend.delete_objects(&old);
    }

    /// Documents whose lease this server holds.
    pub fn owned(&self) -> usize {
        self.state().owned.len()
    }

    /// Live servers this server sees, itself included.
    pub fn live_members(&self) -> usize {
        let st = self.state();
        let others = st.members.keys().filter(|id| self.live_url(&st, id).is_some()).count();
        others + usize::from(self.fresh(&st))
    }

    /// Leaves the cluster on a graceful shutdown, once nothing is written anymore: hands each
    /// held lease to the server the hash picks next (within `HANDOVER_BUDGET`), then buries
    /// itself, so the others take the rest over at once rather than a lease later. Blocking.
    pub fn leave(&self) {
        let (id, owned): (String, Vec<DocId>) = {
            let mut st = self.state();
            st.leaving = true;
            (st.id.clone(), std::mem::take(&mut st.owned).into_iter().collect())
        };
        let start = Instant::now();
        let mut handed = 0;
        for doc in owned {
            if start.elapsed() > HANDOVER_BUDGET {
                break;
            }
            match self.hand_over(doc, &id) {
                Ok(true) => handed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%doc, "handing the document over failed: {e}"),
            }
        }
        self.bury_self();
        tracing::info!(handed, "left the cluster");
    }

    fn hand_over(&self, doc: DocId, me: &str) -> pagesync::Result<bool> {
        let leases = self.backend.list_objects(&format!("{LEASES}/{doc}"), false)?;
        let Some((epoch, _)) = highest(&leases) else { return Ok(false) };
        let Some(b) = self.backend.read_object(&lease_key(doc, epoch))? else { return Ok(false) };
        if serde_json::from_slice::<Lease>(&b).ok().is_none_or(|l| l.holder != me) {
            return Ok(false);
        }
        let Some((next, url)) = self.pick(doc, true) else { return Ok(false) };
        let bytes = serde_json::to_vec(&Lease { holder: next, url }).expect("BUG: a lease always serializes");
        let made = self.backend.create_object(&lease_key(doc, epoch + 1), bytes)?;
        if made {
            self.stats.handovers.fetch_add(1, Ordering::Relaxed);
            self.prune_leases(doc, epoch + 1, &leases);
        }
        Ok(made)
    }
}

/// A document's journal on a cluster server: every write first checks that this server still
/// holds the document's lease and its membership is fresh, so a server that lost either stops
/// writing at once. (The batch objects' `PutMode::Create` fences whatever slips past.)
pub struct Leased {
    pub inner: Box<dyn Journal>,
    pub cluster: std::sync::Arc<Cluster>,
    pub doc: DocId,
    /// What `place` answered: the journal writes only while the cluster has not forgotten
    /// its leases since.
    pub generation: u64,
}

impl std::fmt::Debug for Leased {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leased").field("doc", &self.doc).finish()
    }
}

impl Leased {
    fn check(&self) -> pagesync::journal::Result<()> {
        if self.cluster.may_write(self.doc, self.generation) {
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

    fn detach_sync(&mut self) -> pagesync::journal::Result<Option<pagesync::journal::DetachedSync>> {
        self.inner.detach_sync()
    }

    fn finish_detached_sync(
        &mut self,
        sync: pagesync::journal::DetachedSync,
        outcome: std::io::Result<()>,
    ) -> pagesync::journal::Result<()> {
        self.inner.finish_detached_sync(sync, outcome)
    }

    fn is_synced(&self) -> bool {
        self.inner.is_synced()
    }

    fn read(&self, lsn: Lsn) -> pagesync::journal::Result<Vec<u8>> {
        self.inner.read(lsn)
    }

    fn read_into(&self, lsn: Lsn, out: &mut Vec<u8>) -> pagesync::journal::Result<()> {
        self.inner.read_into(lsn, out)
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

/// What `pagesync-server cluster` prints: every server with beats in the bucket, and each
/// document's lease.
#[derive(Debug)]
pub struct ClusterView {
    pub members: Vec<Member>,
    /// (document, epoch, holder id).
    pub leases: Vec<(DocId, u64, String)>,
}

impl ClusterView {
    /// The live server that advertises `url`, if any.
    pub fn member_at(&self, url: &str) -> Option<&Member> {
        self.members.iter().find(|m| !m.dead && m.url.as_deref() == Some(url))
    }

    /// The documents whose lease the server `id` holds.
    pub fn held_by(&self, id: &str) -> Vec<DocId> {
        self.leases.iter().filter(|(_, _, holder)| holder == id).map(|(doc, _, _)| *doc).collect()
    }
}

/// A server as the bucket shows it.
#[derive(Debug)]
pub struct Member {
    pub id: String,
    /// From its newest record (`None`: none is left).
    pub url: Option<String>,
    /// Its highest beat is a tombstone: it left, or was buried.
    pub dead: bool,
    /// Milliseconds since its highest beat was written, by the store's clock against this
    /// machine's.
    pub age_ms: i64,
}

/// Reads the cluster's records from the store (a LIST per prefix, a GET per server and per
/// document).
pub fn view(backend: &ObjectBackend) -> anyhow::Result<ClusterView> {
    let now = wall_ms();
    let mut by_id: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    for mut info in backend.list_objects(MEMBERS, true)? {
        let Some((id, beat)) = info.name.split_once('/') else { continue };
        let id = id.to_owned();
        info.name = beat.to_owned();
        by_id.entry(id).or_default().push(info);
    }
    let mut members = Vec::new();
    for (id, beats) in by_id {
        let Some((_, info)) = highest(&beats) else { continue };
        let newest_record = beats
            .iter()
            .filter(|i| i.size > 0)
            .filter_map(|i| Some((i.name.parse::<u64>().ok()?, i)))
            .max_by_key(|(n, _)| *n);
        let url = match newest_record {
            Some((n, _)) => backend
                .read_object(&beat_key(&id, n))?
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
                .map(|r| r.url),
            None => None,
        };
        members.push(Member { url, dead: info.size == 0, age_ms: now - info.modified_ms, id });
    }
    let mut by_doc: BTreeMap<DocId, u64> = BTreeMap::new();
    for info in backend.list_objects(LEASES, true)? {
        let Some((doc, epoch)) = info.name.split_once('/') else { continue };
        let (Ok(doc), Ok(epoch)) = (doc.parse::<DocId>(), epoch.parse::<u64>()) else { continue };
        let e = by_doc.entry(doc).or_insert(epoch);
        *e = (*e).max(epoch);
    }
    let mut leases = Vec::new();
    for (doc, epoch) in by_doc {
        let holder = backend
            .read_object(&lease_key(doc, epoch))?
            .and_then(|b| serde_json::from_slice::<Lease>(&b).ok())
            .map_or_else(|| "(malformed)".to_owned(), |l| l.holder);
        leases.push((doc, epoch, holder));
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

    fn docs() -> Vec<DocId> {
        (0..20u128).map(DocId::from_u128).collect()
    }

    #[test]
    fn one_lease_per_document_and_a_silent_server_is_buried_before_a_takeover() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Three times the shortest lease: the steps between the sleeps below must fit in the
        // margin a third of a lease leaves, and on a loaded 2-core machine a shortest lease's
        // 250 ms was once not enough.
        let lease = MIN_LEASE_MS * 3;
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", lease).unwrap();
        let b = Cluster::join(backend(dir.path(), &rt), "ws://b:1", lease).unwrap();
        a.refresh().unwrap();
        assert_eq!((a.live_members(), b.live_members()), (2, 2));
        // Every document is served by exactly one of them, and the other redirects there.
        for doc in docs() {
            match (a.place(doc), b.place(doc)) {
                (Ok(_), Err(pagesync::Error::Moved { owner })) => assert_eq!(owner, a.url()),
                (Err(pagesync::Error::Moved { owner }), Ok(_)) => assert_eq!(owner, b.url()),
                other => panic!("{doc}: {other:?}"),
            }
        }
        assert_eq!(a.owned() + b.owned(), 20);
        // `a` stops renewing: it stops writing before `b` may take its documents.
        let generation = a.generation();
        let doc = docs().into_iter().find(|d| a.may_write(*d, generation)).unwrap();
        std::thread::sleep(Duration::from_millis(lease * 2 / 3 + 50));
        assert!(!a.may_write(doc, generation), "a lapsed membership still writes");
        assert!(a.generation() > generation, "a lapse closes the open documents");
        assert!(matches!(a.place(doc), Err(pagesync::Error::Unavailable(_))));
        b.renew().unwrap();
        b.refresh().unwrap();
        b.state().moved.clear();
        assert!(
            matches!(b.place(doc), Err(pagesync::Error::Moved { .. })),
            "taken over before a lease passed"
        );
        std::thread::sleep(Duration::from_millis(lease / 3 + 50));
        b.renew().unwrap();
        b.refresh().unwrap();
        b.state().moved.clear();
        b.place(doc).unwrap();
        assert!(b.may_write(doc, b.generation()));
        assert_eq!(b.stats.takeovers.load(Ordering::Relaxed), 1);
        assert_eq!(b.stats.burials.load(Ordering::Relaxed), 1);
        // `a` comes back: its next beat is its tombstone, so it joins again as a new server,
        // holding nothing; the lease is `b`'s.
        let old_id = a.id();
        assert!(a.renew().is_err(), "a buried server cannot renew");
        assert_ne!(a.id(), old_id);
        a.renew().unwrap();
        a.refresh().unwrap();
        assert!(!a.may_write(doc, a.generation()));
        match a.place(doc) {
            Err(pagesync::Error::Moved { owner }) => assert_eq!(owner, b.url()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_renewal_that_landed_unanswered_does_not_extend_the_membership() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", MIN_LEASE_MS).unwrap();
        // An earlier try at the next beat landed, and its answer was lost.
        let (id, next, nonce) = {
            let st = a.state();
            (st.id.clone(), st.beat + 1, st.nonce)
        };
        let record = Record { url: a.url().to_owned(), started_ms: 0, nonce };
        a.backend.create_object(&beat_key(&id, next), serde_json::to_vec(&record).unwrap()).unwrap();
        std::thread::sleep(Duration::from_millis(MIN_LEASE_MS * 2 / 3 + 50));
        assert!(!a.may_serve());
        a.renew().unwrap();
        assert_eq!(a.state().beat, next, "the landed beat is taken as ours");
        assert!(!a.may_serve(), "a beat sent at an unknown time does not count as a renewal now");
        a.renew().unwrap();
        assert!(a.may_serve());
        assert_eq!(a.id(), id);
    }

    #[test]
    fn servers_with_different_views_never_both_take_a_lease() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // `a` has not seen `b` join: each thinks the hash picks itself for some documents.
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", DEFAULT_LEASE_MS).unwrap();
        let b = Cluster::join(backend(dir.path(), &rt), "ws://b:1", DEFAULT_LEASE_MS).unwrap();
        assert_eq!(a.live_members(), 1);
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| docs().into_iter().map(|d| a.place(d).is_ok()).collect::<Vec<_>>());
            let tb = s.spawn(|| docs().into_iter().map(|d| b.place(d).is_ok()).collect::<Vec<_>>());
            (ta.join().unwrap(), tb.join().unwrap())
        });
        for (i, (x, y)) in ra.iter().zip(&rb).enumerate() {
            assert!(!(x & y), "document {i} is held by both");
        }
        let held = view(&backend(dir.path(), &rt)).unwrap().leases;
        assert_eq!(held.len(), ra.iter().zip(&rb).filter(|(x, y)| **x || **y).count());
    }

    #[test]
    fn leaving_hands_documents_over_at_once() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = Cluster::join(backend(dir.path(), &rt), "ws://a:1", DEFAULT_LEASE_MS).unwrap();
        let b = Cluster::join(backend(dir.path(), &rt), "ws://b:1", DEFAULT_LEASE_MS).unwrap();
        a.refresh().unwrap();
        let mine: Vec<DocId> = docs().into_iter().filter(|d| a.place(*d).is_ok()).collect();
        assert!(!mine.is_empty());
        a.leave();
        assert_eq!(a.stats.handovers.load(Ordering::Relaxed), mine.len() as u64);
        b.refresh().unwrap();
        for doc in &mine {
            b.place(*doc).unwrap();
        }
        let view = view(&backend(dir.path(), &rt)).unwrap();
        let dead: Vec<bool> = view.members.iter().map(|m| m.dead).collect();
        assert_eq!(dead.iter().filter(|d| **d).count(), 1, "the leaving server left its tombstone: {dead:?}");
        assert!(view.leases.iter().all(|(_, _, holder)| *holder == b.id()));
        assert_eq!(b.live_members(), 1, "the others see it gone at once");
    }
}
