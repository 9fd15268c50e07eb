//! Differential SQL tests: every script in `tests/sql/` runs through pagesync (a client's
//! optimistic state, then the server, then the client after sync) and through stock SQLite on
//! a temporary file; every query must give the same rows everywhere. Each script runs twice:
//! with the client's storage in memory, and in files as a replica keeps it, where its SQLite
//! reads committed pages in place in the journal's map (`xFetch`), across segments of 1 MiB.
//!
//! Script format: blocks introduced by `-- exec` (one mutation, may hold several statements),
//! `-- reject` (a mutation that must fail in stock SQLite and be rejected by pagesync with the
//! same message), `-- query` (one read-only statement whose rows are compared) or `-- vacuum`.

use std::path::Path;

use pagesync::{ClientDocument, MutationState, ServerDocument, Value};
use pagesync_tests::{drain, integrity_ok, memory_journal, pages_of, pull, push, replica_storage, sql};
use rusqlite::Connection;

const T0: i64 = 1_700_000_000_000;
/// A small page cache (pages) on both sides, so big sorts spill to temp files.
const CACHE_PAGES: i64 = 64;

enum Block {
    Exec(String),
    Reject(String),
    Query(String),
    Vacuum,
}

fn parse(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut kind: Option<&str> = None;
    let mut body = String::new();
    let mut flush = |kind: Option<&str>, body: &mut String| {
        let sql = std::mem::take(body).trim().to_owned();
        match kind {
            Some("exec") => blocks.push(Block::Exec(sql)),
            Some("query") => blocks.push(Block::Query(sql)),
            Some("reject") => blocks.push(Block::Reject(sql)),
            Some("vacuum") => blocks.push(Block::Vacuum),
            Some(other) => panic!("unknown block -- {other}"),
            None => assert!(sql.is_empty(), "text before the first block"),
        }
    };
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("-- ") {
            flush(kind, &mut body);
            kind = Some(k.trim());
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(kind, &mut body);
    blocks
}

fn stock_rows(conn: &Connection, sql: &str) -> Vec<Vec<Value>> {
    let mut stmt = conn.prepare(sql).expect("prepare");
    let n = stmt.column_count();
    let rows = stmt.query_map([], |r| {
        (0..n).map(|i| r.get_ref(i).map(Value::from)).collect::<rusqlite::Result<Vec<_>>>()
    });
    rows.expect("query").collect::<rusqlite::Result<Vec<_>>>().expect("rows")
}

fn run_script(name: &str) {
    run_script_with(name, false);
    run_script_with(name, true);
}

fn run_script_with(name: &str, files: bool) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql").join(name);
    let text = std::fs::read_to_string(&path).expect("read script");
    let name = &format!("{name} (client storage in {})", if files { "files" } else { "memory" });
    let dir = tempfile::tempdir().expect("tempdir");
    let stock = Connection::open(dir.path().join("stock.sqlite")).expect("open stock");
    stock.execute_batch(&format!("PRAGMA cache_size = {CACHE_PAGES};")).expect("pragma");
    let mut server = ServerDocument::open(memory_journal(1)).expect("server");
    let storage =
        if files { replica_storage(&dir.path().join("storage"), 2, 1 << 20) } else { memory_journal(2) };
    let mut client = ClientDocument::open(storage, memory_journal(3)).expect("client");
    for db in [server.database(), client.database()] {
        db.conn().execute_batch(&format!("PRAGMA cache_size = {CACHE_PAGES};")).expect("pragma");
    }
    pull(&mut client, &server);
    for (i, block) in parse(&text).into_iter().enumerate() {
        match block {
            Block::Exec(s) => {
                stock.execute_batch(&s).unwrap_or_else(|e| panic!("{name} block {i}: stock: {e}"));
                let done = client.mutate(sql(&s, vec![]), T0, i as u64).expect("mutate");
                assert_eq!(done.local, Ok(()), "{name} block {i}: local run");
            }
            Block::Reject(s) => {
                let stock_err = stock.execute_batch(&s).expect_err("stock SQLite must fail").to_string();
                let done = client.mutate(sql(&s, vec![]), T0, i as u64).expect("mutate");
                push(&client, &mut server);
                drain(&mut server, T0);
                pull(&mut client, &server);
                match client.state(done.lsn).expect("state") {
                    MutationState::Rejected(r) => assert_eq!(r.message, stock_err, "{name} block {i}"),
                    other => panic!("{name} block {i}: expected a rejection, got {other:?}"),
                }
            }
            Block::Vacuum => {
                stock.execute_batch("VACUUM").expect("stock vacuum");
                push(&client, &mut server);
                drain(&mut server, T0);
                server.vacuum(0).expect("vacuum");
                pull(&mut client, &server);
            }
            Block::Query(q) => {
                let expected = stock_rows(&stock, &q);
                let local = client.query(&q, &[]).expect("client query").rows;
                assert_eq!(local, expected, "{name} block {i} (optimistic client): {q}");
                push(&client, &mut server);
                drain(&mut server, T0);
                pull(&mut client, &server);
                let on_server = stock_rows(server.database().conn(), &q);
                assert_eq!(on_server, expected, "{name} block {i} (server): {q}");
                let synced = client.query(&q, &[]).expect("client query").rows;
                assert_eq!(synced, expected, "{name} block {i} (synced client): {q}");
            }
        }
    }
    assert_eq!(client.pending_count(), 0);
    assert_eq!(pages_of(client.database()), pages_of(server.database()), "{name}: replicas differ");
    assert!(integrity_ok(server.database()) && integrity_ok(client.database()));
}

#[test]
fn ddl_joins_indexes() {
    run_script("ddl_joins_indexes.sql");
}

#[test]
fn triggers() {
    run_script("triggers.sql");
}

#[test]
fn big_sort_spills_past_the_page_cache() {
    run_script("big_sort.sql");
}

#[test]
fn blobs_larger_than_a_page_and_vacuum() {
    run_script("blobs.sql");
}

#[test]
fn ten_megabyte_table() {
    run_script("ten_mb.sql");
}
