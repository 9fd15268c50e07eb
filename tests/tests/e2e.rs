//! End to end over real sockets and real files: `pagesync-server` (in process, on a loopback
//! port) and two `pagesync-client`s with their own data directories. The tests that keep data
//! across server restarts run once on file journals and once on S3 (moto).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pagesync::{DocId, MutationState, Value};
use pagesync_client::Client;
use pagesync_server::{Metrics, ServerConfig, Store, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Where a test's server keeps documents: `server/` in the test's directory, or a fresh S3
/// bucket (`None` when no S3 endpoint is configured: the test is skipped).
#[derive(Clone, Copy, Debug)]
enum Backend {
    Files,
    S3,
}

fn store_url(backend: Backend, dir: &Path) -> Option<String> {
    match backend {
        Backend::Files => Some(format!("file://{}", dir.join("server").display())),
        Backend::S3 => pagesync_tests::s3_url("e2e"),
    }
}

async fn start(url: &str, addr: SocketAddr) -> Running {
    start_with(url, addr, None).await
}

async fn start_with(url: &str, addr: SocketAddr, auth_secret: Option<Vec<u8>>) -> Running {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let store = Store::parse(url, tokio::runtime::Handle::current()).expect("store");
    let mut cfg = ServerConfig::new(addr, store);
    cfg.auth_secret = auth_secret;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, cfg, Arc::new(Metrics::default()), async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

impl Running {
    fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("join").expect("server ran");
    }
}

async fn rows(doc: &pagesync_client::Document, sql: &str, want: usize) -> Vec<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = doc.query(sql, &[]).map(|r| r.rows).unwrap_or_default();
        if r.len() >= want || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_and_offline_writes_survive_restarts() {
    two_clients_converge(Backend::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_and_offline_writes_survive_restarts_on_s3() {
    two_clients_converge(Backend::S3).await;
}

async fn two_clients_converge(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = store_url(backend, dir.path()) else { return };
    let server = start(&store, "127.0.0.1:0".parse().expect("addr")).await;
    let url = server.url();
    let doc_id = DocId::from_u128(0xabc);
    let a = Client::connect(&url, "", dir.path().join("a")).expect("a");
    let b = Client::connect(&url, "", dir.path().join("b")).expect("b");
    let (da, db) = (a.open(doc_id).expect("open"), b.open(doc_id).expect("open"));

    da.execute(
        "CREATE TABLE todo(id INTEGER PRIMARY KEY, title TEXT NOT NULL CHECK (length(title) > 0))",
        vec![],
    )
    .expect("ddl");
    da.execute("INSERT INTO todo(title) VALUES (?1)", vec!["from a".into()]).expect("insert");
    da.sync(WAIT).await.expect("a synced");
    assert_eq!(rows(&db, "SELECT title FROM todo", 1).await, vec![vec![Value::Text("from a".into())]]);

    // A bad write is rejected by the server, with its message, and hurts nothing else.
    let bad = db.execute("INSERT INTO todo(title) VALUES ('')", vec![]).expect("queued");
    db.sync(WAIT).await.expect("b synced");
    match db.state(bad.lsn).expect("state") {
        MutationState::Rejected(r) => assert!(r.message.contains("CHECK constraint failed"), "{r}"),
        other => panic!("expected a rejection, got {other:?}"),
    }

    // The server goes away; B keeps writing offline, and even restarts.
    let addr = server.addr;
    server.stop().await;
    let offline =
        db.execute("INSERT INTO todo(title) VALUES ('written offline')", vec![]).expect("offline write");
    assert_eq!(db.state(offline.lsn).expect("state"), MutationState::Pending);
    drop((db, b));
    let b = Client::connect(&url, "", dir.path().join("b")).expect("b again");
    let db = b.open(doc_id).expect("reopen");
    assert_eq!(db.status().pending, 1, "the offline write survived the client restart");

    // The server comes back on the same port and data: everything flows.
    let server = start(&store, addr).await;
    db.sync(WAIT).await.expect("b synced after the restart");
    assert_eq!(db.state(offline.lsn).expect("state"), MutationState::Confirmed);
    let seen = rows(&da, "SELECT title FROM todo ORDER BY id", 2).await;
    assert_eq!(seen, vec![vec![Value::Text("from a".into())], vec![Value::Text("written offline".into())]]);
    server.stop().await;
}

async fn http_get_bytes(addr: SocketAddr, path: &str) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    out
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    String::from_utf8_lossy(&http_get_bytes(addr, path).await).into_owned()
}

/// Opens an exported file with stock SQLite and reads the table back.
fn read_export(bytes: &[u8], file: &Path) -> Vec<String> {
    std::fs::write(file, bytes).expect("write export");
    let conn = rusqlite::Connection::open(file).expect("stock SQLite opens the export");
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity");
    assert_eq!(ok, "ok");
    let mut stmt = conn.prepare("SELECT x FROM t ORDER BY x").expect("prepare");
    stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_share_the_port_and_export_is_a_plain_sqlite_file() {
    http_routes(Backend::Files).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_share_the_port_and_export_is_a_plain_sqlite_file_on_s3() {
    http_routes(Backend::S3).await;
}

async fn http_routes(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(store) = store_url(backend, dir.path()) else { return };
    let server = start(&store, "127.0.0.1:0".parse().expect("addr")).await;
    let client = Client::connect(&server.url(), "", dir.path().join("c")).expect("client");
    let doc = client.open(DocId::from_u128(1)).expect("open");
    doc.execute("CREATE TABLE t(x)", vec![]).expect("ddl");
    doc.execute("INSERT INTO t VALUES ('exported')", vec![]).expect("insert");
    doc.sync(WAIT).await.expect("synced");
    let health = http_get(server.addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    let metrics = http_get(server.addr, "/metrics").await;
    assert!(metrics.contains("pagesync_open_documents 1"), "{metrics}");
    assert!(metrics.contains("pagesync_connections_open 1"), "{metrics}");
    assert!(http_get(server.addr, "/nope").await.starts_with("HTTP/1.1 404"));

    let response = http_get_bytes(server.addr, &format!("/v1/docs/{}/export", doc.id())).await;
    let body_at = response.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert!(response.starts_with(b"HTTP/1.1 200"));
    assert_eq!(
        read_export(&response[body_at..], &dir.path().join("server.sqlite")),
        vec!["exported".to_owned()]
    );
    let missing = http_get(server.addr, &format!("/v1/docs/{}/export", DocId::from_u128(404))).await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(http_get(server.addr, "/v1/docs/not-an-id/export").await.starts_with("HTTP/1.1 400"));

    let local = dir.path().join("client.sqlite");
    doc.export(&local).expect("client export");
    let bytes = std::fs::read(&local).expect("read");
    assert_eq!(read_export(&bytes, &dir.path().join("copy.sqlite")), vec!["exported".to_owned()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_limit_documents_and_writes() {
    use pagesync_server::auth::{Claims, mint};
    let secret = b"0123456789abcdef0123456789abcdef-secret".to_vec();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_url(Backend::Files, dir.path()).expect("files");
    let server = start_with(&store, "127.0.0.1:0".parse().expect("addr"), Some(secret.clone())).await;
    let (ours, theirs) = (DocId::from_u128(0xaa), DocId::from_u128(0xbb));
    let exp = 4_000_000_000;
    let token = |doc: DocId, write: bool| {
        mint(
            &secret,
            &Claims { doc: doc.to_string(), write, exp, metrics: false, admin: false, sub: None, call: None },
        )
    };
    let refused = |e: pagesync_client::ClientError| match e {
        pagesync_client::ClientError::Server { code, message } => (code, message),
        other => panic!("expected a server refusal, got {other}"),
    };
    let short = Duration::from_secs(3);

    // A writer with the right token works.
    let writer = Client::connect(&server.url(), &token(ours, true), dir.path().join("w")).expect("writer");
    let doc = writer.open(ours).expect("open");
    doc.execute("CREATE TABLE t(x)", vec![]).expect("ddl");
    doc.sync(WAIT).await.expect("a write token writes");

    // No token: refused at Hello, with a message that says what to do.
    let anon = Client::connect(&server.url(), "", dir.path().join("anon")).expect("anon");
    let (code, message) = refused(anon.open(ours).expect("open").sync(short).await.expect_err("no token"));
    assert_eq!(code, "unauthorized");
    assert!(message.contains("requires a token"), "{message}");

    // A token for another document: that document stays closed to it.
    let other = Client::connect(&server.url(), &token(theirs, true), dir.path().join("o")).expect("other");
    let (code, _) = refused(other.open(ours).expect("open").sync(short).await.expect_err("wrong doc"));
    assert_eq!(code, "forbidden");

    // A read-only token reads, and its writes are refused with a clear error.
    let reader = Client::connect(&server.url(), &token(ours, false), dir.path().join("r")).expect("reader");
    let rdoc = reader.open(ours).expect("open");
    rdoc.sync(WAIT).await.expect("a read token reads");
    assert!(rdoc.query("SELECT * FROM t", &[]).is_ok(), "the schema arrived");
    rdoc.execute("INSERT INTO t VALUES (1)", vec![]).expect("local write");
    let (code, message) = refused(rdoc.sync(short).await.expect_err("read-only"));
    assert_eq!(code, "forbidden");
    assert!(message.contains("read-only"), "{message}");

    // A forged token (another secret) is refused too.
    let forged = mint(
        b"not the server's secret, 32 bytes+",
        &Claims { doc: "*".into(), write: true, exp, metrics: false, admin: false, sub: None, call: None },
    );
    let f = Client::connect(&server.url(), &forged, dir.path().join("f")).expect("forged");
    let (code, message) = refused(f.open(ours).expect("open").sync(short).await.expect_err("forged"));
    assert_eq!(code, "unauthorized");
    assert!(message.contains("signature"), "{message}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_rerun_on_local_and_remote_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store_url(Backend::Files, dir.path()).expect("files");
    let server = start(&store, "127.0.0.1:0".parse().expect("addr")).await;
    let doc_id = DocId::from_u128(0x5b);
    let a = Client::connect(&server.url(), "", dir.path().join("a")).expect("a");
    let b = Client::connect(&server.url(), "", dir.path().join("b")).expect("b");
    let (da, db) = (a.open(doc_id).expect("open"), b.open(doc_id).expect("open"));
    da.execute("CREATE TABLE n(x INTEGER)", vec![]).expect("ddl");
    da.sync(WAIT).await.expect("synced");
    db.sync(WAIT).await.expect("synced");
    // With nothing of its own pending, `sync` may return on the server's head as it last
    // reported it, before A's table arrived (seen under CI load): wait for the table.
    let deadline = std::time::Instant::now() + WAIT;
    while db.query("SELECT count(*) FROM n", &[]).is_err() {
        assert!(std::time::Instant::now() < deadline, "B never received A's table");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut live = db.subscribe("SELECT count(*) FROM n", vec![]);
    assert_eq!(next(&mut live).await, vec![vec![Value::Integer(0)]], "the rows at once");
    db.execute("INSERT INTO n VALUES (1)", vec![]).expect("local write");
    assert_eq!(next(&mut live).await, vec![vec![Value::Integer(1)]], "a local write");
    da.execute("INSERT INTO n VALUES (2)", vec![]).expect("remote write");
    assert_eq!(next(&mut live).await, vec![vec![Value::Integer(2)]], "a write from another client");
    server.stop().await;
}

async fn next(live: &mut pagesync_client::Subscription) -> Vec<Vec<Value>> {
    tokio::time::timeout(WAIT, live.next()).await.expect("a change in time").expect("rows").rows
}
