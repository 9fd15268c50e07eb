//! Group commit of `Document::execute` against a real server over websockets, with file
//! journals: calls from many threads share fsyncs, each call still gets its own answer (a
//! refused statement fails only itself, never the writes that shared its group), every
//! acknowledged write is confirmed by the server exactly once, and a replica reopened after
//! the client is gone holds them all.

mod support;

use std::time::Duration;

use pagesync::{DocId, MutationState, Value};
use support::start_server;

const THREADS: i64 = 8;
const WRITES: i64 = 60;

#[test]
fn concurrent_executes_share_fsyncs_and_are_answered_one_by_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, addr, stop, server) = start_server(dir.path());
    let doc: DocId = "00000000000000000000000000000c0c".parse().expect("doc");
    let url = format!("ws://{addr}/v1/sync");
    let replica = dir.path().join("client");

    let _guard = rt.enter();
    let client = pagesync_client::Client::connect(&url, "", &replica).expect("client");
    let d = client.open(doc).expect("open");
    d.execute("CREATE TABLE t(thread INTEGER, n INTEGER, UNIQUE(thread, n))", vec![]).expect("ddl");

    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let d = d.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                for n in 0..WRITES {
                    let args = vec![Value::Integer(thread), Value::Integer(n)];
                    answers.push((n, d.execute("INSERT INTO t VALUES (?1, ?2)", args)));
                    // Thread 0 also sends what the sandbox refuses, in the middle of the groups.
                    if thread == 0 && n % 10 == 0 {
                        let refused = d.execute("PRAGMA cache_size = 1", vec![]);
                        assert!(refused.is_err(), "a refused statement was accepted: {refused:?}");
                    }
                }
                answers
            })
        })
        .collect();
    let mut lsns = Vec::new();
    for t in threads {
        for (n, answer) in t.join().expect("writer thread") {
            let submitted = answer.unwrap_or_else(|e| panic!("write {n} failed: {e}"));
            assert_eq!(submitted.local, Ok(()), "write {n}");
            lsns.push(submitted.lsn);
        }
    }
    let stats = client.write_stats();
    eprintln!("{stats:?}");
    let total = (THREADS * WRITES) as usize;
    assert_eq!(stats.writes as usize, 1 + total + (WRITES as usize / 10), "{stats:?}");
    assert!(stats.commits < stats.writes, "no two concurrent calls shared a commit: {stats:?}");
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns.len(), total, "two writes got one LSN");

    rt.block_on(d.sync(Duration::from_secs(30))).expect("sync");
    for lsn in &lsns {
        assert_eq!(d.state(*lsn).expect("state"), MutationState::Confirmed, "write {lsn}");
    }
    let count = d.query("SELECT count(*), count(DISTINCT thread * 1000 + n) FROM t", &[]).expect("query");
    assert_eq!(count.rows, vec![vec![Value::Integer(total as i64), Value::Integer(total as i64)]]);

    // Acknowledged means durable: a new client on the same replica, before any sync, has them.
    drop(d);
    drop(client);
    let _ = stop.send(());
    rt.block_on(server).expect("join").expect("server ran");
    let client = pagesync_client::Client::connect("ws://127.0.0.1:9/v1/sync", "", &replica).expect("reopen");
    let d = client.open(doc).expect("open");
    let count = d.query("SELECT count(*) FROM t", &[]).expect("query");
    assert_eq!(count.rows, vec![vec![Value::Integer(total as i64)]]);
}

#[test]
fn normal_durability_answers_at_once_and_still_confirms_every_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, addr, _stop, _server) = start_server(dir.path());
    let _guard = rt.enter();
    let client = pagesync_client::Client::connect(&format!("ws://{addr}/v1/sync"), "", dir.path().join("c"))
        .expect("client");
    client.set_durability(pagesync::Durability::Normal).expect("normal");
    let d = client.open("00000000000000000000000000000d0d".parse().expect("doc")).expect("open");
    d.execute("CREATE TABLE t(x INTEGER)", vec![]).expect("ddl");
    let lsns: Vec<_> = (0..300)
        .map(|i| d.execute("INSERT INTO t VALUES (?1)", vec![Value::Integer(i)]).expect("write").lsn)
        .collect();
    rt.block_on(d.sync(Duration::from_secs(30))).expect("sync");
    for lsn in lsns {
        assert_eq!(d.state(lsn).expect("state"), MutationState::Confirmed, "write {lsn}");
    }
    let count = d.query("SELECT count(*) FROM t", &[]).expect("query");
    assert_eq!(count.rows, vec![vec![Value::Integer(300)]]);
}
