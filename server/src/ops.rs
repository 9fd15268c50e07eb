//! Operator commands that work on a store directly, beside or without a running server:
//! `verify` checks every document (checksums, replay, SQLite's `integrity_check`) and changes
//! nothing.

use pagesync::DocId;
use pagesync::db::Database;
use pagesync::journal::{FileJournal, FileJournalOptions, Journal, JournalError, LsnRange};
use pagesync::store::PageStore;

use crate::{Store, storage_dir, storage_key};

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
            let Ok(shards) = std::fs::read_dir(root) else { return Ok(docs) };
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
    docs.sort();
    Ok(docs)
}

/// Checks one document without changing anything: opens its storage journal read-only (a torn
/// tail or a leftover of an interrupted trim is a fault here, not repaired), reads and checks
/// every entry, replays them all into pages, and runs `PRAGMA integrity_check`. The error
/// names the journal, the file or object, and the LSN where the journal layer can tell.
pub fn verify_document(store: &Store, doc: DocId) -> Result<Verified, String> {
    let journal: Box<dyn Journal> = match store {
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
        // An object journal's open writes nothing once its marker exists.
        Store::Objects(_) => {
            if !store.exists(doc).map_err(|e| e.to_string())? {
                return Err(JournalError::Missing { path: storage_key(doc).into() }.to_string());
            }
            store.open_journal(doc).map_err(|e| e.to_string())?
        }
    };
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
    let db = Database::open(store).map_err(|e| e.to_string())?;
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
