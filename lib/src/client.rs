//! `ClientDocument`: one client's replica of a document.
//!
//! State = the server's pages (a local copy of the storage journal, same LSNs) + an optimistic
//! overlay made by re-running the pending mutations of this client's timeline on top.
//!
//! - `mutate` runs a mutation on the optimistic state at once and appends it to the timeline
//!   journal; it is durable (never lost) when `mutate` returns.
//! - `receive_storage` rebases: drop the overlay, apply the server's entries, drop the timeline
//!   prefix the server applied, re-run the rest. Its cost depends on the pending mutations and
//!   the new entries, not on the length of the history.
//! - The state of each mutation (pending, confirmed, rejected with the server's message) is read
//!   from the replicated `_pagesync_timelines` and `_pagesync_rejections` tables. Rejections are
//!   copied into the replica's own outcome journal as they arrive (`outcomes_through`, told to
//!   the server in `StorageAck`), so the server may then delete them from the shared table and
//!   the table stays bounded however many mutations are rejected.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use pagesync_journal::{DetachedSync, Journal, Lsn, LsnRange};

use crate::db::Database;
use crate::error::{Error, Result};
use crate::ids::{TimelineId, TimelineKey};
use crate::mutation::{Mutation, SqlMutation, Value, migration_key};
use crate::page::{Page, PageIdx, ZERO_PAGE};
use crate::reducer::{Reducer, Rejection, RejectionCode, SqlReducer, apply_mutation, once_applied};
use crate::storage::{Applied, EntryHeader};
use crate::store::{PageStore, StoreError};
use crate::wire::{Confirm, Payload, WireEntry, WireKind};

/// A page as of the newest of `staged` (entries resolved but not yet in the store), or `None`
/// when none of them decides it: walking newest first, an entry that holds the page gives it,
/// and one whose file ends before the page means the page is gone (zeros).
fn staged_version(staged: &[(EntryHeader, Payload)], idx: PageIdx) -> Option<Arc<Page>> {
    for (header, bytes) in staged.iter().rev() {
        if let Some(i) = header.pages.iter().position(|p| *p == idx) {
            let at = header.page_offset(i);
            let page: Page = bytes[at..at + crate::page::PAGE_SIZE].try_into().expect("BUG: a whole page");
            return Some(Arc::new(page));
        }
        if idx.get() > header.page_count {
            return Some(Arc::new(ZERO_PAGE));
        }
    }
    None
}

/// Trims a replica's storage journal to its newest checkpoint (everything before it is history
/// a replica does not need); nothing when it already starts there.
fn trim_history(store: &mut crate::store::PageStore) -> Result<()> {
    let first_held = store.journal().range().first();
    if let Some(cp) = store.checkpoints().last().copied().filter(|c| c.first > first_held) {
        store.trim_to(cp)?;
    }
    Ok(())
}

/// Refused statements can never apply anywhere: the caller says so at once and keeps nothing.
fn refusal(local: &std::result::Result<(), Rejection>) -> Option<Error> {
    let r = local.as_ref().err().filter(|r| r.code == RejectionCode::Refused)?;
    Some(Error::Refused(r.message.clone()))
}

/// Where a mutation stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MutationState {
    /// Not applied by the server yet (as far as this client has heard).
    Pending,
    /// Applied by the server.
    Confirmed,
    /// Applied by the server as a rejection: it changed nothing.
    Rejected(Rejection),
}

/// The server's decisions on one client's mutations: how many applied as they were, and the
/// rejected ones with the server's reasons. The rest are pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcomes {
    pub confirmed: u64,
    pub rejected: Vec<(Lsn, Rejection)>,
}

/// What a local `mutate` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The mutation's LSN in this client's timeline: its id.
    pub lsn: Lsn,
    /// How it went on the optimistic local state. The server decides; a local failure usually
    /// means the server will reject it too, with the same message.
    pub local: Result<(), Rejection>,
}

/// Query results: column names and rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

/// Applied timeline entries kept before the journal is trimmed: 1,024 single-row mutations are
/// about 100 KB of disk, and trimming that rarely saves the fsyncs of a trim per confirmation.
pub const TIMELINE_TRIM_ENTRIES: u64 = 1_024;

pub struct ClientDocument<R: Reducer = SqlReducer> {
    db: Database,
    reducer: R,
    timeline_id: TimelineId,
    /// The secret the timeline's id derives from, sent when subscribing: without it the server
    /// takes none of this timeline's mutations (see `TimelineKey`).
    timeline_key: Option<TimelineKey>,
    timeline: Box<dyn Journal>,
    /// Decoded copy of the timeline's entries (all pending).
    pending: VecDeque<(Lsn, Mutation)>,
    /// The highest LSN of ours the server has applied.
    applied: Option<Lsn>,
    /// Restarts at a checkpoint since this replica was opened.
    restarts: u64,
    /// The stored state changed and the rebase on top of it failed part-way: the next
    /// `receive_*` finishes it.
    rebase_due: bool,
    /// Inside `receive_wire_held`: a rebase settles what the server applied and leaves the
    /// re-run of the pending mutations (and `rebase_due`) to its caller.
    defer_replay: bool,
    /// A newer checkpoint arrived while the storage journal held entries not yet durable: the
    /// history before it goes at the next `trim_if_due` (`sync_storage`, and the session's
    /// `handle_timeout`).
    trim_due: bool,
    durability: Durability,
    /// Timeline entries before this are durable. Only those are sent to the server, unless
    /// the sent mark covers them (`send_before_durable`): a mutation the server applied is
    /// never one whose LSN a later write of this replica could take.
    synced_next: Lsn,
    /// The durable bound on the LSNs sent before they were durable (`send_before_durable`):
    /// a journal of its own, whose newest entry is the bound.
    sent_mark: Option<Box<dyn Journal>>,
    /// What `sent_mark` says: entries up to here may be sent before they are durable.
    send_ahead: Option<Lsn>,
    /// Set while `mutate_group_deferred` runs: a `Full` write's barrier is the caller's,
    /// right after it sent the write.
    defer_barrier: bool,
    /// While a group commit's barrier runs detached (`detach_barrier`): the timeline's end
    /// when it was taken, which its writes must still be below when it ends.
    detached_next: Option<Lsn>,
    /// The next LSN this replica gives a write: past the timeline's end when a failed
    /// barrier took entries back that may have been sent (the mark then stays where it is).
    assigned_next: Lsn,
    /// The durable copy of the server's rejections of this timeline's mutations: one entry
    /// per batch of them, as they arrive.
    outcomes: Box<dyn Journal>,
    /// What `outcomes` holds.
    rejected: BTreeMap<Lsn, Rejection>,
    /// Every rejection at or below this LSN is in `rejected`, durably: the server may forget
    /// them.
    outcomes_through: Option<Lsn>,
    confirms: ConfirmStats,
    /// The last replay of a confirmation was stopped at this client's CPU bound
    /// (`CLIENT_MUTATION_CPU`), not rejected for what it does.
    replay_stopped: bool,
    /// The server's mutator definitions, as last sent (`set_mutators`).
    mutators: Option<std::sync::Arc<crate::mutators::Mutators>>,
}

