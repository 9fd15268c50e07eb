//! Reading a document before its download ends: a read-only SQLite connection over the
//! server's committed state as a `PageMap` describes it, each page fetched from the server the
//! first time SQLite reads it.
//!
//! A new replica of a large document has nothing to query until the last part of the
//! checkpoint it starts from has arrived. A `RemoteSnapshot` answers queries meanwhile: the
//! server maps where every page of its committed state lives (`MapPages`, a few hundred runs
//! for a 1 GB document), and a read of a page asks for the block of `BLOCK_PAGES` pages
//! around it (`ReadPages`), so a b-tree descent costs one round trip per level and a scan one
//! per block. The entries a map names are immutable, so every page read belongs to the same
//! state, exactly the one at `PageMap::at`.
//!
//! Fetched pages are checked like the entries the download brings: an answer must be exactly
//! the bytes asked for (entry, offset, length: `PageSource` implementations check it), and the
//! database header must be a SQLite file of `PAGE_SIZE` pages whose size is the map's page
//! count; anything else fails the read with `SQLITE_IOERR`, never a wrong row.
//!
//! The snapshot is for reads only: it holds no journal of its own and writes nothing.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use pagesync_journal::{Journal, JournalError, JournalId, Lsn, LsnRange};

use crate::Rows;
use crate::db::Database;
use crate::error::{Error, Result};
use crate::mutation::Value;
use crate::page::PAGE_SIZE;
use crate::protocol::{MAX_READ_PAGES, PageMap, PageRun};
use crate::store::PageStore;

/// Pages fetched together: the block of a run that holds the page asked for. 16 pages, 64 KiB:
/// a b-tree's neighbouring pages (and a scan's next ones) mostly come with the first.
pub const BLOCK_PAGES: u32 = 16;

/// Blocks kept in memory: 256 (16 MiB). SQLite's own cache holds the hot pages; this saves a
/// round trip for their neighbours.
pub const CACHED_BLOCKS: usize = 256;

/// Where fetched pages come from: the server, over a connection of the caller's.
pub trait PageSource: Send {
    /// Fills `buf` with bytes `offset..offset + buf.len()` of entry `lsn`'s payload, as the
    /// server holds them; an answer for anything else is an error.
    fn read(&mut self, lsn: Lsn, offset: u32, buf: &mut [u8]) -> std::result::Result<(), String>;
}

/// What a snapshot fetched.
#[derive(Debug, Default)]
struct RemoteStats {
    /// `ReadPages` round trips.
    fetches: AtomicU64,
    /// Pages they brought.
    pages: AtomicU64,
    /// Reads that failed (the server unreachable, an answer refused).
    failures: AtomicU64,
}

/// The document's committed state as of `map.at`, read from the server on demand.
pub struct RemoteSnapshot {
    db: Database,
    at: Lsn,
    stats: Arc<RemoteStats>,
}

impl std::fmt::Debug for RemoteSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSnapshot").field("at", &self.at).finish()
    }
}

impl RemoteSnapshot {
    /// Opens the state `map` describes, reading pages through `source`. Reads page 1 at once
    /// (SQLite checks the header on open), so a map that does not hold a SQLite database of
    /// its page count fails here.
    pub fn open(map: PageMap, source: Box<dyn PageSource>) -> Result<RemoteSnapshot> {
        check_map(&map)?;
        let stats = Arc::new(RemoteStats::default());
        let at = map.at;
        let journal = RemoteJournal {
            range: LsnRange::inclusive(
                Lsn::FIRST,
                Lsn::new(at.get().saturating_sub(1)).unwrap_or(Lsn::FIRST),
            ),
            page_count: map.page_count,
            by_place: map.runs.iter().map(|r| ((r.lsn, r.offset), *r)).collect(),
            source: Mutex::new(source),
            blocks: Mutex::new(LruCache::new(NonZeroUsize::new(CACHED_BLOCKS).expect("BUG: non-zero"))),
            stats: stats.clone(),
        };
        let mut store = PageStore::mapped(Box::new(journal), map.page_count, &map.runs);
        store.set_read_ahead(true);
        // Page 1 first, so a refused header is reported with its cause, not as SQLite's bare
        // I/O error.
        store
            .read(0, &mut [0u8; PAGE_SIZE])
            .map_err(|e| Error::Malformed(format!("page 1 of the server's state: {e}")))?;
        let db = Database::open(store, crate::db::ConnMemory::Fast)?;
        Ok(RemoteSnapshot { db, at, stats })
    }

