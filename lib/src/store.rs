//! `PageStore`: the database file SQLite sees, made of pages held in the storage journal.
//!
//! Three layers, read top-down:
//! 1. the overlay: pages SQLite wrote that are not in the journal yet (a server step in
//!    progress, or a client's optimistic local state);
//! 2. a bounded LRU cache of committed pages, and on a replica the run of pages the last
//!    sequential read took (`READ_AHEAD_PAGES`);
//! 3. the page index `PageIdx -> (Lsn, offset)` over the storage journal: a read is one
//!    `read_part` of one page (or of the pages after it in the same entry, for a sequential
//!    read), O(1) in the length of the history.
//!
//! The committed page count is tracked, never recomputed.
//!
//! Checkpoints: `write_checkpoint` appends every page of the document again, in parts (each a
//! storage entry marked part i of n). Once a checkpoint is complete, everything before its
//! first part can be removed (`trim_to`) and the state is unchanged. The parts of a checkpoint
//! are indexed only when its last part is in: until then reads see the state before it, so a
//! checkpoint (or a restore written as one) switches the document atomically, and one cut
//! short by a crash is ignored. A replica restarted at a checkpoint (`apply_remote_batch` past
//! its end) has no state until the checkpoint's last part arrives (`is_restarting`).
//!
//! Steps may come between the parts of a checkpoint (the server writes a large one a few parts
//! per step, `write_checkpoint_parts`, so the document keeps confirming writes meanwhile). Each
//! part holds its pages as of when it was written; a step after it holds the pages it changed.
//! So the state is every entry from the first part on, applied in LSN order: when the last part
//! is in, a part's page is indexed only where no later step wrote that page, and the page
//! count is the last part's (the newest entry).
//!
//! Invariants:
//! - the index holds, for every committed page, the newest entry that wrote it;
//! - the journal starts at LSN 1 or at the first part of a checkpoint;
//! - SQLite sees a file change counter (header bytes 24..28 and 92..96) that changes whenever
//!   pages change underneath it (`reported_counter`), so its page cache is never stale;
//! - pages cut into an entry are byte-identical to what SQLite wrote (the counter is rewritten
//!   on reads only, and only where it differs from the stored one);
//! - on a client (`enable_schema_epochs`), SQLite also sees a schema cookie (bytes 40..44) that
//!   changes whenever the schema may have changed underneath it (`reported_schema`): the
//!   committed cookie moved, a restart or any batch while the store has no base (the parts of
//!   a checkpoint and the steps between them are no whole state: what SQLite parsed then is
//!   not to be kept), or an overlay that held a local schema change was dropped or cut into an
//!   entry. The change counter makes SQLite drop its page cache, but it
//!   keeps its parsed schema while the cookie is unchanged, and an optimistic local schema can
//!   carry the same cookie as the server's (two `CREATE TABLE`s each): without this, SQLite
//!   would read the server's pages through the local schema. Changes of rows only leave it, so
//!   SQLite keeps its schema and its prepared statements. Client pages are never sent
//!   anywhere, so the patched cookie stays local; the server never patches it, so its pages
//!   stay exactly what a replay produces.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use pagesync_journal::{Journal, JournalError, Lsn, LsnRange};

use crate::ids::TimelineId;
use crate::page::{PAGE_SIZE, Page, PageIdx, ZERO_PAGE};
use crate::storage::{self, Applied, EntryError};

/// Committed pages kept in memory beyond SQLite's own cache. 256 pages (1 MiB): SQLite's page
/// cache (2 MiB by default) holds the hot set; this layer saves journal reads after a rebase
/// or a cache flush, and stays small for servers with many open documents.
pub const PAGE_CACHE_PAGES: usize = 256;

/// Pages a sequential read takes from the journal in one read, where they lie side by side in
/// one entry (a checkpoint part, a bulk step): 16 pages, 64 KiB, one `pread` for what would be
/// sixteen. Only on replicas that ask for it (`set_read_ahead`): a server holds thousands of
/// documents and scans few of them.
pub const READ_AHEAD_PAGES: usize = 16;

/// Committed pages read together from one entry by a sequential read, and the first of them.
#[derive(Debug)]
struct Run {
    first: u32,
    pages: usize,
    buf: Box<[u8]>,
}

impl Run {
    fn page(&self, idx: u32) -> Option<&[u8]> {
        let i = idx.checked_sub(self.first)? as usize;
        (i < self.pages).then(|| &self.buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
    }
}

/// Where a committed page lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    lsn: Lsn,
    offset: u32,
}

// The index holds one per page, and a lookup's leaf entry is a cache miss on a large replica:
// 16 bytes, not 24 (`Lsn` is never 0, so `Option` needs no tag).
const _: () = assert!(std::mem::size_of::<Option<Loc>>() == 16);

/// Pages per checkpoint part: 1,024 pages make 4 MiB entries, far below the entry limit, and
/// few enough parts that a checkpoint of a large document costs few appends.
pub const CHECKPOINT_PART_PAGES: u32 = 1024;

/// A complete checkpoint in the storage journal: every page of the document as of `last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The LSN of its first part: removing everything before it keeps the state.
    pub first: Lsn,
    pub last: Lsn,
    /// The server's clock when it was written.
    pub time_ms: i64,
}

/// The parts of a checkpoint of `page_count` pages: `(part, pages)`.
fn checkpoint_parts(page_count: u32) -> impl Iterator<Item = (storage::Part, std::ops::RangeInclusive<u32>)> {
    let count = checkpoint_part_count(page_count);
    (1..=count).map(move |index| (storage::Part { index, count }, part_pages(page_count, index)))
}

/// How many parts a checkpoint of `page_count` pages has.
pub fn checkpoint_part_count(page_count: u32) -> u32 {
    page_count.div_ceil(CHECKPOINT_PART_PAGES).max(1)
}

/// The pages of part `index` of a checkpoint of a document of `page_count` pages.
fn part_pages(page_count: u32, index: u32) -> std::ops::RangeInclusive<u32> {
    let start = (index - 1) * CHECKPOINT_PART_PAGES + 1;
    start..=(index * CHECKPOINT_PART_PAGES).min(page_count)
}

/// A page the overlay changed: its number, its new bytes, its committed version.
type Changed = (u32, Arc<Page>, Arc<Page>);

/// A storage entry's payload and the pages it changes.
type OverlayEntry = (Vec<u8>, Vec<Changed>);

/// A step's storage entry of the pages `take_changed` gave.
fn encode_changed(
    page_count: u32,
    time_ms: i64,
    applied: &[Applied],
    forgotten: &[(TimelineId, Lsn)],
    changed: &[Changed],
) -> Vec<u8> {
    let pages: Vec<(PageIdx, &Page)> =
        changed.iter().map(|(i, p, _)| (PageIdx::new(*i).expect("BUG: non-zero"), &**p)).collect();
    storage::encode(page_count, time_ms, None, applied, forgotten, &pages)
}

/// A storage entry just made durable.
/// An entry appended but not yet part of the committed state (`stage_overlay`).
#[derive(Debug)]
pub struct Staged {
    lsn: Lsn,
    payload: Vec<u8>,
    changed: Vec<Changed>,
}

