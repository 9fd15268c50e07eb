//! `ServerSession`: the server side of every connection, sans-io.
//!
//! One `ServerSession` serves all connections of a server (the driver names them by `ConnId`)
//! and owns the open documents, because documents are shared between connections: a step on
//! one document makes storage to send on every connection subscribed to it. The per-connection
//! state (subscriptions, windows, outbox) lives inside it.
//!
//! Sending is pull-based: `poll_transmit` picks the next connection round-robin, and within it
//! the next document round-robin, and builds at most `MAX_BATCH_BYTES` of storage for it while
//! that subscriber's unacknowledged bytes stay under `DOC_WINDOW_BYTES`.
//!
//! Stepping is planned here and executed by the driver: `poll_step` hands out a due document
//! as a `StepJob` (SQLite, fsync, object-store puts), and `step_done` takes it back. The
//! session itself does no I/O but what the driver's `Opener` does when a document first opens.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use pagesync_journal::{Lsn, LsnRange};

use super::window::{SendWindow, round_robin};
use super::{
    DOC_WINDOW_BYTES, DecodeError, MAX_BATCH_BYTES, MAX_DOCS_PER_CONNECTION, Message, PROTOCOL_VERSION,
    RETRANSMIT_MS, codes,
};
use crate::error::Result;
use crate::ids::{DocId, TimelineId};
use crate::reducer::Rejection;
use crate::server::{ServerDocument, StepOutcome};

/// A connection, as named by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What a connection's token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `None`: every document. `Some(p)`: ids that start with `p` (a full id: exactly one).
    pub doc_prefix: Option<String>,
    pub write: bool,
}

impl Grant {
    /// Everything: for servers without auth (loopback only).
    pub fn all() -> Grant {
        Grant { doc_prefix: None, write: true }
    }

    pub fn allows(&self, doc: DocId) -> bool {
        self.doc_prefix.as_ref().is_none_or(|p| doc.to_string().starts_with(p.as_str()))
    }
}

/// Checks a `Hello` token at `now_ms`: the grant, or why it is refused.
pub type Authenticator = Box<dyn Fn(&str, i64) -> std::result::Result<Grant, String> + Send>;

/// Opens (or creates) a document's storage for the session.
pub type Opener = Box<dyn FnMut(DocId) -> Result<ServerDocument> + Send>;

#[derive(Debug)]
struct Sub {
    /// The storage sent to this subscriber.
    window: SendWindow,
    /// Entries up to here go whole: the subscriber restarts at the checkpoint they end, and
    /// holds no pages to apply a delta to.
    full_until: Option<Lsn>,
    /// After a storage read failed (and the subscriber was told): no retry before this, so a
    /// persistent read error costs one attempt per `RETRANSMIT_MS`, not a busy loop.
    retry_read_at: Option<i64>,
}

/// An open document and its schedule: everything the session keeps per document, so that
/// opening and closing it is one insert and one remove.
#[derive(Debug)]
struct OpenDoc {
    held: Held,
    /// When the oldest queued mutation arrived.
    queued_since: Option<i64>,
    /// After a failed step: when to try again.
    retry_at: Option<i64>,
    /// When a message last named it, for closing idle documents.
    last_used: i64,
    /// The `last_used` it shrank at: it shrinks again only after being used since.
    shrunk_at: Option<i64>,
    /// Its journal refused writes until reopened: the next step opens it again first.
    reopen: bool,
    /// The storage LSN it writes next, as of its last step: only steps write storage, so a
    /// subscriber at or past it has nothing to be sent, known without asking the store (a
    /// lock and a journal call, for every subscription on every `poll_transmit`).
    head: Lsn,
}

/// Where an open document is.
#[derive(Debug)]
enum Held {
    Here(Box<ServerDocument>),
    /// Out on a step (`poll_step`); messages for it wait for `step_done`.
    Stepping(Deferred),
}

impl OpenDoc {
    fn new(document: ServerDocument, now_ms: i64) -> OpenDoc {
        let head = document.storage_range().next();
        OpenDoc {
            head,
            held: Held::Here(Box::new(document)),
            queued_since: None,
            retry_at: None,
            last_used: now_ms,
            shrunk_at: None,
            reopen: false,
        }
    }

    fn document(&self) -> Option<&ServerDocument> {
        match &self.held {
            Held::Here(d) => Some(d),
            Held::Stepping(_) => None,
        }
    }

    fn document_mut(&mut self) -> Option<&mut ServerDocument> {
        match &mut self.held {
            Held::Here(d) => Some(d),
            Held::Stepping(_) => None,
        }
    }

    fn is_stepping(&self) -> bool {
        matches!(self.held, Held::Stepping(_))
    }

    fn queued(&self) -> usize {
        self.document().map_or(0, ServerDocument::queued)
    }

    /// When it should step: after the commit interval, or at once when a full step is queued,
    /// but not before a failed step's retry time. Never while it is out on a step.
    fn step_due(&self, commit_interval_ms: i64, now_ms: i64) -> Option<i64> {
        let d = self.document().filter(|d| d.queued() > 0)?;
        let since = self.queued_since.unwrap_or(now_ms);
        let batch_ready = d.queued() >= d.limits().max_mutations;
        let due = if batch_ready { since } else { since + commit_interval_ms };
        Some(due.max(self.retry_at.unwrap_or(i64::MIN)))
    }
}

