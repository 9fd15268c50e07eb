//! The blocking work on one document, planned by `ServerSession` and run by its driver.
//!
//! Everything that waits on a disk or an object store is a [`DocJob`]: opening a document
//! (and checking that it exists), stepping it (SQLite, fsync, puts; reopening its journal
//! first when it refused writes), reading storage entries ahead for subscribers that are
//! behind the entries kept in memory, and exporting it. `ServerSession::poll_job` hands a job
//! out with the document in it, the driver runs it wherever it likes (`DocJob::run`), and
//! `ServerSession::job_done` takes the result back. The session never waits for a job, so a
//! slow disk, a slow object store or a large document holds up that document alone.

use std::sync::Arc;

use pagesync_journal::Lsn;

use super::server::ConnId;
use super::{DOC_WINDOW_BYTES, MAX_MAP_RUNS, Message, codes};
use crate::error::Result;
use crate::ids::DocId;
use crate::server::{ServerDocument, StepOutcome};
use crate::wire::WireEntry;

/// Opens (or creates) a document's storage. Called from the driver's job threads.
pub type Opener = Arc<dyn Fn(DocId) -> Result<ServerDocument> + Send + Sync>;

/// Whether a document exists in storage (without creating it). Called from job threads.
pub type Exists = Arc<dyn Fn(DocId) -> Result<bool> + Send + Sync>;

/// The session's clock, shared with jobs that run elsewhere.
pub(super) type SharedClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Bytes of storage entries one job reads for subscribers that are behind (at least one
/// entry): 4 MiB, a quarter of a subscriber's window, so the first bytes of a download go out
/// after a short read and the next read overlaps their sending.
pub const FETCH_BYTES: usize = 4 << 20;

/// Bytes of entries read ahead that one document keeps for its subscribers: a window and a
/// read (20 MiB), dropped as its subscribers acknowledge them, and bounded over every document
/// by `SessionOptions::max_read_ahead_bytes`: room for a window sent and not acknowledged
/// (kept for a resend) and the next read, so a read is not dropped before it is sent. With
/// `RECENT_WIRE_BYTES` this is what a document with subscribers far behind costs in memory.
pub const MAX_FETCHED_BYTES: usize = DOC_WINDOW_BYTES + FETCH_BYTES;

/// One document's blocking work, taken out of the session by `poll_job`, run anywhere
/// (`run`, on a worker thread), and handed back with `job_done`.
pub struct DocJob {
    pub(super) doc: DocId,
    pub(super) work: Work,
    pub(super) now_ms: i64,
    pub(super) clock: Option<SharedClock>,
}

pub(super) enum Work {
    /// Open the document; without `create`, only if `exists` says it is there.
    Open { opener: Opener, exists: Option<Exists>, create: bool },
    /// Work on an open document, in this order: reopen its journal (`reopen`), take a step,
    /// read entries from `fetch` on, export it.
    Run {
        document: Box<ServerDocument>,
        reopen: Option<Opener>,
        step: bool,
        fetch: Option<Lsn>,
        export: bool,
        /// `MapPages` and `ReadPages` to answer, with the connection that asked.
        asks: Vec<(ConnId, Message)>,
    },
}

impl std::fmt::Debug for DocJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.work {
            Work::Open { .. } => "open",
            Work::Run { .. } => "run",
        };
        f.debug_struct("DocJob").field("doc", &self.doc).field("work", &what).finish()
    }
}

/// A finished `DocJob`, for `job_done`.
#[derive(Debug)]
pub struct JobDone {
    pub(super) doc: DocId,
    pub(super) outcome: Outcome,
}

#[derive(Debug)]
pub(super) enum Outcome {
    Opened(std::result::Result<Box<ServerDocument>, OpenFailure>),
    Ran(Box<Ran>),
}

