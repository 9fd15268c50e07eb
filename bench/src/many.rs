//! Many documents: 10,000 documents across 1,000 websocket connections (1,000 across 100 with
//! `--quick`) on one server, which runs as a child process (this binary again, see
//! [`serve_child`]) so its resident memory is its own. Three figures:
//! - memory per idle websocket: the server's RSS growth while 1,000 websockets that said
//!   `Hello` sit idle, divided by them. Peer: a bare tokio-tungstenite server in a child
//!   process ([`bare_ws_child`]) holding the same websockets;
//! - memory per idle open document: the server's RSS growth while every document is open and
//!   subscribed, after they went quiet, divided by the documents. Peer: a plain SQLite
//!   connection per document (schema loaded), measured the same way in a child process;
//! - aggregate mutations/s: every connection sends 10 single-row mutations to each of its
//!   documents at once, until the server reports them all applied. Peer: stock SQLite applying
//!   the same inserts to as many database files, one transaction per document (rollback
//!   journal, `synchronous = FULL`).

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION};
use pagesync::{DocId, Mutation, SqlMutation, Statement, TimelineKey, Value};
use tokio_tungstenite::tungstenite::Message as Ws;

use crate::Config;
use crate::probe::{metric, rss_kib};
use crate::report::{Better, Pair, Target, per_second};

/// Set in the child's environment: serve documents from this directory.
pub const SERVE_ENV: &str = "PAGESYNC_BENCH_SERVE";
/// Set in the child's environment: run the stock SQLite peer over this many documents and
/// print `KiB-per-document mutations-per-second` (a fresh process, so its heap is its own).
pub const PEER_ENV: &str = "PAGESYNC_BENCH_SQLITE_PEER";

/// Set in the child's environment: run a bare websocket server (tokio-tungstenite's defaults,
/// reading frames and dropping them) on a kernel-picked port, printed on stdout.
pub const BARE_WS_ENV: &str = "PAGESYNC_BENCH_BARE_WS";

/// The bare websocket server's child process: the peer for memory per idle websocket.
pub fn bare_ws_child() {
    crate::runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr").port());
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(_)) = ws.next().await {}
            });
        }
    });
}

/// The peer's child process.
pub fn peer_child(docs: &str) {
    let (kib, rate) = peer(docs.parse().expect("a document count"));
    println!("{kib} {rate}");
}

fn peer_in_child(docs: usize) -> (f64, f64) {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .env(PEER_ENV, docs.to_string())
        .output()
        .expect("run the SQLite peer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the SQLite peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut figures = text.split_whitespace().map(|f| f.parse::<f64>().expect("a figure"));
    (figures.next().expect("KiB"), figures.next().expect("rate"))
}
const MUTATIONS_PER_DOC: u64 = 10;

/// The child: a server on a kernel-picked loopback port, printed on stdout; runs until killed.
pub fn serve_child(dir: &str) {
    crate::runtime().block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("addr").port());
        let cfg = pagesync_server::ServerConfig::new(
            listener.local_addr().expect("addr"),
            pagesync_server::Store::Files(dir.into()),
        );
        let metrics = Arc::new(pagesync_server::Metrics::default());
        pagesync_server::serve(listener, cfg, metrics, std::future::pending()).await.expect("serve");
    });
}

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Server {
    start_child(SERVE_ENV, &dir.to_string_lossy())
}

/// This binary again as a child with `env` set, which prints its port first.
fn start_child(env: &str, value: &str) -> Server {
    let (child, port) = spawn_child(env, value);
    Server { port, child }
}

/// Starts this binary again with `env` set to `value`: the child and the port it printed first.
pub(crate) fn spawn_child(env: &str, value: &str) -> (Child, u16) {
    let mut child = Command::new(std::env::current_exe().expect("this binary"))
        .env(env, value)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server child");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("port");
    (child, line.trim().parse().expect("a port"))
}

