//! Bulk workloads over real loopback websockets and real files:
//! - 100-row mutations A -> server -> B, against a raw websocket relay of the same frames, and
//!   against the same relay whose sender makes each frame durable first (like for like);
//! - cold start: a new client syncs a large document (100 MB; 8 MB with `--quick`), against a
//!   raw websocket transfer of the same bytes (and, like for like, the same transfer written
//!   to a new file with one fdatasync), and the time to its first query;
//! - reads on that synced replica (point lookups, a full scan), against the same database
//!   exported as a plain SQLite file and read with stock SQLite;
//! - the first query on a 1 GB document (8 MB with `--quick`) by a new client, answered from
//!   the server's state while the download has only begun, against stock SQLite opening the
//!   same database as a plain file and running the same query.

use std::time::Instant;

use pagesync::Value;
use pagesync_client::Client;

use crate::Config;
use crate::net::{DOC, WAIT, b_reaches, raw_durable_throughput, raw_throughput, row, setup};
use crate::report::{Better, Pair, Target, per_second};

const ROWS_PER_MUTATION: usize = 100;
/// Rows and bytes per bulk-load mutation of the large document: 4 MB of incompressible blobs.
const LOAD_ROWS: usize = 1_000;
const LOAD_ROW_BYTES: usize = 4_000;

pub fn run(cfg: &Config) -> Vec<Pair> {
    crate::runtime().block_on(async {
        let mut pairs = hundred_rows(cfg).await;
        pairs.extend(cold_start_and_reads(cfg).await);
        pairs.push(first_query(cfg).await);
        pairs
    })
}

fn multi_row_insert(rows: usize) -> String {
    let values: Vec<String> = (1..=rows).map(|i| format!("(?{i})")).collect();
    format!("INSERT INTO t(v) VALUES {}", values.join(", "))
}

fn multi_row_params(m: u64, rows: usize) -> Vec<Value> {
    (0..rows as u64).flat_map(|i| row(m * 1000 + i)).collect()
}

/// The frame a mutation of `rows` rows costs: the encoded mutation plus message overhead.
fn frame_bytes(rows: usize) -> usize {
    pagesync::SqlMutation::one(multi_row_insert(rows), multi_row_params(0, rows)).encode().len() + 64
}

/// Mutations per second A -> server -> B, each inserting `rows` rows. The parameters are
/// made before the clock starts, as the relay's frames are: formatting 100 strings per
/// mutation took a sixth of A's thread, work of the benchmark, not of the sync.
async fn ours_rows(n: u64, rows: usize) -> f64 {
    let s = setup().await;
    let sql = multi_row_insert(rows);
    let params: Vec<Vec<Value>> = (0..n).map(|m| multi_row_params(m, rows)).collect();
    let start = Instant::now();
    for p in params {
        s.a.execute(&sql, p).expect("write");
    }
    b_reaches(&s.b, (n * rows as u64) as i64).await;
    let rate = per_second(n, start.elapsed());
    let _ = s.stop.send(());
    rate
}

/// 100-row mutations A -> server -> B against two peers relaying the same frames: a raw
/// websocket relay, and the same relay whose sender makes each frame durable first (as each
/// of A's `execute` calls makes its mutation durable before it goes up). The target is on
/// the second, the like-for-like peer: the first touches no disk, and an `execute` that is
/// durable when it returns waits for an fdatasync (over 100 us on any disk here) where the
/// relay's frame takes under 10 us, so it can never reach half its rate. It stays as the
/// wire's ceiling.
async fn hundred_rows(cfg: &Config) -> Vec<Pair> {
    let n = if cfg.quick { 30 } else { 500 };
    let frame_bytes = frame_bytes(ROWS_PER_MUTATION);
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ours, mut peer, mut durable) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        ours.push(ours_rows(n, ROWS_PER_MUTATION).await);
        peer.push(raw_throughput(n, frame_bytes).await);
        durable.push(raw_durable_throughput(n, frame_bytes, dir.path()).await);
    }
    batch_chart(cfg).await;
    let what = "A -> server -> B over websockets, 100-row mutations, one durable execute each (parameters made before the clock)";
    vec![
        Pair::new(
            "bulk",
            what,
            "mutations/s",
            Better::Higher,
            ours.clone(),
            &format!(
                "raw websocket relay, same frame count and size ({frame_bytes} bytes; no disk: the wire's ceiling, not like for like)"
            ),
            peer,
            None,
        ),
        Pair::new(
            "bulk",
            what,
            "mutations/s",
            Better::Higher,
            ours,
            &format!(
                "the same relay, its sender appending each frame to a file with one fdatasync before sending it ({frame_bytes} bytes)"
            ),
            durable,
            Some(Target::RatioAtLeast(0.5)),
        ),
    ]
}

