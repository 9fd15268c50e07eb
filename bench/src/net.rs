//! Over real loopback websockets: `pagesync-server` with file journals, client A writing,
//! client B receiving. Peer: a raw tokio-tungstenite relay moving the same number of frames of
//! the same size from one socket to another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::{DocId, Value};
use pagesync_client::{Client, Document};
use pagesync_server::Store;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::Config;
use crate::report::{Better, Pair, Target, per_second};

pub(crate) const DOC: DocId = DocId([9; 16]);
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub fn run(cfg: &Config) -> Vec<Pair> {
    crate::runtime().block_on(async {
        let mut pairs = vec![throughput(cfg, Writes::One).await, throughput(cfg, Writes::Many(100)).await];
        pairs.push(throughput(cfg, Writes::Concurrent).await);
        pairs.extend(latency(cfg).await);
        pairs.extend(latency_at_rate(cfg).await);
        pairs
    })
}

pub(crate) struct Setup {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub a: Document,
    pub b: Document,
    _clients: (Client, Client),
    pub stop: tokio::sync::oneshot::Sender<()>,
}

pub(crate) async fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _, stop) = crate::serve_here(Store::Files(dir.path().join("server")), |_| {}).await;
    let url = format!("ws://{addr}/v1/sync");
    let ca = Client::connect(&url, "", dir.path().join("a")).expect("a");
    let cb = Client::connect(&url, "", dir.path().join("b")).expect("b");
    let (a, b) = (ca.open(DOC).expect("open"), cb.open(DOC).expect("open"));
    a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![]).expect("ddl");
    a.sync(WAIT).await.expect("sync");
    b.sync(WAIT).await.expect("sync");
    Setup { dir, url, a, b, _clients: (ca, cb), stop }
}

pub(crate) fn row(i: u64) -> Vec<Value> {
    vec![Value::Text(format!("row {i} {}", "x".repeat(40)))]
}

/// Waits until B's replica holds `rows` rows, woken by B's live query (as an app would be),
/// not by polling: tokio's timer would round a short poll up to a millisecond.
pub(crate) async fn b_reaches(b: &Document, rows: i64) {
    let mut sub = b.subscribe("SELECT count(*) FROM t", vec![]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let Ok(now) = tokio::time::timeout_at(deadline, sub.next()).await else {
            panic!("B does not hold {rows} rows after {WAIT:?}; B: {:?}", b.status());
        };
        if now.expect("count").rows[0][0] == Value::Integer(rows) {
            return;
        }
    }
}

/// How A makes its single-row writes durable in a throughput pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writes {
    /// One durable `execute` at a time.
    One,
    /// `execute_many` of this many: one group commit each.
    Many(u64),
    /// Rounds of `ROUND` separate `execute` calls from `WRITERS` threads at once, B waited
    /// for after each round: the client's group commit shares their fsyncs.
    Concurrent,
}

const WRITERS: u64 = 10;
const ROUND: u64 = 100;

/// A writes `n` single-row mutations, made durable as `writes` says.
async fn ours_throughput(n: u64, writes: Writes) -> f64 {
    let s = setup().await;
    let start = Instant::now();
    match writes {
        Writes::One => {
            for i in 0..n {
                s.a.execute("INSERT INTO t(v) VALUES (?1)", row(i)).expect("write");
            }
        }
        Writes::Many(group) => {
            for first in (0..n).step_by(group as usize) {
                let writes = (first..(first + group).min(n))
                    .map(|i| ("INSERT INTO t(v) VALUES (?1)", row(i)))
                    .collect();
                s.a.execute_many(writes).expect("write");
            }
        }
        Writes::Concurrent => {
            let per_writer = ROUND / WRITERS;
            for round in 0..n / ROUND {
                let writers: Vec<_> = (0..WRITERS)
                    .map(|w| {
                        let a = s.a.clone();
                        tokio::task::spawn_blocking(move || {
                            for k in 0..per_writer {
                                let i = round * ROUND + w * per_writer + k;
                                a.execute("INSERT INTO t(v) VALUES (?1)", row(i)).expect("write");
                            }
                        })
                    })
                    .collect();
                for w in writers {
                    w.await.expect("writer");
                }
                b_reaches(&s.b, ((round + 1) * ROUND) as i64).await;
            }
        }
    }
    b_reaches(&s.b, n as i64).await;
    let rate = per_second(n, start.elapsed());
    let _ = s.stop.send(());
    rate
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw relay: frames sent on the first socket arrive on the second, through a forwarding
/// server task, as pagesync's frames go A -> server -> B.
pub(crate) async fn raw_relay() -> (Socket, Socket) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        // Handshake each as it arrives: the client connects B only once A's handshake is done.
        let (sa, _) = listener.accept().await.expect("accept");
        sa.set_nodelay(true).expect("nodelay");
        let mut wa = tokio_tungstenite::accept_async(sa).await.expect("ws");
        let (sb, _) = listener.accept().await.expect("accept");
        sb.set_nodelay(true).expect("nodelay");
        let mut wb = tokio_tungstenite::accept_async(sb).await.expect("ws");
        while let Some(Ok(m)) = wa.next().await {
            if wb.send(m).await.is_err() {
                return;
            }
        }
    });
    let url = format!("ws://{addr}");
    // TCP_NODELAY on every socket, as pagesync's server and client set it.
    let (a, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await.expect("a");
    let (b, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await.expect("b");
    (a, b)
}

pub(crate) async fn raw_throughput(n: u64, frame_bytes: usize) -> f64 {
    relay_throughput(n, frame_bytes, None).await
}

/// Like `raw_throughput`, but the sender appends each frame to a file in `dir` and makes it
/// durable (one `fdatasync`) before it sends it, one frame at a time: the peer of a loop of
/// durable `execute` calls, each of which fsyncs A's timeline before its mutation goes up.
pub(crate) async fn raw_durable_throughput(n: u64, frame_bytes: usize, dir: &std::path::Path) -> f64 {
    let file = std::fs::File::create(dir.join("durable-relay")).expect("create");
    relay_throughput(n, frame_bytes, Some(file)).await
}

/// Frames per second through the raw relay, each first made durable in `durable` if given.
async fn relay_throughput(n: u64, frame_bytes: usize, mut durable: Option<std::fs::File>) -> f64 {
    use std::io::Write;
    let (mut a, mut b) = raw_relay().await;
    let frame = vec![0x5a_u8; frame_bytes];
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            if let Some(file) = durable.as_mut() {
                file.write_all(&frame).expect("write");
                file.sync_data().expect("fdatasync");
            }
            a.send(Ws::Binary(frame.clone().into())).await.expect("send");
        }
        a
    });
    for _ in 0..n {
        b.next().await.expect("frame").expect("ok");
    }
    let rate = per_second(n, start.elapsed());
    drop(sender.await);
    rate
}

