//! The edge under hostile load, against the real binary: idle TCP sockets, idle websockets,
//! subscribers that never read while their document is written, and slowloris heads on every
//! route, all at once, while a normal client writes. Prints the server's memory per idle
//! websocket and the client's write round trip (until confirmed), and asserts the issue's
//! bounds: at most 64 KiB per idle websocket, a p99 round trip under 50 ms, memory bounded.
//!
//! `PAGESYNC_EDGE_SCALE` (default 1.0) scales the counts: 2,000 idle sockets, 1,000 idle
//! websockets, 500 deaf subscribers, 20 slowloris sockets per route.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION};
use pagesync::{DocId, Mutation, MutationState, SqlMutation, TimelineKey, Value};
use support::probe::rss_kib;
use support::start_on_any_port;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn scaled(n: f64) -> usize {
    let scale: f64 = std::env::var("PAGESYNC_EDGE_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    ((n * scale) as usize).max(1)
}

async fn hello(port: u16) -> Socket {
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    let m = Message::Hello { version: PROTOCOL_VERSION, token: String::new() };
    ws.send(Ws::Binary(m.encode().into())).await.expect("hello");
    ws
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_holds_under_hostile_load() {
    pagesync_server::raise_open_file_limit();
    // Write back the machine's dirty pages first (a CI run starts this right after linking
    // gigabytes of test binaries): the round trips below include three fsyncs each, and this
    // test is about the server under hostile network load, not about the disk's backlog.
    let _ = std::process::Command::new("sync").status();
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let pid = server.0.id();
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let client = pagesync_client::Client::connect(&url, "", dir.path().join("client")).expect("client");
    let mine = client.open(DocId::from_u128(0x1)).expect("open");
    mine.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)", vec![]).expect("ddl");
    mine.sync(Duration::from_secs(30)).await.expect("sync");
    let base_kib = rss_kib(pid);

    // Idle websockets that said Hello: memory per connection.
    let n_ws = scaled(1_000.0);
    let mut idle_ws = Vec::with_capacity(n_ws);
    for _ in 0..n_ws {
        idle_ws.push(hello(port).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ws_kib = rss_kib(pid);
    let per_ws_kib = ws_kib.saturating_sub(base_kib) as f64 / n_ws as f64;

    // Deaf subscribers of a document that is being written.
    let busy = DocId::from_u128(0x2);
    let n_deaf = scaled(500.0);
    let mut deaf = Vec::with_capacity(n_deaf);
    for i in 0..n_deaf {
        let mut ws = hello(port).await;
        let m = Message::Subscribe {
            doc: busy,
            key: TimelineKey::insecure_from_u128(i as u128 + 10),
            storage_next: Lsn::FIRST,
            digests: false,
            create: true,
        };
        ws.send(Ws::Binary(m.encode().into())).await.expect("subscribe");
        deaf.push(ws);
    }
    let writer = tokio::spawn(async move {
        let mut ws = hello(port).await;
        let key = TimelineKey([7; 32]);
        let timeline = key.id();
        let subscribe =
            Message::Subscribe { doc: busy, key, storage_next: Lsn::FIRST, digests: false, create: true };
        ws.send(Ws::Binary(subscribe.encode().into())).await.expect("subscribe");
        let mut lsn = Lsn::FIRST;
        for i in 0..200u64 {
            let sql = if i == 0 {
                "CREATE TABLE b(x BLOB)".to_owned()
            } else {
                "INSERT INTO b VALUES (randomblob(100000))".to_owned()
            };
            let body = SqlMutation::one(&sql, vec![]).encode();
            let entry = Mutation { client_time_ms: 0, seed: i, body }.encode().expect("encode");
            let m = Message::Mutations { doc: busy, timeline, first: lsn, entries: vec![entry] };
            if ws.send(Ws::Binary(m.encode().into())).await.is_err() {
                break;
            }
            lsn = lsn.next();
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        ws
    });

    // Idle TCP sockets and slowloris heads on every route.
    let n_idle = scaled(2_000.0);
    let idle_tcp: Vec<TcpStream> =
        (0..n_idle).filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    let routes =
        ["/v1/sync", "/healthz", "/metrics", "/v1/docs/00000000000000000000000000000001/export", "/x"];
    let n_slow = scaled(20.0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow_stop = stop.clone();
    let slow = std::thread::spawn(move || {
        let mut socks: Vec<(TcpStream, Vec<u8>, usize)> = Vec::new();
        while !slow_stop.load(std::sync::atomic::Ordering::Relaxed) {
            while socks.len() < routes.len() * n_slow {
                let route = routes[socks.len() % routes.len()];
                if let Ok(s) = TcpStream::connect(("127.0.0.1", port)) {
                    socks.push((
                        s,
                        format!("GET {route} HTTP/1.1\r\nhost: localhost\r\n\r\n").into_bytes(),
                        0,
                    ));
                }
            }
            // One byte each per second; a closed one is replaced.
            socks.retain_mut(|(s, head, at)| {
                let ok = s.write_all(&head[*at..*at + 1]).is_ok();
                *at = (*at + 1) % head.len();
                ok
            });
            std::thread::sleep(Duration::from_secs(1));
        }
    });

    // The normal client's round trips, while all of that goes on (after a second of it).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut trips = Vec::new();
    for i in 0..scaled(300.0).max(20) {
        let started = Instant::now();
        let w = mine
            .execute("INSERT INTO t(v) VALUES (?1)", vec![Value::Text(format!("row {i}"))])
            .expect("write");
        loop {
            if mine.state(w.lsn).expect("state") == MutationState::Confirmed {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "write {i} never confirmed");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        trips.push(started.elapsed().as_secs_f64() * 1e3);

        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak_kib = rss_kib(pid);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
    let _ = slow.join();
    trips.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&trips, 0.5), percentile(&trips, 0.99));
    eprintln!(
        "edge under load: {n_ws} idle websockets cost {per_ws_kib:.1} KiB each; {n_deaf} deaf subscribers, \
         {} idle sockets, {} slowloris sockets; write round trip p50 {p50:.2} ms, p99 {p99:.2} ms; \
         server RSS {base_kib} KiB at rest, {ws_kib} with the websockets, {peak_kib} at peak",
        idle_tcp.len(),
        routes.len() * n_slow
    );
    assert!(per_ws_kib <= 64.0, "an idle websocket costs {per_ws_kib:.1} KiB");
    assert!(p99 < 50.0, "p99 write round trip {p99:.2} ms");
    // A deaf subscriber holds at most the send backlog cap (256 KiB) plus one message (a
    // 256 KiB batch, or one large entry) queued, and the websocket's copy of the message it is
    // stuck on: under 1 MiB. 3 MiB each leaves room for the allocator's per-thread arenas
    // (the step threads); `edge.rs` checks that it stops growing.
    let bound_kib = base_kib + (n_ws as u64 * 64) + (n_deaf as u64 * 3 * 1024) + 256 * 1024;
    assert!(peak_kib < bound_kib, "server RSS {peak_kib} KiB, bound {bound_kib}");
    drop((idle_ws, deaf, idle_tcp));
}