#[derive(Debug, Default)]
struct Conn {
    hello: bool,
    /// Set by a successful `Hello`.
    grant: Option<Grant>,
    subs: BTreeMap<DocId, Sub>,
    outbox: VecDeque<Message>,
    cursor: Option<DocId>,
    /// Set after a connection-level error: send the outbox, then the driver closes.
    closing: bool,
    /// Bytes handed to the driver and not yet written to the socket (`set_send_backlog`).
    backlog_bytes: usize,
    /// Since when the backlog has been over `MAX_SEND_BACKLOG_BYTES`.
    blocked_since_ms: Option<i64>,
}

/// A connection whose driver still holds this many unwritten bytes (past what the kernel's
/// socket buffer took) gets no more storage until it drains, and no retransmission until it is
/// empty: a peer that does not read costs at most this plus one message. 256 KiB: a reader
/// that keeps up never comes near it, the kernel buffers megabytes ahead of it.
pub const MAX_SEND_BACKLOG_BYTES: usize = 256 << 10;

/// A connection blocked on its backlog this long is closed: its peer is not reading.
pub const SLOW_READER_CLOSE_MS: i64 = 30_000;

/// Messages queued for one connection (acknowledgements, errors) before it is closed as a peer
/// that does not read. 4,096: many times what one round of frames produces.
pub const MAX_OUTBOX_MESSAGES: usize = 4_096;

/// After a failed step (a full disk, a broken journal), the document waits this long before
/// trying again, so a persistent fault costs one attempt per second, not a busy loop.
pub const STEP_RETRY_MS: i64 = 1_000;

/// How a `ServerSession` schedules its documents.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// A document with queued mutations steps this long after the first of them arrived, so
    /// that more share one storage entry (group commit). 0 steps at once, which suits local
    /// disks; object stores, where each write costs a request and tens of milliseconds, want
    /// more. A full step's worth of mutations steps at once regardless.
    pub commit_interval_ms: i64,
    /// With external steps: documents out on a step at once (the driver runs each on a
    /// thread of its own, so one document's slow write holds up no other). Without them the
    /// session steps documents one by one on the caller's thread.
    pub step_threads: usize,
    /// A document with no subscriber and no queued work is closed after this long, and then
    /// costs nothing but its storage. `None` keeps documents open.
    pub idle_close_ms: Option<i64>,
    /// An open document unused for this long gives back its caches
    /// (`ServerDocument::shrink_memory`), so thousands of quiet subscribed documents cost little
    /// memory each. `None` never shrinks.
    pub idle_shrink_ms: Option<i64>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { commit_interval_ms: 0, step_threads: 1, idle_close_ms: None, idle_shrink_ms: None }
    }
}

/// Upper bounds, in microseconds, of the step-duration histogram's buckets.
pub const STEP_MICROS_BUCKETS: [u64; 10] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000];

/// What happened that an operator should hear about; the driver takes them with
/// `poll_event` and logs them (the session never logs itself).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A step failed on the storage; the document keeps its queue and retries after
    /// `retry_in_ms`.
    StepFailed { doc: DocId, error: String, retry_in_ms: i64 },
    /// A mutation was rejected because its step could not be committed with it (too many
    /// pages, or the reducer failed on it); the rest of the step applied.
    MutationIsolated { doc: DocId, step_lsn: Lsn, timeline: TimelineId, lsn: Lsn, rejection: Rejection },
    /// A step panicked; the document was closed (its last durable state is intact) and its
    /// subscribers told. Every other document carries on.
    DocumentFailed { doc: DocId, error: String },
}

/// Events kept for the driver. 1,024: far more than one turn produces; past it the oldest go
/// (and are counted in `SessionStats::events_dropped`).
pub const MAX_EVENTS: usize = 1_024;

/// Counters of a `ServerSession`, for metrics.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub steps: u64,
    pub steps_failed: u64,
    pub mutations_applied: u64,
    pub mutations_rejected: u64,
    /// Rejections by code (`refused`, `too_expensive`, ...).
    pub rejections_by_code: BTreeMap<String, u64>,
    /// Mutations rejected because their step could not hold them (`Event::MutationIsolated`).
    pub mutations_isolated: u64,
    /// Documents closed because a step panicked.
    pub documents_failed: u64,
    /// Documents opened again from their journal after it refused writes.
    pub documents_reopened: u64,
    pub events_dropped: u64,
    pub documents_opened: u64,
    pub documents_closed: u64,
    /// Idle documents that gave back their caches.
    pub documents_shrunk: u64,
    /// Steps by duration: `step_micros[i]` counts those within `STEP_MICROS_BUCKETS[i]`
    /// (cumulative counts are the caller's job); the last slot counts the longer ones. Only
    /// kept when the session has a clock (`with_clock`).
    pub step_micros: [u64; STEP_MICROS_BUCKETS.len() + 1],
    pub step_micros_sum: u64,
}

