//! pagesync native client: the Rust API over websockets.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let client = pagesync_client::Client::connect("ws://127.0.0.1:8787/v1/sync", "", "./data")?;
//! let doc = client.open("0123456789abcdef0123456789abcdef".parse()?)?;
//! doc.execute("CREATE TABLE IF NOT EXISTS t(x TEXT)", vec![])?; // local, instant, durable
//! doc.sync(std::time::Duration::from_secs(5)).await?;          // pushed and confirmed
//! # Ok(()) }
//! ```
//!
//! A background task owns the connection: it reconnects with bounded exponential backoff and
//! jitter, and drives the sans-io `ClientSession`. Local journals live under the data
//! directory, one folder per document, so writes made offline survive a restart and sync on
//! the next connection.
#![forbid(unsafe_code)]

mod remote;
mod tls;

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use pagesync::journal::{FileJournal, FileJournalOptions};
/// Another client with a document open, as presence shows it (`Document::presence`).
pub use pagesync::protocol::Peer;
use pagesync::protocol::{ClientSession, DocStatus, Route};
use pagesync::{
    ClientDocument, DocId, Durability, Mutation, MutationState, Rows, SqlMutation, Submitted, Value,
};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How often `open_wait` tries a busy replica again.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// Takes the lock of the replica in `dir`, for this process: `ReplicaBusy`, naming the holder,
/// when another has it.
fn lock_replica(dir: &Path) -> Result<pagesync::journal::DirLock> {
    pagesync::journal::DirLock::try_lock(dir, &pagesync::journal::lock::this_command()).map_err(|e| match e {
        pagesync::journal::LockError::Held { dir, holder } => ClientError::ReplicaBusy { dir, holder },
        e => ClientError::Lock(e),
    })
}

/// Runs `attempt` until it is not `ReplicaBusy`, or `wait` has passed (then its last answer),
/// as SQLite's busy timeout does.
async fn while_busy<T>(wait: Duration, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + wait;
    loop {
        match attempt() {
            Err(ClientError::ReplicaBusy { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(LOCK_RETRY).await;
            }
            done => return done,
        }
    }
}

/// First reconnect delay; doubles per failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts: a restarted server is found within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest each part of a connection attempt may take (resolving the host; TCP to one of its
/// addresses; TLS and the websocket handshake): a server or a middlebox that accepts and then
/// says nothing must not hold the route (nor keep the client from its next URL) for the
/// operating system's TCP timeouts.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error(transparent)]
    Core(#[from] pagesync::Error),
    #[error(transparent)]
    Journal(#[from] pagesync::journal::JournalError),
    #[error("timed out after {ms} ms with {n} mutations still pending (is the server reachable?)", ms = .0.as_millis(), n = .1)]
    SyncTimeout(Duration, usize),
    /// The server could not be reached; says why (a refused TCP connection, no answer, ...).
    /// Trying again later may succeed.
    #[error("{0}")]
    Connect(String),
    /// The server, or the URL, refuses the connection for good: the handshake answered an HTTP
    /// error (a wrong path, refused credentials) or the URL is not one a client can use.
    /// Trying again will not help until something changes.
    #[error("{0}")]
    Refused(String),
    #[error("the server reported: {code}: {message}")]
    Server { code: String, message: String },
    /// This replica could not write what the server sent to its own disk (full, failing, or
    /// refusing writes after a failed fsync): the message says which. Someone must act; the
    /// replica takes the server's entries again once it can.
    #[error("{0}")]
    LocalStorage(String),
    /// Another process has this replica open; it is never written by two at once.
    #[error("the replica {dir} is open in another process ({holder}); close it, or wait for it to finish")]
    ReplicaBusy { dir: PathBuf, holder: String },
    #[error(transparent)]
    Lock(pagesync::journal::LockError),
    /// A file operation on the client's data directory failed (the error is in the message).
    #[error("cannot {op} {}: {error}", path.display())]
    Io { op: &'static str, path: PathBuf, error: std::io::Error },
    /// The server's history could not be read (unreachable, refused, or not kept).
    #[error("reading the history: {0}")]
    History(String),
    /// The replica's timeline key is missing, damaged or not its timeline's: without it the
    /// server takes none of its writes (see `pagesync::TimelineKey`).
    #[error(
        "the replica {dir} has no usable timeline key ({why}): the server takes none of its writes without it. If the key is lost, move timeline/ out of the replica to start a new timeline (its writes not yet synced can no longer be sent)"
    )]
    TimelineKey { dir: PathBuf, why: String },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

struct Shared {
    session: Mutex<ClientSession>,
    /// Bumped when there may be something to send: every connection's task wakes.
    wake: tokio::sync::watch::Sender<u64>,
    /// A document changed route (a redirect, or its server unreachable): the driver looks at
    /// which connections are wanted.
    rerouted: Notify,
    /// Bumped whenever a replica may have changed: a local write or a frame from the server.
    changed: tokio::sync::watch::Sender<u64>,
    data_dir: PathBuf,
    connected: Mutex<bool>,
    /// Why the last connection attempt failed, and whether trying again cannot help.
    connect_error: Mutex<Option<ConnectFailed>>,
    /// The lock on each open replica's directory, held while the client lives.
    locks: Mutex<Vec<(DocId, pagesync::journal::DirLock)>>,
    /// `execute` calls and their group commits.
    writes: Mutex<WriteQueue>,
    /// Signalled when a group commit has answered its writes.
    written: std::sync::Condvar,
    /// Signalled when a write queues while a leader gathers.
    gathered: std::sync::Condvar,
    /// For documents opened from now on (`Client::set_durability`).
    durability: Mutex<Durability>,
    /// The connection for pages fetched on demand (`remote`), shared by every document.
    fetcher: Arc<Mutex<remote::Fetcher>>,
    /// The server URLs the client was given (at least one).
    homes: Vec<String>,
    /// Its token's `sub` claim: the subject its mutator calls name.
    subject: String,
}

/// `execute` calls waiting for a group commit, and the answers of those committed.
#[derive(Default)]
struct WriteQueue {
    next_ticket: u64,
    waiting: Vec<QueuedWrite>,
    answers: HashMap<u64, Result<Submitted>>,
    /// A caller is committing a group: the others wait for it rather than for the session,
    /// and the next group takes every write that queued meanwhile.
    committing: bool,
    /// How many writes the last group took: the next leader waits (at most `GATHER`) until
    /// as many have queued, so the callers the last group just answered, who come straight
    /// back with their next write, share the next fsync instead of the one after it.
    last_group: usize,
    /// A leader is gathering: a new write wakes it (`gathered`).
    gathering: bool,
    stats: WriteStats,
}

/// The longest a group's leader waits for the writers of the last group to come back. A
/// fraction of an fsync: without it, ten writers settle into two alternating groups of five,
/// each write waiting for two fsyncs. A lone writer never waits (its last group was itself).
const GATHER: Duration = Duration::from_micros(150);

/// How `execute` calls shared their fsyncs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// `execute` calls answered.
    pub writes: u64,
    /// Group commits that answered them: each is one local transaction and (per document)
    /// one fsync. `writes / commits` is how many calls shared each.
    pub commits: u64,
}

/// One `execute` call's mutation, and the ticket its answer is filed under.
struct QueuedWrite {
    ticket: u64,
    doc: DocId,
    mutation: Mutation,
}

/// Makes `writes` durable together: per document, one local transaction and one fsync for
/// all of them, each answered on its own. The fsyncs run with the session's lock let go
/// (`ClientSession::mutate_group_detached`). When their shared append fails, each is tried
/// alone, so each caller gets its own typed error.
fn commit_group(shared: &Shared, writes: Vec<QueuedWrite>) -> (Vec<(u64, Result<Submitted>)>, bool) {
    let mut answered = Vec::with_capacity(writes.len());
    let mut by_doc: BTreeMap<DocId, Vec<QueuedWrite>> = BTreeMap::new();
    for w in writes {
        by_doc.entry(w.doc).or_default().push(w);
    }
    let mut detached = Vec::new();
    // Whether the connections must be woken once the fsyncs are done: some write only then
    // became sendable, or went another way.
    let mut wake_after = false;
    let mut session = shared.session();
    for (doc, writes) in by_doc {
        let tickets: Vec<u64> = writes.iter().map(|w| w.ticket).collect();
        let mutations = writes.iter().map(|w| w.mutation.clone()).collect();
        match session.mutate_group_detached(doc, mutations) {
            Ok(group) => detached.push((tickets, group)),
            Err(_) => answered.extend(tickets.into_iter().zip(writes.into_iter().map(|w| {
                wake_after = true;
                let m = w.mutation;
                session.mutate(doc, m.body, m.client_time_ms, m.seed).map_err(ClientError::from)
            }))),
        }
    }
    drop(session);
    // The writes go up while their fsyncs run (under `Full` the sent marks cover them): the
    // connections send what is due now, not once the disk has answered.
    if !detached.is_empty() {
        shared.wake.send_modify(|n| *n += 1);
    }
    // The fsyncs hold no lock: this replica's deliveries and rebases go on while they run.
    let outcomes: Vec<std::io::Result<()>> = detached.iter().map(|(_, group)| group.run()).collect();
    let mut session = shared.session();
    for ((tickets, group), outcome) in detached.into_iter().zip(outcomes) {
        wake_after |= outcome.is_err() || !group.sendable_before_fsync();
        let answers = session.finish_group(group, outcome).into_iter().map(|a| a.map_err(ClientError::from));
        answered.extend(tickets.into_iter().zip(answers));
    }
    (answered, wake_after)
}

impl Shared {
    fn session(&self) -> MutexGuard<'_, ClientSession> {
        self.session.lock().expect("BUG: session lock poisoned")
    }

    fn write_queue(&self) -> MutexGuard<'_, WriteQueue> {
        self.writes.lock().expect("BUG: write queue lock poisoned")
    }

    /// The server `doc` syncs with: home, or where it was redirected.
    fn server_url(&self, doc: DocId) -> String {
        let s = self.session();
        let url = s.route_of(doc).cloned().flatten().or_else(|| s.home_url().map(str::to_owned));
        url.unwrap_or_else(|| self.homes[0].clone())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// How `Client::open_with` opens a document.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Create the document on the server if it does not exist there (as `open` does).
    /// Without, a missing document is `not_found`, and the replica's first write creates it.
    pub create: bool,
    /// Wait up to this long while another process has the replica open (as `open_wait`).
    pub wait: Duration,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { create: true, wait: Duration::ZERO }
    }
}

