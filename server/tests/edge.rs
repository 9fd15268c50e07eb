//! The server's edge against the real `pagesync-server` binary, as a hostile client would try
//! it: authorization on every route, read-only tokens that may not create documents, frames
//! that once panicked the hub, silent and slow sockets that once locked everyone out, a
//! subscriber that never reads, a step larger than the websocket library's default cap, and
//! what a client says when it is pointed at the wrong path.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION, codes};
use pagesync::{DocId, Mutation, SqlMutation, TimelineKey};
use pagesync_server::auth::{Claims, mint};
use support::probe::rss_kib;
use support::start_on_any_port;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const SECRET: &[u8] = b"an edge test secret of at least 32 bytes";

/// `GET path` with optional extra header lines; the status code and body.
fn get(port: u16, path: &str, headers: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n{headers}\r\n").expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer (the server must not reset the connection)");
    let text = String::from_utf8_lossy(&out);
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").map_or(out.len(), |p| p + 4);
    (status, out.split_off(split))
}

fn token(doc: &str, write: bool, metrics: bool) -> String {
    mint(
        SECRET,
        &Claims { doc: doc.into(), write, exp: 4_000_000_000, metrics, admin: false, sub: None, call: None },
    )
}

/// A write token for every document (and `/metrics`) whose `sub` is `sub`.
fn named(sub: &str) -> String {
    let claims = Claims {
        doc: "*".into(),
        write: true,
        exp: 4_000_000_000,
        metrics: true,
        admin: false,
        sub: Some(sub.into()),
        call: None,
    };
    mint(SECRET, &claims)
}

async fn connect(port: u16, token: &str) -> Socket {
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    send(&mut ws, Message::Hello { version: PROTOCOL_VERSION, token: token.into() }).await;
    ws
}

async fn send(ws: &mut Socket, m: Message) {
    ws.send(Ws::Binary(m.encode().into())).await.expect("send");
}

