//! A document's history (`pagesync::history`): listing 100,000 mutations (who sent each, its
//! times, its outcome, its SQL and parameters) as the server reads them for
//! `GET /v1/docs/{id}/history`, over real files, against the same records kept in a stock
//! SQLite table (an app's own audit log, indexed by time) read the same way: all of them in
//! pages of 10,000, and the newest 1,000 by time.

use std::time::Instant;

use pagesync::history::{HistoryQuery, MAX_HISTORY_LIMIT, Origin, Pager};
use pagesync::journal::{FileJournal, FileJournalOptions, Journal, JournalId, Lsn};
use pagesync::{Mutation, ServerDocument, SqlMutation, TimelineId, Value};
use rusqlite::Connection;

use crate::Config;
use crate::report::{Better, Pair, interleave};

const T0: i64 = 1_700_000_000_000;
/// Mutations per step: a busy document's group commit.
const PER_STEP: u64 = 10;
const SUBJECTS: [&str; 4] = ["alice", "bob", "carol", "dave"];

pub fn run(cfg: &Config) -> Vec<Pair> {
    let n: u64 = if cfg.quick { 10_000 } else { 100_000 };
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut doc, steps) = build(dir.path(), n);
    let peer = peer_table(dir.path(), &mut doc);
    let all = |d: &mut ServerDocument| {
        let start = Instant::now();
        let mut pager = Pager::new(HistoryQuery::default(), None);
        while let Some(q) = pager.next_query() {
            pager.take(d.read_history(&q).expect("history"));
        }
        let page = pager.finish();
        assert_eq!(page.records.len() as u64, n + 1, "every mutation listed, the schema's too");
        start.elapsed().as_secs_f64() * 1e3
    };
    let since = T0 + (steps + 1 - 1_000 / PER_STEP) as i64;
    let newest = |d: &mut ServerDocument| {
        let start = Instant::now();
        let page = d
            .read_history(&HistoryQuery { since_ms: Some(since), ..HistoryQuery::default() })
            .expect("since");
        assert_eq!(page.records.len(), 1_000, "the newest 1,000");
        start.elapsed().as_secs_f64() * 1e3
    };
    let doc = std::cell::RefCell::new(doc);
    let (a, b) = interleave(cfg.reps, || all(&mut doc.borrow_mut()), || peer_all(&peer, n));
    let list = Pair::new(
        "history",
        &format!("list {n} mutations (who, times, outcome, SQL), pages of {MAX_HISTORY_LIMIT}, files"),
        "ms",
        Better::Lower,
        a,
        "the same records in a stock SQLite table, same pages",
        b,
        None,
    );
    let (a, b) = interleave(cfg.reps, || newest(&mut doc.borrow_mut()), || peer_since(&peer, since));
    let recent = Pair::new(
        "history",
        &format!("the newest 1,000 of {n} mutations by time (--since)"),
        "ms",
        Better::Lower,
        a,
        "the same from the stock SQLite table, indexed by time",
        b,
        None,
    );
    vec![list, recent]
}

fn file_journal(dir: &std::path::Path, name: &str, id: u128) -> Box<dyn Journal> {
    let j = FileJournal::create(dir.join(name), JournalId::from_u128(id), FileJournalOptions::default());
    Box::new(j.expect("create journal"))
}

fn mutation(i: u64) -> Vec<u8> {
    // Every 50th is too long for the CHECK: rejected, with the server's message.
    let text = if i % 50 == 49 { "y".repeat(200) } else { format!("item {i}") };
    let body = SqlMutation::one("INSERT INTO t(v) VALUES (?1)", vec![Value::Text(text)]).encode();
    Mutation { client_time_ms: T0 + i as i64, seed: i, body }.encode().expect("encode")
}