/// How a replica fared with confirmations by digest (`ClientDocument::receive_confirm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfirmStats {
    /// Entries kept from confirmations: their pages never crossed the wire.
    pub kept: u64,
    /// Of those, kept from the optimistic state as it was (no replay).
    pub kept_as_is: u64,
    /// Of those, kept from the pages the local commits of the confirmed mutations left, while
    /// later ones were pending (no replay).
    pub kept_from_commits: u64,
    /// Confirmations whose replay gave other pages than the server's: a determinism failure
    /// (or a budget lower than the server's). Each fell back to the pages.
    pub mismatches: u64,
    /// Pending mutations run again on newer stored state, by rebases and by the replays of
    /// confirmations: what writing ahead of the server costs this replica.
    pub replayed: u64,
}

/// The most pending mutations a replay runs in a transaction each (`replay_pending`); more run
/// in one. A client that writes ahead of the server's confirmations has a few pending at each
/// rebase, and their commits are then recorded for the confirmations that follow; a backlog
/// (a client that was offline) runs as one transaction, the cheapest.
const REPLAY_COMMIT_EACH: usize = 64;

/// Why a write with an empty body is refused: that body marks a fill (`Mutation::fill`).
fn empty_body() -> Error {
    Error::Refused("an empty mutation body is reserved (it marks a fill after a crash)".into())
}

/// The LSN a sent-mark entry holds.
fn decode_mark(entry: &[u8]) -> Result<Lsn> {
    let bytes: [u8; 8] = entry.try_into().map_err(|_| Error::Malformed("a sent mark is 8 bytes".into()))?;
    Lsn::new(u64::from_le_bytes(bytes)).ok_or_else(|| Error::Malformed("a sent mark of LSN 0".into()))
}

/// The LSN before the sent mark's newest entry, once the mark holds `SENT_MARK_ENTRIES`.
fn bound_to_trim(mark: &dyn Journal) -> Option<Lsn> {
    let range = mark.range();
    (range.len() >= SENT_MARK_ENTRIES).then(|| range.last().and_then(Lsn::prev)).flatten()
}

/// One entry of the outcome journal: rejections as (LSN, code, message).
#[derive(serde::Serialize, serde::Deserialize)]
struct OutcomeRecord {
    rejected: Vec<(u64, String, String)>,
}

/// When a local write is durable, like SQLite's `synchronous`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// A write is durable when `mutate` returns: it survives a power cut. The default.
    #[default]
    Full,
    /// A write is durable at the next `sync_timeline`, which the driver calls before it sends
    /// mutations up and at least every `NORMAL_SYNC_MS`. A power cut may lose the writes of
    /// that interval (whole, the newest first), never corrupts the replica, and never loses a
    /// write the server confirmed: nothing is sent up before it is durable.
    Normal,
}

/// Under `Durability::Normal`, the longest a local write stays not durable.
pub const NORMAL_SYNC_MS: i64 = 100;

/// How far past its newest write a replica that sends before durable records that it may
/// have sent (`ClientDocument::send_before_durable`): one durable append to the sent mark per
/// this many writes, and after a crash at most this many fills (plus one group's writes).
pub const SEND_AHEAD_LSNS: u64 = 128;

/// Sent-mark entries kept before the older ones are trimmed (only the newest counts).
const SENT_MARK_ENTRIES: u64 = 64;

/// Fills appended per batch when a replica reopens after a crash (bounded memory).
const FILLS_PER_BATCH: u64 = 4_096;

impl<R: Reducer> std::fmt::Debug for ClientDocument<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientDocument")
            .field("timeline", &self.timeline_id)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ClientDocument<SqlReducer> {
    /// Opens a replica whose outcome journal is in memory: for replicas whose other journals
    /// are in memory too. A replica on disk uses `open_with_outcomes`, or the outcomes of
    /// mutations the server rejected and then forgot are lost on a restart.
    pub fn open(storage: Box<dyn Journal>, timeline: Box<dyn Journal>) -> Result<Self> {
        let outcomes = Box::new(pagesync_journal::MemoryJournal::new(timeline.id()));
        Self::with_reducer(storage, timeline, outcomes, SqlReducer::default())
    }

    /// Opens a replica from its three journals: the storage (the server's entries), the
    /// timeline (its mutations) and its outcomes (the server's rejections of them).
    pub fn open_with_outcomes(
        storage: Box<dyn Journal>,
        timeline: Box<dyn Journal>,
        outcomes: Box<dyn Journal>,
    ) -> Result<Self> {
        Self::with_reducer(storage, timeline, outcomes, SqlReducer::default())
    }
}

impl<R: Reducer> ClientDocument<R> {
    /// Opens the replica from its journals; pending mutations are re-run at once.
    pub fn with_reducer(
        storage: Box<dyn Journal>,
        timeline: Box<dyn Journal>,
        outcomes: Box<dyn Journal>,
        reducer: R,
    ) -> Result<Self> {
        let mut store = PageStore::open(storage)?;
        store.enable_schema_epochs()?;
        store.track_local_commits();
        // Reading ahead saves system calls; from a mapped journal it would only add a copy.
        let read_ahead = !store.journal().reads_from_memory();
        store.set_read_ahead(read_ahead);
        let mut db = Database::open(store, crate::db::ConnMemory::Fast)?;
        db.set_cpu_limit(Some(crate::sandbox::CLIENT_MUTATION_CPU));
        db.meter_memory(crate::sandbox::CLIENT_MEMORY_TIMES);
        let timeline_id = TimelineId(*timeline.id().as_bytes());
        let mut doc = ClientDocument {
            db,
            reducer,
            timeline_id,
            timeline_key: None,
            timeline,
            pending: VecDeque::new(),
            applied: None,
            restarts: 0,
            rebase_due: false,
            defer_replay: false,
            trim_due: false,
            durability: Durability::Full,
            synced_next: Lsn::FIRST,
            sent_mark: None,
            send_ahead: None,
            defer_barrier: false,
            detached_next: None,
            assigned_next: Lsn::FIRST,
            outcomes,
            rejected: BTreeMap::new(),
            outcomes_through: None,
            confirms: ConfirmStats::default(),
            mutators: None,
            replay_stopped: false,
        };
        doc.synced_next = doc.timeline.range().next();
        doc.assigned_next = doc.synced_next;
        doc.read_outcomes()?;
        doc.applied = doc.read_applied()?;
        doc.copy_outcomes()?;
        doc.trim_timeline(true)?;
        let range = doc.pending_range();
        for (lsn, bytes) in range.iter().zip(doc.timeline.read_range(range)?) {
            doc.pending.push_back((lsn, Mutation::decode(&bytes)?));
        }
        if !doc.db.store().is_restarting() {
            doc.replay_pending()?;
        }
        Ok(doc)
    }

    pub fn timeline_id(&self) -> TimelineId {
        self.timeline_id
    }

    /// Sets the key of this replica's timeline (its journal's id must be `key.id()`), which the
    /// sync session sends when it subscribes. A replica without one can read and write
    /// locally, but the server refuses its subscription.
    pub fn set_timeline_key(&mut self, key: TimelineKey) -> Result<()> {
        if key.id() != self.timeline_id {
            return Err(Error::WrongTimelineKey { opens: key.id(), timeline: self.timeline_id });
        }
        self.timeline_key = Some(key);
        Ok(())
    }

