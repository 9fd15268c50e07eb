//! Operator commands that work on a store directly, beside or without a running server:
//! - `verify` checks every document (checksums, replay, SQLite's `integrity_check`) and changes
//!   nothing;
//! - `export_at` reads a document as of any point in its retained history;
//! - `restore` writes a document's state at a point into a new document, or appends it to the
//!   same one as a checkpoint (clients switch to it atomically). Restoring in place needs the
//!   server stopped: `file://` journals have no second-writer fence.

use pagesync::DocId;
use pagesync::db::Database;
use pagesync::journal::{FileJournal, FileJournalOptions, Journal, Lsn, LsnRange, MemoryJournal};
use pagesync::store::PageStore;

use crate::{Store, storage_dir};

/// What `verify` found in a sound document.
#[derive(Debug)]
pub struct Verified {
    /// The storage entries held (all read in full and checked).
    pub range: LsnRange,
    /// Pages in the replayed database.
    pub pages: u32,
}

/// Every document in the store, sorted by id.
pub fn list_documents(store: &Store) -> anyhow::Result<Vec<DocId>> {
    let mut docs = Vec::new();
    match store {
        Store::Files(root) => {
            // A typo in --journal must not pass as an empty store.
            let shards = std::fs::read_dir(root)
                .map_err(|e| anyhow::anyhow!("cannot read the store {}: {e}", root.display()))?;
            for shard in shards {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    continue;
                }
                for entry in std::fs::read_dir(shard.path())? {
                    let name = entry?.file_name();
                    if let Ok(doc) = name.to_string_lossy().parse::<DocId>() {
                        docs.push(doc);
                    }
                }
            }
        }
        Store::Objects(b) => {
            for shard in b.list_dirs("")? {
                for name in b.list_dirs(&shard)? {
                    if let Ok(doc) = name.parse::<DocId>() {
                        docs.push(doc);
                    }
                }
            }
        }
    }
    // A deleted document keeps only its tombstone.
    let mut live = Vec::with_capacity(docs.len());
    for doc in docs {
        if !store.is_deleted(doc)? {
            live.push(doc);
        }
    }
    live.sort();
    Ok(live)
}

/// Opens a document's storage journal without changing anything; a journal that needs repair
/// (a torn tail, a leftover of an interrupted trim) is an error here.
fn open_read_only(store: &Store, doc: DocId) -> Result<Box<dyn Journal>, String> {
    match store.exists(doc) {
        Ok(true) => {}
        Ok(false) => return Err(format!("no document {doc} in {}", store.describe())),
        Err(pagesync::Error::Deleted) => {
            return Err(format!("document {doc} was deleted from {}", store.describe()));
        }
        Err(e) => return Err(e.to_string()),
    }
    Ok(match store {
        Store::Files(root) => {
            let opts = FileJournalOptions { read_only: true, ..FileJournalOptions::default() };
            let j = FileJournal::open(storage_dir(root, doc), opts).map_err(|e| e.to_string())?;
            if let Some(first) = j.repairs().first() {
                return Err(format!(
                    "journal {}: needs repair: {first} (a write in progress, or damage; a server opening \
                     the document repairs a torn tail)",
                    j.id()
                ));
            }
            Box::new(j)
        }
        // An object journal's open writes nothing once its marker exists (checked above).
        Store::Objects(_) => store.open_journal(doc).map_err(|e| e.to_string())?,
    })
}

/// A page of a document's history (see `pagesync::history`), read without changing anything:
/// the records of the steps its storage journal holds. Works beside a running server (a step
/// in progress is not listed yet).
pub fn read_history(
    store: &Store,
    doc: DocId,
    query: &pagesync::history::HistoryQuery,
) -> Result<pagesync::history::HistoryPage, String> {
    let storage = open_read_only(store, doc)?;
    let id = pagesync::history::journal_id(doc);
    let history: Box<dyn Journal> = match store {
        Store::Files(root) => {
            let dir = crate::history_dir(root, doc);
            if !dir.exists() {
                return Ok(Default::default());
            }
            // A torn tail (an append in progress) is simply not read.
            let opts = FileJournalOptions { read_only: true, ..FileJournalOptions::default() };
            Box::new(FileJournal::open(dir, opts).map_err(|e| e.to_string())?)
        }
        Store::Objects(b) => {
            if !store.history_exists(doc).map_err(|e| e.to_string())? {
                return Ok(Default::default());
            }
            Box::new(b.open_or_create(&crate::history_key(doc), id).map_err(|e| e.to_string())?)
        }
    };
    pagesync::history::read(&*history, &*storage, query).map_err(|e| e.to_string())
}

