//! `ServerDocument`: the authoritative copy of one document.
//!
//! It takes timeline ranges from many clients (idempotently), and each `step` applies a batch of
//! them in one SQLite transaction, one SAVEPOINT per mutation, then appends one storage entry:
//! the changed pages, the page count and the applied `(timeline, lsn, time)` list. The entry is
//! durable before `step` returns, and only then may it be sent to anyone.
//!
//! Invariants:
//! - a mutation is applied at most once: `_pagesync_timelines` holds the applied LSN per
//!   timeline, updated in the step's transaction, and `receive` drops LSNs at or below it;
//! - mutations of one timeline are applied in LSN order, without gaps;
//! - a failed step (I/O) leaves the committed state and the queues as they were.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use pagesync_journal::{Journal, Lsn, LsnRange};

use crate::db::Database;
use crate::error::{Error, Result};
use crate::history::{self, HistoryPage, HistoryQuery, Origin};
use crate::ids::TimelineId;
use crate::mutation::{MAX_MUTATION_BYTES, Mutation};
use crate::page::PAGE_SIZE;
use crate::reducer::{ONCE_SCHEMA, Reducer, Rejection, RejectionCode, SqlReducer, apply_mutation};
use crate::sandbox::Budget;
use crate::storage::Applied;
use crate::store::{Checkpoint, PageStore};
use crate::wire::WireEntry;

/// The system tables, created by the server's first step.
pub const SYSTEM_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS _pagesync_timelines(
    timeline BLOB PRIMARY KEY, applied_lsn INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _pagesync_rejections(
    timeline BLOB NOT NULL, lsn INTEGER NOT NULL, code TEXT NOT NULL, message TEXT NOT NULL,
    PRIMARY KEY (timeline, lsn)) WITHOUT ROWID;
";

/// Bytes of received, not yet applied mutations one document holds, each counted with
/// `QUEUED_ENTRY_COST`; past it `receive` takes no more until steps make room (clients
/// resend). 64 MiB: sixteen full steps.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// What a queued entry costs besides its bytes (its LSN, its buffer and its origin, in the
/// queue), counted against `MAX_QUEUED_BYTES`: a million empty entries in a few frames held
/// 90 MB each and counted nothing.
pub const QUEUED_ENTRY_COST: usize = 128;

/// How far ahead of the server's clock a client's clock may run; later times are clamped.
/// A minute covers ordinary clock drift without letting a client date rows into the future.
pub const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

/// Pages one step may change: what one storage entry (`MAX_ENTRY_BYTES`) holds, less 1 MiB
/// for its header and applied list. A mutation that would take its step past it ends the step
/// before it, or, alone in its step, is rejected with `too_big`: no step is ever too large to
/// commit.
pub const MAX_STEP_PAGES: usize = (pagesync_journal::codec::MAX_ENTRY_BYTES - (1 << 20)) / (PAGE_SIZE + 4);

/// Rejections of one timeline its client has not acknowledged, past which the server takes no
/// more of its mutations, and drops those it had queued (unapplied, so its client sends them
/// again, told by a lower `next_expected`), until it acknowledges them. A client does as soon
/// as it holds the entry that recorded them; one that never does (a hostile one: 400,000 empty
/// entries in a 0.8 MB frame grew a document by 45 MB of rejections, and at its size cap every
/// step failed for want of room for them) is held there. No rejection is deleted before its
/// client acknowledged it: a client never reads a rejected mutation as applied.
pub const MAX_TIMELINE_REJECTIONS: usize = 256;

/// Unacknowledged rejections over all of a document's timelines, past which every timeline that
/// has any is held as at `MAX_TIMELINE_REJECTIONS`, a step ends after `CROWDED_SHARE`
/// rejections, and after one of any timeline (a new timeline adds one before it is held);
/// short of it, a step ends once it recorded as many as are left below it (at least
/// `CROWDED_SHARE`). Four clients that never acknowledge
/// reach it. A row with a message near 1 KiB takes an overflow page of its own (about 4.6 KiB
/// in all), so the rows are at most about 4.7 MiB, within the slack kept past a document's
/// size cap.
pub const MAX_DOC_REJECTIONS: usize = 1_024;

/// Rejections after which a step ends while its document is past `MAX_DOC_REJECTIONS`, and the
/// fewest a step may record short of it (good writes cost nothing).
const CROWDED_SHARE: usize = 16;

/// Timelines one `step` call may hold back for want of room (`no_room`) before it gives up
/// until the next call: each try may run a step's worth of mutations again.
const MAX_HELD_PER_STEP: usize = 2;

/// How long a timeline held back for want of room waits before its mutation is tried again,
/// when no acknowledgement deleted rejections before (room may come from a delete of the
/// app's rows too): one failing try per held timeline per 5 s.
pub const NO_ROOM_RETRY_MS: i64 = 5_000;

/// How long a timeline held back for want of room waits at least, even when a step deleted
/// rejections (which any client's acknowledgement does): one failing try per held timeline
/// per second, however fast acknowledgements come.
pub const NO_ROOM_MIN_MS: i64 = 1_000;

/// Of `MAX_STEP_PAGES`, the pages kept for pagesync's own rows after the mutations (applied
/// LSNs, rejection messages): 1 MiB.
const STEP_SYSTEM_PAGES: usize = 256;

/// Recent entries kept in wire form (often as deltas) for subscribers that are up to date.
/// 256 entries covers the last second of a busy document; older entries are read from the
/// journal and sent whole.
pub const RECENT_WIRE_ENTRIES: usize = 256;

/// ... and at most this many bytes of them (the newest is always kept): 4 MiB, so a document
/// that took a few large steps does not pin their copies in memory.
pub const RECENT_WIRE_BYTES: usize = 4 << 20;

/// Bounds on one step, so one storage entry (and the wait for it) stays small.
#[derive(Clone, Copy, Debug)]
pub struct StepLimits {
    /// Mutations per step. 4,096: large enough to amortize the fsync under load and to take a
    /// client's burst of writes in one step (which its author then confirms by digest, without
    /// replaying: see `wire::Confirm`), small enough that a step of small writes takes a few
    /// milliseconds (`max_bytes` and `max_step_vm_steps` bound the rest). Its applied list
    /// holds at most 128 KiB of the entry.
    pub max_mutations: usize,
    /// Encoded mutation bytes per step. 4 MiB: a few large mutations fill a step alone.
    pub max_bytes: usize,
    /// One mutation's encoded size; larger ones are rejected with `too_big`. At most
    /// `MAX_MUTATION_BYTES`, which no client can exceed anyway.
    pub max_mutation_bytes: usize,
    /// The database's size limit, in bytes (rounded down to whole pages): a mutation that
    /// would grow the document past it is rejected with `doc_full`, and the document stays
    /// usable (deletes and updates that do not grow it still apply). `None`: no limit. Set
    /// through SQLite's `max_page_count`, so replays under the same limit stay deterministic.
    pub max_doc_bytes: Option<u64>,
    /// What each mutation may cost (instructions, bytes added, temp bytes, value size).
    pub budget: Budget,
    /// CPU time one mutation may take (`Database::set_cpu_limit`): past it, it is interrupted
    /// and rejected `too_expensive`. A live step also ends once it has run this long.
    /// `DEFAULT_MAX_MUTATION_CPU` by default; `None`: unbounded.
    pub max_mutation_cpu: Option<std::time::Duration>,
    /// VM instructions one step may run: once its mutations have run this many, the step
    /// ends and the rest wait for the next one, so a step (and the documents waiting behind
    /// it) is bounded in time. One mutation's budget by default.
    pub max_step_vm_steps: u64,
}

/// When a document writes checkpoints and how much history it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// A checkpoint is written once the entries since the last one hold this many bytes, or
    /// the document's size if that is larger (so a checkpoint never costs more than the
    /// history it lets go). 64 MiB by default.
    pub checkpoint_after_bytes: u64,
    /// History kept for point-in-time restore: the journal is trimmed to the newest checkpoint
    /// at least this old. 7 days by default; 0 keeps only the newest checkpoint and its tail.
    pub retention_ms: i64,
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction { checkpoint_after_bytes: 64 << 20, retention_ms: 7 * 24 * 3_600_000 }
    }
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            max_mutations: 4_096,
            max_bytes: 4 << 20,
            max_mutation_bytes: MAX_MUTATION_BYTES,
            max_doc_bytes: None,
            budget: Budget::default(),
            max_step_vm_steps: crate::sandbox::DEFAULT_MAX_VM_STEPS,
            max_mutation_cpu: Some(crate::sandbox::DEFAULT_MAX_MUTATION_CPU),
        }
    }
}

/// What `receive` did with a range of timeline entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The LSN the server wants next from this timeline. When it is below the first LSN sent,
    /// there is a gap and the client must resend from here.
    pub next_expected: Lsn,
    /// How many entries were new.
    pub accepted: u64,
}

/// The result of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    pub lsn: Lsn,
    /// Mutations the step took (rejected ones included).
    pub applied: usize,
    pub rejected: usize,
    /// The rejected mutations, with why.
    pub rejections: Vec<Rejected>,
    /// Timelines whose rejections the step deleted (their clients had copied them).
    pub forgotten: usize,
}