impl SessionStats {
    fn record(&mut self, outcome: &StepOutcome, micros: Option<u64>) {
        self.steps += 1;
        self.mutations_applied += (outcome.applied - outcome.rejected) as u64;
        self.mutations_rejected += outcome.rejected as u64;
        for r in &outcome.rejections {
            *self.rejections_by_code.entry(r.rejection.code.as_str().to_owned()).or_default() += 1;
            self.mutations_isolated += u64::from(r.isolated);
        }
        if let Some(us) = micros {
            self.step_micros[STEP_MICROS_BUCKETS.partition_point(|b| *b < us)] += 1;
            self.step_micros_sum += us;
        }
    }
}

/// The session's clock, shared with step jobs that run elsewhere.
type SharedClock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

/// A monotonic clock in microseconds, used only to time steps for metrics.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// What stepping one document did: each step's outcome and duration, and the error that
/// stopped it, if any (`Failure::Panicked` when the step panicked).
type Stepped = (DocId, Vec<(StepOutcome, Option<u64>)>, Option<Failure>);

/// Why a document's step did not complete.
#[derive(Debug)]
enum Failure {
    /// An error; the queue stays and the step is retried. With `reopen`, the document's
    /// journal refuses writes until it is reopened: the retry opens it again first.
    Error { why: String, reopen: bool },
    /// A panic: the document's state cannot be trusted; it is closed (and reopened from its
    /// journal on next use).
    Panicked(String),
}

/// Takes one step of `d`. One per turn: a document with a backlog steps again on the next
/// turn, after the others had theirs, so no document's backlog holds up the rest for longer
/// than one step (which its limits bound).
fn step_document(id: DocId, d: &mut ServerDocument, now_ms: i64, clock: Option<&SharedClock>) -> Stepped {
    let mut done = Vec::new();
    let start = clock.map(|c| c());
    // A panic must not take the other documents (or the thread serving them) down with it.
    let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| d.step(now_ms)));
    match stepped {
        Ok(Ok(Some(o))) => done.push((o, start.and_then(|t| clock.map(|c| c().saturating_sub(t))))),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            return (id, done, Some(Failure::Error { why: e.to_string(), reopen: e.needs_reopen() }));
        }
        Err(panic) => return (id, done, Some(Failure::Panicked(panic_message(&*panic)))),
    }
    (id, done, None)
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Whether a document exists in storage (without creating it).
pub type Exists = Box<dyn FnMut(DocId) -> Result<bool> + Send>;

pub struct ServerSession {
    opener: Opener,
    /// Tells whether a document exists, so a read-only grant never creates one; without it
    /// every open may create.
    exists: Option<Exists>,
    auth: Option<Authenticator>,
    options: SessionOptions,
    clock: Option<SharedClock>,
    stats: SessionStats,
    docs: HashMap<DocId, OpenDoc>,
    next_idle_sweep_ms: i64,
    conns: BTreeMap<ConnId, Conn>,
    cursor: Option<ConnId>,
    now_ms: i64,
    events: VecDeque<Event>,
    /// Steps run by the driver (`poll_step` / `step_done`) rather than in `handle_timeout`.
    external_steps: bool,
    /// Documents out on a step (`Held::Stepping`).
    stepping: usize,
}

/// Messages for a document that is out on a step, handled when it comes back.
#[derive(Debug, Default)]
struct Deferred {
    messages: Vec<(ConnId, i64, Message)>,
    bytes: usize,
}

/// Bytes of mutations kept for one document while it is out on a step; more are dropped
/// unacknowledged, and their clients send them again. 16 MiB: many steps' worth.
pub const MAX_DEFERRED_BYTES: usize = 16 << 20;

/// One document's step, taken out of the session by `poll_step` to run anywhere (a worker
/// thread), and handed back with `step_done`. The session never waits for it.
pub struct StepJob {
    doc: DocId,
    document: ServerDocument,
    now_ms: i64,
    clock: Option<SharedClock>,
}

impl std::fmt::Debug for StepJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepJob").field("doc", &self.doc).finish()
    }
}

/// A finished `StepJob`, for `step_done`.
#[derive(Debug)]
pub struct StepDone {
    doc: DocId,
    document: ServerDocument,
    steps: Vec<(StepOutcome, Option<u64>)>,
    failure: Option<Failure>,
}

impl StepJob {
    pub fn doc(&self) -> DocId {
        self.doc
    }

