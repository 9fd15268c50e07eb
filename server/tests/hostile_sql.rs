//! Hostile SQL against the real `pagesync-server` and `pagesync` binaries: a client with an
//! ordinary write token sends what the sandbox must refuse or stop (connection pragmas, TEMP
//! triggers, connection-state functions, endless queries, oversized values), as raw frames that
//! skip the client's own checks and through the CLI. Each gets its typed rejection code; other
//! clients' rows and constraints are untouched; a write to another document is confirmed within
//! a second while the budget-exhausting mutations run; nothing wedges the document; and the
//! client's replica stays byte-identical to the server's.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pagesync::journal::Lsn;
use pagesync::protocol::{Message, PROTOCOL_VERSION};
use pagesync::{DocId, Mutation, SqlMutation, TimelineKey};
use support::start_on_any_port;
use tokio_tungstenite::tungstenite::Message as Ws;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const DOC_A: &str = "000000000000000000000000000000a1";
const DOC_B: &str = "000000000000000000000000000000b2";
const DOC_C: &str = "000000000000000000000000000000c3";
/// The raw attacker's timeline.
const EVIL: TimelineKey = TimelineKey([0xee; 32]);
/// The second attacking timeline.
const EVIL2: TimelineKey = TimelineKey([0xdd; 32]);

/// The `pagesync` CLI, built beside the server binary by the workspace build.
fn cli_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_pagesync-server")).with_file_name("pagesync");
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace)", path.display());
    path
}

fn cli(port: u16, data: &Path, doc: &str, args: &[&str]) -> Output {
    Command::new(cli_binary())
        .args(["--server", &format!("ws://127.0.0.1:{port}/v1/sync"), "--doc", doc, "--timeout-ms", "20000"])
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("run pagesync")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "pagesync failed: {}", text(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sends `statements` as raw timeline entries of `timeline`, one mutation each, in one frame,
/// skipping every check a real client makes. Returns the open socket.
async fn raw_mutations(port: u16, doc: &str, key: TimelineKey, statements: &[&str]) -> Socket {
    let timeline = key.id();
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    let doc = doc.parse::<DocId>().expect("doc id");
    let entries = statements
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let body = SqlMutation::one(*s, vec![]).encode();
            Mutation { client_time_ms: 1_700_000_000_000, seed: i as u64, body }.encode().expect("encode")
        })
        .collect();
    for m in [
        Message::Hello { version: PROTOCOL_VERSION, token: String::new() },
        Message::Subscribe { doc, key, storage_next: Lsn::FIRST, digests: false, create: true },
        Message::Mutations { doc, timeline, first: Lsn::FIRST, entries },
    ] {
        ws.send(Ws::Binary(m.encode().into())).await.expect("send");
    }
    ws
}

/// `raw_mutations` as `EVIL`, waiting until the server has taken them all.
async fn send_raw(port: u16, doc: &str, statements: &[&str]) {
    let mut ws = raw_mutations(port, doc, EVIL, statements).await;
    let want = Lsn::new(statements.len() as u64 + 1).expect("lsn");
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.expect("an ack in time");
        if let Some(Ok(Ws::Binary(b))) = frame
            && let Ok(Message::MutationsAck { next_expected, .. }) = Message::decode(&b)
            && next_expected >= want
        {
            return;
        }
    }
}

