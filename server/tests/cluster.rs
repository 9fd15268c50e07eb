//! Three real `pagesync-server` processes over one moto bucket (`--advertise`): clients
//! connected to random servers write to 30 documents; one server is killed with SIGKILL mid
//! traffic, another stopped with SIGTERM. Every document has one writer at a time, every write
//! is applied exactly once, and the documents of a stopped server are served again by the
//! others (after its lease for SIGKILL, handed over at once for SIGTERM). And a server whose
//! S3 goes away for a moment (a TCP relay the test cuts): a client's `sync` waits through it.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use pagesync::journal::{Journal, Lsn, ObjectBackend};
use pagesync::protocol::DocStatus;
use pagesync::{DocId, MutationState, Value};
use pagesync_client::{Client, Document};
use support::probe::metric;
use support::{ServerProcess, free_port, start_with};

const LEASE_MS: u64 = 3_000;
const DOCS: u128 = 30;
const CLIENTS: usize = 10;
const WAIT: Duration = Duration::from_secs(60);

fn url(port: u16) -> String {
    format!("ws://127.0.0.1:{port}/v1/sync")
}

fn start_node(journal: &str) -> (ServerProcess, u16) {
    let port = free_port();
    let advertise = format!("ws://127.0.0.1:{port}");
    let lease = LEASE_MS.to_string();
    let flags = ["--advertise", &advertise, "--lease-ms", &lease, "--commit-interval-ms", "10"];
    (start_with(port, journal, &flags), port)
}