/// A document's committed, unacknowledged rejections.
#[derive(Debug, Default)]
struct Unacknowledged {
    of: BTreeMap<TimelineId, usize>,
    total: usize,
}

/// The counts of a table that could not be read: nobody is held.
static NONE_COUNTED: Unacknowledged = Unacknowledged { of: BTreeMap::new(), total: 0 };

/// A mutation a step rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub timeline: TimelineId,
    pub lsn: Lsn,
    pub rejection: Rejection,
    /// Rejected because the step could not be committed with it (it changes more pages than
    /// a step may hold, or the reducer failed on it), not by its own SQL: worth a warning.
    pub isolated: bool,
}

pub struct ServerDocument<R: Reducer = SqlReducer> {
    db: Database,
    reducer: R,
    limits: StepLimits,
    applied: HashMap<TimelineId, Lsn>,
    /// `applied` may not match the stored state: reading it again failed (a read fault after
    /// a failed step). Nothing is received or stepped until a read succeeds: a map read in
    /// part would take a timeline's applied mutations again.
    applied_stale: bool,
    /// Each timeline's mutations received and not yet applied, with who sent them and when.
    queues: BTreeMap<TimelineId, VecDeque<(Lsn, Vec<u8>, Origin)>>,
    /// Bytes in `queues`, bounded by `MAX_QUEUED_BYTES`.
    queued_bytes: usize,
    /// Where the next round-robin pick starts, so busy timelines cannot starve others.
    rr_cursor: Option<TimelineId>,
    /// The newest entries in wire form, oldest first.
    recent: VecDeque<Recent>,
    compaction: Option<Compaction>,
    /// A checkpoint being written `CHECKPOINT_PARTS_PER_STEP` parts per step.
    checkpointing: Option<Checkpointing>,
    /// Rejections to delete in the next step: their clients copied them
    /// (`forget_rejections`), through the LSN given per timeline.
    forget: BTreeMap<TimelineId, Lsn>,
    /// Through which LSN each timeline's rejections were deleted already.
    forgotten: HashMap<TimelineId, Lsn>,
    /// Rows of `_pagesync_rejections` per timeline as committed (`MAX_TIMELINE_REJECTIONS`,
    /// `MAX_DOC_REJECTIONS`), counted again after a step that changed them; `None` until then.
    unacknowledged: Option<Unacknowledged>,
    /// Timelines whose queued mutations were dropped, unapplied, since `take_dropped`: held
    /// back, their clients are to be told where to send from again.
    dropped: BTreeSet<TimelineId>,
    /// Timelines whose first mutation could not commit even as a rejection, for want of room
    /// for pagesync's own rows (a document at its size cap whose slack is full), with when they
    /// were held: held back for `NO_ROOM_RETRY_MS`, or until a step deletes rejections (after
    /// `NO_ROOM_MIN_MS`), or the document is opened again; the document goes on with the rest.
    no_room: BTreeMap<TimelineId, i64>,
    /// The latest time this document was told (a step's, a receive's): what `no_room` is
    /// judged by.
    clock_ms: i64,
    /// Set by a live step's `apply_batch` that found `no_room`'s case.
    starved: Option<TimelineId>,
    /// The history journal (`set_history`): every step's history entry is durable before its
    /// storage entry is written, or with it (`write_history_beside`).
    history: Option<HistoryLog>,
    /// The mutator definitions in force, asked before every step (`set_mutators`).
    mutators: Option<MutatorSource>,
}

/// Says which mutator definitions are in force for a document now (a reload changes them).
pub type MutatorSource = Box<dyn Fn() -> Option<std::sync::Arc<crate::mutators::Mutators>> + Send>;

/// A mutation picked for a step: its timeline, its LSN there, its bytes.
type Picked = (TimelineId, Lsn, Vec<u8>);

/// One attempt at a batch (`try_apply_batch`): what does not change between attempts.
struct Attempt<'a> {
    forget: &'a [(TimelineId, Lsn)],
    /// Mutations known to end the transaction, rejected without running.
    lost: &'a HashMap<usize, Rejection>,
    entry_time_ms: i64,
    vm_budget: Option<u64>,
    /// A live step's time: when the batch began, and how long it may run
    /// (`StepLimits::max_mutation_cpu`), over every attempt.
    time_budget: Option<(StepClock, std::time::Duration)>,
    live: Option<Live<'a>>,
}

/// What a live step (not a replay) knows of its batch.
#[derive(Clone, Copy)]
struct Live<'a> {
    /// Who sent each mutation.
    origins: &'a [Origin],
    /// The rejections of each timeline the step may record (`allowance`); it ends after the
    /// one that reaches it.
    allowance: &'a HashMap<TimelineId, usize>,
    /// The rejections of all timelines the step may record: what is left below
    /// `MAX_DOC_REJECTIONS`, or `CROWDED_SHARE` past it.
    total: usize,
}

/// When a live step began: a monotonic clock (read in a few nanoseconds; a thread's CPU clock
/// took a system call per mutation). None on wasm32, whose `Instant` panics; a browser runs no
/// server.
#[cfg(not(target_arch = "wasm32"))]
type StepClock = std::time::Instant;
#[cfg(target_arch = "wasm32")]
type StepClock = ();

fn step_started() -> Option<StepClock> {
    #[cfg(not(target_arch = "wasm32"))]
    return Some(std::time::Instant::now());
    #[cfg(target_arch = "wasm32")]
    None
}

fn step_ran(started: &StepClock) -> std::time::Duration {
    #[cfg(not(target_arch = "wasm32"))]
    return started.elapsed();
    #[cfg(target_arch = "wasm32")]
    {
        let () = started;
        std::time::Duration::ZERO
    }
}

/// Runs `write` on this thread's companion while `sync` runs here, and gives both results. The
/// companion (`pagesync-history`) is started at the first call and then waits for the next:
/// a thread started for each step cost about 100 us of its latency here. Without a companion
/// (none could be started), `write` runs here first.
#[cfg(not(target_arch = "wasm32"))]
fn at_once<A: Send + 'static, B>(
    write: impl FnOnce() -> A + Send + 'static,
    sync: impl FnOnce() -> B,
) -> (A, B) {
    use std::sync::mpsc;
    type Job = Box<dyn FnOnce() + Send>;
    thread_local! {
        static COMPANION: std::cell::RefCell<Option<mpsc::Sender<Job>>> =
            const { std::cell::RefCell::new(None) };
    }
    let (reply, answer) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(write)));
    });
    let unsent = COMPANION.with_borrow_mut(|companion| {
        if companion.is_none() {
            // Started again at the next call if it cannot be now (a passing thread limit).
            let (jobs, next) = mpsc::channel::<Job>();
            let thread = std::thread::Builder::new().name("pagesync-history".into());
            // Ends when this thread ends and its sender goes.
            *companion = thread.spawn(move || next.into_iter().for_each(|job| job())).ok().map(|_| jobs);
        }
        match companion {
            Some(jobs) => jobs.send(job).err().map(|e| e.0),
            None => Some(job),
        }
    });
    if let Some(job) = unsent {
        job();
    }
    // Should `sync` panic, the companion's write still ends before this thread goes on: it
    // holds the history journal, which must not be opened again while it writes.
    let synced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(sync));
    let written = answer.recv().expect("BUG: the companion drops no job unanswered");
    let resume = std::panic::resume_unwind;
    (written.unwrap_or_else(|panic| resume(panic)), synced.unwrap_or_else(|panic| resume(panic)))
}

/// No threads in the browser (which runs no server): one after the other.
#[cfg(target_arch = "wasm32")]
fn at_once<A, B>(write: impl FnOnce() -> A, sync: impl FnOnce() -> B) -> (A, B) {
    (write(), sync())
}

/// Opens a document's history journal, creating it when asked (`true`: at the document's first
/// write); `Ok(None)` when it does not exist and was not to be created (a read).
pub type HistoryOpener = Box<dyn Fn(bool) -> Result<Option<Box<dyn Journal>>> + Send>;

/// Records, durably, that steps from the given storage LSN on write their history entry beside
/// their storage entry (`ServerDocument::write_history_beside`), before the first that does.
pub type PairingMark = Box<dyn FnMut(Lsn) -> Result<()> + Send>;

/// A document's history journal (see `history`), opened when first needed.
struct HistoryLog {
    open: HistoryOpener,
    journal: Option<Box<dyn Journal>>,
    /// Set when steps write their history entry beside their storage entry rather than before
    /// it; `marked` once the mark is down.
    beside: Option<PairingMark>,
    marked: bool,
}

impl HistoryLog {
    /// The journal, created if it does not exist yet.
    fn journal(&mut self) -> Result<&mut dyn Journal> {
        if self.journal.is_none() {
            let opened = (self.open)(true)?;
            self.journal =
                Some(opened.ok_or_else(|| Error::Refused("the history journal was not created".into()))?);
        }
        Ok(&mut **self.journal.as_mut().expect("BUG: just opened"))
    }

    /// The journal if it exists: a read creates nothing.
    fn existing(&mut self) -> Result<Option<&mut dyn Journal>> {
        if self.journal.is_none() {
            self.journal = (self.open)(false)?;
        }
        Ok(match &mut self.journal {
            Some(j) => Some(&mut **j),
            None => None,
        })
    }

