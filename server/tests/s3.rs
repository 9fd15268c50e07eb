//! The real `pagesync-server` binary on `s3://` (moto, started by `scripts/test`): killed with
//! SIGKILL and replaced by a server with nothing on its local disk, and two servers fighting
//! over one document. Skipped when no S3 endpoint is configured (CI always has one).

mod support;

use std::time::Duration;

use pagesync::journal::{Journal, ObjectBackend};
use pagesync::{DocId, MutationState, Value};
use pagesync_client::{Client, Document};
use support::{free_port, start};

const WAIT: Duration = Duration::from_secs(20);

async fn wait_confirmed(doc: &Document, lsn: pagesync::journal::Lsn) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while doc.state(lsn).expect("state") != MutationState::Confirmed {
        assert!(tokio::time::Instant::now() < deadline, "nothing was confirmed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_on_the_same_bucket_serves_every_confirmed_write() {
    let Some(journal) = support::s3::s3_url("kill") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let mut server = start(port, &journal);
    let doc_id = DocId::from_u128(0x53);
    let ca = Client::connect(&url, "", dir.path().join("a")).expect("a");
    let cb = Client::connect(&url, "", dir.path().join("b")).expect("b");
    let (a, b) = (ca.open(doc_id).expect("open"), cb.open(doc_id).expect("open"));
    a.execute("CREATE TABLE w(who TEXT NOT NULL, seq INTEGER NOT NULL)", vec![]).expect("ddl");
    a.sync(WAIT).await.expect("schema synced");
    b.sync(WAIT).await.expect("schema reached b");

    const WRITES: i64 = 150;
    let mut written = Vec::new();
    for seq in 0..WRITES {
        for (who, doc) in [("a", &a), ("b", &b)] {
            let params = vec![Value::Text(who.into()), Value::Integer(seq)];
            written.push((doc, doc.execute("INSERT INTO w VALUES (?1, ?2)", params).expect("write").lsn));
        }
        if seq % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if seq == WRITES / 2 {
            wait_confirmed(&a, written[0].1).await;
            server.sigkill();
        }
    }
    let confirmed: Vec<_> =
        written.iter().filter(|(d, l)| d.state(*l).expect("state") == MutationState::Confirmed).collect();
    assert!(!confirmed.is_empty(), "some writes were confirmed before the kill");
    assert!(a.status().pending + b.status().pending > 0, "some were still pending");

    // The new server has no local state at all: everything comes from the bucket.
    let _server = start(port, &journal);
    a.sync(WAIT).await.expect("a synced after the restart");
    b.sync(WAIT).await.expect("b synced after the restart");
    let fresh = Client::connect(&url, "", dir.path().join("fresh")).expect("fresh");
    let check = fresh.open(doc_id).expect("open");
    check.sync(WAIT).await.expect("fresh synced");
    let rows = check
        .query("SELECT who, seq, count(*) FROM w GROUP BY who, seq ORDER BY who, seq", &[])
        .expect("query")
        .rows;
    assert_eq!(rows.len() as i64, 2 * WRITES, "every write is on the server");
    assert!(rows.iter().all(|r| r[2] == Value::Integer(1)), "each applied exactly once");
    for (doc, lsn) in confirmed {
        assert_eq!(doc.state(*lsn).expect("state"), MutationState::Confirmed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_document_one_keeps_writing_the_other_reports_the_conflict() {
    let Some(journal) = support::s3::s3_url("fence") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (p1, p2) = (free_port(), free_port());
    let _s1 = start(p1, &journal);
    let _s2 = start(p2, &journal);
    let doc_id = DocId::from_u128(0xfe);
    let ca = Client::connect(&format!("ws://127.0.0.1:{p1}/v1/sync"), "", dir.path().join("a")).expect("a");
    let a = ca.open(doc_id).expect("open");
    a.execute("CREATE TABLE w(who TEXT NOT NULL, n INTEGER NOT NULL)", vec![]).expect("ddl");
    a.sync(WAIT).await.expect("a synced");
    // Server 2 opens the document now, as it stands, and then both write the next LSN.
    let cb = Client::connect(&format!("ws://127.0.0.1:{p2}/v1/sync"), "", dir.path().join("b")).expect("b");
    let b = cb.open(doc_id).expect("open");
    b.sync(WAIT).await.expect("b caught up through server 2");
    for n in 0..5 {
        a.execute("INSERT INTO w VALUES ('a', ?1)", vec![Value::Integer(n)]).expect("a write");
    }
    a.sync(WAIT).await.expect("server 1 keeps writing");
    b.execute("INSERT INTO w VALUES ('b', 0)", vec![]).expect("b write");
    // The conflict shows at once (as `storage`: server 2 reopens and tries again later, so a
    // `sync` would wait through it).
    let deadline = std::time::Instant::now() + WAIT;
    let text = loop {
        if let Some((_, message)) = b.status().error {
            break message;
        }
        assert!(std::time::Instant::now() < deadline, "server 2 never reported the conflict");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(text.contains("owned by another server"), "{text}");
    for n in 5..10 {
        a.execute("INSERT INTO w VALUES ('a', ?1)", vec![Value::Integer(n)]).expect("a write");
    }
    a.sync(WAIT).await.expect("server 1 still writes after the conflict");
    assert_eq!(b.status().pending, 1, "b's write waits; it was not applied by the fenced server");

    // The bucket holds one dense history: every LSN once, none of b's writes.
    let rt = tokio::runtime::Handle::current();
    let applied = tokio::task::spawn_blocking(move || {
        let backend = ObjectBackend::from_url(&journal, rt).expect("backend");
        let j =
            backend.open_or_create(&pagesync_server::storage_key(doc_id), doc_id.journal_id()).expect("open");
        let entries = j.range().iter().map(|l| j.read(l).expect("every LSN reads back"));
        let headers = entries.map(|e| pagesync::storage::decode(&e).expect("a storage entry"));
        headers.flat_map(|h| h.applied).map(|a| (a.timeline, a.lsn)).collect::<Vec<_>>()
    })
    .await
    .expect("join");
    let unique: std::collections::HashSet<_> = applied.iter().collect();
    assert_eq!(unique.len(), applied.len(), "no mutation stored twice");
    assert_eq!(applied.len(), 11, "the schema and a's ten writes, nothing of b's");
    let rows = a.query("SELECT count(*) FROM w WHERE who = 'a'", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Integer(10)]]);
    // The history lists what the bucket's storage holds: the loser's attempt is not listed.
    let listed = a.history(pagesync::history::HistoryQuery::default()).await.expect("history").records;
    let listed: Vec<_> = listed.iter().map(|r| (r.timeline, r.timeline_lsn)).collect();
    assert_eq!(listed, applied, "the history names exactly the stored mutations");
}

/// Checkpoints and retention on S3 through the real binary and real websockets: with every
/// step checkpointed and nothing retained, the bucket's history is trimmed; a client that was
/// offline with writes of its own and a new client both restart at the checkpoint, and the
/// offline writes apply exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_retained_history_restart_at_a_checkpoint_on_s3() {
    let Some(journal) = support::s3::s3_url("compact") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = ["--checkpoint-after-bytes", "1", "--retention", "0s", "--commit-interval-ms", "0"];
    let (_server, port) = support::start_on_any_port(&journal, &flags);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc_id = DocId::from_u128(0xc0c);
    let ca = Client::connect(&url, "", dir.path().join("a")).expect("a");
    let a = ca.open(doc_id).expect("open");
    a.execute("CREATE TABLE t(who TEXT NOT NULL, n INTEGER NOT NULL)", vec![]).expect("ddl");
    a.sync(WAIT).await.expect("schema synced");
    {
        // C syncs the schema, then goes away.
        let cc = Client::connect(&url, "", dir.path().join("c")).expect("c");
        cc.open(doc_id).expect("open").sync(WAIT).await.expect("c synced");
    }
    {
        // C offline (nothing listens there): 20 writes of its own.
        let dead = format!("ws://127.0.0.1:{}/v1/sync", free_port());
        let cc = Client::connect(&dead, "", dir.path().join("c")).expect("c offline");
        let c = cc.open(doc_id).expect("open");
        for n in 0..20 {
            c.execute("INSERT INTO t VALUES ('c', ?1)", vec![Value::Integer(n)]).expect("offline write");
        }
    }
    for n in 0..60 {
        a.execute("INSERT INTO t VALUES ('a', ?1)", vec![Value::Integer(n)]).expect("write");
        if n % 10 == 9 {
            a.sync(WAIT).await.expect("a synced");
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["verify", "--journal", &journal, "--doc", &doc_id.to_string()])
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let first: u64 = text
        .split("entries [")
        .nth(1)
        .and_then(|r| r.split("..").next())
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("no entry range in {text}"));
    assert!(first > 10, "the history was trimmed in the bucket: {text}");

    let cc = Client::connect(&url, "", dir.path().join("c")).expect("c back");
    let cb = Client::connect(&url, "", dir.path().join("b")).expect("b new");
    let (c, b) = (cc.open(doc_id).expect("open"), cb.open(doc_id).expect("open"));
    c.sync(WAIT).await.expect("c synced after restarting");
    b.sync(WAIT).await.expect("b synced after restarting");
    a.sync(WAIT).await.expect("a has c's writes");
    let count = "SELECT who, count(*) FROM t GROUP BY who ORDER BY who";
    let want = vec![
        vec![Value::Text("a".into()), Value::Integer(60)],
        vec![Value::Text("c".into()), Value::Integer(20)],
    ];
    for (name, d) in [("a", &a), ("b", &b), ("c", &c)] {
        assert_eq!(d.query(count, &[]).expect("query").rows, want, "{name}");
    }
    assert_eq!(c.status().pending, 0);
}

/// A server pointed at a bucket that does not exist does not start: it exits non-zero at once
/// and names the problem on one line, without a backtrace (even under `RUST_BACKTRACE`). One
/// whose S3 endpoint does not answer starts, and says that it does not.
#[test]
fn a_missing_bucket_stops_the_server_and_a_silent_endpoint_does_not() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let Some(journal) = support::s3::s3_url("check") else { return };
    let bucket = journal.trim_start_matches("s3://").split('/').next().expect("a bucket").to_owned();
    let missing = format!("s3://{bucket}-missing/p");
    let child = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["--listen", "127.0.0.1:0", "--journal", &missing])
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pagesync-server");
    let mut server = support::ServerProcess(child);
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "a server on {missing} is still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut server.0.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(!status.success(), "{err}");
    assert!(err.starts_with("error: the object store refused the server"), "{err}");
    assert!(err.contains("NoSuchBucket") && err.contains(&format!("{bucket}-missing")), "{err}");
    assert!(!err.contains("backtrace"), "{err}");

    // Nothing listens on this port: the store does not answer, and the server serves anyway.
    let silent = format!("http://127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["--listen", "127.0.0.1:0", "--journal", &journal])
        .env("AWS_ENDPOINT_URL", &silent)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pagesync-server");
    let mut server = support::ServerProcess(child);
    let lines = std::io::BufReader::new(server.0.stdout.take().expect("stdout")).lines();
    let (mut warned, mut listening) = (false, false);
    for line in lines {
        let line = line.expect("read the server's log");
        warned |= line.contains("the object store does not answer; serving anyway");
        if line.contains("listening on ws://") {
            listening = true;
            break;
        }
    }
    assert!(warned && listening, "warned: {warned}, listening: {listening}");
}

/// A bucket removed under a running server is an outage, not a missing document: the HTTP
/// routes answer 503 (not 404), and the offline tools say the store failed, on one line.
#[test]
fn a_bucket_removed_under_the_server_is_an_outage_not_a_missing_document() {
    use std::io::{Read, Write};
    use std::process::Command;
    let Some(journal) = support::s3::s3_url("gone") else { return };
    let (_server, port) = support::start_on_any_port(&journal, &[]);
    let bucket = journal.trim_start_matches("s3://").split('/').next().expect("a bucket").to_owned();
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("an endpoint");
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(host).expect("reach S3");
    write!(s, "DELETE /{bucket} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
        .expect("DeleteBucket");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("DeleteBucket's reply");
    assert!(reply.starts_with("HTTP/1.1 204"), "DeleteBucket {bucket}: {reply}");

    let doc = DocId::from_u128(0x90e);
    for (method, path) in [
        ("GET", format!("/v1/docs/{doc}/export")),
        ("GET", format!("/v1/docs/{doc}/history")),
        ("DELETE", format!("/v1/docs/{doc}")),
    ] {
        let (status, body) = support::http_request(port, method, &path, None);
        assert_eq!(status, 503, "{method} {path}: {body}");
        assert!(!body.contains(&bucket), "{method} {path} names the bucket: {body}");
    }
    // `verify` reports a fault per document on stdout; the others fail with one line.
    for tool in ["history", "verify", "delete"] {
        let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
            .args([tool, "--journal", &journal, "--doc", &doc.to_string()])
            .output()
            .expect("run");
        let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{tool}: {said}{err}");
        let told = if tool == "verify" { said.lines().next().unwrap_or("") } else { err.trim_end() };
        assert!(told.contains("NoSuchBucket") && !told.contains("no document"), "{tool}: {said}{err}");
        assert_eq!(told.lines().count(), 1, "{tool}: {said}{err}");
    }
}