/// The next protocol message other than storage; `None` once the server closed.
async fn next_reply(ws: &mut Socket) -> Option<Message> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("a reply in time")? {
            Ok(Ws::Binary(b)) => match Message::decode(&b).expect("valid frame") {
                Message::Storage { .. } => continue,
                m => return Some(m),
            },
            Ok(Ws::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

fn mutation(sql: &str) -> Vec<u8> {
    let body = SqlMutation::one(sql, vec![]).encode();
    Mutation { client_time_ms: 1_700_000_000_000, seed: 1, body }.encode().expect("encode")
}

/// Writes `sql` to `doc` as timeline `tl` LSN 1 and waits for the ack.
async fn write(port: u16, token: &str, doc: DocId, tl: u8, sql: &str) {
    let mut ws = connect(port, token).await;
    let key = TimelineKey([tl; 32]);
    let timeline = key.id();
    send(&mut ws, Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true })
        .await;
    let entries = vec![mutation(sql)];
    send(&mut ws, Message::Mutations { doc, timeline, first: Lsn::FIRST, entries }).await;
    loop {
        match next_reply(&mut ws).await.expect("open") {
            Message::MutationsAck { next_expected, .. } if next_expected > Lsn::FIRST => return,
            Message::Error { code, message, .. } => panic!("{code}: {message}"),
            _ => {}
        }
    }
}

fn secret_file(dir: &Path) -> String {
    let path = dir.join("secret");
    std::fs::write(&path, SECRET).expect("write secret");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_authorization_and_reads_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let secret = secret_file(dir.path());
    let (_server, port) =
        start_on_any_port(&format!("file://{}", store.display()), &["--auth-secret-file", &secret]);
    let a = DocId::from_u128(0xa);
    write(port, &token(&a.to_string(), true, false), a, 1, "CREATE TABLE t(x)").await;

    let export = format!("/v1/docs/{a}/export");
    let bearer = |t: &str| format!("authorization: Bearer {t}\r\n");
    assert_eq!(get(port, &export, "").0, 401, "no token");
    assert_eq!(get(port, &export, &bearer("garbage")).0, 401, "a garbage token");
    let other = token(&DocId::from_u128(0xb).to_string(), true, false);
    assert_eq!(get(port, &export, &bearer(&other)).0, 403, "a token for another document");
    let read_a = token(&a.to_string(), false, false);
    let (status, body) = get(port, &export, &bearer(&read_a));
    assert_eq!(status, 200, "a read token for the document");
    assert!(body.starts_with(b"SQLite format 3\0"), "a database file");
    assert_eq!(get(port, &format!("{export}?token={read_a}"), "").0, 200, "the token as a query parameter");
    assert_eq!(get(port, "/v1/docs/export", "").0, 404, "no id: an answer, not a panic");
    assert_eq!(get(port, "/v1/docs//export", "").0, 404);

    assert_eq!(get(port, "/metrics", "").0, 401, "metrics need a token");
    assert_eq!(get(port, "/metrics", &bearer(&read_a)).0, 403, "a document token has no metrics scope");
    let (status, body) = get(port, "/metrics", &bearer(&token("none", false, true)));
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("pagesync_steps_total"));
    assert_eq!(get(port, "/healthz", "").0, 200, "health stays open");
    let (status, body) = get(port, "/v1/sync", "");
    assert_eq!(status, 426, "the sync endpoint without an upgrade says what it is");
    assert!(String::from_utf8_lossy(&body).contains("websocket"));

    // A read-only token for every document cannot create one by subscribing.
    let mut ws = connect(port, &token("*", false, false)).await;
    for n in 0..50u128 {
        let doc = DocId::from_u128(0x1000 + n);
        send(
            &mut ws,
            Message::Subscribe {
                doc,
                key: TimelineKey([9; 32]),
                storage_next: Lsn::FIRST,
                digests: false,
                create: true,
            },
        )
        .await;
        match next_reply(&mut ws).await.expect("open") {
            Message::Error { code, .. } => assert_eq!(code, codes::NOT_FOUND),
            other => panic!("expected not_found, got {other:?}"),
        }
    }
    let docs = walk(&store).into_iter().filter(|p| p.ends_with("storage")).count();
    assert_eq!(docs, 1, "only the written document exists on disk");
    // The same token reads the document that exists.
    send(
        &mut ws,
        Message::Subscribe {
            doc: a,
            key: TimelineKey([9; 32]),
            storage_next: Lsn::FIRST,
            digests: false,
            create: true,
        },
    )
    .await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::MutationsAck { .. })));

    // A token that may write creates a document only by asking to: a subscription without
    // `create` (a client that reads, shows or exports) to a missing one gets `not_found`,
    // however often; one that asks creates it.
    let mut ws = connect(port, &token("*", true, false)).await;
    let key = TimelineKey([5; 32]);
    let subscribe =
        |doc, create| Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create };
    for n in 0..50u128 {
        send(&mut ws, subscribe(DocId::from_u128(0x2000 + n), false)).await;
        match next_reply(&mut ws).await.expect("open") {
            Message::Error { code, .. } => assert_eq!(code, codes::NOT_FOUND),
            other => panic!("expected not_found, got {other:?}"),
        }
    }
    let docs = walk(&store).into_iter().filter(|p| p.ends_with("storage")).count();
    assert_eq!(docs, 1, "no subscription without `create` made a document");
    // Two subscriptions to one missing document in a row, the first without `create`: the
    // second creates it while the first is answered.
    let b = DocId::from_u128(0x3000);
    send(&mut ws, subscribe(b, false)).await;
    send(&mut ws, subscribe(b, true)).await;
    let mut acked = false;
    while !acked {
        match next_reply(&mut ws).await.expect("open") {
            Message::MutationsAck { doc, .. } => acked = doc == b,
            Message::Error { code, .. } => assert_eq!(code, codes::NOT_FOUND),
            other => panic!("unexpected {other:?}"),
        }
    }
    let docs = walk(&store).into_iter().filter(|p| p.ends_with("storage")).count();
    assert_eq!(docs, 2, "the subscription that asked created its document");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let a = DocId::from_u128(0xa);
    write(port, "", a, 1, "CREATE TABLE t(x)").await;

    // Mutations at the end of the LSN space once panicked the hub: now a typed error, and this
    // connection closes.
    let mut ws = connect(port, "").await;
    let key = TimelineKey([2; 32]);
    let timeline = key.id();
    let first = Lsn::new(u64::MAX - 1).expect("lsn");
    let entries = vec![mutation("INSERT INTO t VALUES (1)"), mutation("INSERT INTO t VALUES (2)")];
    send(&mut ws, Message::Mutations { doc: a, timeline, first, entries }).await;
    match next_reply(&mut ws).await {
        Some(Message::Error { code, .. }) => assert_eq!(code, codes::MALFORMED),
        other => panic!("expected a malformed error, got {other:?}"),
    }
    assert!(next_reply(&mut ws).await.is_none(), "the connection is closed");
    // An acknowledgement past everything is ignored.
    let mut ws = connect(port, "").await;
    send(&mut ws, Message::Subscribe { doc: a, key, storage_next: Lsn::FIRST, digests: false, create: true })
        .await;
    send(
        &mut ws,
        Message::StorageAck { doc: a, next: Lsn::new(u64::MAX).expect("lsn"), outcomes_through: None },
    )
    .await;
    // Frames before Hello close the connection before it takes a slot.
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut early, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    send(&mut early, Message::StorageAck { doc: a, next: Lsn::FIRST, outcomes_through: None }).await;
    match next_reply(&mut early).await {
        Some(Message::Error { code, .. }) => assert_eq!(code, codes::NOT_HELLO),
        other => panic!("expected hello_required, got {other:?}"),
    }

    // Every other document keeps serving.
    let b = DocId::from_u128(0xb);
    write(port, "", b, 3, "CREATE TABLE u(x)").await;
    write(port, "", a, 4, "INSERT INTO t VALUES (3)").await;
    assert_eq!(get(port, &format!("/v1/docs/{a}/export"), "").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_sockets_lock_nobody_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) =
        start_on_any_port(&format!("file://{}", dir.path().display()), &["--max-connections", "20"]);
    // More silent sockets than --max-connections, websockets that never say Hello, and
    // slowloris heads, one byte a second.
    let idle: Vec<TcpStream> =
        (0..100).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("idle")).collect();
    let mut no_hello = Vec::new();
    for _ in 0..30 {
        let url = format!("ws://127.0.0.1:{port}/v1/sync");
        no_hello.push(tokio_tungstenite::connect_async(url.as_str()).await.expect("handshake").0);
    }
    let slow = std::thread::spawn(move || {
        let mut socks: Vec<TcpStream> =
            (0..10).map(|_| TcpStream::connect(("127.0.0.1", port)).expect("slow")).collect();
        for i in 0..8 {
            for s in &mut socks {
                let _ = s.write_all(&[b"GET /metrics HTTP/1.1\r\n"[i % 10]]);
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        socks
    });
    // A real client still gets in, at once.
    let started = Instant::now();
    write(port, "", DocId::from_u128(0xc), 1, "CREATE TABLE t(x)").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "a real client waited {took:?}");
    // The silent ones are closed after the head deadline (5 s); the websockets without Hello
    // after theirs.
    tokio::time::sleep(Duration::from_secs(7)).await;
    for mut s in idle.into_iter().take(10) {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf);
        assert!(n.is_ok(), "the server closed the idle socket: {n:?}");
    }
    for mut ws in no_hello.into_iter().take(5) {
        match next_reply(&mut ws).await {
            Some(Message::Error { code, .. }) => assert_eq!(code, codes::NOT_HELLO),
            None => {}
            other => panic!("expected hello_required or a close, got {other:?}"),
        }
    }
    for mut s in slow.join().expect("slowloris") {
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "slowloris answered: {text}");
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_cost_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let pid = server.0.id();
    let doc = DocId::from_u128(0xd);
    write(port, "", doc, 1, "CREATE TABLE t(b BLOB)").await;
    // Twenty subscribers that read nothing, then 80 MB of new rows arrive.
    let mut deaf = Vec::new();
    for i in 0..20u8 {
        let mut ws = connect(port, "").await;
        let key = TimelineKey([100 + i; 32]);
        send(
            &mut ws,
            Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true },
        )
        .await;
        deaf.push(ws);
    }
    let before = rss_kib(pid);
    let fill = "INSERT INTO t SELECT randomblob(1000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 4000) SELECT x FROM c)";
    let mut rss = Vec::new();
    for round in 0..20u8 {
        write(port, "", doc, 10 + round, fill).await;
        if round % 5 == 4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            rss.push(rss_kib(pid));
        }
    }
    eprintln!(
        "20 subscribers that never read, 80 MB written: server RSS {before} KiB, then {rss:?} every 20 MB"
    );
    // Each holds at most its backlog cap (256 KiB) plus one message; what grows is the
    // allocator's arenas (one per step thread) up to their peak, then nothing: without the
    // cap, retransmits queued a window every 200 ms for each subscriber, without end.
    let (first, last) = (rss[0], *rss.last().expect("samples"));
    assert!(last.saturating_sub(first) < 128 * 1024, "server RSS kept growing: {rss:?}");
    assert!(last.saturating_sub(before) < 512 * 1024, "server RSS grew to {last} KiB");
    // Readers still get everything.
    let out = Command::new(Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync"))
        .args(["--server", &format!("ws://127.0.0.1:{port}/v1/sync"), "--doc", &doc.to_string()])
        .args(["--timeout-ms", "60000", "--data"])
        .arg(dir.path().join("reader"))
        .args(["query", "SELECT count(*) FROM t"])
        .output()
        .expect("pagesync");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("80000"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(deaf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_step_reaches_a_new_client_and_wrong_paths_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(
        &format!("file://{}", dir.path().display()),
        // The 50 MB insert is what is tested, not the CPU bound: in a debug build on a loaded
        // machine it ran past the default 1 s of CPU once.
        &[
            "--max-mutation-added-bytes",
            "67108864",
            "--max-mutation-vm-steps",
            "100000000",
            "--max-mutation-cpu-ms",
            "60000",
        ],
    );
    let cli = |args: &[&str], server: &str| {
        let timeout = if server.ends_with("/v1/sync") { "60000" } else { "2000" };
        Command::new(Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync"))
            .args(["--server", server, "--doc", "000000000000000000000000000000e5", "--timeout-ms", timeout])
            .arg("--data")
            .arg(dir.path().join(args[0]))
            .args(&args[1..])
            .output()
            .expect("pagesync")
    };
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let out = cli(&["w", "exec", "CREATE TABLE t(b BLOB)"], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let big = "INSERT INTO t SELECT randomblob(1000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50000) SELECT x FROM c)";
    let out = cli(&["w", "exec", big], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["r", "query", "SELECT count(*), sum(length(b)) FROM t"], &url);
    let rows = String::from_utf8_lossy(&out.stdout);
    assert!(
        rows.contains("50000\t50000000"),
        "a new client got: {rows} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Pointed at the wrong path, the client says so.
    let out = cli(&["x", "sync"], &format!("ws://127.0.0.1:{port}/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("HTTP 404") && err.contains("/v1/sync"), "{err}");
    // So does a query on a replica that holds nothing yet (not SQLite's "no such table").
    let out = cli(&["q", "query", "SELECT count(*) FROM t"], &format!("ws://127.0.0.1:{port}/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("HTTP 404") && err.contains("holds nothing yet"), "{err}");
    // A write there stays queued, but the exit says the server refused it (a script must know
    // that nothing will send it); with the server merely away it is pending, and succeeds.
    let out = cli(&["q", "exec", "INSERT INTO t VALUES (x'00')"], &format!("ws://127.0.0.1:{port}/"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("queued locally, but the server refused it") && err.contains("HTTP 404"), "{err}");
    let away = format!("ws://127.0.0.1:{}/", support::free_port());
    let out = cli(&["q", "exec", "INSERT INTO t VALUES (x'01')"], &away);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A query on a replica that holds nothing, of a document the server refuses (a token it does
/// not take, another document's, a document a read token may not create), says the server's
/// refusal, not what SQLite makes of an empty database. A granted one reads the server's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_on_an_empty_replica_says_why_the_server_refused_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = format!("file://{}", dir.path().join("store").display());
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret_file(dir.path())]);
    let doc = DocId::from_u128(0xe6);
    write(port, &named("w"), doc, 1, "CREATE TABLE t(x)").await;
    let run = |token: &str, doc: &str, data: &str, command: &[&str]| {
        Command::new(Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync"))
            .args(["--server", &format!("ws://127.0.0.1:{port}/v1/sync"), "--doc", doc, "--token", token])
            .args(["--timeout-ms", "10000", "--data"])
            .arg(dir.path().join(data))
            .args(command)
            .output()
            .expect("pagesync")
    };
    let query =
        |token: &str, doc: &str, data: &str| run(token, doc, data, &["query", "SELECT count(*) FROM t"]);
    let here = doc.to_string();
    let out = query(&token(&here, false, false), &here, "granted");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "count(*)\n0\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nowhere = DocId::from_u128(0xe7).to_string();
    for (token, doc, says) in [
        ("not-a-token".to_owned(), &here, "unauthorized"),
        (token(&nowhere, true, false), &here, "forbidden"),
        (token(&nowhere, false, false), &nowhere, "not_found"),
    ] {
        let out = query(&token, doc, says);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{says}: {err}");
        assert!(!err.contains("no such table"), "{says}: {err}");
        // `status` prints what the replica holds, and fails: a script must hear the refusal.
        let out = run(&token, doc, says, &["status"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "status, {says}: {err}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("pending\t0"), "status, {says}");
    }
    assert!(run(&token(&here, false, false), &here, "granted", &["status"]).status.success());
}

/// Page requests (for queries before a download ends) from a hostile client: for documents its
/// token does not name, out of bounds, and a flood it never reads. Each gets a typed answer,
/// the flood is refused past its bound, and another client's write is confirmed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_page_requests_are_refused_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let doc = DocId::from_u128(0x9a);
    write(port, "", doc, 1, "CREATE TABLE t(b BLOB)").await;
    write(port, "", doc, 2, "INSERT INTO t SELECT randomblob(3000) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000) SELECT x FROM c)").await;

    let mut ws = connect(port, "").await;
    send(&mut ws, Message::MapPages { doc, id: 1 }).await;
    let map = match next_reply(&mut ws).await.expect("open") {
        Message::PageMap { id: 1, map, .. } => map,
        other => panic!("{other:?}"),
    };
    let run = *map.runs.last().expect("runs");
    // Out of bounds: too many pages, an entry that does not exist, a document that does not.
    send(&mut ws, Message::ReadPages { doc, id: 2, lsn: run.lsn, offset: run.offset, pages: 100_000 }).await;
    assert!(
        matches!(next_reply(&mut ws).await, Some(Message::Error { code, .. }) if code == codes::MALFORMED)
    );
    // Reads of what the document does not hold are the asker's: typed, not a storage failure.
    let (far, end) = (Lsn::new(1 << 40).unwrap(), u32::MAX - 4096);
    for (id, lsn, offset) in [(3, far, 0), (5, run.lsn, end)] {
        send(&mut ws, Message::ReadPages { doc, id, lsn, offset, pages: 1 }).await;
        match next_reply(&mut ws).await {
            Some(Message::Error { code, message, .. }) if code == codes::OUT_OF_RANGE => {
                assert!(!message.contains(pagesync::protocol::SEE_THE_LOG), "{message}")
            }
            Some(Message::Pages { data, .. }) => panic!("{lsn} at {offset}: {} bytes", data.len()),
            other => panic!("{lsn} at {offset}: {other:?}"),
        }
    }
    let nowhere = DocId::from_u128(0x9b);
    send(&mut ws, Message::MapPages { doc: nowhere, id: 4 }).await;
    assert!(
        matches!(next_reply(&mut ws).await, Some(Message::Error { code, .. }) if code == codes::NOT_FOUND)
    );
    assert!(!walk(dir.path()).iter().any(|p| p.display().to_string().contains(&nowhere.to_string())));

    // A flood of the largest reads, never read back: refused past its bound, typed.
    for id in 0..2_000u64 {
        let pages = run.pages.min(pagesync::protocol::MAX_READ_PAGES);
        send(&mut ws, Message::ReadPages { doc, id: 100 + id, lsn: run.lsn, offset: run.offset, pages })
            .await;
    }
    let started = Instant::now();
    write(port, "", doc, 3, "INSERT INTO t VALUES (x'00')").await;
    let write_took = started.elapsed();
    assert!(write_took < Duration::from_secs(5), "another client's write took {write_took:?}");
    // Its answers and refusals, as the hub gets through the flood.
    let (mut pages, mut limits) = (0, 0);
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), next_reply(&mut ws)).await {
        match m {
            Message::Pages { .. } => pages += 1,
            Message::Error { code, .. } if code == codes::LIMIT => limits += 1,
            other => panic!("{other:?}"),
        }
        if pages + limits == 2_000 {
            break;
        }
    }
    let refused = support::probe::metric(port, "pagesync_page_requests_refused_total");
    let answered = support::probe::metric(port, "pagesync_page_requests_total");
    eprintln!(
        "flood: {pages} answered and {limits} refused as read back, {answered} answered and {refused} refused in /metrics; another client's write took {write_took:?}"
    );
    assert!(refused > 0 && refused >= limits, "/metrics: {refused} refused, {limits} seen");
    assert!(pages > 0 && limits > 0, "{pages} answered, {limits} refused");
}

/// The value a peer named `subject` broadcast last, as `client` sees it (`None`: not there).
fn seen(doc: &pagesync_client::Document, subject: &str) -> Option<String> {
    doc.presence()
        .into_iter()
        .find(|p| p.subject == subject)
        .map(|p| String::from_utf8_lossy(&p.value).into_owned())
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reaches_every_subscriber_drops_leavers_and_refuses_floods() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = format!("file://{}", dir.path().join("store").display());
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret_file(dir.path())]);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc = DocId::from_u128(0x9e5);
    let mut clients: Vec<pagesync_client::Client> = ["ann", "bob", "cat"]
        .iter()
        .map(|n| pagesync_client::Client::connect(&url, &named(n), dir.path().join(n)).expect("client"))
        .collect();
    let mut docs = Vec::new();
    for c in &clients {
        let d = c.open(doc).expect("open");
        d.sync(Duration::from_secs(20)).await.expect("subscribed");
        docs.push(d);
    }
    let metrics_token = named("ops");
    let metric = |name: &str| -> u64 {
        let (_, body) = get(port, "/metrics", &format!("authorization: Bearer {metrics_token}\r\n"));
        let text = String::from_utf8_lossy(&body).into_owned();
        let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).expect("metric").to_owned();
        line[name.len() + 1..].parse().expect("a number")
    };
    let steps = metric("pagesync_steps_total");
    // A client shows in the others' presence once it broadcast, by the subject its token names.
    assert!(docs.iter().all(|d| d.presence().is_empty()), "nobody broadcast yet");
    for (d, name) in docs.iter().zip(["ann", "bob", "cat"]) {
        d.broadcast(&format!("{{\"name\":\"{name}\"}}")).expect("broadcast");
    }
    until("three peers see each other", || docs.iter().all(|d| d.presence().len() == 2)).await;
    assert_eq!(seen(&docs[0], "bob").as_deref(), Some("{\"name\":\"bob\"}"));
    assert!(seen(&docs[0], "ann").is_none(), "a client is not its own peer");
    // Ann moves her cursor 100 times as fast as she can: the others end up at the last one,
    // and a client that paces itself is never refused.
    for i in 0..100 {
        docs[0].broadcast(&format!("{{\"cursor\":{i}}}")).expect("broadcast");
    }
    let last = Some("{\"cursor\":99}".to_owned());
    until("bob and cat see ann's last cursor", || {
        seen(&docs[1], "ann") == last && seen(&docs[2], "ann") == last
    })
    .await;
    assert_eq!(metric("pagesync_broadcasts_refused_total"), 0);
    assert_eq!(metric("pagesync_steps_total"), steps, "presence is never journaled");
    // Cat leaves: the others are told at once.
    drop(docs.pop());
    drop(clients.pop());
    until("cat is gone for ann and bob", || docs.iter().all(|d| seen(d, "cat").is_none())).await;
    assert_eq!(seen(&docs[1], "ann"), last, "the others' presence stays");

    // A raw client that floods: the others hear at most one of its values per 25 ms, the last
    // one always; too large ones and ones for a document it did not subscribe to are refused,
    // and its connection carries on.
    let held = metric("pagesync_broadcasts_held_total");
    let mut ws = connect(port, &named("eve")).await;
    let key = TimelineKey::insecure_from_u128(0xe7e);
    send(&mut ws, Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true })
        .await;
    let flood = Instant::now();
    for i in 0..50u8 {
        send(&mut ws, Message::Broadcast { doc, value: vec![b'a' + i % 26] }).await;
    }
    send(&mut ws, Message::Broadcast { doc, value: vec![0; pagesync::protocol::MAX_BROADCAST_BYTES + 1] })
        .await;
    let other = DocId::from_u128(0x9e6);
    send(&mut ws, Message::Broadcast { doc: other, value: vec![1] }).await;
    let (mut large, mut unsubscribed) = (0, 0);
    // In either order: the oversized one waits behind the Subscribe while the document opens,
    // the other document's is refused at once.
    while large == 0 || unsubscribed == 0 {
        match next_reply(&mut ws).await.expect("the connection stays open") {
            Message::Error { code, .. } if code == codes::TOO_LARGE => large += 1,
            Message::Error { code, doc: Some(d), .. } if code == codes::MALFORMED && d == other => {
                unsubscribed += 1
            }
            Message::Error { code, message, .. } => panic!("{code}: {message}"),
            _ => {}
        }
    }
    assert_eq!((large, unsubscribed), (1, 1));
    // The server saw the flood within this window (between the first send and the reply to
    // the last): at most one value per 25 ms of it was told, the rest held back.
    let told = 2 + flood.elapsed().as_millis() as u64 / pagesync::protocol::MIN_BROADCAST_MS as u64;
    let last = String::from_utf8(vec![b'a' + 49 % 26]).expect("text");
    until("eve's last value reached the others", || seen(&docs[0], "eve").as_deref() == Some(last.as_str()))
        .await;
    // The hub copies its counters into /metrics at the end of the turn that sent the replies
    // above: a read can come first, so the count is read until it stops short of the bound
    // for a while.
    let expected = 50u64.saturating_sub(told);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut held_now = metric("pagesync_broadcasts_held_total") - held;
    while held_now < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        held_now = metric("pagesync_broadcasts_held_total") - held;
    }
    assert!(held_now >= expected, "a flood of 50 is held back: {held_now} held, {told} may be told");
}

/// A timeline's id is public (presence shows it, every storage entry names it), its key is
/// not: another client, with its own write token, can neither write into a victim's timeline
/// (taking the LSN the victim's next write needs, which the server would then skip as done)
/// nor subscribe as it. The victim's writes all land, the attacker's none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_writes_to_another_clients_timeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = format!("file://{}", dir.path().join("store").display());
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret_file(dir.path())]);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc = DocId::from_u128(0x71e);
    let alice_client =
        pagesync_client::Client::connect(&url, &named("alice"), dir.path().join("alice")).expect("alice");
    let alice = alice_client.open(doc).expect("open");
    alice.execute("CREATE TABLE t(v TEXT)", vec![]).expect("ddl");
    alice.sync(Duration::from_secs(20)).await.expect("sync");
    alice.broadcast("{}").expect("broadcast");
    // Mallory learns alice's timeline from presence, as any subscriber can.
    let mallory_client =
        pagesync_client::Client::connect(&url, &named("mallory"), dir.path().join("mallory"))
            .expect("mallory");
    let mallory = mallory_client.open(doc).expect("open");
    mallory.sync(Duration::from_secs(20)).await.expect("sync");
    until("mallory sees alice", || mallory.presence().iter().any(|p| p.subject == "alice")).await;
    let victim = mallory.presence().into_iter().find(|p| p.subject == "alice").expect("alice").timeline;
    let key_file = dir.path().join("alice").join(doc.to_string()).join("timeline.key");
    let key = TimelineKey::from_file_bytes(&std::fs::read(key_file).expect("alice's key")).expect("32 bytes");
    assert_eq!(victim, key.id(), "presence names alice's timeline");

    // Alice's next write is her LSN 2: mallory tries to take it, unsubscribed and subscribed
    // under her own key (refused, nothing taken), and subscribing with a made-up key gives a
    // timeline of its own.
    let evil = mutation("INSERT INTO t VALUES ('evil')");
    let mut ws = connect(port, &named("mallory")).await;
    for subscribed in [false, true] {
        if subscribed {
            let key = TimelineKey([0x66; 32]);
            send(
                &mut ws,
                Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true },
            )
            .await;
            match next_reply(&mut ws).await {
                Some(Message::MutationsAck { timeline, .. }) => assert_eq!(timeline, key.id()),
                other => panic!("expected mallory's own subscription, got {other:?}"),
            }
        }
        let first = Lsn::new(2).expect("lsn");
        send(&mut ws, Message::Mutations { doc, timeline: victim, first, entries: vec![evil.clone()] }).await;
        let reply = loop {
            match next_reply(&mut ws).await {
                Some(Message::Presence { .. }) => continue,
                other => break other,
            }
        };
        match reply {
            Some(Message::Error { code, message, .. }) => {
                assert_eq!(code, codes::NOT_SUBSCRIBED, "{message}");
                assert!(message.contains("key"), "{message}");
            }
            other => panic!("expected not_subscribed, got {other:?}"),
        }
    }
    // Alice's writes all land; mallory's does not, on either replica.
    alice.execute("INSERT INTO t VALUES ('alice 2')", vec![]).expect("write");
    alice.sync(Duration::from_secs(20)).await.expect("sync");
    let want = vec![vec![pagesync::Value::Text("alice 2".into())]];
    assert_eq!(alice.query("SELECT v FROM t", &[]).expect("query").rows, want);
    until("mallory's replica has alice's row", || {
        mallory.query("SELECT v FROM t", &[]).is_ok_and(|r| r.rows == want)
    })
    .await;
    assert_eq!(alice.status().pending, 0, "alice's write was confirmed, not skipped");
}