/// Rows per second against rows per mutation, for the chart (median of up to 3 runs each).
async fn batch_chart(cfg: &Config) {
    let n = if cfg.quick { 30 } else { 300 };
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for rows in [1, 10, 100] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps.min(3) {
            a.push(ours_rows(n, rows).await * rows as f64);
            b.push(raw_throughput(n, frame_bytes(rows)).await * rows as f64);
        }
        ours.push((rows as f64, crate::report::Stats::of(a).median));
        raw.push((rows as f64, crate::report::Stats::of(b).median));
    }
    cfg.charts.borrow_mut().push(crate::chart::Chart {
        name: "throughput-by-batch".into(),
        title: "Rows per second A -> server -> B against rows per mutation".into(),
        x_label: "rows per mutation (log scale)".into(),
        y_label: "rows per second (log scale)".into(),
        log_x: true,
        log_y: true,
        series: vec![
            crate::chart::Series { name: "pagesync".into(), points: ours },
            crate::chart::Series { name: "raw websocket relay, same frames".into(), points: raw },
        ],
    });
}

/// Milliseconds from `Client::open` of a document the client has never held (the client
/// already connected) to the rows of a point lookup, on a 1 GB document: the query reads the
/// server's state, fetching the pages it touches, while the download has only begun.
async fn first_query(cfg: &Config) -> Pair {
    let megabytes = if cfg.quick { 8 } else { 1_000 };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = pagesync_server::Store::Files(dir.path().join("server"));
    let (addr, _, stop) = crate::serve_here(store, |_| {}).await;
    let url = format!("ws://{addr}/v1/sync");
    let writer = Client::connect(&url, "", dir.path().join("writer")).expect("writer");
    let w = writer.open(DOC).expect("open");
    w.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB)", vec![]).expect("ddl");
    let load = format!(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {LOAD_ROWS}) \
         INSERT INTO big(v) SELECT randomblob({LOAD_ROW_BYTES}) FROM c"
    );
    let loads = megabytes * 1_000_000 / (LOAD_ROWS * LOAD_ROW_BYTES);
    for _ in 0..loads {
        w.execute(&load, vec![]).expect("bulk load");
        w.sync(WAIT * 4).await.expect("sync the load");
    }
    let rows = (loads * LOAD_ROWS) as u64;
    let file = dir.path().join("plain.sqlite");
    w.export(&file).expect("export");
    drop(writer);
    let lookup = "SELECT length(v) FROM big WHERE id = ?1";
    let mut rng = pagesync_tests::Rng(11);
    let (mut ours, mut peer, mut rep) = (Vec::new(), Vec::new(), 0);
    for _ in 0..cfg.reps {
        rep += 1;
        let n = 1 + rng.below(rows) as i64;
        let id = Value::Integer(n);
        let client = Client::connect(&url, "", dir.path().join(format!("reader-{rep}"))).expect("reader");
        while !client.is_connected() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let start = Instant::now();
        let doc = client.open(DOC).expect("open");
        let got = doc.query(lookup, std::slice::from_ref(&id)).expect("first query").rows;
        ours.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(got, vec![vec![Value::Integer(LOAD_ROW_BYTES as i64)]], "the first query's rows");
        assert!(doc.remote_reads().queries == 1, "the first query did not read the server's state");
        drop((doc, client));
        let start = Instant::now();
        let plain = rusqlite::Connection::open(&file).expect("open the plain file");
        let len: i64 = plain.query_row(lookup, [n], |r| r.get(0)).expect("lookup");
        peer.push(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(len, LOAD_ROW_BYTES as i64);
    }
    let _ = stop.send(());
    Pair::new(
        "bulk",
        &format!("first query of a new client on a {megabytes} MB document, from open to rows"),
        "ms",
        Better::Lower,
        ours,
        "stock SQLite opening the same database as a plain local file, same query",
        peer,
        Some(Target::OursAtMost(100.0)),
    )
}