/// Waits for the server's counter `name` to reach `at_least`: a wait, not a figure, so its
/// bound is generous (10,000 documents shrinking took over a minute on a slow VM).
fn wait_for(port: u16, name: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while metric(port, name) < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least} (at {})", metric(port, name));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn doc_of(conn: usize, d: usize, per_conn: usize) -> DocId {
    DocId::from_u128(1 + (conn * per_conn + d) as u128)
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)";

fn insert(n: u64) -> Vec<u8> {
    let row = vec![Value::Text(format!("row {n} {}", "x".repeat(40)))];
    let statements = vec![
        Statement { sql: SCHEMA.into(), params: vec![] },
        Statement { sql: "INSERT INTO t(v) VALUES (?1)".into(), params: row },
    ];
    let body = SqlMutation { statements, once: None }.encode();
    Mutation { client_time_ms: 0, seed: n, body }.encode().expect("encode")
}

/// Opens every document over raw websockets, then has them write. Returns (KiB per idle open
/// document, mutations/s). Each connection's socket is drained by a task of its own.
fn ours(conns: usize, per_conn: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path());
    let port = server.port;
    let docs = (conns * per_conn) as u64;
    crate::runtime().block_on(async move {
        let url = format!("ws://127.0.0.1:{port}/v1/sync");
        let mut sinks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
            let (mut sink, mut stream) = ws.split();
            let hello = Message::Hello { version: PROTOCOL_VERSION, token: String::new() };
            sink.send(Ws::Binary(hello.encode().into())).await.expect("hello");
            tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
            sinks.push(sink);
        }
        let before = rss_kib(server.child.id());
        for (c, sink) in sinks.iter_mut().enumerate() {
            for d in 0..per_conn {
                let (doc, key) = (doc_of(c, d, per_conn), TimelineKey::insecure_from_u128(c as u128 + 1));
                let m =
                    Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true };
                sink.send(Ws::Binary(m.encode().into())).await.expect("subscribe");
            }
        }
        tokio::task::spawn_blocking(move || {
            wait_for(port, "pagesync_open_documents", docs);
            wait_for(port, "pagesync_documents_shrunk_total", docs);
        })
        .await
        .expect("wait");
        let idle = rss_kib(server.child.id());
        let per_doc = idle.saturating_sub(before) as f64 / docs as f64;

        let applied_before = metric(port, "pagesync_mutations_applied_total");
        let start = Instant::now();
        for (c, sink) in sinks.iter_mut().enumerate() {
            for d in 0..per_conn {
                let (doc, timeline) =
                    (doc_of(c, d, per_conn), TimelineKey::insecure_from_u128(c as u128 + 1).id());
                let entries = (0..MUTATIONS_PER_DOC).map(|i| insert(d as u64 * 100 + i)).collect();
                // Timeline positions are per document: each starts at LSN 1.
                let m = Message::Mutations { doc, timeline, first: Lsn::FIRST, entries };
                sink.send(Ws::Binary(m.encode().into())).await.expect("mutations");
            }
        }
        let total = applied_before + docs * MUTATIONS_PER_DOC;
        tokio::task::spawn_blocking(move || wait_for(port, "pagesync_mutations_applied_total", total))
            .await
            .expect("wait");
        let rate = per_second(docs * MUTATIONS_PER_DOC, start.elapsed());
        drop(sinks);
        drop(server);
        (per_doc, rate)
    })
}

