//! Opening a document that may not exist, against a real server: a replica opened without
//! `create` is told `not_found` and makes nothing on the server, until it writes; its write
//! then creates the document (the subscription asks again, to create), and another client
//! opened the same way reads it. A replica that holds nothing can be discarded; one that holds
//! data cannot.

mod support;

use std::time::Duration;

use pagesync::DocId;
use pagesync::protocol::codes;
use pagesync_client::{Client, ClientError, OpenOptions};
use support::start_server;

#[test]
fn a_replica_opened_without_create_is_not_found_until_it_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, addr, stop, server) = start_server(dir.path());
    let url = format!("ws://{addr}/v1/sync");
    let _guard = rt.enter();
    let doc = DocId::from_u128(0x0e11);
    let only_if_there = OpenOptions { create: false, ..OpenOptions::default() };
    let on_server = || dir.path().join("server").join(&doc.to_string()[..2]).join(doc.to_string()).exists();

    let a = Client::connect(&url, "", dir.path().join("a")).expect("a");
    let da = rt.block_on(a.open_with(doc, only_if_there)).expect("open a");
    match rt.block_on(da.sync(Duration::from_secs(10))) {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, codes::NOT_FOUND),
        other => panic!("a missing document synced: {other:?}"),
    }
    assert!(!on_server(), "a subscription without create made the document");
    // Asked again (a sync after the answer): still not found, still nothing made.
    assert!(rt.block_on(da.sync(Duration::from_secs(10))).is_err());
    assert!(!on_server());

    // Its first write creates it: the subscription goes again, asking to.
    da.execute("CREATE TABLE t(x)", vec![]).expect("write");
    da.execute("INSERT INTO t VALUES (1)", vec![]).expect("write");
    rt.block_on(da.sync(Duration::from_secs(10))).expect("the write created the document");
    assert!(on_server());

    let b = Client::connect(&url, "", dir.path().join("b")).expect("b");
    let db = rt.block_on(b.open_with(doc, only_if_there)).expect("open b");
    rt.block_on(db.sync(Duration::from_secs(10))).expect("b syncs the document that exists");
    let rows = db.query("SELECT x FROM t", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![pagesync::Value::Integer(1)]]);

    // A replica that holds nothing goes with `discard_if_empty`; one holding a write stays.
    let empty = DocId::from_u128(0x0e12);
    let de = rt.block_on(a.open_with(empty, only_if_there)).expect("open");
    assert!(rt.block_on(de.sync(Duration::from_secs(10))).is_err());
    assert!(a.discard_if_empty(empty).expect("discard"), "an empty replica was kept");
    assert!(!dir.path().join("a").join(empty.to_string()).exists());
    assert!(de.execute("CREATE TABLE t(x)", vec![]).is_err(), "a discarded replica took a write");
    assert!(!a.discard_if_empty(doc).expect("discard"), "a replica holding data was discarded");
    assert!(dir.path().join("a").join(doc.to_string()).exists());
    drop(de);

    drop((da, db, a, b));
    let _ = stop.send(());
    rt.block_on(server).expect("join").expect("server");
}