/// A peer that floods pings (each makes the server queue a pong) and never reads is closed
/// once it passes `MAX_CONTROL_FRAMES_PER_INTERVAL`: without that bound, 20 million pings
/// grew the server by gigabytes of queued pongs and the connection stayed open. Other
/// clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_pings_or_empty_fragments_close_their_connection() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    // A message in 1 KiB fragments passes, however many there are.
    let doc = DocId::from_u128(0xf1);
    write(port, "", doc, 1, "CREATE TABLE t(x)").await;
    let mut ws = connect(port, "").await;
    let key = TimelineKey([2; 32]);
    send(&mut ws, Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true })
        .await;
    let sql = format!("INSERT INTO t VALUES ('{}')", "x".repeat(200_000));
    let entries = vec![mutation(&sql)];
    let frame = Message::Mutations { doc, timeline: key.id(), first: Lsn::FIRST, entries }.encode();
    let pieces: Vec<&[u8]> = frame.chunks(1024).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = OpCode::Data(if i == 0 { Data::Binary } else { Data::Continue });
        let piece = Frame::message(piece.to_vec(), opcode, i + 1 == pieces.len());
        ws.send(Ws::Frame(piece)).await.expect("fragment");
    }
    loop {
        match next_reply(&mut ws).await.expect("open after the fragments") {
            Message::MutationsAck { next_expected, .. } if next_expected > Lsn::FIRST => break,
            Message::Error { code, message, .. } => panic!("{code}: {message}"),
            _ => {}
        }
    }
    // Pings, and empty fragments of a message that never ends (each costs the server a
    // frame's parsing and never reaches the session), close their connection.
    let mut pings = connect(port, "").await;
    let mut fragments = connect(port, "").await;
    let open = Frame::message(Vec::new(), OpCode::Data(Data::Binary), false);
    fragments.send(Ws::Frame(open)).await.expect("first fragment");
    for (flood, what) in [(&mut pings, "pings"), (&mut fragments, "empty fragments")] {
        let mut sent = 0;
        for _ in 0..10_000 {
            let frame = match what {
                "pings" => Ws::Ping(vec![7u8; 125].into()),
                _ => Ws::Frame(Frame::message(Vec::new(), OpCode::Data(Data::Continue), false)),
            };
            if flood.send(frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = flood.next().await {}
        });
        assert!(closed.await.is_ok(), "the connection is still open after {sent} {what}");
    }
    assert_eq!(support::probe::metric(port, "pagesync_control_floods_total"), 2);
    write(port, "", DocId::from_u128(0xf2), 1, "CREATE TABLE t(x)").await;
    drop(server);
}