/// Why a document could not be opened.
#[derive(Debug)]
pub(super) enum OpenFailure {
    /// It does not exist and the job was not to create it.
    NotFound,
    /// Another server holds its lease: the server at this URL serves it.
    Moved(String),
    /// This server may not serve documents now (`Error::Unavailable`), or its storage does
    /// not answer.
    Unavailable(Told),
    /// It was deleted: it is not created again.
    Deleted,
    Error(Told),
}

/// A failure as the server tells it: `public` to clients (its kind: `Error::public`), `detail`
/// to its log only.
#[derive(Clone, Debug)]
pub(super) struct Told {
    pub(super) public: String,
    pub(super) detail: String,
    /// It may pass (`Error::is_transient_storage`): asking again later may succeed.
    pub(super) passes: bool,
}

impl Told {
    pub(super) fn of(e: &crate::Error) -> Told {
        Told { public: e.public(), detail: e.to_string(), passes: e.is_transient_storage() }
    }

    /// A panic: clients hear that there was an internal error, the log gets its message.
    fn panic(message: String) -> Told {
        Told { public: format!("an internal error {}", super::SEE_THE_LOG), detail: message, passes: false }
    }
}

impl OpenFailure {
    fn of(e: crate::Error) -> OpenFailure {
        match e {
            crate::Error::Moved { owner } => OpenFailure::Moved(owner),
            crate::Error::Unavailable(why) => {
                OpenFailure::Unavailable(Told { public: why.clone(), detail: why, passes: true })
            }
            crate::Error::Deleted => OpenFailure::Deleted,
            // The storage did not answer (S3 away, a failed read): it may a moment later, and
            // the client subscribes again by itself; a corrupt journal is an error that stays.
            e if e.is_transient_storage() => OpenFailure::Unavailable(Told::of(&e)),
            e => OpenFailure::Error(Told::of(&e)),
        }
    }
}

/// What a `Work::Run` did.
#[derive(Debug)]
pub(super) struct Ran {
    pub(super) document: Box<ServerDocument>,
    /// Its journal was opened again (`reopen`).
    pub(super) reopened: bool,
    /// Opening it again found that another server holds its lease now (at this URL): it is
    /// closed here, and its clients go there.
    pub(super) moved: Option<String>,
    /// Each step's outcome and duration.
    pub(super) steps: Vec<(StepOutcome, Option<u64>)>,
    pub(super) failure: Option<Failure>,
    /// What a read ahead found, if the job read.
    pub(super) fetched: Option<Fetched>,
    pub(super) exported: Option<std::result::Result<Vec<u8>, super::ExportError>>,
    /// The answers to `asks`, for the connections that asked.
    pub(super) answers: Vec<(ConnId, Message)>,
    /// What failed while exporting or answering (what it was doing, the whole error), for the
    /// log: those who asked were told its kind only.
    pub(super) failed: Vec<(&'static str, String)>,
}

/// Entries read ahead, whole, in LSN order, and the error that stopped the read, if any.
#[derive(Debug, Default)]
pub(super) struct Fetched {
    pub(super) entries: Vec<(Lsn, WireEntry)>,
    pub(super) error: Option<(Lsn, Told)>,
}

/// Why a document's step did not complete.
#[derive(Debug)]
pub(super) enum Failure {
    /// An error; the queue stays and the step is retried. With `reopen`, the document's
    /// journal refuses writes until it is reopened: the retry opens it again first.
    Error { why: Told, reopen: bool },
    /// A panic: the document's state cannot be trusted; it is closed (and reopened from its
    /// journal on next use).
    Panicked(String),
}

impl DocJob {
    pub fn doc(&self) -> DocId {
        self.doc
    }

