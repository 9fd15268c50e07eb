//! In-process convergence: three clients and one server, with interleaved, offline and
//! conflicting bank transfers (an overdraft is rejected by a CHECK constraint). After full
//! delivery every replica's pages equal the server's byte for byte, money is conserved, every
//! mutation is confirmed or rejected exactly once, and replaying the recorded steps on an empty
//! database reproduces the storage journal byte for byte.

use std::collections::HashMap;

use pagesync::journal::Lsn;
use pagesync::storage;
use pagesync::{
    ClientDocument, MutationState, ServerDocument, SqlMutation, Statement, StepLimits, TimelineId, Value,
};
use pagesync_tests::{Rng, integrity_ok, memory_journal, pages_of, pull, push, sql};

const CLIENTS: usize = 3;
const ACCOUNTS: i64 = 10;
const START_BALANCE: i64 = 100;
const T0: i64 = 1_700_000_000_000;

fn transfer(from: i64, to: i64, amount: i64) -> Vec<u8> {
    let st = |sql: &str, id: i64| Statement {
        sql: sql.into(),
        params: vec![Value::Integer(amount), Value::Integer(id)],
    };
    SqlMutation {
        statements: vec![
            st("UPDATE acct SET bal = bal - ?1 WHERE id = ?2", from),
            st("UPDATE acct SET bal = bal + ?1 WHERE id = ?2", to),
        ],
        once: None,
    }
    .encode()
}

struct World {
    server: ServerDocument,
    clients: Vec<ClientDocument>,
    /// Every mutation any client made, for the replay.
    sent: HashMap<(TimelineId, Lsn), Vec<u8>>,
}

impl World {
    fn new(seed: u64) -> World {
        let limits = StepLimits { max_mutations: 1 + (seed % 7) as usize, ..StepLimits::default() };
        let server = ServerDocument::with_reducer(memory_journal(1), pagesync::SqlReducer::default(), limits)
            .expect("server");
        let clients = (0..CLIENTS)
            .map(|i| {
                ClientDocument::open(memory_journal(10 + i as u128), memory_journal(100 + i as u128))
                    .expect("client")
            })
            .collect();
        World { server, clients, sent: HashMap::new() }
    }

    fn mutate(&mut self, c: usize, body: Vec<u8>, time_ms: i64, seed: u64) {
        let done = self.clients[c].mutate(body, time_ms, seed).expect("mutate");
        let bytes = self.clients[c].read_pending(pagesync::journal::LsnRange::inclusive(done.lsn, done.lsn));
        self.sent.insert((self.clients[c].timeline_id(), done.lsn), bytes.expect("read").remove(0));
    }

    fn sync_all(&mut self, now: i64) {
        for c in &self.clients {
            push(c, &mut self.server);
        }
        while self.server.step(now).expect("step").is_some() {}
        for c in &mut self.clients {
            pull(c, &self.server);
        }
    }
}

fn total(c: &ClientDocument) -> i64 {
    match &c.query("SELECT sum(bal) FROM acct", &[]).expect("sum").rows[0][0] {
        Value::Integer(n) => *n,
        other => panic!("sum is {other:?}"),
    }
}

fn run(seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    let mut w = World::new(seed);
    w.mutate(
        0,
        sql("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL CHECK (bal >= 0))", vec![]),
        T0,
        0,
    );
    let fill = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {ACCOUNTS}) INSERT INTO acct SELECT i, {START_BALANCE} FROM n"
    );
    w.mutate(0, sql(&fill, vec![]), T0, 0);
    w.sync_all(T0);
    let mut online = [true; CLIENTS];
    for op in 0..ops {
        let now = T0 + op as i64;
        let c = rng.below(CLIENTS as u64) as usize;
        match rng.below(10) {
            0..=4 => {
                let (from, to) =
                    (1 + rng.below(ACCOUNTS as u64) as i64, 1 + rng.below(ACCOUNTS as u64) as i64);
                let amount = 1 + rng.below(60) as i64;
                w.mutate(c, transfer(from, to, amount), now, rng.next_u64());
            }
            5 if online[c] => push(&w.clients[c], &mut w.server),
            6 => {
                w.server.step(now).expect("step");
            }
            7 if online[c] => pull(&mut w.clients[c], &w.server),
            8 => online[c] = !online[c],
            _ => {}
        }
        // Optimistic state never breaks the invariant either.
        assert_eq!(total(&w.clients[c]), ACCOUNTS * START_BALANCE, "seed {seed} op {op}: client {c}");
    }
    w.sync_all(T0 + ops as i64);

    let server_pages = pages_of(w.server.database());
    for (i, c) in w.clients.iter().enumerate() {
        assert_eq!(c.pending_count(), 0, "seed {seed}: client {i} has pending mutations");
        assert_eq!(pages_of(c.database()), server_pages, "seed {seed}: client {i} differs from the server");
        assert_eq!(total(c), ACCOUNTS * START_BALANCE, "seed {seed}: money not conserved");
        assert!(integrity_ok(c.database()), "seed {seed}: client {i} integrity");
    }
    assert!(integrity_ok(w.server.database()));
    let (mut confirmed, mut rejected) = (0, 0);
    for (tl, lsn) in w.sent.keys() {
        let c = w.clients.iter().find(|c| c.timeline_id() == *tl).expect("client");
        match c.state(*lsn).expect("state") {
            MutationState::Confirmed => confirmed += 1,
            MutationState::Rejected(r) => {
                assert!(r.message.contains("CHECK constraint failed"), "seed {seed}: {r}");
                rejected += 1;
            }
            MutationState::Pending => panic!("seed {seed}: mutation {lsn} of {tl} lost"),
        }
    }
    assert_eq!(confirmed + rejected, w.sent.len());
    assert!(ops < 100 || rejected > 0, "seed {seed}: the workload should produce overdrafts");
    assert_replay_is_identical(&w, seed);
}

/// Re-applies every recorded step, in order, on an empty database: each storage entry must come
/// out byte for byte the same.
fn assert_replay_is_identical(w: &World, seed: u64) {
    let original = w.server.read_storage(w.server.storage_range()).expect("read storage");
    let mut replica = ServerDocument::open(memory_journal(7)).expect("replica");
    let init = replica.read_storage(replica.storage_range()).expect("read");
    assert_eq!(init[0], original[0], "seed {seed}: the first (schema) entry differs");
    for (i, payload) in original.iter().enumerate().skip(1) {
        let header = storage::decode(payload).expect("decode");
        let recorded: Vec<_> =
            header.applied.iter().map(|a| (*a, w.sent[&(a.timeline, a.lsn)].clone())).collect();
        let outcome = replica.replay_step(&recorded, &header.forgotten, header.time_ms).expect("replay");
        let replayed = replica.read_storage(pagesync::journal::LsnRange::inclusive(outcome.lsn, outcome.lsn));
        assert_eq!(
            replayed.expect("read")[0],
            *payload,
            "seed {seed}: storage entry {} differs on replay",
            i + 1
        );
    }
}

#[test]
fn bank_converges_across_seeds() {
    let seeds: u64 = std::env::var("PAGESYNC_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        run(seed, 400);
    }
}