/// The rejection codes recorded for `EVIL`, by LSN, once `n` are in (read through a replica).
fn evil_rejections(port: u16, data: &Path, n: usize) -> Vec<(u64, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sql = format!(
            "SELECT lsn, code FROM _pagesync_rejections WHERE timeline = x'{}' ORDER BY lsn",
            EVIL.id()
        );
        let out = ok(&cli(port, data, DOC_A, &["query", &sql]));
        let rows: Vec<(u64, String)> = out
            .lines()
            .skip(1)
            .map(|l| {
                let (lsn, code) = l.split_once('\t').expect("two columns");
                (lsn.parse().expect("lsn"), code.to_owned())
            })
            .collect();
        if rows.len() >= n {
            return rows;
        }
        assert!(Instant::now() < deadline, "only {} of {n} rejections arrived", rows.len());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sql_is_refused_or_stopped_and_hurts_nobody_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("file://{}", dir.path().join("store").display());
    let (server, port) = start_on_any_port(&store, &["--max-doc-bytes", "8388608"]);
    let (alice, bob, carol) = (dir.path().join("alice"), dir.path().join("bob"), dir.path().join("carol"));

    let ddl = "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL CHECK (length(body) <= 10))";
    ok(&cli(port, &alice, DOC_A, &["exec", ddl]));
    ok(&cli(port, &alice, DOC_A, &["exec", "INSERT INTO notes(body) VALUES ('mine')"]));

    // Through the CLI, the client refuses before anything leaves it.
    let out = cli(port, &alice, DOC_A, &["exec", "PRAGMA ignore_check_constraints = ON"]);
    assert!(!out.status.success() && text(&out).contains("refused"), "{}", text(&out));

    // As raw frames, the server refuses them itself.
    let refused = [
        "PRAGMA ignore_check_constraints = ON",
        "PRAGMA max_page_count = 2147483646",
        "PRAGMA hard_heap_limit = 100000",
        "PRAGMA cache_size = 1",
        "PRAGMA reverse_unordered_selects = ON",
        "CREATE TEMP TRIGGER t AFTER INSERT ON main.notes BEGIN UPDATE notes SET body = 'pwned'; END",
        "CREATE TEMP TABLE big(x)",
        "INSERT INTO notes(body) VALUES (changes())",
        "INSERT INTO notes(body) VALUES (total_changes())",
    ];
    send_raw(port, DOC_A, &refused).await;
    let codes = evil_rejections(port, &alice, refused.len());
    for ((lsn, code), sql) in codes.iter().zip(refused) {
        assert_eq!(code, "refused", "mutation {lsn} ({sql})");
    }

    // A client of a third document, ready before the attack.
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let client = pagesync_client::Client::connect(&url, "", dir.path().join("dave")).expect("client");
    let dave = client.open(DOC_C.parse().expect("doc")).expect("open");
    dave.execute("CREATE TABLE t(x)", vec![]).expect("ddl");
    dave.sync(Duration::from_secs(20)).await.expect("sync");
    let watching = pagesync_client::Client::connect(&url, "", dir.path().join("watcher")).expect("client");
    let watcher = watching.open(DOC_A.parse().expect("doc")).expect("open");
    watcher.sync(Duration::from_secs(20)).await.expect("sync");

    // Budget-exhausting mutations on A; meanwhile B's writes are confirmed within a second.
    let endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c";
    let heavy: Vec<&str> = std::iter::repeat_n(endless, 8).collect();
    let started = Instant::now();
    // As a second timeline: the first's LSNs 1..9 are taken.
    let attack = tokio::spawn(async move { raw_mutations(port, DOC_A, EVIL2, &heavy).await });
    let _ws = attack.await.expect("attack sent");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Documents step apart: C's writes go on being confirmed at once while A is stepping.
    let mut trips = Vec::new();
    for i in 0..10 {
        let t0 = Instant::now();
        let w = dave.execute("INSERT INTO t VALUES (?1)", vec![pagesync::Value::Integer(i)]).expect("write");
        while dave.state(w.lsn).expect("state") != pagesync::MutationState::Confirmed {
            assert!(t0.elapsed() < Duration::from_secs(10), "C's write {i} was never confirmed");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        trips.push(t0.elapsed().as_millis());
    }
    let b_started = Instant::now();
    ok(&cli(port, &bob, DOC_B, &["exec", "CREATE TABLE t(x)"]));
    let b_ms = b_started.elapsed().as_millis();
    let out = ok(&cli(port, &bob, DOC_B, &["exec", "INSERT INTO t VALUES (1)"]));
    assert!(out.contains("confirmed"), "{out}");
    let sql = format!("SELECT count(*) FROM _pagesync_rejections WHERE timeline = x'{}'", EVIL2.id());
    // The attack was still going when the other documents were measured (asked of a replica
    // of A as it is, without waiting for A: how long eight budgets take depends on the machine).
    let rejected = watcher.query(&sql, &[]).expect("query").rows[0][0].clone();
    assert_ne!(
        rejected,
        pagesync::Value::Integer(8),
        "the attack ended before the other documents were measured"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok(&cli(port, &alice, DOC_A, &["query", &sql])).lines().nth(1) != Some("8") {
        assert!(Instant::now() < deadline, "the budget-exhausting mutations were not all rejected");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a_ms = started.elapsed().as_millis();
    watcher.sync(Duration::from_secs(20)).await.expect("sync");
    let after = watcher.query(&sql, &[]).expect("query").rows[0][0].clone();
    assert_eq!(after, pagesync::Value::Integer(8), "the replica of A that watched the attack saw it end");
    eprintln!(
        "8 budget-exhausting mutations on A took {a_ms} ms; meanwhile a new CLI client's write to B was \
         confirmed in {b_ms} ms and an open client's writes to C in {trips:?} ms"
    );
    assert!(b_ms < 1_000, "a write to another document took {b_ms} ms");
    trips.sort_unstable();
    assert!(trips[trips.len() / 2] < 50, "writes to another document while A steps: {trips:?} ms");
    let codes = ok(&cli(
        port,
        &alice,
        DOC_A,
        &[
            "query",
            &format!("SELECT DISTINCT code FROM _pagesync_rejections WHERE timeline = x'{}'", EVIL2.id()),
        ],
    ));
    assert_eq!(codes.lines().nth(1), Some("too_expensive"), "{codes}");

    // A step over every limit is rejected, not retried forever; the document keeps working.
    let out = cli(port, &carol, DOC_A, &["exec", "INSERT INTO notes(body) VALUES (zeroblob(80000000))"]);
    assert!(!out.status.success() && text(&out).contains("too_big"), "{}", text(&out));
    let out =
        cli(port, &carol, DOC_A, &["exec", "INSERT INTO notes(body) VALUES ('far too long for the check')"]);
    assert!(
        !out.status.success() && text(&out).contains("constraint"),
        "the CHECK still holds: {}",
        text(&out)
    );
    ok(&cli(port, &carol, DOC_A, &["exec", "INSERT INTO notes(body) VALUES ('carol')"]));

    // Alice's row is hers, and every replica holds the server's bytes.
    ok(&cli(port, &alice, DOC_A, &["sync"]));
    let rows = ok(&cli(port, &alice, DOC_A, &["query", "SELECT body FROM notes ORDER BY id"]));
    assert_eq!(rows, "body\nmine\ncarol\n");
    let local = dir.path().join("alice.sqlite");
    ok(&cli(port, &alice, DOC_A, &["export", local.to_str().expect("utf-8 path")]));
    let remote = http_get(port, &format!("/v1/docs/{DOC_A}/export")).await;
    assert!(
        std::fs::read(&local).expect("read export") == remote,
        "alice's replica differs from the server's"
    );

    let metrics = String::from_utf8(http_get(port, "/metrics").await).expect("utf-8 metrics");
    for line in [
        "pagesync_rejections_total{code=\"too_expensive\"} 8",
        "pagesync_rejections_total{code=\"refused\"} 9",
    ] {
        assert!(metrics.lines().any(|l| l == line), "/metrics lacks {line}:\n{metrics}");
    }

    let verify = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["verify", "--journal", &store])
        .output()
        .expect("verify");
    assert!(verify.status.success(), "verify: {}", text(&verify));
    drop(server);
}

/// The body of `GET path`, over a plain TCP connection; asserts a 200.
async fn http_get(port: u16, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("response");
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end") + 4;
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out[..split]));
    out.split_off(split)
}

