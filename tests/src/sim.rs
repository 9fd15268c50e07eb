//! A deterministic simulator: N clients, M documents and one server, driven through the real
//! `ClientSession` / `ServerSession` and documents, over an in-memory network with a seeded RNG
//! and a virtual clock. Every frame is encoded and decoded.
//!
//! Faults while `faulty`: dropped, duplicated, delayed (hence reordered) frames, disconnects,
//! partitions, client crash-restart and server crash-restart (in-memory state is lost; half of
//! the crashes are power cuts, which lose what was not flushed or leave it torn), and storage
//! faults on every journal (`disk.rs`): full disks, failed fsyncs, failed reads, S3 puts that
//! fail or land while reported failed, slow appends and reads. The server runs its steps as
//! external jobs, each handed back after the time its storage took, so messages for a document
//! out on a step wait for it. A journal that refuses appends until reopened gets reopened: the
//! server's or the app's supervisor restarts the process. Then the network and the storage heal
//! and the run must converge.
//!
//! Everything random comes from one `Rng(seed)` (and each file's or store's own RNG derived from
//! it), and nothing reads a real clock, so a seed replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use pagesync::journal::{JournalId, Lsn};
use pagesync::protocol::{ClientSession, ConnId, Event, JobDone, Message, ServerSession, SessionOptions};
use pagesync::{
    ClientDocument, Compaction, DocId, Durability, MutationState, NORMAL_SYNC_MS, ServerDocument,
    SqlMutation, Statement, Value,
};

use crate::Rng;
use crate::disk::{Disk, FaultRates, Faults, Kind};

pub const ACCOUNTS: i64 = 8;
pub const START_BALANCE: i64 = 100;
const T0: i64 = 1_700_000_000_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL CHECK (bal >= 0));
CREATE TABLE IF NOT EXISTS ledger(client INTEGER NOT NULL, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, client INTEGER, body TEXT, n INTEGER DEFAULT 0);
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 8)
INSERT OR IGNORE INTO acct SELECT i, 100 FROM s;
";

/// Knobs of one run, all derived from the seed.
#[derive(Clone, Debug)]
pub struct Config {
    pub clients: usize,
    pub docs: usize,
    pub mutations: usize,
    pub drop_pct: u64,
    pub dup_pct: u64,
    pub max_delay_ms: i64,
    /// Virtual time with faults, before the network heals.
    pub faulty_ms: i64,
    /// The server's checkpoints and retention, when on: small enough that documents
    /// checkpoint every few steps and clients that fall behind restart at a checkpoint.
    pub compaction: Option<Compaction>,
    /// The server's storage: `File` (a `file://` store) or `Object` (S3).
    pub server_backend: Kind,
    /// Each client's storage: `File` (native) or `Handle` (the browser's OPFS).
    pub client_backends: Vec<Kind>,
    pub faults: FaultRates,
    /// Each client's `Durability`: `Normal` for some native ones.
    pub client_durability: Vec<Durability>,
}

impl Config {
    pub fn from_seed(seed: u64) -> Config {
        let mut r = Rng(seed ^ 0x5eed);
        let clients = 2 + r.below(3) as usize;
        let mut cfg = Config {
            clients,
            docs: 1 + r.below(3) as usize,
            mutations: 30 + r.below(50) as usize,
            drop_pct: r.below(15),
            dup_pct: r.below(10),
            max_delay_ms: 1 + r.below(40) as i64,
            faulty_ms: 3_000 + r.below(4_000) as i64,
            compaction: (r.below(3) > 0).then(|| Compaction {
                checkpoint_after_bytes: 4096 * (2 + r.below(16)),
                retention_ms: [0, 500, 3_000][r.below(3) as usize],
            }),
            server_backend: if r.chance(50) { Kind::File } else { Kind::Object },
            client_backends: (0..clients)
                .map(|_| if r.chance(50) { Kind::File } else { Kind::Handle })
                .collect(),
            faults: FaultRates::from_rng(&mut r),
            client_durability: (0..clients)
                .map(|_| if r.chance(50) { Durability::Normal } else { Durability::Full })
                .collect(),
        };
        // The browser's handles are durable on every append: `Normal` is for native clients.
        for (d, kind) in cfg.client_durability.iter_mut().zip(&cfg.client_backends) {
            if *kind == Kind::Handle {
                *d = Durability::Full;
            }
        }
        cfg
    }
}

/// What a client made: which document, its LSN there, and its ledger number if a transfer.
#[derive(Clone, Debug)]
struct Made {
    doc: DocId,
    lsn: Lsn,
    ledger: Option<i64>,
}

