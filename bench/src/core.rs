//! The core, in process: local writes against stock SQLite, the server's batched apply, and a
//! rebase of many pending mutations over a long history.

use std::time::{Duration, Instant};

use pagesync::journal::{FileJournal, FileJournalOptions, Journal, JournalId, MemoryJournal};
use pagesync::{
    Budget, ClientDocument, ServerDocument, SqlMutation, SqlReducer, StepLimits, TimelineId, Value,
};
use rusqlite::Connection;

use crate::Config;
use crate::report::{Better, Pair, Target, interleave, per_second};

const T0: i64 = 1_700_000_000_000;
const SCHEMA: &str = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)";
const INSERT: &str = "INSERT INTO t(v) VALUES (?1)";

fn row(i: u64) -> Vec<u8> {
    SqlMutation::one(INSERT, vec![Value::Text(format!("row {i} {}", "x".repeat(40)))]).encode()
}

fn file_journal(dir: &std::path::Path, name: &str, id: u128) -> Box<dyn Journal> {
    let j = FileJournal::create(dir.join(name), JournalId::from_u128(id), FileJournalOptions::default());
    Box::new(j.expect("create journal"))
}

/// Stock SQLite at the durability of a pagesync write: WAL, fsync on every commit.
fn stock_db(dir: &std::path::Path) -> Connection {
    let conn = Connection::open(dir.join("stock.sqlite")).expect("open");
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;").expect("pragmas");
    conn.execute_batch(SCHEMA).expect("schema");
    conn
}

fn stock_insert(conn: &Connection, i: u64) {
    conn.execute(INSERT, [format!("row {i} {}", "x".repeat(40))]).expect("insert");
}

fn mem(id: u128) -> Box<dyn Journal> {
    Box::new(MemoryJournal::new(JournalId::from_u128(id)))
}

pub fn run(cfg: &Config) -> Vec<Pair> {
    vec![local_write(cfg), budget_cost(cfg), budget_hold(cfg), server_apply(cfg), rebase(cfg)]
}

/// Microseconds per single-row mutation on a client over memory journals (no fsync, so the
/// sandbox's own cost is not lost in the disk's) with `budget`.
fn memory_write_micros(n: u64, budget: Budget) -> f64 {
    let mut c = ClientDocument::open(mem(1), mem(2)).expect("client");
    c.set_budget(budget).expect("budget");
    write_micros(c, n)
}

/// Microseconds per single-row mutation, `n` of them, on a fresh client (the schema first).
fn write_micros(mut c: ClientDocument, n: u64) -> f64 {
    c.mutate(SqlMutation::one(SCHEMA, vec![]).encode(), T0, 0).expect("schema");
    let start = Instant::now();
    for i in 0..n {
        c.mutate(row(i), T0, i).expect("mutate");
    }
    micros_per_op(n, start.elapsed())
}

/// What the mutation budget costs a local single-row write: the default budget (progress
/// handler, page cap, temp cap) against none at all, memory journals on both sides.
fn budget_cost(cfg: &Config) -> Pair {
    let n = local_writes(cfg) * 10;
    let (a, b) = interleave(
        cfg.reps,
        || memory_write_micros(n, Budget::default()),
        || memory_write_micros(n, Budget::UNLIMITED),
    );
    Pair::new(
        "core",
        "local single-row write, memory journals, with the mutation budget",
        "us/write",
        Better::Lower,
        a,
        "the same without any budget (no progress handler, no caps)",
        b,
        Some(Target::RatioAtMost(1.03)),
    )
}

/// An endless recursive query: it runs until a budget stops it.
const ENDLESS: &str =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";

