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
pub mod cluster;
pub mod http;
mod hub;
pub mod ops;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagesync::journal::{FileJournal, FileJournalOptions, Journal, ObjectBackend, ObjectStats};
use pagesync::protocol::{STEP_MICROS_BUCKETS, ServerSession, SessionOptions, SessionStats};
use pagesync::{Compaction, DocId, ServerDocument, SqlReducer, StepLimits};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub use hub::Hub;

/// Connections served at once by default. Each costs a task and two small buffers; the bound
/// keeps a flood of sockets from exhausting file descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Segment size of a document's storage journal on `file://`: one checkpoint part. Trimming
/// frees whole segments, so this is how much trimmed history may stay on disk.
pub const STORAGE_SEGMENT_BYTES: u64 = 4 << 20;

/// Where documents are kept.
#[derive(Clone, Debug)]
pub enum Store {
    /// `file://DIR`: file journals (segment files, fsync per step).
    Files(PathBuf),
    /// `s3://BUCKET/PREFIX` (or `object+file:///DIR`): one object per step, fenced.
    Objects(ObjectBackend),
}

impl Store {
    /// Parses `--journal`: `file://DIR` (or a bare path), `s3://BUCKET/PREFIX` with the
    /// standard `AWS_*` environment, or `object+file:///DIR` for object-store semantics on a
    /// local directory. `rt` drives the object store's requests.
    pub fn parse(url: &str, rt: tokio::runtime::Handle) -> anyhow::Result<Store> {
        if url.starts_with("s3://") {
            return Ok(Store::Objects(ObjectBackend::from_url(url, rt).map_err(anyhow::Error::msg)?));
        }
        if let Some(rest) = url.strip_prefix("object+") {
            return Ok(Store::Objects(ObjectBackend::from_url(rest, rt).map_err(anyhow::Error::msg)?));
        }
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(Store::Files(PathBuf::from(path)));
        }
        if url.contains("://") {
            anyhow::bail!(
                "unsupported journal URL {url:?}: use file://DIR, s3://BUCKET/PREFIX or object+file:///DIR"
            );
        }
        Ok(Store::Files(PathBuf::from(url)))
    }

    /// For logs: where the documents are.
    pub fn describe(&self) -> String {
        match self {
            Store::Files(root) => format!("file://{}", root.display()),
            // The object form of a directory is told apart from a `file://` store.
            Store::Objects(b) if b.url().starts_with("file://") => format!("object+{}", b.url()),
            Store::Objects(b) => b.url().to_owned(),
        }
    }

    /// The group-commit interval that suits the store: none for local files (an fsync is
    /// cheap), 100 ms for object stores, where every step is a billed request of tens of
    /// milliseconds (at 1,000 mutations/s that is about 10 puts per 1,000 mutations).
    pub fn default_commit_interval_ms(&self) -> i64 {
        match self {
            Store::Files(_) => 0,
            Store::Objects(_) => 100,
        }
    }

    /// Opens (or creates) a document's storage journal; a deleted document is not created
    /// again (`Error::Deleted`). Blocking: call it off the runtime.
    pub fn open_journal(&self, doc: DocId) -> pagesync::Result<Box<dyn Journal>> {
        if self.is_deleted(doc)? {
            return Err(pagesync::Error::Deleted);
        }
        Ok(match self {
            Store::Files(root) => Box::new(FileJournal::open_or_create(
                storage_dir(root, doc),
                doc.journal_id(),
                // A small append and a barrier per step: written into space made ahead.
                FileJournalOptions {
                    max_segment_bytes: STORAGE_SEGMENT_BYTES,
                    preallocate: true,
                    ..FileJournalOptions::default()
                },
            )?),
            Store::Objects(b) => Box::new(b.open_or_create(&storage_key(doc), doc.journal_id())?),
        })
    }

    /// Opens (or creates) a document's history journal (see `pagesync::history`). Blocking.
    pub fn open_history(&self, doc: DocId) -> pagesync::Result<Box<dyn Journal>> {
        let id = pagesync::history::journal_id(doc);
        Ok(match self {
            Store::Files(root) => Box::new(FileJournal::open_or_create(
                history_dir(root, doc),
                id,
                // Written once per step: no descriptor held between steps (a server with many
                // open documents would otherwise need two per document).
                FileJournalOptions {
                    max_segment_bytes: STORAGE_SEGMENT_BYTES,
                    close_files: true,
                    preallocate: true,
                    ..FileJournalOptions::default()
                },
            )?),
            Store::Objects(b) => Box::new(b.open_or_create(&history_key(doc), id)?),
        })
    }

    /// Whether the document has a history journal (it took a step). Blocking.
    pub fn history_exists(&self, doc: DocId) -> pagesync::Result<bool> {
        match self {
            Store::Files(root) => Ok(history_dir(root, doc).exists()),
            Store::Objects(b) => Ok(b.exists(&history_key(doc), pagesync::history::journal_id(doc))?),
        }
    }

    /// Whether the document's steps may write their history entry beside their storage entry
    /// (`ServerDocument::write_history_beside`): a `file://` store, whose storage journal can
    /// take its newest entry back. The mark saying from which entry on is a file beside the
    /// journals (`paired`).
    pub fn pairs_history(&self) -> bool {
        matches!(self, Store::Files(_))
    }

    /// From which storage entry on the document's steps wrote their history entry beside their
    /// storage entry, if they do. Blocking.
    pub fn paired_from(&self, doc: DocId) -> pagesync::Result<Option<pagesync::journal::Lsn>> {
        let Store::Files(root) = self else { return Ok(None) };
        let path = pairing_path(root, doc);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                text.trim().parse::<u64>().ok().and_then(pagesync::journal::Lsn::new).map(Some).ok_or_else(
                    || pagesync::Error::Malformed(format!("{}: not a storage LSN: {text:?}", path.display())),
                )
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(pagesync::Error::Refused(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Records, durably, that steps from storage entry `from` on write their history entry
    /// beside their storage entry; an earlier mark stands. Blocking.
    pub fn mark_paired(&self, doc: DocId, from: pagesync::journal::Lsn) -> pagesync::Result<()> {
        let Store::Files(root) = self else { return Ok(()) };
        if self.paired_from(doc)?.is_some_and(|p| p <= from) {
            return Ok(());
        }
        let path = pairing_path(root, doc);
        let tmp = path.with_extension("tmp");
        let io =
            |e: std::io::Error| pagesync::Error::Refused(format!("cannot write {}: {e}", path.display()));
        let mut file = pagesync::journal::create_fresh(&tmp, 0o666).map_err(io)?;
        std::io::Write::write_all(&mut file, format!("{from}\n").as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        sync_parent(&path).map_err(io)
    }

    /// Removes the mark of `mark_paired`, durably: before anything writes the document's
    /// storage without its history (a server with `--history off`, an offline restore), whose
    /// steps a recovery must never take back. Blocking.
    pub fn forget_pairing(&self, doc: DocId) -> pagesync::Result<()> {
        let Store::Files(root) = self else { return Ok(()) };
        let path = pairing_path(root, doc);
        let io =
            |e: std::io::Error| pagesync::Error::Refused(format!("cannot remove {}: {e}", path.display()));
        match std::fs::remove_file(&path) {
            Ok(()) => sync_parent(&path).map_err(io),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Takes back the document's newest storage entry when it is a step whose history entry
    /// never became durable: written beside it (from the `mark_paired` LSN on), a crash
    /// between the two barriers left the storage entry alone. That step was never
    /// acknowledged (both were durable first), and its clients send its mutations again.
    /// Returns the entry taken back, and the history journal if it was opened to look (the
    /// document's `HistoryLog` takes it rather than opening it again). Blocking; before
    /// anything reads `storage`.
    ///
    /// Keeping such a step is always safe (as an acknowledgement lost on the way); taking one
    /// back that was acknowledged is not. So only the one the protocol can leave: a step beside
    /// which nothing else lacks its history. The step before it (the newest earlier entry that
    /// applied mutations) must be before the mark or have its history entry; otherwise
    /// something wrote steps without history under the mark (a binary that knows no mark, a
    /// copy taken while the server wrote), and nothing is taken back.
    pub fn take_back_unpaired_step(
        &self,
        doc: DocId,
        storage: &mut dyn Journal,
    ) -> pagesync::Result<TakenBack> {
        use pagesync::history::records_step;
        use pagesync::storage::read_applied;
        let Some(from) = self.paired_from(doc)? else { return Ok((None, None)) };
        let Some(last) = storage.range().last().filter(|l| *l >= from) else { return Ok((None, None)) };
        if read_applied(storage, last)?.1.is_empty() {
            return Ok((None, None)); // a checkpoint's part or a VACUUM: no history entry of its own
        }
        // The step before it under the mark, past checkpoint parts (their headers alone).
        let oldest = from.max(storage.range().first());
        let earlier = |lsn: pagesync::journal::Lsn| lsn.prev().filter(|p| *p >= oldest);
        let mut before = None;
        let mut at = earlier(last);
        for _ in 0..MAX_ENTRIES_BACK {
            let Some(lsn) = at else { break };
            if !read_applied(storage, lsn)?.1.is_empty() {
                before = Some(lsn);
                break;
            }
            at = earlier(lsn);
        }
        if at.is_some() && before.is_none() {
            return Ok((None, None)); // too far back to tell: kept
        }
        let history = match self.history_exists(doc)? {
            true => Some(self.open_history(doc)?),
            false => None,
        };
        let recorded = |lsn| history.as_ref().map_or(Ok(false), |h| records_step(&**h, storage, lsn));
        if recorded(last)? {
            return Ok((None, history));
        }
        if let Some(before) = before
            && !recorded(before)?
        {
            return Ok((None, history)); // steps without history under the mark: not this protocol's doing
        }
        storage.remove_last()?;
        Ok((Some(last), history))
    }

    /// Whether the document has ever been written (`Error::Deleted` if it was deleted since).
    /// Its tombstone is looked for only when no storage is there: a document deleted while
    /// its storage is still being removed is caught by `open_journal`, which every open calls.
    /// Blocking: call it off the runtime.
    pub fn exists(&self, doc: DocId) -> pagesync::Result<bool> {
        let stored = match self {
            Store::Files(root) => storage_dir(root, doc).exists(),
            Store::Objects(b) => b.exists(&storage_key(doc), doc.journal_id())?,
        };
        if !stored && self.is_deleted(doc)? {
            return Err(pagesync::Error::Deleted);
        }
        Ok(stored)
    }

    /// Whether the document was deleted (its tombstone is there). Blocking.
    pub fn is_deleted(&self, doc: DocId) -> pagesync::Result<bool> {
        match self {
            Store::Files(root) => Ok(tombstone_path(root, doc).exists()),
            Store::Objects(b) => Ok(b.read_object(&tombstone_key(doc))?.is_some()),
        }
    }

    /// Deletes a document: first its tombstone (from then on nobody opens or creates it),
    /// then every entry of its storage. Whoever serves it must close it between the two
    /// (`ServerSession::close_deleted`). `Ok(false)`: there was no such document. Blocking.
    pub fn mark_deleted(&self, doc: DocId, now_ms: i64) -> pagesync::Result<bool> {
        let existed = match self.exists(doc) {
            Ok(e) => e,
            Err(pagesync::Error::Deleted) => true,
            Err(e) => return Err(e),
        };
        if !existed {
            return Ok(false);
        }
        let stone = format!("deleted at {now_ms} ms since the Unix epoch\n").into_bytes();
        match self {
            Store::Files(root) => {
                let path = tombstone_path(root, doc);
                let io = |e: std::io::Error| {
                    pagesync::Error::Refused(format!("cannot write {}: {e}", path.display()))
                };
                std::fs::write(&path, &stone).map_err(io)?;
                // Durable before any storage goes: a crash in between leaves it deleted.
                std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io)?;
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                }
            }
            Store::Objects(b) => b.put_object(&tombstone_key(doc), stone)?,
        }
        Ok(true)
    }

    /// Removes every entry of a deleted document's storage and history (its tombstone
    /// stays). Blocking.
    pub fn delete_storage(&self, doc: DocId) -> pagesync::Result<()> {
        match self {
            Store::Files(root) => {
                self.forget_pairing(doc)?;
                for dir in [storage_dir(root, doc), history_dir(root, doc)] {
                    match std::fs::remove_dir_all(&dir) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            let why = format!("cannot remove {}: {e}", dir.display());
                            return Err(pagesync::Error::Refused(why));
                        }
                    }
                }
                Ok(())
            }
            Store::Objects(b) => {
                let mut keys = Vec::new();
                for prefix in [storage_key(doc), history_key(doc)] {
                    keys.extend(
                        b.list_objects(&prefix, true)?.into_iter().map(|i| format!("{prefix}/{}", i.name)),
                    );
                }
                Ok(b.delete_objects(&keys)?)
            }
        }
    }
}

/// Limits a server enforces, each with a flag.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// One websocket message; larger ones close the connection with an error.
    pub max_frame_bytes: usize,
    /// One mutation; larger ones are rejected (the document and connection carry on).
    pub max_mutation_bytes: usize,
    /// One document's database size; a mutation that would grow it past this is rejected
    /// with `doc_full`. `None`: no limit.
    pub max_doc_bytes: Option<u64>,
    /// CPU time one mutation may take; past it: `too_expensive`. `None`: unbounded.
    pub max_mutation_cpu: Option<std::time::Duration>,
    /// What one mutation may cost: VM instructions, bytes added, temp bytes, one value's size.
    pub budget: pagesync::Budget,
    /// Documents open at once (`SessionOptions::max_open_docs`); more are answered `limit`.
    pub max_open_docs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_frame_bytes: pagesync::protocol::MAX_UPLOAD_FRAME_BYTES,
            max_mutation_bytes: pagesync::mutation::MAX_MUTATION_BYTES,
            max_doc_bytes: None,
            max_mutation_cpu: Some(pagesync::sandbox::DEFAULT_MAX_MUTATION_CPU),
            budget: pagesync::Budget::default(),
            max_open_docs: usize::MAX,
        }
    }
}