    /// The state is every entry before this LSN.
    pub fn at(&self) -> Lsn {
        self.at
    }

    /// Page requests made so far, and the pages they brought.
    pub fn fetched(&self) -> (u64, u64) {
        (self.stats.fetches.load(Ordering::Relaxed), self.stats.pages.load(Ordering::Relaxed))
    }

    /// Whether a read failed: the snapshot cannot be trusted to answer any more (the server
    /// is unreachable, or trimmed an entry it maps); open a new one.
    pub fn failed(&self) -> bool {
        self.stats.failures.load(Ordering::Relaxed) > 0
    }

    /// A read-only query, under the same allow-list as a replica's (`ClientDocument::query`).
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.db.run_query(|conn| crate::client::query_rows(conn, sql, params)).map_err(|e| match e {
            Error::Sqlite(e) => self.db.explain(e),
            e => e,
        })
    }
}

/// A map's runs must be ascending, apart, within its page count, and readable in one answer
/// each block: a map from a confused or hostile server fails here, not in SQLite.
fn check_map(map: &PageMap) -> Result<()> {
    let bad = |why: String| Err(Error::Malformed(format!("page map: {why}")));
    if map.page_count == 0 {
        return bad("the document has no pages".into());
    }
    let mut next = 1u32;
    for r in &map.runs {
        let end = r.first_page.checked_add(r.pages);
        if r.first_page < next || r.pages == 0 || end.is_none_or(|e| e - 1 > map.page_count) {
            return bad(format!(
                "run of {} pages at page {} is out of order or past the end",
                r.pages, r.first_page
            ));
        }
        if r.lsn >= map.at
            || u64::from(r.offset) + u64::from(r.pages) * PAGE_SIZE as u64 > u64::from(u32::MAX)
        {
            return bad(format!("run at page {} lies outside the entries before {}", r.first_page, map.at));
        }
        next = end.expect("BUG: checked");
    }
    if map.runs.first().is_none_or(|r| r.first_page != 1) {
        return bad("page 1 is in no run".into());
    }
    Ok(())
}

/// The offset of page 1's database size field, and of its page size.
const HEADER_PAGE_COUNT: usize = 28;
const HEADER_PAGE_SIZE: usize = 16;

/// Fetched blocks by entry and first byte.
type Blocks = LruCache<(Lsn, u32), Arc<[u8]>>;

/// The storage journal as far as a map tells: `read_part` of pages it names, fetched by block.
struct RemoteJournal {
    range: LsnRange,
    page_count: u32,
    /// The runs by entry and first byte, to find the one holding a read.
    by_place: std::collections::BTreeMap<(Lsn, u32), PageRun>,
    source: Mutex<Box<dyn PageSource>>,
    blocks: Mutex<Blocks>,
    stats: Arc<RemoteStats>,
}

impl RemoteJournal {
    fn unavailable(&self, what: &str) -> JournalError {
        JournalError::Backend { journal: self.id(), message: format!("a remote snapshot cannot {what}") }
    }

    /// The run of entry `lsn` that holds byte `offset`.
    fn run_at(&self, lsn: Lsn, offset: u32) -> Option<&PageRun> {
        let (_, r) = self.by_place.range(..=(lsn, offset)).next_back()?;
        let end = u64::from(r.offset) + u64::from(r.pages) * PAGE_SIZE as u64;
        (r.lsn == lsn && u64::from(offset) < end).then_some(r)
    }

    /// The block holding byte `offset` of entry `lsn`: its first byte, and its bytes.
    fn block(&self, lsn: Lsn, offset: u32) -> Result<(u32, Arc<[u8]>), JournalError> {
        let run = *self.run_at(lsn, offset).ok_or_else(|| JournalError::Backend {
            journal: self.id(),
            message: format!("entry {lsn} offset {offset} is in no run of the page map"),
        })?;
        let in_run = (offset - run.offset) / PAGE_SIZE as u32;
        let first = in_run - in_run % BLOCK_PAGES;
        let pages = BLOCK_PAGES.min(run.pages - first).min(MAX_READ_PAGES);
        let start = run.offset + first * PAGE_SIZE as u32;
        if let Some(b) = self.blocks.lock().expect("BUG: lock poisoned").get(&(lsn, start)) {
            return Ok((start, b.clone()));
        }
        let mut buf = vec![0u8; pages as usize * PAGE_SIZE];
        let fail = |message: String| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            JournalError::Backend { journal: self.id(), message }
        };
        self.source.lock().expect("BUG: lock poisoned").read(lsn, start, &mut buf).map_err(fail)?;
        if run.first_page + first == 1 {
            check_header(&buf[..PAGE_SIZE], self.page_count).map_err(fail)?;
        }
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        self.stats.pages.fetch_add(u64::from(pages), Ordering::Relaxed);
        let block: Arc<[u8]> = buf.into();
        self.blocks.lock().expect("BUG: lock poisoned").put((lsn, start), block.clone());
        Ok((start, block))
    }
}

