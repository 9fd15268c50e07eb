//! A large checkpoint with the real `pagesync-server`: while one document (512 MiB by default,
//! `PAGESYNC_CHECKPOINT_MB` to change it) writes its checkpoint, a write to another document is
//! confirmed within 50 ms, and the document itself keeps confirming writes (its checkpoint is
//! written a few parts per step, between its writes). The document is filled with the
//! checkpoint threshold out of reach, then the server restarts with it at 1 MiB, so the
//! checkpoint begins at the first write after the restart.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION};
use pagesync::{DocId, Mutation, MutationState, SqlMutation, TimelineId, TimelineKey, Value};
use support::start_on_any_port;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const BIG: &str = "0000000000000000000000000000b166";
const OTHER: &str = "000000000000000000000000000007e5";
const WRITER_KEY: TimelineKey = TimelineKey([0x77; 32]);
static WRITER: std::sync::LazyLock<TimelineId> = std::sync::LazyLock::new(|| WRITER_KEY.id());

fn encode(lsn: u64, sql: &str) -> Vec<u8> {
    let body = SqlMutation::one(sql, vec![]).encode();
    Mutation { client_time_ms: 1_700_000_000_000, seed: lsn, body }.encode().expect("encode")
}

/// A raw connection subscribed to `doc` from `storage_next`, as `WRITER`.
async fn connect(port: u16, doc: DocId, storage_next: Lsn) -> Socket {
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    for m in [
        Message::Hello { version: PROTOCOL_VERSION, token: String::new() },
        Message::Subscribe { doc, key: WRITER_KEY, storage_next, digests: false, create: true },
    ] {
        ws.send(Ws::Binary(m.encode().into())).await.expect("send");
    }
    ws
}

/// Sends `WRITER`'s mutation `lsn` and waits for the storage entry that applies it; returns
/// the storage head after it. Every `Storage` frame is acknowledged, as a client would.
async fn write_and_confirm(ws: &mut Socket, doc: DocId, lsn: u64, sql: &str) -> Lsn {
    let first = Lsn::new(lsn).expect("lsn");
    let m = Message::Mutations { doc, timeline: *WRITER, first, entries: vec![encode(lsn, sql)] };
    ws.send(Ws::Binary(m.encode().into())).await.expect("send");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(120), ws.next()).await.expect("a frame in time");
        let Some(Ok(Ws::Binary(b))) = frame else { continue };
        let Ok(Message::Storage { first: at, entries, .. }) = Message::decode(&b) else { continue };
        let next = Lsn::new(at.get() + entries.len() as u64).expect("lsn");
        ws.send(Ws::Binary(Message::StorageAck { doc, next, outcomes_through: None }.encode().into()))
            .await
            .expect("ack");
        for e in &entries {
            let payload = e.decompress().expect("decompress");
            let header = pagesync::storage::decode(&payload).expect("an entry header");
            if header.applied.iter().any(|a| a.timeline == *WRITER && a.lsn == first) {
                return next;
            }
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_checkpoint_holds_up_neither_its_document_nor_another() {
    let mb: u64 = std::env::var("PAGESYNC_CHECKPOINT_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("file://{}", dir.path().join("store").display());
    let big: DocId = BIG.parse().expect("doc");

    // Fill: 30 MiB per mutation (the per-mutation cap is 32), no checkpoint.
    let fill_started = Instant::now();
    let (server, port) = start_on_any_port(&store, &["--checkpoint-after-bytes", "1099511627776"]);
    let mut ws = connect(port, big, Lsn::FIRST).await;
    let mut head = write_and_confirm(&mut ws, big, 1, "CREATE TABLE big(x BLOB); CREATE TABLE w(i)").await;
    let rows_per_fill = 7_500;
    let fills = (mb << 20).div_ceil(rows_per_fill * 4096);
    for k in 0..fills {
        let sql = format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows_per_fill}) \
             INSERT INTO big SELECT printf('%.4000c', char(65 + (i + {k}) % 26)) FROM s"
        );
        head = write_and_confirm(&mut ws, big, 2 + k, &sql).await;
    }
    drop(ws);
    drop(server);
    let doc_dir = dir.path().join("store").join(&BIG[..2]).join(BIG).join("storage");
    let filled = dir_bytes(&doc_dir);
    assert!(filled >= mb << 20, "the document holds {filled} bytes");
    eprintln!("filled {mb} MiB in {:?}", fill_started.elapsed());

    // Write back every dirty page on the machine first (other tests' too): an fsync timed below
    // must not pay for them.
    let _ = std::process::Command::new("sync").status();

    // Restart with checkpoints on: the next write to the big document begins one.
    let (_server, port) = start_on_any_port(&store, &["--checkpoint-after-bytes", "1048576"]);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let client = pagesync_client::Client::connect(&url, "", dir.path().join("other")).expect("client");
    let other = client.open(OTHER.parse().expect("doc")).expect("open");
    other.execute("CREATE TABLE t(x)", vec![]).expect("ddl");
    other.sync(Duration::from_secs(30)).await.expect("sync");

    let mut ws = connect(port, big, head).await;
    let started = Instant::now();
    let (mut own, mut others) = (Vec::new(), Vec::new());
    let mut lsn = 2 + fills;
    while dir_bytes(&doc_dir) < filled + (mb << 20) {
        assert!(started.elapsed() < Duration::from_secs(600), "the checkpoint never completed");
        let t0 = Instant::now();
        write_and_confirm(&mut ws, big, lsn, "INSERT INTO w VALUES (1)").await;
        own.push(t0.elapsed().as_millis());
        lsn += 1;
        let t0 = Instant::now();
        let w = other.execute("INSERT INTO t VALUES (?1)", vec![Value::Integer(lsn as i64)]).expect("write");
        while other.state(w.lsn).expect("state") != MutationState::Confirmed {
            assert!(t0.elapsed() < Duration::from_secs(10), "the other document's write was never confirmed");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        others.push(t0.elapsed().as_millis());
    }
    let took = started.elapsed();
    own.sort_unstable();
    others.sort_unstable();
    eprintln!(
        "a {mb} MiB checkpoint in {took:?} over {} writes to its document (ms: {own:?}); the other document's writes meanwhile (ms: {others:?})",
        own.len()
    );
    // 1,024 pages a part, `CHECKPOINT_PARTS_PER_STEP` parts a step, one write a step.
    let steps = (mb * 256).div_ceil(1024).div_ceil(u64::from(pagesync::CHECKPOINT_PARTS_PER_STEP));
    assert!(own.len() as u64 >= steps, "the checkpoint was not spread over {steps} writes: {own:?}");
    assert!(
        others.last().is_some_and(|ms| *ms < 50),
        "writes to another document during the checkpoint: {others:?} ms"
    );
    // One step writes at most 16 MiB of checkpoint before the document's write: far below
    // the whole checkpoint.
    assert!(
        own.last().is_some_and(|ms| *ms < took.as_millis() / 2),
        "a write to the document waited for most of its checkpoint: {own:?} ms over {took:?}"
    );
}