/// The same with stock SQLite: a connection per document in this process (KiB each), and the
/// same inserts, one transaction per document (mutations/s).
fn peer(docs: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<_> = (0..docs).map(|i| dir.path().join(format!("{i}.db"))).collect();
    let open = |p: &std::path::Path| {
        let c = rusqlite::Connection::open(p).expect("open");
        // The rollback journal: WAL's two extra files per connection would need 30,000 file
        // descriptors for 10,000 documents.
        c.execute_batch("PRAGMA synchronous = FULL;").expect("pragmas");
        c.execute_batch(SCHEMA).expect("schema");
        c
    };
    // Create the files one at a time, so the measured heap has not grown for them already.
    for p in &paths {
        drop(open(p));
    }
    let before = rss_kib(std::process::id());
    let conns: Vec<_> = paths.iter().map(|p| open(p)).collect();
    let per_doc = rss_kib(std::process::id()).saturating_sub(before) as f64 / docs as f64;
    let start = Instant::now();
    for (d, c) in conns.iter().enumerate() {
        let tx = c.unchecked_transaction().expect("begin");
        for i in 0..MUTATIONS_PER_DOC {
            let v = format!("row {} {}", d as u64 * 100 + i, "x".repeat(40));
            tx.execute("INSERT INTO t(v) VALUES (?1)", [v]).expect("insert");
        }
        tx.commit().expect("commit");
    }
    let rate = per_second(docs as u64 * MUTATIONS_PER_DOC, start.elapsed());
    (per_doc, rate)
}

/// KiB of the child's RSS per websocket that said one frame (`Hello`) and went idle.
fn idle_websocket_kib(server: &Server, conns: usize) -> f64 {
    let (port, pid) = (server.port, server.child.id());
    crate::runtime().block_on(async move {
        let url = format!("ws://127.0.0.1:{port}/v1/sync");
        // Warm the server up with one connection, so the first one's setup is not counted.
        let (mut warm, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
        let hello = Message::Hello { version: PROTOCOL_VERSION, token: String::new() }.encode();
        warm.send(Ws::Binary(hello.clone().into())).await.expect("hello");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib(pid);
        let mut sockets = Vec::with_capacity(conns);
        for _ in 0..conns {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
            ws.send(Ws::Binary(hello.clone().into())).await.expect("hello");
            sockets.push(ws);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(pid);
        drop((sockets, warm));
        after.saturating_sub(before) as f64 / conns as f64
    })
}

/// Server memory per idle websocket (after `Hello`), against a bare tokio-tungstenite server
/// holding the same websockets, each in a child process; 5 interleaved repetitions.
fn idle_websockets(cfg: &Config) -> Pair {
    let conns = if cfg.quick { 100 } else { 1_000 };
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for _ in 0..cfg.reps.max(5) {
        let dir = tempfile::tempdir().expect("tempdir");
        ours.push(idle_websocket_kib(&start(dir.path()), conns));
        peer.push(idle_websocket_kib(&start_child(BARE_WS_ENV, "1"), conns));
    }
    Pair::new(
        "many",
        &format!("server memory per idle websocket, {conns} connections after Hello"),
        "KiB",
        Better::Lower,
        ours,
        "a bare tokio-tungstenite server (default buffers) holding the same websockets",
        peer,
        Some(Target::OursAtMost(64.0)),
    )
}

pub fn run(cfg: &Config) -> Vec<Pair> {
    let mut pairs = vec![idle_websockets(cfg)];
    pairs.extend(documents(cfg));
    pairs
}

fn documents(cfg: &Config) -> Vec<Pair> {
    let (conns, per_conn) = if cfg.quick { (100, 10) } else { (1_000, 10) };
    let docs = conns * per_conn;
    let (mut mem, mut rate, mut peer_mem, mut peer_rate) = (vec![], vec![], vec![], vec![]);
    for _ in 0..if cfg.quick { 1 } else { 3 } {
        let (m, r) = ours(conns, per_conn);
        mem.push(m);
        rate.push(r);
        let (m, r) = peer_in_child(docs);
        peer_mem.push(m);
        peer_rate.push(r);
    }
    vec![
        Pair::new(
            "many",
            &format!("memory per idle open document, {docs} documents over {conns} connections"),
            "KiB",
            Better::Lower,
            mem,
            "an open stock SQLite connection per document (schema loaded)",
            peer_mem,
            Some(Target::OursAtMost(64.0)),
        ),
        Pair::new(
            "many",
            &format!("aggregate mutations/s, 10 single-row mutations to each of {docs} documents"),
            "mutations/s",
            Better::Higher,
            rate,
            "stock SQLite, the same inserts in as many files, 1 txn per document, synchronous=FULL",
            peer_rate,
            None,
        ),
    ]
}