async fn cold_start_and_reads(cfg: &Config) -> Vec<Pair> {
    let megabytes = if cfg.quick { 8 } else { 100 };
    let s = setup().await;
    s.a.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, v BLOB)", vec![]).expect("ddl");
    let load = format!(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {LOAD_ROWS}) \
         INSERT INTO big(v) SELECT randomblob({LOAD_ROW_BYTES}) FROM c"
    );
    let loads = megabytes * 1_000_000 / (LOAD_ROWS * LOAD_ROW_BYTES);
    for _ in 0..loads {
        s.a.execute(&load, vec![]).expect("bulk load");
        s.a.sync(WAIT * 4).await.expect("sync the load");
    }
    // The database's size: what a new client needs. The server's journal can hold more (the
    // history before its newest checkpoint), which a new client skips.
    let pages = s.a.query("PRAGMA page_count", &[]).expect("page_count").rows[0][0].clone();
    let Value::Integer(pages) = pages else { panic!("page_count is an integer") };
    let doc_bytes = pages as u64 * pagesync::page::PAGE_SIZE as u64;
    let rows = (loads * LOAD_ROWS) as i64;
    // At least 5 repetitions of both sides (3 with `--quick`), after one of each not counted.
    // Each side removes what it wrote once the next has run: on a VM whose host backs guest
    // memory at first touch, page-cache pages the guest never used cost more to write than
    // the copy into them, and whichever side happened to get those would pay for it (before
    // this, every replica stayed on disk and the first repetitions ran at 0.6x the later ones).
    let reps = cfg.reps.min(5);
    let (mut ours, mut peer, mut first_query_ms, mut to_file) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut replica: Option<(Client, pagesync_client::Document, std::path::PathBuf)> = None;
    let frames = doc_bytes.div_ceil(1 << 20);
    for rep in 0..=reps {
        let data = s.dir.path().join(format!("cold-{rep}"));
        let start = Instant::now();
        let client = Client::connect(&s.url, "", &data).expect("client");
        let doc = client.open(DOC).expect("open");
        doc.sync(WAIT * 4).await.expect("cold sync");
        let n = doc.query("SELECT count(*) FROM big", &[]).expect("first query").rows[0][0].clone();
        let took = start.elapsed();
        assert_eq!(n, Value::Integer(rows), "the new client holds the whole document");
        let raw = raw_throughput(frames, 1 << 20).await * (1 << 20) as f64 / 1e6;
        let raw_file = s.dir.path().join(format!("raw-{rep}"));
        let raw_to_file = raw_to_file(frames, 1 << 20, &raw_file).await;
        std::fs::remove_file(&raw_file).expect("remove the raw copy");
        if let Some((client, doc, data)) = replica.replace((client, doc, data)) {
            drop((doc, client));
            std::fs::remove_dir_all(&data).expect("remove the replica before");
        }
        if rep == 0 {
            continue;
        }
        ours.push(doc_bytes as f64 / 1e6 / took.as_secs_f64());
        first_query_ms.push(took.as_secs_f64() * 1e3);
        peer.push(raw);
        to_file.push(raw_to_file);
    }
    let mut pairs = vec![Pair::new(
        "bulk",
        &format!("cold start: a new client syncs a {} MB document", doc_bytes / 1_000_000),
        "MB/s",
        Better::Higher,
        ours.clone(),
        "raw websocket transfer of the same bytes in 1 MiB frames",
        peer,
        Some(Target::RatioAtLeast(0.5)),
    )];
    // The peer lands the bytes in a file too. Not quite like for like: its fdatasync is timed,
    // while a replica's download is a cache of the server's entries, made durable by the next
    // storage sync (within a second) after `sync` has returned.
    pairs.push(Pair::new(
        "bulk",
        &format!("cold start: a new client syncs a {} MB document", doc_bytes / 1_000_000),
        "MB/s",
        Better::Higher,
        ours,
        "raw websocket transfer of the same bytes in 1 MiB frames, each written to a new file, one fdatasync at the end (pagesync's replica is made durable by its next storage sync, within 1 s, not timed)",
        to_file,
        None,
    ));
    let (_client, doc, data) = replica.expect("BUG: at least one repetition");
    let first = crate::report::Stats::of(first_query_ms);
    eprintln!("cold start: time to the first query {:.0} ms (median of {})", first.median, first.samples);
    pairs.extend(reads(cfg, &doc, &data.join("export.sqlite"), rows));
    let _ = s.stop.send(());
    pairs
}

/// MB/s of `n` frames of `frame_bytes` through the raw relay, each appended to a new file at
/// `path` as it arrives, with one `fdatasync` once all are in.
async fn raw_to_file(n: u64, frame_bytes: usize, path: &std::path::Path) -> f64 {
    use futures_util::{SinkExt, StreamExt};
    use std::io::Write;
    let (mut a, mut b) = crate::net::raw_relay().await;
    let frame = vec![0x5a_u8; frame_bytes];
    let mut file = std::fs::File::create(path).expect("create");
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            a.send(tokio_tungstenite::tungstenite::Message::Binary(frame.clone().into()))
                .await
                .expect("send");
        }
        a
    });
    for _ in 0..n {
        let m = b.next().await.expect("frame").expect("ok");
        file.write_all(&m.into_data()).expect("write");
    }
    file.sync_data().expect("fdatasync");
    let mb = (n * frame_bytes as u64) as f64 / 1e6 / start.elapsed().as_secs_f64();
    drop(sender.await);
    mb
}