/// Settings the server could not serve with, and tokens that could never open anything, are
/// refused when they are given, not met later as clients that only time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_settings_and_tokens_are_refused_up_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_pagesync-server");
    let store = format!("file://{}", dir.path().display());
    for (flags, says) in [
        (vec!["--max-frame-bytes", "0"], "--max-frame-bytes 0 is below"),
        (vec!["--max-connections", "0"], "--max-connections 0"),
        // A value too small for pagesync's own schema: every document failed to open.
        (vec!["--max-value-bytes", "300"], "--max-value-bytes"),
        // Nothing would be confirmed for a day.
        (vec!["--commit-interval-ms", "99999999"], "--commit-interval-ms"),
        (vec!["--retention", "30"], "no unit"),
        (vec!["--web", "/no/such/dir"], "not a directory"),
    ] {
        let out = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--journal", &store])
            .args(&flags)
            .output()
            .expect("pagesync-server");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{flags:?}: {err}");
    }
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let secret = secret.to_str().expect("utf-8");
    for (doc, ttl) in [("nothex", "1h"), ("abc*x", "1h"), ("0123", "1h"), ("0123*", "0s"), ("0123*", "0d")] {
        let out = Command::new(bin)
            .args(["--auth-secret-file", secret, "token", "--doc", doc, "--ttl", ttl])
            .output()
            .expect("token");
        assert!(!out.status.success(), "a token minted for --doc {doc} --ttl {ttl}");
    }
    // A metrics-only token opens no document: forbidden, like on every other route.
    let (_server, port) = start_on_any_port(&store, &["--auth-secret-file", secret]);
    let metrics_only = token("none", false, true);
    let doc = "00000000000000000000000000000abc";
    // The scheme's name is case-insensitive: `bearer` is read as the token too (a 401 would
    // say none was given).
    for (route, scheme) in
        [("export", "Bearer"), ("history", "Bearer"), ("export", "bearer"), ("history", "BEARER")]
    {
        let (status, body) = get(
            port,
            &format!("/v1/docs/{doc}/{route}"),
            &format!("authorization: {scheme} {metrics_only}\r\n"),
        );
        assert_eq!(status, 403, "{route} with {scheme}: {}", String::from_utf8_lossy(&body));
    }
}