struct Client {
    session: ClientSession,
    /// Each document's (storage, timeline) journal storage.
    /// Per document: storage, timeline, outcomes.
    disks: BTreeMap<DocId, [Disk; 3]>,
    conn: Option<ConnId>,
    reconnect_at: Option<i64>,
    partitioned_until: i64,
    made: Vec<Made>,
    next_ledger: i64,
    /// Transfers whose `mutate` failed on the storage: (document, ledger number). They may
    /// apply all the same (the append may have landed), but at most once.
    unsure: Vec<(DocId, i64)>,
    /// When the app reopens the replica, whose journal refuses appends until reopened.
    reopen_at: Option<i64>,
    /// When its local writes were last made durable (under `Durability::Normal`).
    synced_at: i64,
}

#[derive(Clone, Copy, Debug)]
enum Dest {
    Server(ConnId),
    Client(usize, ConnId),
}

pub struct Sim {
    pub seed: u64,
    cfg: Config,
    rng: Rng,
    now: i64,
    server: ServerSession,
    server_disks: BTreeMap<DocId, Disk>,
    faults: Arc<Faults>,
    /// Steps out on the driver's threads: (when it hands them back, document, result).
    steps: Vec<(i64, DocId, JobDone)>,
    /// Faults injected into each document's storage during its last step.
    step_faults: BTreeMap<DocId, u64>,
    /// When the server's supervisor restarts it, because a journal refuses appends until
    /// reopened.
    server_reopen_at: Option<i64>,
    clients: Vec<Client>,
    docs: Vec<DocId>,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    in_flight: HashMap<u64, (Dest, Vec<u8>)>,
    seq: u64,
    next_conn: u64,
    faulty: bool,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub stats: Stats,
    last_server_error: Option<String>,
}

macro_rules! stats {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// What happened in a run, to show the faults and outcomes were real.
        #[derive(Clone, Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl Stats {
            pub fn add(&mut self, o: &Stats) {
                $(self.$field += o.$field;)*
            }
        }
    };
}