/// Waits until every server sees `n` live servers.
async fn wait_live(ports: &[u16], n: u64) {
    let deadline = Instant::now() + WAIT;
    while !ports.iter().all(|p| metric(*p, "pagesync_cluster_live_servers") == n) {
        assert!(Instant::now() < deadline, "the servers never saw each other");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One write: the document, its handle, the row, and the mutation's LSN in its timeline.
struct Write {
    doc: DocId,
    handle: Document,
    who: String,
    seq: i64,
    lsn: Lsn,
}

fn write(doc: &Document, who: &str, seq: i64) -> Write {
    let params = vec![Value::Text(who.into()), Value::Integer(seq)];
    let lsn = doc.execute("INSERT INTO w VALUES (?1, ?2)", params).expect("local write").lsn;
    Write { doc: doc.id(), handle: doc.clone(), who: who.into(), seq, lsn }
}

/// Writes one row to every document and returns how long each took to be confirmed, for the
/// documents in `of`, sorted.
async fn served_again(docs: &[(DocId, Document)], who: &str, of: &HashSet<DocId>) -> Vec<Duration> {
    let start = Instant::now();
    let writes: Vec<Write> = docs.iter().map(|(_, d)| write(d, who, 0)).collect();
    let mut took = vec![None; writes.len()];
    while took.iter().any(Option::is_none) {
        assert!(start.elapsed() < WAIT, "documents were not served again: {took:?}");
        for (i, w) in writes.iter().enumerate() {
            if took[i].is_none() && w.handle.state(w.lsn).expect("state") == MutationState::Confirmed {
                took[i] = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut took: Vec<Duration> =
        docs.iter().zip(took).filter(|((d, _), _)| of.contains(d)).map(|(_, t)| t.expect("all")).collect();
    took.sort();
    took
}

/// The documents whose lease the server at `port` holds, read from the bucket.
async fn leases_of(journal: &str, port: u16) -> HashSet<DocId> {
    let (bucket, rt) = (journal.to_owned(), tokio::runtime::Handle::current());
    let view = tokio::task::spawn_blocking(move || {
        pagesync_server::cluster::view(&ObjectBackend::from_url(&bucket, rt).expect("backend")).expect("view")
    })
    .await
    .expect("join");
    view.held_by(&view.member_at(&url(port)).expect("a record").id).into_iter().collect()
}

/// A plain GET: the head as text and the body.
fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    http_request(port, "GET", path)
}

/// A request without a body: the head as text and the body.
fn http_request(port: u16, method: &str, path: &str) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "{method} {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").expect("write");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read");
    let end = reply.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    (String::from_utf8_lossy(&reply[..end]).into_owned(), reply[end..].to_vec())
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_serve_each_document_once_and_take_over_from_a_killed_or_stopped_one() {
    let Some(journal) = support::s3::s3_url("cluster") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<(Option<ServerProcess>, u16)> =
        (0..3).map(|_| start_node(&journal)).map(|(s, p)| (Some(s), p)).collect();
    let ports: Vec<u16> = nodes.iter().map(|(_, p)| *p).collect();
    wait_live(&ports, 3).await;

    // Each client is given the three servers, starting from a different one; each document
    // is written by two clients.
    let clients: Vec<Client> = (0..CLIENTS)
        .map(|c| {
            let urls: Vec<String> = (0..3).map(|i| url(ports[(c + i) % 3])).collect();
            Client::connect(&urls.join(","), "", dir.path().join(format!("c{c}"))).expect("client")
        })
        .collect();
    let mut handles: Vec<(usize, DocId, Document)> = Vec::new();
    for d in 0..DOCS {
        let doc = DocId::from_u128(0xc1_0000 + d);
        for c in [d as usize % CLIENTS, (d as usize + CLIENTS / 2) % CLIENTS] {
            let h = clients[c].open(doc).expect("open");
            h.execute("CREATE TABLE IF NOT EXISTS w(who TEXT NOT NULL, seq INTEGER NOT NULL)", vec![])
                .expect("schema");
            handles.push((c, doc, h));
        }
    }
    let mut writes: Vec<Write> = Vec::new();
    let round = |writes: &mut Vec<Write>, seq: i64| {
        for (c, _, h) in &handles {
            writes.push(write(h, &format!("c{c}"), seq));
        }
    };
    let sync_all = |handles: &[(usize, DocId, Document)]| {
        let docs: Vec<Document> = handles.iter().map(|(_, _, h)| h.clone()).collect();
        async move {
            for h in docs {
                h.sync(WAIT).await.unwrap_or_else(|e| panic!("{} did not sync: {e}", h.id()));
            }
        }
    };
    for seq in 1..=5 {
        round(&mut writes, seq);
    }
    sync_all(&handles).await;
    let owned: Vec<u64> = ports.iter().map(|p| metric(*p, "pagesync_cluster_owned_documents")).collect();
    assert_eq!(owned.iter().sum::<u64>(), DOCS as u64, "each document has exactly one server: {owned:?}");
    assert!(owned.iter().all(|n| *n > 0), "documents spread over the servers: {owned:?}");
    let redirects: u64 = ports.iter().map(|p| metric(*p, "pagesync_redirects_total")).sum();
    assert!(redirects > 0, "clients were sent to the servers that hold their documents");
    // Each client wrote down where its redirected documents went, for its next run.
    let urls: Vec<String> = ports.iter().map(|p| url(*p)).collect();
    let remembered: Vec<String> = (0..CLIENTS)
        .flat_map(|c| (0..DOCS).map(move |d| (c, d)))
        .filter_map(|(c, d)| {
            let doc = DocId::from_u128(0xc1_0000 + d);
            std::fs::read_to_string(dir.path().join(format!("c{c}")).join(doc.to_string()).join("server"))
                .ok()
        })
        .collect();
    assert!(!remembered.is_empty(), "redirected documents remember their server");
    assert!(remembered.iter().all(|u| urls.contains(u)), "{remembered:?}");

    // Kill -9 the server with the most documents, mid traffic.
    let victim = (0..3).max_by_key(|i| owned[*i]).expect("three");
    let first_docs: Vec<(DocId, Document)> = {
        let mut seen = HashSet::new();
        handles.iter().filter(|(_, d, _)| seen.insert(*d)).map(|(_, d, h)| (*d, h.clone())).collect()
    };
    let fenced = |ports: &[u16]| -> u64 {
        ports.iter().map(|p| metric(*p, "pagesync_documents_reopened_total")).sum()
    };
    assert_eq!(fenced(&ports), 0, "no journal was fenced: no two servers wrote one document");
    let victims = leases_of(&journal, ports[victim]).await;

    // An export asked of a server that does not hold the document redirects to the one that
    // does, which answers with the file.
    let held = *victims.iter().next().expect("the victim holds documents");
    let other = ports[(victim + 1) % 3];
    let path = format!("/v1/docs/{held}/export");
    let (head, _) = http_get(other, &path);
    assert!(head.starts_with("HTTP/1.1 307"), "{head}");
    let location = format!("location: http://127.0.0.1:{}{path}", ports[victim]);
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    let (head, body) = http_get(ports[victim], &path);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.starts_with(b"SQLite format 3\0"), "a SQLite file");
    assert_eq!(victims.len() as u64, owned[victim], "the bucket's leases match the server's count");
    for seq in 6..=8 {
        round(&mut writes, seq);
    }
    nodes[victim].0.take().expect("running").sigkill();
    for seq in 9..=10 {
        round(&mut writes, seq);
    }
    let after_kill = served_again(&first_docs, "after-kill", &victims).await;
    sync_all(&handles).await;
    let survivors: Vec<u16> = (0..3).filter(|i| *i != victim).map(|i| ports[i]).collect();
    let takeovers: u64 = survivors.iter().map(|p| metric(*p, "pagesync_cluster_takeovers_total")).sum();
    assert_eq!(takeovers, owned[victim], "the survivors took over exactly the killed server's documents");

    // SIGTERM another: it hands its documents over; nobody has to take them over.
    let stopping = survivors[0];
    let last = survivors[1];
    let before = metric(last, "pagesync_cluster_takeovers_total");
    let owned_by_stopping = metric(stopping, "pagesync_cluster_owned_documents");
    assert_eq!(fenced(&survivors), 0, "no journal was fenced after the takeover either");
    let i = ports.iter().position(|p| *p == stopping).expect("a port");
    let stopped = leases_of(&journal, stopping).await;
    let mut server = nodes[i].0.take().expect("running");
    for seq in 11..=12 {
        round(&mut writes, seq);
    }
    let term = std::process::Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status();
    assert!(term.expect("kill").success(), "SIGTERM sent");
    let after_term = served_again(&first_docs, "after-term", &stopped).await;
    assert!(server.0.wait().expect("exit").success(), "a graceful shutdown exits 0");
    sync_all(&handles).await;
    assert_eq!(
        metric(last, "pagesync_cluster_takeovers_total"),
        before,
        "the stopped server's {owned_by_stopping} documents were handed over, not taken over after its lease"
    );
    assert_eq!(metric(last, "pagesync_cluster_owned_documents"), DOCS as u64, "one server serves all now");
    assert_eq!(
        metric(last, "pagesync_documents_reopened_total"),
        0,
        "no journal was ever fenced: no two servers wrote one document"
    );
    eprintln!(
        "served again after SIGKILL: p50 {:?} p99 {:?}; after SIGTERM: p50 {:?} p99 {:?}",
        pct(&after_kill, 50),
        pct(&after_kill, 99),
        pct(&after_term, 50),
        pct(&after_term, 99)
    );

    // Every write was confirmed, and every one is in the bucket exactly once, in one dense
    // history per document.
    for w in &writes {
        assert_eq!(w.handle.state(w.lsn).expect("state"), MutationState::Confirmed, "{} {}", w.who, w.seq);
    }
    let rt = tokio::runtime::Handle::current();
    let bucket = journal.clone();
    let per_doc: BTreeMap<DocId, usize> = tokio::task::spawn_blocking(move || {
        let backend = ObjectBackend::from_url(&bucket, rt).expect("backend");
        (0..DOCS)
            .map(|d| {
                let doc = DocId::from_u128(0xc1_0000 + d);
                let j = backend
                    .open_or_create(&pagesync_server::storage_key(doc), doc.journal_id())
                    .expect("open");
                let entries = j.range().iter().map(|l| j.read(l).expect("every LSN reads back"));
                let headers = entries.map(|e| pagesync::storage::decode(&e).expect("a storage entry"));
                let applied: Vec<_> = headers.flat_map(|h| h.applied).map(|a| (a.timeline, a.lsn)).collect();
                let unique: HashSet<_> = applied.iter().collect();
                assert_eq!(unique.len(), applied.len(), "{doc}: a mutation stored twice");
                (doc, applied.len())
            })
            .collect()
    })
    .await
    .expect("join");
    for (doc, applied) in &per_doc {
        let mine = writes.iter().filter(|w| w.doc == *doc).count();
        // Two schema statements and the two probes (after the kill and after SIGTERM).
        assert_eq!(*applied, mine + 4, "{doc}: every write applied exactly once");
    }
    let check = Client::connect(&url(last), "", dir.path().join("check")).expect("check");
    for (doc, _) in &first_docs {
        let h = check.open(*doc).expect("open");
        h.sync(WAIT).await.expect("a new client syncs through the last server");
        let rows =
            h.query("SELECT count(*), count(DISTINCT who || ':' || seq) FROM w", &[]).expect("query").rows;
        let mine = writes.iter().filter(|w| w.doc == *doc).count() as i64;
        assert_eq!(rows, vec![vec![Value::Integer(mine + 2), Value::Integer(mine + 2)]], "{doc}");
    }

    // The operator's view: the last server holds every lease.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pagesync-server"))
        .args(["cluster", "--journal", &journal])
        .output()
        .expect("cluster");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("{DOCS} document leases")), "{text}");
    assert!(text.contains(&url(last)), "{text}");

    // Deleting a document through a server that does not hold it: a new server joins, is sent
    // the request, and redirects it to the holder, which deletes it; its clients learn it.
    let (_joiner, joiner) = start_node(&journal);
    wait_live(&[last, joiner], 2).await;
    let (gone, gone_handle) = first_docs.first().cloned().expect("a document");
    let path = format!("/v1/docs/{gone}");
    let (head, _) = http_request(joiner, "DELETE", &path);
    assert!(head.starts_with("HTTP/1.1 307"), "{head}");
    let location = format!("location: http://127.0.0.1:{last}{path}");
    assert!(head.to_ascii_lowercase().contains(&location), "{head}");
    let (head, _) = http_request(last, "DELETE", &path);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let deadline = Instant::now() + WAIT;
    while !gone_handle.status().deleted {
        assert!(Instant::now() < deadline, "a client of the deleted document learns it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A TCP relay to `upstream` that can be cut: while cut, every connection through it is
/// shut down and new ones are closed at once (the server cannot reach S3).
struct CuttableRelay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl CuttableRelay {
    /// A relay to the S3 endpoint the tests run against (`AWS_ENDPOINT_URL`).
    fn to_s3() -> CuttableRelay {
        let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("s3_url checked it");
        CuttableRelay::start(endpoint.trim_start_matches("http://").trim_end_matches('/').to_owned())
    }

    /// Its address as an `AWS_ENDPOINT_URL`.
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(upstream: String) -> CuttableRelay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let relay = CuttableRelay { port, cut: Default::default(), open: Default::default() };
        let (cut, open) = (relay.cut.clone(), relay.open.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                // Under the lock `set_cut` takes: no connection slips in while it cuts.
                let mut kept = open.lock().expect("lock");
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(up) = std::net::TcpStream::connect(&upstream) else { continue };
                kept.extend([down.try_clone().expect("clone"), up.try_clone().expect("clone")]);
                drop(kept);
                for (mut from, mut to) in
                    [(down.try_clone().expect("clone"), up.try_clone().expect("clone")), (up, down)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        relay
    }

    fn set_cut(&self, cut: bool) {
        let mut open = self.open.lock().expect("lock");
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
        if cut {
            for s in open.drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

type Waiting = tokio::task::JoinHandle<pagesync_client::Result<()>>;

/// `doc.sync` on a task of its own, started while S3 is cut.
fn sync_in_background(doc: &Document) -> Waiting {
    let doc = doc.clone();
    tokio::spawn(async move { doc.sync(WAIT).await })
}

/// Waits until `doc`'s status satisfies `shown`, the background sync still waiting meanwhile.
async fn wait_for_status(
    doc: &Document,
    waiting: &mut Waiting,
    what: &str,
    shown: impl Fn(&DocStatus) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    while !shown(&doc.status()) {
        assert!(Instant::now() < deadline, "{what}: {:?}", doc.status());
        assert!(!waiting.is_finished(), "sync ended while S3 was cut: {:?}", waiting.await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// S3 stays away long enough for the client to ask again (and be refused again), then comes
/// back: the background sync ends then, with `w` applied exactly once and the status clean.
async fn s3_back(relay: &CuttableRelay, doc: &Document, waiting: Waiting, w: Write) {
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!waiting.is_finished(), "sync ended while S3 was cut: {:?}", waiting.await);
    relay.set_cut(false);
    waiting.await.expect("join").expect("the sync went on and ended once S3 was back");
    assert_eq!(w.handle.state(w.lsn).expect("state"), MutationState::Confirmed);
    let rows = doc.query("SELECT who, seq FROM w", &[]).expect("query").rows;
    assert_eq!(rows, vec![vec![Value::Text(w.who.clone()), Value::Integer(w.seq)]], "applied exactly once");
    assert_eq!(doc.status().error, None, "the status no longer shows the outage");
}

/// A server that cannot reach S3 for a while loses its membership and closes its documents
/// with `unavailable`: a client waiting in `sync` then (with a write pending) is not failed by
/// it. It subscribes again by itself, and the sync returns once S3 is back and the write is
/// applied, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_waits_through_a_server_losing_its_lease_for_a_moment() {
    let Some(journal) = support::s3::s3_url("lapse") else { return };
    let relay = CuttableRelay::to_s3();
    let port = free_port();
    let (advertise, relayed) = (format!("ws://127.0.0.1:{port}"), relay.endpoint());
    let lease = pagesync_server::cluster::MIN_LEASE_MS.to_string();
    let flags = ["--advertise", &advertise, "--lease-ms", &lease, "--commit-interval-ms", "10"];
    let _server = support::start_with_env(port, &journal, &flags, &[("AWS_ENDPOINT_URL", &relayed)]);
    wait_live(&[port], 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::connect(&url(port), "", dir.path()).expect("client");
    let doc = client.open(DocId::from_u128(0x1a95e)).expect("open");
    doc.execute("CREATE TABLE w(who TEXT NOT NULL, seq INTEGER NOT NULL)", vec![]).expect("schema");
    doc.sync(WAIT).await.expect("first sync");

    relay.set_cut(true);
    let w = write(&doc, "during", 1);
    let mut waiting = sync_in_background(&doc);
    let closed = |st: &DocStatus| st.error.as_ref().is_some_and(|(code, _)| code == "unavailable");
    wait_for_status(&doc, &mut waiting, "the server never closed the document", closed).await;
    assert!(metric(port, "pagesync_cluster_lapses_total") >= 1, "the membership lapsed");
    s3_back(&relay, &doc, waiting, w).await;
}

/// A server (no cluster) that cannot reach S3 when a client first opens a document answers
/// `unavailable`, not an error that stays: the client's `sync` goes on, the client subscribes
/// again by itself, and the write lands once S3 is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_cannot_be_opened_while_s3_is_away_is_opened_once_it_is_back() {
    let Some(journal) = support::s3::s3_url("away") else { return };
    let relay = CuttableRelay::to_s3();
    let port = free_port();
    let _server = support::start_with_env(port, &journal, &[], &[("AWS_ENDPOINT_URL", &relay.endpoint())]);
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::connect(&url(port), "", dir.path()).expect("client");

    relay.set_cut(true);
    let doc = client.open(DocId::from_u128(0xa3a7)).expect("open");
    doc.execute("CREATE TABLE w(who TEXT NOT NULL, seq INTEGER NOT NULL)", vec![]).expect("schema");
    let w = write(&doc, "away", 1);
    let mut waiting = sync_in_background(&doc);
    let told = |st: &DocStatus| st.error.is_some();
    wait_for_status(&doc, &mut waiting, "the server never said it could not open the document", told).await;
    let (code, message) = doc.status().error.expect("shown");
    assert_eq!(code, "unavailable", "{message}");
    s3_back(&relay, &doc, waiting, w).await;
}