/// Checks one document without changing anything: opens its storage journal read-only (a torn
/// tail or a leftover of an interrupted trim is a fault here, not repaired), reads and checks
/// every entry, replays them all into pages, and runs `PRAGMA integrity_check`. The error
/// names the journal, the file or object, and the LSN where the journal layer can tell.
pub fn verify_document(store: &Store, doc: DocId) -> Result<Verified, String> {
    let journal = open_read_only(store, doc)?;
    if journal.id() != doc.journal_id() {
        return Err(format!(
            "the storage journal is {}, not the document's {}",
            journal.id(),
            doc.journal_id()
        ));
    }
    let range = journal.range();
    // Opening the page store reads and checks every entry, and indexes its pages: the replay.
    let store = PageStore::open(journal).map_err(|e| e.to_string())?;
    let pages = store.page_count();
    let db = Database::open(store, pagesync::db::ConnMemory::Lean).map_err(|e| e.to_string())?;
    let mut stmt = db.conn().prepare("PRAGMA integrity_check").map_err(|e| e.to_string())?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| format!("integrity_check could not run: {}", db.explain(e)))?;
    if rows != ["ok"] {
        return Err(format!("integrity_check: {}", rows.join("; ")));
    }
    Ok(Verified { range, pages })
}

/// A point in a document's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// After storage entry N.
    Lsn(Lsn),
    /// After the last entry the server wrote at or before this time (ms since the Unix epoch).
    Time(i64),
}

impl std::str::FromStr for At {
    type Err = String;

    /// `lsn:N`, or an RFC 3339 time such as `2026-11-24T09:30:00Z`.
    fn from_str(s: &str) -> Result<At, String> {
        if let Some(n) = s.strip_prefix("lsn:") {
            let lsn = n.parse().ok().and_then(Lsn::new);
            return lsn.map(At::Lsn).ok_or_else(|| format!("{s:?}: expected lsn:N with N >= 1"));
        }
        let t = humantime::parse_rfc3339_weak(s)
            .map_err(|e| format!("{s:?}: expected lsn:N or an RFC 3339 time (2026-11-24T09:30:00Z): {e}"))?;
        let ms = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?;
        Ok(At::Time(ms.as_millis() as i64))
    }
}

/// The entry a point names, checked against the history kept: from the end of the checkpoint
/// the journal starts with (or LSN 1) to the newest entry.
fn resolve(journal: &dyn Journal, at: At) -> Result<Lsn, String> {
    let range = journal.range();
    let Some(last) = range.last() else { return Err("the document has no entries".into()) };
    let store_err = |e: &dyn std::fmt::Display| format!("reading the journal: {e}");
    let header = |lsn: Lsn| {
        let payload = journal.read(lsn).map_err(|e| store_err(&e))?;
        pagesync::storage::decode(&payload).map_err(|e| format!("entry {lsn}: {e}"))
    };
    // A journal that starts with a checkpoint has state from its last part on (steps may come
    // between the parts).
    let mut oldest = range.first();
    if header(oldest)?.checkpoint.is_some() {
        while header(oldest)?.checkpoint.is_none_or(|p| p.index != p.count) {
            oldest = oldest.next();
            if oldest > last {
                return Err("the checkpoint the journal starts with has no last part".into());
            }
        }
    }
    let lsn = match at {
        At::Lsn(lsn) => lsn,
        At::Time(ms) => {
            // Entry times never go backwards: binary search for the last at or before `ms`.
            let (mut lo, mut hi) = (oldest.get(), last.get());
            if header(oldest)?.time_ms > ms {
                return Err(format!(
                    "{} is before the oldest point kept ({}, entry {oldest})",
                    show_time(ms),
                    show_time(header(oldest)?.time_ms)
                ));
            }
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                let l = Lsn::new(mid).expect("BUG: mid >= 1");
                if header(l)?.time_ms <= ms { lo = mid } else { hi = mid - 1 }
            }
            let found = Lsn::new(lo).expect("BUG: lo >= 1");
            // The document's creation is stamped 0 (it precedes every step): a time before its
            // first step names no state the document had.
            if found == Lsn::FIRST && header(found)?.time_ms == 0 && found < last {
                return Err(format!(
                    "{} is before the document's first write ({}, entry {})",
                    show_time(ms),
                    show_time(header(found.next())?.time_ms),
                    found.next()
                ));
            }
            found
        }
    };
    if lsn < oldest || lsn > last {
        return Err(format!("entry {lsn} is outside the history kept: {oldest}..={last}"));
    }
    Ok(lsn)
}