async fn throughput(cfg: &Config, writes: Writes) -> Pair {
    let n = match (cfg.quick, writes) {
        (true, _) => 300,
        (false, Writes::One) => 5_000,
        (false, Writes::Concurrent) => 20_000,
        (false, Writes::Many(_)) => 50_000,
    };
    // A single-row mutation's frame: about the encoded mutation plus message overhead.
    let frame_bytes = pagesync::SqlMutation::one("INSERT INTO t(v) VALUES (?1)", row(0)).encode().len() + 64;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        ours.push(ours_throughput(n, writes).await);
        peer.push(raw_throughput(n, frame_bytes).await);
    }
    let what = match writes {
        Writes::One => {
            "A -> server -> B over websockets, single-row mutations, one durable execute each".to_owned()
        }
        Writes::Many(group) => format!(
            "A -> server -> B over websockets, single-row mutations, {group} per group commit (execute_many)"
        ),
        Writes::Concurrent => format!(
            "A -> server -> B over websockets, rounds of {ROUND} separate durable execute calls from {WRITERS} threads (automatic group commit)"
        ),
    };
    Pair::new(
        "net",
        &what,
        "mutations/s",
        Better::Higher,
        ours,
        "raw websocket relay, same frame count and size",
        peer,
        Some(Target::OursAtLeast(20_000.0)),
    )
}

/// Propagation latency at a steady 100 mutations/s, from A's `execute` to B holding the row,
/// against one frame relayed at the same pace: `cfg.reps` interleaved repetitions of each, a
/// percentile per repetition, and the pairs' medians over them. Returns p50, p99 and p999.
async fn latency(cfg: &Config) -> Vec<Pair> {
    let n = if cfg.quick { 50 } else { 500 };
    let (mut ours_runs, mut raw_runs) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        ours_runs.push(ours_latency(n).await);
        raw_runs.push(raw_latency(n).await);
    }
    let (ours, raw): (Vec<f64>, Vec<f64>) = (ours_runs.concat(), raw_runs.concat());
    cfg.charts.borrow_mut().push(crate::chart::Chart {
        name: "latency-cdf".into(),
        title: "Propagation latency at 100 mutations/s, A -> server -> B (CDF)".into(),
        x_label: "milliseconds (log scale)".into(),
        y_label: "fraction of mutations".into(),
        log_x: true,
        log_y: false,
        series: vec![
            crate::chart::Series { name: "pagesync".into(), points: crate::chart::cdf(ours) },
            crate::chart::Series { name: "raw websocket relay".into(), points: crate::chart::cdf(raw) },
        ],
    });
    percentile_pairs("100/s", &ours_runs, &raw_runs, [Some(1.5), Some(3.0), None])
}

/// `n` propagation latencies at 100/s through pagesync, in milliseconds.
async fn ours_latency(n: usize) -> Vec<f64> {
    let s = setup().await;
    let mut ours = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        s.a.execute("INSERT INTO t(v) VALUES (?1)", row(i as u64)).expect("write");
        b_reaches(&s.b, i as i64 + 1).await;
        let took = start.elapsed();
        ours.push(took.as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(10).saturating_sub(took)).await;
    }
    let _ = s.stop.send(());
    ours
}

