//! A document's history through the real binaries, on files and on S3 (moto): a bank-style
//! run by two subjects (alice through the Rust API, bob through the `pagesync` CLI) with
//! overdrafts the server rejects, read back four ways (the Rust API, the CLI, HTTP, and
//! `pagesync-server history` beside the running server) with the right subjects, times in
//! order, outcomes and storage LSNs, while checkpoints are written; then the server is killed
//! and started again with `--history-admin-only`: the history is all there, and only admin
//! tokens may read it.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pagesync::history::{HistoryOutcome, HistoryPage, HistoryQuery, HistoryRecord, Pager};
use pagesync::journal::{FileJournal, FileJournalOptions, Journal, Lsn};
use pagesync::{DocId, TimelineId, Value};
use pagesync_client::{Client, Document};
use pagesync_server::auth::{Claims, mint};
use support::{cli_as, start_on_any_port};

const SECRET: &[u8] = b"a history test secret of at least 32 bytes!";
const WAIT: Duration = Duration::from_secs(20);

fn token(doc: DocId, sub: &str, write: bool, admin: bool) -> String {
    let claims = Claims {
        doc: doc.to_string(),
        write,
        exp: 4_000_000_000,
        metrics: false,
        admin,
        sub: Some(sub.into()),
        call: None,
    };
    mint(SECRET, &claims)
}

fn server_history(journal: &str, doc: DocId) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["history", "--journal", journal, "--doc", &doc.to_string(), "--json"])
        .output()
        .expect("run pagesync-server history");
    assert!(out.status.success(), "history failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// A GET: the status code and body.
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    support::http_request(port, "GET", path, token)
}

/// Every record over HTTP, `limit` at a time, following `next`.
fn http_history(port: u16, doc: DocId, token: &str, limit: u32) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    let mut after = String::new();
    loop {
        let (status, body) = get(port, &format!("/v1/docs/{doc}/history?limit={limit}{after}"), Some(token));
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let got = page["records"].as_array().expect("records");
        assert!(got.len() <= limit as usize, "a page holds at most its limit");
        records.extend(got.iter().cloned());
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => return records,
        }
    }
}

async fn rust_history(d: &Document) -> HistoryPage {
    let mut pager = Pager::new(HistoryQuery::default(), None);
    while let Some(q) = pager.next_query() {
        pager.take(d.history(q).await.expect("history"));
    }
    pager.finish()
}

/// Whether storage entry `lsn` applied `(timeline, timeline_lsn)`, and whether any entry is a
/// checkpoint's part; read beside the running server.
fn storage_facts(journal: &str, doc: DocId, records: &[HistoryRecord]) -> (bool, bool) {
    let storage: Box<dyn Journal> = match journal.strip_prefix("file://") {
        Some(root) => {
            let opts = FileJournalOptions { read_only: true, ..FileJournalOptions::default() };
            Box::new(
                FileJournal::open(pagesync_server::storage_dir(Path::new(root), doc), opts).expect("storage"),
            )
        }
        None => {
            let rt = tokio::runtime::Handle::current();
            let store = pagesync_server::Store::parse(journal, rt).expect("store");
            store.open_journal(doc).expect("storage")
        }
    };
    let header = |lsn: Lsn| pagesync::storage::decode(&storage.read(lsn).expect("entry")).expect("decode");
    let all_named = records.iter().all(|r| {
        header(r.storage_lsn).applied.iter().any(|a| a.timeline == r.timeline && a.lsn == r.timeline_lsn)
    });
    let checkpoints = storage.range().iter().any(|lsn| header(lsn).checkpoint.is_some());
    (all_named, checkpoints)
}

fn outcomes(records: &[&HistoryRecord]) -> Vec<&'static str> {
    records
        .iter()
        .map(|r| match &r.outcome {
            HistoryOutcome::Applied => "applied",
            HistoryOutcome::Rejected { code, .. } if code == "constraint" => "constraint",
            HistoryOutcome::Rejected { .. } => "other",
        })
        .collect()
}