/// Raw bytes to the server, and its whole answer.
fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Every route answers a method it does not take with 405 naming the ones it does (a `POST`
/// to `/healthz` or a `PUT` to an export was answered as a `GET`); `HEAD /healthz` has no
/// body; a head of bare line feeds is read at once; the head bound is exact; and a websocket
/// handshake the server cannot take is answered with what is wrong, not a closed socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_methods_heads_and_handshakes_get_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let doc = "00000000000000000000000000000abc";
    for (method, path, allow) in [
        ("POST", "/healthz".to_owned(), "GET, HEAD"),
        ("DELETE", "/metrics".to_owned(), "GET, HEAD"),
        ("PUT", format!("/v1/docs/{doc}/export"), "GET, HEAD"),
        ("DELETE", format!("/v1/docs/{doc}/export"), "GET, HEAD"),
        ("PUT", format!("/v1/docs/{doc}"), "GET, HEAD, DELETE"),
        ("POST", format!("/v1/docs/{doc}/history"), "GET, HEAD, OPTIONS"),
        ("POST", "/v1/sync".to_owned(), "GET, HEAD"),
    ] {
        let answer = raw(port, format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes());
        assert!(answer.starts_with("HTTP/1.1 405"), "{method} {path}: {answer}");
        assert!(answer.contains(&format!("allow: {allow}\r\n")), "{method} {path}: {answer}");
    }
    // A parameter a route would ignore is refused: `?at=` asked for a past point and got the
    // current state.
    for (method, path, what) in [
        ("GET", format!("/v1/docs/{doc}/export?at=lsn:1"), "\"at\""),
        ("GET", format!("/v1/docs/{doc}/export?token=&{}", "z".repeat(500)), "\"zzz"),
        ("DELETE", format!("/v1/docs/{doc}?force=1"), "\"force\""),
        ("GET", format!("/v1/docs/{doc}/history?at=1"), "\"at\""),
        // Which of two would count is a guess: neither.
        ("GET", format!("/v1/docs/{doc}/history?limit=1&limit=2"), "\"limit\" is given twice"),
        ("GET", format!("/v1/docs/{doc}/export?token=a&token=b"), "token= is given twice"),
        ("GET", "/healthz?verbose=1".to_owned(), "\"verbose\""),
        ("HEAD", "/healthz?x".to_owned(), ""),
        ("GET", "/metrics?format=json".to_owned(), "\"format\""),
        ("GET", "/v1/sync?doc=1".to_owned(), "\"doc\""),
    ] {
        let answer = raw(port, format!("{method} {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains(what), "{method} {path}: {answer}");
        assert!(answer.len() < 400, "the parameter is echoed whole: {answer}");
    }
    let answer = raw(port, b"HEAD /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("\r\n\r\n"), "{answer}");
    assert!(answer.contains("content-length: 3\r\n"), "HEAD's length is not GET's: {answer}");
    // Every GET route takes HEAD: GET's status and length, no body.
    for path in ["/metrics".to_owned(), format!("/v1/docs/{doc}/export"), "/v1/sync".to_owned()] {
        let get = raw(port, format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes());
        let head = raw(port, format!("HEAD {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes());
        let (get_head, body) = get.split_once("\r\n\r\n").expect("a head");
        assert!(!body.is_empty(), "GET {path}: {get}");
        assert!(head.ends_with("\r\n\r\n") && head.len() == get_head.len() + 4, "HEAD {path}: {head}");
        let status = |a: &str| a.split("\r\n").next().map(str::to_owned);
        assert_eq!(status(&head), status(&get), "HEAD {path}: {head}");
        let length = |a: &str| a.lines().find(|l| l.starts_with("content-length:")).map(str::to_owned);
        if path != "/metrics" {
            // (The metrics change between two requests.)
            assert_eq!(length(&head), length(&get), "HEAD {path}: {head}");
        }
    }
    let started = Instant::now();
    let answer = raw(port, b"GET /healthz HTTP/1.1\nhost: localhost\n\n");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "a bare-LF head waited {:?}", started.elapsed());
    // The bound is on the head, to the byte: one under it is served, one over it is not.
    let head = |len: usize| {
        let pad = len - "GET /healthz HTTP/1.1\r\nx: \r\n\r\n".len();
        format!("GET /healthz HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(pad))
    };
    assert!(raw(port, head(16 << 10).as_bytes()).starts_with("HTTP/1.1 200"));
    assert!(raw(port, head((16 << 10) + 1).as_bytes()).starts_with("HTTP/1.1 431"));
    let ws = "GET /v1/sync HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: upgrade\r\n";
    let answer = raw(
        port,
        format!("{ws}sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 8\r\n\r\n")
            .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 426") && answer.contains("sec-websocket-version: 13"), "{answer}");
    let answer = raw(port, format!("{ws}sec-websocket-version: 13\r\n\r\n").as_bytes());
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("Sec-WebSocket-Key"), "{answer}");
    // Without `Connection: Upgrade`, or over HTTP/1.0, it is answered, not hung up on.
    let key = "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n";
    for (head, needle) in [
        (
            "GET /v1/sync HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: keep-alive\r\n",
            "Connection: Upgrade",
        ),
        (
            "GET /v1/sync HTTP/1.0\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: upgrade\r\n",
            "HTTP/1.1",
        ),
    ] {
        let answer = raw(port, format!("{head}{key}\r\n").as_bytes());
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains(needle), "{head}: {answer}");
    }
    // A TLS client at this plain server is told at once, not after the head deadline.
    let started = Instant::now();
    let answer = raw(port, &[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]);
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("not TLS"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2), "a TLS hello waited {:?}", started.elapsed());
}

/// The last words to a connection the server closes arrive, after whatever was queued before
/// them: a subscription's answers, then the error that ends it. (The writer once polled its
/// "closed" signal again after it had fired, which panicked the task and lost the error.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_that_closes_a_connection_arrives_after_what_was_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let a = DocId::from_u128(0xa1);
    write(port, "", a, 1, "CREATE TABLE t(x)").await;
    for round in 0..20u8 {
        let mut ws = connect(port, "").await;
        let key = TimelineKey([round.wrapping_add(40); 32]);
        send(
            &mut ws,
            Message::Subscribe { doc: a, key, storage_next: Lsn::FIRST, digests: false, create: true },
        )
        .await;
        ws.send(Ws::Binary(vec![0xff; 64].into())).await.expect("send garbage");
        let mut last = None;
        while let Some(m) = next_reply(&mut ws).await {
            last = Some(m);
        }
        match last {
            Some(Message::Error { code, .. }) => assert_eq!(code, codes::MALFORMED, "round {round}"),
            other => panic!("round {round}: the connection ended without its error: {other:?}"),
        }
    }
}

/// A server without an auth secret serves local programs and pages on a loopback origin only:
/// a page elsewhere that the user opened (its `Origin`) and a name an attacker pointed at
/// 127.0.0.1 (its `Host`: DNS rebinding) get 403 on every route, the websocket included, so
/// neither reads nor writes a document through the user's browser. With a secret, the token
/// decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_only_loopback_names_and_origins_are_served() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let a = DocId::from_u128(0xa);
    write(port, "", a, 1, "CREATE TABLE t(x)").await;
    let status = |answer: &str| answer.split_whitespace().nth(1).unwrap_or("").to_owned();
    let routes = [format!("/v1/docs/{a}/export"), format!("/v1/docs/{a}/history"), "/healthz".into()];
    for route in &routes {
        for (host, origin, want) in [
            ("localhost:1", "", "200"),
            ("127.0.0.1", "origin: http://localhost:3000\r\n", "200"),
            ("[::1]:8787", "origin: https://app.localhost\r\n", "200"),
            ("attacker.example", "", "403"),
            ("127.0.0.1.attacker.example", "", "403"),
            ("localhost", "origin: http://attacker.example\r\n", "403"),
            ("localhost", "origin: http://localhost.attacker.example:80\r\n", "403"),
            ("localhost", "origin: null\r\n", "403"),
            ("localhost:1@attacker.example", "", "403"),
            ("localhost", "origin: http://localhost:80@attacker.example\r\n", "403"),
            ("localhost\r\nhost: attacker.example", "", "403"),
            ("attacker.example\r\nhost: localhost", "", "403"),
            ("localhost", "origin: http://localhost\r\norigin: http://attacker.example\r\n", "403"),
        ] {
            let answer =
                raw(port, format!("GET {route} HTTP/1.1\r\nhost: {host}\r\n{origin}\r\n").as_bytes());
            assert_eq!(status(&answer), want, "{route}, host {host}, {origin}: {answer}");
        }
    }
    // The absolute form is taken (RFC 9112), its authority standing for the Host.
    let absolute = |authority: &str| {
        let request = format!("GET http://{authority}/healthz?token=1 HTTP/1.1\r\nhost: localhost\r\n\r\n");
        status(&raw(port, request.as_bytes()))
    };
    assert_eq!(absolute("127.0.0.1:1"), "200");
    assert_eq!(absolute("attacker.example"), "403", "the Host header stood for the target's authority");
    let ws = |origin: &'static str| async move {
        let mut req = format!("ws://127.0.0.1:{port}/v1/sync").into_client_request().expect("request");
        req.headers_mut().insert("origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(req).await
    };
    assert!(ws("http://127.0.0.1:5173").await.is_ok(), "a page on a loopback origin connects");
    match ws("http://attacker.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => assert_eq!(answer.status(), 403),
        other => panic!("a page elsewhere connected: {other:?}"),
    }

    // With a secret, any origin and name may try: the token decides.
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_file(dir.path());
    let journal = format!("file://{}", dir.path().join("store").display());
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret]);
    let answer =
        raw(port, b"GET /healthz HTTP/1.1\r\nhost: pagesync.example\r\norigin: https://app.example\r\n\r\n");
    assert_eq!(status(&answer), "200", "{answer}");
}