/// How long an open document goes unused before it gives back its caches: 5 s. Long enough
/// that a document in use keeps its hot pages; short enough that thousands of quiet
/// subscribed documents cost little (see `server/tests/many.rs`).
pub const DEFAULT_IDLE_SHRINK_MS: i64 = 5_000;

/// How long a document nobody subscribes to stays open: a minute.
pub const DEFAULT_IDLE_CLOSE_MS: i64 = 60_000;

/// Documents stepped in parallel. Steps are mostly waiting on fsync or S3, so more threads than
/// cores pays off; eight keeps the burst of threads small.
pub const DEFAULT_STEP_THREADS: usize = 8;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub store: Store,
    pub limits: Limits,
    /// HS256 secret; `None` means no auth (then only loopback addresses may be served).
    pub auth_secret: Option<Vec<u8>>,
    /// Group commit; `None` takes the store's default.
    pub commit_interval_ms: Option<i64>,
    pub idle_close_ms: i64,
    /// A directory served as static files on every path the server does not own (the
    /// browser demo: `target/web`). `None` serves nothing.
    pub web_root: Option<PathBuf>,
    /// Checkpoints and retention for every document; `None` keeps every entry forever.
    pub compaction: Option<Compaction>,
    /// Serve as one of many servers over the store's bucket (`--advertise`); `None` serves
    /// every document asked for.
    pub cluster: Option<ClusterConfig>,
    /// A document's history (`GET /v1/docs/{id}/history`, `ReadHistory`) needs a token with
    /// the `admin` claim; otherwise a read grant for the document is enough.
    pub history_needs_admin: bool,
    /// Keep every document's history (`--history on`, the default): one more durable append
    /// per step. Off, nothing is recorded and history requests are answered `not_found`.
    pub keep_history: bool,
    /// Server-defined mutators (`--mutators`), reloaded on SIGHUP.
    pub mutators: Option<Arc<MutatorRegistry>>,
}