#[derive(Debug, Clone)]
pub struct Committed {
    pub lsn: Lsn,
    pub payload: Vec<u8>,
    /// The payload with every page XORed with its previous version: mostly zeros, so it
    /// compresses to a fraction of a page for a small change.
    pub delta: Vec<u8>,
}

/// Errors reading or writing pages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("storage entry {lsn}: {source}")]
    Entry { lsn: Lsn, source: EntryError },
    #[error("SQLite wrote {len} bytes at offset {offset}: pages must be {PAGE_SIZE} bytes, page-aligned")]
    NotAPage { offset: u64, len: usize },
    #[error("storage entry {got} arrived, expected {expected}")]
    OutOfOrder { expected: Lsn, got: Lsn },
    #[error(
        "the storage journal starts at LSN {first}, which is not the first part of a checkpoint: the history before it is missing"
    )]
    NoBase { first: Lsn },
    #[error("cannot remove the history before LSN {first}: page {page} still lives in entry {lsn}")]
    TrimWouldLosePages { first: Lsn, page: u32, lsn: Lsn },
    #[error("one step may change at most {max_pages} pages (one storage entry)")]
    StepFull { max_pages: usize },
    #[error("SQLite still reads {pages} pages in place in the storage journal: it cannot change now")]
    PagesInUse { pages: usize },
}

/// The database file of one document.
pub struct PageStore {
    journal: Box<dyn Journal>,
    index: Vec<Option<Loc>>,
    page_count: u32,
    cache: LruCache<u32, Arc<Page>>,
    /// A write puts a new page, never changes one in place, and the one edit in place
    /// (page 1's counters in `commit_as_step`) goes through `Arc::make_mut`, which copies a
    /// shared page: so a recorded local commit shares these pages (`LocalCommit`).
    overlay: HashMap<u32, Arc<Page>>,
    /// The file size in pages as SQLite last set it (overlay included).
    overlay_page_count: u32,
    /// The change counter SQLite is shown; see the module invariants.
    reported_counter: u32,
    /// The schema cookie SQLite is shown, on clients only; see the module invariants.
    reported_schema: Option<u32>,
    /// The schema cookie SQLite was shown when it began writing the overlay (its first write
    /// into an empty overlay, or the overlay's composition, `compose_local_commits`), on
    /// clients: `commit_as_step` moves the stored cookie by as much as SQLite moved this one.
    overlay_shown_schema: Option<u32>,
    /// The last I/O error, kept so the document can report it with its cause after SQLite
    /// turns it into a bare `SQLITE_IOERR`.
    last_error: Option<StoreError>,
    /// The parts of a checkpoint whose last part is not in yet, not indexed.
    arriving: Vec<(Lsn, storage::EntryHeader)>,
    /// Steps since the first arriving part that cut the file shorter: (LSN, page count). A
    /// part's page past such a cut after it is gone, even if the file grew again.
    arriving_cuts: Vec<(Lsn, u32)>,
    /// Complete checkpoints in the journal, oldest first.
    checkpoints: Vec<Checkpoint>,
    /// Payload bytes of the entries after the newest complete checkpoint (or the journal's start).
    bytes_since_checkpoint: u64,
    /// The latest time any entry indexed since opening was stamped with.
    newest_time_ms: Option<i64>,
    /// False while a replica restarted at a checkpoint waits for its last part.
    has_base: bool,
    /// The most pages the overlay may hold (a server step's cap, so its entry fits the
    /// journal); a write of one more fails with `StepFull`.
    max_overlay_pages: Option<usize>,
    /// Whether sequential reads take `READ_AHEAD_PAGES` at once (`set_read_ahead`).
    read_ahead: bool,
    /// The page SQLite last read whole, to see a sequential read coming.
    last_read: u32,
    /// The pages the last sequential read took; dropped whenever the index changes.
    run: Option<Run>,
    /// Pages SQLite reads in place in the journal's map (`fetch`) and has not given back (the
    /// VFS counts them down); the journal is not changed while there are any (`journal_mut`).
    fetched: Arc<std::sync::atomic::AtomicUsize>,
    /// On a client (`track_local_commits`): what each local commit left in the overlay.
    local_commits: Option<LocalCommits>,
}

/// The most page bytes a client keeps of its local commits (`LocalCommits`): past it they go,
/// and its confirmations are kept by replaying the mutations, as without them.
pub const LOCAL_COMMIT_BYTES: usize = 16 << 20;

/// A client's local commits since the overlay was last discarded, oldest first: the pages
/// each left (its writes since the one before) and the file size it set. Together they give
/// the overlay as each commit left it, so a confirmation of a prefix of the pending mutations
/// is kept from their pages (`compose_local_commits`) instead of running them again. Those
/// after a kept step stay while its system rows left the file's shape as it was
/// (`settle_local_commits`), for the next confirmation among the messages handled together
/// (`ClientDocument::receive_wire_held`; a rebase discards the overlay and its replay records
/// the pending mutations' commits afresh): composed on the new stored state, their pages may
/// be that step's, and its digest says whether they are.
#[derive(Default)]
struct LocalCommits {
    done: std::collections::VecDeque<LocalCommit>,
    bytes: usize,
    /// Pages written since the last commit was marked.
    written: std::collections::HashSet<u32>,
    /// False once a commit could not be recorded (the file was cut, or the bytes bound was
    /// reached; `give_up`): the commits after it do not give the overlay, until the overlay
    /// is discarded (`restart`).
    intact: bool,
    /// The commits that hold the mutations of the step being kept (`compose_local_commits`,
    /// `discard_overlay_for_replay`): `commit_as_step` drops them when it keeps the entry,
    /// and leaves those after.
    in_step: usize,
}

struct LocalCommit {
    /// The last mutation the commit holds.
    through: Lsn,
    pages: Vec<(u32, Arc<Page>)>,
    page_count: u32,
    /// The overlay changed the schema by this commit (this one or one before it): SQLite's
    /// parsed schema goes with it, so it is not composed (`compose_local_commits`).
    schema_changed: bool,
}

impl LocalCommits {
    fn restart(&mut self) {
        *self = LocalCommits { intact: true, ..LocalCommits::default() };
    }

    /// No commit is recorded, nor kept, until the next `restart`.
    fn give_up(&mut self) {
        *self = LocalCommits { intact: false, ..LocalCommits::default() };
    }
}

impl std::fmt::Debug for PageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageStore")
            .field("journal", &self.journal.id())
            .field("range", &self.journal.range())
            .field("page_count", &self.page_count)
            .field("overlay_pages", &self.overlay.len())
            .finish()
    }
}

/// Counts one page given back (`PageStore::unfetch`, or the VFS without the store's lock); one
/// that was not handed out leaves the count at 0 rather than wrap it (which would refuse every
/// change of the journal from then on).
pub(crate) fn give_back(fetched: &std::sync::atomic::AtomicUsize) {
    use std::sync::atomic::Ordering::AcqRel;
    let given = fetched.fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |n| n.checked_sub(1));
    debug_assert!(given.is_ok(), "BUG: a page given back that was not handed out");
}

fn counter_of(page1: &Page) -> u32 {
    u32::from_be_bytes(page1[24..28].try_into().expect("BUG: 4 bytes"))
}