/// A token is good until it expires, not for as long as its connection lasts: at its `exp`
/// the server closes the connection `unauthorized`, though the client said nothing since
/// (a subscription would otherwise go on receiving, and a prefix grant go on opening and
/// creating documents, for as long as the socket stays up); a new connection with it is
/// refused at `Hello`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expires_on_a_connection_already_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let secret = secret_file(dir.path());
    let (_server, port) =
        start_on_any_port(&format!("file://{}", store.display()), &["--auth-secret-file", &secret]);
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let exp = now_s as i64 + 2;
    let claims =
        Claims { doc: "*".into(), write: true, exp, metrics: false, admin: false, sub: None, call: None };
    let short = mint(SECRET, &claims);
    let mut ws = connect(port, &short).await;
    let (doc, key) = (DocId::from_u128(0xe1), TimelineKey([3; 32]));
    let subscribe = Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true };
    send(&mut ws, subscribe.clone()).await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::MutationsAck { .. })), "served before exp");

    // Nothing more is said; the server closes the connection at exp.
    let started = Instant::now();
    match next_reply(&mut ws).await {
        Some(Message::Error { code, message, .. }) => {
            assert_eq!(code, codes::UNAUTHORIZED, "{message}");
            assert!(message.contains("expired"), "{message}");
        }
        other => panic!("expected the connection closed as unauthorized, got {other:?}"),
    }
    assert!(next_reply(&mut ws).await.is_none(), "the connection stays open after its token expired");
    assert!(started.elapsed() < Duration::from_secs(10), "closed long after exp: {:?}", started.elapsed());

    let mut again = connect(port, &short).await;
    send(&mut again, subscribe).await;
    match next_reply(&mut again).await {
        Some(Message::Error { code, .. }) => assert_eq!(code, codes::UNAUTHORIZED),
        other => panic!("an expired token was let in: {other:?}"),
    }
}

