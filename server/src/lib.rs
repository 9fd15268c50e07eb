//! pagesync server: the tokio driver of the sans-io core.
//!
//! Shape: an accept loop (bounded by `max_connections`) hands each TCP connection to a task that
//! serves HTTP (`/healthz`, `/metrics`, `/v1/docs/{id}/export`) or upgrades `/v1/sync` to a websocket. One hub task owns
//! the `ServerSession` (and with it every open document): connection tasks send it frames,
//! it feeds the session with the wall clock, steps documents on its timer, and routes the
//! session's outgoing messages back. Entries are durable (fsynced) before the session sends
//! them, because `ServerDocument::step` appends before it returns.
//!
//! Storage layout: `<root>/<first 2 hex of the doc id>/<doc id>/storage/` holds the document's
//! storage journal (see `docs/design.md`).
#![forbid(unsafe_code)]

pub mod auth;
mod http;
mod hub;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pagesync::DocId;
use pagesync::journal::{FileJournal, FileJournalOptions};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use hub::Hub;

/// Connections served at once by default. Each costs a task and two small buffers; the bound
/// keeps a flood of sockets from exhausting file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Root directory of the `file://` journal store.
    pub root: PathBuf,
    pub max_connections: usize,
    /// HS256 secret; `None` means no auth (then only loopback addresses may be served).
    pub auth_secret: Option<Vec<u8>>,
}

/// Counters for `/metrics` (Prometheus text).
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub open_documents: AtomicU64,
    pub steps_failed: AtomicU64,
}

impl Metrics {
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows = [
            ("pagesync_connections_total", "counter", "Connections accepted", g(&self.connections_total)),
            ("pagesync_connections_open", "gauge", "Connections open now", g(&self.connections_open)),
            ("pagesync_frames_in_total", "counter", "Websocket frames received", g(&self.frames_in)),
            ("pagesync_frames_out_total", "counter", "Websocket frames sent", g(&self.frames_out)),
            ("pagesync_bytes_in_total", "counter", "Websocket payload bytes received", g(&self.bytes_in)),
            ("pagesync_bytes_out_total", "counter", "Websocket payload bytes sent", g(&self.bytes_out)),
            ("pagesync_open_documents", "gauge", "Documents open in memory", g(&self.open_documents)),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
        }
        out
    }
}

/// Where a document's storage journal lives under `root`.
pub fn storage_dir(root: &std::path::Path, doc: DocId) -> PathBuf {
    let id = doc.to_string();
    root.join(&id[..2]).join(&id).join("storage")
}

/// Parses `--journal`: `file://DIR` or a bare path.
pub fn parse_journal_url(url: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if url.contains("://") {
        anyhow::bail!(
            "unsupported journal URL {url:?}: this build supports file://DIR (s3:// is not built yet)"
        );
    }
    Ok(PathBuf::from(url))
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let root = cfg.root.clone();
    std::fs::create_dir_all(&root)?;
    let http_root = Arc::new(root.clone());
    let opener = Box::new(move |doc: DocId| {
        let dir = storage_dir(&root, doc);
        let journal = FileJournal::open_or_create(&dir, doc.journal_id(), FileJournalOptions::default())?;
        pagesync::ServerDocument::open(Box::new(journal))
    });
    let mut session = pagesync::protocol::ServerSession::new(opener);
    if let Some(secret) = cfg.auth_secret.clone() {
        session =
            session.with_auth(Box::new(move |token: &str, now_ms: i64| auth::verify(&secret, token, now_ms)));
    }
    let hub = Hub::spawn(session, metrics.clone());
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        continue;
                    }
                };
                // Small frames must leave at once: Nagle plus delayed ACKs would add ~40 ms.
                let _ = stream.set_nodelay(true);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "refusing a connection: {} connections are open (--max-connections)", cfg.max_connections);
                    continue;
                };
                let (hub, metrics, root) = (hub.clone(), metrics.clone(), http_root.clone());
                tokio::spawn(async move {
                    http::serve_connection(stream, hub, metrics, root).await;
                    drop(permit);
                });
            }
        }
    }
    hub.shutdown().await;
    Ok(())
}