fn show_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A document as of `at`, as a plain `.sqlite` file, and the entry it ends with.
pub fn export_at(store: &Store, doc: DocId, at: At) -> Result<(Lsn, Vec<u8>), String> {
    let journal = open_read_only(store, doc)?;
    let lsn = resolve(&*journal, at)?;
    let mut pages = PageStore::open_until(journal, Some(lsn)).map_err(|e| e.to_string())?;
    Ok((lsn, pages.export().map_err(|e| e.to_string())?))
}

/// Where `restore` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreTo {
    /// A new document, which must not exist yet.
    New(DocId),
    /// The same document: its pages go back to the point, as one checkpoint appended after its
    /// newest entry, so clients follow. Which mutations were applied (and why some were
    /// rejected) stays as it is now, so nothing is applied twice and no client waits for
    /// mutations the server no longer expects; the undone mutations stay undone.
    InPlace,
}

/// What `restore` wrote.
#[derive(Debug)]
pub struct Restored {
    pub from: Lsn,
    pub doc: DocId,
    /// The entries written: one checkpoint.
    pub range: LsnRange,
    pub pages: u32,
}

/// Restores `doc` as of `at` (see [`RestoreTo`]). `now_ms` stamps the new entries. The server
/// must not be writing the target meanwhile.
pub fn restore(store: &Store, doc: DocId, at: At, to: RestoreTo, now_ms: i64) -> Result<Restored, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let journal = open_read_only(store, doc)?;
    let from = resolve(&*journal, at)?;
    let mut then = PageStore::open_until(journal, Some(from)).map_err(|x| e(&x))?;
    let target = match to {
        RestoreTo::New(new) if store.exists(new).map_err(|x| e(&x))? => {
            return Err(format!("document {new} already exists: pick a new id, or restore --in-place"));
        }
        RestoreTo::New(new) => new,
        RestoreTo::InPlace => doc,
    };
    // What it writes has no history entry: no recovery may take it back as a step whose
    // history entry was lost (see `Store::take_back_unpaired_step`).
    store.forget_pairing(target).map_err(|x| e(&x))?;
    let mut out = store.open_journal(target).map_err(|x| e(&x))?;
    let mut copy = |pages: &mut PageStore| {
        let range = pages.copy_checkpoint_to(&mut *out, now_ms).map_err(|x| e(&x))?;
        Ok::<_, String>(Restored { from, doc: target, range, pages: pages.page_count() })
    };
    match to {
        RestoreTo::New(_) => copy(&mut then),
        RestoreTo::InPlace => copy(&mut with_current_positions(store, doc, &mut then, now_ms)?.store()),
    }
}

/// The state in `then` with the current contents of the system tables that say which
/// mutations were applied or rejected (see [`RestoreTo::InPlace`]), as a database in memory.
fn with_current_positions(
    store: &Store,
    doc: DocId,
    then: &mut PageStore,
    now_ms: i64,
) -> Result<Database, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let now = Database::open(
        PageStore::open(open_read_only(store, doc)?).map_err(|x| e(&x))?,
        pagesync::db::ConnMemory::Lean,
    )
    .map_err(|x| e(&x))?;
    let mut j = MemoryJournal::new(doc.journal_id());
    then.copy_checkpoint_to(&mut j, 0).map_err(|x| e(&x))?;
    let patched =
        Database::open(PageStore::open(Box::new(j)).map_err(|x| e(&x))?, pagesync::db::ConnMemory::Lean)
            .map_err(|x| e(&x))?;
    let conn = patched.conn();
    conn.execute_batch("BEGIN; DELETE FROM _pagesync_timelines; DELETE FROM _pagesync_rejections;")
        .map_err(|x| e(&x))?;
    for table in ["_pagesync_timelines", "_pagesync_rejections"] {
        let mut read = now.conn().prepare(&format!("SELECT * FROM {table}")).map_err(|x| e(&x))?;
        let n = read.column_count();
        let marks = vec!["?"; n].join(", ");
        let mut write = conn.prepare(&format!("INSERT INTO {table} VALUES ({marks})")).map_err(|x| e(&x))?;
        let mut rows = read.query([]).map_err(|x| e(&x))?;
        while let Some(row) = rows.next().map_err(|x| e(&x))? {
            let values: Vec<rusqlite::types::Value> =
                (0..n).map(|i| row.get(i)).collect::<Result<_, _>>().map_err(|x| e(&x))?;
            write.execute(rusqlite::params_from_iter(values)).map_err(|x| e(&x))?;
        }
    }
    conn.execute_batch("COMMIT").map_err(|x| e(&x))?;
    patched.store().commit_overlay(&[], &[], now_ms).map_err(|x| e(&x))?;
    Ok(patched)
}