/// A second `Hello` takes the place of the connection's grant: a new token that does not
/// grant a document the connection is subscribed to closes the connection `forbidden`, so a
/// token for another document cannot carry on a subscription past the old token's `exp` (the
/// subscription went on streaming while the server answered `forbidden` to its head asks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_token_does_not_carry_on_what_it_does_not_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_file(dir.path());
    let (_server, port) = start_on_any_port(
        &format!("file://{}", dir.path().join("store").display()),
        &["--auth-secret-file", &secret],
    );
    let (a, b) = (DocId::from_u128(0xa1), DocId::from_u128(0xb1));
    let mut ws = connect(port, &token(&a.to_string(), true, false)).await;
    let subscribe = Message::Subscribe {
        doc: a,
        key: TimelineKey([5; 32]),
        storage_next: Lsn::FIRST,
        digests: false,
        create: true,
    };
    send(&mut ws, subscribe).await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::MutationsAck { .. })), "subscribed");
    // A token for the same document, renewed: the subscription goes on.
    send(&mut ws, Message::Hello { version: PROTOCOL_VERSION, token: token(&a.to_string(), false, false) })
        .await;
    send(&mut ws, Message::HeadAsk { doc: a, id: 7 }).await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::Head { .. })), "the renewed token kept it");
    // A token for another document only: the connection is closed, saying why.
    send(&mut ws, Message::Hello { version: PROTOCOL_VERSION, token: token(&b.to_string(), true, false) })
        .await;
    match next_reply(&mut ws).await {
        Some(Message::Error { doc: None, code, message }) => {
            assert_eq!(code, codes::FORBIDDEN, "{message}");
            assert!(message.contains(&a.to_string()), "{message}");
        }
        other => panic!("expected the connection closed forbidden, got {other:?}"),
    }
    assert!(next_reply(&mut ws).await.is_none(), "the connection stays open, subscribed to {a}");
}

