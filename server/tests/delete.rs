//! Deleting a document through the real binary, on files and on S3 (moto): only its tombstone
//! stays; a connected client, an old replica with pending writes and a new client all learn
//! `deleted`; nobody re-creates it; `forget` removes a replica.

mod support;

use std::time::{Duration, Instant};

use pagesync::journal::ObjectBackend;
use pagesync::{DocId, Value};
use pagesync_client::{Client, ClientError, Document};
use pagesync_server::auth::{Claims, mint};
use support::{free_port, start_on_any_port};

const SECRET: &[u8] = b"a deletion test secret of at least 32 bytes";
const WAIT: Duration = Duration::from_secs(20);

fn token(doc: DocId, admin: bool) -> String {
    let claims = Claims {
        doc: doc.to_string(),
        write: true,
        exp: 4_000_000_000,
        metrics: false,
        admin,
        sub: None,
        call: None,
    };
    mint(SECRET, &claims)
}

/// An HTTP request with a bearer token: the status code and body.
fn request(port: u16, method: &str, path: &str, token: &str) -> (u16, String) {
    support::http_request(port, method, path, Some(token))
}

async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn deleted(d: &Document) -> bool {
    d.status().deleted
}

/// Everything of the document's storage that is left, on files or in the bucket.
async fn storage_left(journal: &str, doc: DocId) -> Vec<String> {
    if let Some(root) = journal.strip_prefix("file://") {
        let root = std::path::Path::new(root);
        assert!(pagesync_server::tombstone_path(root, doc).exists(), "a tombstone");
        let dirs = [pagesync_server::storage_dir(root, doc), pagesync_server::history_dir(root, doc)];
        return dirs.iter().filter(|d| d.exists()).map(|d| d.display().to_string()).collect();
    }
    let (bucket, rt) = (journal.to_owned(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        let b = ObjectBackend::from_url(&bucket, rt).expect("backend");
        assert!(b.read_object(&pagesync_server::tombstone_key(doc)).expect("get").is_some(), "a tombstone");
        [pagesync_server::storage_key(doc), pagesync_server::history_key(doc)]
            .iter()
            .flat_map(|prefix| b.list_objects(prefix, true).expect("list"))
            .map(|i| i.name)
            .collect()
    })
    .await
    .expect("join")
}

/// Whether the document's history journal holds anything, on files or in the bucket.
async fn history_kept(journal: &str, doc: DocId) -> bool {
    if let Some(root) = journal.strip_prefix("file://") {
        return pagesync_server::history_dir(std::path::Path::new(root), doc).exists();
    }
    let (bucket, rt) = (journal.to_owned(), tokio::runtime::Handle::current());
    tokio::task::spawn_blocking(move || {
        let b = ObjectBackend::from_url(&bucket, rt).expect("backend");
        !b.list_objects(&pagesync_server::history_key(doc), true).expect("list").is_empty()
    })
    .await
    .expect("join")
}

async fn a_deleted_document_is_gone_everywhere_and_never_comes_back(journal: String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    let (_server, port) = start_on_any_port(&journal, &["--auth-secret-file", &secret.display().to_string()]);
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    let doc = DocId::from_u128(0xde1);
    let writer = Client::connect(&url, &token(doc, false), dir.path().join("writer")).expect("writer");
    let w = writer.open(doc).expect("open");
    w.execute("CREATE TABLE t(x INTEGER)", vec![]).expect("ddl");
    for i in 0..5 {
        w.execute("INSERT INTO t VALUES (?1)", vec![Value::Integer(i)]).expect("write");
    }
    w.sync(WAIT).await.expect("synced");
    assert!(history_kept(&journal, doc).await, "the document has a history to delete");
    // An old replica: synced once, then writes offline (nothing listens on its URL).
    {
        let c = Client::connect(&url, &token(doc, false), dir.path().join("old")).expect("old");
        c.open(doc).expect("open").sync(WAIT).await.expect("old synced");
    }
    {
        let dead = format!("ws://127.0.0.1:{}/v1/sync", free_port());
        let c = Client::connect(&dead, &token(doc, false), dir.path().join("old")).expect("old offline");
        c.open(doc).expect("open").execute("INSERT INTO t VALUES (99)", vec![]).expect("offline write");
    }

    let path = format!("/v1/docs/{doc}");
    assert_eq!(request(port, "DELETE", &path, &token(doc, false)).0, 403, "deleting needs the admin claim");
    assert_eq!(request(port, "DELETE", &path, &token(DocId::from_u128(1), true)).0, 403, "for that document");
    let (status, body) = request(port, "DELETE", &path, &token(doc, true));
    assert_eq!(status, 200, "{body}");

    // The connected client learns it, keeps what it has to read, and takes no more writes.
    until("the connected client learns the document was deleted", || deleted(&w)).await;
    assert_eq!(w.status().error.map(|(code, _)| code).as_deref(), Some("deleted"));
    assert!(matches!(
        w.execute("INSERT INTO t VALUES (7)", vec![]),
        Err(ClientError::Core(pagesync::Error::Deleted))
    ));
    assert_eq!(w.query("SELECT count(*) FROM t", &[]).expect("read").rows, vec![vec![Value::Integer(5)]]);
    assert!(storage_left(&journal, doc).await.is_empty(), "only the tombstone stays");

    // The old replica comes back with a pending write: told, and nothing is re-created.
    let old = Client::connect(&url, &token(doc, false), dir.path().join("old")).expect("old back");
    let o = old.open(doc).expect("open");
    until("the old replica learns the document was deleted", || deleted(&o)).await;
    assert_eq!(o.status().pending, 1, "its write was not applied anywhere");
    assert!(storage_left(&journal, doc).await.is_empty(), "an old replica does not re-create it");
    // A new client, and an export, find nothing.
    let fresh = Client::connect(&url, &token(doc, false), dir.path().join("fresh")).expect("fresh");
    let f = fresh.open(doc).expect("open");
    until("a new client learns the document was deleted", || deleted(&f)).await;
    assert_eq!(request(port, "GET", &format!("{path}/export"), &token(doc, false)).0, 404);
    // Remembered: reopened later, the replica says so at once, even offline.
    drop((o, old));
    let again =
        Client::connect(&format!("ws://127.0.0.1:{}/v1/sync", free_port()), "", dir.path().join("old"))
            .expect("again");
    assert!(deleted(&again.open(doc).expect("open")), "a replica remembers its document was deleted");
    drop(again);
    // Forget removes it; a replica in use is refused.
    let in_use = pagesync_client::forget(dir.path().join("writer"), doc);
    assert!(matches!(in_use, Err(ClientError::ReplicaBusy { .. })), "{in_use:?}");
    assert!(pagesync_client::forget(dir.path().join("old"), doc).expect("forget"));
    assert!(!dir.path().join("old").join(doc.to_string()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_on_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_deleted_document_is_gone_everywhere_and_never_comes_back(format!("file://{}", dir.path().display()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_on_s3() {
    let Some(journal) = support::s3::s3_url("delete") else { return };
    a_deleted_document_is_gone_everywhere_and_never_comes_back(journal).await;
}
