//! Shared helpers for pagesync's integration tests (the tests live in `tests/tests/`).
#![forbid(unsafe_code)]

use pagesync::journal::{Journal, JournalId, MemoryJournal};
use pagesync::{ClientDocument, ServerDocument, SqlMutation, TimelineKey, Value};

/// A seeded SplitMix64: every random choice in a test comes from one, so a seed reproduces it.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub fn memory_journal(n: u128) -> Box<dyn Journal> {
    Box::new(MemoryJournal::new(JournalId::from_u128(n)))
}

/// A storage journal in files under `dir`, as a client's replica keeps one (pages read through
/// a map of each segment, in place by SQLite; rolls without a barrier), whose segments roll
/// at `segment_bytes`.
pub fn replica_storage(dir: &std::path::Path, n: u128, segment_bytes: u64) -> Box<dyn Journal> {
    let opts = replica_storage_options(segment_bytes);
    let journal = pagesync::journal::FileJournal::create(dir, JournalId::from_u128(n), opts).expect("create");
    Box::new(journal)
}

/// The options of `replica_storage`, to open it again.
pub fn replica_storage_options(segment_bytes: u64) -> pagesync::journal::FileJournalOptions {
    pagesync::journal::FileJournalOptions {
        max_segment_bytes: segment_bytes,
        map_reads: true,
        roll_without_barrier: true,
        ..pagesync::journal::FileJournalOptions::default()
    }
}

/// Test key `n` (`TimelineKey::insecure_from_u128`): the timeline a test's replica `n` writes.
pub fn timeline_key(n: u128) -> TimelineKey {
    TimelineKey::insecure_from_u128(n)
}

/// The id of the timeline `timeline_key(n)` opens, as a journal id.
pub fn timeline_journal_id(n: u128) -> JournalId {
    timeline_key(n).id().journal_id()
}

/// A replica over `storage` and a memory timeline with key `timeline_key(n)`.
pub fn client_doc(storage: Box<dyn Journal>, n: u128) -> ClientDocument {
    let timeline = Box::new(MemoryJournal::new(timeline_journal_id(n)));
    keyed(ClientDocument::open(storage, timeline).expect("replica"), n)
}

/// `doc` with key `timeline_key(n)` (its timeline journal's id must be `timeline_journal_id(n)`).
pub fn keyed<R: pagesync::Reducer>(mut doc: ClientDocument<R>, n: u128) -> ClientDocument<R> {
    doc.set_timeline_key(timeline_key(n)).expect("the timeline opened by its key");
    doc
}

/// A server session over memory journals (one per document) whose documents checkpoint as
/// soon as their history outgrows them and keep every checkpoint.
pub fn checkpointing_server() -> pagesync::protocol::ServerSession {
    pagesync::protocol::ServerSession::new(Box::new(|d: pagesync::DocId| {
        let mut doc = ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))?;
        doc.set_compaction(Some(pagesync::Compaction { checkpoint_after_bytes: 0, retention_ms: i64::MAX }));
        Ok(doc)
    }))
}

/// The SQL that makes a document of a `checkpointing_server` checkpoint, one mutation each, in
/// order: `rows` rows of 4,000 random bytes in table `t`, all of them rewritten (so the history
/// outgrows the document), then one more row (whose step writes the checkpoint).
pub fn checkpoint_steps(rows: u32) -> [String; 3] {
    [
        format!(
            "CREATE TABLE IF NOT EXISTS t(x); WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL \
             SELECT i + 1 FROM s WHERE i < {rows}) INSERT INTO t SELECT randomblob(4000) FROM s"
        ),
        "UPDATE t SET x = randomblob(4000)".into(),
        "INSERT INTO t VALUES (1)".into(),
    ]
}

/// The segment files of the file journal in `dir`, in LSN order.
pub fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// An encoded SQL mutation body of one statement.
pub fn sql(s: &str, params: Vec<Value>) -> Vec<u8> {
    SqlMutation::one(s, params).encode()
}

/// Sends a client's pending timeline to the server (as the protocol will).
pub fn push(client: &ClientDocument, server: &mut ServerDocument) {
    let range = client.pending_range();
    if range.is_empty() {
        return;
    }
    let entries = client.read_pending(range).expect("read pending");
    server.receive(client.timeline_id(), range.first(), entries);
}

/// Sends the server's storage entries the client does not have yet.
pub fn pull(client: &mut ClientDocument, server: &ServerDocument) {
    try_pull(client, server).expect("receive storage");
}

/// `pull`, for a client whose storage may fail.
pub fn try_pull(client: &mut ClientDocument, server: &ServerDocument) -> pagesync::Result<()> {
    let have = client.storage_range().next();
    let range = server.storage_range().intersect(&pagesync::journal::LsnRange::inclusive(
        have,
        server.storage_range().last().unwrap_or(have),
    ));
    if range.is_empty() {
        return Ok(());
    }
    let entries = server.read_storage(range).expect("read storage");
    client.receive_storage(range.first(), &entries)
}