async fn bank_history(journal: String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let secret = secret.display().to_string();
    // A checkpoint as soon as the entries outgrow the document: several during the run.
    let flags = ["--auth-secret-file", &secret, "--checkpoint-after-bytes", "1"];
    let (mut server, port) = start_on_any_port(&journal, &flags);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc = DocId::from_u128(0x415_7041);

    // Alice, through the Rust API: the accounts, then five withdrawals of 30 from account 1.
    let alice =
        Client::connect(&url, &token(doc, "alice", true, false), dir.path().join("alice")).expect("alice");
    let a = alice.open(doc).expect("open");
    a.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL CHECK (bal >= 0))", vec![])
        .expect("ddl");
    a.execute("INSERT INTO acct VALUES (1, 100), (2, 100)", vec![]).expect("insert");
    a.sync(WAIT).await.expect("synced");
    for _ in 0..5 {
        a.execute("UPDATE acct SET bal = bal - ?1 WHERE id = 1", vec![Value::Integer(30)]).expect("withdraw");
        a.sync(WAIT).await.expect("synced");
    }
    // Bob, through the CLI: four withdrawals of 40 from account 2 (the last two overdraw).
    let bob = token(doc, "bob", true, false);
    for i in 0..4 {
        let out = cli_as(
            port,
            &dir.path().join("bob"),
            doc,
            &bob,
            &["exec", "UPDATE acct SET bal = bal - ?1 WHERE id = 2", "40"],
        );
        assert_eq!(out.status.success(), i < 2, "withdrawal {i}: {}", String::from_utf8_lossy(&out.stderr));
    }
    a.sync(WAIT).await.expect("synced");
    let balances = a.query("SELECT bal FROM acct ORDER BY id", &[]).expect("read").rows;
    assert_eq!(balances, vec![vec![Value::Integer(10)], vec![Value::Integer(20)]]);

    // Read back through the Rust API.
    let page = rust_history(&a).await;
    let records = &page.records;
    assert_eq!(records.len(), 11, "every mutation once: {records:#?}");
    let of = |sub: &str| records.iter().filter(|r| r.subject == sub).collect::<Vec<_>>();
    let (by_alice, by_bob) = (of("alice"), of("bob"));
    assert_eq!((by_alice.len(), by_bob.len()), (7, 4), "each mutation names its sender's subject");
    let timelines = |rs: &[&HistoryRecord]| {
        rs.iter().map(|r| r.timeline).collect::<std::collections::BTreeSet<TimelineId>>()
    };
    assert_eq!(timelines(&by_alice).len(), 1);
    assert_eq!(timelines(&by_bob).len(), 1);
    assert_ne!(timelines(&by_alice), timelines(&by_bob));
    assert_eq!(
        outcomes(&by_alice),
        ["applied", "applied", "applied", "applied", "applied", "constraint", "constraint"]
    );
    assert_eq!(outcomes(&by_bob), ["applied", "applied", "constraint", "constraint"]);
    for (i, r) in by_alice.iter().chain(&by_bob).enumerate() {
        assert!(r.client_ms <= r.received_ms && r.received_ms <= r.applied_ms, "times out of order: {r:?}");
        let expected = if i < 7 { i + 1 } else { i - 6 };
        assert_eq!(r.timeline_lsn.get(), expected as u64, "in timeline order: {r:?}");
    }
    assert!(records.windows(2).all(|w| w[0].storage_lsn <= w[1].storage_lsn), "in the order applied");
    assert_eq!(by_bob[3].statements[0].sql, "UPDATE acct SET bal = bal - ?1 WHERE id = 2");
    assert_eq!(by_bob[3].statements[0].params, vec![Value::Integer(40)]);
    let js = tokio::task::block_in_place(|| storage_facts(&journal, doc, records));
    assert!(js.0, "each record's storage LSN is the entry that applied it");
    assert!(js.1, "checkpoints were written meanwhile");
    let expected: Vec<serde_json::Value> = records.iter().map(|r| r.to_json(doc)).collect();

    // The CLI, with a read-only token of a third subject: a read grant is enough.
    let auditor = token(doc, "auditor", false, false);
    let out = cli_as(port, &dir.path().join("auditor"), doc, &auditor, &["history", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["records"].as_array().expect("records"), &expected, "the CLI lists the same");
    let text = cli_as(port, &dir.path().join("auditor"), doc, &auditor, &["history", "--limit", "2"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("alice  applied CREATE TABLE acct") && text.contains("more: --after"), "{text}");
    // HTTP, three at a time; refused without a token or with another document's.
    assert_eq!(http_history(port, doc, &auditor, 3), expected, "HTTP lists the same");
    assert_eq!(get(port, &format!("/v1/docs/{doc}/history"), None).0, 401);
    let other = token(DocId::from_u128(1), "mallory", true, true);
    assert_eq!(get(port, &format!("/v1/docs/{doc}/history"), Some(&other)).0, 403);
    assert_eq!(get(port, &format!("/v1/docs/{doc}/history?since=yesterday"), Some(&auditor)).0, 400);
    let since = records[9].applied_ms;
    // As an RFC 3339 time, percent-encoded as a browser sends it.
    let at = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(since as u64));
    let encoded = at.to_string().replace(':', "%3A");
    let (status, body) = get(port, &format!("/v1/docs/{doc}/history?since={encoded}"), Some(&auditor));
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let later = records.iter().filter(|r| r.applied_ms >= since).count();
    assert_eq!(page["records"].as_array().expect("records").len(), later, "since: {body}");
    // `pagesync-server history`, beside the running server.
    let offline = tokio::task::block_in_place(|| server_history(&journal, doc));
    assert_eq!(offline["records"].as_array().expect("records"), &expected, "the store lists the same");

    // Killed, and started again keeping the history to admins.
    server.sigkill();
    drop(a);
    drop(alice);
    let flags = ["--auth-secret-file", &secret, "--checkpoint-after-bytes", "1", "--history-admin-only"];
    let (_server, port) = start_on_any_port(&journal, &flags);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let alice =
        Client::connect(&url, &token(doc, "alice", true, false), dir.path().join("alice")).expect("alice");
    let a = alice.open(doc).expect("open");
    a.execute("UPDATE acct SET bal = bal + ?1 WHERE id = 1", vec![Value::Integer(5)]).expect("deposit");
    a.sync(WAIT).await.expect("synced");
    let refused = cli_as(port, &dir.path().join("auditor"), doc, &auditor, &["history"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(get(port, &format!("/v1/docs/{doc}/history"), Some(&auditor)).0, 403);
    let admin = token(doc, "ops", false, true);
    let after_restart = http_history(port, doc, &admin, 1_000);
    assert_eq!(after_restart.len(), 12, "all of it, and the new one");
    assert_eq!(&after_restart[..11], &expected[..], "unchanged by the crash and the restart");
    assert_eq!(after_restart[11]["subject"], "alice");
    assert_eq!(after_restart[11]["outcome"], "applied");
    let offline = tokio::task::block_in_place(|| server_history(&journal, doc));
    assert_eq!(offline["records"].as_array().expect("records"), &after_restart);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    bank_history(format!("file://{}", dir.path().display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_s3() {
    let Some(journal) = support::s3::s3_url("history") else { return };
    bank_history(journal).await;
}

/// `--history off`: nothing is recorded (no history journal), and asking says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_history_records_none_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("server");
    let (_server, port) = start_on_any_port(&format!("file://{}", root.display()), &["--history", "off"]);
    let doc = DocId::from_u128(0x0ff);
    let c =
        Client::connect(&format!("ws://127.0.0.1:{port}/v1/sync"), "", dir.path().join("c")).expect("client");
    let d = c.open(doc).expect("open");
    d.execute("CREATE TABLE t(x)", vec![]).expect("write");
    d.sync(WAIT).await.expect("synced");
    assert!(pagesync_server::storage_dir(&root, doc).exists());
    assert!(!pagesync_server::history_dir(&root, doc).exists(), "no history journal");
    let (status, body) = get(port, &format!("/v1/docs/{doc}/history"), None);
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("keeps no history"), "{body}");
}