    /// Takes the step: blocking work (SQLite, fsync, object-store puts).
    pub fn run(mut self) -> StepDone {
        let (doc, steps, failure) =
            step_document(self.doc, &mut self.document, self.now_ms, self.clock.as_ref());
        StepDone { doc, document: self.document, steps, failure }
    }
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("docs", &self.docs.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

fn error(doc: Option<DocId>, code: &str, message: impl Into<String>) -> Message {
    Message::Error { doc, code: code.into(), message: message.into() }
}

impl ServerSession {
    pub fn new(opener: Opener) -> ServerSession {
        ServerSession {
            opener,
            exists: None,
            auth: None,
            options: SessionOptions::default(),
            clock: None,
            stats: SessionStats::default(),
            docs: HashMap::new(),
            next_idle_sweep_ms: 0,
            conns: BTreeMap::new(),
            cursor: None,
            now_ms: 0,
            events: VecDeque::new(),
            external_steps: false,
            stepping: 0,
        }
    }

    /// Requires every connection to present a token this accepts. Without it, every
    /// connection may read and write every document.
    pub fn with_auth(mut self, auth: Authenticator) -> ServerSession {
        self.auth = Some(auth);
        self
    }

    /// Has the driver run steps (`poll_step`, `StepJob::run` on a thread of its own,
    /// `step_done`) so that no document's step holds up the others or the session; without it
    /// `handle_timeout` steps due documents itself and waits for them.
    pub fn with_external_steps(mut self) -> ServerSession {
        self.external_steps = true;
        self
    }

    /// Lets the session check that a document exists before opening it for a read-only grant,
    /// which then gets `not_found` instead of creating it.
    pub fn with_exists(mut self, exists: Exists) -> ServerSession {
        self.exists = Some(exists);
        self
    }

    pub fn with_options(mut self, options: SessionOptions) -> ServerSession {
        self.options = SessionOptions { step_threads: options.step_threads.max(1), ..options };
        self
    }

    /// Times steps with `clock` (monotonic microseconds) for the histogram in `stats`.
    pub fn with_clock(mut self, clock: Clock) -> ServerSession {
        self.clock = Some(std::sync::Arc::from(clock));
        self
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    pub fn connect(&mut self, conn: ConnId) {
        self.conns.insert(conn, Conn::default());
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// True once the connection had a fatal error and its outbox is empty: close it.
    pub fn should_close(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.closing && c.outbox.is_empty())
    }

    /// The driver's unwritten bytes for `conn`. Over `MAX_SEND_BACKLOG_BYTES` the connection
    /// gets no storage; above zero, no retransmission; blocked for `SLOW_READER_CLOSE_MS` it
    /// is closed.
    pub fn set_send_backlog(&mut self, conn: ConnId, bytes: usize) {
        let now = self.now_ms;
        if let Some(c) = self.conns.get_mut(&conn) {
            c.backlog_bytes = bytes;
            if bytes <= MAX_SEND_BACKLOG_BYTES {
                c.blocked_since_ms = None;
            } else if c.blocked_since_ms.is_none() {
                c.blocked_since_ms = Some(now);
            }
        }
    }

    /// An open document, unless it is out on a step.
    pub fn document(&self, doc: DocId) -> Option<&ServerDocument> {
        self.docs.get(&doc)?.document()
    }

    /// The document as a `.sqlite` file, opening it if needed. Not while it is out on a step
    /// (`is_stepping`): the caller asks again after `step_done`.
    pub fn export(&mut self, doc: DocId) -> Result<Vec<u8>> {
        assert!(!self.is_stepping(doc), "BUG: export of a document out on a step");
        self.open_doc(doc)?.document().expect("BUG: checked above").export()
    }

    /// The open documents, except those out on a step.
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &ServerDocument)> {
        self.docs.iter().filter_map(|(id, o)| Some((id, o.document()?)))
    }

    /// `doc`'s entry, opening the document on first use; marks it used.
    fn open_doc(&mut self, doc: DocId) -> Result<&mut OpenDoc> {
        let now = self.now_ms;
        let open = match self.docs.entry(doc) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let d = (self.opener)(doc)?;
                self.stats.documents_opened += 1;
                v.insert(OpenDoc::new(d, now))
            }
        };
        open.last_used = now;
        Ok(open)
    }

    /// Decodes a frame and handles it; a frame that does not decode closes the connection
    /// with an error saying why.
    pub fn handle_frame(&mut self, conn: ConnId, now_ms: i64, frame: &[u8]) {
        match Message::decode(frame) {
            Ok(msg) => self.handle_message(conn, now_ms, msg),
            Err(e) => {
                let code = if matches!(e, DecodeError::TooLarge { .. }) {
                    codes::TOO_LARGE
                } else {
                    codes::MALFORMED
                };
                self.fail(conn, error(None, code, e.to_string()));
            }
        }
    }