/// How long a budget-exhausting mutation holds its document on the server (one step that
/// rejects it, in milliseconds), against stock SQLite running the same query until a progress
/// handler stops it after the same number of VM instructions.
fn budget_hold(cfg: &Config) -> Pair {
    let ours = || {
        let mut server = ServerDocument::open(mem(1)).expect("server");
        let m = pagesync::Mutation {
            client_time_ms: T0,
            seed: 1,
            body: SqlMutation::one(ENDLESS, vec![]).encode(),
        };
        server.receive(TimelineId([1; 16]), pagesync::journal::Lsn::FIRST, vec![m.encode().expect("encode")]);
        let start = Instant::now();
        let outcome = server.step(T0).expect("step").expect("a step");
        assert_eq!(outcome.rejected, 1, "the endless query is rejected");
        start.elapsed().as_secs_f64() * 1e3
    };
    let peer = || {
        let mut conn = Connection::open_in_memory().expect("open");
        let ops = pagesync::sandbox::PROGRESS_INTERVAL_OPS;
        let mut left = pagesync::sandbox::DEFAULT_MAX_VM_STEPS as i64;
        conn.progress_handler(
            ops,
            Some(move || {
                left -= i64::from(ops);
                left <= 0
            }),
        )
        .expect("progress handler");
        let start = Instant::now();
        assert!(conn.query_row(ENDLESS, [], |_| Ok(())).is_err(), "interrupted");
        start.elapsed().as_secs_f64() * 1e3
    };
    let (a, b) = interleave(cfg.reps, ours, peer);
    Pair::new(
        "core",
        "a budget-exhausting mutation holds its document (one server step)",
        "ms",
        Better::Lower,
        a,
        "stock SQLite, the same query stopped after the same VM instructions",
        b,
        Some(Target::RatioAtMost(1.5)),
    )
}

fn micros_per_op(n: u64, elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e6 / n as f64
}

/// Writes per repetition of the local-write workload.
pub(crate) fn local_writes(cfg: &Config) -> u64 {
    if cfg.quick { 50 } else { 400 }
}

/// Microseconds per single-row mutation on a fresh client with file journals: the local-write
/// workload, also run against libsql (`libsql.rs`).
pub(crate) fn local_write_micros(n: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = ClientDocument::open(file_journal(dir.path(), "s", 1), file_journal(dir.path(), "t", 2))
        .expect("client");
    write_micros(c, n)
}

/// A single-row mutation on a client (file journals, fdatasync per write) against a one-row
/// transaction in stock SQLite, WAL mode with `synchronous = FULL` (fsync per commit).
fn local_write(cfg: &Config) -> Pair {
    let n = local_writes(cfg);
    let ours = || local_write_micros(n);
    let peer = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = stock_db(dir.path());
        let start = Instant::now();
        for i in 0..n {
            stock_insert(&conn, i);
        }
        micros_per_op(n, start.elapsed())
    };
    let (a, b) = interleave(cfg.reps, ours, peer);
    let peer_name = "stock SQLite, WAL, synchronous=FULL, 1-row txn";
    Pair::new(
        "core",
        "local single-row write",
        "us/write",
        Better::Lower,
        a,
        peer_name,
        b,
        Some(Target::RatioAtMost(1.5)),
    )
}

/// The server applying queued single-row mutations in batched steps (file journal, one fsync
/// per step) against stock SQLite running the same inserts in 1,000-row transactions.
fn server_apply(cfg: &Config) -> Pair {
    let n = if cfg.quick { 2_000 } else { 20_000 };
    let bodies: Vec<Vec<u8>> = (0..n).map(row).collect();
    let ours = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = ServerDocument::with_reducer(
            file_journal(dir.path(), "s", 1),
            SqlReducer::default(),
            StepLimits::default(),
        )
        .expect("server");
        let tl = TimelineId::from_u128(5);
        let mutation =
            |body: &Vec<u8>| pagesync::Mutation { client_time_ms: T0, seed: 0, body: body.clone() };
        let schema = pagesync::Mutation {
            client_time_ms: T0,
            seed: 0,
            body: SqlMutation::one(SCHEMA, vec![]).encode(),
        };
        let mut entries = vec![schema.encode().expect("encode")];
        entries.extend(bodies.iter().map(|b| mutation(b).encode().expect("encode")));
        s.receive(tl, pagesync::journal::Lsn::FIRST, entries);
        let start = Instant::now();
        while s.step(T0).expect("step").is_some() {}
        per_second(n, start.elapsed())
    };
    let peer = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = stock_db(dir.path());
        let start = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
            conn.execute_batch("BEGIN").expect("begin");
            for i in chunk {
                stock_insert(&conn, *i);
            }
            conn.execute_batch("COMMIT").expect("commit");
        }
        per_second(n, start.elapsed())
    };
    let (a, b) = interleave(cfg.reps, ours, peer);
    let peer_name = "stock SQLite, same inserts, 1,000 per txn";
    Pair::new(
        "core",
        "server batched apply, single-row mutations",
        "mutations/s",
        Better::Higher,
        a,
        peer_name,
        b,
        Some(Target::OursAtLeast(50_000.0)),
    )
}

