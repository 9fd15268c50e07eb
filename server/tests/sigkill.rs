//! The real `pagesync-server` binary is killed with SIGKILL in the middle of a write stream and
//! restarted on the same data. Every mutation a client saw confirmed is still there, and every
//! pending one is applied exactly once.

use std::time::Duration;

use pagesync::{DocId, MutationState, Value};
use pagesync_client::Client;

const WRITES: i64 = 400;
const KILL_AFTER: i64 = 200;
const WAIT: Duration = Duration::from_secs(20);

mod support;

use support::{free_port, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_confirmed_write_and_applies_pending_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let journal = format!("file://{}", dir.path().join("server").display());
    let mut server = start(port, &journal);
    let client = Client::connect(&url, "", dir.path().join("client")).expect("client");
    let doc = client.open(DocId::from_u128(0x5151)).expect("open");
    doc.execute("CREATE TABLE w(seq INTEGER NOT NULL)", vec![]).expect("ddl");
    doc.sync(WAIT).await.expect("schema synced");

    let mut lsns = Vec::new();
    for seq in 0..WRITES {
        lsns.push(
            doc.execute("INSERT INTO w(seq) VALUES (?1)", vec![Value::Integer(seq)]).expect("write").lsn,
        );
        if seq % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if seq == KILL_AFTER {
            // Mid-stream: once the server has confirmed something, with more still in flight.
            let first = lsns[0];
            let deadline = tokio::time::Instant::now() + WAIT;
            while doc.state(first).expect("state") != MutationState::Confirmed {
                assert!(tokio::time::Instant::now() < deadline, "nothing was confirmed");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            server.sigkill();
        }
    }
    // What the client saw confirmed before the crash (nothing can confirm while it is down).
    let confirmed: Vec<i64> = (0..WRITES)
        .filter(|&s| doc.state(lsns[s as usize]).expect("state") == MutationState::Confirmed)
        .collect();
    assert!(!confirmed.is_empty(), "some writes were confirmed before the kill");
    assert!(doc.status().pending > 0, "some writes were still pending at the kill");

    let _server = start(port, &journal);
    doc.sync(WAIT).await.expect("synced after the restart");
    // A fresh client reads the server's state independently.
    let fresh = Client::connect(&url, "", dir.path().join("fresh")).expect("fresh");
    let check = fresh.open(doc.id()).expect("open");
    check.sync(WAIT).await.expect("fresh synced");
    let rows = check.query("SELECT seq, count(*) FROM w GROUP BY seq ORDER BY seq", &[]).expect("query").rows;
    assert_eq!(rows.len() as i64, WRITES, "every write is on the server");
    for (seq, row) in rows.iter().enumerate() {
        assert_eq!(
            row,
            &vec![Value::Integer(seq as i64), Value::Integer(1)],
            "write {seq} applied exactly once"
        );
    }
    for s in &confirmed {
        assert_eq!(doc.state(lsns[*s as usize]).expect("state"), MutationState::Confirmed);
    }
}
