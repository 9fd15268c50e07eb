//! Scale-out: three `pagesync-server`s (this binary as children, `--advertise`) over one moto
//! bucket. How long a killed (SIGKILL) or stopped (SIGTERM) server's documents take to be
//! served again, beside a single server restarted at once on the same bucket; what a first
//! connection through a server that does not hold the document costs (a redirect), beside one
//! straight to the holder; and what membership costs an idle server in S3 requests, beside one
//! document written once a second. Skipped when `AWS_ENDPOINT_URL` is not set.

use std::collections::HashSet;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagesync::journal::ObjectBackend;
use pagesync::{DocId, MutationState, Value};
use pagesync_client::{Client, Document};

use crate::Config;
use crate::probe::metric;
use crate::report::{Better, Pair};

/// Set on a child: `JOURNAL LEASE_MS PORT`; with a lease, the child joins the cluster.
pub const CLUSTER_ENV: &str = "PAGESYNC_BENCH_CLUSTER_SERVE";

const WAIT: Duration = Duration::from_secs(60);
const DOCS: u128 = 12;
/// No lease: a server without `--advertise`.
const NO_LEASE: u64 = 0;

/// The child: serves until SIGTERM, printing its port first.
pub fn serve_child(spec: &str) {
    let mut parts = spec.split(' ');
    let (journal, lease_ms, port) = (
        parts.next().expect("journal").to_owned(),
        parts.next().and_then(|l| l.parse::<u64>().ok()).expect("lease"),
        parts.next().and_then(|p| p.parse::<u16>().ok()).expect("port"),
    );
    crate::runtime().block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        println!("{}", addr.port());
        let store =
            pagesync_server::Store::parse(&journal, tokio::runtime::Handle::current()).expect("store");
        let mut cfg = pagesync_server::ServerConfig::new(addr, store);
        cfg.commit_interval_ms = Some(10);
        if lease_ms != NO_LEASE {
            cfg.cluster =
                Some(pagesync_server::ClusterConfig { advertise: format!("ws://{addr}"), lease_ms });
        }
        let metrics = Arc::new(pagesync_server::Metrics::default());
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
        let shutdown = async move {
            term.recv().await;
        };
        pagesync_server::serve(listener, cfg, metrics, shutdown).await.expect("serve");
    });
}

struct Server {
    child: Option<Child>,
    port: u16,
}

impl Server {
    fn start(journal: &str, lease_ms: u64, port: u16) -> Server {
        let (child, port) = crate::many::spawn_child(CLUSTER_ENV, &format!("{journal} {lease_ms} {port}"));
        Server { port, child: Some(child) }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/sync", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn term(&mut self) -> Child {
        let child = self.child.take().expect("running");
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM");
        child
    }