/// `n` latencies at 100/s of one 128-byte frame through the raw relay, in milliseconds.
async fn raw_latency(n: usize) -> Vec<f64> {
    let (mut a, mut b) = raw_relay().await;
    let frame = vec![0x5a_u8; 128];
    let mut raw = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        a.send(Ws::Binary(frame.clone().into())).await.expect("send");
        b.next().await.expect("frame").expect("ok");
        let took = start.elapsed();
        raw.push(took.as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(10).saturating_sub(took)).await;
    }
    raw
}

/// p50, p99 and p999 pairs: each repetition's percentile of `ours` against the same of `raw`
/// (so each pair has one value per repetition and reports their median), with optional
/// targets on our median.
fn percentile_pairs(rate: &str, ours: &[Vec<f64>], raw: &[Vec<f64>], targets: [Option<f64>; 3]) -> Vec<Pair> {
    let pct = |xs: &[f64], p: f64| {
        let mut xs = xs.to_vec();
        xs.sort_by(f64::total_cmp);
        xs[((xs.len() as f64 - 1.0) * p).round() as usize]
    };
    [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)]
        .into_iter()
        .zip(targets)
        .map(|((label, p), target)| {
            Pair::new(
                "net",
                &format!("propagation latency {label} at {rate}"),
                "ms",
                Better::Lower,
                ours.iter().map(|run| pct(run, p)).collect(),
                "frames through a raw websocket relay at the same rate",
                raw.iter().map(|run| pct(run, p)).collect(),
                target.map(Target::OursAtMost),
            )
        })
        .collect()
}

/// Propagation latency at a steady 10,000 mutations/s: A submits 10 single-row mutations
/// every millisecond (one group commit each, `execute_many`), and each row's latency runs from
/// its submission until B holds it. Peer: 10 frames a millisecond through the raw relay.
async fn latency_at_rate(cfg: &Config) -> Vec<Pair> {
    let ms = if cfg.quick { 200 } else { 2_000 };
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        ours.push(ours_latency_at_rate(ms).await);
        raw.push(raw_latency_at_rate(ms).await);
    }
    percentile_pairs("10,000/s", &ours, &raw, [None, None, None])
}

/// Mutations A submits per millisecond in `latency_at_rate`.
const PER_MS: u64 = 10;

/// Latencies of `ms * PER_MS` rows at 10,000/s through pagesync, in milliseconds.
async fn ours_latency_at_rate(ms: u64) -> Vec<f64> {
    let s = setup().await;
    let sent = Arc::new(std::sync::Mutex::new(Vec::<Instant>::with_capacity((ms * PER_MS) as usize)));
    let (a, sent_by_a) = (s.a.clone(), sent.clone());
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for t in 0..ms {
            tick.tick().await;
            let writes = (0..PER_MS).map(|i| ("INSERT INTO t(v) VALUES (?1)", row(t * PER_MS + i))).collect();
            let now = Instant::now();
            sent_by_a.lock().expect("lock").extend(std::iter::repeat_n(now, PER_MS as usize));
            a.execute_many(writes).expect("write");
        }
    });
    let total = (ms * PER_MS) as usize;
    let mut ours = Vec::with_capacity(total);
    let mut sub = s.b.subscribe("SELECT count(*) FROM t", vec![]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while ours.len() < total {
        let Ok(rows) = tokio::time::timeout_at(deadline, sub.next()).await else {
            panic!("B holds {} of {total} rows after {WAIT:?}", ours.len());
        };
        let Value::Integer(n) = rows.expect("count").rows[0][0] else { panic!("count is an integer") };
        let now = Instant::now();
        let sent = sent.lock().expect("lock");
        for at in &sent[ours.len()..(n as usize).min(sent.len())] {
            ours.push(now.duration_since(*at).as_secs_f64() * 1e3);
        }
    }
    writer.await.expect("writer");
    let _ = s.stop.send(());
    ours
}

/// Latencies of `ms * PER_MS` frames at 10,000/s through the raw relay, in milliseconds.
async fn raw_latency_at_rate(ms: u64) -> Vec<f64> {
    let total = (ms * PER_MS) as usize;
    let (mut a, mut b) = raw_relay().await;
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let start = Instant::now();
        for _ in 0..ms {
            tick.tick().await;
            for _ in 0..PER_MS {
                let at = start.elapsed().as_nanos() as u64;
                a.send(Ws::Binary(at.to_le_bytes().to_vec().into())).await.expect("send");
            }
        }
        (a, start)
    });
    let mut raw_at = Vec::with_capacity(total);
    for _ in 0..total {
        let m = b.next().await.expect("frame").expect("ok");
        raw_at.push((Instant::now(), m.into_data()));
    }
    let (_a, start) = sender.await.expect("sender");
    raw_at
        .iter()
        .map(|(got, data)| {
            let sent =
                start + Duration::from_nanos(u64::from_le_bytes(data[..8].try_into().expect("8 bytes")));
            got.duration_since(sent).as_secs_f64() * 1e3
        })
        .collect()
}