/// A connection to one server, shared by every document opened through it.
pub struct Client {
    shared: Arc<Shared>,
    driver: tokio::task::JoinHandle<()>,
    syncer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("data_dir", &self.shared.data_dir).finish()
    }
}

impl Drop for Client {
    /// Stops the background task and closes every replica at once, releasing their locks: the
    /// same process (or another) may reopen them right after. The session's mutex is taken
    /// after the abort, so a task in the middle of applying a frame finishes that first, and
    /// never touches a replica again (it is gone from the session).
    fn drop(&mut self) {
        self.driver.abort();
        self.syncer.abort();
        let ids: Vec<DocId> =
            self.shared.locks.lock().expect("BUG: lock poisoned").iter().map(|(id, _)| *id).collect();
        let mut session = self.shared.session();
        // Under `Durability::Normal`, what is written so far is durable when the client goes,
        // and so are the server's entries received since the last tick (or they are
        // downloaded again on the next open).
        sync_replicas(&mut session);
        // Everything sent is durable now: a reopen has nothing to fill.
        if let Err(e) = session.settle_sent_marks() {
            tracing::warn!("lowering the sent marks failed (the next open fills what they cover): {e}");
        }
        for id in ids {
            drop(session.remove_document(id));
        }
        drop(session);
        self.shared.locks.lock().expect("BUG: lock poisoned").clear();
    }
}