    fn s3_requests(&self) -> u64 {
        ["puts", "gets", "lists", "deletes"]
            .iter()
            .map(|k| metric(self.port, &format!("pagesync_s3_{k}_total")))
            .sum()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn doc_id(n: u128) -> DocId {
    DocId::from_u128(0xbe_0000 + n)
}

/// Writes a row to each document at once, and returns how long each of `of` took to be
/// confirmed, sorted (ms).
async fn served_again(docs: &[Document], of: &HashSet<DocId>) -> Vec<f64> {
    let start = Instant::now();
    let writes: Vec<_> = docs
        .iter()
        .map(|d| (d, d.execute("INSERT INTO t(v) VALUES (1)", vec![]).expect("write").lsn))
        .filter(|(d, _)| of.contains(&d.id()))
        .collect();
    let mut took = vec![None; writes.len()];
    while took.iter().any(Option::is_none) {
        assert!(start.elapsed() < WAIT, "documents were not served again");
        for (i, (d, lsn)) in writes.iter().enumerate() {
            if took[i].is_none() && d.state(*lsn).expect("state") == MutationState::Confirmed {
                took[i] = Some(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut took: Vec<f64> = took.into_iter().map(|t| t.expect("all")).collect();
    took.sort_by(f64::total_cmp);
    took
}

fn pct(sorted: &[f64], p: usize) -> f64 {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The documents whose lease the server at `port` holds, from the bucket.
async fn leases_of(journal: &str, port: u16) -> HashSet<DocId> {
    let (bucket, rt) = (journal.to_owned(), tokio::runtime::Handle::current());
    let view = tokio::task::spawn_blocking(move || {
        pagesync_server::cluster::view(&ObjectBackend::from_url(&bucket, rt).expect("backend")).expect("view")
    })
    .await
    .expect("join");
    let url = format!("ws://127.0.0.1:{port}/v1/sync");
    view.member_at(&url).map(|m| view.held_by(&m.id).into_iter().collect()).unwrap_or_default()
}

async fn open_all(client: &Client) -> Vec<Document> {
    let mut docs = Vec::new();
    for n in 0..DOCS {
        let d = client.open(doc_id(n)).expect("open");
        d.execute("CREATE TABLE IF NOT EXISTS t(v INTEGER)", vec![]).expect("ddl");
        docs.push(d);
    }
    for d in &docs {
        d.sync(WAIT).await.expect("sync");
    }
    docs
}

/// Time (ms) from `Client::connect` to a synced open of `doc` at `url`.
async fn first_sync(url: &str, doc: DocId, dir: &std::path::Path) -> f64 {
    let start = Instant::now();
    let client = Client::connect(url, "", dir).expect("client");
    client.open(doc).expect("open").sync(WAIT).await.expect("sync");
    start.elapsed().as_secs_f64() * 1e3
}

/// One repetition's figures.
#[derive(Default)]
struct Rep {
    kill_p50: f64,
    kill_p99: f64,
    term_p50: f64,
    redirected: f64,
    direct: f64,
    idle_per_minute: f64,
}

async fn cluster_rep(lease_ms: u64, idle: Duration) -> Rep {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = pagesync_tests::s3_url("cluster").expect("S3 endpoint");
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start(&journal, lease_ms, 0)).collect();
    let deadline = Instant::now() + WAIT;
    while !servers.iter().all(|s| metric(s.port, "pagesync_cluster_live_servers") == 3) {
        assert!(Instant::now() < deadline, "the servers never saw each other");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let urls: Vec<String> = servers.iter().map(Server::url).collect();
    let client = Client::connect(&urls.join(","), "", dir.path().join("writer")).expect("client");
    let docs = open_all(&client).await;
    let mut rep = Rep::default();

    // Idle: what membership and leases cost each server.
    let before: Vec<u64> = servers.iter().map(Server::s3_requests).collect();
    tokio::time::sleep(idle).await;
    let spent: u64 = servers.iter().zip(&before).map(|(s, b)| s.s3_requests() - b).sum();
    rep.idle_per_minute = spent as f64 / 3.0 * 60.0 / idle.as_secs_f64();

    // A new client's first sync of a document, through a server that does not hold it and
    // straight at its holder.
    let held: Vec<HashSet<DocId>> = {
        let mut v = Vec::new();
        for s in &servers {
            v.push(leases_of(&journal, s.port).await);
        }
        v
    };
    let holder = (0..3).find(|i| !held[*i].is_empty()).expect("someone holds documents");
    let doc = *held[holder].iter().next().expect("one");
    let other = (holder + 1) % 3;
    rep.redirected = first_sync(&servers[other].url(), doc, &dir.path().join("redirected")).await;
    rep.direct = first_sync(&servers[holder].url(), doc, &dir.path().join("direct")).await;

    // SIGKILL the server with the most documents, then SIGTERM the next.
    let victim = (0..3).max_by_key(|i| held[*i].len()).expect("three");
    servers[victim].kill();
    let took = served_again(&docs, &held[victim]).await;
    (rep.kill_p50, rep.kill_p99) = (pct(&took, 50), pct(&took, 99));
    let stopping = (victim + 1) % 3;
    let stopped = leases_of(&journal, servers[stopping].port).await;
    let mut child = servers[stopping].term();
    let took = served_again(&docs, &stopped).await;
    rep.term_p50 = if took.is_empty() { f64::NAN } else { pct(&took, 50) };
    let _ = child.wait();
    rep
}

/// A single server (no `--advertise`) killed with SIGKILL and started again at once on the
/// same bucket and port: ms until each document is served again, and the S3 requests a minute
/// of one document written once a second.
async fn restart_rep(idle: Duration) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = pagesync_tests::s3_url("single").expect("S3 endpoint");
    let mut server = Server::start(&journal, NO_LEASE, 0);
    let client = Client::connect(&server.url(), "", dir.path().join("writer")).expect("client");
    let docs = open_all(&client).await;
    let before = server.s3_requests();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < idle {
        docs[0].execute("INSERT INTO t(v) VALUES (?1)", vec![Value::Integer(n)]).expect("write");
        n += 1;
        tokio::time::sleep_until((start + Duration::from_secs(n as u64)).into()).await;
    }
    let per_minute = (server.s3_requests() - before) as f64 * 60.0 / start.elapsed().as_secs_f64();
    let port = server.port;
    server.kill();
    let _restarted = Server::start(&journal, NO_LEASE, port);
    let all: HashSet<DocId> = docs.iter().map(Document::id).collect();
    let took = served_again(&docs, &all).await;
    (pct(&took, 50), pct(&took, 99), per_minute)
}

pub fn run(cfg: &Config) -> Vec<Pair> {
    if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
        eprintln!("cluster: skipped (no AWS_ENDPOINT_URL; scripts/test starts moto and sets it)");
        return Vec::new();
    }
    let (lease_ms, idle) = if cfg.quick {
        (pagesync_server::cluster::MIN_LEASE_MS, Duration::from_secs(2))
    } else {
        (pagesync_server::cluster::DEFAULT_LEASE_MS, Duration::from_secs(10))
    };
    let reps = if cfg.quick { 1 } else { 5 };
    crate::runtime().block_on(async {
        let (mut ours, mut peers) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            ours.push(cluster_rep(lease_ms, idle).await);
            peers.push(restart_rep(idle).await);
        }
        let col = |f: fn(&Rep) -> f64| ours.iter().map(f).collect::<Vec<f64>>();
        let peer = |f: fn(&(f64, f64, f64)) -> f64| peers.iter().map(f).collect::<Vec<f64>>();
        let lease = format!("{} s lease", lease_ms as f64 / 1e3);
        vec![
            Pair::new(
                "cluster",
                &format!("SIGKILL of one of 3 servers: its documents served again, p50 ({lease})"),
                "ms",
                Better::Lower,
                col(|r| r.kill_p50),
                "one server SIGKILLed and started again at once on the same bucket, p50",
                peer(|p| p.0),
                None,
            ),
            Pair::new(
                "cluster",
                &format!("SIGKILL of one of 3 servers: its documents served again, p99 ({lease})"),
                "ms",
                Better::Lower,
                col(|r| r.kill_p99),
                "one server SIGKILLed and started again at once on the same bucket, p99",
                peer(|p| p.1),
                None,
            ),
            Pair::new(
                "cluster",
                "SIGTERM of one of 3 servers (leases handed over): its documents served again, p50",
                "ms",
                Better::Lower,
                col(|r| r.term_p50),
                "SIGKILL of one of 3 servers in the same run, p50",
                col(|r| r.kill_p50),
                None,
            ),
            Pair::new(
                "cluster",
                "a new client's first sync of a document through a server that does not hold it (redirect)",
                "ms",
                Better::Lower,
                col(|r| r.redirected),
                "the same, straight at the server that holds it",
                col(|r| r.direct),
                None,
            ),
            Pair::new(
                "cluster",
                "S3 requests a minute of one idle cluster server (membership and leases)",
                "requests/min",
                Better::Lower,
                col(|r| r.idle_per_minute),
                "one server without --advertise, one document written once a second",
                peer(|p| p.2),
                None,
            ),
        ]
    })
}