/// The mutator definitions of `--mutators [PREFIX=]FILE` (repeatable): a document takes those
/// of the longest prefix of its id (a file without one serves every document). Reloaded whole
/// on SIGHUP: a file that does not parse keeps the previous definitions in force.
#[derive(Debug)]
pub struct MutatorRegistry {
    files: Vec<(String, PathBuf)>,
    sets: std::sync::RwLock<Vec<(String, Arc<pagesync::mutators::Mutators>)>>,
}

impl MutatorRegistry {
    /// Reads `specs` (`FILE` or `PREFIX=FILE`); the error names the file and the line.
    pub fn load(specs: &[String]) -> anyhow::Result<MutatorRegistry> {
        let files = specs
            .iter()
            .map(|spec| match spec.split_once('=') {
                Some((prefix, file)) => {
                    (prefix.trim_end_matches('*').to_ascii_lowercase(), PathBuf::from(file))
                }
                None => (String::new(), PathBuf::from(spec)),
            })
            .collect();
        let registry = MutatorRegistry { files, sets: Default::default() };
        registry.reload()?;
        Ok(registry)
    }

    /// Reads every file again; on an error nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let mut sets = Vec::new();
        for (prefix, file) in &self.files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("--mutators {}: {e}", file.display()))?;
            let set = pagesync::mutators::Mutators::parse(&text)
                .map_err(|e| anyhow::anyhow!("--mutators {}: {e}", file.display()))?;
            sets.push((prefix.clone(), Arc::new(set)));
        }
        // The longest prefix first.
        sets.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        *self.sets.write().expect("BUG: mutators lock poisoned") = sets;
        Ok(())
    }

    /// The definitions in force for `doc`.
    pub fn for_doc(&self, doc: DocId) -> Option<Arc<pagesync::mutators::Mutators>> {
        let id = doc.to_string();
        let sets = self.sets.read().expect("BUG: mutators lock poisoned");
        sets.iter().find(|(prefix, _)| id.starts_with(prefix.as_str())).map(|(_, m)| m.clone())
    }
}