/// Page 1 must be a SQLite database of `PAGE_SIZE` pages and `page_count` pages.
fn check_header(page1: &[u8], page_count: u32) -> std::result::Result<(), String> {
    let field = |at: usize| u32::from_be_bytes(page1[at..at + 4].try_into().expect("BUG: 4 bytes"));
    let page_size = u16::from_be_bytes([page1[HEADER_PAGE_SIZE], page1[HEADER_PAGE_SIZE + 1]]);
    if !page1.starts_with(b"SQLite format 3\0") || usize::from(page_size) != PAGE_SIZE {
        return Err("page 1 as fetched is not the header of a SQLite database of 4096-byte pages".into());
    }
    if field(HEADER_PAGE_COUNT) != page_count {
        let found = field(HEADER_PAGE_COUNT);
        return Err(format!("page 1 as fetched says {found} pages, the page map {page_count}"));
    }
    Ok(())
}

impl Journal for RemoteJournal {
    fn id(&self) -> JournalId {
        JournalId::from_u128(0)
    }

    fn range(&self) -> LsnRange {
        self.range
    }

    fn append_batch(&mut self, _: &[&[u8]]) -> pagesync_journal::Result<LsnRange> {
        Err(self.unavailable("be written"))
    }

    fn read(&self, _: Lsn) -> pagesync_journal::Result<Vec<u8>> {
        Err(self.unavailable("read whole entries"))
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> pagesync_journal::Result<()> {
        let (mut at, mut done) = (offset, 0);
        while done < buf.len() {
            let offset = u32::try_from(at).map_err(|_| self.unavailable("read past 4 GiB"))?;
            let (start, block) = self.block(lsn, offset)?;
            let from = (offset - start) as usize;
            let n = (block.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block[from..from + n]);
            (at, done) = (at + n, done + n);
        }
        Ok(())
    }

    fn remove_prefix(&mut self, _: Lsn) -> pagesync_journal::Result<()> {
        Err(self.unavailable("be trimmed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(page_count: u32, runs: Vec<PageRun>) -> PageMap {
        PageMap { at: Lsn::new(10).unwrap(), page_count, runs }
    }

    fn run(first_page: u32, pages: u32, lsn: u64, offset: u32) -> PageRun {
        PageRun { first_page, pages, lsn: Lsn::new(lsn).unwrap(), offset }
    }

    #[test]
    fn maps_out_of_order_overlapping_or_past_the_end_are_refused() {
        assert!(check_map(&map(4, vec![run(1, 4, 1, 33)])).is_ok());
        assert!(check_map(&map(4, vec![run(1, 2, 1, 33), run(4, 1, 2, 33)])).is_ok());
        for bad in [
            map(4, vec![run(1, 5, 1, 33)]),
            map(4, vec![run(1, 2, 1, 33), run(2, 1, 2, 33)]),
            map(4, vec![run(2, 2, 1, 33)]),
            map(4, vec![run(1, 1, 10, 33)]),
            map(4, vec![run(1, 0, 1, 33)]),
            map(4, vec![run(1, 1, 1, u32::MAX - 100)]),
            map(0, vec![]),
        ] {
            assert!(check_map(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_page_one_that_is_not_the_maps_database_is_refused() {
        let mut page = vec![0u8; PAGE_SIZE];
        page[..16].copy_from_slice(b"SQLite format 3\0");
        page[16..18].copy_from_slice(&4096u16.to_be_bytes());
        page[28..32].copy_from_slice(&7u32.to_be_bytes());
        assert!(check_header(&page, 7).is_ok());
        assert!(check_header(&page, 8).unwrap_err().contains("7 pages"));
        page[0] = b's';
        assert!(check_header(&page, 7).is_err());
    }
}
