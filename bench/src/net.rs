//! Over real loopback websockets: `pagesync-server` with file journals, client A writing,
//! client B receiving. Peer: a raw tokio-tungstenite relay moving the same number of frames of
//! the same size from one socket to another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::{DocId, Value};
use pagesync_client::{Client, Document};
use pagesync_server::{Metrics, ServerConfig, Store, serve};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::Config;
use crate::report::{Better, Pair, Target, per_second};

pub(crate) const DOC: DocId = DocId([9; 16]);
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub fn run(cfg: &Config) -> Vec<Pair> {
    crate::runtime().block_on(async {
        let mut pairs = vec![throughput(cfg, 1).await, throughput(cfg, GROUP).await];
        pairs.extend(latency(cfg).await);
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
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let cfg = ServerConfig::new(addr, Store::Files(dir.path().join("server")));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, cfg, Arc::new(Metrics::default()), async move {
        let _ = stopped.await;
    }));
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

/// Waits until B's replica holds at least `next` storage.
pub(crate) async fn b_reaches(b: &Document, rows: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = b.query("SELECT count(*) FROM t", &[]).expect("count").rows[0][0].clone();
        if n == Value::Integer(rows) {
            return;
        }
        if Instant::now() > deadline {
            panic!("B holds {n:?} rows after {WAIT:?}, expected {rows}; B: {:?}", b.status());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Single-row mutations per group commit in the second throughput pair (`execute_many`).
const GROUP: u64 = 100;

/// A writes `n` single-row mutations, `group` per fsync (1: one durable `execute` each).
async fn ours_throughput(n: u64, group: u64) -> f64 {
    let s = setup().await;
    let start = Instant::now();
    for first in (0..n).step_by(group as usize) {
        if group == 1 {
            s.a.execute("INSERT INTO t(v) VALUES (?1)", row(first)).expect("write");
            continue;
        }
        let writes =
            (first..(first + group).min(n)).map(|i| ("INSERT INTO t(v) VALUES (?1)", row(i))).collect();
        s.a.execute_many(writes).expect("write");
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
    let (mut a, mut b) = raw_relay().await;
    let frame = vec![0x5a_u8; frame_bytes];
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
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

async fn throughput(cfg: &Config, group: u64) -> Pair {
    let n = if cfg.quick {
        300
    } else if group == 1 {
        5_000
    } else {
        50_000
    };
    // A single-row mutation's frame: about the encoded mutation plus message overhead.
    let frame_bytes = pagesync::SqlMutation::one("INSERT INTO t(v) VALUES (?1)", row(0)).encode().len() + 64;
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps {
        ours.push(ours_throughput(n, group).await);
        peer.push(raw_throughput(n, frame_bytes).await);
    }
    let what = if group == 1 {
        "A -> server -> B over websockets, single-row mutations, one durable execute each".to_owned()
    } else {
        format!(
            "A -> server -> B over websockets, single-row mutations, {group} per group commit (execute_many)"
        )
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
/// against one frame relayed at the same pace. Returns the p50 and p99 pairs.
async fn latency(cfg: &Config) -> Vec<Pair> {
    let n = if cfg.quick { 50 } else { 500 };
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
    cfg.charts.borrow_mut().push(crate::chart::Chart {
        name: "latency-cdf".into(),
        title: "Propagation latency at 100 mutations/s, A -> server -> B (CDF)".into(),
        x_label: "milliseconds (log scale)".into(),
        y_label: "fraction of mutations".into(),
        log_x: true,
        log_y: false,
        series: vec![
            crate::chart::Series { name: "pagesync".into(), points: crate::chart::cdf(ours.clone()) },
            crate::chart::Series {
                name: "raw websocket relay".into(),
                points: crate::chart::cdf(raw.clone()),
            },
        ],
    });
    let pct = |xs: &mut Vec<f64>, p: f64| {
        xs.sort_by(f64::total_cmp);
        xs[((xs.len() as f64 - 1.0) * p).round() as usize]
    };
    let (p50, p99) = (pct(&mut ours, 0.5), pct(&mut ours, 0.99));
    let (r50, r99) = (pct(&mut raw, 0.5), pct(&mut raw, 0.99));
    let pair = |name: &str, x: f64, y: f64, target: f64| {
        let peer = "one frame through a raw websocket relay";
        Pair::new("net", name, "ms", Better::Lower, vec![x], peer, vec![y], Some(Target::OursAtMost(target)))
    };
    vec![
        pair("propagation latency p50 at 100/s", p50, r50, 1.0),
        pair("propagation latency p99 at 100/s", p99, r99, 5.0),
    ]
}