/// A document's error as a wait for it reports it: this replica's own storage failing
/// (`codes::LOCAL_STORAGE`), or what the server said.
fn document_error(code: String, message: String) -> ClientError {
    if code == pagesync::protocol::codes::LOCAL_STORAGE {
        return ClientError::LocalStorage(message);
    }
    ClientError::Server { code, message }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Randomness for timeline ids and mutation seeds (the core takes seeds as arguments; drivers
/// supply them). The entropy is `RandomState`'s SipHash keys, which std seeds from the OS once
/// per thread and varies per call; hashing the clock only adds a little more.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// The directory beside a replica's `timeline/` of its sent mark: the durable bound on the
/// LSNs it may have sent before they were durable (`ClientDocument::send_before_durable`).
const SENT_MARK_DIR: &str = "sent";

/// The file beside a replica's `timeline/` that holds its key (`pagesync::TimelineKey`).
const TIMELINE_KEY_FILE: &str = "timeline.key";

/// 32 bytes from the OS's random source (a timeline key: a secret, unlike a timeline id).
fn random_key() -> [u8; 32] {
    use std::io::Read;
    let mut key = [0u8; 32];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
    if from_os.is_err() {
        // No /dev/urandom (not a Unix): std's per-process OS-seeded SipHash keys.
        for (i, chunk) in key.chunks_mut(8).enumerate() {
            let mut h = RandomState::new().build_hasher();
            h.write_usize(i);
            h.write_u64(random_u64());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    key
}

/// Writes the key durably: a temporary file, fsynced, renamed over, the directory fsynced.
fn write_key(dir: &Path, key: &pagesync::TimelineKey) -> Result<()> {
    let fail =
        |e: std::io::Error| ClientError::TimelineKey { dir: dir.to_owned(), why: format!("writing it: {e}") };
    let tmp = dir.join(format!("{TIMELINE_KEY_FILE}.tmp"));
    let mut file = pagesync::journal::create_fresh(&tmp, 0o600).map_err(fail)?;
    std::io::Write::write_all(&mut file, &key.0).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, dir.join(TIMELINE_KEY_FILE)).map_err(fail)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)
}

/// The replica's key as its file holds it (`ClientDocument::set_timeline_key` checks that it
/// opens the timeline).
fn read_key(dir: &Path) -> Result<pagesync::TimelineKey> {
    let fail = |why: String| ClientError::TimelineKey { dir: dir.to_owned(), why };
    let bytes =
        std::fs::read(dir.join(TIMELINE_KEY_FILE)).map_err(|e| fail(format!("{TIMELINE_KEY_FILE}: {e}")))?;
    pagesync::TimelineKey::from_file_bytes(&bytes)
        .ok_or_else(|| fail(format!("{TIMELINE_KEY_FILE} holds {} bytes, not 32", bytes.len())))
}

impl Client {
    /// Starts the connection in the background; works offline until the server answers.
    /// Must be called within a tokio runtime.
    ///
    /// `url` may name several servers of one cluster, separated by commas
    /// (`ws://a:8787/v1/sync,ws://b:8787/v1/sync`): the client connects to one, and to the
    /// next when it cannot. A server that does not serve a document redirects it to the one
    /// that does; the client keeps a connection to each server its documents need.
    pub fn connect(url: &str, token: &str, data_dir: impl AsRef<Path>) -> Result<Client> {
        let homes: Vec<String> =
            url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(str::to_owned).collect();
        let Some(first) = homes.first().cloned() else {
            return Err(ClientError::Connect(format!("no server URL in {url:?}")));
        };
        // A URL no connection can use is refused here, not after a connection timeout.
        for home in &homes {
            tls::host_port(home).map_err(ClientError::Refused)?;
        }
        let data_dir = data_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&data_dir).map_err(|error| ClientError::Io {
            op: "create the data directory",
            path: data_dir.clone(),
            error,
        })?;
        let shared = Arc::new(Shared {
            session: Mutex::new(ClientSession::new(token)),
            wake: tokio::sync::watch::Sender::new(0),
            rerouted: Notify::new(),
            changed: tokio::sync::watch::Sender::new(0),
            data_dir,
            connected: Mutex::new(false),
            connect_error: Mutex::new(None),
            locks: Mutex::new(Vec::new()),
            writes: Mutex::new(WriteQueue::default()),
            written: std::sync::Condvar::new(),
            gathered: std::sync::Condvar::new(),
            durability: Mutex::new(Durability::Full),
            fetcher: Arc::new(Mutex::new(remote::Fetcher::new(&first, token))),
            homes: homes.clone(),
            subject: pagesync::mutators::token_subject(token),
        });
        let driver = tokio::spawn(drive(homes, shared.clone()));
        let syncer = tokio::spawn(sync_timelines(shared.clone()));
        Ok(Client { shared, driver, syncer })
    }

    /// A page of `doc`'s history, as `Document::history` reads it, without opening a replica
    /// of it: no replica is made here, and no document on the server (a mistyped id is
    /// `not_found`).
    pub async fn history(
        &self,
        doc: DocId,
        query: pagesync::history::HistoryQuery,
    ) -> Result<pagesync::history::HistoryPage> {
        read_history(&self.shared, doc, query).await
    }

    /// Opens (or creates) a document's local replica and starts syncing it, creating the
    /// document on the server if it does not exist there. The replica's directory is locked
    /// for as long as the client lives: if another process has it open, this fails at once
    /// with `ReplicaBusy`, naming that process (`open_wait` waits; `open_with` can open only a
    /// document that exists).
    pub fn open(&self, doc: DocId) -> Result<Document> {
        self.open_as(doc, true)
    }

    /// `open` as `options` say: without `create`, a document the server does not have is
    /// answered `not_found` (`Document::sync` fails with it, the status shows it) and nothing
    /// is created there, until this replica writes to it. For a tool that reads, shows or
    /// exports a document, so that a mistyped id is said, not made.
    pub async fn open_with(&self, doc: DocId, options: OpenOptions) -> Result<Document> {
        while_busy(options.wait, || self.open_as(doc, options.create)).await
    }

    fn open_as(&self, doc: DocId, create: bool) -> Result<Document> {
        if !self.shared.session().has_document(doc) {
            let dir = self.shared.data_dir.join(doc.to_string());
            let lock = lock_replica(&dir)?;
            // Read at every miss of SQLite's page cache: through a map, not a `pread` each.
            let storage_opts = FileJournalOptions {
                map_reads: true,
                roll_without_barrier: true,
                ..FileJournalOptions::default()
            };
            let storage = match FileJournal::open_or_create(
                dir.join("storage"),
                doc.journal_id(),
                storage_opts.clone(),
            ) {
                // The server's entries, damaged here: set aside (for whoever wants to look) and
                // downloaded again. The replica's own writes are in its timeline, untouched.
                Err(
                    e @ (pagesync::journal::JournalError::Corrupt { .. }
                    | pagesync::journal::JournalError::CorruptSegment { .. }),
                ) => {
                    // Only the newest is kept: a disk that keeps damaging it must not fill up.
                    for old in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                        if old.file_name().to_string_lossy().starts_with("storage.damaged-") {
                            let _ = std::fs::remove_dir_all(old.path());
                        }
                    }
                    let aside = dir.join(format!("storage.damaged-{}", now_ms()));
                    tracing::warn!(
                        "{}: the local copy of the server's entries is damaged ({e}); it is moved to {} and downloaded again",
                        dir.display(),
                        aside.display()
                    );
                    std::fs::rename(dir.join("storage"), &aside).map_err(|error| ClientError::Io {
                        op: "set aside",
                        path: dir.join("storage"),
                        error,
                    })?;
                    FileJournal::open_or_create(dir.join("storage"), doc.journal_id(), storage_opts)?
                }
                opened => opened?,
            };
            let tl_dir = dir.join("timeline");
            // A local write is an append and a barrier: written into space made ahead.
            let tl_opts = FileJournalOptions { preallocate: true, ..FileJournalOptions::default() };
            let timeline = match FileJournal::open(&tl_dir, tl_opts.clone()) {
                Ok(j) => j,
                Err(
                    pagesync::journal::JournalError::Missing { .. }
                    | pagesync::journal::JournalError::Foreign { .. },
                ) if !tl_dir.join("JOURNAL").exists() => {
                    // The key first, durably: a timeline never exists without it.
                    let key = pagesync::TimelineKey::from_bytes(random_key());
                    write_key(&dir, &key)?;
                    // Outcomes of an earlier timeline (whose directory is gone) mean nothing now;
                    // if they cannot be removed, opening them below says so.
                    let _ = std::fs::remove_dir_all(dir.join("outcomes"));
                    let _ = std::fs::remove_dir_all(dir.join(SENT_MARK_DIR));
                    FileJournal::create(&tl_dir, key.id().journal_id(), tl_opts)?
                }
                Err(e) => return Err(e.into()),
            };
            let key = read_key(&dir)?;
            // The server's rejections of this replica's mutations, kept once the server forgets
            // them; named after the timeline, so a new timeline starts with none.
            let outcomes = FileJournal::open_or_create(
                dir.join("outcomes"),
                pagesync::journal::Journal::id(&timeline),
                FileJournalOptions::default(),
            )?;
            let mut replica = ClientDocument::open_with_outcomes(
                Box::new(storage),
                Box::new(timeline),
                Box::new(outcomes),
            )?;
            replica
                .set_timeline_key(key)
                .map_err(|e| ClientError::TimelineKey { dir: dir.clone(), why: e.to_string() })?;
            replica.set_durability(*self.shared.durability.lock().expect("BUG: lock poisoned"))?;
            // Writes go up while their fsync runs, under a bound kept durably beside the
            // timeline (`ClientDocument::send_before_durable`): after a crash, the LSNs it covers
            // past the timeline's end are filled before anything is written or sent.
            // Written once per `SEND_AHEAD_LSNS` writes: its file closed after each write, and
            // small segments, so the entries trimmed behind the newest free their space.
            let mark_opts = FileJournalOptions {
                close_files: true,
                max_segment_bytes: 64 << 10,
                ..FileJournalOptions::default()
            };
            let mark = FileJournal::open_or_create(
                dir.join(SENT_MARK_DIR),
                replica.timeline_id().journal_id(),
                mark_opts,
            )?;
            let filled = replica.send_before_durable(Box::new(mark))?;
            if filled > 0 {
                tracing::info!(
                    "{}: after a crash, filled {filled} timeline LSNs the sent mark covered past the timeline's end with no-ops (the server keeps any write it received there)",
                    dir.display()
                );
            }
            // The server's mutators as last sent: pending calls run under them offline too.
            if let Ok(source) = std::fs::read_to_string(dir.join(MUTATORS_FILE)) {
                match pagesync::mutators::Mutators::parse(&source) {
                    Ok(m) => replica.set_mutators(Some(Arc::new(m)))?,
                    Err(e) => tracing::warn!("{}: {e}", dir.join(MUTATORS_FILE).display()),
                }
            }
            self.shared.locks.lock().expect("BUG: lock poisoned").push((doc, lock));
            // The server a redirect named last time: straight there (a hint; a server that
            // no longer serves it redirects again, one that is gone sends it home).
            let remembered = std::fs::read_to_string(dir.join(SERVER_FILE)).ok();
            let deleted = dir.join(DELETED_FILE).exists();
            let mut session = self.shared.session();
            session.add_document(doc, replica);
            session.set_create(doc, create);
            if deleted {
                session.mark_deleted(doc);
            }
            if let Some(url) = remembered.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
                session.route_to(doc, url);
            }
            drop(session);
            self.shared.rerouted.notify_one();
            self.shared.wake.send_modify(|n| *n += 1);
        } else if create {
            // Open already, perhaps only to read: from now on it may create.
            self.shared.session().set_create(doc, true);
            self.shared.wake.send_modify(|n| *n += 1);
        }
        let fresh = self
            .shared
            .session()
            .status(doc)
            .is_some_and(|st| st.storage_next == pagesync::journal::Lsn::FIRST);
        let remote = Remote { fresh, ..Remote::default() };
        Ok(Document { id: doc, shared: self.shared.clone(), remote: Arc::new(Mutex::new(remote)) })
    }

    /// `open`, waiting up to `wait` while another process has the replica open (as SQLite's
    /// busy timeout does), then failing with `ReplicaBusy`, which names that process.
    pub async fn open_wait(&self, doc: DocId, wait: Duration) -> Result<Document> {
        self.open_with(doc, OpenOptions { create: true, wait }).await
    }

    /// Uses `token` from now on: a token that replaces one about to expire, or one that did
    /// (the server closes a connection `unauthorized` at its token's `exp`, and refuses it
    /// after). Said to the server at once, on every connection, and used by every later
    /// one. It must name the same subject (`sub`) as the token the client was made with:
    /// this replica's pending mutator calls ran as that subject.
    pub fn set_token(&self, token: &str) -> Result<()> {
        pagesync::mutators::same_subject(&self.shared.subject, token).map_err(ClientError::Refused)?;
        self.shared.session().set_token(token);
        self.shared.fetcher.lock().expect("BUG: lock poisoned").set_token(token);
        self.shared.wake.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Closes `doc`'s replica and removes it, if it holds nothing: no entry from the server and
    /// no write of its own (a tool that opened a document the server turned out not to have).
    /// Done under the replica's lock, so no other process wrote to it meanwhile. Whether it
    /// was removed; its `Document` handles fail from then on.
    pub fn discard_if_empty(&self, doc: DocId) -> Result<bool> {
        let mut session = self.shared.session();
        if !session.status(doc).is_some_and(|st| st.holds_nothing()) {
            return Ok(false);
        }
        drop(session.remove_document(doc));
        let lock = {
            let mut locks = self.shared.locks.lock().expect("BUG: lock poisoned");
            let at = locks.iter().position(|(id, _)| *id == doc);
            at.map(|at| locks.remove(at))
        };
        let removed = remove_replica_dir(&self.shared.data_dir.join(doc.to_string()));
        drop((lock, session));
        removed.map(|()| true)
    }

    pub fn is_connected(&self) -> bool {
        *self.shared.connected.lock().expect("BUG: lock poisoned")
    }

    /// When local writes are durable, for every open document and those opened later:
    /// `Durability::Full` (the default) when `execute` returns; `Durability::Normal` within
    /// `NORMAL_SYNC_MS`, off the caller's path (a power cut may lose that interval's writes,
    /// never a write the server confirmed).
    pub fn set_durability(&self, durability: Durability) -> Result<()> {
        *self.shared.durability.lock().expect("BUG: lock poisoned") = durability;
        let mut session = self.shared.session();
        let ids: Vec<DocId> =
            self.shared.locks.lock().expect("BUG: lock poisoned").iter().map(|(id, _)| *id).collect();
        for id in ids {
            session.set_durability(id, durability)?;
        }
        Ok(())
    }

    /// How `execute` calls shared their fsyncs so far.
    pub fn write_stats(&self) -> WriteStats {
        self.shared.write_queue().stats
    }
}

