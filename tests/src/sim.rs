//! A deterministic simulator: N clients, M documents and one server, driven through the real
//! `ClientSession` / `ServerSession` and documents, over an in-memory network with a seeded RNG
//! and a virtual clock. Every frame is encoded and decoded.
//!
//! Faults while `faulty`: dropped, duplicated, delayed (hence reordered) frames, disconnects,
//! partitions, client crash-restart and server crash-restart (in-memory state is lost; journal
//! entries, which every backend makes durable before acknowledging, are kept). Then the network
//! heals and the run must converge.
//!
//! Everything random comes from one `Rng(seed)`, and nothing reads a real clock, so a seed
//! replays exactly.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};

use pagesync::journal::Lsn;
use pagesync::protocol::{ClientSession, ConnId, Message, ServerSession};
use pagesync::{
    ClientDocument, Compaction, DocId, MutationState, ServerDocument, SqlMutation, Statement, Value,
};

use crate::{Rng, SharedJournal};

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
}

impl Config {
    pub fn from_seed(seed: u64) -> Config {
        let mut r = Rng(seed ^ 0x5eed);
        Config {
            clients: 2 + r.below(3) as usize,
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
        }
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
    journals: BTreeMap<DocId, (SharedJournal, SharedJournal)>,
    conn: Option<ConnId>,
    reconnect_at: Option<i64>,
    partitioned_until: i64,
    made: Vec<Made>,
    next_ledger: i64,
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
    server_journals: Arc<Mutex<HashMap<DocId, SharedJournal>>>,
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

/// What happened in a run, to show the faults and outcomes were real.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub server_crashes: u64,
    pub client_crashes: u64,
    pub disconnects: u64,
    pub partitions: u64,
    pub confirmed_transfers: u64,
    pub rejected_transfers: u64,
    /// Clients that fell behind the server's history and restarted at a checkpoint.
    pub client_restarts: u64,
    /// Mutations refused while a client downloaded a checkpoint.
    pub restarting_refusals: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.server_crashes += o.server_crashes;
        self.client_crashes += o.client_crashes;
        self.disconnects += o.disconnects;
        self.partitions += o.partitions;
        self.confirmed_transfers += o.confirmed_transfers;
        self.rejected_transfers += o.rejected_transfers;
        self.client_restarts += o.client_restarts;
        self.restarting_refusals += o.restarting_refusals;
    }
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

fn open_server(
    journals: Arc<Mutex<HashMap<DocId, SharedJournal>>>,
    compaction: Option<Compaction>,
) -> ServerSession {
    ServerSession::new(Box::new(move |doc: DocId| {
        let j = journals
            .lock()
            .expect("lock")
            .entry(doc)
            .or_insert_with(|| SharedJournal::new(u128::from_be_bytes(doc.0)))
            .clone();
        let mut d = ServerDocument::open(j.boxed())?;
        d.set_compaction(compaction);
        Ok(d)
    }))
}

fn open_client(journals: &BTreeMap<DocId, (SharedJournal, SharedJournal)>) -> ClientSession {
    let mut s = ClientSession::new("sim");
    for (doc, (storage, timeline)) in journals {
        s.add_document(
            *doc,
            ClientDocument::open(storage.boxed(), timeline.boxed()).expect("open client document"),
        );
    }
    s
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let cfg = Config::from_seed(seed);
        let server_journals = Arc::new(Mutex::new(HashMap::new()));
        let docs: Vec<DocId> = (0..cfg.docs).map(|d| DocId::from_u128(1000 + d as u128)).collect();
        let clients = (0..cfg.clients)
            .map(|c| {
                let journals = docs
                    .iter()
                    .enumerate()
                    .map(|(d, doc)| {
                        let base = 10_000 * (c as u128 + 1) + 10 * d as u128;
                        (*doc, (SharedJournal::new(base), SharedJournal::new(base + 1)))
                    })
                    .collect();
                let session = open_client(&journals);
                Client {
                    session,
                    journals,
                    conn: None,
                    reconnect_at: Some(0),
                    partitioned_until: 0,
                    made: vec![],
                    next_ledger: 0,
                }
            })
            .collect();
        Sim {
            seed,
            rng: Rng(seed),
            now: 0,
            server: open_server(server_journals.clone(), cfg.compaction),
            server_journals,
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
                    if code == pagesync::protocol::codes::STORAGE {
                        self.fail(format!("a server step failed: {message}"));
                    }
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
            Dest::Server(conn) => self.server.handle_frame(conn, self.now, &bytes),
            Dest::Client(i, conn) if self.clients[i].conn == Some(conn) => {
                let now = self.now;
                if let Err(e) = self.clients[i].session.handle_frame(now, &bytes) {
                    self.fail(format!("client {i} failed to apply a frame: {e}"));
                }
            }
            Dest::Client(..) => {} // for a connection that is gone
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
                match self.clients[i].session.mutate(doc, body, T0 + self.now, seed) {
                    Ok(s) => self.clients[i].made.push(Made { doc, lsn: s.lsn, ledger }),
                    // Downloading a checkpoint: the app is told to try again; nothing was made.
                    Err(pagesync::Error::Restarting) => self.stats.restarting_refusals += 1,
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
                self.stats.client_restarts += self.restarts_of(i);
                self.clients[i].session = open_client(&self.clients[i].journals);
                self.stats.client_crashes += 1;
            }
            _ => {
                // Server crash: sessions, queues and documents in memory are gone.
                for c in 0..self.clients.len() {
                    let ms = 10 + self.rng.below(500) as i64;
                    self.disconnect(c, ms);
                }
                self.server = open_server(self.server_journals.clone(), self.cfg.compaction);
                self.stats.server_crashes += 1;
            }
        }
    }

    /// One step of virtual time: jump to the next event and handle everything due.
    fn tick(&mut self, next_action: Option<i64>) {
        let mut next = [self.queue.peek().map(|Reverse((t, _))| *t), self.server.poll_timeout(), next_action]
            .into_iter()
            .flatten()
            .chain(self.clients.iter().filter_map(|c| c.session.poll_timeout()))
            .chain(self.clients.iter().filter_map(|c| c.reconnect_at))
            .min()
            .unwrap_or(self.now + 1);
        next = next.max(self.now);
        self.now = next;
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > self.now {
                break;
            }
            self.queue.pop();
            self.deliver(id);
        }
        for i in 0..self.clients.len() {
            if self.clients[i].reconnect_at.is_some_and(|t| t <= self.now) {
                self.connect(i);
            }
            let now = self.now;
            self.clients[i].session.handle_timeout(now);
        }
        self.server.handle_timeout(self.now);
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
            && self.clients.iter().all(|c| {
                c.conn.is_some()
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
        for doc in &self.docs {
            let server =
                self.server.document(*doc).unwrap_or_else(|| self.fail(format!("{doc} not on the server")));
            let server_pages = crate::pages_of(server.database());
            if !crate::integrity_ok(server.database()) {
                self.fail(format!("server integrity_check failed on {doc}"));
            }
            for (i, c) in self.clients.iter().enumerate() {
                let d = c.session.document(*doc).expect("open");
                if crate::pages_of(d.database()) != server_pages {
                    self.fail(format!("client {i} differs from the server on {doc}"));
                }
                if !crate::integrity_ok(d.database()) {
                    self.fail(format!("client {i} integrity_check failed on {doc}"));
                }
            }
            let (confirmed, rejected) = self.check_bank(*doc, server);
            self.stats.confirmed_transfers += confirmed;
            self.stats.rejected_transfers += rejected;
        }
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