    /// Does the work: blocking (SQLite, fsync, object-store requests). A panic in it is caught
    /// and reported, never propagated.
    pub fn run(self) -> JobDone {
        let DocJob { doc, work, now_ms, clock } = self;
        let outcome = match work {
            Work::Open { opener, exists, create } => Outcome::Opened(open(doc, &opener, exists, create)),
            Work::Run { mut document, reopen, step, fetch, export, asks } => {
                let reopen = reopen.map(|opener| reopen_journal(doc, &mut document, &opener));
                let reopened = matches!(reopen, Some(Ok(true)));
                let moved = match reopen {
                    Some(Err(OpenFailure::Moved(owner))) => Some(owner),
                    _ => None,
                };
                let (steps, failure) = if step && moved.is_none() {
                    step_document(&mut document, now_ms, clock.as_ref())
                } else {
                    (Vec::new(), None)
                };
                let broken = matches!(failure, Some(Failure::Panicked(_)));
                let fetched = fetch.filter(|_| !broken).map(|from| read_ahead(&document, from));
                // Served elsewhere now: what this server holds may be behind, so nothing is
                // answered from it.
                let mut failed = Vec::new();
                let exported = export.then(|| match &moved {
                    Some(owner) => Err(super::ExportError::Moved { owner: owner.clone() }),
                    None => {
                        let told = match catch(|| document.export()) {
                            Ok(Ok(bytes)) => return Ok(bytes),
                            Ok(Err(e)) => Told::of(&e),
                            Err(panic) => Told::panic(panic),
                        };
                        failed.push(("exporting", told.detail));
                        let why = format!("exporting {doc} failed: {}", told.public);
                        Err(if told.passes {
                            super::ExportError::Unavailable(why)
                        } else {
                            super::ExportError::Failed(why)
                        })
                    }
                });
                let answers = asks
                    .into_iter()
                    .map(|(conn, ask)| match &moved {
                        Some(url) => (conn, Message::Redirect { doc, url: url.clone() }),
                        None => (conn, answer(&mut document, ask, &mut failed)),
                    })
                    .collect();
                Outcome::Ran(Box::new(Ran {
                    document,
                    reopened,
                    moved,
                    steps,
                    failure,
                    fetched,
                    exported,
                    answers,
                    failed,
                }))
            }
        };
        JobDone { doc, outcome }
    }
}

/// Runs `f`, turning a panic into its message.
fn catch<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

fn open(
    doc: DocId,
    opener: &Opener,
    exists: Option<Exists>,
    create: bool,
) -> std::result::Result<Box<ServerDocument>, OpenFailure> {
    let opened = catch(|| {
        if let Some(exists) = exists.filter(|_| !create) {
            match exists(doc) {
                Ok(true) => {}
                Ok(false) => return Err(OpenFailure::NotFound),
                Err(e) => return Err(OpenFailure::of(e)),
            }
        }
        opener(doc).map(Box::new).map_err(OpenFailure::of)
    });
    opened.unwrap_or_else(|panic| Err(OpenFailure::Error(Told::panic(panic))))
}

/// Opens the document's journal again when its handle refuses writes (a failed fsync, an
/// object write whose outcome was unknown), carrying the mutations queued in the old handle
/// over: their clients will not send them again (they were acknowledged), and `receive` skips
/// those the journal shows applied. When the open fails, the old handle stays and the next
/// step tries again; when another server holds the document's lease now, that is the answer
/// (`Err(Moved)`) and nothing more is done here.
fn reopen_journal(
    doc: DocId,
    document: &mut Box<ServerDocument>,
    opener: &Opener,
) -> std::result::Result<bool, OpenFailure> {
    let mut fresh = match catch(|| opener(doc)) {
        Ok(Ok(fresh)) => fresh,
        Ok(Err(e)) => return Err(OpenFailure::of(e)),
        Err(_) => return Ok(false),
    };
    fresh.prepare();
    fresh.carry_over(document);
    **document = fresh;
    Ok(true)
}

/// Takes one step of `d`. One per job: a document with a backlog steps again on its next
/// job, after the others had theirs, so no document's backlog holds up the rest for longer
/// than one step (which its limits bound).
fn step_document(
    d: &mut ServerDocument,
    now_ms: i64,
    clock: Option<&SharedClock>,
) -> (Vec<(StepOutcome, Option<u64>)>, Option<Failure>) {
    let start = clock.map(|c| c());
    // A panic must not take the other documents (or the thread serving them) down with it.
    match catch(|| d.step(now_ms)) {
        Ok(Ok(Some(o))) => (vec![(o, start.and_then(|t| clock.map(|c| c().saturating_sub(t))))], None),
        Ok(Ok(None)) => (Vec::new(), None),
        Ok(Err(e)) => (Vec::new(), Some(Failure::Error { why: Told::of(&e), reopen: e.needs_reopen() })),
        Err(panic) => (Vec::new(), Some(Failure::Panicked(panic))),
    }
}

/// Reads whole entries from `from` on, up to `FETCH_BYTES` (at least one entry).
pub(super) fn read_ahead(d: &ServerDocument, from: Lsn) -> Fetched {
    let mut fetched = Fetched::default();
    let avail = d.storage_range();
    let (mut lsn, mut bytes) = (from.max(avail.first()), 0);
    while lsn < avail.next() && bytes < FETCH_BYTES {
        match catch(|| d.read_wire_full(lsn)) {
            Ok(Ok(e)) => {
                bytes += e.data.len();
                fetched.entries.push((lsn, e));
            }
            Ok(Err(e)) => {
                fetched.error = Some((lsn, Told::of(&e)));
                break;
            }
            Err(panic) => {
                fetched.error = Some((lsn, Told::panic(panic)));
                break;
            }
        }
        lsn = lsn.next();
    }
    fetched
}

/// The answer to a `MapPages`, `ReadPages` or `ReadHistory`: read from the committed state,
/// never from a step in progress (a job's step is done before it answers). What fails is told
/// by its kind, and pushed whole onto `failed` for the log.
fn answer(d: &mut ServerDocument, ask: Message, failed: &mut Vec<(&'static str, String)>) -> Message {
    let mut fail = |doc, doing: &'static str, told: Told| {
        failed.push((doing, told.detail));
        let message = format!("{doing} {doc} failed: {}", told.public);
        Message::Error { doc: Some(doc), code: codes::STORAGE.into(), message }
    };

    match ask {
        Message::MapPages { doc, id } => match catch(|| d.page_map(MAX_MAP_RUNS)) {
            Ok(Some(map)) => Message::PageMap { doc, id, map },
            Ok(None) => {
                let why = format!("document {doc} is spread over more than {MAX_MAP_RUNS} runs: not mapped");
                Message::Error { doc: Some(doc), code: codes::LIMIT.into(), message: why }
            }
            Err(panic) => fail(doc, "mapping", Told::panic(panic)),
        },
        Message::ReadPages { doc, id, lsn, offset, pages } => {
            let mut data = vec![0u8; pages as usize * crate::page::PAGE_SIZE];
            match catch(|| d.read_part(lsn, offset as usize, &mut data)) {
                Ok(Ok(())) => Message::Pages { doc, id, lsn, offset, data },
                // A read of what the document does not hold is the asker's mistake (or a map
                // older than a checkpoint): told, not logged, so asking for nothing cannot
                // flood the log.
                Ok(Err(e)) => match e.absent_read() {
                    Some(what) => {
                        let message = format!("document {doc} holds no such pages: {what}");
                        Message::Error { doc: Some(doc), code: codes::OUT_OF_RANGE.into(), message }
                    }
                    None => fail(doc, "reading pages of", Told::of(&e)),
                },
                Err(panic) => fail(doc, "reading pages of", Told::panic(panic)),
            }
        }
        Message::ReadHistory { doc, id, query } => match catch(|| d.read_history(&query)) {
            Ok(Ok(page)) => Message::History { doc, id, page },
            Ok(Err(e)) => fail(doc, "reading the history of", Told::of(&e)),
            Err(panic) => fail(doc, "reading the history of", Told::panic(panic)),
        },
        other => unreachable!("BUG: only page and history requests are asks, not {other:?}"),
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