/// One open document.
#[derive(Clone)]
pub struct Document {
    id: DocId,
    shared: Arc<Shared>,
    remote: Arc<Mutex<Remote>>,
}

/// A document's queries served from the server while its replica has no state yet.
#[derive(Default)]
struct Remote {
    snapshot: Option<pagesync::remote::RemoteSnapshot>,
    /// When the last attempt to map or read failed (see `remote::RETRY_AFTER`).
    failed_at: Option<Instant>,
    /// The server's refusal of that attempt, if it refused the document: `(code, message)`.
    refused: Option<(String, String)>,
    /// The replica was empty when this handle opened it, and has not caught up with the
    /// server since: it holds a prefix of the history, older than the server's state.
    fresh: bool,
    reads: RemoteReads,
}

/// Queries a document answered from the server's state, before its replica had one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoteReads {
    /// Queries answered so.
    pub queries: u64,
    /// Page requests they made (one round trip each).
    pub fetches: u64,
    /// Pages those requests brought.
    pub pages: u64,
}

/// Whether a replica's queries go to the server's state: it has nothing yet (new, or
/// restarting at a checkpoint), its first download is not over (`fresh`), or it has less
/// than a snapshot already shown (`at`); and it has no local writes (which only it has).
fn wants_remote(replica: &ClientDocument, fresh: bool, at: Option<pagesync::journal::Lsn>) -> bool {
    replica.pending_count() == 0
        && (fresh || at.is_some_and(|at| replica.storage_range().next() < at) || replica.lacks_state())
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document").field("id", &self.id).finish()
    }
}

impl Document {
    pub fn id(&self) -> DocId {
        self.id
    }

    /// Runs SQL locally at once and queues it for the server. Durable when this returns.
    ///
    /// Calls from several threads share fsyncs (group commit): while one call makes its write
    /// durable, the calls that arrive meanwhile queue up, and the next of them commits them all
    /// with one fsync. Each is still its own mutation, answered, confirmed or rejected alone.
    pub fn execute(&self, sql: &str, params: Vec<Value>) -> Result<Submitted> {
        pagesync::sandbox::require_statement(sql)?;
        self.submit(SqlMutation::one(sql, params).encode())
    }

    /// Calls the server-defined mutator `name` with `args` (see `pagesync::mutators`): run
    /// locally at once with the definitions the server sent (rejected locally with
    /// `no_such_mutator` until they arrive), then by the server, which decides. A token may
    /// allow calls only (`token --call`), and which ones.
    pub fn call(&self, name: &str, args: Vec<Value>) -> Result<Submitted> {
        let call =
            pagesync::mutators::Call { name: name.to_owned(), args, subject: self.shared.subject.clone() };
        self.submit(call.encode())
    }

    /// The server's mutator definitions for this document, as last sent (`None`: none yet).
    pub fn mutators(&self) -> Option<Arc<pagesync::mutators::Mutators>> {
        let s = self.shared.session();
        s.document(self.id).and_then(|d| d.mutators().cloned())
    }

    /// Submits one mutation body through the write queue (group commit).
    fn submit(&self, body: Vec<u8>) -> Result<Submitted> {
        let mutation = Mutation { client_time_ms: now_ms(), seed: random_u64(), body };
        let mut queue = self.shared.write_queue();
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push(QueuedWrite { ticket, doc: self.id, mutation });
        if queue.gathering {
            self.shared.gathered.notify_one();
        }
        loop {
            if let Some(answer) = queue.answers.remove(&ticket) {
                return answer;
            }
            if queue.committing {
                queue = self.shared.written.wait(queue).expect("BUG: write queue lock poisoned");
                continue;
            }
            // Lead the next group: every write queued so far, ours among them, once the
            // writers of the last group had a moment to come back.
            queue.committing = true;
            let until = std::time::Instant::now() + GATHER;
            queue.gathering = true;
            while queue.waiting.len() < queue.last_group {
                let left = until.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                queue =
                    self.shared.gathered.wait_timeout(queue, left).expect("BUG: write queue lock poisoned").0;
            }
            queue.gathering = false;
            let writes = std::mem::take(&mut queue.waiting);
            queue.last_group = writes.len();
            queue.stats.writes += writes.len() as u64;
            queue.stats.commits += 1;
            drop(queue);
            let (answers, wake_after) = commit_group(&self.shared, writes);
            queue = self.shared.write_queue();
            queue.answers.extend(answers);
            queue.committing = false;
            self.shared.written.notify_all();
            if wake_after {
                self.shared.wake.send_modify(|n| *n += 1);
            }
            self.shared.bump();
        }
    }

    /// Group commit: runs each `(sql, params)` locally as its own mutation, in order, and makes
    /// them all durable with one fsync. Each is confirmed or rejected on its own; a refused
    /// statement fails the call and none is kept. For apps that write many rows at once.
    pub fn execute_many(&self, writes: Vec<(&str, Vec<Value>)>) -> Result<Vec<Submitted>> {
        writes.iter().try_for_each(|(sql, _)| pagesync::sandbox::require_statement(sql))?;
        let bodies = writes.into_iter().map(|(sql, params)| SqlMutation::one(sql, params).encode()).collect();
        let done = self.shared.session().mutate_many(self.id, bodies, now_ms(), random_u64())?;
        self.shared.wake.send_modify(|n| *n += 1);
        self.shared.bump();
        Ok(done)
    }

    /// Brings the document's schema up to date: each (version, SQL) this replica has not
    /// applied yet is submitted as a migration, which runs exactly once per document, whichever
    /// client's copy reaches the server first. Ship the same list with every client and call
    /// this after `open`. Returns the migrations submitted.
    pub fn migrate(&self, migrations: &[(u32, &str)]) -> Result<Vec<Submitted>> {
        let done = self.shared.session().migrate(self.id, migrations, now_ms(), random_u64())?;
        if !done.is_empty() {
            self.shared.wake.send_modify(|n| *n += 1);
            self.shared.bump();
        }
        Ok(done)
    }

    /// A live query: `next()` gives the rows now, then again each time they change (after a
    /// local write or data from the server), skipping changes that leave them as they were.
    pub fn subscribe(&self, sql: &str, params: Vec<Value>) -> Subscription {
        Subscription {
            doc: self.clone(),
            sql: sql.to_owned(),
            params,
            changed: self.shared.changed.subscribe(),
            last: None,
        }
    }