    fn fail(&mut self, conn: ConnId, msg: Message) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbox.push_back(msg);
            c.closing = true;
        }
    }

    pub fn handle_message(&mut self, conn: ConnId, now_ms: i64, msg: Message) {
        self.now_ms = self.now_ms.max(now_ms);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.closing {
            return;
        }
        match msg {
            Message::Hello { version, token } if version == PROTOCOL_VERSION => {
                let grant = self.auth.as_ref().map_or(Ok(Grant::all()), |auth| auth(&token, now_ms));
                match grant {
                    Ok(g) => {
                        c.hello = true;
                        c.grant = Some(g);
                    }
                    Err(why) => self.fail(conn, error(None, codes::UNAUTHORIZED, why)),
                }
            }
            Message::Hello { version, .. } => {
                let text = format!(
                    "client speaks protocol v{version}, this server v{PROTOCOL_VERSION}: upgrade the older side"
                );
                self.fail(conn, error(None, codes::VERSION, text));
            }
            _ if !c.hello => {
                // Not fatal: on a lossy transport the Hello may be late. The message is ignored
                // and the client, told so, says Hello again and re-subscribes.
                c.outbox.push_back(error(None, codes::NOT_HELLO, "the first message must be Hello"))
            }
            Message::Subscribe { doc, .. } | Message::Mutations { doc, .. }
                if !c.grant.as_ref().is_some_and(|g| g.allows(doc)) =>
            {
                let text = format!("your token does not grant access to document {doc}");
                c.outbox.push_back(error(Some(doc), codes::FORBIDDEN, text));
            }
            Message::Mutations { doc, .. } if !c.grant.as_ref().is_some_and(|g| g.write) => {
                let text = format!("your token is read-only: writes to {doc} are refused");
                c.outbox.push_back(error(Some(doc), codes::FORBIDDEN, text));
            }
            Message::Subscribe { doc, .. } | Message::Mutations { doc, .. }
                if self.docs.get(&doc).is_some_and(OpenDoc::is_stepping) =>
            {
                self.defer(conn, now_ms, msg)
            }
            Message::Mutations { first, ref entries, .. }
                if first.get().checked_add(entries.len() as u64).is_none_or(|end| end == u64::MAX) =>
            {
                let text = format!("{} entries from LSN {first} run past the LSN space", entries.len());
                self.fail(conn, error(msg.doc(), codes::MALFORMED, text));
            }
            Message::Subscribe { doc, timeline, storage_next } => {
                let create = c.grant.as_ref().is_some_and(|g| g.write);
                self.subscribe(conn, doc, timeline, storage_next, create)
            }
            Message::Mutations { doc, timeline, first, entries } => {
                if let Some(open) = self.open(conn, doc, true) {
                    let d = open.document_mut().expect("BUG: not stepping, checked above");
                    let received = d.receive(timeline, first, entries);
                    let storage_next = d.storage_range().next();
                    if d.queued() > 0 {
                        open.queued_since.get_or_insert(now_ms);
                    }
                    let ack = Message::MutationsAck {
                        doc,
                        timeline,
                        next_expected: received.next_expected,
                        storage_next,
                    };
                    self.push(conn, ack);
                }
            }
            Message::StorageAck { doc, next } => {
                if let Some(sub) = c.subs.get_mut(&doc) {
                    // An acknowledgement past what was sent is the peer's mistake: ignored.
                    sub.window.ack(next.min(sub.window.next));
                }
            }
            Message::Error { .. } => {}
            other => {
                let text = format!("a client may not send {}", kind(&other));
                self.fail(conn, error(other.doc(), codes::MALFORMED, text));
            }
        }
    }

    fn push(&mut self, conn: ConnId, msg: Message) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbox.push_back(msg);
        }
    }

    /// The open document, opening it on first use (creating it only when `create`); on
    /// failure the client is told.
    fn open(&mut self, conn: ConnId, doc: DocId, create: bool) -> Option<&mut OpenDoc> {
        if !self.docs.contains_key(&doc)
            && !create
            && let Some(exists) = self.exists.as_mut()
        {
            match exists(doc) {
                Ok(true) => {}
                Ok(false) => {
                    let text =
                        format!("document {doc} does not exist, and a read-only token cannot create it");
                    self.push(conn, error(Some(doc), codes::NOT_FOUND, text));
                    return None;
                }
                Err(e) => {
                    let text = format!("cannot open document {doc}: {e}");
                    self.push(conn, error(Some(doc), codes::DOCUMENT, text));
                    return None;
                }
            }
        }
        if let Err(e) = self.open_doc(doc) {
            self.push(conn, error(Some(doc), codes::DOCUMENT, format!("cannot open document {doc}: {e}")));
            return None;
        }
        self.docs.get_mut(&doc)
    }

    fn subscribe(&mut self, conn: ConnId, doc: DocId, timeline: TimelineId, storage_next: Lsn, create: bool) {
        let over_limit = self
            .conns
            .get(&conn)
            .is_some_and(|c| !c.subs.contains_key(&doc) && c.subs.len() >= MAX_DOCS_PER_CONNECTION);
        if over_limit {
            let text = format!("a connection may subscribe to at most {MAX_DOCS_PER_CONNECTION} documents");
            return self.push(conn, error(Some(doc), codes::LIMIT, text));
        }
        let Some(d) = self.open(conn, doc, create).and_then(|o| o.document()) else { return };
        let have = d.storage_range().next();
        if storage_next > have {
            let text = format!(
                "the client holds storage up to LSN {storage_next} but the server only up to {have}: it was synced with another server"
            );
            return self.push(conn, error(Some(doc), codes::DOCUMENT, text));
        }
        if storage_next < d.storage_range().first() && d.base_checkpoint().is_none() {
            let oldest = d.storage_range().first();
            let text = format!(
                "history before LSN {oldest} is gone and the journal does not start with a checkpoint: the server's storage is damaged"
            );
            return self.push(conn, error(Some(doc), codes::SNAPSHOT_REQUIRED, text));
        }
        let next_expected = d.next_expected(timeline);
        // A new replica starts at the newest checkpoint rather than replaying the history
        // before it: the history since the previous checkpoint is at least the document's
        // size (see `Compaction`), so this is never more bytes.
        let newest = d.newest_checkpoint().filter(|c| storage_next == Lsn::FIRST && c.first > Lsn::FIRST);
        let start = newest.map_or(storage_next, |c| c.first);
        // A replica that stopped inside a checkpoint's parts may be restarting at it: the rest
        // of the checkpoint goes whole too (any replica can take a whole entry).
        let full_until = newest.or_else(|| d.checkpoint_spanning(storage_next)).map(|c| c.last);
        let sub = Sub { window: SendWindow::new(start), full_until, retry_read_at: None };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.subs.insert(doc, sub);
            c.outbox.push_back(Message::MutationsAck { doc, timeline, next_expected, storage_next: have });
        }
    }

    /// Documents due for a step at `now`.
    fn due(&self) -> impl Iterator<Item = DocId> + '_ {
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        self.docs
            .iter()
            .filter(move |(_, o)| o.step_due(interval, now).is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
    }

    /// Steps documents with queued mutations that are due, closes idle documents, and
    /// schedules retransmissions. A document whose step fails keeps its queue, tells its
    /// subscribers why, and retries after `STEP_RETRY_MS`; other documents carry on.
    pub fn handle_timeout(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if !self.external_steps {
            // One by one, on this thread: `lib` spawns nothing. A driver that wants documents
            // stepped apart uses `with_external_steps`.
            let due: Vec<DocId> = self.due().collect();
            for doc in due {
                self.reopen_if_needed(doc);
                let Some(d) = self.docs.get_mut(&doc).and_then(OpenDoc::document_mut) else { continue };
                let (_, steps, failed) = step_document(doc, d, now, self.clock.as_ref());
                self.record_steps(doc, &steps, failed);
            }
        }
        self.close_idle();
        for c in self.conns.values_mut() {
            // Data still in the driver's queue is not lost: resending it would only queue a
            // second copy behind the first.
            if c.backlog_bytes > 0 {
                continue;
            }
            for sub in c.subs.values_mut() {
                sub.window.rewind_if_due(now);
                sub.retry_read_at = sub.retry_read_at.filter(|t| now < *t);
            }
        }
        self.close_slow_readers();
    }

    /// Closes connections whose peer stopped reading: blocked on their backlog for
    /// `SLOW_READER_CLOSE_MS`, or with `MAX_OUTBOX_MESSAGES` unsent.
    fn close_slow_readers(&mut self) {
        let now = self.now_ms;
        for c in self.conns.values_mut().filter(|c| !c.closing) {
            let blocked = c.blocked_since_ms.is_some_and(|t| now >= t + SLOW_READER_CLOSE_MS);
            if blocked || c.outbox.len() >= MAX_OUTBOX_MESSAGES {
                c.outbox.clear();
                let text = "the connection is closed: the client stopped reading what the server sends";
                c.outbox.push_back(error(None, codes::SLOW_READER, text));
                c.closing = true;
            }
        }
    }

    /// Closes a document whose step panicked: its subscribers are told, and it reopens from
    /// its journal (the last durable state) on next use. The others carry on.
    fn close_broken(&mut self, doc: DocId, why: String) {
        self.stats.documents_failed += 1;
        self.docs.remove(&doc);
        let text =
            format!("the server closed document {doc} after an internal error; subscribe again: {why}");
        for c in self.conns.values_mut() {
            if c.subs.remove(&doc).is_some() {
                c.outbox.push_back(error(Some(doc), codes::INTERNAL, text.clone()));
            }
        }
        self.event(Event::DocumentFailed { doc, error: why });
    }

    /// Takes what one document's steps did into the stats, the events and its schedule.
    fn record_steps(&mut self, doc: DocId, steps: &[(StepOutcome, Option<u64>)], failed: Option<Failure>) {
        let now = self.now_ms;
        for (outcome, micros) in steps {
            self.stats.record(outcome, *micros);
            for r in outcome.rejections.iter().filter(|r| r.isolated) {
                let (timeline, lsn, rejection) = (r.timeline, r.lsn, r.rejection.clone());
                self.event(Event::MutationIsolated { doc, step_lsn: outcome.lsn, timeline, lsn, rejection });
            }
        }
        let Some(open) = self.docs.get_mut(&doc) else { return };
        open.retry_at = None;
        if let Some(d) = open.document() {
            open.head = d.storage_range().next();
        }
        match failed {
            // A backlog stays due: it steps again on the next turn.
            None if open.queued() > 0 => {}
            None => open.queued_since = None,
            Some(Failure::Panicked(why)) => self.close_broken(doc, why),
            Some(Failure::Error { why, reopen }) => {
                open.retry_at = Some(now + STEP_RETRY_MS);
                open.reopen = reopen;
                self.stats.steps_failed += 1;
                self.event(Event::StepFailed { doc, error: why.clone(), retry_in_ms: STEP_RETRY_MS });
                let text = format!("the server could not apply mutations to {doc} and will retry: {why}");
                for c in self.conns.values_mut().filter(|c| c.subs.contains_key(&doc)) {
                    c.outbox.push_back(error(Some(doc), codes::STORAGE, text.clone()));
                }
            }
        }
    }

    /// The next document due for a step, taken out of the session to step elsewhere (with
    /// `with_external_steps`). At most `step_threads` are out at once. Messages for it wait
    /// until `step_done` brings it back.
    pub fn poll_step(&mut self, now_ms: i64) -> Option<StepJob> {
        self.now_ms = self.now_ms.max(now_ms);
        if self.stepping >= self.options.step_threads {
            return None;
        }
        let doc = self.due().next()?;
        self.reopen_if_needed(doc);
        let open = self.docs.get_mut(&doc).expect("BUG: just found");
        let Held::Here(document) = std::mem::replace(&mut open.held, Held::Stepping(Deferred::default()))
        else {
            unreachable!("BUG: a document out on a step is never due")
        };
        self.stepping += 1;
        Some(StepJob { doc, document: *document, now_ms: self.now_ms, clock: self.clock.clone() })
    }

    /// Opens a document again from its journal when its handle refuses writes (a failed fsync,
    /// an object write whose outcome was unknown), carrying the mutations queued in the old
    /// handle over: their clients will not send them again (they were acknowledged), and
    /// `receive` skips those the journal shows applied. When the open fails, the old handle
    /// stays and the next step tries again.
    fn reopen_if_needed(&mut self, doc: DocId) {
        let Some(open) = self.docs.get_mut(&doc).filter(|o| o.reopen) else { return };
        let Some(old) = open.document_mut() else { return };
        let Ok(mut fresh) = (self.opener)(doc) else { return };
        for (timeline, first, entries) in old.take_queued() {
            fresh.receive(timeline, first, entries);
        }
        open.head = fresh.storage_range().next();
        open.held = Held::Here(Box::new(fresh));
        open.reopen = false;
        self.stats.documents_reopened += 1;
    }

    /// Documents out on a step.
    pub fn stepping(&self) -> usize {
        self.stepping
    }

    /// Whether `doc` is out on a step (its export waits for `step_done`).
    pub fn is_stepping(&self, doc: DocId) -> bool {
        self.docs.get(&doc).is_some_and(OpenDoc::is_stepping)
    }

    /// Brings a stepped document back, records what its step did, and handles the messages
    /// that waited for it.
    pub fn step_done(&mut self, done: StepDone, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let StepDone { doc, document, steps, failure } = done;
        let Some(open) = self.docs.get_mut(&doc).filter(|o| o.is_stepping()) else {
            panic!("BUG: step_done for {doc}, which is not out on a step")
        };
        let Held::Stepping(deferred) = std::mem::replace(&mut open.held, Held::Here(Box::new(document)))
        else {
            unreachable!("BUG: checked above")
        };
        self.stepping -= 1;
        self.record_steps(doc, &steps, failure);
        for (conn, at, msg) in deferred.messages {
            self.handle_message(conn, at, msg);
        }
    }

    /// Steps every document with queued mutations until their queues are empty (or a step
    /// fails), here and now: for a shutdown, after every step job came back.
    pub fn flush(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        let docs: Vec<DocId> = self.docs.iter().filter(|(_, o)| o.queued() > 0).map(|(id, _)| *id).collect();
        for doc in docs {
            while let Some(d) =
                self.docs.get_mut(&doc).and_then(OpenDoc::document_mut).filter(|d| d.queued() > 0)
            {
                let (id, steps, failed) = step_document(doc, d, now, self.clock.as_ref());
                let stop = failed.is_some() || steps.is_empty();
                self.record_steps(id, &steps, failed);
                if stop {
                    break;
                }
            }
        }
    }

    /// Keeps a message for a document that is out on a step.
    fn defer(&mut self, conn: ConnId, now_ms: i64, msg: Message) {
        let Some(doc) = msg.doc() else { return };
        let bytes = match &msg {
            Message::Mutations { entries, .. } => entries.iter().map(Vec::len).sum(),
            _ => 0,
        };
        let Some(OpenDoc { held: Held::Stepping(d), .. }) = self.docs.get_mut(&doc) else { return };
        if bytes > 0 && d.bytes + bytes > MAX_DEFERRED_BYTES {
            return; // unacknowledged: the client sends it again
        }
        d.bytes += bytes;
        d.messages.push((conn, now_ms, msg));
    }

    fn event(&mut self, e: Event) {
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    /// The next event for the driver to log.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Closes documents that no connection subscribes to, with nothing queued, unused for
    /// `idle_close_ms`, and shrinks those unused for `idle_shrink_ms`. Runs at most once a
    /// second: it looks at every subscription.
    fn close_idle(&mut self) {
        if self.now_ms < self.next_idle_sweep_ms {
            return;
        }
        self.next_idle_sweep_ms = self.now_ms + 1_000;
        self.shrink_idle();
        let Some(idle_ms) = self.options.idle_close_ms else { return };
        let subscribed: HashSet<DocId> = self.conns.values().flat_map(|c| c.subs.keys().copied()).collect();
        let now = self.now_ms;
        let before = self.docs.len();
        self.docs.retain(|id, o| {
            let idle = o.document().is_some_and(|d| d.queued() == 0) && now >= o.last_used + idle_ms;
            !idle || subscribed.contains(id)
        });
        self.stats.documents_closed += (before - self.docs.len()) as u64;
    }

    fn shrink_idle(&mut self) {
        let Some(shrink_ms) = self.options.idle_shrink_ms else { return };
        let now = self.now_ms;
        for o in self.docs.values_mut() {
            let used = o.last_used;
            if now < used + shrink_ms || o.shrunk_at == Some(used) {
                continue;
            }
            let Some(d) = o.document_mut().filter(|d| d.queued() == 0) else { continue };
            // A failure leaves caches in place; the document works either way.
            if d.shrink_memory().is_ok() {
                self.stats.documents_shrunk += 1;
            }
            o.shrunk_at = Some(used);
        }
    }

    /// When `handle_timeout` should run next.
    pub fn poll_timeout(&self) -> Option<i64> {
        // With every step thread busy, nothing can start before one comes back (`step_done`,
        // which the driver is woken for): no step deadline until then.
        let full = self.external_steps && self.stepping >= self.options.step_threads;
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        let steps = self.docs.values().filter(|_| !full).filter_map(|o| o.step_due(interval, now));
        // A connection with unwritten bytes resends nothing (see `handle_timeout`); the driver
        // says when it drains.
        let subs = self.conns.values().filter(|c| c.backlog_bytes == 0).flat_map(|c| c.subs.values());
        let resends = subs.flat_map(|s| [s.window.resend_at(), s.retry_read_at]).flatten();
        let blocked =
            self.conns.values().filter_map(|c| c.blocked_since_ms).map(|t| t + SLOW_READER_CLOSE_MS);
        steps.chain(resends).chain(blocked).min()
    }

    /// The next message to send, and its connection. Fair: round-robin over connections, and
    /// over documents within a connection.
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Message)> {
        for id in round_robin(self.conns.keys().copied(), self.cursor) {
            if let Some(msg) = self.next_for(id) {
                self.cursor = Some(id);
                return Some((id, msg));
            }
        }
        None
    }

    fn next_for(&mut self, id: ConnId) -> Option<Message> {
        let now_ms = self.now_ms;
        let c = self.conns.get_mut(&id)?;
        if let Some(m) = c.outbox.pop_front() {
            return Some(m);
        }
        if c.closing {
            return None;
        }
        if c.backlog_bytes > MAX_SEND_BACKLOG_BYTES {
            return None;
        }
        for doc in round_robin(c.subs.keys().copied(), c.cursor) {
            let (Some(open), Some(sub)) = (self.docs.get(&doc), c.subs.get_mut(&doc)) else { continue };
            if sub.window.next >= open.head {
                continue;
            }
            let Some(d) = open.document() else { continue };
            if let Some(msg) = storage_batch(doc, d, sub, now_ms) {
                c.cursor = Some(doc);
                return Some(msg);
            }
        }
        None
    }
}