/// `--advertise` and `--lease-ms`: see `cluster`.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// The websocket URL other servers send this server's clients to.
    pub advertise: String,
    pub lease_ms: u64,
}

impl ServerConfig {
    /// Defaults for everything but the address and the store.
    pub fn new(listen: SocketAddr, store: Store) -> ServerConfig {
        ServerConfig {
            listen,
            store,
            limits: Limits::default(),
            auth_secret: None,
            commit_interval_ms: None,
            idle_close_ms: DEFAULT_IDLE_CLOSE_MS,
            web_root: None,
            compaction: Some(Compaction::default()),
            cluster: None,
            history_needs_admin: false,
            keep_history: true,
            mutators: None,
        }
    }
}

/// Counters for `/metrics` (Prometheus text). The connection counters are updated by the
/// connection tasks; the session's and the object store's are copied in by the hub.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub connections_refused: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub open_documents: AtomicU64,
    /// Connections closed at accept because `DEFAULT_MAX_PENDING_CONNECTIONS` were still
    /// reading their head, handshaking or waiting for `Hello`.
    pub pending_evicted: AtomicU64,
    pub frames_panicked: AtomicU64,
    /// Websockets closed for sending too many pings or pongs (`MAX_CONTROL_FRAMES_PER_INTERVAL`).
    pub control_floods: AtomicU64,
    pub session: Mutex<SessionStats>,
    pub objects: Mutex<Option<Arc<ObjectStats>>>,
    pub cluster: Mutex<Option<Arc<cluster::Cluster>>>,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
}