    /// Appends `entry`. When another writer took the LSN (a second server on the same bucket
    /// wrote its own, which a reader will not list unless its storage entry says so), the
    /// journal is opened again and the entry goes after it: the storage append that follows
    /// decides which server owns the document.
    fn append(&mut self, entry: &[u8]) -> Result<()> {
        let written = self.journal()?.append(entry);
        self.settle(written, entry)
    }

    /// What an append of `entry` that gave `written` comes to: once more, on the journal
    /// opened again, when another writer took the LSN.
    fn settle(&mut self, written: pagesync_journal::Result<Lsn>, entry: &[u8]) -> Result<()> {
        match written {
            Err(pagesync_journal::JournalError::Fenced { .. }) => {
                self.journal = None;
                self.journal()?.append(entry)?;
                Ok(())
            }
            other => other.map(|_| ()).map_err(Error::from),
        }
    }
}

/// Where a checkpoint in progress stands: the page count it began with (which fixes its parts)
/// and the next part to write.
#[derive(Clone, Copy, Debug)]
struct Checkpointing {
    start_pages: u32,
    next: u32,
}

/// Checkpoint parts a step writes before its mutations: 4 parts of 1,024 pages, 16 MiB. A
/// large document's checkpoint is spread over many steps, so the document keeps confirming
/// writes while it is written (each step costs at most this much more).
pub const CHECKPOINT_PARTS_PER_STEP: u32 = 4;

impl<R: Reducer> std::fmt::Debug for ServerDocument<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerDocument")
            .field("db", &self.db)
            .field("timelines", &self.applied.len())
            .finish()
    }
}

impl ServerDocument<SqlReducer> {
    pub fn open(storage: Box<dyn Journal>) -> Result<Self> {
        Self::with_reducer(storage, SqlReducer::default(), StepLimits::default())
    }
}

/// A recent entry in wire form, and, when it applied one timeline's mutations alone, its
/// confirmation for that timeline's client (see `wire::Confirm`).
struct Recent {
    lsn: Lsn,
    wire: WireEntry,
    confirm: Option<(TimelineId, WireEntry)>,
}

impl Recent {
    fn bytes(&self) -> usize {
        self.wire.data.len() + self.confirm.as_ref().map_or(0, |(_, c)| c.data.len())
    }
}

/// Keeps a new entry's wire form: the XOR delta when it compresses smaller, else whole. A
/// delta of at most a sixteenth of the entry is kept without compressing the whole entry to
/// compare: the whole could save at most the delta's own few bytes, and compressing it was
/// half of a step's compression time (in the 100-row benchmark's steps, 34 KB entries, the
/// delta was a twenty-third of them and always the smaller).
fn remember(
    recent: &mut VecDeque<Recent>,
    committed: Option<crate::store::Committed>,
    confirm: Option<(TimelineId, WireEntry)>,
) {
    let Some(c) = committed else { return };
    let delta = WireEntry::delta(&c.delta);
    let wire = if delta.data.len() <= c.payload.len() / SMALL_DELTA_PARTS {
        delta
    } else {
        let full = WireEntry::full(&c.payload);
        if delta.data.len() < full.data.len() { delta } else { full }
    };
    remember_wire(recent, Recent { lsn: c.lsn, wire, confirm });
}

/// See `remember`.
const SMALL_DELTA_PARTS: usize = 16;

fn remember_wire(recent: &mut VecDeque<Recent>, entry: Recent) {
    if recent.len() == RECENT_WIRE_ENTRIES {
        recent.pop_front();
    }
    recent.push_back(entry);
    // Bounded in bytes too: a few large steps must not pin megabytes per document.
    let mut bytes: usize = recent.iter().map(Recent::bytes).sum();
    while bytes > RECENT_WIRE_BYTES && recent.len() > 1 {
        let old = recent.pop_front().expect("BUG: more than one");
        bytes -= old.bytes();
    }
}

/// The client time of an encoded mutation, or 0 when it does not decode.
fn decoded_time(bytes: &[u8]) -> i64 {
    Mutation::decode(bytes).map_or(0, |m| m.client_time_ms)
}

/// Whether a timeline held for want of room at `held` (`ServerDocument::no_room`) is still held
/// at `clock`, `for_ms` after.
fn still_held(clock: i64, held: i64, for_ms: i64) -> bool {
    clock < held.saturating_add(for_ms)
}

/// Whether `e` says the document has no room left (its page cap, or a step's).
fn is_full(e: &Error) -> bool {
    match e {
        Error::StepFull { .. } => true,
        Error::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => f.code == rusqlite::ffi::ErrorCode::DiskFull,
        _ => false,
    }
}

/// A step's system rows, the first: deletes each timeline's rejections through the LSN given
/// (its client copied them). A client confirming a step by digest writes them the same way.
pub(crate) fn delete_rejections(
    conn: &rusqlite::Connection,
    forget: &[(TimelineId, Lsn)],
) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare_cached("DELETE FROM _pagesync_rejections WHERE timeline = ?1 AND lsn <= ?2")?;
    for (tl, through) in forget {
        stmt.execute(rusqlite::params![&tl.0[..], through.get() as i64])?;
    }
    Ok(())
}

/// A step's system rows, the last: the applied LSN of each timeline.
pub(crate) fn record_applied(
    conn: &rusqlite::Connection,
    last: &BTreeMap<TimelineId, Lsn>,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR REPLACE INTO _pagesync_timelines(timeline, applied_lsn) VALUES (?1, ?2)",
    )?;
    for (tl, lsn) in last {
        stmt.execute(rusqlite::params![&tl.0[..], lsn.get() as i64])?;
    }
    Ok(())
}

impl<R: Reducer> ServerDocument<R> {
    /// Opens the document over its storage journal; an empty journal gets its first entry (the
    /// system tables) at once.
    pub fn with_reducer(storage: Box<dyn Journal>, reducer: R, limits: StepLimits) -> Result<Self> {
        let mut db = Database::open(PageStore::open(storage)?, crate::db::ConnMemory::Lean)?;
        db.set_budget(limits.budget)?;
        db.set_cpu_limit(limits.max_mutation_cpu);
        db.meter_memory(1);
        let page = PAGE_SIZE as u64;
        db.set_max_doc_pages(
            limits.max_doc_bytes.map(|max| u32::try_from((max / page).max(1)).unwrap_or(u32::MAX)),
        );
        db.store().set_max_overlay_pages(Some(MAX_STEP_PAGES - STEP_SYSTEM_PAGES));
        let mut doc = ServerDocument {
            db,
            reducer,
            limits,
            applied: HashMap::new(),
            applied_stale: true,
            forget: BTreeMap::new(),
            forgotten: HashMap::new(),
            unacknowledged: None,
            dropped: BTreeSet::new(),
            no_room: BTreeMap::new(),
            clock_ms: i64::MIN,
            starved: None,
            queues: BTreeMap::new(),
            queued_bytes: 0,
            rr_cursor: None,
            recent: VecDeque::new(),
            compaction: None,
            checkpointing: None,
            history: None,
            mutators: None,
        };
        if doc.db.store().page_count() == 0 {
            doc.db.conn().execute_batch(&format!("BEGIN; {SYSTEM_SCHEMA} {ONCE_SCHEMA} COMMIT;"))?;
            // Time 0: the document's creation precedes every step.
            let committed = doc.db.store().commit_overlay(&[], &[], 0)?;
            remember(&mut doc.recent, committed, None);
        }
        doc.load_applied()?;
        // Opening read every entry and the schema; those pages are not the working set.
        doc.shrink_memory()?;
        Ok(doc)
    }