/// A client whose token expires while it is connected backs off: closed `unauthorized` at
/// `exp`, it is refused at `Hello` on every attempt after, and it does not connect again at
/// once each time (the backoff used to start over at every handshake the server took, which
/// made about seven connections a second, forever); its document says why, and
/// `Client::set_token` takes it up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_token_expired_backs_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = secret_file(dir.path());
    let journal = format!("file://{}", dir.path().join("store").display());
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret]);
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis();
    let exp = (now_ms() / 1000) as i64 + 2;
    let claims =
        Claims { doc: "*".into(), write: true, exp, metrics: false, admin: false, sub: None, call: None };
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let client =
        pagesync_client::Client::connect(&url, &mint(SECRET, &claims), dir.path().join("c")).expect("client");
    let doc = client.open(DocId::from_u128(0xe2)).expect("open");
    doc.execute("CREATE TABLE t(x)", vec![]).expect("write");
    doc.sync(Duration::from_secs(10)).await.expect("synced before exp");

    let connections = || {
        let (_, body) =
            get(port, "/metrics", &format!("authorization: Bearer {}\r\n", token("none", false, true)));
        let text = String::from_utf8_lossy(&body).into_owned();
        let line = text.lines().find(|l| l.starts_with("pagesync_connections_total ")).expect("the counter");
        line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).expect("a count")
    };
    let past_exp = (exp as u128 * 1000 + 500).saturating_sub(now_ms());
    tokio::time::sleep(Duration::from_millis(past_exp as u64)).await;
    let before = connections();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts = connections() - before - 1; // the first read of the counter was one
    assert!(attempts <= 10, "{attempts} connections in 4 s after the token expired");
    let why = doc.sync(Duration::ZERO).await.expect_err("an expired token syncs nothing").to_string();
    assert!(why.contains("unauthorized") || why.contains("expired"), "{why}");

    // A new token for the same subject takes it up again, with the write made meanwhile.
    let fresh = Claims { exp: exp + 3_600, ..claims.clone() };
    let other = Claims { sub: Some("someone else".into()), ..fresh.clone() };
    assert!(client.set_token(&mint(SECRET, &other)).is_err(), "a token for another subject was taken");
    doc.execute("INSERT INTO t VALUES (1)", vec![]).expect("write while refused");
    client.set_token(&mint(SECRET, &fresh)).expect("set_token");
    doc.sync(Duration::from_secs(15)).await.expect("synced with the new token");
    assert_eq!(doc.status().pending, 0);
}

/// Before `Hello`, a socket without credentials may send one small message: a first message
/// past `MAX_HELLO_BYTES` closes the connection (the websocket would have held a whole frame's
/// worth, about 1.3 MiB, for each of a thousand pending sockets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_larger_than_a_hello_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    let big = vec![7u8; (pagesync_server::http::MAX_HELLO_BYTES + 1) as usize];
    // It may be cut off while sending.
    let _ = ws.send(Ws::Binary(big.into())).await;
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("closed in time");
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Ws::Close(_)))),
        "a first message past the Hello bound was taken: {end:?}"
    );
    // A first message that does not decode is said to be malformed.
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    ws.send(Ws::Binary(vec![0xff; 9].into())).await.expect("send");
    match next_reply(&mut ws).await {
        Some(Message::Error { code, .. }) => assert_eq!(code, codes::MALFORMED),
        other => panic!("expected malformed, got {other:?}"),
    }
    // A Hello of ordinary size still gets in.
    let mut ws = connect(port, "").await;
    send(&mut ws, Message::HeadAsk { doc: DocId::from_u128(1), id: 1 }).await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::Error { .. })), "served after Hello");
}

/// Messages a peer starts and never ends are bounded across all connections: each holds what
/// it sent until its last frame, and a connection whose next bytes do not fit
/// (`arriving_bytes_total`, 128 MiB) is closed. 200 connections each leaving 1 MiB of a message
/// unfinished took the server to 540 MB and kept it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_are_bounded_across_connections() {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let pid = server.0.id();
    let base_kib = rss_kib(pid);
    let fragment = vec![0x5a_u8; 1 << 20];
    let mut open = Vec::new();
    let mut closed = 0;
    for _ in 0..200 {
        let mut ws = connect(port, "").await;
        let first = Frame::message(fragment.clone(), OpCode::Data(Data::Binary), false);
        if ws.send(Ws::Frame(first)).await.is_err() {
            closed += 1;
            continue;
        }
        open.push(ws);
    }
    // Those the bound refused are closed; the rest stay, each holding its fragment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut alive = Vec::new();
    for mut ws in open {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(None | Some(Err(_)) | Some(Ok(Ws::Close(_)))) => closed += 1,
            _ => alive.push(ws),
        }
    }
    let peak_kib = rss_kib(pid);
    eprintln!(
        "{closed} of 200 connections closed; server RSS {base_kib} KiB at rest, {peak_kib} KiB holding the rest"
    );
    assert!(closed >= 40, "only {closed} of 200 unfinished 1 MiB messages were refused");
    assert!(peak_kib < base_kib + (400 << 10), "server RSS {peak_kib} KiB, at rest {base_kib}");
    drop(alive);
    // The server goes on serving.
    let mut ws = connect(port, "").await;
    send(&mut ws, Message::HeadAsk { doc: DocId::from_u128(1), id: 1 }).await;
    assert!(matches!(next_reply(&mut ws).await, Some(Message::Error { .. })), "served after");
}

/// The documents open at once are bounded over every connection (`--max-open-docs`; by default
/// what the open-file limit leaves): past it, a subscription that would open one more is
/// answered `limit`, and the documents already open go on. (Three connections opening 10,000
/// documents each took every descriptor: the server could neither accept a connection nor
/// append to the documents open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_open_at_once_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = format!("file://{}", dir.path().display());
    let (_server, port) = start_on_any_port(&journal, &["--max-open-docs", "3"]);
    let mut ws = connect(port, "").await;
    let subscribe = |n: u128| Message::Subscribe {
        doc: DocId::from_u128(0x0d0c + n),
        key: TimelineKey([n as u8 + 1; 32]),
        storage_next: Lsn::FIRST,
        digests: false,
        create: true,
    };
    for n in 0..3 {
        send(&mut ws, subscribe(n)).await;
        assert!(matches!(next_reply(&mut ws).await, Some(Message::MutationsAck { .. })), "document {n}");
    }
    let mut other = connect(port, "").await;
    send(&mut other, subscribe(3)).await;
    match next_reply(&mut other).await {
        Some(Message::Error { code, message, .. }) => {
            assert_eq!(code, codes::LIMIT, "{message}");
            assert!(message.contains("--max-open-docs"), "{message}");
        }
        other => panic!("a fourth document was opened: {other:?}"),
    }
    // Those open go on taking writes.
    write(port, "", DocId::from_u128(0x0d0c), 1, "CREATE TABLE t(x)").await;
}