/// A mutation is stopped at the server's bound on CPU time (1 s by default), though it stays
/// inside the instruction budget (3,000 `printf`s of 16 MB ran 35 s), and a shutdown does not
/// wait for a queue of them: it applies what is queued for at most `SHUTDOWN_FLUSH`, and the
/// rest stays unacknowledged for its client to send again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_mutations_are_stopped_and_do_not_hold_a_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut server, port) = start_on_any_port(&format!("file://{}", dir.path().display()), &[]);
    let slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 3000) \
                SELECT count(*) FROM c WHERE length(printf('%.*c', 16000000 + n, 'x')) < 0";
    let statements = vec![slow; 40];
    let _ws = raw_mutations(port, DOC_C, EVIL, &statements).await;
    // The first is rejected at its CPU bound.
    let data = dir.path().join("reader");
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let out =
            cli(port, &data, DOC_C, &["query", "SELECT code || ': ' || message FROM _pagesync_rejections"]);
        let rows = String::from_utf8_lossy(&out.stdout).into_owned();
        if rows.contains("too_expensive") {
            break rows;
        }
        assert!(Instant::now() < deadline, "nothing rejected yet: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(first.contains("ms of CPU time"), "{first}");
    let started = Instant::now();
    let term = Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status();
    assert!(term.expect("kill").success(), "SIGTERM sent");
    assert!(server.0.wait().expect("exit").success(), "a graceful shutdown exits 0");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "the shutdown waited {took:?} for the queue");
}