/// A document on real files whose history holds `n` mutations from four subjects, `PER_STEP`
/// per step, one step per millisecond of server time; and how many steps that took.
fn build(dir: &std::path::Path, n: u64) -> (ServerDocument, u64) {
    let mut d = ServerDocument::open(file_journal(dir, "storage", 1)).expect("document");
    let history_dir = dir.to_owned();
    d.set_history(Box::new(move |_| Ok(Some(file_journal(&history_dir, "history", 2)))));
    let schema =
        SqlMutation::one("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT CHECK (length(v) < 100))", vec![]);
    let setup = Mutation { client_time_ms: T0, seed: 0, body: schema.encode() }.encode().expect("encode");
    let admin = TimelineId::from_u128(99);
    d.receive_from(
        admin,
        Lsn::FIRST,
        vec![setup],
        &Origin { subject: "admin".into(), received_ms: Some(T0), permit: None },
    );
    d.step(T0).expect("schema").expect("a step");
    let timelines: Vec<TimelineId> = (0..4).map(|i| TimelineId::from_u128(100 + i)).collect();
    let mut next = [Lsn::FIRST; 4];
    let (mut sent, mut steps) = (0u64, 0u64);
    while sent < n {
        steps += 1;
        let now = T0 + steps as i64;
        for _ in 0..PER_STEP.min(n - sent) {
            let who = (sent % 4) as usize;
            let origin = Origin { subject: SUBJECTS[who].into(), received_ms: Some(now), permit: None };
            let taken = d.receive_from(timelines[who], next[who], vec![mutation(sent)], &origin).accepted;
            assert_eq!(taken, 1, "mutation {sent} not taken");
            next[who] = next[who].next();
            sent += 1;
        }
        d.step(now).expect("step").expect("a step");
        // Each client acknowledges the rejections it has seen, as clients do: a timeline with
        // 256 unacknowledged is held back (`MAX_TIMELINE_REJECTIONS`).
        for (tl, next) in timelines.iter().zip(next) {
            if let Some(through) = next.prev() {
                d.forget_rejections(*tl, through);
            }
        }
    }
    (d, steps)
}

/// The peer: the same records (every column the history lists) in a stock SQLite table.
fn peer_table(dir: &std::path::Path, d: &mut ServerDocument) -> Connection {
    let conn = Connection::open(dir.join("audit.sqlite")).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE audit(id INTEGER PRIMARY KEY, storage_lsn INTEGER, timeline BLOB, timeline_lsn INTEGER,
           subject TEXT, client_ms INTEGER, received_ms INTEGER, applied_ms INTEGER, outcome TEXT,
           message TEXT, sql TEXT, params TEXT);
         CREATE INDEX audit_applied ON audit(applied_ms);",
    )
    .expect("schema");
    let tx = conn.unchecked_transaction().expect("tx");
    let mut pager = Pager::new(HistoryQuery::default(), None);
    while let Some(q) = pager.next_query() {
        pager.take(d.read_history(&q).expect("history"));
    }
    for r in pager.finish().records.into_iter().filter(|r| r.subject != "admin") {
        let (outcome, message) = match r.outcome {
            pagesync::history::HistoryOutcome::Applied => ("applied".to_owned(), None),
            pagesync::history::HistoryOutcome::Rejected { code, message } => (code, Some(message)),
        };
        let params: Vec<_> = r.statements[0].params.iter().map(Value::to_json).collect();
        tx.execute(
            "INSERT INTO audit(storage_lsn, timeline, timeline_lsn, subject, client_ms, received_ms, applied_ms,
               outcome, message, sql, params) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            rusqlite::params![
                r.storage_lsn.get() as i64,
                &r.timeline.0[..],
                r.timeline_lsn.get() as i64,
                r.subject,
                r.client_ms,
                r.received_ms,
                r.applied_ms,
                outcome,
                message,
                r.statements[0].sql,
                serde_json::Value::Array(params).to_string(),
            ],
        )
        .expect("insert");
    }
    tx.commit().expect("commit");
    conn
}

type PeerRow = (i64, i64, Vec<u8>, i64, String, i64, i64, i64, String, Option<String>, String, String);

fn peer_rows(stmt: &mut rusqlite::Statement<'_>, params: impl rusqlite::Params) -> Vec<PeerRow> {
    stmt.query_map(params, |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
            r.get(8)?,
            r.get(9)?,
            r.get(10)?,
            r.get(11)?,
        ))
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

const PEER_COLUMNS: &str = "id, storage_lsn, timeline, timeline_lsn, subject, client_ms, received_ms, applied_ms, \
                            outcome, message, sql, params";

fn peer_all(conn: &Connection, n: u64) -> f64 {
    let start = Instant::now();
    let sql = format!("SELECT {PEER_COLUMNS} FROM audit WHERE id > ?1 ORDER BY id LIMIT {MAX_HISTORY_LIMIT}");
    let mut stmt = conn.prepare_cached(&sql).expect("prepare");
    let (mut after, mut count) = (0i64, 0u64);
    loop {
        let rows = peer_rows(&mut stmt, [after]);
        let Some(last) = rows.last() else { break };
        after = last.0;
        count += rows.len() as u64;
    }
    assert_eq!(count, n);
    start.elapsed().as_secs_f64() * 1e3
}

fn peer_since(conn: &Connection, since: i64) -> f64 {
    let start = Instant::now();
    let sql =
        format!("SELECT {PEER_COLUMNS} FROM audit WHERE applied_ms >= ?1 ORDER BY applied_ms, id LIMIT 1000");
    let mut stmt = conn.prepare_cached(&sql).expect("prepare");
    assert_eq!(peer_rows(&mut stmt, [since]).len(), 1_000);
    start.elapsed().as_secs_f64() * 1e3
}