impl Metrics {
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let rows = [
            ("pagesync_connections_total", "counter", "Connections accepted", g(&self.connections_total)),
            ("pagesync_connections_open", "gauge", "Connections open now", g(&self.connections_open)),
            (
                "pagesync_connections_refused_total",
                "counter",
                "Connections refused at --max-connections",
                g(&self.connections_refused),
            ),
            (
                "pagesync_connections_pending_evicted_total",
                "counter",
                "Connections closed before Hello to make room for newer ones (the half-open cap)",
                g(&self.pending_evicted),
            ),
            ("pagesync_frames_in_total", "counter", "Websocket frames received", g(&self.frames_in)),
            ("pagesync_frames_out_total", "counter", "Websocket frames sent", g(&self.frames_out)),
            ("pagesync_bytes_in_total", "counter", "Websocket payload bytes received", g(&self.bytes_in)),
            ("pagesync_bytes_out_total", "counter", "Websocket payload bytes sent", g(&self.bytes_out)),
            ("pagesync_open_documents", "gauge", "Documents open in memory", g(&self.open_documents)),
        ];
        for (name, kind, help, v) in rows {
            metric(&mut out, name, kind, help, v);
        }
        let s = self.session.lock().expect("BUG: metrics lock poisoned").clone();
        let rows = [
            ("pagesync_steps_total", "Storage entries written (steps)", s.steps),
            ("pagesync_steps_failed_total", "Steps that failed and will be retried", s.steps_failed),
            ("pagesync_mutations_applied_total", "Mutations applied", s.mutations_applied),
            ("pagesync_mutations_rejected_total", "Mutations rejected (with a reason)", s.mutations_rejected),
            (
                "pagesync_mutations_isolated_total",
                "Mutations rejected because their step could not be committed with them",
                s.mutations_isolated,
            ),
            (
                "pagesync_documents_failed_total",
                "Documents closed because a step panicked",
                s.documents_failed,
            ),
            (
                "pagesync_rejections_forgotten_total",
                "Timelines whose rejections a step deleted once their clients had copied them",
                s.rejections_forgotten,
            ),
            (
                "pagesync_confirms_sent_total",
                "Entries sent to their author as a confirmation by digest instead of their pages",
                s.confirms_sent,
            ),
            (
                "pagesync_digest_fallbacks_total",
                "Subscribers that could not keep a confirmation by digest (their replay gave other pages: non-determinism) and took pages instead",
                s.digest_fallbacks,
            ),
            (
                "pagesync_read_ahead_evictions_total",
                "Documents whose entries read ahead for subscribers were dropped to keep the total under its bound (256 MiB)",
                s.read_ahead_evictions,
            ),
            (
                "pagesync_storage_reads_total",
                "Jobs that read storage entries ahead for subscribers behind the recent ones",
                s.storage_reads,
            ),
            (
                "pagesync_page_requests_total",
                "Page requests (a page map, or pages of an entry) answered for clients that query before their download ends",
                s.page_requests,
            ),
            (
                "pagesync_page_requests_refused_total",
                "Page requests refused at their bounds (per connection, per document, or to a peer that does not read)",
                s.page_requests_refused,
            ),
            (
                "pagesync_documents_reopened_total",
                "Documents opened again from their journal after it refused writes (a failed fsync, a write whose outcome was unknown)",
                s.documents_reopened,
            ),
            (
                "pagesync_frames_panicked_total",
                "Frames whose handling panicked (their connection closed)",
                g(&self.frames_panicked),
            ),
            (
                "pagesync_control_floods_total",
                "Websockets closed for sending too many pings, pongs or small fragments",
                g(&self.control_floods),
            ),
            ("pagesync_events_dropped_total", "Log events dropped at the session's bound", s.events_dropped),
            ("pagesync_documents_opened_total", "Documents opened", s.documents_opened),
            ("pagesync_documents_closed_total", "Idle documents closed", s.documents_closed),
            (
                "pagesync_documents_shrunk_total",
                "Idle open documents that gave back their caches",
                s.documents_shrunk,
            ),
            ("pagesync_broadcasts_total", "Presence broadcasts taken from clients", s.broadcasts),
            (
                "pagesync_broadcasts_held_total",
                "Presence broadcasts that came within 25 ms of their sender's last one: told when that time was up, or replaced by a newer one",
                s.broadcasts_held,
            ),
            (
                "pagesync_broadcasts_refused_total",
                "Presence broadcasts refused at a bound (size, broadcasters per document, bytes per connection or server)",
                s.broadcasts_refused,
            ),
            (
                "pagesync_presence_sent_total",
                "Presence messages sent (one per other subscriber for each join, broadcast or leave)",
                s.presence_sent,
            ),
            (
                "pagesync_redirects_total",
                "Redirects sent: clients asked for a document another server of the cluster holds the lease of",
                s.redirects,
            ),
            (
                "pagesync_documents_moved_total",
                "Open documents closed because another server of the cluster holds their lease now",
                s.documents_moved,
            ),
        ];
        for (name, help, v) in rows {
            metric(&mut out, name, "counter", help, v);
        }
        let name = "pagesync_rejections_total";
        out.push_str(&format!("# HELP {name} Mutations rejected, by code\n# TYPE {name} counter\n"));
        for (code, n) in &s.rejections_by_code {
            out.push_str(&format!("{name}{{code=\"{code}\"}} {n}\n"));
        }
        let name = "pagesync_step_duration_seconds";
        out.push_str(&format!("# HELP {name} Time to apply and persist one step\n# TYPE {name} histogram\n"));
        let mut cumulative = 0;
        for (i, le) in STEP_MICROS_BUCKETS.iter().enumerate() {
            cumulative += s.step_micros[i];
            out.push_str(&format!("{name}_bucket{{le=\"{}\"}} {cumulative}\n", *le as f64 / 1e6));
        }
        cumulative += s.step_micros[STEP_MICROS_BUCKETS.len()];
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {cumulative}\n"));
        out.push_str(&format!("{name}_sum {}\n{name}_count {cumulative}\n", s.step_micros_sum as f64 / 1e6));
        if let Some(o) = self.objects.lock().expect("BUG: metrics lock poisoned").as_ref() {
            let rows = [
                ("pagesync_s3_puts_total", "Object store PUT requests", g(&o.puts)),
                ("pagesync_s3_gets_total", "Object store GET requests", g(&o.gets)),
                ("pagesync_s3_lists_total", "Object store LIST requests", g(&o.lists)),
                ("pagesync_s3_deletes_total", "Object store DELETE requests", g(&o.deletes)),
                ("pagesync_s3_errors_total", "Object store requests that failed", g(&o.errors)),
                ("pagesync_s3_bytes_put_total", "Bytes written to the object store", g(&o.bytes_put)),
                ("pagesync_s3_bytes_got_total", "Bytes read from the object store", g(&o.bytes_got)),
            ];
            for (name, help, v) in rows {
                metric(&mut out, name, "counter", help, v);
            }
        }
        if let Some(c) = self.cluster.lock().expect("BUG: metrics lock poisoned").as_ref() {
            let gauges = [
                (
                    "pagesync_cluster_owned_documents",
                    "Documents whose lease this server holds",
                    c.owned() as u64,
                ),
                (
                    "pagesync_cluster_live_servers",
                    "Live servers of the cluster this server sees, itself included",
                    c.live_members() as u64,
                ),
            ];
            for (name, help, v) in gauges {
                metric(&mut out, name, "gauge", help, v);
            }
            let st = &c.stats;
            let rows = [
                ("pagesync_cluster_renewals_total", "Membership renewals that succeeded", g(&st.renewals)),
                (
                    "pagesync_cluster_renewal_failures_total",
                    "Membership renewals that failed",
                    g(&st.renewal_failures),
                ),
                (
                    "pagesync_cluster_leases_taken_total",
                    "Document leases this server took (new documents and takeovers)",
                    g(&st.leases_taken),
                ),
                (
                    "pagesync_cluster_burials_total",
                    "Servers silent for a lease that this server buried (their next renewal fails)",
                    g(&st.burials),
                ),
                (
                    "pagesync_cluster_rejoins_total",
                    "Times this server found itself buried and joined again under a new id, holding nothing",
                    g(&st.rejoins),
                ),
                (
                    "pagesync_cluster_takeovers_total",
                    "Document leases taken from a server that was gone",
                    g(&st.takeovers),
                ),
                (
                    "pagesync_cluster_handovers_total",
                    "Document leases handed to another server on a graceful shutdown",
                    g(&st.handovers),
                ),
                (
                    "pagesync_cluster_lapses_total",
                    "Times this server's membership lapsed and it stopped writing",
                    g(&st.lapses),
                ),
            ];
            for (name, help, v) in rows {
                metric(&mut out, name, "counter", help, v);
            }
        }
        out
    }
}