fn schema_cookie_of(page1: &Page) -> u32 {
    u32::from_be_bytes(page1[40..44].try_into().expect("BUG: 4 bytes"))
}

impl PageStore {
    /// Opens the store over a storage journal, indexing every entry it holds.
    pub fn open(journal: Box<dyn Journal>) -> Result<PageStore, StoreError> {
        Self::open_until(journal, None)
    }

    /// Opens the store as of entry `last` (`None`: the newest), for reading the document at a
    /// point in its history. Such a store must not be written.
    pub fn open_until(journal: Box<dyn Journal>, last: Option<Lsn>) -> Result<PageStore, StoreError> {
        let first = journal.range().first();
        let mut store = PageStore::unindexed(journal);
        store.has_base = first == Lsn::FIRST;
        for lsn in store.journal.range().iter().take_while(|l| last.is_none_or(|last| *l <= last)) {
            let payload = store.journal.read(lsn)?;
            let header = storage::decode(&payload).map_err(|source| StoreError::Entry { lsn, source })?;
            let starts_a_checkpoint = header.checkpoint.is_some_and(|p| p.index == 1);
            if lsn == first && first > Lsn::FIRST && !starts_a_checkpoint {
                return Err(StoreError::NoBase { first });
            }
            store.index_entry(lsn, header, payload.len());
        }
        store.overlay_page_count = store.page_count;
        store.reported_counter = store.committed_counter()?;
        Ok(store)
    }

    /// A store over `journal` with nothing indexed yet: no pages, no checkpoints, a base.
    fn unindexed(journal: Box<dyn Journal>) -> PageStore {
        PageStore {
            journal,
            index: Vec::new(),
            page_count: 0,
            cache: LruCache::new(NonZeroUsize::new(PAGE_CACHE_PAGES).expect("BUG: non-zero")),
            overlay: HashMap::new(),
            overlay_page_count: 0,
            reported_counter: 0,
            reported_schema: None,
            overlay_shown_schema: None,
            last_error: None,
            arriving: Vec::new(),
            arriving_cuts: Vec::new(),
            checkpoints: Vec::new(),
            bytes_since_checkpoint: 0,
            newest_time_ms: None,
            has_base: true,
            max_overlay_pages: None,
            read_ahead: false,
            last_read: 0,
            run: None,
            fetched: Arc::default(),
            local_commits: None,
        }
    }

    /// A store over a state a `protocol::PageMap` describes, read through `journal` (a remote
    /// snapshot's, which fetches pages): for reads only.
    pub(crate) fn mapped(
        journal: Box<dyn Journal>,
        page_count: u32,
        runs: &[crate::protocol::PageRun],
    ) -> PageStore {
        let mut store = PageStore::unindexed(journal);
        store.set_page_count(page_count);
        for r in runs {
            for i in 0..r.pages {
                let offset = r.offset + i * PAGE_SIZE as u32;
                store.index[(r.first_page + i) as usize - 1] = Some(Loc { lsn: r.lsn, offset });
            }
        }
        store.overlay_page_count = page_count;
        store
    }

    pub fn journal(&self) -> &dyn Journal {
        &*self.journal
    }

    /// The journal, to change: refused while SQLite reads pages in place in its map (`fetch`),
    /// since a change may cut or unmap what they point into. SQLite gives every page back when
    /// its statement ends, and the document changes the journal only between statements, so
    /// a refusal would be a bug of ours, reported as an error rather than a read of freed
    /// memory.
    fn journal_mut(&mut self) -> Result<&mut dyn Journal, StoreError> {
        let pages = self.pages_in_use();
        if pages > 0 {
            return Err(StoreError::PagesInUse { pages });
        }
        Ok(&mut *self.journal)
    }

    /// SQLite's `xFetch`: page `offset / PAGE_SIZE`, whole, in place in the journal's memory
    /// map, for SQLite to read (never write) until it gives it back (`unfetch`; the VFS counts
    /// down `fetched_pages` itself). Every page handed out must be given back: until then the
    /// journal does not change. `None` (SQLite then reads a copy, `read`) for page 1 (its
    /// counters are shown patched), a page SQLite wrote and has not committed (the overlay),
    /// one past the committed state or that no entry holds, one at an odd address in the map
    /// (see storage version 4), and whatever the journal does not map.
    pub fn fetch(&mut self, offset: u64, len: usize) -> Option<std::ptr::NonNull<u8>> {
        if len != PAGE_SIZE || !offset.is_multiple_of(PAGE_SIZE as u64) {
            return None;
        }
        let idx = PageIdx::containing(offset).get();
        let in_overlay = !self.overlay.is_empty() && self.overlay.contains_key(&idx);
        if idx == 1 || idx > self.page_count || idx > self.overlay_page_count || in_overlay {
            return None;
        }
        let loc = self.index[idx as usize - 1]?;
        let page = self.journal.mapped_part(loc.lsn, loc.offset as usize, PAGE_SIZE)?;
        // SQLite reads a page's cell pointers (at even offsets in the page) as aligned 2-byte
        // integers. Storage version 4 entries lie 4-byte aligned in a segment of such entries;
        // a version 3 entry (written before) puts its pages, and shifts those after it, by one.
        if !(page.as_ptr() as usize).is_multiple_of(2) {
            return None;
        }
        let ptr = std::ptr::NonNull::from(page).cast::<u8>();
        self.fetched.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Some(ptr)
    }

    /// Gives back a page `fetch` handed out.
    pub fn unfetch(&self) {
        give_back(&self.fetched);
    }

    /// Pages SQLite reads in place in the journal's map now (`fetch`): none between
    /// statements.
    pub fn pages_in_use(&self) -> usize {
        self.fetched.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The count of pages `fetch` gave SQLite and it has not given back, for the VFS to count
    /// down at each `xUnfetch` (without the store's lock).
    pub(crate) fn fetched_pages(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.fetched.clone()
    }

    /// Makes every entry appended so far durable (`apply_remote_batch` appends without a
    /// barrier); a no-op when they are.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        Ok(self.journal_mut()?.sync()?)
    }

    /// `sync`, whose wait runs without the store (`Journal::detach_sync`).
    pub fn detach_sync(&mut self) -> Result<Option<crate::journal::DetachedSync>, StoreError> {
        Ok(self.journal_mut()?.detach_sync()?)
    }

    /// The outcome of a barrier from `detach_sync` (`Journal::finish_detached_sync`).
    pub fn finish_detached_sync(
        &mut self,
        sync: crate::journal::DetachedSync,
        outcome: std::io::Result<()>,
    ) -> Result<(), StoreError> {
        // A barrier that held changes nothing a page points into; a failed one cuts files.
        if outcome.is_err() {
            self.journal_mut()?;
        }
        Ok(self.journal.finish_detached_sync(sync, outcome)?)
    }

    /// Committed pages.
    pub fn page_count(&self) -> u32 {
        self.page_count
    }

    /// True when SQLite wrote pages (or resized the file) since the last commit or discard.
    pub fn has_overlay(&self) -> bool {
        !self.overlay.is_empty() || self.overlay_page_count != self.page_count
    }

    pub fn has_last_error(&self) -> bool {
        self.last_error.is_some()
    }