    /// A read-only query on the local (optimistic) state.
    ///
    /// While the replica has no state yet (its first download, or a restart at a checkpoint,
    /// is under way) and the client is connected, the query reads the server's committed
    /// state instead, fetching the pages it needs (see `pagesync::remote`): a large document
    /// can be queried at once. Once the replica holds as much as was shown, queries go back to
    /// it. When the server cannot be asked, the query runs on the replica as it is, except on
    /// a replica that holds nothing of a document the server refuses this client (a token it
    /// does not take, a document it may not read or that does not exist, or one it cannot
    /// serve now): that is `ClientError::Server` with the server's code.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        let mut remote = self.remote.lock().expect("BUG: lock poisoned");
        // A replica that holds nothing, of a document the server refuses this client (a token
        // it does not take, a document it may not open or that is not there, or one it cannot
        // serve now): what SQLite makes of an empty database ("no such table") would hide why.
        let refused = |remote: &Remote| {
            let (code, message) = remote.refused.clone()?;
            Some(ClientError::Server { code, message })
        };
        let empty = |replica: &pagesync::ClientDocument| {
            replica.storage_range().next() == pagesync::journal::Lsn::FIRST && replica.pending_count() == 0
        };
        let was_empty;
        {
            let s = self.shared.session();
            let replica = s.document(self.id).expect("BUG: open documents stay open");
            let at = remote.snapshot.as_ref().map(|r| r.at());
            if remote.fresh && s.caught_up(self.id) {
                remote.fresh = false;
            }
            let waiting = remote.failed_at.is_some_and(|t| t.elapsed() < remote::RETRY_AFTER);
            let ask = wants_remote(replica, remote.fresh, at)
                && !waiting
                && *self.shared.connected.lock().expect("BUG: lock poisoned");
            if !ask {
                remote.snapshot = None;
                if let Some(e) = refused(&remote).filter(|_| waiting && empty(replica)) {
                    return Err(e); // refused a moment ago: asked again after `RETRY_AFTER`
                }
                return Ok(replica.query(sql, params)?);
            }
            was_empty = empty(replica);
        }
        if let Some(rows) = self.query_remote(&mut remote, sql, params)? {
            remote.refused = None;
            return Ok(rows);
        }
        // The server could not be asked: the replica as it is.
        remote.snapshot = None;
        remote.failed_at = Some(Instant::now());
        remote.refused = self.shared.fetcher.lock().expect("BUG: lock poisoned").refusal(self.id);
        if let Some(e) = refused(&remote).filter(|_| was_empty) {
            return Err(e);
        }
        let s = self.shared.session();
        Ok(s.document(self.id).expect("BUG: open documents stay open").query(sql, params)?)
    }

    /// A page of the document's history, as the server keeps it (see `pagesync::history`):
    /// every mutation any client sent, who sent it (its token's `sub`), when it was made,
    /// received and applied, the storage entry, the outcome and the SQL. Needs the server (a
    /// read grant; an admin one where the server says so). `pagesync::history::Pager`
    /// pages through all of it.
    pub async fn history(
        &self,
        query: pagesync::history::HistoryQuery,
    ) -> Result<pagesync::history::HistoryPage> {
        read_history(&self.shared, self.id, query).await
    }

    /// The server this document syncs with: home, or where it was redirected.
    fn server_url(&self) -> String {
        self.shared.server_url(self.id)
    }

    /// The query on the server's state: `None` when the server could not be asked (the
    /// caller falls back to the replica), an error when the query itself failed.
    fn query_remote(&self, remote: &mut Remote, sql: &str, params: &[Value]) -> Result<Option<Rows>> {
        if remote.snapshot.is_none() {
            let url = self.server_url();
            let mut fetcher = self.shared.fetcher.lock().expect("BUG: lock poisoned");
            fetcher.use_url(&url);
            let map = fetcher.map(self.id);
            drop(fetcher);
            let map = match map {
                Ok(map) => map,
                Err(why) => {
                    tracing::debug!(
                        "document {}: no page map from the server ({why}); querying the replica",
                        self.id
                    );
                    return Ok(None);
                }
            };
            let source = remote::Source { fetcher: self.shared.fetcher.clone(), doc: self.id, url };
            match pagesync::remote::RemoteSnapshot::open(map, Box::new(source)) {
                Ok(snapshot) => remote.snapshot = Some(snapshot),
                Err(e) => {
                    tracing::warn!("document {}: the server's page map cannot be read: {e}", self.id);
                    return Ok(None);
                }
            }
        }
        let snapshot = remote.snapshot.as_ref().expect("BUG: opened above");
        let (fetches, pages) = snapshot.fetched();
        let result = snapshot.query(sql, params);
        let (fetches_after, pages_after) = snapshot.fetched();
        remote.reads.fetches += fetches_after - fetches;
        remote.reads.pages += pages_after - pages;
        match result {
            Ok(rows) => {
                remote.reads.queries += 1;
                Ok(Some(rows))
            }
            Err(e) if snapshot.failed() => {
                tracing::debug!("document {}: fetching pages failed ({e}); querying the replica", self.id);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What this handle's queries read from the server (see `query`).
    pub fn remote_reads(&self) -> RemoteReads {
        self.remote.lock().expect("BUG: lock poisoned").reads
    }

    pub fn state(&self, lsn: pagesync::journal::Lsn) -> Result<MutationState> {
        let s = self.shared.session();
        Ok(s.document(self.id).expect("BUG: open documents stay open").state(lsn)?)
    }

    pub fn status(&self) -> DocStatus {
        self.shared.session().status(self.id).expect("BUG: open documents stay open")
    }

    /// Confirmed count and the rejections with the server's messages.
    pub fn outcomes(&self) -> Result<pagesync::Outcomes> {
        let s = self.shared.session();
        Ok(s.document(self.id).expect("BUG: open documents stay open").outcomes()?)
    }

    /// Writes the server's state this replica holds to `path` as a plain `.sqlite` file
    /// (atomically and durably: a temporary file, synced, then a rename, synced). Pending
    /// local writes are not included.
    pub fn export(&self, path: &Path) -> std::io::Result<u64> {
        let bytes = {
            let s = self.shared.session();
            s.document(self.id)
                .expect("BUG: open documents stay open")
                .export()
                .map_err(std::io::Error::other)?
        };
        // Whole or not at all, and durable once this returns: written beside, synced, renamed
        // over, and the rename synced with its directory.
        let tmp = path.with_extension("sqlite.tmp");
        let mut file = pagesync::journal::create_fresh(&tmp, 0o666)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        #[cfg(unix)]
        {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(bytes.len() as u64)
    }

    /// Waits until every local mutation is applied by the server and this replica holds the
    /// server's latest storage as of then. Gives up after `timeout` without progress (a long
    /// initial sync that keeps receiving entries does not time out). Fails at once with the
    /// server's error, unless it passes on its own (`codes::passes`: `unavailable` while a
    /// server regains its cluster lease): then the wait goes on, and a timeout returns the
    /// error still shown, if any.
    pub async fn sync(&self, timeout: Duration) -> Result<()> {
        self.sync_with_progress(timeout, |_| {}).await
    }

    /// `sync`, calling `progress` whenever the counts move (for a progress bar).
    pub async fn sync_with_progress(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(SyncProgress),
    ) -> Result<()> {
        let mut deadline = Instant::now() + timeout;
        let mut last = None;
        // The server's head now, not as it last said: entries written since must arrive too.
        let ask = self.shared.session().ask_head(self.id);
        self.shared.wake.send_modify(|n| *n += 1);
        // Woken by every frame applied (and by the timer, for what moves without a frame).
        let mut changed = self.shared.changed.subscribe();
        loop {
            let st = self.status();
            // An error that passes on its own (the server lost its cluster lease for a
            // moment) keeps the wait going: the client subscribes again by itself.
            if let Some((code, message)) = self.shared.session().sync_error(self.id).cloned() {
                return Err(document_error(code, message));
            }
            let now = SyncProgress::of(&st);
            if last != Some(now) {
                progress(now);
                deadline = Instant::now() + timeout;
                last = Some(now);
            }
            if st.pending == 0 && self.shared.session().head_answered(self.id) >= ask && self.caught_up() {
                // Entries may have arrived since `st`: the last report is the state synced.
                let done = SyncProgress::of(&self.status());
                if last != Some(done) {
                    progress(done);
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let connected = *self.shared.connected.lock().expect("BUG");
                if let Some(failed) =
                    self.shared.connect_error.lock().expect("BUG").clone().filter(|_| !connected)
                {
                    let why = format!("{} ({} mutations pending)", failed.why, st.pending);
                    return Err(if failed.lasting {
                        ClientError::Refused(why)
                    } else {
                        ClientError::Connect(why)
                    });
                }
                if let Some((code, message)) = self.shared.session().shown_error(self.id).cloned() {
                    // Still shown after `timeout`: it did not pass.
                    return Err(document_error(code, message));
                }
                return Err(ClientError::SyncTimeout(timeout, st.pending));
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), changed.changed()).await;
        }
    }

    /// Sends `value` (text: JSON, a name, a cursor position) to everyone else who has this
    /// document open, at once. It is never written anywhere: the server keeps it only while
    /// this client stays subscribed, shows it to those who open the document later, and this
    /// client says it again after a reconnect. At most 8 KiB; the server takes at most one per
    /// 25 ms per document (a newer value not sent yet replaces an older one here).
    pub fn broadcast(&self, value: &str) -> Result<()> {
        self.shared.session().broadcast(self.id, value.as_bytes().to_vec())?;
        self.shared.wake.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Whether the last `broadcast` has gone to the server.
    pub fn broadcast_sent(&self) -> bool {
        self.shared.session().broadcast_sent(self.id)
    }

    /// Who else has this document open now (on this client's server), each with the value it
    /// broadcast last (empty: none yet), by peer id.
    pub fn presence(&self) -> Vec<Peer> {
        self.shared.session().presence(self.id)
    }

    /// Presence as it changes: `next()` gives the peers at once, then whenever a peer comes,
    /// goes or broadcasts.
    pub fn subscribe_presence(&self) -> PresenceSubscription {
        PresenceSubscription { doc: self.clone(), changed: self.shared.changed.subscribe(), last: None }
    }

    /// True once the server acknowledged this connection's subscription and the replica holds
    /// the storage the server reported then.
    fn caught_up(&self) -> bool {
        self.shared.session().caught_up(self.id)
    }
}

/// Where a sync stands: storage entries held here and at the server, local writes pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncProgress {
    pub entries: u64,
    pub server_entries: u64,
    pub pending: usize,
}

impl SyncProgress {
    fn of(st: &DocStatus) -> SyncProgress {
        SyncProgress {
            entries: st.storage_next.get() - 1,
            server_entries: st.server_storage_next.get().max(st.storage_next.get()) - 1,
            pending: st.pending,
        }
    }
}

/// Presence as it changes, from [`Document::subscribe_presence`].
#[derive(Debug)]
pub struct PresenceSubscription {
    doc: Document,
    changed: tokio::sync::watch::Receiver<u64>,
    last: Option<Vec<Peer>>,
}

impl PresenceSubscription {
    /// The peers: at once the first time, then when they differ from the last ones returned.
    pub async fn next(&mut self) -> Vec<Peer> {
        loop {
            if self.last.is_some() && self.changed.changed().await.is_err() {
                // The `Client` was dropped: nothing changes any more.
                std::future::pending::<()>().await;
            }
            self.changed.borrow_and_update();
            let peers = self.doc.presence();
            if self.last.as_ref() != Some(&peers) {
                self.last = Some(peers.clone());
                return peers;
            }
        }
    }
}

/// A live query from [`Document::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    doc: Document,
    sql: String,
    params: Vec<Value>,
    changed: tokio::sync::watch::Receiver<u64>,
    last: Option<Vec<Vec<Value>>>,
}

impl Subscription {
    /// The query's rows: at once the first time, then when they differ from the last ones
    /// returned. An error (bad SQL) is returned as it happens; the subscription stays usable.
    pub async fn next(&mut self) -> Result<Rows> {
        loop {
            if self.last.is_some() {
                // Only fails when the `Client` was dropped; then nothing changes any more.
                if self.changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            self.changed.borrow_and_update();
            let rows = self.doc.query(&self.sql, &self.params)?;
            if self.last.as_ref() != Some(&rows.rows) {
                self.last = Some(rows.rows.clone());
                return Ok(rows);
            }
        }
    }
}

/// In a replica's directory: the URL of the server a redirect named for it, so the next run
/// goes straight there.
const SERVER_FILE: &str = "server";

/// In a replica's directory: the server's mutator definitions for the document, as last sent,
/// so calls run under them before the server is reached again.
const MUTATORS_FILE: &str = "mutators.sql";

/// In a replica's directory: the server deleted the document. The replica stays readable,
/// syncs no more and takes no writes, until `forget` removes it.
const DELETED_FILE: &str = "DELETED";

/// Removes a document's local replica from `data_dir` (after the server deleted it, or to
/// start over): refuses while a process has it open (`ReplicaBusy`). Its pending writes go
/// with it.
pub fn forget(data_dir: impl AsRef<Path>, doc: DocId) -> Result<bool> {
    forget_replica(data_dir.as_ref(), doc)
}

/// `forget`, waiting up to `wait` while another process has the replica open, as `open_wait`
/// does.
pub async fn forget_wait(data_dir: impl AsRef<Path>, doc: DocId, wait: Duration) -> Result<bool> {
    while_busy(wait, || forget_replica(data_dir.as_ref(), doc)).await
}

fn forget_replica(data_dir: &Path, doc: DocId) -> Result<bool> {
    let dir = data_dir.join(doc.to_string());
    if !dir.exists() {
        return Ok(false);
    }
    let _lock = lock_replica(&dir)?;
    remove_replica_dir(&dir)?;
    Ok(true)
}

/// Removes a replica's directory, whose lock the caller holds: first renamed aside, so that a
/// process opening the replica meanwhile (its lock is a file inside) makes a new one rather
/// than locking and writing into a directory being removed.
fn remove_replica_dir(dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let aside = dir.with_file_name(format!(".{name}.removed-{}", std::process::id()));
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |error| ClientError::Io { op, path, error }
    };
    std::fs::rename(dir, &aside).map_err(io("move the replica aside", dir))?;
    std::fs::remove_dir_all(&aside).map_err(io("remove the replica", &aside))
}

/// Writes down each open document's mutator definitions (as the server last sent them), so a
/// later run has them at once, offline too. A file that has them already is left alone.
fn remember_mutators(shared: &Shared) {
    let held: Vec<(DocId, Option<Arc<pagesync::mutators::Mutators>>)> = {
        let session = shared.session();
        session.documents().map(|(id, d)| (id, d.mutators().cloned())).collect()
    };
    for (id, m) in held {
        let path = shared.data_dir.join(id.to_string()).join(MUTATORS_FILE);
        let written = std::fs::read_to_string(&path).ok();
        let result = match m {
            Some(m) if written.as_deref() != Some(m.source()) => {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, m.source()).and_then(|()| std::fs::rename(&tmp, &path))
            }
            None if written.is_some() => std::fs::remove_file(&path),
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!("cannot write down the mutators of {id}: {e}");
        }
    }
}

/// Writes down which open documents the server deleted, so a later run knows at once.
fn remember_deleted(shared: &Shared) {
    let deleted = shared.session().deleted();
    for id in deleted {
        let path = shared.data_dir.join(id.to_string()).join(DELETED_FILE);
        if !path.exists()
            && let Err(e) = std::fs::write(&path, b"deleted on the server\n")
        {
            tracing::warn!("cannot write down that {id} was deleted: {e}");
        }
    }
}

/// Writes down each open document's server (removes the file for those at home).
fn remember_routes(shared: &Shared) {
    let ids: Vec<DocId> =
        shared.locks.lock().expect("BUG: lock poisoned").iter().map(|(id, _)| *id).collect();
    let routes: Vec<(DocId, Route)> = {
        let s = shared.session();
        ids.into_iter().filter_map(|id| Some((id, s.route_of(id)?.clone()))).collect()
    };
    for (id, route) in routes {
        let path = shared.data_dir.join(id.to_string()).join(SERVER_FILE);
        let result = match route {
            Some(url) if std::fs::read_to_string(&path).ok().as_deref() != Some(url.as_str()) => {
                std::fs::write(&path, url)
            }
            None if path.exists() => std::fs::remove_file(&path),
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::debug!("cannot write down the server of {id}: {e}");
        }
    }
}

/// Connection attempts in a row that may fail before a redirected document goes home.
const ROUTE_ATTEMPTS: u32 = 2;

/// Keeps a connection up for every route the session wants: home (the URLs the client was
/// given, tried in turn) and each server a document was redirected to. A route nobody needs
/// any more is closed.
async fn drive(homes: Vec<String>, shared: Arc<Shared>) {
    let mut tasks: HashMap<Route, tokio::task::JoinHandle<()>> = HashMap::new();
    // Aborted with this task (the client dropped): every connection goes with it.
    struct AbortAll<'a>(&'a mut HashMap<Route, tokio::task::JoinHandle<()>>);
    impl Drop for AbortAll<'_> {
        fn drop(&mut self) {
            self.0.values().for_each(tokio::task::JoinHandle::abort);
        }
    }
    let tasks = AbortAll(&mut tasks);
    loop {
        let wanted = shared.session().routes();
        tasks.0.retain(|route, task| {
            let keep = wanted.contains(route) && !task.is_finished();
            if !keep {
                task.abort();
                shared.session().disconnected_on(route);
            }
            keep
        });
        for route in wanted {
            let (homes, shared) = (&homes, &shared);
            tasks
                .0
                .entry(route.clone())
                .or_insert_with(|| tokio::spawn(keep_route(route, homes.clone(), shared.clone())));
        }
        tokio::select! {
            _ = shared.rerouted.notified() => remember_routes(&shared),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the websocket to `url`, each part against the clock: resolving the host, then TCP to
/// each of its addresses in turn (so a first address that drops packets does not hide the
/// next), then TLS and the websocket handshake together, `CONNECT_TIMEOUT` each.
async fn connect(url: &str, config: WebSocketConfig) -> std::result::Result<Socket, ConnectFailed> {
    use tokio::time::timeout;
    let late = |what: &str| format!("no answer from {url} ({what}) within {} s", CONNECT_TIMEOUT.as_secs());
    let lasting = |why: String| ConnectFailed { why, lasting: true };
    let tls = tls::config_for(url).map_err(lasting)?.map(tokio_tungstenite::Connector::Rustls);
    let (host, port) = tls::host_port(url).map_err(lasting)?;
    let addrs = timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host.as_str(), port)))
        .await
        .map_err(|_| late("resolving its host"))?
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut why = format!("{host} has no address");
    let mut tcp = None;
    for addr in addrs {
        match timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(e)) => why = format!("cannot connect to {url}: {e}"),
            Err(_) => why = late(&format!("TCP to {addr}")),
        }
    }
    let tcp = tcp.ok_or(why)?;
    // TCP_NODELAY: a one-row write is not held back by Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let handshake = tokio_tungstenite::client_async_tls_with_config(url, tcp, Some(config), tls);
    match timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(done) => done.map(|(ws, _)| ws).map_err(|e| ConnectFailed {
            why: explain_connect_error(url, &e),
            lasting: refuses_for_good(&e),
        }),
        Err(_) => Err(late("the TLS and websocket handshakes").into()),
    }
}