/// Milliseconds since the Unix epoch by this machine's clock (0 before it).
/// Milliseconds on a clock that never steps (since this process first asked), from 1: for
/// durations, such as how long a socket has taken nothing.
pub fn mono_ms() -> i64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| std::time::Instant::now() - std::time::Duration::from_millis(1));
    start.elapsed().as_millis() as i64
}

pub fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `name` in a document's directory under a `file://` root: `<root>/<2 hex>/<doc>/<name>`.
fn doc_path(root: &std::path::Path, doc: DocId, name: &str) -> PathBuf {
    let id = doc.to_string();
    root.join(&id[..2]).join(&id).join(name)
}

/// `name` under a document's prefix in an object store: `<2 hex>/<doc>/<name>`.
fn doc_key(doc: DocId, name: &str) -> String {
    let id = doc.to_string();
    format!("{}/{id}/{name}", &id[..2])
}

/// A deleted document's tombstone under a `file://` root: beside where its storage was.
pub fn tombstone_path(root: &std::path::Path, doc: DocId) -> PathBuf {
    doc_path(root, doc, "DELETED")
}

/// A deleted document's tombstone in an object store.
pub fn tombstone_key(doc: DocId) -> String {
    doc_key(doc, "DELETED")
}

/// Where a document's storage journal lives under `root`.
pub fn storage_dir(root: &std::path::Path, doc: DocId) -> PathBuf {
    doc_path(root, doc, "storage")
}

/// What `Store::take_back_unpaired_step` took back, and the history journal it opened to look.
pub type TakenBack = (Option<pagesync::journal::Lsn>, Option<Box<dyn Journal>>);

/// Storage entries `Store::take_back_unpaired_step` reads back, at most, for the step before
/// the newest (past a checkpoint's parts).
const MAX_ENTRIES_BACK: usize = 4_096;

/// The mark of `Store::mark_paired`: beside the document's journals.
fn pairing_path(root: &std::path::Path, doc: DocId) -> PathBuf {
    doc_path(root, doc, "paired")
}

/// Makes a rename or removal in `path`'s directory durable.
fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => std::fs::File::open(dir).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

/// Where a document's history journal lives under `root`: beside its storage.
pub fn history_dir(root: &std::path::Path, doc: DocId) -> PathBuf {
    doc_path(root, doc, "history")
}

/// The key prefix of a document's history journal in an object store.
pub fn history_key(doc: DocId) -> String {
    doc_key(doc, "history")
}

/// The lock of a store's directory, for a server or a command that writes the store: a
/// `file://` store's own (one process at a time), an `object+file://` directory's shared (no
/// `file://` server beside it); none for S3, whose writes are fenced.
pub fn store_lock(store: &Store) -> anyhow::Result<Option<pagesync::journal::DirLock>> {
    Ok(match store {
        Store::Files(root) => Some(lock_store(root)?),
        Store::Objects(b) => {
            b.url().strip_prefix("file://").map(|dir| lock_store_shared(dir.as_ref())).transpose()?
        }
    })
}

/// Takes the `file://` store's lock, or says which process holds it.
pub fn lock_store(root: &std::path::Path) -> anyhow::Result<pagesync::journal::DirLock> {
    lock_store_as(root, false)
}

/// The lock of an `object+file://` store: shared by the servers of its cluster (they fence each
/// other), never held beside a `file://` server's (the two keep documents in different forms:
/// one written in the other's was unreadable to both).
pub fn lock_store_shared(root: &std::path::Path) -> anyhow::Result<pagesync::journal::DirLock> {
    lock_store_as(root, true)
}