/// The next `Storage` message for one subscriber, within its window and the batch size.
fn storage_batch(doc: DocId, d: &ServerDocument, sub: &mut Sub, now_ms: i64) -> Option<Message> {
    let avail = d.storage_range();
    let window = sub.window.room(DOC_WINDOW_BYTES);
    if sub.retry_read_at.is_some_and(|t| now_ms < t) {
        return None;
    }
    sub.retry_read_at = None;
    if sub.window.next >= avail.next() || window == 0 {
        return None;
    }
    if sub.window.next < avail.first() {
        // Behind the history kept: restart the subscriber at the checkpoint the journal starts
        // with (there is one: `subscribe` checked, and trimming keeps it so).
        sub.full_until = d.base_checkpoint().map(|c| c.last);
    }
    let first = sub.window.next.max(avail.first());
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut lsn = first;
    while lsn < avail.next() && bytes < MAX_BATCH_BYTES.min(window) {
        let read = match sub.full_until {
            Some(until) if lsn <= until => d.read_wire_full(lsn).map(|e| vec![e]),
            _ => d.read_wire(LsnRange::inclusive(lsn, lsn)),
        };
        let e = match read {
            Ok(mut one) => one.remove(0),
            Err(err) if entries.is_empty() => {
                sub.retry_read_at = Some(now_ms + RETRANSMIT_MS);
                return Some(error(
                    Some(doc),
                    codes::DOCUMENT,
                    format!("cannot read storage entry {lsn}: {err}"),
                ));
            }
            Err(_) => break, // send what was read; the next batch reports the error
        };
        bytes += e.data.len();
        entries.push(e);
        lsn = lsn.next();
    }
    sub.window.sent(lsn, bytes, now_ms);
    Some(Message::Storage { doc, first, entries })
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Subscribe { .. } => "Subscribe",
        Message::Mutations { .. } => "Mutations",
        Message::MutationsAck { .. } => "MutationsAck",
        Message::Storage { .. } => "Storage",
        Message::StorageAck { .. } => "StorageAck",
        Message::Error { .. } => "Error",
    }
}