    pub fn take_last_error(&mut self) -> Option<StoreError> {
        self.last_error.take()
    }

    /// Indexes a new entry; the parts of a checkpoint wait for its last part (see the module
    /// docs).
    fn index_entry(&mut self, lsn: Lsn, header: storage::EntryHeader, len: usize) {
        self.run = None;
        self.newest_time_ms = self.newest_time_ms.max(Some(header.time_ms));
        let Some(part) = header.checkpoint else {
            // Steps between the parts of a checkpoint are indexed at once (see the module docs).
            self.bytes_since_checkpoint += len as u64;
            if !self.arriving.is_empty() && header.page_count < self.page_count {
                self.arriving_cuts.push((lsn, header.page_count));
            }
            return self.index_pages(lsn, &header);
        };
        let continues = self.arriving.last().is_some_and(|(_, h)| {
            h.checkpoint.is_some_and(|p| p.index + 1 == part.index && p.count == part.count)
        });
        if part.index == 1 {
            self.arriving.clear();
            self.arriving_cuts.clear();
        } else if !continues {
            // A part without the ones before it: a checkpoint cut short, then resumed by
            // nothing. It changes nothing; forget it.
            self.arriving.clear();
            self.arriving_cuts.clear();
            return;
        }
        let (time_ms, page_count) = (header.time_ms, header.page_count);
        self.arriving.push((lsn, header));
        if part.index == part.count {
            let first = self.arriving[0].0;
            // The last part is the newest entry: its page count is the document's.
            self.set_page_count(page_count);
            let cuts = std::mem::take(&mut self.arriving_cuts);
            for (l, h) in std::mem::take(&mut self.arriving) {
                let cut = cuts.iter().filter(|(at, _)| *at > l).map(|(_, pages)| *pages).min();
                self.index_part_pages(l, &h, cut.unwrap_or(u32::MAX));
            }
            self.checkpoints.push(Checkpoint { first, last: lsn, time_ms });
            self.bytes_since_checkpoint = 0;
            self.has_base = true;
        }
    }

    fn index_pages(&mut self, lsn: Lsn, header: &storage::EntryHeader) {
        self.set_page_count(header.page_count);
        for (i, idx) in header.pages.iter().enumerate() {
            let offset = u32::try_from(header.page_offset(i)).expect("BUG: entries are < 4 GiB");
            self.index[idx.get() as usize - 1] = Some(Loc { lsn, offset });
            self.cache.pop(&idx.get());
        }
    }

    /// Indexes a checkpoint part's pages where no later entry wrote them, within the page
    /// count and up to `cut` (the fewest pages a later step left the file with).
    fn index_part_pages(&mut self, lsn: Lsn, header: &storage::EntryHeader, cut: u32) {
        for (i, idx) in header.pages.iter().enumerate().filter(|(_, idx)| idx.get() <= cut) {
            let Some(slot) = self.index.get_mut(idx.get() as usize - 1) else { continue };
            if slot.is_some_and(|l| l.lsn > lsn) {
                continue;
            }
            let offset = u32::try_from(header.page_offset(i)).expect("BUG: entries are < 4 GiB");
            *slot = Some(Loc { lsn, offset });
            self.cache.pop(&idx.get());
        }
    }

    fn set_page_count(&mut self, page_count: u32) {
        // Pages cut off by a shrink must not come back from the cache if the file grows again
        // without rewriting them (a page equal to zeros is left out of an entry).
        for gone in page_count as usize + 1..=self.index.len() {
            self.cache.pop(&(gone as u32));
        }
        self.index.resize(page_count as usize, None);
        self.page_count = page_count;
    }

    fn committed_counter(&mut self) -> Result<u32, StoreError> {
        if self.page_count == 0 {
            return Ok(0);
        }
        Ok(counter_of(&*self.committed_page(PageIdx::FIRST)?))
    }

    /// A committed page (never the overlay).
    fn committed_page(&mut self, idx: PageIdx) -> Result<Arc<Page>, StoreError> {
        if let Some(p) = self.cache.get(&idx.get()) {
            return Ok(p.clone());
        }
        let loc = self.index.get(idx.get() as usize - 1).copied().flatten();
        let page = match loc {
            None => Arc::new(ZERO_PAGE),
            Some(loc) => {
                let mut page = Box::new([0u8; PAGE_SIZE]);
                self.journal.read_part(loc.lsn, loc.offset as usize, &mut page[..])?;
                Arc::from(page)
            }
        };
        self.cache.put(idx.get(), page.clone());
        Ok(page)
    }

    /// Copies bytes `in_page..in_page + out.len()` of the page as SQLite should see it now
    /// (overlay first, then committed) into `out`; `false` past the end of the file.
    ///
    /// A whole committed page missing from the cache is read from the journal straight into
    /// SQLite's buffer and not cached: SQLite's own cache holds the hot set, and a scan would
    /// only churn this one (one copy, no allocation). A part of a page (page 1's header, read
    /// at every transaction) goes through the cache.
    fn read_page_into(&mut self, idx: PageIdx, in_page: usize, out: &mut [u8]) -> Result<bool, StoreError> {
        if idx.get() > self.overlay_page_count {
            return Ok(false);
        }
        let range = in_page..in_page + out.len();
        if let Some(p) = self.overlay.get(&idx.get()) {
            out.copy_from_slice(&p[range]);
        } else if idx.get() > self.page_count {
            out.fill(0);
        } else if let Some(p) = self.cache.peek(&idx.get()) {
            out.copy_from_slice(&p[range]);
        } else if out.len() < PAGE_SIZE {
            out.copy_from_slice(&self.committed_page(idx)?[range]);
        } else {
            self.read_committed_into(idx.get(), out)?;
        }
        Ok(true)
    }

    /// A whole committed page, not cached, into `out`: from the last sequential read's run,
    /// or read from the journal with the pages after it that lie next to it in the same entry
    /// when the read before was of the page before (see `READ_AHEAD_PAGES`), or alone.
    fn read_committed_into(&mut self, idx: u32, out: &mut [u8]) -> Result<(), StoreError> {
        let sequential = self.read_ahead && idx == self.last_read.wrapping_add(1);
        self.last_read = idx;
        if let Some(page) = self.run.as_ref().and_then(|r| r.page(idx)) {
            out.copy_from_slice(page);
            return Ok(());
        }
        let Some(loc) = self.index[idx as usize - 1] else {
            out.fill(0);
            return Ok(());
        };
        let next_to = |i: usize| {
            let offset = loc.offset as usize + i * PAGE_SIZE;
            Some(Loc { lsn: loc.lsn, offset: u32::try_from(offset).ok()? })
        };
        let pages = if sequential {
            (1..READ_AHEAD_PAGES)
                .take_while(|&i| self.index.get(idx as usize - 1 + i).copied().flatten() == next_to(i))
                .count()
                + 1
        } else {
            1
        };
        if pages == 1 {
            return Ok(self.journal.read_part(loc.lsn, loc.offset as usize, out)?);
        }
        let mut run = match self.run.take() {
            Some(run) => run,
            None => {
                Run { first: 0, pages: 0, buf: vec![0u8; READ_AHEAD_PAGES * PAGE_SIZE].into_boxed_slice() }
            }
        };
        self.journal.read_part(loc.lsn, loc.offset as usize, &mut run.buf[..pages * PAGE_SIZE])?;
        (run.first, run.pages) = (idx, pages);
        out.copy_from_slice(&run.buf[..PAGE_SIZE]);
        self.run = Some(run);
        Ok(())
    }