/// Why a connection attempt failed, for a person, and whether trying again cannot help.
#[derive(Clone, Debug)]
struct ConnectFailed {
    why: String,
    lasting: bool,
}

impl From<String> for ConnectFailed {
    fn from(why: String) -> ConnectFailed {
        ConnectFailed { why, lasting: false }
    }
}

/// A handshake answered with an HTTP error that asking again will not change (a wrong path,
/// refused credentials), or a URL the websocket library cannot use; not one that passes (a
/// timeout, too many requests, a server error).
fn refuses_for_good(e: &tokio_tungstenite::tungstenite::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(response) => {
            let status = response.status();
            (status.is_client_error() && !matches!(status.as_u16(), 408 | 429)) || status.is_success()
        }
        E::Url(_) => true,
        _ => false,
    }
}

/// One route's connection, again and again with backoff: home cycles through its URLs; a
/// redirected route gives up after `ROUTE_ATTEMPTS` failed attempts in a row, and its
/// documents go home.
async fn keep_route(route: Route, homes: Vec<String>, shared: Arc<Shared>) {
    let mut backoff = MIN_BACKOFF;
    let (mut failures, mut next_home) = (0u32, 0usize);
    loop {
        let url = route.clone().unwrap_or_else(|| homes[next_home % homes.len()].clone());
        let config = WebSocketConfig::default()
            .max_message_size(Some(pagesync::protocol::MAX_FRAME_BYTES))
            .max_frame_size(Some(pagesync::protocol::MAX_FRAME_BYTES));
        match connect(&url, config).await {
            Ok(ws) => {
                failures = 0;
                if route.is_none() {
                    *shared.connect_error.lock().expect("BUG") = None;
                    shared.session().set_home_url(&url);
                }
                run_connection(ws, &shared, &route).await;
                // A connection the server refused (a token that expired while it was open, or
                // one it does not take) is backed off like one that could not be made.
                if !shared.session().refused_for_good() {
                    backoff = MIN_BACKOFF;
                }
            }
            Err(failed) => {
                failures += 1;
                tracing::debug!("{}", failed.why);
                if route.is_none() {
                    *shared.connect_error.lock().expect("BUG") = Some(failed);
                    next_home += 1;
                }
            }
        }
        if route.is_none() {
            *shared.connected.lock().expect("BUG") = false;
        }
        shared.session().disconnected_on(&route);
        if route.is_some() && failures >= ROUTE_ATTEMPTS {
            tracing::info!("{url} cannot be reached: its documents go back to {}", homes.join(", "));
            shared.session().route_failed(&route);
            shared.rerouted.notify_one();
            shared.bump();
            return;
        }
        let jitter = Duration::from_millis(random_u64() % (backoff.as_millis() as u64 / 2 + 1));
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Under `Durability::Normal`, makes local writes durable at least every `NORMAL_SYNC_MS`,
/// connected or not (the driver also does before it sends them); and, in a task of its own
/// (so a slow flush of a download holds up no local write), the server's entries replicas
/// received, every `STORAGE_SYNC`.
async fn sync_timelines(shared: Arc<Shared>) {
    let _received = AbortOnDrop(tokio::spawn(sync_received(shared.clone())));
    let mut tick = tokio::time::interval(Duration::from_millis(pagesync::NORMAL_SYNC_MS as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sync_local_writes(&mut shared.session());
    }
}

/// Makes the server's entries replicas received durable every `STORAGE_SYNC`, with the
/// session's lock let go while the fsyncs run (`sync_storage_unlocked`).
async fn sync_received(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(STORAGE_SYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is at once
    loop {
        tick.tick().await;
        sync_storage_unlocked(&shared).await;
    }
}

/// How often the entries a replica received from the server are made durable (one fsync for
/// all of them). Not at every `NORMAL_SYNC_MS`: the server holds them, so a power cut that
/// takes the newest back costs a download of at most this much again, and a download is not
/// held up by a flush of what it wrote every tenth of a second.
const STORAGE_SYNC: Duration = Duration::from_secs(1);

/// Makes the server's entries every replica received durable, waiting for the disk on a
/// blocking thread with the session's lock let go: an fsync of a second's entries takes
/// milliseconds (more after a download), and a query, a write or an arriving frame would
/// otherwise wait behind it. A failure is logged, and the replica's journal refuses writes
/// until it is opened again, as when `sync_storage` fails.
async fn sync_storage_unlocked(shared: &Arc<Shared>) {
    let (detached, taken) = shared.session().detach_storage_syncs();
    if let Err(e) = taken {
        tracing::warn!("making received entries durable failed: {e}");
    }
    if detached.is_empty() {
        return;
    }
    let Ok(done) = tokio::task::spawn_blocking(move || ClientSession::run_storage_syncs(detached)).await
    else {
        return; // the runtime is shutting down: the close syncs under the lock
    };
    if let Err(e) = shared.session().finish_storage_syncs(done) {
        tracing::warn!("making received entries durable failed: {e}");
    }
}

/// Makes every replica durable: its local writes (`sync_local_writes`) and the server's
/// entries it received, under the lock. For the close (the ticker lets go of the lock:
/// `sync_storage_unlocked`), not for every turn of the driver.
fn sync_replicas(session: &mut ClientSession) {
    sync_local_writes(session);
    if let Err(e) = session.sync_storage() {
        tracing::warn!("making received entries durable failed: {e}");
    }
}

/// Makes every document's local writes durable (a no-op for those with none waiting); a
/// failure is logged, and the writes stay pending, unsent, for the next try.
fn sync_local_writes(session: &mut ClientSession) {
    if let Err(e) = session.sync_timelines() {
        tracing::warn!("making local writes durable failed: {e}");
    }
}

/// What a failed connection attempt means, for a person.
fn explain_connect_error(url: &str, e: &tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Http(response) => {
            let status = response.status();
            let hint = match status.as_u16() {
                // Something answered that is not the sync endpoint (`/healthz`, a web page).
                200..=299 | 404 => {
                    let base = url.split("/v1/").next().unwrap_or(url).trim_end_matches('/');
                    let base = base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
                    format!(": the sync endpoint is {base}/v1/sync")
                }
                401 | 403 => ": the server refused the credentials".into(),
                _ => String::new(),
            };
            format!("the server at {url} answered HTTP {status}{hint}")
        }
        // A plain server's answer where TLS was expected (rustls says "corrupt message").
        E::Io(_) | E::Tls(_) if url.starts_with("wss://") && e.to_string().contains("corrupt message") => {
            format!("cannot connect to {url}: TLS failed ({e}): is the server plain ws://?")
        }
        E::Io(io) => format!("cannot connect to {url}: {io}"),
        E::Url(u) => format!("bad server URL {url}: {u}"),
        other => format!("cannot connect to {url}: {other}"),
    }
}

/// Bytes read off the socket and not yet applied, at most (`read_ahead`): 16 MiB, a server's
/// download window, so a download keeps streaming while the replica writes what came before.
/// Past it the reader waits (holding the one frame it read last: so a connection holds at
/// most this plus one frame, `MAX_FRAME_BYTES`), the kernel's socket buffer fills, and TCP
/// holds the server back.
const MAX_READ_AHEAD_BYTES: usize = 16 << 20;

/// The unit `MAX_READ_AHEAD_BYTES` is counted in (a semaphore's permits).
const READ_AHEAD_UNIT_BYTES: usize = 4 << 10;
const READ_AHEAD_UNITS: usize = MAX_READ_AHEAD_BYTES / READ_AHEAD_UNIT_BYTES;

/// A frame read ahead, holding its share of `MAX_READ_AHEAD_BYTES` until it is applied.
type ReadAhead = (Decoded, tokio::sync::OwnedSemaphorePermit);

/// A frame as `read_ahead` decoded it.
type Decoded = std::result::Result<pagesync::protocol::Message, pagesync::protocol::DecodeError>;

/// Reads and decodes frames ahead of the session, while it applies the ones before: the copy
/// out of the kernel, the websocket's framing and decoding (a copy of every entry) overlap
/// writing the replica, on another core when the runtime has one. Ends (dropping `tx`) when
/// the socket closes or fails; frames read before that are still applied (`run_connection`
/// drains them, also when a send fails first).
async fn read_ahead(
    mut stream: futures_util::stream::SplitStream<Socket>,
    tx: tokio::sync::mpsc::UnboundedSender<ReadAhead>,
) {
    let budget = Arc::new(tokio::sync::Semaphore::new(READ_AHEAD_UNITS));
    loop {
        let frame = match stream.next().await {
            Some(Ok(WsMessage::Binary(b))) => b,
            Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return,
            Some(Ok(_)) => continue,
        };
        // A frame larger than the whole budget (a storage entry may reach `MAX_FRAME_BYTES`)
        // takes all of it: it waits until everything before it is applied, then goes alone.
        let units = frame.len().div_ceil(READ_AHEAD_UNIT_BYTES).clamp(1, READ_AHEAD_UNITS);
        let units = u32::try_from(units).expect("BUG: at most READ_AHEAD_UNITS");
        let Ok(permit) = budget.clone().acquire_many_owned(units).await else { return };
        let decoded = pagesync::protocol::Message::decode_shared(&frame);
        drop(frame);
        if tx.send((decoded, permit)).is_err() {
            return;
        }
    }
}

/// Redirects a history read follows.
const MAX_REDIRECTS: usize = 3;

/// Reads a page of `doc`'s history from the server it syncs with, on a blocking thread.
async fn read_history(
    shared: &Shared,
    doc: DocId,
    query: pagesync::history::HistoryQuery,
) -> Result<pagesync::history::HistoryPage> {
    let (url, fetcher) = (shared.server_url(doc), shared.fetcher.clone());
    let read = move || {
        let mut fetcher = fetcher.lock().expect("BUG: lock poisoned");
        fetcher.use_url(&url);
        // Asked of a server of a cluster that does not serve it (no replica here has learned
        // its route): asked again where it is, a few times at most.
        let mut page = fetcher.history(doc, query);
        for _ in 0..MAX_REDIRECTS {
            let Some(url) = page.as_ref().err().and_then(|_| fetcher.take_redirect(doc)) else { break };
            fetcher.use_url(&url);
            page = fetcher.history(doc, query);
        }
        page
    };
    match tokio::task::spawn_blocking(read).await {
        Ok(page) => page.map_err(ClientError::History),
        Err(e) => Err(ClientError::History(e.to_string())),
    }
}

/// Aborts a task when dropped: a connection's reader ends with the connection, and the
/// received entries' syncer with the ticker (`sync_timelines`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Frames applied at once when they have already arrived: bounded in number, so one burst
/// cannot hold the session lock for long. Their bytes are bounded by what may be read ahead at
/// all (`MAX_READ_AHEAD_BYTES`: a storage frame may carry a 4 MiB checkpoint part, and 64 of
/// them would be 256 MiB).
const MAX_FRAMES_AT_ONCE: usize = 64;

async fn run_connection(ws: Socket, shared: &Shared, route: &Route) {
    let (mut sink, stream) = ws.split();
    let (tx, mut incoming) = tokio::sync::mpsc::unbounded_channel();
    let _reader = AbortOnDrop(tokio::spawn(read_ahead(stream, tx)));
    let mut wake = shared.wake.subscribe();
    shared.session().connected_on(route, now_ms());
    if route.is_none() {
        *shared.connected.lock().expect("BUG") = true;
    }
    loop {
        let out: Vec<Vec<u8>> = {
            let mut s = shared.session();
            // Under `Durability::Normal`, writes go up once durable: one fsync for all so far.
            sync_local_writes(&mut s);
            std::iter::from_fn(|| s.poll_transmit_on(route)).map(|m| m.encode()).collect()
        };
        for frame in out {
            if sink.send(WsMessage::Binary(frame.into())).await.is_err() {
                // The peer closed (or the socket failed) while frames it sent before may still
                // be on their way through the reader: an `Error` naming why, a `Redirect`.
                // Apply them, as a connection read in one loop would have, then end.
                let drain = async {
                    while let Some(first) = incoming.recv().await {
                        apply_read(shared, route, &mut incoming, first);
                    }
                };
                let _ = tokio::time::timeout(DRAIN_AFTER_CLOSE, drain).await;
                return;
            }
        }
        let timeout = shared.session().poll_timeout().map_or(1_000, |t| (t - now_ms()).clamp(0, 1_000));
        tokio::select! {
            read = incoming.recv() => match read {
                Some(first) => apply_read(shared, route, &mut incoming, first),
                // The socket closed or failed (after every frame read before it was applied).
                None => return,
            },
            _ = wake.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(timeout as u64)) => {
                if shared.session().handle_timeout(now_ms()) {
                    shared.bump();
                }
            }
        }
    }
}

/// How long a connection whose socket failed under a send still applies the frames its reader
/// had read or is reading: those the peer sent before it closed come at once.
const DRAIN_AFTER_CLOSE: Duration = Duration::from_secs(1);

/// Applies `first` and what else has already been read (so storage is applied, and pending
/// writes rebased, once for all of it); their share of the read-ahead budget goes back after.
fn apply_read(
    shared: &Shared,
    route: &Route,
    incoming: &mut tokio::sync::mpsc::UnboundedReceiver<ReadAhead>,
    first: ReadAhead,
) {
    let mut taken = vec![first];
    while taken.len() < MAX_FRAMES_AT_ONCE {
        let Ok(next) = incoming.try_recv() else { break };
        taken.push(next);
    }
    let (frames, _permits): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
    let mut session = shared.session();
    let (mismatches, reroutes, deletions, mutators) =
        (session.digest_mismatches(), session.reroutes(), session.deletions(), session.mutator_changes());
    if let Err(e) = session.handle_decoded_on(route, now_ms(), frames) {
        tracing::warn!("applying a frame failed: {e}");
    }
    if session.reroutes() > reroutes {
        shared.rerouted.notify_one();
    }
    let deleted = session.deletions() > deletions;
    let new_mutators = session.mutator_changes() > mutators;
    if session.digest_mismatches() > mismatches {
        tracing::error!(
            "a confirmation by digest did not match this replica's replay (non-determinism); fell back to the server's pages"
        );
    }
    drop(session);
    if deleted {
        remember_deleted(shared);
    }
    if new_mutators {
        remember_mutators(shared);
    }
    shared.bump();
}