    /// Reads every timeline's applied LSN from the stored state; until one read succeeds whole,
    /// the map is stale (`applied_stale`).
    fn load_applied(&mut self) -> Result<()> {
        self.applied_stale = true;
        let mut applied = HashMap::new();
        let mut stmt = self.db.conn().prepare("SELECT timeline, applied_lsn FROM _pagesync_timelines")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (tl, lsn) = row?;
            let tl: [u8; 16] =
                tl.try_into().map_err(|_| Error::Malformed("timeline id is not 16 bytes".into()))?;
            if let Some(lsn) = Lsn::new(lsn as u64) {
                applied.insert(TimelineId(tl), lsn);
            }
        }
        drop(stmt);
        (self.applied, self.applied_stale) = (applied, false);
        Ok(())
    }

    /// `applied` as stored, read again if a read failed since.
    fn applied_as_stored(&mut self) -> Result<()> {
        if self.applied_stale { self.load_applied() } else { Ok(()) }
    }

    pub fn limits(&self) -> StepLimits {
        self.limits
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The storage journal's range: what a subscriber can be sent.
    pub fn storage_range(&self) -> LsnRange {
        self.db.store().journal().range()
    }

    /// Reads storage entries to send (already durable).
    pub fn read_storage(&self, range: LsnRange) -> Result<Vec<Vec<u8>>> {
        Ok(self.db.store().journal().read_range(range)?)
    }

    /// Gives back the memory an idle document holds beyond its connection: SQLite's page cache
    /// and prepared statements, the page store's cache, and the recent entries kept in wire
    /// form. All of it is rebuilt on demand (pages are read from the journal again, entries
    /// are sent whole).
    pub fn shrink_memory(&mut self) -> Result<()> {
        self.db.conn().flush_prepared_statement_cache();
        self.db.conn().execute_batch("PRAGMA shrink_memory")?;
        self.db.store().clear_cache();
        self.recent = VecDeque::new();
        Ok(())
    }

    /// Turns on checkpoints and retention (off by default: the history is kept whole).
    pub fn set_compaction(&mut self, compaction: Option<Compaction>) {
        self.compaction = compaction;
    }

    /// The checkpoint the journal starts with, if it was trimmed: a subscriber behind it
    /// restarts there.
    pub fn base_checkpoint(&self) -> Option<Checkpoint> {
        let store = self.db.store();
        let first = store.journal().range().first();
        store.checkpoints().first().copied().filter(|c| c.first == first)
    }

    /// The complete checkpoint whose parts span `lsn` (past its first part), if any: a replica
    /// that resumes there may be restarting at it, with no pages to apply a delta to.
    pub fn checkpoint_spanning(&self, lsn: Lsn) -> Option<Checkpoint> {
        self.db.store().checkpoints().iter().copied().find(|c| c.first < lsn && lsn <= c.last)
    }

    /// The newest complete checkpoint: a new replica starts there.
    pub fn newest_checkpoint(&self) -> Option<Checkpoint> {
        self.db.store().checkpoints().last().copied()
    }

    /// Writes the next parts of a checkpoint (one begins when enough history has built up),
    /// then trims the journal to the newest checkpoint that is older than the retention window.
    /// `now_ms` is the server's clock.
    pub fn compact(&mut self, now_ms: i64) -> Result<()> {
        let Some(policy) = self.compaction else { return Ok(()) };
        let mut store = self.db.store();
        let doc_bytes = u64::from(store.page_count()) * crate::page::PAGE_SIZE as u64;
        let due = store.bytes_since_checkpoint() >= policy.checkpoint_after_bytes.max(doc_bytes);
        let checkpointing =
            self.checkpointing.or(due.then(|| Checkpointing { start_pages: store.page_count(), next: 1 }));
        if let Some(c) = checkpointing {
            let count = crate::store::checkpoint_part_count(c.start_pages);
            let through = (c.next + CHECKPOINT_PARTS_PER_STEP - 1).min(count);
            // Given up on a failure: the next step begins a new one (a repeated part would
            // not continue the parts before it).
            self.checkpointing = None;
            // A part changes no page: its delta (all zeros) is always the smaller form, so the
            // whole part is not compressed just to be compared.
            store.write_checkpoint_parts(c.start_pages, c.next..=through, now_ms, |c| {
                remember_wire(
                    &mut self.recent,
                    Recent { lsn: c.lsn, wire: WireEntry::delta(&c.delta), confirm: None },
                )
            })?;
            self.checkpointing = (through < count).then_some(Checkpointing { next: through + 1, ..c });
        }
        let first = store.journal().range().first();
        let horizon = now_ms.saturating_sub(policy.retention_ms);
        let newest_old = store.checkpoints().iter().rev().find(|c| c.time_ms <= horizon).copied();
        if let Some(cp) = newest_old.filter(|c| c.first > first) {
            store.trim_to(cp)?;
            drop(store);
            // The steps before the checkpoint go from the history too. Best effort: a history
            // that cannot be trimmed now (a damaged entry, a failed delete) is kept longer, and
            // never holds up the document's steps.
            if let Some(h) = &mut self.history {
                let _ = h.existing().and_then(|journal| {
                    if let Some(journal) = journal
                        && let Some(through) = history::trim_point(journal, cp.first)?
                    {
                        journal.remove_prefix(through)?;
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    }

    /// Where each committed page lives (see `protocol::PageMap`); `None` past `max_runs`.
    pub fn page_map(&self, max_runs: usize) -> Option<crate::protocol::PageMap> {
        let store = self.db.store();
        let at = store.journal().range().next();
        let runs = store.page_runs(max_runs)?;
        Some(crate::protocol::PageMap { at, page_count: store.page_count(), runs })
    }

    /// Bytes `offset..offset + buf.len()` of entry `lsn`'s payload.
    pub fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        Ok(self.db.store().journal().read_part(lsn, offset, buf)?)
    }

    /// A storage entry in wire form, whole: for a receiver that restarts at a checkpoint.
    pub fn read_wire_full(&self, lsn: Lsn) -> Result<WireEntry> {
        Ok(WireEntry::full_read(|out| self.db.store().journal().read_into(lsn, out))?)
    }

    /// A recent entry in wire form (often a delta, for a receiver that holds the entry before
    /// it), if it is still kept in memory.
    pub fn recent_wire(&self, lsn: Lsn) -> Option<&WireEntry> {
        self.recent_entry(lsn).map(|r| &r.wire)
    }

    /// A recent entry's confirmation for the client of `timeline`, if the entry applied that
    /// timeline's mutations alone (see `wire::Confirm`): for that client, when it holds the
    /// entry before it.
    pub fn recent_confirm(&self, lsn: Lsn, timeline: TimelineId) -> Option<&WireEntry> {
        let (tl, confirm) = self.recent_entry(lsn)?.confirm.as_ref()?;
        (*tl == timeline).then_some(confirm)
    }

    fn recent_entry(&self, lsn: Lsn) -> Option<&Recent> {
        let first = self.recent.front()?.lsn;
        let r = self.recent.get(usize::try_from(lsn.get().checked_sub(first.get())?).ok()?)?;
        (r.lsn == lsn).then_some(r)
    }

    /// Storage entries in wire form, for a receiver that holds everything before `range`.
    pub fn read_wire(&self, range: LsnRange) -> Result<Vec<WireEntry>> {
        range
            .iter()
            .map(|lsn| match self.recent_wire(lsn) {
                Some(wire) => Ok(wire.clone()),
                None => self.read_wire_full(lsn),
            })
            .collect()
    }

    /// The document as a plain `.sqlite` file, as of the last durable step.
    pub fn export(&self) -> Result<Vec<u8>> {
        Ok(self.db.store().export()?)
    }

    /// The highest LSN applied from `timeline`.
    pub fn applied_lsn(&self, timeline: TimelineId) -> Option<Lsn> {
        self.applied.get(&timeline).copied()
    }

    /// Reads what `receive` needs (the applied LSNs, the unacknowledged rejections) now, on
    /// the caller's thread (a job's: a reopen), rather than at the first `receive` (the
    /// hub's). Not at every open: an open document that is only read from would hold the
    /// schema and the statements (a thousand idle documents grew from 64 to 155 KiB each).
    /// Best effort: what fails is read again when needed.
    pub fn prepare(&mut self) {
        let _ = self.applied_as_stored();
        self.unacknowledged();
    }

    /// The next LSN this document needs from `timeline`: everything before it is applied or
    /// queued. Never too high: while `applied` is stale it can only be behind.
    pub fn next_expected(&self, timeline: TimelineId) -> Lsn {
        let queued = self.queues.get(&timeline).and_then(|q| q.back()).map(|(l, _, _)| *l);
        queued.or(self.applied.get(&timeline).copied()).map_or(Lsn::FIRST, Lsn::next)
    }

    /// Mutations received and not yet applied.
    pub fn queued(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// Takes timeline entries `first, first+1, ...`. Entries already applied or queued are
    /// ignored; entries after a gap are not taken (`next_expected` says where to resume).
    pub fn receive(&mut self, timeline: TimelineId, first: Lsn, entries: Vec<Vec<u8>>) -> Received {
        self.receive_from(timeline, first, entries, &Origin::default())
    }

    /// `receive`, recording who sent the entries and when they arrived (for the history).
    /// Nothing is taken of a timeline held back for its unacknowledged rejections
    /// (`MAX_TIMELINE_REJECTIONS`).
    pub fn receive_from(
        &mut self,
        timeline: TimelineId,
        first: Lsn,
        entries: Vec<Vec<u8>>,
        origin: &Origin,
    ) -> Received {
        if let Some(at) = origin.received_ms {
            self.clock_ms = self.clock_ms.max(at);
        }
        if self.held_back(timeline) {
            // Nothing taken until its client acknowledges its rejections: it sends these again.
            return Received { next_expected: first.min(self.next_expected(timeline)), accepted: 0 };
        }
        self.receive_unheld(timeline, first, entries, origin)
    }

    /// Takes what another handle of this document had queued and not applied (`take_queued`,
    /// a reopen), with the acknowledgements it had not acted on: its clients will not send it
    /// again. Nothing is refused for a hold here: the next step drops what is held and its
    /// clients are told (`take_dropped`), as after any step.
    pub fn carry_over(&mut self, from: &mut ServerDocument<R>) {
        for (timeline, lsn, entry, origin) in from.take_queued() {
            if self.receive_unheld(timeline, lsn, vec![entry], &origin).accepted == 0 {
                // Not taken (this handle cannot read what it applied yet, say): its client is
                // told where to send from, rather than left to think it was queued.
                self.dropped.insert(timeline);
            }
        }
        self.dropped.append(&mut from.dropped);
        for (timeline, through) in std::mem::take(&mut from.forget) {
            self.forget.entry(timeline).and_modify(|l| *l = (*l).max(through)).or_insert(through);
        }
    }

    fn receive_unheld(
        &mut self,
        timeline: TimelineId,
        first: Lsn,
        entries: Vec<Vec<u8>>,
        origin: &Origin,
    ) -> Received {
        if self.applied_as_stored().is_err() {
            // Nothing taken (it would be judged against a map that may be wrong): the client
            // sends it again. Not past `first`: a later batch's answer must not move the
            // client's acknowledged point beyond this one (the stale map is only ever behind).
            return Received { next_expected: first.min(self.next_expected(timeline)), accepted: 0 };
        }
        let queue = self.queues.entry(timeline).or_default();
        let done = queue.back().map(|(l, _, _)| *l).or(self.applied.get(&timeline).copied());
        let mut expected = done.map_or(Lsn::FIRST, Lsn::next);
        let mut accepted = 0;
        if first.get().checked_add(entries.len() as u64).is_none() {
            // Past the LSN space: nothing in it can be the next entry.
            return Received { next_expected: expected, accepted };
        }
        for (lsn, entry) in LsnRange::from_count(first, entries.len() as u64).iter().zip(entries) {
            if lsn < expected {
                continue;
            }
            if lsn > expected {
                break;
            }
            // Flow control: a full queue takes nothing more (the client sends it again
            // later); an empty one always takes one, so any mutation can get in.
            let cost = entry.len() + QUEUED_ENTRY_COST;
            if self.queued_bytes > 0 && self.queued_bytes + cost > MAX_QUEUED_BYTES {
                break;
            }
            self.queued_bytes += cost;
            queue.push_back((lsn, entry, origin.clone()));
            expected = expected.next();
            accepted += 1;
        }
        if queue.is_empty() {
            self.queues.remove(&timeline);
        }
        Received { next_expected: expected, accepted }
    }

    /// Takes every queued mutation out: (timeline, LSN, entry, origin), each timeline's in
    /// order. For carrying them over to the document opened again from its journal
    /// (`receive_from` each).
    pub fn take_queued(&mut self) -> Vec<(TimelineId, Lsn, Vec<u8>, Origin)> {
        self.queued_bytes = 0;
        std::mem::take(&mut self.queues)
            .into_iter()
            .flat_map(|(tl, q)| q.into_iter().map(move |(lsn, e, o)| (tl, lsn, e, o)))
            .collect()
    }

    /// Picks the next batch round-robin across timelines, within the step limits.
    /// Also each picked timeline's allowance: the rejections of it the step may record
    /// (`allowance`). Called after `drop_held_back`, so no queue left is of a held timeline.
    fn pick_batch(&mut self) -> (Vec<Picked>, Vec<Origin>, HashMap<TimelineId, usize>) {
        let keys: Vec<TimelineId> = self.queues.keys().copied().collect();
        let shares: HashMap<TimelineId, usize> = keys.iter().map(|tl| (*tl, self.allowance(*tl))).collect();
        let order = crate::protocol::window::round_robin(keys, self.rr_cursor);
        let mut taken: HashMap<TimelineId, usize> = HashMap::new();
        let (mut batch, mut origins, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        'rounds: loop {
            let mut progressed = false;
            for tl in &order {
                let n = taken.entry(*tl).or_default();
                let Some((lsn, m, origin)) = self.queues.get(tl).and_then(|q| q.get(*n)) else { continue };
                if batch.len() >= self.limits.max_mutations
                    || (bytes > 0 && bytes + m.len() > self.limits.max_bytes)
                {
                    break 'rounds;
                }
                bytes += m.len();
                batch.push((*tl, *lsn, m.clone()));
                origins.push(origin.clone());
                *n += 1;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.rr_cursor = batch.last().map(|(tl, _, _)| *tl);
        (batch, origins, shares)
    }

    /// Applies one batch and appends it as one durable storage entry. `now_ms` is the server's
    /// clock, passed in. `Ok(None)` when nothing was queued, or nothing that is not held back
    /// (`MAX_TIMELINE_REJECTIONS`; `take_dropped` names whose clients are to be told).
    /// Compaction (`set_compaction`) runs first, when it is due.
    pub fn step(&mut self, now_ms: i64) -> Result<Option<StepOutcome>> {
        // Each try that finds a timeline with no room holds that one back; a few per call, so
        // one call's cost stays bounded (what is left is still queued, and steps next time).
        self.clock_ms = self.clock_ms.max(now_ms);
        let clock = self.clock_ms;
        self.no_room.retain(|_, held| still_held(clock, *held, NO_ROOM_RETRY_MS));
        for attempt in 0..MAX_HELD_PER_STEP {
            let holding = self.no_room.len();
            let outcome = self.step_once(now_ms, attempt == 0)?;
            if outcome.is_some() || self.no_room.len() == holding {
                return Ok(outcome);
            }
        }
        Ok(None)
    }

    /// Whether a step is due with no mutation to take: acknowledgements that may make room
    /// for a timeline held back for want of it (a quiet document would never delete them).
    pub fn forget_due(&self) -> bool {
        !self.forget.is_empty() && !self.no_room.is_empty()
    }

    fn step_once(&mut self, now_ms: i64, compact: bool) -> Result<Option<StepOutcome>> {
        if self.queues.is_empty() && !self.forget_due() {
            return Ok(None);
        }
        self.applied_as_stored()?;
        // Steps are stamped in the order they run, whatever the clock did since the last one
        // (stepped back, or another server's in a cluster): the history finds `since` by
        // bisection on these times. Not past `MAX_CLOCK_AHEAD_MS`: an entry stamped far in the
        // future (a server with a wrong clock) must not pin every later time to it.
        let now_ms = match self.db.store().newest_time_ms() {
            Some(newest) if newest > now_ms && newest - now_ms <= MAX_CLOCK_AHEAD_MS => newest,
            _ => now_ms,
        };
        if compact {
            self.compact(now_ms)?;
        }
        if let Some(source) = &self.mutators {
            self.reducer.set_mutators(source());
        }
        // What a reopen carried over of a timeline held back goes now (its client is told).
        self.drop_held_back();
        let (batch, origins, allowance) = self.pick_batch();
        if batch.is_empty() {
            // A step of acknowledgements alone: only those sure to delete rows (its entry must
            // change a page).
            let pending: Vec<(TimelineId, Lsn)> = self.forget.iter().map(|(t, l)| (*t, *l)).collect();
            for (tl, through) in pending {
                if !self.rejections_exist(tl, through).unwrap_or(false) {
                    self.forget.remove(&tl);
                }
            }
            if !self.forget_due() {
                return Ok(None);
            }
        }
        let clamp = |client_ms: i64, _: usize| client_ms.min(now_ms.saturating_add(MAX_CLOCK_AHEAD_MS));
        let forget: Vec<(TimelineId, Lsn)> = self.forget.iter().map(|(t, l)| (*t, *l)).collect();
        // On error `apply_batch` restored the last durable state and the batch stays queued.
        let left = MAX_DOC_REJECTIONS.saturating_sub(self.unacknowledged().total);
        let live = Live { origins: &origins, allowance: &allowance, total: left.max(CROWDED_SHARE) };
        let (outcome, taken) = match self.apply_batch(&batch, &forget, clamp, now_ms, Some(live)) {
            Ok(done) => done,
            Err(e) => {
                let Some(tl) = self.starved.take() else { return Err(e) };
                // Not the document's fault but the room its rows need: that timeline waits
                // (its client told), and the next step goes on without it.
                self.no_room.insert(tl, self.clock_ms);
                self.drop_held_back();
                return Ok(None);
            }
        };
        if !forget.is_empty() {
            // Rows deleted (an acknowledgement is kept only when it deletes some): room for
            // those that had none, tried again once they waited `NO_ROOM_MIN_MS`.
            let clock = self.clock_ms;
            self.no_room.retain(|_, held| still_held(clock, *held, NO_ROOM_MIN_MS));
        }
        if outcome.rejected > 0 || !forget.is_empty() {
            self.unacknowledged = None;
        }
        self.forget.clear();
        self.forgotten.extend(forget);
        // The last served is the last taken: a step that ended early (a timeline's rejections
        // reached its allowance) must not have the rest of its batch count as served, or a
        // timeline that ends steps early would come first every time.
        if let Some((tl, _, _)) = batch[..taken].last() {
            self.rr_cursor = Some(*tl);
        }
        for (tl, lsn, _) in &batch[..taken] {
            let q = self.queues.get_mut(tl).expect("BUG: picked from this queue");
            let (_, entry, _) = q.pop_front().expect("BUG: picked from this queue");
            self.queued_bytes -= entry.len() + QUEUED_ENTRY_COST;
            if q.is_empty() {
                self.queues.remove(tl);
            }
            self.applied.insert(*tl, *lsn);
        }
        if self.unacknowledged.is_none() {
            // Counted here, on the step's thread, not at the next `receive`; what is held
            // back now goes.
            self.unacknowledged();
            self.drop_held_back();
        }
        Ok(Some(outcome))
    }

    /// Re-applies a recorded step (from another replica's storage entry): the same mutations in
    /// the same order with the recorded clocks (`entry_time_ms` is the entry's), deleting the
    /// same rejections (`forgotten`). Used to verify determinism and to rebuild a document
    /// from its mutations.
    pub fn replay_step(
        &mut self,
        recorded: &[(Applied, Vec<u8>)],
        forgotten: &[(TimelineId, Lsn)],
        entry_time_ms: i64,
    ) -> Result<StepOutcome> {
        self.applied_as_stored()?;
        let batch: Vec<(TimelineId, Lsn, Vec<u8>)> =
            recorded.iter().map(|(a, bytes)| (a.timeline, a.lsn, bytes.clone())).collect();
        let (outcome, taken) =
            self.apply_batch(&batch, forgotten, |_, i| recorded[i].0.time_ms, entry_time_ms, None)?;
        if taken != batch.len() {
            return Err(Error::Malformed(format!(
                "replaying a step of {} mutations applied only {taken}: the replay diverged",
                batch.len()
            )));
        }
        for (a, _) in recorded {
            self.applied.insert(a.timeline, a.lsn);
        }
        if outcome.rejected > 0 || !forgotten.is_empty() {
            self.unacknowledged = None;
        }
        Ok(outcome)
    }

    /// Runs `VACUUM` (outside any mutation: it cannot run in a transaction) and records the
    /// rewritten pages as one storage entry. Returns its LSN, if anything changed.
    pub fn vacuum(&mut self, now_ms: i64) -> Result<Option<Lsn>> {
        if let Err(e) = self.db.conn().execute_batch("VACUUM") {
            let e = self.db.explain(e);
            self.db.store().rollback_failed_step()?;
            return Err(e);
        }
        let committed = self.db.store().commit_overlay(&[], &[], now_ms);
        match committed {
            Ok(committed) => {
                let lsn = committed.as_ref().map(|c| c.lsn);
                remember(&mut self.recent, committed, None);
                Ok(lsn)
            }
            Err(e) => {
                self.db.store().rollback_failed_step()?;
                Err(e.into())
            }
        }
    }

    /// Applies `batch` (or a prefix of it) in one transaction; returns the outcome and how many
    /// of `batch` it took. A mutation that ends the transaction itself is marked rejected and
    /// the batch restarts without it: at most one restart per mutation, and a replay takes the
    /// same path, so the pages stay deterministic. A mutation that would take the step past
    /// `MAX_STEP_PAGES` ends the batch before it, or is rejected when it comes first. With
    /// `may_end_early` (a live step, not a replay), the batch also ends once its mutations
    /// have run `max_step_vm_steps`, or once it has run for `max_mutation_cpu`. A live step
    /// (`origins`: who sent each mutation) records its mutations in the history; a replay
    /// takes exactly the recorded batch and records nothing.
    fn apply_batch(
        &mut self,
        batch: &[(TimelineId, Lsn, Vec<u8>)],
        forget: &[(TimelineId, Lsn)],
        time_of: impl Fn(i64, usize) -> i64,
        entry_time_ms: i64,
        live: Option<Live<'_>>,
    ) -> Result<(StepOutcome, usize)> {
        let may_end_early = live.is_some();
        let mut lost: HashMap<usize, Rejection> = HashMap::new();
        let mut isolated: Vec<usize> = Vec::new();
        let mut len = batch.len();
        // Instructions spent by mutations that ended the transaction: they count against the
        // step's budget in the restarts too, so a run of them cannot hold the step for long.
        let mut burned = 0;
        // Instructions that each work through a large value take far more time than the
        // instruction budget counts: the batch also ends once it has run for one mutation's
        // CPU time, so a queue of such mutations holds a step thread for a second at a time.
        let time_budget = self
            .limits
            .max_mutation_cpu
            .filter(|_| may_end_early)
            .and_then(|max| Some((step_started()?, max)));
        loop {
            let budget = may_end_early.then(|| self.limits.max_step_vm_steps.saturating_sub(burned));
            let attempt =
                Attempt { forget, lost: &lost, entry_time_ms, vm_budget: budget, time_budget, live };
            match self.try_apply_batch(&batch[..len], &time_of, attempt) {
                Err((Some(i), Error::TransactionLost(r))) => {
                    burned += self.db.last_vm_steps();
                    self.restore_committed()?;
                    assert!(lost.insert(i, r).is_none(), "BUG: a skipped mutation ran again");
                }
                Err((Some(i), Error::StepFull { max_pages })) => {
                    self.restore_committed()?;
                    if i > 0 {
                        len = i;
                        continue;
                    }
                    let why = format!(
                        "the mutation changes more than {max_pages} pages ({} MiB), more than one step may hold",
                        (max_pages * PAGE_SIZE) >> 20
                    );
                    assert!(
                        lost.insert(i, Rejection::new(RejectionCode::TooBig, why)).is_none(),
                        "BUG: ran again"
                    );
                    isolated.push(i);
                }
                Err((Some(i), e)) if !e.is_io() && !self.db.store().has_last_error() => {
                    // The reducer failed on this mutation, not the storage: it is rejected, and
                    // the same happens on a replay, so the pages stay deterministic.
                    self.restore_committed()?;
                    let why = format!("the server could not apply the mutation: {e}");
                    assert!(
                        lost.insert(i, Rejection::new(RejectionCode::Error, why)).is_none(),
                        "BUG: ran again"
                    );
                    isolated.push(i);
                }
                Err((None, e @ (Error::Sqlite(_) | Error::StepFull { .. })))
                    if !e.is_io() && !self.db.store().has_last_error() =>
                {
                    // The step failed after its mutations ran (at its COMMIT), with none of them
                    // to blame and not for I/O: the same batch would fail at every retry, and
                    // the document would never move again. The first mutation goes alone, and
                    // failing alone it is rejected (a replay takes the same path).
                    self.restore_committed()?;
                    if len > 1 {
                        len = 1;
                        continue;
                    }
                    if lost.contains_key(&0) {
                        // Not even its rejection commits. For want of room for pagesync's
                        // rows (at the size cap, its slack full), a live step holds that
                        // timeline back instead (`no_room`): every step would fail here, and
                        // the document would never move again. Otherwise the document's fault.
                        self.load_applied()?;
                        if may_end_early && is_full(&e) {
                            self.starved = batch.first().map(|(tl, _, _)| *tl);
                        }
                        return Err(e);
                    }
                    let code = if matches!(e, Error::StepFull { .. }) {
                        RejectionCode::TooBig
                    } else {
                        RejectionCode::Error
                    };
                    let why = format!("the step could not commit with the mutation in it: {e}");
                    lost.insert(0, Rejection::new(code, why));
                    isolated.push(0);
                }
                Err((_, e)) => {
                    // Back to the last durable state, for every caller (step and replay).
                    self.restore_committed()?;
                    self.load_applied()?;
                    return Err(e);
                }
                Ok((mut outcome, taken)) => {
                    for r in &mut outcome.rejections {
                        r.isolated =
                            isolated.iter().any(|i| batch[*i].0 == r.timeline && batch[*i].1 == r.lsn);
                    }
                    return Ok((outcome, taken));
                }
            }
        }
    }

    /// Ends any open transaction and drops the overlay: SQLite sees the last durable state.
    fn restore_committed(&mut self) -> Result<()> {
        let _ = self.db.conn().execute_batch("ROLLBACK");
        self.db.store().rollback_failed_step()?;
        Ok(())
    }

    /// Runs `f` (pagesync's own writes) with the caps lifted: the page cap to the document's
    /// plus slack, the overlay to a whole step; then puts the mutations' overlay cap back.
    fn with_system_room<T>(&self, f: impl FnOnce() -> T) -> T {
        self.with_system_room_leaving(0, f)
    }

    /// `with_system_room`, leaving `reserve` pages of the slack unused.
    fn with_system_room_leaving<T>(&self, reserve: u32, f: impl FnOnce() -> T) -> T {
        self.db.lift_page_cap_leaving(reserve);
        self.db.store().set_max_overlay_pages(Some(MAX_STEP_PAGES));
        let out = f();
        self.db.store().set_max_overlay_pages(Some(MAX_STEP_PAGES - STEP_SYSTEM_PAGES));
        out
    }

    /// Records a rejection in the replicated table.
    fn record_rejection(&self, tl: TimelineId, lsn: Lsn, r: &Rejection) -> rusqlite::Result<()> {
        // Never the last of the slack: the applied LSNs and the deletes of acknowledged rows
        // always have room, so only a rejection can find none (`no_room`).
        self.with_system_room_leaving(crate::db::SYSTEM_RESERVE_PAGES, || {
            self.db
                .conn()
                .prepare_cached(
                    "INSERT OR REPLACE INTO _pagesync_rejections(timeline, lsn, code, message) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(rusqlite::params![&tl.0[..], lsn.get() as i64, r.code.as_str(), r.message])
                .map(|_| ())
        })
    }

    /// One attempt at a batch; an error says which mutation caused it, if one did.
    fn try_apply_batch(
        &mut self,
        batch: &[(TimelineId, Lsn, Vec<u8>)],
        time_of: &impl Fn(i64, usize) -> i64,
        attempt: Attempt<'_>,
    ) -> std::result::Result<(StepOutcome, usize), (Option<usize>, Error)> {
        let Attempt { forget, lost, entry_time_ms, vm_budget, time_budget, live } = attempt;
        let origins = live.map(|l| l.origins);
        let mut rejected_of: HashMap<TimelineId, usize> = HashMap::new();
        // A timeline's rejections reached its allowance: the step ends there.
        let mut capped = false;
        let conn_err = |e: rusqlite::Error| (None, Error::from(e));
        crate::db::run_cached(self.db.conn(), "BEGIN IMMEDIATE").map_err(conn_err)?;
        let mut applied = Vec::with_capacity(batch.len());
        let mut last: BTreeMap<TimelineId, Lsn> = BTreeMap::new();
        let (mut rejections, mut vm_steps) = (Vec::new(), 0u64);
        // A mutation ran at another time than its client's (clamped): no confirmation.
        let mut moved_in_time = false;
        for (i, (tl, lsn, bytes)) in batch.iter().enumerate() {
            // A mutation known to end the transaction is skipped: it runs no instructions.
            // Outside the sender's grant: rejected without running (a live step only).
            let forbidden = origins.and_then(|o| {
                let o = &o[i];
                let body = Mutation::decode(bytes).ok()?.body;
                let why = o.permit.as_ref()?.refuse(&body, &o.subject)?;
                Some(Rejection::new(RejectionCode::Forbidden, why))
            });
            let (time_ms, result, steps) = match forbidden.as_ref().or(lost.get(&i)) {
                Some(r) => (time_of(decoded_time(bytes), i), Err(r.clone()), 0),
                None => {
                    let (time_ms, result) = self
                        .apply_one(bytes, |client_ms| {
                            let at = time_of(client_ms, i);
                            moved_in_time |= at != client_ms;
                            at
                        })
                        .map_err(|e| (Some(i), e))?;
                    (time_ms, result, self.db.last_vm_steps())
                }
            };
            if let Err(r) = result {
                self.record_rejection(*tl, *lsn, &r).map_err(conn_err)?;
                rejections.push(Rejected { timeline: *tl, lsn: *lsn, rejection: r, isolated: false });
                if let Some(live) = live {
                    let n = rejected_of.entry(*tl).or_default();
                    *n += 1;
                    capped |= live.allowance.get(tl).is_some_and(|a| *n >= *a);
                    capped |= rejections.len() >= live.total;
                }
            }
            applied.push(Applied { timeline: *tl, lsn: *lsn, time_ms });
            last.insert(*tl, *lsn);
            vm_steps += steps;
            // Past the budget the step ends, but not before the mutations already known to end
            // the transaction: they are recorded now (skipped, so they cost nothing), never
            // run again in a later step.
            let spent = vm_budget.is_some_and(|max| vm_steps >= max)
                || time_budget.as_ref().is_some_and(|(started, max)| step_ran(started) >= *max);
            if (spent || capped) && lost.keys().all(|&j| j <= i) {
                break;
            }
        }
        let system = |e| (None, self.db.explain(e));
        self.with_system_room(|| delete_rejections(self.db.conn(), forget)).map_err(system)?;
        // The commit writes the pages out: with the room for pagesync's rows too.
        self.with_system_room(|| {
            record_applied(self.db.conn(), &last)
                .and_then(|()| crate::db::run_cached(self.db.conn(), "COMMIT"))
        })
        .map_err(system)?;
        let entry = origins.and_then(|origins| {
            let taken = applied.len();
            self.history_entry(&batch[..taken], &origins[..taken], &rejections, entry_time_ms)
        });
        let committed = self.commit_step(entry, &applied, forget, entry_time_ms).map_err(|e| (None, e))?;
        let c = committed.as_ref().expect("BUG: a step with mutations records them");
        let lsn = c.lsn;
        // The client of a step that applied its mutations alone, none rejected, each at its
        // own time, can make these pages itself: it is sent a confirmation instead. Only when
        // the step took every mutation of its that arrived: a client with more pending would
        // have to replay these (where applying the pages costs less).
        let took_all = |tl: &TimelineId| self.queues.get(tl).map_or(0, VecDeque::len) == applied.len();
        let confirm = match (&applied[..], last.len()) {
            ([first, .., end] | [first @ end], 1)
                if rejections.is_empty() && !moved_in_time && took_all(&first.timeline) =>
            {
                let confirm = crate::wire::Confirm {
                    first: first.lsn,
                    more: end.lsn.get() - first.lsn.get(),
                    time_after_ms: entry_time_ms.wrapping_sub(end.time_ms),
                    forgotten: forget.to_vec(),
                    digest: crate::wire::digest(&c.payload),
                };
                Some((first.timeline, WireEntry::confirm(&confirm)))
            }
            _ => None,
        };
        remember(&mut self.recent, committed, confirm);
        let rejected = rejections.len();
        let forgotten = forget.len();
        Ok((StepOutcome { lsn, applied: applied.len(), rejected, rejections, forgotten }, applied.len()))
    }

    /// Commits a step: its storage entry, and its history entry (`entry`, if the document keeps
    /// one) durably before it, or beside it (`write_history_beside`). A reader lists a history
    /// entry only once the storage entry it names says the same (see `history`).
    fn commit_step(
        &mut self,
        entry: Option<Vec<u8>>,
        applied: &[Applied],
        forget: &[(TimelineId, Lsn)],
        time_ms: i64,
    ) -> Result<Option<crate::store::Committed>> {
        let (Some(entry), Some(h)) = (entry, self.history.as_mut()) else {
            return Ok(self.db.store().commit_overlay(applied, forget, time_ms)?);
        };
        let mut store = self.db.store();
        if h.beside.is_none() || !store.can_unstage() {
            drop(store);
            h.append(&entry)?;
            return Ok(self.db.store().commit_overlay(applied, forget, time_ms)?);
        }
        if !h.marked {
            let from = store.journal().range().next();
            (h.beside.as_mut().expect("BUG: just looked"))(from)?;
            h.marked = true;
        }
        // Opened (when it must be) before the storage entry is staged, so that a failure to
        // open leaves nothing to take back.
        h.journal()?;
        let Some(staged) = store.stage_overlay(applied, forget, time_ms)? else {
            return Err(Error::Malformed("BUG: a step with mutations wrote no storage entry".into()));
        };
        // Written on another thread, and put back. Should either side panic, the journal goes
        // with the panic (the step fails, and the next one opens the journal again).
        let mut journal = h.journal.take().expect("BUG: opened above");
        let write = move || {
            let written = journal.append(&entry);
            (journal, entry, written)
        };
        let ((journal, entry, written), synced) = at_once(write, || store.sync_journal());
        h.journal = Some(journal);
        // Once the storage sync failed, the step fails whatever the history append gave: no
        // second try then (a `Fenced` one would open the journal again).
        let written = if synced.is_ok() { h.settle(written, &entry) } else { Ok(()) };
        match (synced, written) {
            (Ok(()), Ok(())) => Ok(Some(store.finish_staged(staged))),
            // The journal cut the entry off (and refuses writes until it is opened again).
            (Err(e), _) => Err(e.into()),
            // Durable without its history: taken back (or, if that fails, when the document is
            // opened again), as if the step had never run.
            (Ok(()), Err(e)) => {
                store.unstage(staged)?;
                Err(e)
            }
        }
    }

    /// The history entry of a step about to commit (`batch`, the mutations it took), if the
    /// document keeps a history.
    fn history_entry(
        &self,
        batch: &[(TimelineId, Lsn, Vec<u8>)],
        origins: &[Origin],
        rejections: &[Rejected],
        entry_time_ms: i64,
    ) -> Option<Vec<u8>> {
        self.history.as_ref()?;
        let storage_lsn = self.storage_range().next();
        let rejected: HashMap<(TimelineId, Lsn), &Rejection> =
            rejections.iter().map(|r| ((r.timeline, r.lsn), &r.rejection)).collect();
        let records: Vec<history::StepRecord<'_>> = batch
            .iter()
            .zip(origins)
            .map(|((timeline, lsn, mutation), origin)| history::StepRecord {
                timeline: *timeline,
                lsn: *lsn,
                origin,
                rejection: rejected.get(&(*timeline, *lsn)).copied(),
                mutation,
            })
            .collect();
        Some(history::step_entry(storage_lsn, entry_time_ms, &records))
    }

    /// Where the document's mutator definitions come from: asked before every step, so a
    /// reload is in force from the next one.
    pub fn set_mutators(&mut self, source: MutatorSource) {
        self.reducer.set_mutators(source());
        self.mutators = Some(source);
    }

    /// Gives the document a history journal: every later step records its mutations there
    /// (see `history`). Opened at the first write.
    pub fn set_history(&mut self, open: HistoryOpener) {
        self.history = Some(HistoryLog { open, journal: None, beside: None, marked: false });
    }

    /// The history journal, opened already (`set_history` opens it at the first write).
    pub fn set_history_journal(&mut self, journal: Box<dyn Journal>) {
        if let Some(h) = &mut self.history {
            h.journal = Some(journal);
        }
    }

    /// Steps write their history entry beside their storage entry, the two appends' barriers
    /// at once (one fsync's wait rather than two), when the storage journal can take its newest
    /// entry back: `mark` records from which storage LSN on (before the first such step), so
    /// that opening the document again takes back a step whose storage entry became durable
    /// while its history entry did not (`history::records_step`; a crash between the two).
    /// Such a step was never acknowledged: its clients send its mutations again. Without this,
    /// the history entry is durable before the storage entry is written.
    pub fn write_history_beside(&mut self, mark: PairingMark) {
        if let Some(h) = &mut self.history {
            h.beside = Some(mark);
        }
    }

    /// Lists the document's history (see `history::read`): the records of committed steps.
    /// Empty for a document without one.
    pub fn read_history(&mut self, query: &HistoryQuery) -> Result<HistoryPage> {
        let Some(h) = &mut self.history else { return Ok(HistoryPage::default()) };
        let Some(history) = h.existing()? else { return Ok(HistoryPage::default()) };
        history::read(history, self.db.store().journal(), query)
    }

    /// A subscriber of `timeline` has copied that timeline's rejections through `through`
    /// into its own outcome journal (`StorageAck`): the next step deletes them from the
    /// replicated table (and records that in its entry, so a replay does the same). Bounded
    /// by what was applied from the timeline; a repeat costs nothing.
    pub fn forget_rejections(&mut self, timeline: TimelineId, through: Lsn) {
        let Some(applied) = self.applied.get(&timeline) else { return };
        let through = through.min(*applied);
        let done = self.forget.get(&timeline).or(self.forgotten.get(&timeline));
        // Kept only when it deletes something: an acknowledgement lets a held timeline in
        // (and a step run, `forget_due`), which one that deletes nothing must not.
        if done.is_some_and(|d| *d >= through) {
            return;
        }
        // Counted, with none of this timeline's: no lookup (every subscriber that ever wrote
        // acknowledges every entry it gets).
        if self.unacknowledged.as_ref().is_some_and(|u| !u.of.contains_key(&timeline)) {
            return;
        }
        // When the table cannot be read, kept: the step deletes what there is.
        if self.rejections_exist(timeline, through).unwrap_or(true) {
            self.forget.insert(timeline, through);
        }
    }

    /// Whether `timeline` has rejections at or below `through` in the table (a lookup by its
    /// primary key).
    fn rejections_exist(&self, timeline: TimelineId, through: Lsn) -> rusqlite::Result<bool> {
        let exists = "SELECT EXISTS(SELECT 1 FROM _pagesync_rejections WHERE timeline = ?1 AND lsn <= ?2)";
        self.db
            .conn()
            .prepare_cached(exists)?
            .query_row(rusqlite::params![&timeline.0[..], through.get() as i64], |r| r.get::<_, bool>(0))
    }

    /// The committed rejections per timeline, counted when not known (a table of a few
    /// thousand rows: `MAX_DOC_REJECTIONS` and what one step adds past it).
    fn unacknowledged(&mut self) -> &Unacknowledged {
        if self.unacknowledged.is_none() {
            let counted = (|| -> rusqlite::Result<Unacknowledged> {
                let conn = self.db.conn();
                let mut stmt = conn.prepare_cached(
                    "SELECT timeline, count(*) FROM _pagesync_rejections GROUP BY timeline",
                )?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))?;
                let mut counts = Unacknowledged::default();
                for row in rows {
                    let (tl, n) = row?;
                    if let Ok(tl) = <[u8; 16]>::try_from(tl.as_slice()) {
                        counts.of.insert(TimelineId(tl), n as usize);
                        counts.total += n as usize;
                    }
                }
                Ok(counts)
            })();
            match counted {
                Ok(counted) => self.unacknowledged = Some(counted),
                // Unreadable (a document before its first step has no table): nobody is held,
                // and it is counted again when next asked.
                Err(_) => return &NONE_COUNTED,
            }
        }
        self.unacknowledged.as_ref().expect("BUG: counted above")
    }

    /// Whether `timeline` has more unacknowledged rejections than it may
    /// (`MAX_TIMELINE_REJECTIONS`, or any while the document is past `MAX_DOC_REJECTIONS`):
    /// its mutations are not taken then, unless an acknowledgement of its is about to delete
    /// some (it goes in the next step).
    fn held_back(&mut self, timeline: TimelineId) -> bool {
        // Before the acknowledgement: it is the step that applies it, with or without
        // mutations (`forget_due`), that makes room, not the held mutation's own step.
        if self.no_room.get(&timeline).is_some_and(|held| still_held(self.clock_ms, *held, NO_ROOM_RETRY_MS))
        {
            return true;
        }
        if self.forget.contains_key(&timeline) {
            return false;
        }
        let counts = self.unacknowledged();
        let own = counts.of.get(&timeline).copied().unwrap_or(0);
        own >= MAX_TIMELINE_REJECTIONS || (own > 0 && counts.total >= MAX_DOC_REJECTIONS)
    }

    /// How many rejections of `timeline` one step may record before it ends: as many as take
    /// it to `MAX_TIMELINE_REJECTIONS`, and one while the document is past
    /// `MAX_DOC_REJECTIONS`; at least one (a timeline whose acknowledgement is due goes on).
    /// Mutations that are applied cost none: a burst of good writes is one step.
    fn allowance(&mut self, timeline: TimelineId) -> usize {
        let counts = self.unacknowledged();
        let own = counts.of.get(&timeline).copied().unwrap_or(0);
        let share = MAX_TIMELINE_REJECTIONS.saturating_sub(own);
        // Past the document's bound, one: a timeline with none adds one before it is held, and
        // one with some is in only for an acknowledgement about to be acted on.
        let share = if counts.total >= MAX_DOC_REJECTIONS { 1 } else { share };
        share.max(1)
    }

    /// Drops the queued mutations of every timeline held back: none was applied, so their
    /// clients send them again (told by `next_expected`: `take_dropped` names them), and
    /// meanwhile they hold no room in the queue that others need.
    fn drop_held_back(&mut self) {
        let timelines: Vec<TimelineId> = self.queues.keys().copied().collect();
        for tl in timelines {
            if self.held_back(tl)
                && let Some(q) = self.queues.remove(&tl)
            {
                self.queued_bytes -= q.iter().map(|(_, e, _)| e.len() + QUEUED_ENTRY_COST).sum::<usize>();
                self.dropped.insert(tl);
            }
        }
    }

    /// The timelines whose queued mutations were dropped since the last call (held back for
    /// their unacknowledged rejections): their clients are to be told where to send from
    /// again (`next_expected`), and to acknowledge what they hold.
    pub fn take_dropped(&mut self) -> Vec<TimelineId> {
        std::mem::take(&mut self.dropped).into_iter().collect()
    }

    /// Decodes and applies one mutation; returns the time it ran with and its outcome.
    fn apply_one(
        &mut self,
        bytes: &[u8],
        time_of: impl FnOnce(i64) -> i64,
    ) -> Result<(i64, Result<(), Rejection>)> {
        if bytes.len() > self.limits.max_mutation_bytes {
            let max = self.limits.max_mutation_bytes;
            let why = format!("the mutation is {} bytes, over this server's limit of {max}", bytes.len());
            return Ok((time_of(0), Err(Rejection::new(RejectionCode::TooBig, why))));
        }
        let m = match Mutation::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                let code = if bytes.len() > MAX_MUTATION_BYTES {
                    RejectionCode::TooBig
                } else {
                    RejectionCode::Malformed
                };
                return Ok((time_of(0), Err(Rejection::new(code, e.to_string()))));
            }
        };
        let time_ms = time_of(m.client_time_ms);
        let result = apply_mutation(&self.db, &mut self.reducer, &m, time_ms)?;
        Ok((time_ms, result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Every history entry written beside a step goes to the same companion thread: none is
    /// started per step.
    #[test]
    fn history_entries_are_written_on_one_companion_thread() {
        let here = std::thread::current().id();
        let ran: Vec<_> =
            (0..50).map(|i| at_once(move || (i, std::thread::current().id()), || i * 2)).collect();
        let companion = ran[0].0.1;
        assert_ne!(companion, here, "written beside this thread, not on it");
        for (i, ((n, thread), synced)) in ran.into_iter().enumerate() {
            assert_eq!((n, synced), (i, i * 2), "each call gets its own results");
            assert_eq!(thread, companion, "call {i} ran on another thread");
        }
    }

    /// A panic on either side reaches the caller only once the write has ended (it holds the
    /// history journal), and the companion serves the next call.
    #[test]
    fn a_panic_on_either_side_waits_for_the_write() {
        let done = Arc::new(AtomicBool::new(false));
        let written = done.clone();
        let slow_write = move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            written.store(true, Ordering::SeqCst);
        };
        let sync_panics = std::panic::catch_unwind(|| at_once(slow_write, || panic!("sync")));
        assert!(sync_panics.is_err(), "the panic of `sync` reaches the caller");
        assert!(done.load(Ordering::SeqCst), "it did so before the write had ended");
        let write_panics = std::panic::catch_unwind(|| at_once(|| panic!("write"), || 1));
        assert!(write_panics.is_err(), "the panic of `write` reaches the caller");
        assert_eq!(at_once(|| 2, || 3), (2, 3), "the companion serves the next call");
    }
}