stats! {
    server_crashes,
    client_crashes,
    /// Crashes that were power cuts (the rest lose only the processes).
    power_cuts,
    /// Local writes under `Durability::Normal` that a power cut or a failed sync took before
    /// they were durable (they never applied).
    unsynced_lost,
    /// Power cuts that lost or tore something not flushed.
    power_cut_losses,
    disconnects,
    partitions,
    confirmed_transfers,
    rejected_transfers,
    /// Clients that fell behind the server's history and restarted at a checkpoint.
    client_restarts,
    /// Mutations refused while a client downloaded a checkpoint.
    restarting_refusals,
    /// Writes that failed on a full disk.
    disk_full,
    fsync_failures,
    /// Writes that reached a file only in part.
    torn_writes,
    /// Torn tails a journal found and cut when it opened.
    torn_tails_dropped,
    read_failures,
    /// S3 puts and deletes that failed.
    failed_puts,
    /// S3 puts that landed although reported failed.
    unknown_puts,
    slow_appends,
    slow_reads,
    /// Steps whose storage took `SLOW_STEP_MS` or more.
    slow_steps,
    /// Frames for a document that was out on a step, which waited for it.
    deferred_frames,
    /// Server steps that failed on the storage (and were retried).
    step_failures,
    /// Client mutations that failed on the local storage.
    local_write_failures,
    /// Frames a client could not apply for its storage.
    client_apply_failures,
    /// Replicas that failed to open on their storage (and were opened again).
    open_failures,
    /// Processes restarted by their supervisor to reopen a journal that refused appends.
    reopens,
    /// Transfers whose `mutate` failed, and which applied all the same (once).
    unsure_applied,
    /// Storage entries (still in the history at the end) that deleted rejections their
    /// clients had copied.
    forgetting_entries,
    /// Entries the clients open at the end kept from confirmations by digest.
    confirmed_by_digest,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("seed", &self.seed)
            .field("now", &self.now)
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// Step jobs out at once. The real hub's count: every due document of the simulator goes out
/// at once, so the session's order of handing them out (a hash map's) never matters.
const STEP_THREADS: usize = 8;

/// A step whose storage took this long is slow.
const SLOW_STEP_MS: i64 = 100;

/// Attempts to open a replica while faults strike before the run fails.
const MAX_OPEN_ATTEMPTS: u32 = 100;

fn open_server(disks: &BTreeMap<DocId, Disk>, compaction: Option<Compaction>) -> ServerSession {
    let disks = disks.clone();
    let opener = move |doc: DocId| {
        let disk = disks.get(&doc).ok_or_else(|| pagesync::Error::Malformed(format!("no document {doc}")))?;
        let mut d = ServerDocument::open(disk.open()?)?;
        d.set_compaction(compaction);
        Ok(d)
    };
    ServerSession::new(Box::new(opener))
        .with_external_jobs()
        .with_options(SessionOptions { step_threads: STEP_THREADS, ..SessionOptions::default() })
}

/// The test key (`crate::timeline_key`) of client `c`'s timeline for `doc`.
fn key_of(c: usize, doc: DocId) -> u128 {
    u128::from_be_bytes(doc.0) ^ ((c as u128 + 1) << 100)
}

fn open_client(
    c: usize,
    disks: &BTreeMap<DocId, [Disk; 3]>,
    durability: Durability,
) -> pagesync::Result<ClientSession> {
    let mut s = ClientSession::new("sim");
    for (doc, [storage, timeline, outcomes]) in disks {
        let mut d = ClientDocument::open_with_outcomes(storage.open()?, timeline.open()?, outcomes.open()?)?;
        d.set_timeline_key(crate::timeline_key(key_of(c, *doc)))?;
        d.set_durability(durability)?;
        s.add_document(*doc, d);
    }
    Ok(s)
}

/// Whether an error comes from the storage (an injected fault, or a journal refusing appends
/// after one), which the run expects; any other error fails it.
fn is_storage(e: &pagesync::Error) -> bool {
    match e {
        pagesync::Error::Journal(_) | pagesync::Error::Store(pagesync::store::StoreError::Journal(_)) => true,
        pagesync::Error::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code == rusqlite::ErrorCode::SystemIoFailure
        }
        _ => false,
    }
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let cfg = Config::from_seed(seed);
        let faults = Faults::new(cfg.faults);
        let docs: Vec<DocId> = (0..cfg.docs).map(|d| DocId::from_u128(1000 + d as u128)).collect();
        let server_disks: BTreeMap<DocId, Disk> = docs
            .iter()
            .map(|doc| {
                let id = JournalId::from_u128(u128::from_be_bytes(doc.0));
                (*doc, Disk::new(cfg.server_backend, id, &format!("server/{doc}"), seed, &faults))
            })
            .collect();
        let clients = (0..cfg.clients)
            .map(|c| {
                let kind = cfg.client_backends[c];
                let disks = docs
                    .iter()
                    .enumerate()
                    .map(|(d, doc)| {
                        let base = 10_000 * (c as u128 + 1) + 10 * d as u128;
                        let disk = |n: u128, what: &str| {
                            let name = format!("client{c}/{doc}/{what}");
                            // The timeline's id comes from its key (see `open_client`).
                            let id = if n == 1 {
                                crate::timeline_journal_id(key_of(c, *doc))
                            } else {
                                JournalId::from_u128(base + n)
                            };
                            Disk::new(kind, id, &name, seed, &faults)
                        };
                        (*doc, [disk(0, "storage"), disk(1, "timeline"), disk(2, "outcomes")])
                    })
                    .collect();
                Client {
                    session: ClientSession::new("sim"),
                    disks,
                    conn: None,
                    reconnect_at: Some(0),
                    partitioned_until: 0,
                    made: vec![],
                    next_ledger: 0,
                    unsure: vec![],
                    reopen_at: None,
                    synced_at: 0,
                }
            })
            .collect();
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            now: 0,
            server: open_server(&server_disks, cfg.compaction),
            server_disks,
            faults,
            steps: Vec::new(),
            step_faults: BTreeMap::new(),
            server_reopen_at: None,
            clients,
            docs,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            seq: 0,
            next_conn: 1,
            faulty: true,
            frames_sent: 0,
            frames_dropped: 0,
            stats: Stats::default(),
            last_server_error: None,
            cfg,
        };
        for i in 0..sim.clients.len() {
            sim.open_replica(i);
        }
        sim
    }

    /// Opens client `i`'s replica from its journals, again while the storage fails.
    fn open_replica(&mut self, i: usize) {
        let durability = self.cfg.client_durability[i];
        for attempt in 1.. {
            match open_client(i, &self.clients[i].disks, durability) {
                Ok(s) => return self.clients[i].session = s,
                Err(e) if is_storage(&e) && attempt < MAX_OPEN_ATTEMPTS => self.stats.open_failures += 1,
                Err(e) => self.fail(format!("client {i} cannot open its replica: {e}")),
            }
        }
    }

    /// Client `i`'s process ends (its machine too, with `power_cut`) and starts again.
    fn restart_client(&mut self, i: usize, power_cut: bool) {
        self.stats.client_restarts += self.restarts_of(i);
        // The old replica is gone before the new one opens the journals.
        self.clients[i].session = ClientSession::new("sim");
        self.clients[i].reopen_at = None;
        if power_cut {
            let disks: Vec<Disk> = self.clients[i].disks.values().flatten().cloned().collect();
            self.power_cut(&disks);
        }
        self.open_replica(i);
        self.forget_unsynced(i);
    }

    /// Under `Durability::Normal`, client `i`'s writes past the end of its timeline were not
    /// durable when a power cut or a failed sync took them: they are not sent, so they never
    /// apply (a transfer among them is held to at most once).
    fn forget_unsynced(&mut self, i: usize) {
        if self.cfg.client_durability[i] == Durability::Full {
            return; // what `mutate` acknowledged is durable, and must apply
        }
        let c = &mut self.clients[i];
        let ends: BTreeMap<DocId, Lsn> = self
            .docs
            .iter()
            .map(|d| (*d, c.session.document(*d).expect("open").pending_range().next()))
            .collect();
        let (lost, kept): (Vec<Made>, Vec<Made>) =
            std::mem::take(&mut c.made).into_iter().partition(|m| m.lsn >= ends[&m.doc]);
        c.made = kept;
        self.stats.unsynced_lost += lost.len() as u64;
        c.unsure.extend(lost.iter().filter_map(|m| m.ledger.map(|n| (m.doc, n))));
    }

    /// Makes client `i`'s local writes durable, as the native client's driver does before it
    /// sends and at least every `NORMAL_SYNC_MS`.
    fn sync_client(&mut self, i: usize) {
        self.clients[i].synced_at = self.now;
        match self.clients[i].session.sync_timelines() {
            Ok(()) => {}
            Err(e) if is_storage(&e) => {
                self.stats.local_write_failures += 1;
                self.forget_unsynced(i);
                self.client_storage_failed(i);
            }
            Err(e) => self.fail(format!("client {i} sync: {e}")),
        }
    }

    /// The server's process ends (its machine too, with `power_cut`) and starts again.
    fn restart_server(&mut self, power_cut: bool) {
        for c in 0..self.clients.len() {
            let ms = 10 + self.rng.below(500) as i64;
            self.disconnect(c, ms);
        }
        // Steps out on a thread die with the process; what they appended is durable or not.
        self.steps.clear();
        self.server = open_server(&self.server_disks, self.cfg.compaction);
        self.server_reopen_at = None;
        if power_cut {
            let disks: Vec<Disk> = self.server_disks.values().cloned().collect();
            self.power_cut(&disks);
        }
    }

    fn power_cut(&mut self, disks: &[Disk]) {
        let lost = disks.iter().fold(false, |lost, d| d.power_cut() | lost);
        self.stats.power_cuts += 1;
        self.stats.power_cut_losses += u64::from(lost);
    }

    /// After a client's storage failed: a journal that refuses appends until reopened gets the
    /// replica reopened soon (by the app, or the user restarting it).
    fn client_storage_failed(&mut self, i: usize) {
        let stuck = self.clients[i].disks.values().flatten().any(Disk::needs_reopen);
        if stuck && self.clients[i].reopen_at.is_none() {
            self.clients[i].reopen_at = Some(self.now + 50 + self.rng.below(500) as i64);
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "simulator seed {} failed (rerun: PAGESYNC_SIM_SEED={}): {what}\nconfig: {:?}",
            self.seed, self.seed, self.cfg
        )
    }

    fn send(&mut self, dest: Dest, msg: &Message) {
        let bytes = msg.encode();
        self.frames_sent += 1;
        let copies = if self.faulty && self.rng.chance(self.cfg.drop_pct) {
            self.frames_dropped += 1;
            0
        } else if self.faulty && self.rng.chance(self.cfg.dup_pct) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faulty { 1 + self.rng.below(self.cfg.max_delay_ms as u64) as i64 } else { 1 };
            self.seq += 1;
            self.in_flight.insert(self.seq, (dest, bytes.clone()));
            self.queue.push(Reverse((self.now + delay, self.seq)));
        }
    }

    /// Moves every message the nodes want to send onto the network.
    fn flush(&mut self) {
        loop {
            let mut progressed = false;
            while let Some((conn, msg)) = self.server.poll_transmit() {
                progressed = true;
                if let Message::Error { code, message, .. } = &msg {
                    self.last_server_error = Some(format!("{code}: {message}"));
                }
                if let Some(i) = self.clients.iter().position(|c| c.conn == Some(conn)) {
                    if self.faulty && self.clients[i].partitioned_until > self.now {
                        continue;
                    }
                    self.send(Dest::Client(i, conn), &msg);
                }
            }
            for i in 0..self.clients.len() {
                let Some(conn) = self.clients[i].conn else { continue };
                while let Some(msg) = self.clients[i].session.poll_transmit() {
                    progressed = true;
                    if !(self.faulty && self.clients[i].partitioned_until > self.now) {
                        self.send(Dest::Server(conn), &msg);
                    }
                }
                if self.server.should_close(conn) {
                    self.fail(format!(
                        "the server closed client {i}'s connection: {:?}",
                        self.last_server_error
                    ));
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn deliver(&mut self, id: u64) {
        let (dest, bytes) = self.in_flight.remove(&id).expect("queued frame");
        match dest {
            Dest::Server(conn) => {
                let msg = Message::decode(&bytes).unwrap_or_else(|e| self.fail(format!("a frame: {e}")));
                if msg.doc().is_some_and(|d| self.server.is_away(d)) {
                    self.stats.deferred_frames += 1;
                }
                self.server.handle_message(conn, self.now, msg);
            }
            Dest::Client(i, conn) if self.clients[i].conn == Some(conn) => {
                let now = self.now;
                match self.clients[i].session.handle_frame(now, &bytes) {
                    Ok(()) => {}
                    Err(e) if is_storage(&e) => {
                        self.stats.client_apply_failures += 1;
                        self.check_applied(i, false);
                        self.client_storage_failed(i);
                    }
                    Err(e) => self.fail(format!("client {i} failed to apply a frame: {e}")),
                }
            }
            Dest::Client(..) => {} // for a connection that is gone
        }
    }

    /// Client `i` counts a mutation applied only once its replica holds the storage entry that
    /// applied it (what `_pagesync_timelines` says); after a failure it may count fewer until
    /// its next rebase, and after convergence exactly those (`settled`).
    fn check_applied(&self, i: usize, settled: bool) {
        for doc in &self.docs {
            let d = self.clients[i].session.document(*doc).expect("open");
            if d.is_restarting() {
                continue;
            }
            let stored = d.database().conn().query_row(
                "SELECT applied_lsn FROM _pagesync_timelines WHERE timeline = ?1",
                [&d.timeline_id().0[..]],
                |r| r.get::<_, i64>(0),
            );
            let stored = match stored {
                Ok(lsn) => Some(lsn as u64),
                Err(rusqlite::Error::QueryReturnedNoRows) => None,
                Err(_) => continue, // no such table yet, or a failed read
            };
            let applied = d.applied_lsn().map(Lsn::get);
            if applied > stored || (settled && applied != stored) {
                self.fail(format!(
                    "client {i} counts its mutations on {doc} applied through {:?}, but its storage says {stored:?}",
                    d.applied_lsn()
                ));
            }
        }
    }

    /// Hands out the steps that are due, runs them, and keeps each result until its storage's
    /// time has passed.
    fn start_steps(&mut self) {
        let mut jobs = Vec::new();
        while let Some(job) = self.server.poll_job(self.now) {
            jobs.push(job);
        }
        // In a fixed order, so that every journal sees its faults in the same order.
        jobs.sort_by_key(|j| j.doc());
        for job in jobs {
            let doc = job.doc();
            let disk = &self.server_disks[&doc];
            // Only what the step itself does counts.
            disk.take_latency_ms();
            disk.take_faults();
            let done = job.run();
            let took_ms = 1 + disk.take_latency_ms();
            self.step_faults.insert(doc, disk.take_faults());
            self.stats.slow_steps += u64::from(took_ms >= SLOW_STEP_MS);
            self.steps.push((self.now + took_ms, doc, done));
        }
    }

    /// Hands back the steps whose time has come, in order.
    fn finish_steps(&mut self) {
        self.steps.sort_by_key(|(at, doc, _)| Reverse((*at, *doc)));
        while self.steps.last().is_some_and(|(at, _, _)| *at <= self.now) {
            let (_, _, done) = self.steps.pop().expect("BUG: just checked");
            self.server.job_done(done, self.now);
            self.server_events();
        }
    }

    /// Checks what the server reports: a failed step must follow an injected fault, and a
    /// journal that refuses appends gets the server restarted.
    fn server_events(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                Event::StepFailed { doc, error, .. } => {
                    self.stats.step_failures += 1;
                    let disk = &self.server_disks[&doc];
                    let stuck = disk.needs_reopen();
                    if self.step_faults.get(&doc).copied().unwrap_or(0) == 0 && !stuck {
                        self.fail(format!("a step of {doc} failed with no storage fault: {error}"));
                    }
                    if stuck && self.server_reopen_at.is_none() {
                        self.server_reopen_at = Some(self.now + 100 + self.rng.below(900) as i64);
                    }
                }
                Event::DocumentFailed { doc, error } => {
                    self.fail(format!("a step of {doc} panicked: {error}"))
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self, i: usize) {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.server.connect(conn);
        let c = &mut self.clients[i];
        c.conn = Some(conn);
        c.reconnect_at = None;
        c.session.connected(self.now);
    }

    fn disconnect(&mut self, i: usize, for_ms: i64) {
        if let Some(conn) = self.clients[i].conn.take() {
            self.server.disconnect(conn);
        }
        self.clients[i].session.disconnected();
        self.clients[i].reconnect_at = Some(self.now + for_ms);
    }

    fn mutation(&mut self, i: usize) -> (Vec<u8>, Option<i64>) {
        let c = i as i64;
        let stmt = |sql: &str, params: Vec<Value>| Statement { sql: sql.into(), params };
        let body = match self.rng.below(10) {
            0 => SqlMutation::one(SCHEMA, vec![]),
            1..=5 => {
                let (from, to) =
                    (1 + self.rng.below(ACCOUNTS as u64) as i64, 1 + self.rng.below(ACCOUNTS as u64) as i64);
                let amount = 1 + self.rng.below(70) as i64;
                let n = self.clients[i].next_ledger;
                self.clients[i].next_ledger += 1;
                let body = SqlMutation {
                    statements: vec![
                        stmt(
                            "UPDATE acct SET bal = bal - ?1 WHERE id = ?2",
                            vec![amount.into(), from.into()],
                        ),
                        stmt("UPDATE acct SET bal = bal + ?1 WHERE id = ?2", vec![amount.into(), to.into()]),
                        stmt("INSERT INTO ledger(client, n) VALUES (?1, ?2)", vec![c.into(), n.into()]),
                    ],
                    once: None,
                };
                return (body.encode(), Some(n));
            }
            6 => SqlMutation::one(
                "INSERT INTO notes(client, body) VALUES (?1, hex(randomblob(16)))",
                vec![c.into()],
            ),
            7 => SqlMutation::one(
                "UPDATE notes SET n = n + 1, body = body || ?2 WHERE id % 3 = ?1",
                vec![(self.rng.below(3) as i64).into(), format!("{c}").into()],
            ),
            8 => SqlMutation::one(
                "DELETE FROM notes WHERE id IN (SELECT id FROM notes ORDER BY id LIMIT 1)",
                vec![],
            ),
            _ => SqlMutation::one("INSERT INTO no_such_table VALUES (1)", vec![]),
        };
        (body.encode(), None)
    }

    fn act(&mut self) {
        let i = self.rng.below(self.clients.len() as u64) as usize;
        match self.rng.below(100) {
            0..=74 => {
                let doc = self.docs[self.rng.below(self.docs.len() as u64) as usize];
                let (body, ledger) = self.mutation(i);
                let seed = self.rng.next_u64();
                // Client clocks run a little ahead of the server's; one in twenty far ahead,
                // so the server clamps its time (and confirms that step with pages).
                let time = if self.rng.chance(5) { T0 + self.now } else { self.now + 1_000 * i as i64 };
                match self.clients[i].session.mutate(doc, body, time, seed) {
                    Ok(s) => self.clients[i].made.push(Made { doc, lsn: s.lsn, ledger }),
                    // Downloading a checkpoint: the app is told to try again; nothing was made.
                    Err(pagesync::Error::Restarting) => self.stats.restarting_refusals += 1,
                    Err(e) if is_storage(&e) => {
                        self.stats.local_write_failures += 1;
                        self.clients[i].unsure.extend(ledger.map(|n| (doc, n)));
                        self.client_storage_failed(i);
                    }
                    Err(e) => self.fail(format!("client {i} mutate: {e}")),
                }
            }
            75..=82 => {
                let ms = 50 + self.rng.below(1_000) as i64;
                self.disconnect(i, ms);
                self.stats.disconnects += 1;
            }
            83..=88 => {
                self.clients[i].partitioned_until = self.now + 100 + self.rng.below(800) as i64;
                self.stats.partitions += 1;
            }
            89..=95 => {
                // Client crash: everything in memory is gone; the journals stay.
                let ms = 10 + self.rng.below(300) as i64;
                self.disconnect(i, ms);
                let power_cut = self.rng.chance(50);
                self.restart_client(i, power_cut);
                self.stats.client_crashes += 1;
            }
            _ => {
                // Server crash: sessions, queues and documents in memory are gone.
                let power_cut = self.rng.chance(50);
                self.restart_server(power_cut);
                self.stats.server_crashes += 1;
            }
        }
    }

    /// One step of virtual time: jump to the next event and handle everything due.
    fn tick(&mut self, next_action: Option<i64>) {
        let mut next = [
            self.queue.peek().map(|Reverse((t, _))| *t),
            self.server.poll_timeout(),
            next_action,
            self.server_reopen_at,
        ]
        .into_iter()
        .flatten()
        .chain(self.steps.iter().map(|(at, _, _)| *at))
        .chain(self.clients.iter().filter_map(|c| c.session.poll_timeout()))
        .chain(self.clients.iter().filter_map(|c| c.reconnect_at))
        .chain(self.clients.iter().filter_map(|c| c.reopen_at))
        .min()
        .unwrap_or(self.now + 1);
        next = next.max(self.now);
        self.now = next;
        if self.server_reopen_at.is_some_and(|t| t <= self.now) {
            self.restart_server(false);
            self.stats.reopens += 1;
        }
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            self.deliver(id);
        }
        for i in 0..self.clients.len() {
            if self.clients[i].reopen_at.is_some_and(|t| t <= self.now) {
                let ms = 10 + self.rng.below(100) as i64;
                self.disconnect(i, ms);
                self.restart_client(i, false);
                self.stats.reopens += 1;
            }
            if self.clients[i].reconnect_at.is_some_and(|t| t <= self.now) {
                self.connect(i);
            }
            let now = self.now;
            self.clients[i].session.handle_timeout(now);
            let c = &self.clients[i];
            if c.session.needs_sync() && (c.conn.is_some() || now >= c.synced_at + NORMAL_SYNC_MS) {
                self.sync_client(i);
            }
        }
        self.server.handle_timeout(self.now);
        self.finish_steps();
        self.start_steps();
        self.flush();
    }

    /// Runs the faulty phase, heals, and runs until every replica has converged.
    pub fn run(&mut self) {
        let mut made = 0;
        let mut next_action = 0;
        while self.now < self.cfg.faulty_ms {
            let due = self.now >= next_action;
            if due && made < self.cfg.mutations * self.clients.len() {
                self.act();
                made += 1;
                next_action = self.now + 1 + self.rng.below(60) as i64;
            } else if due {
                next_action = self.cfg.faulty_ms;
            }
            self.tick(Some(next_action.max(self.now)));
        }
        self.faulty = false;
        self.faults.stop();
        for i in 0..self.clients.len() {
            self.clients[i].partitioned_until = 0;
            if self.clients[i].conn.is_none() {
                self.clients[i].reconnect_at = Some(self.now);
            }
        }
        let deadline = self.now + 120_000;
        let mut ticks = 0u64;
        while !self.converged() {
            if self.now > deadline || ticks > 2_000_000 {
                self.fail(format!("no convergence by virtual time {} ms", self.now));
            }
            self.tick(None);
            ticks += 1;
        }
    }

    fn converged(&self) -> bool {
        self.queue.is_empty()
            && self.steps.is_empty()
            && self.server_reopen_at.is_none()
            && self.clients.iter().all(|c| {
                c.conn.is_some()
                    && c.reopen_at.is_none()
                    && self.docs.iter().all(|d| {
                        let st = c.session.status(*d).expect("open");
                        let server_next = self.server.document(*d).map(|s| s.storage_range().next());
                        st.pending == 0 && Some(st.storage_next) == server_next
                    })
            })
    }

    /// Restarts at a checkpoint by client `i`'s documents since it was opened.
    fn restarts_of(&self, i: usize) -> u64 {
        let s = &self.clients[i].session;
        self.docs.iter().filter_map(|d| s.document(*d)).map(|d| d.restarts()).sum()
    }

    /// Checks every invariant after convergence.
    pub fn check(&mut self) {
        self.stats.client_restarts += (0..self.clients.len()).map(|i| self.restarts_of(i)).sum::<u64>();
        let counts = &self.faults.counts;
        for (stat, count) in [
            (&mut self.stats.disk_full, &counts.disk_full),
            (&mut self.stats.fsync_failures, &counts.fsync_failures),
            (&mut self.stats.torn_writes, &counts.torn_writes),
            (&mut self.stats.torn_tails_dropped, &counts.torn_tails_dropped),
            (&mut self.stats.read_failures, &counts.read_failures),
            (&mut self.stats.failed_puts, &counts.failed_puts),
            (&mut self.stats.unknown_puts, &counts.unknown_puts),
            (&mut self.stats.slow_appends, &counts.slow_appends),
            (&mut self.stats.slow_reads, &counts.slow_reads),
        ] {
            *stat += count.load(std::sync::atomic::Ordering::Relaxed);
        }
        for i in 0..self.clients.len() {
            self.check_applied(i, true);
        }
        for doc in &self.docs {
            let server =
                self.server.document(*doc).unwrap_or_else(|| self.fail(format!("{doc} not on the server")));
            let server_pages = crate::pages_of(server.database());
            if !crate::integrity_ok(server.database()) {
                self.fail(format!("server integrity_check failed on {doc}"));
            }
            for (i, c) in self.clients.iter().enumerate() {
                let d = c.session.document(*doc).expect("open");
                let confirms = d.confirm_stats();
                if confirms.mismatches > 0 {
                    self.fail(format!("client {i} replayed a confirmed step of {doc} to other pages"));
                }
                self.stats.confirmed_by_digest += confirms.kept;
                if crate::pages_of(d.database()) != server_pages {
                    self.fail(format!("client {i} differs from the server on {doc}"));
                }
                if !crate::integrity_ok(d.database()) {
                    self.fail(format!("client {i} integrity_check failed on {doc}"));
                }
            }
            let history = server.read_storage(server.storage_range());
            let history = history.unwrap_or_else(|e| self.fail(format!("reading {doc}'s storage: {e}")));
            for payload in &history {
                let header = pagesync::storage::decode(payload);
                let header = header.unwrap_or_else(|e| self.fail(format!("an entry of {doc}: {e}")));
                self.stats.forgetting_entries += u64::from(!header.forgotten.is_empty());
            }
            let (confirmed, rejected) = self.check_bank(*doc, server);
            self.stats.confirmed_transfers += confirmed;
            self.stats.rejected_transfers += rejected;
            self.stats.unsure_applied += self.check_unsure(*doc, server);
        }
    }

    /// Transfers whose `mutate` failed applied at most once; returns how many did.
    fn check_unsure(&self, doc: DocId, server: &ServerDocument) -> u64 {
        let conn = server.database().conn();
        let mut applied = 0;
        for (i, c) in self.clients.iter().enumerate() {
            for (_, n) in c.unsure.iter().filter(|(d, _)| *d == doc) {
                let rows: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM ledger WHERE client = ?1 AND n = ?2",
                        [i as i64, *n],
                        |r| r.get(0),
                    )
                    .unwrap_or(0);
                if rows > 1 {
                    self.fail(format!("client {i} transfer {n} on {doc} failed, and applied {rows} times"));
                }
                applied += rows as u64;
            }
        }
        applied
    }

    /// Returns the (confirmed, rejected) transfers.
    fn check_bank(&self, doc: DocId, server: &ServerDocument) -> (u64, u64) {
        let (mut confirmed, mut rejected) = (0, 0);
        let conn = server.database().conn();
        let has_acct: bool = conn
            .query_row("SELECT EXISTS(SELECT 1 FROM sqlite_schema WHERE name = 'acct')", [], |r| r.get(0))
            .expect("schema");
        if has_acct {
            let sum: i64 = conn.query_row("SELECT sum(bal) FROM acct", [], |r| r.get(0)).expect("sum");
            if sum != ACCOUNTS * START_BALANCE {
                self.fail(format!("money not conserved on {doc}: {sum}"));
            }
        }
        for (i, c) in self.clients.iter().enumerate() {
            let d = c.session.document(doc).expect("open");
            for m in c.made.iter().filter(|m| m.doc == doc) {
                let state = d.state(m.lsn).expect("state");
                let Some(n) = m.ledger else {
                    if state == MutationState::Pending {
                        self.fail(format!("client {i} mutation {} on {doc} lost", m.lsn));
                    }
                    continue;
                };
                let rows: i64 = if has_acct {
                    conn.query_row(
                        "SELECT count(*) FROM ledger WHERE client = ?1 AND n = ?2",
                        [i as i64, n],
                        |r| r.get(0),
                    )
                    .expect("ledger")
                } else {
                    0
                };
                match (&state, rows) {
                    (MutationState::Confirmed, 1) => confirmed += 1,
                    (MutationState::Rejected(_), 0) => rejected += 1,
                    _ => self.fail(format!(
                        "client {i} transfer {n} ({}) on {doc}: {state:?} but {rows} ledger rows",
                        m.lsn
                    )),
                }
            }
        }
        (confirmed, rejected)
    }
}