    /// The timeline's key, when set (`set_timeline_key`).
    pub fn timeline_key(&self) -> Option<TimelineKey> {
        self.timeline_key
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The storage LSNs this replica holds: what to tell the server in `Subscribe`. A replica
    /// restarted at a checkpoint that holds none of its parts yet (their append failed) holds
    /// nothing it could apply a delta to, so it says it holds nothing: the server then sends
    /// it the newest checkpoint whole.
    pub fn storage_range(&self) -> LsnRange {
        let store = self.db.store();
        let range = store.journal().range();
        if store.is_restarting() && range.is_empty() { LsnRange::new_empty() } else { range }
    }

    /// When local writes are durable (`Durability::Full` unless set).
    pub fn set_durability(&mut self, durability: Durability) -> Result<()> {
        if durability == Durability::Full {
            self.sync_timeline()?;
        }
        self.durability = durability;
        Ok(())
    }

    /// Makes every local write durable (one fsync for all of them): a no-op under `Full`.
    pub fn sync_timeline(&mut self) -> Result<()> {
        if self.needs_sync() {
            self.timeline.sync()?;
            self.synced_next = self.timeline.range().next();
        }
        Ok(())
    }

    /// Makes the server's entries this replica received durable (one fsync for all of them).
    /// They arrive without a barrier each: the server holds them, so a power cut that takes
    /// the newest back only means downloading them again. The native client calls this every
    /// second (`STORAGE_SYNC`) and when it closes, and the replica before it trims its
    /// timeline. It also takes a checkpoint trim that was put off (`trim_if_due`).
    pub fn sync_storage(&mut self) -> Result<()> {
        self.db.store().sync()?;
        self.trim_if_due()
    }

    /// `sync_storage` in two halves, so that its wait holds nothing: the barrier for what was
    /// received so far (`Journal::detach_sync`; `None` when nothing waits, or when the
    /// backend made it durable here), to `run` anywhere and hand back to
    /// `finish_storage_sync`.
    pub fn detach_storage_sync(&mut self) -> Result<Option<DetachedSync>> {
        let detached = self.db.store().detach_sync()?;
        if detached.is_none() {
            self.trim_if_due()?;
        }
        Ok(detached)
    }

    /// The outcome of a barrier from `detach_storage_sync`, then a trim if one waits (which
    /// syncs only what was received meanwhile).
    pub fn finish_storage_sync(&mut self, sync: DetachedSync, outcome: std::io::Result<()>) -> Result<()> {
        self.db.store().finish_detached_sync(sync, outcome)?;
        self.trim_if_due()
    }

    /// Drops the history a newer checkpoint made unneeded, if a trim was put off (`trim_due`):
    /// the trim makes the entries after the checkpoint durable first, one fsync of everything
    /// downloaded since the last, so it runs from timers (`ClientSession::handle_timeout`,
    /// `sync_storage`), not in the middle of applying a download.
    pub fn trim_if_due(&mut self) -> Result<()> {
        if self.trim_due {
            trim_history(&mut self.db.store())?;
            self.trim_due = false;
        }
        Ok(())
    }

    /// Whether local writes wait for `sync_timeline` to be durable.
    pub fn needs_sync(&self) -> bool {
        self.synced_next < self.timeline.range().next()
    }

    /// The pending entries that may be sent up: the durable ones, and under `Durability::Full`
    /// those the sent mark covers (under `Normal` none goes up before it is durable, whatever
    /// a mark raised before a switch to it covers).
    pub fn sendable_range(&self) -> LsnRange {
        let pending = self.pending_range();
        let covered = match self.durability {
            Durability::Full => {
                self.send_ahead.map_or(Lsn::FIRST, Lsn::next).min(self.timeline.range().next())
            }
            Durability::Normal => Lsn::FIRST,
        };
        let next = self.synced_next.max(covered).clamp(pending.first(), pending.next());
        LsnRange::from_count(pending.first(), next.get() - pending.first().get())
    }

    /// Appends to the timeline, durably unless `Durability::Normal` or a deferred barrier
    /// (`mutate_group_deferred`). Entries whose barrier is deferred are covered by the sent mark
    /// if the replica has one (they may go up while it runs); `Normal` ones are not: they go
    /// up once durable, and their writer never waits for the mark's fsync.
    fn append_timeline(&mut self, entries: &[&[u8]]) -> Result<LsnRange> {
        let barrier = self.durability == Durability::Full && !self.defer_barrier;
        let range = match barrier {
            true => self.timeline.append_batch(entries)?,
            false => self.timeline.append_batch_unsynced(entries)?,
        };
        self.assigned_next = self.assigned_next.max(range.next());
        if barrier {
            // Entries are durable in order: those before it are now durable too.
            self.synced_next = range.next();
        } else if self.durability == Durability::Full {
            self.cover_sends();
        }
        Ok(range)
    }

    /// Lets this replica's writes be sent before they are durable: under `Durability::Full`,
    /// a group commit's writes go up at once, and its barrier (`ClientSession::
    /// mutate_group_sending`, or `mutate_group_detached` with the fsync run by its caller)
    /// runs while they travel, so a write reaches the server one fsync sooner. `Normal` writes
    /// go up once durable, as without a mark. `mark` is a journal of its own, named after the
    /// timeline, whose newest entry (an LSN, 8 bytes little-endian) bounds every entry sent so
    /// far; it is made durable before an entry past the old bound goes (`SEND_AHEAD_LSNS` at a
    /// time).
    ///
    /// A crash can take back timeline entries the server may hold. Opening with the mark fills
    /// the LSNs between the timeline's end and the bound with `Mutation::fill`s, durably, before
    /// anything is sent or written: no later write takes an LSN the server may have applied
    /// (it would take the later one for a copy of the first, and drop it). The server keeps
    /// what it received there; those writes were never acknowledged (their barrier did not
    /// return) and their effects arrive with the server's pages. Returns how many LSNs it filled.
    pub fn send_before_durable(&mut self, mark: Box<dyn Journal>) -> Result<u64> {
        let bound = match mark.range().last() {
            Some(last) => Some(decode_mark(&mark.read(last)?)?),
            None => None,
        };
        let mut filled = 0;
        if let Some(bound) = bound {
            let fill = Mutation::fill().encode()?;
            while self.timeline.range().next() <= bound {
                let left = bound.get() - self.timeline.range().next().get() + 1;
                let batch = vec![fill.as_slice(); left.min(FILLS_PER_BATCH) as usize];
                let range = self.timeline.append_batch_unsynced(&batch)?;
                let applied = self.applied;
                let fills = range.iter().filter(|lsn| applied.is_none_or(|a| *lsn > a));
                self.pending.extend(fills.map(|lsn| (lsn, Mutation::fill())));
                filled += range.len();
            }
            self.timeline.sync()?;
            self.synced_next = self.timeline.range().next();
            self.assigned_next = self.synced_next;
        }
        self.send_ahead = bound;
        self.sent_mark = Some(mark);
        Ok(filled)
    }

    /// Whether writes may be sent before they are durable (`send_before_durable`).
    pub fn sends_before_durable(&self) -> bool {
        self.sent_mark.is_some()
    }

    /// Makes the sent mark cover the timeline's newest entry and `SEND_AHEAD_LSNS` more, once
    /// the newest is past it: durably, before any of them is sent. If the mark cannot be
    /// written, nothing more is covered, and entries past it go once durable, as without one.
    fn cover_sends(&mut self) {
        let Some(mark) = self.sent_mark.as_mut() else { return };
        let Some(last) = self.timeline.range().last() else { return };
        if self.send_ahead.is_some_and(|bound| bound >= last) {
            return;
        }
        let bound = Lsn::new(last.get().saturating_add(SEND_AHEAD_LSNS)).expect("BUG: past a valid LSN");
        if mark.append(&bound.get().to_le_bytes()).is_ok() {
            self.send_ahead = Some(bound);
            if let Some(before) = bound_to_trim(&**mark) {
                let _ = mark.remove_prefix(before);
            }
        }
    }

    /// Lowers the sent mark to the timeline's newest entry, once every entry is durable: for a
    /// clean close, after which a reopen fills nothing. A no-op without a mark, and when the
    /// timeline lost entries that may have been sent (a failed barrier cut them): the mark
    /// stays, and the next open fills them.
    pub fn settle_sent_mark(&mut self) -> Result<()> {
        if self.sent_mark.is_none() {
            return Ok(());
        }
        self.sync_timeline()?;
        if self.timeline.range().next() != self.assigned_next || !self.timeline.is_synced() {
            return Ok(());
        }
        let newest = self.assigned_next.prev();
        let Some(mark) = self.sent_mark.as_mut() else { return Ok(()) };
        if let Some(newest) = newest.filter(|n| self.send_ahead.is_some_and(|bound| bound > *n)) {
            mark.append(&newest.get().to_le_bytes())?;
            self.send_ahead = Some(newest);
        }
        Ok(())
    }

    /// The timeline entries not yet applied by the server: what to send up.
    pub fn pending_range(&self) -> LsnRange {
        let range = self.timeline.range();
        self.applied.map_or(range, |a| range.trim_prefix(a))
    }

    /// Drops the applied prefix of the timeline journal, but only once it is
    /// `TIMELINE_TRIM_ENTRIES` long (or `always`): a trim rewrites the journal's marker and
    /// deletes or starts segments, several fsyncs, which a write-confirm round trip paid each
    /// time when the timeline emptied on every confirmation. Entries at or below the applied
    /// LSN are never sent or re-run, trimmed or not (`pending_range`, `open`).
    fn trim_timeline(&mut self, always: bool) -> Result<()> {
        let Some(a) = self.applied else { return Ok(()) };
        let range = self.timeline.range();
        let done = range.intersect(&LsnRange::inclusive(Lsn::FIRST, a)).len();
        if done > 0 && (always || done >= TIMELINE_TRIM_ENTRIES) {
            // The entries that say these were applied go first: a power cut must not leave
            // the mutations gone and the state from before they applied.
            self.db.store().sync()?;
            self.timeline.remove_prefix(a)?;
        }
        Ok(())
    }

    pub fn read_pending(&self, range: LsnRange) -> Result<Vec<Vec<u8>>> {
        Ok(self.timeline.read_range(range)?)
    }

    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// Refuses reads and writes while the replica downloads a checkpoint: it has no state.
    fn check_not_restarting(&self) -> Result<()> {
        if self.db.store().is_restarting() { Err(Error::Restarting) } else { Ok(()) }
    }

    /// Whether the replica has no state yet: it holds no storage, or restarts at a checkpoint
    /// whose last part has not arrived. One look at the store.
    pub fn lacks_state(&self) -> bool {
        let store = self.db.store();
        store.is_restarting() || store.journal().range().next() == Lsn::FIRST
    }

    /// True while the replica downloads a checkpoint after falling behind the server's
    /// history; `query` and `mutate` fail with `Error::Restarting` until it is complete.
    pub fn is_restarting(&self) -> bool {
        self.db.store().is_restarting()
    }

    /// How often this replica restarted at a checkpoint since it was opened.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// Reads the applied LSN of this timeline from the replicated system table.
    fn read_applied(&self) -> Result<Option<Lsn>> {
        let conn = self.db.conn();
        if !crate::db::table_exists(conn, "_pagesync_timelines")? {
            return Ok(None);
        }
        let lsn: Option<i64> = conn
            .prepare_cached("SELECT applied_lsn FROM _pagesync_timelines WHERE timeline = ?1")?
            .query_row([&self.timeline_id.0[..]], |r| r.get(0))
            .map(Some)
            .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?;
        Ok(lsn.and_then(|l| Lsn::new(l as u64)))
    }

    /// Runs a mutation locally, at once, and appends it durably to the timeline. `time_ms` and
    /// `seed` come from the caller (the core reads no clock and no randomness).
    pub fn mutate(&mut self, body: Vec<u8>, time_ms: i64, seed: u64) -> Result<Submitted> {
        self.check_not_restarting()?;
        if body.is_empty() {
            return Err(empty_body());
        }
        let mutation = Mutation { client_time_ms: time_ms, seed, body };
        let bytes = mutation.encode()?;
        let conn = self.db.conn();
        crate::db::run_cached(conn, "BEGIN IMMEDIATE")?;
        let local = match apply_mutation(&self.db, &mut self.reducer, &mutation, time_ms) {
            Ok(local) => local,
            Err(Error::TransactionLost(r)) => {
                // Its own statement rolled the local transaction back: nothing of it stays
                // locally, and the server will decide (and most likely reject it the same way).
                let lsn = self.append_timeline(&[&bytes])?.first();
                self.pending.push_back((lsn, mutation));
                return Ok(Submitted { lsn, local: Err(r) });
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        if let Some(e) = refusal(&local) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        let lsn = match self.append_timeline(&[&bytes]) {
            Ok(range) => range.first(),
            Err(e) => {
                let _ = self.db.conn().execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        crate::db::run_cached(self.db.conn(), "COMMIT").map_err(|e| self.db.explain(e))?;
        self.db.store().mark_local_commit(lsn);
        self.pending.push_back((lsn, mutation));
        Ok(Submitted { lsn, local })
    }

    /// Group commit: runs several mutations locally in one transaction, each in its own
    /// savepoint as `mutate` runs one, and appends them to the timeline with one durability
    /// barrier. Each stays its own mutation, confirmed or rejected on its own; the seeds are
    /// `seed, seed + 1, ...`. A statement the authorizer refuses fails the call and nothing is
    /// kept. In the rare case a mutation ends the local transaction itself, they are submitted
    /// one by one with `mutate` instead.
    pub fn mutate_many(&mut self, bodies: Vec<Vec<u8>>, time_ms: i64, seed: u64) -> Result<Vec<Submitted>> {
        let mutations = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| Mutation { client_time_ms: time_ms, seed: seed.wrapping_add(i as u64), body })
            .collect();
        self.mutate_together(mutations, true)?.into_iter().collect()
    }

    /// Group commit of independent writers (the client's `execute` calls that arrived while
    /// another was being made durable): each mutation runs locally in its own savepoint, with
    /// its own clock and seed, and all are appended with one durability barrier. Each call
    /// gets its own answer: a refused statement fails only itself. The outer error is one
    /// they share (the timeline could not be written), and then none is kept.
    pub fn mutate_group(&mut self, mutations: Vec<Mutation>) -> Result<Vec<Result<Submitted>>> {
        self.mutate_together(mutations, false)
    }

    /// `mutate_group` without the barrier of `Durability::Full`, for the session, which sends
    /// the mutations (under `Full` the sent mark covers them) and then calls `sync_timeline`
    /// before it answers (`ClientSession::mutate_group_sending`).
    pub(crate) fn mutate_group_deferred(
        &mut self,
        mutations: Vec<Mutation>,
    ) -> Result<Vec<Result<Submitted>>> {
        self.defer_barrier = true;
        let answers = self.mutate_group(mutations);
        self.defer_barrier = false;
        answers
    }

    /// The barrier `mutate_group_deferred` left to its caller: under `Durability::Full`, every
    /// local write durable now; under `Normal`, none (the timer's `sync_timeline` makes them so).
    /// If it fails, the journal keeps only what was durable (and refuses writes until the
    /// replica is reopened), and so does the optimistic state: the writes it lost are gone
    /// from this replica (their callers get the error; the server may still apply those that
    /// were sent, and its pages then bring them back, as after a crash).
    pub(crate) fn deferred_barrier(&mut self) -> Result<()> {
        if self.durability == Durability::Normal {
            return Ok(());
        }
        let synced = self.sync_timeline();
        if synced.is_err() {
            self.forget_undurable();
        }
        synced
    }

    /// After a failed barrier: the journal kept only what was durable, and so does the
    /// optimistic state.
    fn forget_undurable(&mut self) {
        let next = self.timeline.range().next();
        self.pending.retain(|(lsn, _)| *lsn < next);
        self.db.store().discard_overlay();
        self.rebase_due = true;
        let _ = self.rebase();
    }

    /// The barrier `mutate_group_deferred` left, as an fsync to run while nothing is held
    /// (`DetachedSync::run`: the replica takes deliveries and rebases meanwhile), handed back
    /// to `finish_detached_barrier`. `None` when there is nothing to wait for (`Durability::
    /// Normal`, or a backend that made the writes durable here). The writes are not sent
    /// before it ends, unless a sent mark covers them (`sendable_range`).
    pub(crate) fn detach_barrier(&mut self) -> Result<Option<DetachedSync>> {
        if self.durability == Durability::Normal || !self.needs_sync() {
            return Ok(None);
        }
        if self.detached_next.is_some() {
            // Another group's is out: this one's runs here (one detached at a time, so the
            // check `finish_detached_barrier` makes is this group's).
            return self.deferred_barrier().map(|()| None);
        }
        let detached = self.timeline.detach_sync();
        match detached {
            Ok(Some(sync)) => {
                self.detached_next = Some(self.timeline.range().next());
                Ok(Some(sync))
            }
            Ok(None) => {
                self.synced_next = self.timeline.range().next();
                Ok(None)
            }
            Err(e) => {
                self.forget_undurable();
                Err(e.into())
            }
        }
    }

    /// The outcome of `detach_barrier`'s fsync: the writes durable, or, if it failed, gone
    /// from the journal and the optimistic state as `deferred_barrier` says. Whatever the
    /// barrier could not cover (the journal rolled to a new file meanwhile, say) is made
    /// durable here.
    pub(crate) fn finish_detached_barrier(
        &mut self,
        sync: DetachedSync,
        outcome: std::io::Result<()>,
    ) -> Result<()> {
        let covers = self.detached_next.take();
        if let Err(e) = self.timeline.finish_detached_sync(sync, outcome) {
            self.forget_undurable();
            return Err(e.into());
        }
        // Another write's barrier failed meanwhile (an `execute_many`, say): the journal was
        // cut back to what was durable, these writes with it, whatever this fsync did.
        if covers.is_some_and(|next| self.timeline.range().next() < next) {
            self.forget_undurable();
            let journal = self.timeline.id();
            let message =
                "another write's failed fsync cut the journal back before these were durable".into();
            return Err(Error::Journal(pagesync_journal::JournalError::Backend { journal, message }));
        }
        self.deferred_barrier()
    }

    /// Whether a group commit's barrier runs detached now (`detach_barrier`): its caller makes
    /// the writes durable, and answers once they are.
    pub fn barrier_detached(&self) -> bool {
        self.detached_next.is_some()
    }

    /// `mutate_many` (`all_or_nothing`: a refusal fails every one) and `mutate_group` (it fails
    /// only its own).
    fn mutate_together(
        &mut self,
        mutations: Vec<Mutation>,
        all_or_nothing: bool,
    ) -> Result<Vec<Result<Submitted>>> {
        self.check_not_restarting()?;
        if let [_] = &mutations[..] {
            let m = mutations.into_iter().next().expect("BUG: one");
            return Ok(vec![self.mutate(m.body, m.client_time_ms, m.seed)]);
        }
        let encoded = mutations.iter().map(Mutation::encode).collect::<Result<Vec<_>>>()?;
        let conn = self.db.conn();
        crate::db::run_cached(conn, "BEGIN IMMEDIATE")?;
        // Per mutation: how it went locally, or why it is refused (and not appended).
        let mut outcomes = Vec::with_capacity(mutations.len());
        for m in &mutations {
            if m.is_fill() {
                if all_or_nothing {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(empty_body());
                }
                outcomes.push(Err(empty_body()));
                continue;
            }
            match apply_mutation(&self.db, &mut self.reducer, m, m.client_time_ms) {
                Ok(local) => match refusal(&local) {
                    Some(e) if all_or_nothing => {
                        let _ = conn.execute_batch("ROLLBACK");
                        return Err(e);
                    }
                    // Its savepoint was rolled back: the others stand.
                    Some(e) => outcomes.push(Err(e)),
                    None => outcomes.push(Ok(local)),
                },
                Err(Error::TransactionLost(_)) => {
                    // Everything before it was rolled back with it: start over, one by one.
                    let one_by_one =
                        mutations.into_iter().map(|m| self.mutate(m.body, m.client_time_ms, m.seed));
                    return Ok(one_by_one.collect());
                }
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
        let kept: Vec<&[u8]> =
            encoded.iter().zip(&outcomes).filter(|(_, o)| o.is_ok()).map(|(e, _)| e.as_slice()).collect();
        let appended = if kept.is_empty() {
            Ok(LsnRange::empty_at(self.timeline.range().next()))
        } else {
            self.append_timeline(&kept)
        };
        let range = match appended {
            Ok(range) => range,
            Err(e) => {
                let _ = self.db.conn().execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        crate::db::run_cached(self.db.conn(), "COMMIT").map_err(|e| self.db.explain(e))?;
        if let Some(last) = range.last() {
            self.db.store().mark_local_commit(last);
        }
        let mut lsns = range.iter();
        let answers = mutations
            .into_iter()
            .zip(outcomes)
            .map(|(m, outcome)| {
                let local = outcome?;
                let lsn = lsns.next().expect("BUG: one LSN per kept mutation");
                self.pending.push_back((lsn, m));
                Ok(Submitted { lsn, local })
            })
            .collect();
        Ok(answers)
    }

    /// Submits the migrations (version, SQL) that have not applied to this replica yet, in
    /// order, as `once` mutations: each runs exactly once per document, whichever client's copy
    /// reaches the server first; the other copies apply as no-ops. Ship the same list with
    /// every client and call this at startup.
    pub fn migrate(&mut self, migrations: &[(u32, &str)], time_ms: i64, seed: u64) -> Result<Vec<Submitted>> {
        let mut out = Vec::new();
        for (i, (version, sql)) in migrations.iter().enumerate() {
            if once_applied(self.db.conn(), &migration_key(*version))? {
                continue;
            }
            let body = SqlMutation::migration(*version, *sql).encode();
            out.push(self.mutate(body, time_ms, seed.wrapping_add(i as u64))?);
        }
        Ok(out)
    }

    /// Applies storage entries from the server, in LSN order starting at `first`, and rebases
    /// the pending mutations on top. Entries this replica already holds are skipped; a gap is
    /// an error naming the LSN expected.
    pub fn receive_storage(&mut self, first: Lsn, entries: &[Vec<u8>]) -> Result<()> {
        self.receive_with(first, entries.len(), |i, _| Ok(entries[i].clone().into()))
    }

    /// Like `receive_storage`, for entries in wire form (compressed, possibly XOR deltas
    /// against this replica's pages just before each entry). On a journal that appends them
    /// without a barrier (files), the history before a newer checkpoint stays until
    /// `trim_if_due`: a driver calls it from its timer (`ClientSession::handle_timeout` does).
    /// A confirmation (`WireKind::Confirm`) is kept from this replica's own mutations
    /// (`receive_confirm`); one that cannot be kept fails with `Error::ConfirmMismatch` after
    /// the entries before it are applied, and the entry must come again with its pages.
    pub fn receive_wire(&mut self, first: Lsn, entries: Vec<WireEntry>) -> Result<()> {
        let received = self.receive_wire_held(first, entries);
        let rebased = if self.rebase_due { self.rebase() } else { Ok(()) };
        rebased.and(received)
    }

    /// `receive_wire` without the re-run of the pending mutations (`defer_replay`): what the
    /// server applied is settled, and the re-run stays due for the caller (`rebase_if_due`),
    /// which runs it once after every message it handles together.
    pub(crate) fn receive_wire_held(&mut self, first: Lsn, entries: Vec<WireEntry>) -> Result<()> {
        self.defer_replay = true;
        let received = self.receive_wire_deferred(first, entries);
        self.defer_replay = false;
        received
    }

    fn receive_wire_deferred(&mut self, first: Lsn, mut entries: Vec<WireEntry>) -> Result<()> {
        let next = self.storage_range().next();
        if first > next && entries.first().is_some_and(WireEntry::needs_previous) {
            // A delta sent to a subscriber that was further along, whose earlier frames were
            // lost: not a restart (those come whole) but a gap.
            return Err(Error::Gap { expected: next, got: first });
        }
        let mut at = 0;
        while at < entries.len() {
            let lsn = Lsn::new(first.get() + at as u64).expect("BUG: past a valid LSN");
            let rest = &mut entries[at..];
            if let Some(confirm) = rest[0].as_confirm() {
                self.receive_confirm(lsn, confirm?)?;
                at += 1;
                continue;
            }
            let run = rest.iter().position(|e| e.kind == WireKind::Confirm).unwrap_or(rest.len());
            self.receive_with(lsn, run, |i, previous| Ok(rest[i].take().resolve(previous)??))?;
            at += run;
        }
        Ok(())
    }

    /// Keeps storage entry `lsn`, which applied this replica's pending mutations
    /// `confirm.first..=confirm.last()` and no others: makes the state they left (the
    /// optimistic state when they are all that is pending, else the pages their local commits
    /// left, else a replay on the stored state as the server's step ran them: one transaction,
    /// a savepoint each), adds the step's system rows, cuts the entry as the server cut it and
    /// keeps it when the digests match. The pages never crossed the wire. On a mismatch
    /// nothing is kept and the pending mutations are re-run as before.
    pub fn receive_confirm(&mut self, lsn: Lsn, confirm: Confirm) -> Result<()> {
        let next = self.storage_range().next();
        if lsn < next {
            return if self.rebase_due { self.rebase() } else { Ok(()) };
        }
        if lsn > next || self.db.store().is_restarting() {
            return Err(Error::Gap { expected: next, got: lsn });
        }
        let mismatch = |replayed, why: &str| Error::ConfirmMismatch { lsn, replayed, why: why.to_owned() };
        let count = usize::try_from(confirm.more).ok().and_then(|n| n.checked_add(1));
        let ours = count.zip(confirm.last()).filter(|&(n, last)| {
            let expected = self.applied.map_or(Lsn::FIRST, Lsn::next);
            expected == confirm.first && self.pending.get(n - 1).is_some_and(|(l, _)| *l == last)
        });
        let Some((count, last)) = ours else {
            return Err(mismatch(false, "it confirms mutations this replica does not hold pending"));
        };
        if self.pending.iter().take(count).any(|(_, m)| m.is_fill()) {
            // The server applied what it received there, which a crash took from this replica.
            return Err(mismatch(false, "it confirms mutations a crash took from this replica's timeline"));
        }
        // The optimistic state is the stored state plus exactly these mutations when they
        // are all that is pending (and no rebase is due): the step's pages are those plus its
        // system rows. When more are pending, the pages their local commits left make that
        // state (`compose_local_commits`; the step's digest says whether they give its
        // pages). Otherwise they are replayed as the step ran them.
        let all_pending = count == self.pending.len() && !self.rebase_due;
        self.rebase_due = true;
        let composed = !all_pending && self.db.store().compose_local_commits(last);
        let as_is = all_pending || composed;
        let mut kept = if as_is { self.keep_confirmed(&confirm, false, count) } else { Ok(false) };
        if composed && matches!(kept, Err(Error::Sqlite(_))) && !self.db.store().has_last_error() {
            // Commits recorded on an older stored state may not make a whole database on
            // this one (SQLite said it is corrupt, say): the replay below decides. A failure
            // of the storage itself is the caller's, as on every other path.
            kept = Ok(false);
        }
        let no_replay = u64::from(matches!(kept, Ok(true)));
        self.confirms.kept_as_is += no_replay * u64::from(all_pending);
        self.confirms.kept_from_commits += no_replay * u64::from(composed);
        if matches!(kept, Ok(false)) {
            kept = self.keep_confirmed(&confirm, true, count);
        }
        if !matches!(kept, Ok(true)) {
            self.db.store().discard_overlay();
        }
        self.rebase()?;
        match kept? {
            true => {
                self.confirms.kept += 1;
                Ok(())
            }
            // Stopped at this client's own CPU bound, which the server's run stayed within:
            // not a difference in what the mutations do.
            false if std::mem::take(&mut self.replay_stopped) => {
                Err(mismatch(false, "replaying its mutations took longer than this client's CPU bound"))
            }
            false => {
                self.confirms.mismatches += 1;
                Err(mismatch(
                    true,
                    "replaying its mutations did not give the server's pages (non-determinism)",
                ))
            }
        }
    }

    /// Makes the step `confirm` describes over the stored state (`replay`: the first `count`
    /// pending mutations run again, in one transaction; else the overlay as it is, which holds
    /// them already: the optimistic state, or one composed of their local commits), adds its
    /// system rows, and keeps the entry cut from it if its digest is
    /// the server's. Returns whether it was kept.
    fn keep_confirmed(&mut self, confirm: &Confirm, replay: bool, count: usize) -> Result<bool> {
        self.replay_stopped = false;
        let (last_lsn, last_ms) =
            self.pending.get(count - 1).map(|(l, m)| (*l, m.client_time_ms)).expect("BUG: checked");
        if replay {
            self.db.store().discard_overlay_for_replay(last_lsn);
        }
        let conn = self.db.conn();
        crate::db::run_cached(conn, "BEGIN IMMEDIATE")?;
        let mut applied = Vec::with_capacity(count);
        for (lsn, m) in self.pending.iter().take(count) {
            applied.push(Applied { timeline: self.timeline_id, lsn: *lsn, time_ms: m.client_time_ms });
            if !replay {
                continue;
            }
            self.confirms.replayed += 1;
            match apply_mutation(&self.db, &mut self.reducer, m, m.client_time_ms) {
                Ok(Ok(())) => {}
                // The server applied it: a replay that rejects it cannot give its pages.
                Ok(Err(r)) | Err(Error::TransactionLost(r)) => {
                    self.replay_stopped = crate::db::stopped_locally(&r);
                    let _ = conn.execute_batch("ROLLBACK");
                    return Ok(false);
                }
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e);
                }
            }
        }
        let last = BTreeMap::from([(self.timeline_id, last_lsn)]);
        let system = crate::server::delete_rejections(conn, &confirm.forgotten)
            .and_then(|()| crate::server::record_applied(conn, &last))
            .and_then(|()| crate::db::run_cached(conn, "COMMIT"));
        if let Err(e) = system {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(self.db.explain(e));
        }
        let (forgotten, time_ms) = (&confirm.forgotten, confirm.entry_time_ms(last_ms));
        Ok(self.db.store().commit_as_step(&applied, forgotten, time_ms, &confirm.digest)?)
    }

    /// How this replica fared with confirmations by digest since it was opened.
    pub fn confirm_stats(&self) -> ConfirmStats {
        self.confirms
    }

    /// Resolves the new entries (a delta sees the pages of the entries before it in the same
    /// message), appends them all with one durability barrier, then rebases.
    fn receive_with(
        &mut self,
        first: Lsn,
        count: usize,
        mut payload: impl FnMut(
            usize,
            &mut dyn FnMut(PageIdx) -> Result<Arc<Page>, StoreError>,
        ) -> Result<Payload>,
    ) -> Result<()> {
        let next = self.storage_range().next();
        let range = LsnRange::from_count(first, count as u64);
        if range.next() <= next {
            return if self.rebase_due { self.rebase() } else { Ok(()) };
        }
        // Past our end, the batch must start a checkpoint: the replica restarts there.
        let restart = first > next;
        // The overlay goes: the pending work goes back on top, whatever happens below.
        self.rebase_due = true;
        let mut stored = false;
        let outcome = (|| {
            let mut store = self.db.store();
            store.discard_overlay();
            // A restart holds nothing to apply a delta to (the server sends it whole), nor does
            // a replica still waiting for a checkpoint's last part.
            let no_base = restart || store.is_restarting();
            let mut staged: Vec<(EntryHeader, Payload)> = Vec::new();
            for (i, lsn) in range.iter().enumerate().filter(|(_, l)| restart || *l >= next) {
                let mut previous = |idx| match staged_version(&staged, idx) {
                    Some(page) => Ok(page),
                    None if no_base => Err(StoreError::OutOfOrder { expected: next, got: first }),
                    None => store.previous_version(idx),
                };
                let bytes = payload(i, &mut previous)?;
                let header =
                    crate::storage::decode(&bytes).map_err(|source| StoreError::Entry { lsn, source })?;
                if restart && i == 0 && header.checkpoint.is_none_or(|p| p.index != 1) {
                    return Err(Error::Gap { expected: next, got: first });
                }
                staged.push((header, bytes));
            }
            store.apply_remote_batch(if restart { first } else { next }, staged)?;
            stored = true;
            // A replica needs no history: keep the journal from the newest checkpoint on. The
            // trim makes everything after it durable first: with entries appended without a
            // barrier (files), it waits for a timer (`trim_if_due`) instead of flushing a
            // download half-way through.
            if store.journal().is_synced() {
                trim_history(&mut store)?;
            } else {
                self.trim_due = true;
            }
            Ok::<(), Error>(())
        })();
        self.restarts += u64::from(restart && stored);
        self.rebase()?;
        outcome
    }

    /// Drops the pending mutations that the stored state says the server applied, and re-runs
    /// the rest on top. The replicated `_pagesync_timelines` says how far the server got: only
    /// what this replica holds counts (an entry that failed to append comes again), and it
    /// holds also for mutations whose entries are gone behind a checkpoint. Due after every
    /// change to the stored state; one that fails stays due.
    ///
    /// Inside `receive_wire_held` the re-run waits for its caller (`defer_replay`): each
    /// confirmation or run of entries settles what the server applied, and the pending
    /// mutations left run once for all of them (`receive_wire`: per message; the session: per
    /// batch of messages), not once each (a client behind its confirmations would otherwise
    /// re-run its whole backlog per confirmation, and fall further behind).
    fn rebase(&mut self) -> Result<()> {
        if let Some(a) = self.read_applied()?.filter(|a| Some(*a) > self.applied) {
            self.pending.retain(|(l, _)| *l > a);
            self.applied = Some(a);
            self.trim_timeline(false)?;
        }
        self.copy_outcomes()?;
        if self.defer_replay {
            return Ok(());
        }
        if !self.db.store().is_restarting() {
            // On the stored state: whatever ran on top since it changed (a re-run under new
            // mutators, a local write after a rebase failed) goes, and runs again here.
            self.db.store().discard_overlay();
            self.replay_pending()?;
        }
        self.rebase_due = false;
        Ok(())
    }

    /// A rebase that failed (a read fault while reading `_pagesync_timelines`, say) is due
    /// until one succeeds; without new storage nothing else would try it again, and the
    /// mutations the stored state already applied would stay pending. The session calls this
    /// on its timer. `Ok(true)` when it ran: the replica's state may have changed.
    pub fn rebase_if_due(&mut self) -> Result<bool> {
        if !self.rebase_due {
            return Ok(false);
        }
        self.rebase()?;
        Ok(true)
    }

    /// Re-runs every pending mutation on the stored state (the caller discarded the overlay),
    /// in one transaction, or in one each while at most `REPLAY_COMMIT_EACH` are pending: each
    /// commit's pages are then recorded (`PageStore::mark_local_commit`), and a confirmation
    /// of the first few is kept from them, not by running them once more. A mutation that
    /// ends its transaction itself is left out and the replay restarts (at most once per
    /// mutation).
    fn replay_pending(&mut self) -> Result<()> {
        let mut skip = std::collections::HashSet::new();
        while !self.pending.is_empty() {
            match self.try_replay(&skip) {
                Err((Some(i), Error::TransactionLost(_))) => {
                    assert!(skip.insert(i), "BUG: a skipped mutation ran again");
                }
                Err((_, e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
        Ok(())
    }

    fn try_replay(
        &mut self,
        skip: &std::collections::HashSet<usize>,
    ) -> std::result::Result<(), (Option<usize>, Error)> {
        let each = self.pending.len() <= REPLAY_COMMIT_EACH;
        let conn = self.db.conn();
        // A failure leaves the stored state, as one transaction rolled back would.
        let undo = |e: Error| {
            let _ = conn.execute_batch("ROLLBACK");
            self.db.store().discard_overlay();
            e
        };
        let mut open: Option<Lsn> = None;
        for (i, (lsn, m)) in self.pending.iter().enumerate().filter(|(i, _)| !skip.contains(i)) {
            if open.is_none() {
                crate::db::run_cached(conn, "BEGIN IMMEDIATE").map_err(|e| (None, undo(e.into())))?;
            }
            open = Some(*lsn);
            self.confirms.replayed += 1;
            if let Err(e) = apply_mutation(&self.db, &mut self.reducer, m, m.client_time_ms) {
                return Err((Some(i), undo(e)));
            }
            if each {
                crate::db::run_cached(conn, "COMMIT").map_err(|e| (None, undo(self.db.explain(e))))?;
                self.db.store().mark_local_commit(*lsn);
                open = None;
            }
        }
        if let Some(last) = open {
            crate::db::run_cached(conn, "COMMIT").map_err(|e| (None, undo(self.db.explain(e))))?;
            self.db.store().mark_local_commit(last);
        }
        Ok(())
    }

    /// Puts the server's mutator definitions in force (`None`: none), and runs the pending
    /// mutations again under them: a call made under old definitions gets the new ones' effect
    /// (or is rejected locally, `no_such_mutator`, when its mutator is gone; the server decides).
    pub fn set_mutators(
        &mut self,
        mutators: Option<std::sync::Arc<crate::mutators::Mutators>>,
    ) -> Result<()> {
        let same = self.mutators.as_ref().map(|m| m.version()) == mutators.as_ref().map(|m| m.version());
        self.reducer.set_mutators(mutators.clone());
        self.mutators = mutators;
        if same || self.pending.is_empty() || self.db.store().is_restarting() {
            return Ok(());
        }
        if self.rebase_due {
            // Storage came before, whose re-run waits (`receive_wire_held`): this is it.
            return self.rebase();
        }
        self.db.store().discard_overlay();
        self.replay_pending()
    }

    /// The mutator definitions in force here (the server's, as last sent).
    pub fn mutators(&self) -> Option<&std::sync::Arc<crate::mutators::Mutators>> {
        self.mutators.as_ref()
    }

    /// Where mutation `lsn` of this client's timeline stands.
    pub fn state(&self, lsn: Lsn) -> Result<MutationState> {
        if self.applied.is_none_or(|a| lsn > a) {
            return Ok(MutationState::Pending);
        }
        if let Some(r) = self.rejected.get(&lsn) {
            return Ok(MutationState::Rejected(r.clone()));
        }
        let rejection = self.db.conn().query_row(
            "SELECT code, message FROM _pagesync_rejections WHERE timeline = ?1 AND lsn = ?2",
            rusqlite::params![&self.timeline_id.0[..], lsn.get() as i64],
            |r| Ok(Rejection::new(RejectionCode::parse(&r.get::<_, String>(0)?), r.get::<_, String>(1)?)),
        );
        match rejection {
            Ok(r) => Ok(MutationState::Rejected(r)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(MutationState::Confirmed),
            Err(e) => Err(e.into()),
        }
    }

    /// The server's state this replica holds, as a plain `.sqlite` file (pending local writes
    /// are not in it).
    pub fn export(&self) -> Result<Vec<u8>> {
        Ok(self.db.store().export()?)
    }

    /// The highest LSN of this timeline the server has applied (confirmed or rejected).
    pub fn applied_lsn(&self) -> Option<Lsn> {
        self.applied
    }

    /// Every rejection the server recorded for this timeline, in LSN order.
    /// What the server decided about this client's mutations so far.
    pub fn outcomes(&self) -> Result<Outcomes> {
        let rejected = self.rejections()?;
        let applied = self.applied.map_or(0, Lsn::get);
        Ok(Outcomes { confirmed: applied - rejected.len() as u64, rejected })
    }

    pub fn rejections(&self) -> Result<Vec<(Lsn, Rejection)>> {
        let Some(applied) = self.applied else { return Ok(Vec::new()) };
        let mut all = self.table_rejections(None, applied)?;
        all.extend(self.rejected.iter().map(|(l, r)| (*l, r.clone())));
        Ok(all.into_iter().collect())
    }

    /// Every rejection at or below this LSN is in the replica's outcome journal: the server
    /// may delete them from the replicated table (`StorageAck`).
    pub fn outcomes_through(&self) -> Option<Lsn> {
        self.outcomes_through
    }

    /// This timeline's rejections in the replicated table, in `(after, through]`.
    fn table_rejections(&self, after: Option<Lsn>, through: Lsn) -> Result<BTreeMap<Lsn, Rejection>> {
        let mut stmt = self.db.conn().prepare_cached(
            "SELECT lsn, code, message FROM _pagesync_rejections WHERE timeline = ?1 AND lsn > ?2 AND lsn <= ?3",
        )?;
        let after = after.map_or(0, Lsn::get) as i64;
        let rows =
            stmt.query_map(rusqlite::params![&self.timeline_id.0[..], after, through.get() as i64], |r| {
                let code = RejectionCode::parse(&r.get::<_, String>(1)?);
                Ok((r.get::<_, i64>(0)?, Rejection::new(code, r.get::<_, String>(2)?)))
            })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (lsn, r) = row?;
            out.insert(Lsn::new(lsn as u64).ok_or_else(|| Error::Malformed("rejection at LSN 0".into()))?, r);
        }
        Ok(out)
    }

    /// Loads the outcome journal.
    fn read_outcomes(&mut self) -> Result<()> {
        let range = self.outcomes.range();
        for bytes in self.outcomes.read_range(range)? {
            let record: OutcomeRecord = postcard::from_bytes(&bytes)
                .map_err(|e| Error::Malformed(format!("an entry of the outcome journal: {e}")))?;
            for (lsn, code, message) in record.rejected {
                let lsn = Lsn::new(lsn).ok_or_else(|| Error::Malformed("an outcome at LSN 0".into()))?;
                self.rejected.insert(lsn, Rejection::new(RejectionCode::parse(&code), message));
            }
        }
        Ok(())
    }

    /// Copies the rejections the server applied since the last copy into the outcome journal
    /// (one durable append, only when there are any), so the server may forget them.
    fn copy_outcomes(&mut self) -> Result<()> {
        let Some(applied) = self.applied.filter(|a| self.outcomes_through < Some(*a)) else { return Ok(()) };
        let mut new = self.table_rejections(self.outcomes_through, applied)?;
        new.retain(|l, _| !self.rejected.contains_key(l));
        if !new.is_empty() {
            let rejected =
                new.iter().map(|(l, r)| (l.get(), r.code.as_str().to_owned(), r.message.clone())).collect();
            let record = postcard::to_stdvec(&OutcomeRecord { rejected }).expect("BUG: a record serializes");
            self.outcomes.append_batch(&[&record])?;
            self.rejected.extend(new);
        }
        self.outcomes_through = Some(applied);
        Ok(())
    }

    /// Sets the budget this replica's optimistic runs use; it should match the server's
    /// (`Budget::default()` unless the server raised it).
    pub fn set_budget(&mut self, budget: crate::sandbox::Budget) -> Result<()> {
        self.db.set_budget(budget)
    }

    /// Runs a read-only query on the optimistic state.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows> {
        self.check_not_restarting()?;
        self.db.run_query(|conn| query_rows(conn, sql, params)).map_err(|e| match e {
            Error::Sqlite(e) => self.db.explain(e),
            e => e,
        })
    }
}

/// Runs a read-only statement and collects its rows; anything that writes is refused.
pub(crate) fn query_rows(conn: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<Rows> {
    // Keys of its own in the connection's statement cache, as a mutation's SQL has: a query
    // worded as one of pagesync's statements (prepared outside the sandbox: `SAVEPOINT
    // _pagesync_mutation`, say) must be authorized, not served from the cache.
    let mut stmt = conn.prepare_cached(&format!("{sql}\n-- query"))?;
    if !stmt.readonly() {
        return Err(Error::NotReadOnly { sql: sql.to_owned() });
    }
    // Name by name: `column_names` would collect them into a vector of its own first.
    let n = stmt.column_count();
    let mut columns = Vec::with_capacity(n);
    for i in 0..n {
        columns.push(stmt.column_name(i)?.to_owned());
    }
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(Value::from(row.get_ref(i)?));
        }
        out.push(values);
    }
    Ok(Rows { columns, rows: out })
}