/// Steps the server until its queue is empty.
pub fn drain(server: &mut ServerDocument, now_ms: i64) {
    while server.step(now_ms).expect("step").is_some() {}
}

/// Every committed page of a replica.
pub fn pages_of(db: &pagesync::db::Database) -> Vec<pagesync::page::Page> {
    db.store().committed_pages().expect("pages")
}

pub fn integrity_ok(db: &pagesync::db::Database) -> bool {
    db.conn().query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)).expect("integrity_check")
        == "ok"
}

pub mod disk;
pub mod sim;

/// A journal whose durable state outlives the document that opened it, so a simulated crash
/// can reopen it. Every append of the backends is durable, so a crash keeps all of it. While
/// `disk_full` is set, appends fail as on a full disk; while `read_errors` is set, whole-entry
/// reads fail (page reads still work). Once `poison_next` is set, the next append fails as a
/// failed fsync does: that handle refuses every later append until a new one is opened.
#[derive(Debug, Clone)]
pub struct SharedJournal {
    journal: std::sync::Arc<std::sync::Mutex<MemoryJournal>>,
    pub disk_full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub read_errors: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub poison_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The threads that read entries or pages, for tests of who does I/O.
    pub readers: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<std::thread::ThreadId>>>,
    /// This handle's own: set by the append `poison_next` failed.
    poisoned: bool,
}

impl SharedJournal {
    pub fn new(n: u128) -> SharedJournal {
        Self::with_id(JournalId::from_u128(n))
    }

    /// A timeline journal for `timeline_key(n)`.
    pub fn timeline(n: u128) -> SharedJournal {
        Self::with_id(timeline_journal_id(n))
    }

    pub fn with_id(id: JournalId) -> SharedJournal {
        let journal = MemoryJournal::new(id);
        SharedJournal {
            journal: std::sync::Arc::new(std::sync::Mutex::new(journal)),
            disk_full: Default::default(),
            read_errors: Default::default(),
            poison_next: Default::default(),
            readers: Default::default(),
            poisoned: false,
        }
    }

    fn note_reader(&self) {
        self.readers.lock().expect("readers lock").insert(std::thread::current().id());
    }

    /// A new handle on the same entries (not poisoned).
    pub fn boxed(&self) -> Box<dyn Journal> {
        Box::new(SharedJournal { poisoned: false, ..self.clone() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryJournal> {
        self.journal.lock().expect("journal lock poisoned")
    }
}

impl Journal for SharedJournal {
    fn id(&self) -> JournalId {
        self.lock().id()
    }
    fn range(&self) -> pagesync::journal::LsnRange {
        self.lock().range()
    }
    fn append_batch(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<pagesync::journal::LsnRange> {
        if self.poisoned || self.poison_next.swap(false, std::sync::atomic::Ordering::Relaxed) {
            self.poisoned = true;
            let message = "an earlier fsync failed; reopen the journal before appending".into();
            return Err(pagesync::journal::JournalError::Poisoned { journal: self.id(), message });
        }
        if self.disk_full.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(pagesync::journal::JournalError::Io {
                journal: self.id(),
                op: "append",
                path: "shared".into(),
                error: std::io::Error::from(std::io::ErrorKind::StorageFull),
            });
        }
        self.lock().append_batch(payloads)
    }
    fn read(&self, lsn: pagesync::journal::Lsn) -> pagesync::journal::Result<Vec<u8>> {
        self.note_reader();
        if self.read_errors.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(pagesync::journal::JournalError::Io {
                journal: self.id(),
                op: "read",
                path: "shared".into(),
                error: std::io::Error::other("injected read error"),
            });
        }
        self.lock().read(lsn)
    }
    fn read_part(
        &self,
        lsn: pagesync::journal::Lsn,
        offset: usize,
        buf: &mut [u8],
    ) -> pagesync::journal::Result<()> {
        self.note_reader();
        self.lock().read_part(lsn, offset, buf)
    }
    fn remove_prefix(&mut self, up_to: pagesync::journal::Lsn) -> pagesync::journal::Result<()> {
        self.lock().remove_prefix(up_to)
    }
}

#[path = "../../server/tests/support/s3.rs"]
mod s3;
pub use s3::s3_url;

/// A native file reached through `RandomAccess`, as OPFS handles are in the browser.
pub type NativeFile = (std::fs::File, std::path::PathBuf);

/// The two files of a handle journal, `a` and `b` in `dir`, created empty when missing.
pub fn handle_files(dir: &std::path::Path) -> [NativeFile; 2] {
    ["a", "b"].map(|name| {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .expect("open handle journal file");
        (file, path)
    })
}
