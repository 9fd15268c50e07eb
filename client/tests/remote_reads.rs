//! Queries before the download ends, against a real server over websockets: a new client of a
//! large document answers its first queries from the server's state, fetching only the pages
//! they touch, with the same rows as the writer's replica; once its replica has caught up,
//! queries are local again and give the same rows.

mod support;

use std::time::{Duration, Instant};

use pagesync::{DocId, Value};
use support::start_server;

/// Rows of `ROW_BYTES` random bytes: 48 MiB, large enough that its download takes far longer
/// than a few page requests.
const ROWS: i64 = 12_288;
const ROW_BYTES: i64 = 4_000;
const ROWS_PER_WRITE: i64 = 1_024;

const QUERIES: [&str; 4] = [
    "SELECT max(id) FROM t",
    "SELECT count(*), sum(length(v)) FROM t WHERE id BETWEEN 100 AND 199",
    "SELECT id, hex(substr(v, 1, 16)) FROM t WHERE id IN (1, 777, 6000, 12288)",
    "SELECT name FROM sqlite_schema ORDER BY name",
];

fn answers(d: &pagesync_client::Document) -> Vec<Vec<Vec<Value>>> {
    QUERIES.iter().map(|q| d.query(q, &[]).unwrap_or_else(|e| panic!("{q}: {e}")).rows).collect()
}

#[test]
fn a_new_client_queries_a_large_document_before_its_download_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, addr, stop, server) = start_server(dir.path());
    let doc: DocId = "000000000000000000000000000e0a0d".parse().expect("doc");
    let url = format!("ws://{addr}/v1/sync");
    let _guard = rt.enter();

    let writer = pagesync_client::Client::connect(&url, "", dir.path().join("writer")).expect("writer");
    let w = writer.open(doc).expect("open");
    w.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)", vec![]).expect("ddl");
    for from in (1..=ROWS).step_by(ROWS_PER_WRITE as usize) {
        let sql = "WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2) \
                   INSERT INTO t SELECT i, randomblob(?3) FROM n";
        let args =
            vec![Value::Integer(from), Value::Integer(from + ROWS_PER_WRITE - 1), Value::Integer(ROW_BYTES)];
        w.execute(sql, args).expect("insert");
    }
    rt.block_on(w.sync(Duration::from_secs(120))).expect("writer sync");
    let expected = answers(&w);
    assert_eq!(expected[0][0][0], Value::Integer(ROWS));

    let reader = pagesync_client::Client::connect(&url, "", dir.path().join("reader")).expect("reader");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reader.is_connected() {
        assert!(Instant::now() < deadline, "the reader did not connect");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = reader.open(doc).expect("open reader");
    let opened = Instant::now();
    // Each query reads the server's state, unless the download (48 MiB, at hundreds of MB/s)
    // ended before it: then the replica answers. The first comes at once, long before.
    let mut first = Vec::new();
    for (i, q) in QUERIES.iter().enumerate() {
        let before = r.remote_reads().queries;
        first.push(r.query(q, &[]).unwrap_or_else(|e| panic!("{q}: {e}")).rows);
        let (reads, status) = (r.remote_reads(), r.status());
        let remote = reads.queries == before + 1;
        assert!(remote || i > 0, "the first query did not read the server's state: {reads:?}");
        assert!(
            remote || status.storage_next >= status.server_storage_next,
            "{q}: answered by a replica that had not caught up: {reads:?}, {status:?}"
        );
    }
    let took = opened.elapsed();
    let reads = r.remote_reads();
    eprintln!("first queries after {took:?}: {reads:?}, replica at {:?}", r.status().storage_next);
    assert_eq!(first, expected, "the server's state as fetched differs from the writer's");
    // A few b-tree descents, not the document: far fewer pages than its 12,000-odd.
    assert!(reads.pages > 0 && reads.pages < 1_000, "{reads:?}");

    rt.block_on(r.sync(Duration::from_secs(120))).expect("reader sync");
    let before = r.remote_reads();
    assert_eq!(answers(&r), expected, "the downloaded replica differs from the writer's");
    assert_eq!(r.remote_reads(), before, "a caught-up replica still read the server's state");

    drop((reader, writer));
    let _ = stop.send(());
    rt.block_on(server).expect("join").expect("server");
}