/// Point lookups and full scans on the synced replica against the same database as a plain file.
fn reads(cfg: &Config, doc: &pagesync_client::Document, file: &std::path::Path, rows: i64) -> Vec<Pair> {
    doc.export(file).expect("export");
    let plain = rusqlite::Connection::open(file).expect("open the plain file");
    // Like for like: a replica has one owner, so pagesync's VFS takes no file locks; stock
    // SQLite would otherwise lock and unlock the file around every statement.
    plain.pragma_update(None, "locking_mode", "EXCLUSIVE").expect("exclusive locking");
    // Enough lookups that a repetition takes tens of milliseconds, not a few.
    let lookups = if cfg.quick { 20_000 } else { 200_000 };
    let mut rng = pagesync_tests::Rng(7);
    let ids: Vec<i64> = (0..lookups).map(|_| 1 + rng.below(rows as u64) as i64).collect();
    let lookup = "SELECT length(v) FROM big WHERE id = ?1";
    let scan = "SELECT sum(length(v)) FROM big";
    // A second peer, as pagesync's replica reads: its pages in place in a map (`mmap_size`),
    // not copied into SQLite's cache.
    let mapped = rusqlite::Connection::open(file).expect("open the plain file again");
    mapped.pragma_update(None, "locking_mode", "EXCLUSIVE").expect("exclusive locking");
    mapped.pragma_update(None, "mmap_size", 2_147_418_112i64).expect("mmap_size");
    // Like for like: each lookup names its SQL, as pagesync's `query` does, and finds its
    // prepared statement in a cache.
    let stock_lookups = |conn: &rusqlite::Connection| {
        let start = Instant::now();
        for id in &ids {
            let mut stmt = conn.prepare_cached(lookup).expect("prepare");
            let _: i64 = stmt.query_row([id], |r| r.get(0)).expect("lookup");
        }
        per_second(lookups, start.elapsed())
    };
    let mb = rows as f64 * LOAD_ROW_BYTES as f64 / 1e6;
    let stock_scan = |conn: &rusqlite::Connection| {
        timed_mb(mb, || conn.query_row(scan, [], |r| r.get::<_, i64>(0)).expect("scan"))
    };
    let [mut ours, mut peer, mut peer_mapped, mut scan_ours, mut scan_peer, mut scan_peer_mapped] =
        std::array::from_fn(|_| Vec::with_capacity(cfg.reps));
    for _ in 0..cfg.reps {
        let start = Instant::now();
        for id in &ids {
            doc.query(lookup, &[Value::Integer(*id)]).expect("lookup");
        }
        ours.push(per_second(lookups, start.elapsed()));
        peer.push(stock_lookups(&plain));
        peer_mapped.push(stock_lookups(&mapped));
    }
    for _ in 0..cfg.reps {
        scan_ours.push(timed_mb(mb, || doc.query(scan, &[]).expect("scan")));
        scan_peer.push(stock_scan(&plain));
        scan_peer_mapped.push(stock_scan(&mapped));
    }
    let peer_name = "stock SQLite on the same database as a plain file (locking_mode=EXCLUSIVE, prepare_cached per query)";
    let mapped_name = "the same with mmap_size set (stock SQLite reads pages in place in a map, as pagesync's replica does)";
    let pair = |what: &str, unit: &str, ours: &[f64], name: &str, peer: Vec<f64>, target: Option<Target>| {
        Pair::new("bulk", what, unit, Better::Higher, ours.to_vec(), name, peer, target)
    };
    let lookups_what = "point lookups on a synced replica";
    let scan_what = "full scan of a synced replica";
    vec![
        pair(lookups_what, "lookups/s", &ours, peer_name, peer, Some(Target::RatioAtLeast(0.9))),
        pair(lookups_what, "lookups/s", &ours, mapped_name, peer_mapped, None),
        pair(scan_what, "MB/s", &scan_ours, peer_name, scan_peer, Some(Target::RatioAtLeast(0.9))),
        pair(scan_what, "MB/s", &scan_ours, mapped_name, scan_peer_mapped, None),
    ]
}

fn timed_mb<T>(mb: f64, f: impl FnOnce() -> T) -> f64 {
    let start = Instant::now();
    std::hint::black_box(f());
    mb / start.elapsed().as_secs_f64().max(1e-9)
}