/// A client with 1,000 pending mutations receives one new entry on top of a 15,000-entry
/// history and rebases. The peer re-runs the same 1,000 mutations on stock SQLite in one
/// transaction: the floor any rebase must pay.
fn rebase(cfg: &Config) -> Pair {
    let (history, pending) = if cfg.quick { (1_500, 100) } else { (15_000, 1_000) };
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = StepLimits { max_mutations: 1, ..StepLimits::default() };
    let mut server = ServerDocument::with_reducer(mem(1), SqlReducer::default(), limits).expect("server");
    let mut other = ClientDocument::open(mem(2), mem(3)).expect("writer");
    other.mutate(SqlMutation::one(SCHEMA, vec![]).encode(), T0, 0).expect("schema");
    for i in 0..history {
        other.mutate(row(i), T0, i).expect("mutate");
    }
    let mut a =
        ClientDocument::open(file_journal(dir.path(), "s", 4), file_journal(dir.path(), "t", 5)).expect("a");
    deliver(&mut other, &mut server, &mut a);
    assert!(a.storage_range().len() > history, "BUG: the history was not built");
    for i in 0..pending {
        a.mutate(row(i), T0, i).expect("pending");
    }
    let mut k = history;
    let mut ours = || {
        k += 1;
        other.mutate(row(k), T0, k).expect("mutate");
        let range = other.pending_range();
        server.receive(other.timeline_id(), range.first(), other.read_pending(range).expect("read"));
        let outcome = server.step(T0).expect("step").expect("applied");
        let entry = server.read_storage(pagesync::journal::LsnRange::inclusive(outcome.lsn, outcome.lsn));
        let entry = entry.expect("read");
        let start = Instant::now();
        a.receive_storage(outcome.lsn, &entry).expect("rebase");
        start.elapsed().as_secs_f64() * 1e3
    };
    let stock = stock_db(dir.path());
    let peer = || {
        let start = Instant::now();
        stock.execute_batch("BEGIN").expect("begin");
        for i in 0..pending {
            stock_insert(&stock, i);
        }
        stock.execute_batch("ROLLBACK").expect("rollback");
        start.elapsed().as_secs_f64() * 1e3
    };
    let (x, y) = interleave(cfg.reps, &mut ours, peer);
    assert_eq!(a.pending_count(), pending as usize, "BUG: the pending mutations stayed pending");
    let name = format!("rebase {pending} pending over {history} entries");
    Pair::new(
        "core",
        &name,
        "ms",
        Better::Lower,
        x,
        "stock SQLite re-running them",
        y,
        Some(Target::OursAtMost(50.0)),
    )
}

fn deliver(writer: &mut ClientDocument, server: &mut ServerDocument, reader: &mut ClientDocument) {
    let range = writer.pending_range();
    server.receive(writer.timeline_id(), range.first(), writer.read_pending(range).expect("read"));
    while server.step(T0).expect("step").is_some() {}
    let all = server.storage_range();
    reader.receive_storage(all.first(), &server.read_storage(all).expect("read")).expect("receive");
}