fn lock_store_as(root: &std::path::Path, shared: bool) -> anyhow::Result<pagesync::journal::DirLock> {
    use pagesync::journal::{DirLock, LockError, lock::this_command};
    let locked = match shared {
        true => DirLock::try_lock_shared(root, &this_command()),
        false => DirLock::try_lock(root, &this_command()),
    };
    locked.map_err(|e| match e {
        LockError::Held { dir, holder } => anyhow::anyhow!(
            "another pagesync-server is serving {} ({holder}); one store has one server at a time: stop it first",
            dir.display()
        ),
        e => e.into(),
    })
}

/// Raises this process's open-file limit to its hard limit (each connection is a file), and
/// returns the limit in force. Every server and load test wants it; Debian's default soft
/// limit (1,024) is below `--max-connections`.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            return Some(hard);
        }
        Some(soft)
    }
    #[cfg(not(unix))]
    None
}

/// The key prefix of a document's storage journal in an object store.
pub fn storage_key(doc: DocId) -> String {
    doc_key(doc, "storage")
}

/// How long a server's start waits for its object store's first answer.
const STORE_CHECK_WAIT: Duration = Duration::from_secs(10);

/// Asks the object store once before serving: a store that refuses (no such bucket, refused
/// credentials) is a configuration to fix, so the server does not start; one that does not
/// answer may be back soon, so the server starts and says so (its documents are `unavailable`
/// to clients until the store answers).
async fn check_objects(b: &ObjectBackend) -> anyhow::Result<()> {
    let b = b.clone();
    match tokio::task::spawn_blocking(move || b.check(STORE_CHECK_WAIT)).await? {
        Ok(()) => Ok(()),
        Err(pagesync::journal::StoreProblem::Refused(why)) => {
            anyhow::bail!("the object store refused the server: {why}")
        }
        Err(pagesync::journal::StoreProblem::Silent(why)) => {
            tracing::warn!(
                "the object store does not answer; serving anyway (documents are unavailable until it does): {why}"
            );
            Ok(())
        }
    }
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    cfg: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // One server per `file://` store: a second one would write the same journals. The lock
    // is held until `serve` returns (the kernel drops it if the process dies).
    let _store_lock = store_lock(&cfg.store)?;
    if let Store::Objects(b) = &cfg.store {
        *metrics.objects.lock().expect("BUG: metrics lock poisoned") = Some(b.stats().clone());
        check_objects(b).await?;
    }
    let cluster = match (&cfg.cluster, &cfg.store) {
        (None, _) => None,
        (Some(_), Store::Files(_)) => anyhow::bail!(
            "--advertise needs a store every server reaches: s3://BUCKET/PREFIX (or object+file:///DIR on one host)"
        ),
        (Some(c), Store::Objects(b)) => {
            let (b, advertise, lease_ms) = (b.clone(), c.advertise.clone(), c.lease_ms);
            let joined = tokio::task::spawn_blocking(move || cluster::Cluster::join(b, &advertise, lease_ms))
                .await??;
            tracing::info!(id = joined.id(), url = joined.url(), "joined the cluster");
            Some(Arc::new(joined))
        }
    };
    *metrics.cluster.lock().expect("BUG: metrics lock poisoned") = cluster.clone();
    // Said once the store is this server's (its lock held, its cluster joined): ready.
    let auth_note = if cfg.auth_secret.is_some() { "tokens required" } else { "no auth: loopback only" };
    tracing::info!(
        "pagesync-server listening on ws://{}/v1/sync, documents in {} ({auth_note})",
        listener.local_addr()?,
        cfg.store.describe(),
    );
    // Renewals and lists on threads of their own: a slow list never delays a renewal.
    let ticker = cluster.clone().map(|c| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spawn = |name: &str, run: fn(&cluster::Cluster, &std::sync::atomic::AtomicBool)| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(&c, &stop))
                .expect("BUG: cannot start a cluster thread")
        };
        let threads = [
            spawn("pagesync-renew", cluster::Cluster::renew_until),
            spawn("pagesync-members", cluster::Cluster::refresh_until),
        ];
        (stop, threads)
    });
    let store = cfg.store.clone();
    let leases = cluster.clone();
    let step_limits = StepLimits {
        max_mutation_bytes: cfg.limits.max_mutation_bytes,
        max_doc_bytes: cfg.limits.max_doc_bytes,
        budget: cfg.limits.budget,
        max_step_vm_steps: cfg.limits.budget.max_vm_steps,
        max_mutation_cpu: cfg.limits.max_mutation_cpu,
        ..StepLimits::default()
    };
    let compaction = cfg.compaction;
    let registry = cfg.mutators.clone();
    let keep_history = cfg.keep_history;
    let opener = Box::new(move |doc: DocId| {
        let (journal, generation) = match &leases {
            Some(cluster) => {
                let generation = cluster.place(doc)?;
                let inner = store.open_journal(doc)?;
                (
                    Box::new(cluster::Leased { inner, cluster: cluster.clone(), doc, generation }) as _,
                    generation,
                )
            }
            None => (store.open_journal(doc)?, 0),
        };
        let mut journal = journal;
        // History beside storage (a `file://` store, one server): a step taken back before the
        // document is read, or the mark gone before steps are written without history.
        let paired = leases.is_none() && store.pairs_history();
        let mut history_opened = None;
        if paired && keep_history {
            match store.take_back_unpaired_step(doc, &mut *journal) {
                Ok((taken_back, history)) => {
                    history_opened = history;
                    if let Some(lsn) = taken_back {
                        tracing::warn!(
                        %doc,
                        "took back storage entry {lsn}: a crash left it durable without its history entry; it was never acknowledged, and its clients send its mutations again"
                            );
                    }
                }
                // Kept (as an acknowledgement lost would be): the document opens either way.
                Err(e) => tracing::warn!(
                    %doc,
                    "could not tell whether the newest storage entry lost its history entry in a crash; kept: {e}"
                ),
            }
        } else if paired {
            store.forget_pairing(doc)?;
        }
        let mut d = ServerDocument::with_reducer(journal, SqlReducer::default(), step_limits)?;
        d.set_compaction(compaction);
        if let Some(registry) = registry.clone() {
            d.set_mutators(Box::new(move || registry.for_doc(doc)));
        }
        // The history is written under the same lease as the storage.
        let (store, leases) = (store.clone(), leases.clone());
        if !keep_history {
            return Ok(d);
        }
        let marks = store.clone();
        d.set_history(Box::new(move |create| {
            if !create && !store.history_exists(doc)? {
                return Ok(None);
            }
            let inner = store.open_history(doc)?;
            Ok(Some(match &leases {
                Some(cluster) => {
                    Box::new(cluster::Leased { inner, cluster: cluster.clone(), doc, generation })
                }
                None => inner,
            }))
        }));
        if paired {
            d.write_history_beside(Box::new(move |from| marks.mark_paired(doc, from)));
        }
        if let Some(history) = history_opened {
            d.set_history_journal(history);
        }
        Ok(d)
    });
    let options = SessionOptions {
        commit_interval_ms: cfg.commit_interval_ms.unwrap_or(cfg.store.default_commit_interval_ms()),
        step_threads: DEFAULT_STEP_THREADS,
        idle_close_ms: Some(cfg.idle_close_ms),
        idle_shrink_ms: Some(DEFAULT_IDLE_SHRINK_MS),
        history_needs_admin: cfg.history_needs_admin,
        keep_history: cfg.keep_history,
        max_open_docs: cfg.limits.max_open_docs,
        ..SessionOptions::default()
    };
    let started = std::time::Instant::now();
    let exists_store = cfg.store.clone();
    let moved = cluster.clone();
    let exists = move |doc: DocId| {
        // Served elsewhere, as found a moment ago: redirected without a request.
        if let Some(owner) = moved.as_ref().and_then(|c| c.moved(doc)) {
            return Err(pagesync::Error::Moved { owner });
        }
        exists_store.exists(doc)
    };
    let mut session = ServerSession::new(opener)
        .with_exists(Box::new(exists))
        .with_options(options)
        .with_clock(Box::new(move || started.elapsed().as_micros() as u64));
    if let Some(registry) = cfg.mutators.clone() {
        session = session.with_mutators(Box::new(move |doc| registry.for_doc(doc)));
    }
    if let Some(secret) = cfg.auth_secret.clone() {
        session =
            session.with_auth(Box::new(move |token: &str, now_ms: i64| auth::verify(&secret, token, now_ms)));
    }
    let generation = cluster.clone().map(|c| Arc::new(move || c.generation()) as hub::Generation);
    let hub = Hub::spawn_watching(session, metrics.clone(), DEFAULT_STEP_THREADS, generation);
    // SIGHUP reloads the mutator definitions; subscribers get the new ones at once.
    #[cfg(unix)]
    if let Some(registry) = cfg.mutators.clone() {
        let hub = hub.clone();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match registry.reload() {
                    Ok(()) => {
                        tracing::info!("mutators reloaded");
                        hub.mutators_changed();
                    }
                    Err(e) => tracing::warn!("mutators not reloaded, the previous ones stay: {e:#}"),
                }
            }
        });
    }
    let admission = http::Admission {
        pending: http::Pending::new(http::DEFAULT_MAX_PENDING_CONNECTIONS),
        connections: Arc::new(Semaphore::new(cfg.limits.max_connections)),
        inbound: Arc::new(Semaphore::new(http::inbound_bytes_total(cfg.limits.max_frame_bytes))),
        arriving: Arc::new(Semaphore::new(http::arriving_bytes_total(cfg.limits.max_frame_bytes))),
    };
    let auth_secret = cfg.auth_secret.clone().map(Arc::new);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        // Out of file descriptors, say: do not spin on it.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Small frames must leave at once: Nagle plus delayed ACKs would add ~40 ms.
                let _ = stream.set_nodelay(true);
                let (pending, evicted) = admission.pending.admit();
                if evicted {
                    metrics.pending_evicted.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "closed the oldest connection that had not said Hello, to admit this one");
                }
                let routes = http::Routes {
                    hub: hub.clone(),
                    metrics: metrics.clone(),
                    store: cfg.store.clone(),
                    max_frame_bytes: cfg.limits.max_frame_bytes,
                    web_root: cfg.web_root.clone(),
                    auth_secret: auth_secret.clone(),
                    admission: admission.clone(),
                };
                tokio::spawn(http::serve_connection(stream, routes, pending));
            }
        }
    }
    hub.shutdown().await;
    if let (Some(c), Some((stop, threads))) = (cluster, ticker) {
        stop.store(true, Ordering::Relaxed);
        threads.iter().for_each(|t| t.thread().unpark());
        let _ = tokio::task::spawn_blocking(move || {
            threads.into_iter().for_each(|t| drop(t.join()));
            c.leave();
        })
        .await;
    }
    Ok(())
}