    /// Where every committed page lives, as runs of pages side by side in one entry (see
    /// `protocol::PageMap`); `None` past `max_runs`, or while a replica restarts (it has no
    /// state to map).
    pub fn page_runs(&self, max_runs: usize) -> Option<Vec<crate::protocol::PageRun>> {
        if !self.has_base {
            return None;
        }
        let mut runs: Vec<crate::protocol::PageRun> = Vec::new();
        for (i, loc) in self.index.iter().enumerate() {
            let Some(loc) = loc else { continue };
            let page = i as u32 + 1;
            if let Some(r) = runs.last_mut()
                && r.lsn == loc.lsn
                && r.first_page + r.pages == page
                && u64::from(r.offset) + u64::from(r.pages) * PAGE_SIZE as u64 == u64::from(loc.offset)
            {
                r.pages += 1;
                continue;
            }
            if runs.len() == max_runs {
                return None;
            }
            runs.push(crate::protocol::PageRun {
                first_page: page,
                pages: 1,
                lsn: loc.lsn,
                offset: loc.offset,
            });
        }
        Some(runs)
    }

    /// Lets sequential reads take `READ_AHEAD_PAGES` at once (a replica: scans of a large
    /// document go at the speed of a plain file). Off by default, and for servers.
    pub fn set_read_ahead(&mut self, on: bool) {
        self.read_ahead = on;
        if !on {
            self.run = None;
        }
    }