/// A queue of mutations that each run to their CPU bound, sent by a client that then leaves,
/// holds up no other writer of the same document: the document steps through them one bound at
/// a time, and between two of its steps what it applied goes to its subscribers, so an honest
/// write that arrives behind them is confirmed after a step or two, not after the whole queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_of_cpu_bound_mutations_holds_up_no_other_writer_of_the_document() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = format!("file://{}", dir.path().display());
    let (_server, port) = start_on_any_port(&root, &["--max-mutation-cpu-ms", "200"]);
    let honest = dir.path().join("honest");
    ok(&cli(port, &honest, DOC_B, &["exec", "CREATE TABLE v(x)"]));
    let slow = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c LIMIT 3000) \
                SELECT count(*) FROM c WHERE length(printf('%.*c', 16000000 + n, 'x')) < 0";
    // 40 of them: at least 8 s of steps.
    send_raw(port, DOC_B, &vec![slow; 40]).await;
    let started = Instant::now();
    let out = ok(&cli(port, &honest, DOC_B, &["exec", "INSERT INTO v VALUES (1)"]));
    let took = started.elapsed();
    assert!(out.contains("confirmed"), "{out}");
    assert!(took < Duration::from_secs(4), "the honest write waited {took:?} behind the queue");
}

/// A client that never acknowledges its rejections (each empty entry of a frame is one:
/// 100,000 of them in one 0.2 MB frame, where 400,000 once grew a document by 45 MB) leaves no
/// more than `MAX_TIMELINE_REJECTIONS` of them in the document: what the server had queued of
/// it is dropped, its client told to send it again, nothing more of it is taken, and an honest
/// writer of the same document is confirmed as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_acknowledges_its_rejections_cannot_grow_the_document_with_them() {
    use pagesync::server::MAX_TIMELINE_REJECTIONS;
    let dir = tempfile::tempdir().expect("tempdir");
    let root = format!("file://{}", dir.path().display());
    let (_server, port) = start_on_any_port(&root, &[]);
    let honest = dir.path().join("honest");
    ok(&cli(port, &honest, DOC_C, &["exec", "CREATE TABLE v(x)"]));

    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
    let doc = DOC_C.parse::<DocId>().expect("doc id");
    let timeline = EVIL.id();
    let flood = |first: u64, n: usize| Message::Mutations {
        doc,
        timeline,
        first: Lsn::new(first).expect("lsn"),
        entries: vec![Vec::new(); n],
    };
    for m in [
        Message::Hello { version: PROTOCOL_VERSION, token: String::new() },
        Message::Subscribe { doc, key: EVIL, storage_next: Lsn::FIRST, digests: false, create: false },
        flood(1, 100_000),
    ] {
        ws.send(Ws::Binary(m.encode().into())).await.expect("send");
    }
    // The server takes the frame, then says where to send from again: below what it took.
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !acks.windows(2).any(|w: &[u64]| w[1] < w[0]) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, ws.next()).await.expect("the server says it dropped them");
        if let Some(Ok(Ws::Binary(b))) = frame
            && let Ok(Message::MutationsAck { next_expected, .. }) = Message::decode(&b)
        {
            acks.push(next_expected.get());
        }
    }
    let resume = *acks.last().expect("acks");
    assert!(resume <= MAX_TIMELINE_REJECTIONS as u64 + 1, "{acks:?}");
    // Sent again from there, unacknowledged: nothing is taken.
    ws.send(Ws::Binary(flood(resume, 1_000).encode().into())).await.expect("send");
    let refused = loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer");
        if let Some(Ok(Ws::Binary(b))) = frame
            && let Ok(Message::MutationsAck { next_expected, .. }) = Message::decode(&b)
        {
            break next_expected.get();
        }
    };
    assert_eq!(refused, resume, "taken while its rejections are unacknowledged");

    // The honest writer: confirmed at once, and it sees the rejections the document holds.
    let started = Instant::now();
    let out = ok(&cli(port, &honest, DOC_C, &["exec", "INSERT INTO v VALUES (1)"]));
    assert!(out.contains("confirmed"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(4), "the honest write waited {:?}", started.elapsed());
    let kept = ok(&cli(port, &honest, DOC_C, &["query", "SELECT count(*) FROM _pagesync_rejections"]));
    let kept: usize = kept.lines().nth(1).expect("a row").trim().parse().expect("a count");
    assert!(kept > 0 && kept <= MAX_TIMELINE_REJECTIONS, "{kept} rejections kept of 100,000 sent");
    drop(ws);
}
