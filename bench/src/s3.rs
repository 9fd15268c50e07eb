//! Object-store requests: `pagesync-server` on `s3://` (moto, as `scripts/test` starts it),
//! one client writing single-row mutations at a steady 1,000/s. Ours: the default group-commit
//! interval for object stores. Peer: the same server stepping at once (`--commit-interval-ms
//! 0`). Skipped when `AWS_ENDPOINT_URL` is not set.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pagesync::{DocId, Value};
use pagesync_client::Client;
use pagesync_server::Store;

use crate::Config;
use crate::report::{Better, Pair, Target};

const DOC: DocId = DocId([0x53; 16]);
const WAIT: Duration = Duration::from_secs(60);
const RATE: u64 = 1_000;

pub fn run(cfg: &Config) -> Vec<Pair> {
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        eprintln!("s3: skipped (no AWS_ENDPOINT_URL; scripts/test starts moto and sets it)");
        return Vec::new();
    }
    crate::runtime().block_on(async {
        let secs = if cfg.quick { 1 } else { 3 };
        let (mut grouped, mut eager) = (Vec::new(), Vec::new());
        for _ in 0..cfg.reps {
            grouped.push(puts_per_thousand(None, secs).await);
            eager.push(puts_per_thousand(Some(0), secs).await);
        }
        vec![Pair::new(
            "s3",
            "S3 puts per 1,000 single-row mutations at 1,000/s (default group commit, 100 ms)",
            "puts",
            Better::Lower,
            grouped,
            "the same, stepping at once (--commit-interval-ms 0)",
            eager,
            Some(Target::OursAtMost(20.0)),
        )]
    })
}

async fn puts_per_thousand(commit_interval_ms: Option<i64>, secs: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pagesync_tests::s3_url("bench").expect("S3 endpoint");
    let store = Store::parse(&url, tokio::runtime::Handle::current()).expect("store");
    let (addr, metrics, stop) =
        crate::serve_here(store, |cfg| cfg.commit_interval_ms = commit_interval_ms).await;
    let client = Client::connect(&format!("ws://{addr}/v1/sync"), "", dir.path().join("a")).expect("client");
    let doc = client.open(DOC).expect("open");
    doc.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER)", vec![]).expect("ddl");
    doc.sync(WAIT).await.expect("sync");
    let puts = || {
        let objects = metrics.objects.lock().expect("metrics");
        objects.as_ref().expect("an S3 server counts requests").puts.load(Ordering::Relaxed)
    };
    let before = puts();
    let n = RATE * secs;
    let start = Instant::now();
    for i in 0..n {
        doc.execute("INSERT INTO t(v) VALUES (?1)", vec![Value::Integer(i as i64)]).expect("write");
        let due = start + Duration::from_micros(i * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }
    doc.sync(WAIT).await.expect("sync");
    let per_thousand = (puts() - before) as f64 * 1_000.0 / n as f64;
    let _ = stop.send(());
    per_thousand
}