    /// SQLite's `xRead`. Returns `false` for a short read (past the end; the rest is zeroed).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<bool, StoreError> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let idx = PageIdx::containing(at);
            let in_page = (at - idx.offset()) as usize;
            let n = (PAGE_SIZE - in_page).min(buf.len() - done);
            if !self.read_page_into(idx, in_page, &mut buf[done..done + n])? {
                buf[done..].fill(0);
                return Ok(false);
            }
            done += n;
        }
        self.patch_counter(offset, buf);
        Ok(true)
    }

    /// For a client's replica: show SQLite a schema cookie that moves whenever the schema may
    /// have changed underneath it (see the module invariants). Never on a server.
    pub fn enable_schema_epochs(&mut self) -> Result<(), StoreError> {
        self.reported_schema = Some(self.committed_schema()?);
        Ok(())
    }

    /// The committed state's schema cookie (0 while it has no pages).
    fn committed_schema(&mut self) -> Result<u32, StoreError> {
        if self.page_count == 0 {
            return Ok(0);
        }
        Ok(schema_cookie_of(&*self.committed_page(PageIdx::FIRST)?))
    }

    /// Whether SQLite changed the schema in the overlay (on a client: it moved the cookie it was
    /// shown when the overlay began), so the schema it parsed goes with the overlay.
    fn overlay_changed_schema(&self) -> bool {
        self.reported_schema.is_some()
            && self.overlay.get(&1).is_some_and(|p| Some(schema_cookie_of(p)) != self.overlay_shown_schema)
    }

    /// Pages changed underneath SQLite: a new change counter, so it drops its page cache; on a
    /// client, with `schema` (the schema SQLite parsed may be gone: the committed cookie moved,
    /// or a local schema change went with the overlay), a new schema cookie too, so it parses
    /// the schema again and prepares its statements again. Not otherwise: the same schema has
    /// the same root pages, and every statement would be prepared again for nothing.
    fn bump_reported(&mut self, schema: bool) {
        self.reported_counter = self.reported_counter.wrapping_add(1);
        if schema {
            self.reported_schema = self.reported_schema.map(|c| c.wrapping_add(1));
        }
    }

    /// Shows SQLite `reported_counter` in the change counter and version-valid-for fields, and
    /// on clients `reported_schema` in the schema cookie.
    fn patch_counter(&self, offset: u64, buf: &mut [u8]) {
        let counter = self.reported_counter.to_be_bytes();
        let schema = self.reported_schema.map(u32::to_be_bytes);
        let fields = [(24u64, Some(counter)), (92, Some(counter)), (40, schema)];
        for (field, value) in fields {
            let Some(value) = value else { continue };
            for (k, byte) in value.iter().enumerate() {
                let pos = field + k as u64;
                if pos >= offset && pos < offset + buf.len() as u64 {
                    buf[(pos - offset) as usize] = *byte;
                }
            }
        }
    }

    /// SQLite's `xWrite`: whole, aligned pages only.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if data.len() != PAGE_SIZE || !offset.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StoreError::NotAPage { offset, len: data.len() });
        }
        let idx = PageIdx::containing(offset);
        if let Some(max_pages) = self.max_overlay_pages
            && self.overlay.len() >= max_pages
            && !self.overlay.contains_key(&idx.get())
        {
            return Err(StoreError::StepFull { max_pages });
        }
        let page: Arc<Page> = Arc::new(data.try_into().expect("BUG: length checked"));
        if self.overlay.is_empty() {
            self.overlay_shown_schema = self.reported_schema;
        }
        if idx == PageIdx::FIRST {
            // SQLite bumped the counter it was shown; keep showing what it wrote.
            self.reported_counter = counter_of(&page);
            if self.reported_schema.is_some() {
                self.reported_schema = Some(schema_cookie_of(&page));
            }
        }
        self.overlay.insert(idx.get(), page);
        self.overlay_page_count = self.overlay_page_count.max(idx.get());
        if let Some(commits) = self.local_commits.as_mut() {
            commits.written.insert(idx.get());
        }
        Ok(())
    }

    /// SQLite's `xTruncate`.
    pub fn truncate(&mut self, size: u64) -> Result<(), StoreError> {
        if !size.is_multiple_of(PAGE_SIZE as u64) {
            return Err(StoreError::NotAPage { offset: size, len: 0 });
        }
        let pages = u32::try_from(size / PAGE_SIZE as u64).expect("BUG: SQLite files are < 2^32 pages");
        if pages < self.overlay_page_count
            && let Some(commits) = self.local_commits.as_mut()
        {
            // A page cut and written again later would not show the cut: not recorded.
            commits.give_up();
        }
        self.overlay.retain(|&i, _| i <= pages);
        self.overlay_page_count = pages;
        Ok(())
    }

    /// SQLite's `xFileSize`.
    pub fn size_bytes(&self) -> u64 {
        self.overlay_page_count as u64 * PAGE_SIZE as u64
    }

    /// Caps the pages the overlay may hold (`None`: no cap).
    pub fn set_max_overlay_pages(&mut self, max_pages: Option<usize>) {
        self.max_overlay_pages = max_pages;
    }

    pub fn max_overlay_pages(&self) -> Option<usize> {
        self.max_overlay_pages
    }

    /// Pages SQLite has written since the last commit (or discard).
    pub fn overlay_pages(&self) -> usize {
        self.overlay.len()
    }

    pub fn set_last_error(&mut self, e: StoreError) {
        self.last_error = Some(e);
    }

    /// Cuts the overlay into one storage entry with `applied`, appends it durably, and makes it
    /// the committed state. Pages equal to their committed version are left out. Returns the
    /// entry's LSN and its delta form (see `wire`), or `None` when there was nothing to record.
    pub fn commit_overlay(
        &mut self,
        applied: &[Applied],
        forgotten: &[(TimelineId, Lsn)],
        time_ms: i64,
    ) -> Result<Option<Committed>, StoreError> {
        let Some((payload, changed)) = self.take_overlay_entry(applied, forgotten, time_ms)? else {
            return Ok(None);
        };
        let lsn = self.journal_mut()?.append(&payload)?;
        Ok(Some(self.finish_staged(Staged { lsn, payload, changed })))
    }

    /// The entry the overlay makes (and the pages it changes), taking the overlay; `None` when
    /// it would say nothing.
    fn take_overlay_entry(
        &mut self,
        applied: &[Applied],
        forgotten: &[(TimelineId, Lsn)],
        time_ms: i64,
    ) -> Result<Option<OverlayEntry>, StoreError> {
        self.journal_mut()?; // refused before the overlay is taken, not after
        let changed = self.take_changed()?;
        let nothing = applied.is_empty() && forgotten.is_empty();
        if changed.is_empty() && nothing && self.overlay_page_count == self.page_count {
            return Ok(None);
        }
        let payload = encode_changed(self.overlay_page_count, time_ms, applied, forgotten, &changed);
        Ok(Some((payload, changed)))
    }

    /// `commit_overlay` up to the barrier: the entry is appended (readable, `sync_journal`
    /// makes it durable), and it becomes the committed state at `finish_staged`, or is taken
    /// back by `unstage` (when what was to become durable beside it did not).
    pub fn stage_overlay(
        &mut self,
        applied: &[Applied],
        forgotten: &[(TimelineId, Lsn)],
        time_ms: i64,
    ) -> Result<Option<Staged>, StoreError> {
        let Some((payload, changed)) = self.take_overlay_entry(applied, forgotten, time_ms)? else {
            return Ok(None);
        };
        let lsn = self.journal_mut()?.append_batch_unsynced(&[&payload])?.first();
        Ok(Some(Staged { lsn, payload, changed }))
    }

    /// Makes what is staged durable (the journal's barrier).
    pub fn sync_journal(&mut self) -> Result<(), StoreError> {
        Ok(self.journal_mut()?.sync()?)
    }

    /// Whether a staged entry can be taken back (`unstage`).
    pub fn can_unstage(&self) -> bool {
        self.journal.can_remove_last()
    }

    /// A staged entry, durable now, becomes the committed state.
    pub fn finish_staged(&mut self, staged: Staged) -> Committed {
        let Staged { lsn, payload, changed } = staged;
        let header = storage::decode(&payload).expect("BUG: we just encoded it");
        let olds: Vec<&Page> = changed.iter().map(|(_, _, old)| &**old).collect();
        let delta = crate::wire::xor_pages(&header, payload.clone(), &olds);
        self.index_entry(lsn, header, payload.len());
        for (i, page, _) in changed {
            self.cache.put(i, page);
        }
        Committed { lsn, payload, delta }
    }

    /// Takes a staged entry back off the journal, durably: the committed state stays as it
    /// was (the overlay it was made of is gone; `rollback_failed_step` next).
    pub fn unstage(&mut self, staged: Staged) -> Result<(), StoreError> {
        debug_assert_eq!(self.journal.range().last(), Some(staged.lsn), "BUG: not the newest entry");
        Ok(self.journal_mut()?.remove_last()?)
    }

    /// Takes the overlay's pages that differ from their committed versions, in page order,
    /// each with that version.
    fn take_changed(&mut self) -> Result<Vec<Changed>, StoreError> {
        // Read in page order too, not the map's: the same reads in the same order every run.
        let mut pages: Vec<(u32, Arc<Page>)> = std::mem::take(&mut self.overlay).into_iter().collect();
        pages.sort_unstable_by_key(|(i, _)| *i);
        let mut changed = Vec::with_capacity(pages.len());
        for (i, page) in pages {
            let idx = PageIdx::new(i).expect("BUG: overlay keys are page numbers");
            let old = self.previous_version(idx)?;
            if *old != *page {
                changed.push((i, page, old));
            }
        }
        Ok(changed)
    }

    /// The committed version of a page that a client at the current LSN holds: zeros past the
    /// committed page count.
    pub fn previous_version(&mut self, idx: PageIdx) -> Result<Arc<Page>, StoreError> {
        if idx.get() > self.page_count {
            return Ok(Arc::new(ZERO_PAGE));
        }
        self.committed_page(idx)
    }

    /// Drops the overlay: SQLite's uncommitted or optimistic writes are forgotten, and SQLite
    /// is shown a new change counter so it rereads its cache.
    pub fn discard_overlay(&mut self) {
        self.clear_overlay();
        if let Some(commits) = self.local_commits.as_mut() {
            commits.restart();
        }
    }

    fn clear_overlay(&mut self) {
        let schema = self.overlay_changed_schema();
        self.overlay.clear();
        self.overlay_page_count = self.page_count;
        self.bump_reported(schema);
    }

    /// For a client's replica: record what each local commit leaves in the overlay
    /// (`mark_local_commit`), so that a confirmation can be kept from it
    /// (`compose_local_commits`).
    pub fn track_local_commits(&mut self) {
        self.local_commits = Some(LocalCommits { intact: !self.has_overlay(), ..LocalCommits::default() });
    }

    /// A local transaction that holds the mutations through `through` committed: its pages are
    /// recorded, while the commits since the overlay was last discarded are all recorded and
    /// within `LOCAL_COMMIT_BYTES`.
    pub fn mark_local_commit(&mut self, through: Lsn) {
        let (page_count, schema_changed) = (self.overlay_page_count, self.overlay_changed_schema());
        let Some(commits) = self.local_commits.as_mut() else { return };
        let written = std::mem::take(&mut commits.written);
        if !commits.intact {
            return;
        }
        // A page missing from the overlay was cut off the file since it was written (a cut
        // gives up first, so none should be; left out rather than trusted).
        let pages: Vec<_> =
            written.into_iter().filter_map(|i| Some((i, self.overlay.get(&i)?.clone()))).collect();
        let bytes = pages.len() * PAGE_SIZE;
        if commits.bytes + bytes > LOCAL_COMMIT_BYTES {
            commits.give_up();
            return;
        }
        commits.bytes += bytes;
        commits.done.push_back(LocalCommit { through, pages, page_count, schema_changed });
    }

    /// Makes the overlay what the recorded local commits through the one that holds mutation
    /// `through` left (`mark_local_commit`), dropping what later ones wrote, for `commit_as_step`
    /// to cut. `false`, with the overlay as it was, when no recorded commit ends there, or the
    /// commits through it or the overlay changed the schema (SQLite's parsed schema would not
    /// be the composed state's).
    pub fn compose_local_commits(&mut self, through: Lsn) -> bool {
        let Some(at) = self.local_commit_through(through) else { return false };
        let Some(commits) = self.local_commits.as_ref() else { return false };
        if commits.done[at].schema_changed || self.overlay_changed_schema() {
            return false;
        }
        let used = at + 1;
        let page_count = commits.done[at].page_count;
        let mut overlay: HashMap<u32, Arc<Page>> = HashMap::new();
        for commit in commits.done.iter().take(used) {
            for (i, page) in &commit.pages {
                overlay.insert(*i, page.clone());
            }
        }
        overlay.retain(|&i, _| i <= page_count);
        self.clear_overlay();
        self.overlay = overlay;
        self.overlay_page_count = page_count;
        self.overlay_shown_schema = self.reported_schema;
        if let Some(commits) = self.local_commits.as_mut() {
            commits.written.clear();
            commits.in_step = used;
        }
        true
    }

    /// `discard_overlay` before a confirmation's mutations through `through` run again on the
    /// stored state (`ClientDocument::receive_confirm`): the local commits recorded after them
    /// stay, for the confirmations that follow, if one ends there.
    pub fn discard_overlay_for_replay(&mut self, through: Lsn) {
        let Some(at) = self.local_commit_through(through) else {
            self.discard_overlay();
            return;
        };
        self.clear_overlay();
        if let Some(commits) = self.local_commits.as_mut() {
            commits.written.clear();
            commits.in_step = at + 1;
        }
    }

    /// Where the recorded local commit that ends with mutation `through` is, if they are intact.
    fn local_commit_through(&self, through: Lsn) -> Option<usize> {
        let commits = self.local_commits.as_ref().filter(|c| c.intact)?;
        commits.done.iter().position(|c| c.through == through)
    }

    /// After `commit_as_step`, which cut `step` (its page 1 and page count; `None` when it
    /// kept nothing): the commits of the step's mutations go. The later ones stay, for the next
    /// confirmation, when the step's system rows left the file's shape as the last of those
    /// commits left it (its size and page 1's freelist fields): a cheap sign, not a proof, that
    /// every later commit's page still means what it meant; the next confirmation's digest is
    /// the proof. Otherwise, or when the step's commits were not recorded, all go.
    fn settle_local_commits(&mut self, step: Option<(Option<&Page>, u32)>) {
        let Some(commits) = self.local_commits.as_mut() else { return };
        let used = std::mem::take(&mut commits.in_step);
        let last = used.checked_sub(1).and_then(|at| commits.done.get(at));
        let page1 = commits.done.iter().take(used).rev().find_map(|c| c.pages.iter().find(|(i, _)| *i == 1));
        let same_shape = step.zip(last).zip(page1).is_some_and(|(((step1, count), last), (_, page1))| {
            count == last.page_count
                && !last.schema_changed
                && step1.is_some_and(|s| s[28..40] == page1[28..40])
        });
        if !same_shape {
            commits.restart();
            return;
        }
        for c in commits.done.drain(..used) {
            commits.bytes -= c.pages.len() * PAGE_SIZE;
        }
        commits.written.clear();
    }

    /// Cuts the overlay (a client's own mutations over the committed state, and the system
    /// rows of the step that applied them) into the entry the server's step cut, and keeps it
    /// as the next entry when its digest is `digest` (`wire::Confirm`). Only page 1's patched
    /// fields differ: the server's SQLite was shown the stored ones and moved the change
    /// counter and version-valid-for by one (a step is one write transaction) and the schema
    /// cookie by one per schema change; a client's was shown other values (`overlay_shown_schema`)
    /// and may have taken several transactions. So page 1 is cut with the stored counters plus
    /// one and the stored cookie moved as far as the client's moved. The overlay goes either
    /// way; returns whether the digest matched.
    pub fn commit_as_step(
        &mut self,
        applied: &[Applied],
        forgotten: &[(TimelineId, Lsn)],
        time_ms: i64,
        digest: &[u8; crate::wire::DIGEST_BYTES],
    ) -> Result<bool, StoreError> {
        self.journal_mut()?; // refused before the overlay is taken, not after
        // Kept or not, the overlay goes: with a schema change in it, SQLite parses again.
        let schema = self.overlay_changed_schema();
        let stored1 = self.previous_version(PageIdx::FIRST)?;
        if let Some(page) = self.overlay.get_mut(&1).map(Arc::make_mut) {
            let field =
                |p: &Page, at: usize| u32::from_be_bytes(p[at..at + 4].try_into().expect("BUG: 4 bytes"));
            let counter = field(&stored1, 24).wrapping_add(1);
            let valid_for = field(&stored1, 92).wrapping_add(1);
            page[24..28].copy_from_slice(&counter.to_be_bytes());
            page[92..96].copy_from_slice(&valid_for.to_be_bytes());
            if let Some(schema) = self.overlay_shown_schema {
                let cookie = field(&stored1, 40).wrapping_add(field(page, 40).wrapping_sub(schema));
                page[40..44].copy_from_slice(&cookie.to_be_bytes());
            }
        }
        let changed = self.take_changed();
        let page_count = std::mem::replace(&mut self.overlay_page_count, self.page_count);
        self.bump_reported(schema);
        let changed = changed.inspect_err(|_| self.settle_local_commits(None))?;
        let payload = encode_changed(page_count, time_ms, applied, forgotten, &changed);
        let kept = crate::wire::digest(&payload) == *digest;
        let step1 = changed.iter().find(|(i, ..)| *i == 1).map(|(_, p, _)| &**p);
        self.settle_local_commits(kept.then_some((step1, page_count)));
        if !kept {
            return Ok(false);
        }
        let header = storage::decode(&payload).expect("BUG: we just encoded it");
        let next = self.journal.range().next();
        self.apply_remote_batch(next, vec![(header, payload)])?;
        Ok(true)
    }

    /// Drops the overlay after a failed server step and shows SQLite the committed change
    /// counter again. SQLite last wrote a higher one (every write transaction bumps it), so it
    /// still notices the change, and the server's stored pages stay exactly those a replay
    /// produces.
    pub fn rollback_failed_step(&mut self) -> Result<(), StoreError> {
        self.overlay.clear();
        self.overlay_page_count = self.page_count;
        self.reported_counter = self.committed_counter()?;
        Ok(())
    }

    /// Appends consecutive entries received from the server, starting at `first`, without a
    /// durability barrier (`sync` makes them durable: a replica's copy of the server's entries
    /// can be downloaded again, so a power cut may lose the newest, whole and from the end);
    /// each comes with its decoded header. The overlay must
    /// have been discarded first. Entries past this store's end are taken when they start with
    /// the first part of a checkpoint: the store restarts there (`is_restarting`).
    pub fn apply_remote_batch<P: AsRef<[u8]>>(
        &mut self,
        first: Lsn,
        entries: Vec<(storage::EntryHeader, P)>,
    ) -> Result<(), StoreError> {
        assert!(!self.has_overlay(), "BUG: discard the overlay before applying remote pages");
        // What SQLite may have parsed: the committed schema, unless the store had no base (a
        // restart's parts and the steps between them make no whole state to parse).
        let schema_before = match self.reported_schema {
            Some(_) if self.has_base => Some(Some(self.committed_schema()?)),
            Some(_) => Some(None),
            None => None,
        };
        let expected = self.journal.range().next();
        let restarts = entries.first().is_some_and(|(h, _)| h.checkpoint.is_some_and(|p| p.index == 1));
        if first > expected && restarts {
            self.restart_at(first)?;
        } else if first != expected {
            return Err(StoreError::OutOfOrder { expected, got: first });
        }
        let payloads: Vec<&[u8]> = entries.iter().map(|(_, p)| p.as_ref()).collect();
        let range = self.journal_mut()?.append_batch_unsynced(&payloads)?;
        for (lsn, (header, payload)) in range.iter().zip(entries) {
            self.index_entry(lsn, header, payload.as_ref().len());
        }
        self.overlay_page_count = self.page_count;
        // The pages changed: nothing may fail from here on (a cookie that cannot be read
        // counts as moved).
        let schema = match schema_before {
            Some(before) => {
                restarts
                    || !self.has_base
                    || self.committed_schema().map_or(true, |after| before != Some(after))
            }
            None => false,
        };
        self.bump_reported(schema);
        Ok(())
    }

    /// Forgets every page and entry; the journal continues at `first`, where a checkpoint
    /// starts.
    fn restart_at(&mut self, first: Lsn) -> Result<(), StoreError> {
        self.journal_mut()?.remove_prefix(first.prev().expect("BUG: past the end of a journal is > 1"))?;
        self.run = None;
        self.index.clear();
        self.cache.clear();
        self.page_count = 0;
        self.overlay_page_count = 0;
        self.arriving.clear();
        self.arriving_cuts.clear();
        self.checkpoints.clear();
        self.bytes_since_checkpoint = 0;
        self.has_base = false;
        Ok(())
    }

    /// Drops the committed pages cached in memory (they are read again from the journal).
    pub fn clear_cache(&mut self) {
        self.cache.clear();
        self.run = None;
    }

    /// True while this replica, restarted at a checkpoint, waits for the checkpoint's last
    /// part: it holds no state to read.
    pub fn is_restarting(&self) -> bool {
        !self.has_base
    }

    /// Complete checkpoints in the journal, oldest first.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// The latest time an entry of this journal was stamped with (of those read since it was
    /// opened, and every one appended since): a server stamps its next step no earlier.
    pub fn newest_time_ms(&self) -> Option<i64> {
        self.newest_time_ms
    }

    /// Payload bytes appended since the newest complete checkpoint (or the journal's start).
    pub fn bytes_since_checkpoint(&self) -> u64 {
        self.bytes_since_checkpoint
    }

    /// Appends a checkpoint: every committed page again, in parts of [`CHECKPOINT_PART_PAGES`],
    /// each durable before the next. It changes no page. `each` gets every part as committed
    /// (its delta form is all zeros). The overlay must be empty.
    pub fn write_checkpoint(&mut self, time_ms: i64, each: impl FnMut(Committed)) -> Result<(), StoreError> {
        let count = checkpoint_part_count(self.page_count);
        self.write_checkpoint_parts(self.page_count, 1..=count, time_ms, each)
    }

    /// Appends parts `indexes` of a checkpoint begun when the document had `start_pages`
    /// pages (its part count and each part's pages follow from that), each holding its pages
    /// as they are now; steps may come between calls (see the module docs). A page past the
    /// current end is left out: the step that cut the file shorter is in the history.
    pub fn write_checkpoint_parts(
        &mut self,
        start_pages: u32,
        indexes: std::ops::RangeInclusive<u32>,
        time_ms: i64,
        mut each: impl FnMut(Committed),
    ) -> Result<(), StoreError> {
        let count = checkpoint_part_count(start_pages);
        for index in indexes {
            let range = part_pages(start_pages, index);
            let pages = *range.start()..=(*range.end()).min(self.page_count);
            let part = storage::Part { index, count };
            let (payload, pages) = self.checkpoint_part(part, pages, time_ms)?;
            let lsn = self.journal_mut()?.append(&payload)?;
            let header = storage::decode(&payload).expect("BUG: we just encoded it");
            let olds: Vec<&Page> = pages.iter().map(|p| &**p).collect();
            let delta = crate::wire::xor_pages(&header, payload.clone(), &olds);
            self.index_entry(lsn, header, payload.len());
            each(Committed { lsn, payload, delta });
        }
        Ok(())
    }

    /// Appends a checkpoint of this store's committed pages to another journal (a restore
    /// writing a document's state at one point into a new journal, or after the newest entry
    /// of its own). Returns the entries written. The overlay must be empty.
    pub fn copy_checkpoint_to(
        &mut self,
        journal: &mut dyn Journal,
        time_ms: i64,
    ) -> Result<LsnRange, StoreError> {
        let first = journal.range().next();
        let mut parts = 0;
        for (part, pages) in checkpoint_parts(self.page_count) {
            journal.append(&self.checkpoint_part(part, pages, time_ms)?.0)?;
            parts += 1;
        }
        Ok(LsnRange::from_count(first, parts))
    }

    /// One part of a checkpoint of the committed pages: its payload, and the pages in it.
    fn checkpoint_part(
        &mut self,
        part: storage::Part,
        pages: std::ops::RangeInclusive<u32>,
        time_ms: i64,
    ) -> Result<(Vec<u8>, Vec<Arc<Page>>), StoreError> {
        assert!(!self.has_overlay(), "BUG: a checkpoint is of committed pages");
        let (idxs, pages): (Vec<PageIdx>, Vec<Arc<Page>>) = pages
            .map(|i| {
                let idx = PageIdx::new(i).expect("BUG: i >= 1");
                Ok((idx, self.committed_page(idx)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?
            .into_iter()
            .unzip();
        let refs: Vec<(PageIdx, &Page)> = idxs.into_iter().zip(pages.iter().map(|p| &**p)).collect();
        Ok((storage::encode(self.page_count, time_ms, Some(part), &[], &[], &refs), pages))
    }

    /// Removes every entry before `checkpoint` (one of `checkpoints()`), which holds every
    /// page as of its last part; the state does not change.
    /// The checkpoint is made durable first.
    pub fn trim_to(&mut self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        let Some(up_to) = checkpoint.first.prev() else { return Ok(()) };
        self.journal_mut()?.sync()?;
        for (i, loc) in self.index.iter().enumerate() {
            if let Some(loc) = loc.filter(|l| l.lsn < checkpoint.first) {
                let (first, page) = (checkpoint.first, i as u32 + 1);
                return Err(StoreError::TrimWouldLosePages { first, page, lsn: loc.lsn });
            }
        }
        self.journal_mut()?.remove_prefix(up_to)?;
        self.checkpoints.retain(|c| c.first >= checkpoint.first);
        Ok(())
    }

    /// The committed database as a plain SQLite file: every committed page, in order. Page 1
    /// carries the true header, so any SQLite opens it.
    pub fn export(&mut self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::with_capacity(self.page_count as usize * PAGE_SIZE);
        for i in 1..=self.page_count {
            out.extend_from_slice(&self.committed_page(PageIdx::new(i).expect("BUG: i >= 1"))?[..]);
        }
        Ok(out)
    }

    /// Every committed page, for comparing replicas byte for byte.
    pub fn committed_pages(&mut self) -> Result<Vec<Page>, StoreError> {
        (1..=self.page_count)
            .map(|i| Ok(*self.committed_page(PageIdx::new(i).expect("BUG: i >= 1"))?))
            .collect()
    }
}
