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
//! Blocking work is planned here and executed by the driver (`job.rs`): `poll_job` hands out a
//! document's open, step, read-ahead or export as a `DocJob`, and `job_done` takes it back.
//! Messages for a document out on a job wait for it; every other document carries on. The
//! session itself does no I/O: `poll_transmit` sends entries from memory (the recent entries a
//! document keeps, and those a job read ahead), and asks for a job when it needs more.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use pagesync_journal::{Lsn, LsnRange};

use super::job::{
    DocJob, Exists, Failure, Fetched, JobDone, OpenFailure, Opener, Outcome, Ran, SharedClock, Work,
};
use super::window::{SendWindow, round_robin};
use super::{
    DOC_WINDOW_BYTES, DecodeError, MAX_BATCH_BYTES, MAX_BROADCAST_BYTES, MAX_DOCS_PER_CONNECTION,
    MAX_READ_PAGES, MIN_BROADCAST_MS, Message, PROTOCOL_VERSION, RETRANSMIT_MS, codes,
};
use crate::error::Result;
use crate::history::Origin;
use crate::ids::{DocId, TimelineId};
use crate::reducer::Rejection;
use crate::server::{ServerDocument, StepOutcome};
use crate::wire::WireEntry;

/// A connection, as named by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// What a connection's token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `None`: every document. `Some(p)`: ids that start with `p` (a full id: exactly one).
    pub doc_prefix: Option<String>,
    pub write: bool,
    /// Who the token names (its `sub` claim): shown to the other clients in presence and
    /// recorded with its mutations in the history.
    pub subject: String,
    /// The token's `admin` claim: it may delete the document, and read its history where the
    /// server keeps that to admins (`SessionOptions::history_needs_admin`).
    pub admin: bool,
    /// Mutators it may call (its `call` claim; `*` every one). With `write` false, these are
    /// all it may send.
    pub calls: Option<Vec<String>>,
    /// When the token expires (its `exp` claim, in ms): then its connection is closed
    /// `unauthorized` (`ServerSession::poll_timeout` says when), and any message it sent
    /// after is refused so. `None`: never.
    pub expires_ms: Option<i64>,
}

impl Grant {
    /// Everything: for servers without auth (loopback only).
    pub fn all() -> Grant {
        Grant {
            doc_prefix: None,
            write: true,
            subject: String::new(),
            admin: true,
            calls: Some(vec!["*".into()]),
            expires_ms: None,
        }
    }

    /// Whether the token it came from has expired at `now_ms`.
    pub fn expired(&self, now_ms: i64) -> bool {
        self.expires_ms.is_some_and(|at| now_ms >= at)
    }

    /// May send mutations at all: raw SQL, or calls of some mutators.
    pub fn may_write(&self) -> bool {
        self.write || self.calls.as_ref().is_some_and(|c| !c.is_empty())
    }

    /// What the step checks each of its mutations against.
    pub fn permit(&self) -> crate::mutators::Permit {
        crate::mutators::Permit { raw: self.write, calls: self.calls.clone() }
    }

    pub fn allows(&self, doc: DocId) -> bool {
        self.doc_prefix.as_ref().is_none_or(|p| doc.to_string().starts_with(p.as_str()))
    }
}

/// Checks a `Hello` token at `now_ms`: the grant, or why it is refused.
pub type Authenticator = Box<dyn Fn(&str, i64) -> std::result::Result<Grant, String> + Send>;

/// A subscriber that broadcast, as presence shows it.
#[derive(Debug)]
struct PeerState {
    subject: String,
    timeline: TimelineId,
    value: Vec<u8>,
    /// When its value was last told to the others (for `MIN_BROADCAST_MS`).
    last_ms: i64,
    /// The room's version when its value was last told.
    version: u64,
    /// A newer value came within `MIN_BROADCAST_MS` of the last one told: it is told when that
    /// time is up (`presence_timers`), so the latest value always arrives.
    due: bool,
}

impl PeerState {
    fn peer(&self, conn: ConnId) -> super::Peer {
        let (subject, timeline, value) = (self.subject.clone(), self.timeline, self.value.clone());
        super::Peer { id: conn.0, subject, timeline, value }
    }

    /// What it costs the server: its value and a little for the rest.
    fn bytes(&self) -> usize {
        self.value.len() + self.subject.len() + 64
    }
}

/// One document's presence: the subscribers that broadcast, and the ones that left, each with
/// the version at which it changed. Every subscription remembers the version it was told up to
/// (`Sub::presence_seen`) and is sent what changed since when its connection has room, one
/// frame per peer, the peer's latest state: nothing is queued per subscriber, so presence costs
/// the server the peers' values whatever the number of subscribers or how slowly they read.
#[derive(Debug, Default)]
struct Room {
    version: u64,
    peers: BTreeMap<ConnId, PeerState>,
    /// Peers that left, with the version they left at, for subscribers that have not heard
    /// yet (the oldest are forgotten past `MAX_PRESENCE_LEFT`).
    left: BTreeMap<ConnId, u64>,
}

impl Room {
    /// The first change after `seen` that is news to `to`: its version, and the message that
    /// tells it. A subscriber is never told of itself.
    fn next_after(&self, doc: DocId, seen: u64, to: ConnId) -> Option<(u64, Message)> {
        if self.version <= seen {
            return None;
        }
        let peer =
            self.peers.iter().filter(|(id, p)| p.version > seen && **id != to).min_by_key(|(_, p)| p.version);
        let gone = self.left.iter().filter(|(_, v)| **v > seen).min_by_key(|(_, v)| **v);
        let presence =
            |(id, p): (&ConnId, &PeerState)| (p.version, Message::Presence { doc, peer: p.peer(*id) });
        match (peer, gone) {
            (Some(p), Some((_, v))) if p.1.version < *v => Some(presence(p)),
            (Some(p), None) => Some(presence(p)),
            (_, Some((id, v))) => Some((*v, Message::PeerLeft { doc, peer: id.0 })),
            (None, None) => None,
        }
    }
}

/// Peers that broadcast on one document at most: a new one past it is refused with `limit`.
pub const MAX_PRESENCE_PEERS: usize = 256;

/// Departures a room remembers for subscribers that have not heard of them yet.
const MAX_PRESENCE_LEFT: usize = 1_024;

/// Bytes of presence (values and subjects) one connection may hold over all its documents,
/// and the server over all: 256 KiB and 64 MiB. A broadcast past either is refused (`limit`).
pub const MAX_PRESENCE_CONN_BYTES: usize = 256 << 10;
pub const MAX_PRESENCE_BYTES: usize = 64 << 20;

#[derive(Debug)]
struct Sub {
    /// The storage sent to this subscriber.
    window: SendWindow,
    /// The timeline its `Subscribe` named: its `StorageAck`s say which of that timeline's
    /// rejections it has copied.
    timeline: TimelineId,
    /// It takes confirmations by digest of the entries that applied its timeline alone.
    digests: bool,
    /// Entries up to here go whole: the subscriber restarts at the checkpoint they end, and
    /// holds no pages to apply a delta to.
    full_until: Option<Lsn>,
    /// After a storage read failed (and the subscriber was told): no retry before this, so a
    /// persistent read error costs one attempt per `RETRANSMIT_MS`, not a busy loop.
    retry_read_at: Option<i64>,
    /// The deadline it has in `ServerSession::timers`: the earlier of its resend and its read
    /// retry.
    timer: Option<i64>,
    /// The version of the document's presence it has been told up to (`Room`).
    presence_seen: u64,
    /// The version of the mutator definitions it was sent (`None`: none).
    mutators: Option<String>,
}

impl Sub {
    /// Brings its entry in `timers` up to date with its window and read retry.
    fn rearm(&mut self, timers: &mut BTreeSet<(i64, ConnId, DocId)>, conn: ConnId, doc: DocId) {
        let due = [self.window.resend_at(), self.retry_read_at].into_iter().flatten().min();
        if due != self.timer {
            if let Some(t) = self.timer {
                timers.remove(&(t, conn, doc));
            }
            if let Some(t) = due {
                timers.insert((t, conn, doc));
            }
            self.timer = due;
        }
    }

    /// Takes its entry out of `timers` (it is going away).
    fn disarm(&mut self, timers: &mut BTreeSet<(i64, ConnId, DocId)>, conn: ConnId, doc: DocId) {
        if let Some(t) = self.timer.take() {
            timers.remove(&(t, conn, doc));
        }
    }
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
    /// Its journal refused writes until reopened: the next job opens it again first.
    reopen: bool,
    /// A subscriber holds more than its journal showed when opened (another server wrote it
    /// since): the next job reopens the journal even without a step. At most once per
    /// `RELOAD_MS`, from `reloaded_at`.
    reload: bool,
    reloaded_at: Option<i64>,
    /// Closed at once when its job comes back (`close_all`).
    close_when_back: Option<Message>,
    /// Its storage range as of its last job: only jobs write or trim storage, so what there is
    /// to send is known without asking the store (a lock and a journal call, for every
    /// subscription on every `poll_transmit`).
    stored: LsnRange,
    /// Entries read ahead for subscribers behind the recent ones, and what to read next.
    ahead: ReadAhead,
    /// An export was asked for (`request_export`): the next job does it.
    export: bool,
    /// The connections subscribed to it (exactly those whose `subs` name it): those to look at
    /// when its storage changes, it fails, or it could close.
    subscribers: BTreeSet<ConnId>,
    /// Page requests for its next job (`ask`).
    asks: Vec<(ConnId, Message)>,
}

/// Where an open document is.
#[derive(Debug)]
enum Held {
    Here(Box<ServerDocument>),
    /// Being opened: `create` says whether the open may create it, `out` whether its job was
    /// handed out. Messages for it wait.
    Opening {
        deferred: Deferred,
        create: bool,
        out: bool,
    },
    /// Out on a job (`poll_job`); messages for it wait for `job_done`.
    Out(Deferred),
}

/// Storage entries a job read for subscribers that are behind what the document keeps in
/// memory, whole (a subscriber that far behind gets no deltas).
#[derive(Debug, Default)]
struct ReadAhead {
    entries: BTreeMap<Lsn, WireEntry>,
    bytes: usize,
    /// The lowest LSN a subscriber waits for that is not in memory: the next job reads from it.
    want: Option<Lsn>,
    /// The last read failed here: subscribers that need it are told, and the read is tried
    /// again at `retry_at`.
    error: Option<(Lsn, super::job::Told)>,
    retry_at: Option<i64>,
}

impl ReadAhead {
    /// Takes what a job read, if it read, and drops entries below `keep_from` (every
    /// subscriber holds them) and, past `MAX_FETCHED_BYTES`, the lowest of the older ones.
    fn merge(&mut self, fetched: Option<Fetched>, keep_from: Option<Lsn>, now_ms: i64) {
        let mut fresh_from = None;
        if let Some(fetched) = fetched {
            fresh_from = fetched.entries.first().map(|(l, _)| *l);
            for (lsn, e) in fetched.entries {
                self.bytes += e.data.len();
                if let Some(old) = self.entries.insert(lsn, e) {
                    self.bytes -= old.data.len();
                }
            }
            self.retry_at = fetched.error.as_ref().map(|_| now_ms + RETRANSMIT_MS);
            self.error = fetched.error;
        }
        let Some(keep_from) = keep_from else {
            self.clear();
            return;
        };
        while let Some(entry) = self.entries.first_entry() {
            let lsn = *entry.key();
            let over = self.bytes > super::job::MAX_FETCHED_BYTES && fresh_from.is_none_or(|f| lsn < f);
            if lsn >= keep_from && !over {
                break;
            }
            self.bytes -= entry.remove().data.len();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// A subscriber needs `lsn`, which is not in memory.
    fn wants(&mut self, lsn: Lsn) {
        self.want = Some(self.want.map_or(lsn, |w| w.min(lsn)));
    }
}

impl OpenDoc {
    fn new(held: Held, now_ms: i64) -> OpenDoc {
        let stored = match &held {
            Held::Here(d) => d.storage_range(),
            _ => LsnRange::new_empty(),
        };
        OpenDoc {
            stored,
            held,
            queued_since: None,
            retry_at: None,
            last_used: now_ms,
            shrunk_at: None,
            reopen: false,
            reload: false,
            reloaded_at: None,
            close_when_back: None,
            ahead: ReadAhead::default(),
            export: false,
            subscribers: BTreeSet::new(),
            asks: Vec::new(),
        }
    }

    fn document(&self) -> Option<&ServerDocument> {
        match &self.held {
            Held::Here(d) => Some(d),
            Held::Opening { .. } | Held::Out(_) => None,
        }
    }

    fn document_mut(&mut self) -> Option<&mut ServerDocument> {
        match &mut self.held {
            Held::Here(d) => Some(d),
            Held::Opening { .. } | Held::Out(_) => None,
        }
    }

    /// Messages for it wait: it is being opened or is out on a job.
    fn deferred(&mut self) -> Option<&mut Deferred> {
        match &mut self.held {
            Held::Here(_) => None,
            Held::Opening { deferred, .. } | Held::Out(deferred) => Some(deferred),
        }
    }

    fn is_away(&self) -> bool {
        !matches!(self.held, Held::Here(_))
    }

    fn queued(&self) -> usize {
        self.document().map_or(0, ServerDocument::queued)
    }

    /// When it should step: after the commit interval, or at once when a full step is queued,
    /// but not before a failed step's retry time. Never while it is away.
    fn step_due(&self, commit_interval_ms: i64, now_ms: i64) -> Option<i64> {
        let d = self.document().filter(|d| d.queued() > 0 || d.forget_due())?;
        let since = self.queued_since.unwrap_or(now_ms);
        let batch_ready = d.queued() >= d.limits().max_mutations;
        let due = if batch_ready { since } else { since + commit_interval_ms };
        Some(due.max(self.retry_at.unwrap_or(i64::MIN)))
    }

    /// When its next job is due: its open, its step, a read for a subscriber, or an export.
    fn job_due(&self, commit_interval_ms: i64, now_ms: i64) -> Option<i64> {
        match &self.held {
            Held::Opening { out: false, .. } => return Some(now_ms),
            Held::Opening { .. } | Held::Out(_) => return None,
            Held::Here(_) => {}
        }
        let read = self.ahead.want.map(|_| self.ahead.retry_at.unwrap_or(now_ms));
        let export = (self.export || !self.asks.is_empty() || self.reload).then_some(now_ms);
        [self.step_due(commit_interval_ms, now_ms), read, export].into_iter().flatten().min()
    }
}

#[derive(Debug, Default)]
struct Conn {
    hello: bool,
    /// Set by a successful `Hello`.
    grant: Option<Grant>,
    /// What its grant lets its mutations do, shared by all of them.
    permit: Option<std::sync::Arc<crate::mutators::Permit>>,
    /// Subscriptions that may be due the definitions in force (`Message::Mutators`): made
    /// when the connection has room (`next_for`), never queued, so definitions cost no memory
    /// per subscriber however slowly it reads.
    mutators_due: BTreeSet<DocId>,
    subs: BTreeMap<DocId, Sub>,
    /// Documents being opened with a message of this connection waiting in them.
    opening: BTreeSet<DocId>,
    /// Its page requests waiting for a job or answered in `answers` (`ask`).
    asks: usize,
    /// Answers to its page requests, sent after `outbox`.
    answers: VecDeque<Message>,
    outbox: VecDeque<Message>,
    cursor: Option<DocId>,
    /// Set after a connection-level error: send the outbox, then the driver closes.
    closing: bool,
    /// Bytes handed to the driver and not yet written to the socket (`set_send_backlog`).
    backlog_bytes: usize,
    /// Since when the backlog has been over `MAX_SEND_BACKLOG_BYTES`.
    blocked_since_ms: Option<i64>,
    /// Since when it has had unwritten bytes without draining to none: under send pressure
    /// (`SessionOptions::max_send_backlog_bytes`), `PRESSURE_CLOSE_MS` of that closes it.
    unwritten_since_ms: Option<i64>,
    /// When its socket last took bytes, as the driver reports (`set_send_progress`).
    took_bytes_at_ms: Option<i64>,
}

/// A connection whose driver still holds this many unwritten bytes (past what the kernel's
/// socket buffer took) gets no more storage until it drains, and no retransmission until it is
/// empty: a peer that does not read costs at most this plus one message. 256 KiB: a reader
/// that keeps up never comes near it, the kernel buffers megabytes ahead of it.
pub const MAX_SEND_BACKLOG_BYTES: usize = 256 << 10;

/// A connection blocked on its backlog this long is closed: its peer is not reading.
pub const SLOW_READER_CLOSE_MS: i64 = 30_000;

/// While the bytes unwritten over every connection are at `max_send_backlog_bytes`, a
/// connection that has not drained what it holds within this long (or, for more than 5 MiB,
/// at `PRESSURE_MIN_DRAIN_BYTES_PER_MS`), counted from when it began to hold them or from when
/// the pressure began, whichever is later, is closed as a slow reader: peers that do not read
/// cannot hold the server's send memory, and with it every other client's downloads, for
/// `SLOW_READER_CLOSE_MS`, while a reader on a slow link still gets a 64 MiB entry through.
pub const PRESSURE_CLOSE_MS: i64 = 5_000;

/// While the server is short of send memory, a connection holding unwritten bytes whose socket
/// took none of them for this long is closed as a slow reader, if the driver reports when each
/// socket takes bytes (`ServerSession::set_send_progress`). One that stopped reading fills the
/// kernel's buffer at once and then takes nothing; one that reads lets it take more as the
/// buffer drains (a third of it at a time: at 1 MiB/s through a 4 MiB buffer, every second or
/// so) or pauses while it applies what it read, for less than this. So peers that do not read
/// make way within seconds, together, not one at a time at `PRESSURE_CLOSE_MS` (150 of them
/// held up a new client's download for 48 s). The price: under pressure, a reader that stalls
/// for this long (a lossy link backing off) is closed too, and subscribes again.
pub const PRESSURE_IDLE_MS: i64 = 2_000;

/// The slowest a connection must drain what it holds while the server is short of send
/// memory: about 1 MiB/s (see `PRESSURE_CLOSE_MS`).
pub const PRESSURE_MIN_DRAIN_BYTES_PER_MS: i64 = 1_024;

/// The default `SessionOptions::max_send_backlog_bytes`: 256 MiB.
pub const MAX_SEND_BACKLOG_TOTAL_BYTES: usize = 256 << 20;

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
    /// Bytes of storage entries read ahead for subscribers that are behind, over every
    /// document (each holds at most `MAX_FETCHED_BYTES`): a read that takes the total past it
    /// evicts other documents' read-ahead (it is read again when needed), so subscribers far
    /// behind on many documents (one read token on thousands of large ones, never
    /// acknowledging) cannot grow the server's memory past it, nor pin it and starve the
    /// others. `MAX_READ_AHEAD_BYTES` by default.
    pub max_read_ahead_bytes: usize,
    /// `ReadHistory` needs a token with the `admin` claim, not just a read grant.
    pub history_needs_admin: bool,
    /// Documents keep a history (`ServerDocument::set_history`); without, `ReadHistory` is
    /// answered `not_found`.
    pub keep_history: bool,
    /// Bytes handed to the driver and not yet written, over every connection: at it, no
    /// connection is sent more (but for its queued replies and errors), page requests are
    /// refused, and connections that do not drain what they hold in time are closed (see
    /// `PRESSURE_CLOSE_MS`).
    /// Each connection holds at most `MAX_SEND_BACKLOG_BYTES` and one message besides, but
    /// one message may be a 64 MiB storage entry: this bounds their sum, whatever the number
    /// of connections. `MAX_SEND_BACKLOG_TOTAL_BYTES` by default.
    pub max_send_backlog_bytes: usize,
    /// Documents open at once, over every connection: a message that would open one more is
    /// answered `limit`. Each open document holds a file descriptor and some memory, so without
    /// it clients opening thousands each exhaust the server's descriptors (then it cannot
    /// accept a connection, nor append to the documents already open). Unbounded by default.
    pub max_open_docs: usize,
}

/// The default `SessionOptions::max_read_ahead_bytes`: 256 MiB, 64 documents' full read-ahead.
pub const MAX_READ_AHEAD_BYTES: usize = 256 << 20;

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            commit_interval_ms: 0,
            step_threads: 1,
            idle_close_ms: None,
            idle_shrink_ms: None,
            max_read_ahead_bytes: MAX_READ_AHEAD_BYTES,
            history_needs_admin: false,
            keep_history: true,
            max_send_backlog_bytes: MAX_SEND_BACKLOG_TOTAL_BYTES,
            max_open_docs: usize::MAX,
        }
    }
}

/// Why an export (`request_export`) gave no file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("no such document")]
    NotFound,
    /// Another server of the cluster holds the document's lease: export it there.
    #[error("the document is served by {owner}")]
    Moved { owner: String },
    /// The server cannot export it now (its storage does not answer, the document was
    /// closed meanwhile, the server is shutting down): asking again later may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// How often a subscriber that holds more than the server's journal showed may make it read
/// the journal again: 5 s, so a client claiming a future LSN costs one reopen per 5 s.
pub const RELOAD_MS: i64 = 5_000;

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
    /// Another server holds the document's lease now (found when its journal was opened
    /// again); it was closed here and its clients sent to `owner`.
    DocumentMoved { doc: DocId, owner: String },
    /// Opening the document, reading its storage, answering a page or history request or
    /// exporting it (`doing`) failed. Its clients were told the kind of failure only
    /// (`Error::public`); `error` is the whole of it.
    Failed { doc: DocId, doing: &'static str, error: String },
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
    /// Timelines whose rejections a step deleted once their clients had copied them.
    pub rejections_forgotten: u64,
    /// Jobs that read storage entries ahead for subscribers.
    pub storage_reads: u64,
    /// Documents whose read-ahead was dropped to keep the total under
    /// `SessionOptions::max_read_ahead_bytes`.
    pub read_ahead_evictions: u64,
    /// Entries sent as confirmations by digest instead of their pages.
    pub confirms_sent: u64,
    /// Subscribers that took confirmations and subscribed again without (they could not
    /// keep one: see `Error::ConfirmMismatch`).
    pub digest_fallbacks: u64,
    /// Page requests (`MapPages`, `ReadPages`) answered, and refused at their bounds.
    pub page_requests: u64,
    pub page_requests_refused: u64,
    /// `Redirect`s sent: a client asked for a document another server holds the lease of.
    pub redirects: u64,
    /// Open documents closed because another server holds their lease now.
    pub documents_moved: u64,
    /// Broadcasts taken, those of them held back by `MIN_BROADCAST_MS` (told later, or
    /// replaced by a newer one), and those refused at a bound; presence messages sent.
    pub broadcasts: u64,
    pub broadcasts_held: u64,
    pub broadcasts_refused: u64,
    pub presence_sent: u64,
}

impl SessionStats {
    fn record(&mut self, outcome: &StepOutcome, micros: Option<u64>) {
        self.steps += 1;
        self.rejections_forgotten += outcome.forgotten as u64;
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

/// A monotonic clock in microseconds, used only to time steps for metrics.
pub type Clock = Box<dyn Fn() -> u64 + Send + Sync>;

/// The mutator definitions in force for a document now (`None`: none).
pub type MutatorsFor = Box<dyn Fn(DocId) -> Option<std::sync::Arc<crate::mutators::Mutators>> + Send>;

/// `Message::Mutators` for `doc`: its definitions, or none (empty version and source).
fn mutators_message(doc: DocId, m: Option<&crate::mutators::Mutators>) -> Message {
    let (version, source) =
        m.map_or((String::new(), String::new()), |m| (m.version().to_owned(), m.source().to_owned()));
    Message::Mutators { doc, version, source }
}

pub struct ServerSession {
    opener: Opener,
    /// Tells whether a document exists, so a read-only grant never creates one; without it
    /// every open may create.
    exists: Option<Exists>,
    auth: Option<Authenticator>,
    options: SessionOptions,
    clock: Option<SharedClock>,
    /// The mutator definitions in force for a document (`with_mutators`).
    mutators: Option<MutatorsFor>,
    stats: SessionStats,
    docs: HashMap<DocId, OpenDoc>,
    next_idle_sweep_ms: i64,
    conns: BTreeMap<ConnId, Conn>,
    cursor: Option<ConnId>,
    now_ms: i64,
    events: VecDeque<Event>,
    /// Who is subscribed to each document, with their last broadcast (`Message::Presence`).
    presence: HashMap<DocId, Room>,
    /// When a broadcast held back by `MIN_BROADCAST_MS` is told: (time, document, broadcaster).
    presence_timers: BTreeSet<(i64, DocId, ConnId)>,
    /// Bytes of presence held, over all rooms (`MAX_PRESENCE_BYTES`), and by connection
    /// (`MAX_PRESENCE_CONN_BYTES`).
    presence_bytes: usize,
    presence_conn_bytes: HashMap<ConnId, usize>,
    /// Jobs run by the driver (`poll_job` / `job_done`) rather than by the session itself.
    external_jobs: bool,
    /// Jobs handed out and not yet back (documents `Held::Out`, or opening with `out`).
    jobs_out: usize,
    /// Bytes of mutations waiting for documents that are away, over all documents.
    deferred_bytes: usize,
    /// Bytes of entries read ahead over every document (`ReadAhead::bytes`), bounded by
    /// `SessionOptions::max_read_ahead_bytes`, and the documents that hold any.
    ahead_bytes: usize,
    ahead_docs: BTreeSet<DocId>,
    /// Finished exports, for `poll_export`.
    exported: VecDeque<(DocId, std::result::Result<Vec<u8>, ExportError>)>,
    /// Documents that may have a job due (being opened, queued mutations, a read asked for,
    /// an export, a retry): `poll_job` and `poll_timeout` look only at these, so their cost
    /// follows the busy documents, not the open ones. Pruned once a second (`close_idle`).
    active: BTreeSet<DocId>,
    /// Connections that may have something to send: `poll_transmit` looks only at these and
    /// drops each it finds with nothing. Whatever may give a connection something to send
    /// (a message from it, a job done on a document it subscribes to, a rewind, a drained
    /// backlog) puts it back. Once a second every connection is put back, a backstop.
    ready: BTreeSet<ConnId>,
    /// Each subscription's next resend or read retry, earliest first: `handle_timeout` takes
    /// only those that are due. A connection with unwritten bytes resends nothing: its due
    /// timers wait in `held` until its backlog drains.
    timers: BTreeSet<(i64, ConnId, DocId)>,
    held: BTreeSet<ConnId>,
    /// The sum of every connection's `backlog_bytes`, and the connections that were sent
    /// nothing because it was at `SessionOptions::max_send_backlog_bytes` (ready again once
    /// it is below).
    send_backlog_total: usize,
    starved: BTreeSet<ConnId>,
    /// Since when `send_backlog_total` has been at its bound.
    pressed_since_ms: Option<i64>,
    /// Documents being opened whose open job has not gone out yet.
    to_open: BTreeSet<DocId>,
    /// Open jobs handed out since the last step job (`OPENS_PER_STEP`).
    opens_in_a_row: u32,
}

/// Open jobs handed out, at most, while a step is due, before that step: opens go first (a
/// client waits on each), but a client opening thousands of documents at once does not hold
/// back the writes of every document already open.
pub const OPENS_PER_STEP: u32 = 4;

/// Messages for a document that is away (opening, or out on a job), handled when it is back.
#[derive(Debug, Default)]
struct Deferred {
    messages: Vec<(ConnId, i64, Message)>,
    bytes: usize,
}

/// Bytes of mutations kept for one document while it is away; more are dropped
/// unacknowledged, and their clients send them again. 16 MiB: many steps' worth.
pub const MAX_DEFERRED_BYTES: usize = 16 << 20;

/// ... and over every document at once: 64 MiB. With documents opening on many connections,
/// this, not the number of documents, bounds what waiting messages cost.
pub const MAX_DEFERRED_TOTAL_BYTES: usize = 64 << 20;

/// Page requests (`MapPages`, `ReadPages`) one connection may have waiting for jobs or
/// answered in its outbox: a reader blocked on a page has one; four leave room for a few
/// readers sharing a connection. Each answer is at most about 1 MiB (`MAX_READ_PAGES`,
/// `MAX_MAP_RUNS`), so this bounds what one connection's requests hold in the server.
pub const MAX_ASKS_PER_CONNECTION: usize = 4;

/// ... and one document may have waiting over every connection.
pub const MAX_ASKS_PER_DOC: usize = 256;

/// A waiting `Subscribe` counts this many bytes against the bounds above, so that a flood of
/// them is bounded too.
const DEFERRED_MESSAGE_BYTES: usize = 256;

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("docs", &self.docs.len())
            .field("conns", &self.conns.len())
            .finish()
    }
}

/// Whether `msg` creates its document when it does not exist: `Mutations`, and a `Subscribe`
/// that asks to, from a grant that may write.
fn creates(grant: Option<&Grant>, msg: &Message) -> bool {
    let asked = match msg {
        Message::Mutations { .. } => true,
        Message::Subscribe { create, .. } => *create,
        _ => false,
    };
    asked && grant.is_some_and(Grant::may_write)
}

/// What closes a connection whose token expired.
fn expired() -> Message {
    error(None, codes::UNAUTHORIZED, "the token expired while connected; connect again with a new one")
}

fn error(doc: Option<DocId>, code: &str, message: impl Into<String>) -> Message {
    Message::Error { doc, code: code.into(), message: message.into() }
}

impl ServerSession {
    /// A session that opens documents with `opener` (on the driver's job threads, with
    /// `with_external_jobs`).
    pub fn new(opener: impl Fn(DocId) -> Result<ServerDocument> + Send + Sync + 'static) -> ServerSession {
        ServerSession {
            opener: std::sync::Arc::new(opener),
            exists: None,
            auth: None,
            options: SessionOptions::default(),
            clock: None,
            mutators: None,
            stats: SessionStats::default(),
            docs: HashMap::new(),
            next_idle_sweep_ms: 0,
            conns: BTreeMap::new(),
            cursor: None,
            now_ms: 0,
            events: VecDeque::new(),
            external_jobs: false,
            jobs_out: 0,
            deferred_bytes: 0,
            ahead_bytes: 0,
            ahead_docs: BTreeSet::new(),
            exported: VecDeque::new(),
            presence: HashMap::new(),
            presence_timers: BTreeSet::new(),
            presence_bytes: 0,
            presence_conn_bytes: HashMap::new(),
            active: BTreeSet::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            held: BTreeSet::new(),
            send_backlog_total: 0,
            starved: BTreeSet::new(),
            pressed_since_ms: None,
            to_open: BTreeSet::new(),
            opens_in_a_row: 0,
        }
    }

    /// Requires every connection to present a token this accepts. Without it, every
    /// connection may read and write every document.
    pub fn with_auth(mut self, auth: Authenticator) -> ServerSession {
        self.auth = Some(auth);
        self
    }

    /// Has the driver run the blocking work (`poll_job`, `DocJob::run` on a thread of its own,
    /// `job_done`) so that no document's open, step or read holds up the others or the
    /// session; without it the session does that work itself, on the caller's thread, when it
    /// comes up (`handle_message`, `handle_timeout`, `poll_transmit`).
    pub fn with_external_jobs(mut self) -> ServerSession {
        self.external_jobs = true;
        self
    }

    /// Lets the session check that a document exists before opening it for a read-only grant,
    /// which then gets `not_found` instead of creating it.
    pub fn with_exists(
        mut self,
        exists: impl Fn(DocId) -> Result<bool> + Send + Sync + 'static,
    ) -> ServerSession {
        self.exists = Some(std::sync::Arc::new(exists));
        self
    }

    pub fn with_options(mut self, options: SessionOptions) -> ServerSession {
        self.options = SessionOptions { step_threads: options.step_threads.max(1), ..options };
        self
    }

    /// Sends each subscriber the mutator definitions `mutators` says are in force for its
    /// document (`Message::Mutators`), when it subscribes and after `mutators_changed`.
    pub fn with_mutators(mut self, mutators: MutatorsFor) -> ServerSession {
        self.mutators = Some(mutators);
        self
    }

    /// The definitions changed (a reload): every subscriber whose document's are not the ones
    /// it was sent is sent them again (empty when its document has none now).
    pub fn mutators_changed(&mut self) {
        if self.mutators.is_none() {
            return;
        }
        for (conn, c) in self.conns.iter_mut() {
            if !c.subs.is_empty() {
                c.mutators_due.extend(c.subs.keys().copied());
                self.ready.insert(*conn);
            }
        }
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
        self.ready.insert(conn);
    }

    pub fn disconnect(&mut self, conn: ConnId) {
        let Some(mut c) = self.conns.remove(&conn) else { return };
        for (doc, sub) in &mut c.subs {
            sub.disarm(&mut self.timers, conn, *doc);
            if let Some(open) = self.docs.get_mut(doc) {
                open.subscribers.remove(&conn);
            }
            // What only it was behind on goes now.
            self.drop_acked_ahead(*doc);
        }
        for doc in c.subs.keys() {
            self.leave_presence(*doc, conn);
        }
        self.presence_conn_bytes.remove(&conn);
        self.ready.remove(&conn);
        self.held.remove(&conn);
        self.starved.remove(&conn);
        self.send_backlog_total -= c.backlog_bytes;
        self.send_pressure_changed();
    }

    /// Whether the bytes unwritten over every connection are at their bound: then a driver
    /// that can reports the progress of each connection holding unwritten bytes
    /// (`set_send_progress`) before `handle_timeout`.
    pub fn send_pressed(&self) -> bool {
        self.send_backlog_total >= self.options.max_send_backlog_bytes
    }

    /// Notes when the pressure began; below the bound again, the connections that were sent
    /// nothing may be sent more.
    fn send_pressure_changed(&mut self) {
        if self.send_pressed() {
            self.pressed_since_ms.get_or_insert(self.now_ms);
        } else {
            self.pressed_since_ms = None;
            if !self.starved.is_empty() {
                self.ready.append(&mut self.starved);
            }
        }
    }

    /// When a connection holding unwritten bytes is closed for not draining them, while the
    /// server is short of send memory since `pressed_since` (see `PRESSURE_CLOSE_MS`).
    fn stall_deadline(c: &Conn, pressed_since: i64) -> Option<i64> {
        let allowed = PRESSURE_CLOSE_MS.max(c.backlog_bytes as i64 / PRESSURE_MIN_DRAIN_BYTES_PER_MS);
        c.unwritten_since_ms.map(|t| t.max(pressed_since) + allowed)
    }

    /// When a connection holding unwritten bytes, whose socket takes none of them, may be
    /// closed while the server is short of send memory since `pressed_since` (see
    /// `PRESSURE_IDLE_MS`).
    fn idle_deadline(c: &Conn, pressed_since: i64) -> Option<i64> {
        let since = c.unwritten_since_ms?.max(pressed_since);
        c.took_bytes_at_ms.map(|t| t.max(since) + PRESSURE_IDLE_MS)
    }

    /// At `now_ms`, `conn`'s socket last took bytes to send `idle_ms` ago (measured on a clock
    /// that does not step): see `PRESSURE_IDLE_MS`.
    pub fn set_send_progress(&mut self, conn: ConnId, now_ms: i64, idle_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.took_bytes_at_ms = Some(self.now_ms - idle_ms.max(0));
        }
    }

    /// True once the connection had a fatal error and its outbox is empty: close it.
    pub fn should_close(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.closing && c.outbox.is_empty())
    }

    /// The driver's unwritten bytes for `conn`. Over `MAX_SEND_BACKLOG_BYTES` the connection
    /// gets no storage; above zero, no retransmission; blocked for `SLOW_READER_CLOSE_MS` it
    /// is closed. Their sum over every connection is bounded too
    /// (`SessionOptions::max_send_backlog_bytes`).
    pub fn set_send_backlog(&mut self, conn: ConnId, bytes: usize) {
        let now = self.now_ms;
        if bytes == 0 && self.held.remove(&conn) {
            // Its resends were held back while bytes waited.
            self.resend(conn, now);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            self.send_backlog_total = self.send_backlog_total - c.backlog_bytes + bytes;
            c.backlog_bytes = bytes;
            c.unwritten_since_ms = if bytes == 0 { None } else { c.unwritten_since_ms.or(Some(now)) };
            if bytes <= MAX_SEND_BACKLOG_BYTES {
                c.blocked_since_ms = None;
                self.ready.insert(conn);
            } else if c.blocked_since_ms.is_none() {
                c.blocked_since_ms = Some(now);
            }
        }
        self.send_pressure_changed();
    }

    /// An open document, unless it is away (opening, or out on a job).
    pub fn document(&self, doc: DocId) -> Option<&ServerDocument> {
        self.docs.get(&doc)?.document()
    }

    /// Asks for the document as a `.sqlite` file, read by a job (it is opened first if
    /// needed, never created); the result comes from `poll_export`.
    pub fn request_export(&mut self, doc: DocId) {
        let now = self.now_ms;
        let to_open = &mut self.to_open;
        let open = self.docs.entry(doc).or_insert_with(|| {
            to_open.insert(doc);
            let held = Held::Opening { deferred: Deferred::default(), create: false, out: false };
            OpenDoc::new(held, now)
        });
        open.export = true;
        open.last_used = now;
        self.active.insert(doc);
        self.run_here(doc);
    }

    /// A finished export: the document, and its file or why it failed.
    pub fn poll_export(&mut self) -> Option<(DocId, std::result::Result<Vec<u8>, ExportError>)> {
        self.exported.pop_front()
    }

    /// The open documents, except those away.
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &ServerDocument)> {
        self.docs.iter().filter_map(|(id, o)| Some((id, o.document()?)))
    }

    /// Documents the session holds, open or on their way.
    pub fn document_count(&self) -> usize {
        self.docs.len()
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
            self.ready.insert(conn);
        }
    }

    pub fn handle_message(&mut self, conn: ConnId, now_ms: i64, msg: Message) {
        self.now_ms = self.now_ms.max(now_ms);
        if !self.conns.contains_key(&conn) {
            return;
        }
        // A reply, or room in a window: it may have something to send.
        self.ready.insert(conn);
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.closing {
            return;
        }
        match msg {
            Message::Hello { version, token } if version == PROTOCOL_VERSION => {
                let grant = self.auth.as_ref().map_or(Ok(Grant::all()), |auth| auth(&token, now_ms));
                // A later `Hello` (a new token on an open connection) takes the place of the
                // grant: a document it does not allow, which this connection is subscribed to or
                // opening, would otherwise go on streaming to it past the old token's reach.
                let lost = match &grant {
                    Ok(g) => c.subs.keys().chain(&c.opening).find(|doc| !g.allows(**doc)).copied(),
                    Err(_) => None,
                };
                match grant {
                    Ok(_) if let Some(doc) = lost => {
                        let why = format!(
                            "the new token does not grant document {doc}, to which this connection is subscribed: \
                             connect again to go on with what it grants"
                        );
                        self.fail(conn, error(None, codes::FORBIDDEN, why));
                    }
                    Ok(g) => {
                        c.hello = true;
                        c.permit = Some(std::sync::Arc::new(g.permit()));
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
            // A token is good until it expires, not for as long as its connection lasts.
            _ if c.grant.as_ref().is_some_and(|g| g.expired(now_ms)) => self.fail(conn, expired()),
            Message::Subscribe { doc, .. }
            | Message::Mutations { doc, .. }
            | Message::MapPages { doc, .. }
            | Message::ReadPages { doc, .. }
            | Message::ReadHistory { doc, .. }
            | Message::HeadAsk { doc, .. }
                if !c.grant.as_ref().is_some_and(|g| g.allows(doc)) =>
            {
                let text = format!("your token does not grant access to document {doc}");
                c.outbox.push_back(error(Some(doc), codes::FORBIDDEN, text));
            }
            Message::Mutations { doc, .. } if !c.grant.as_ref().is_some_and(Grant::may_write) => {
                let text = format!("your token is read-only: writes to {doc} are refused");
                c.outbox.push_back(error(Some(doc), codes::FORBIDDEN, text));
            }
            // Refused before anything is opened or deferred for it.
            Message::Mutations { first, ref entries, .. }
                if first.get().checked_add(entries.len() as u64).is_none_or(|end| end == u64::MAX) =>
            {
                let text = format!("{} entries from LSN {first} run past the LSN space", entries.len());
                self.fail(conn, error(msg.doc(), codes::MALFORMED, text));
            }
            Message::ReadHistory { doc, .. } if !self.options.keep_history => {
                let text = format!("this server keeps no history (--history off): none of {doc}");
                c.outbox.push_back(error(Some(doc), codes::NOT_FOUND, text));
            }
            Message::ReadHistory { doc, .. }
                if self.options.history_needs_admin && !c.grant.as_ref().is_some_and(|g| g.admin) =>
            {
                let text = format!("this server shows the history of {doc} to admin tokens only");
                c.outbox.push_back(error(Some(doc), codes::FORBIDDEN, text));
            }
            Message::ReadPages { doc, pages, .. } if pages == 0 || pages > MAX_READ_PAGES => {
                let text = format!("a read of {pages} pages: from 1 to {MAX_READ_PAGES} at once");
                c.outbox.push_back(error(Some(doc), codes::MALFORMED, text));
            }
            // A page or history request never creates its document.
            Message::MapPages { doc, .. }
            | Message::ReadPages { doc, .. }
            | Message::ReadHistory { doc, .. }
                if !self.docs.contains_key(&doc) =>
            {
                self.start_open(conn, now_ms, msg, doc, false)
            }
            Message::MapPages { doc, .. }
            | Message::ReadPages { doc, .. }
            | Message::ReadHistory { doc, .. }
                if self.docs.get(&doc).is_some_and(OpenDoc::is_away) =>
            {
                self.defer(conn, now_ms, msg)
            }
            Message::MapPages { doc, .. }
            | Message::ReadPages { doc, .. }
            | Message::ReadHistory { doc, .. } => self.ask(conn, doc, msg),
            Message::Subscribe { doc, .. } | Message::Mutations { doc, .. }
                if !self.docs.contains_key(&doc) =>
            {
                let create = creates(c.grant.as_ref(), &msg);
                self.start_open(conn, now_ms, msg, doc, create)
            }
            Message::Subscribe { doc, .. } | Message::Mutations { doc, .. }
                if self.docs.get(&doc).is_some_and(OpenDoc::is_away) =>
            {
                self.defer(conn, now_ms, msg)
            }
            Message::Subscribe { doc, key, storage_next, digests, .. } => {
                self.subscribe(conn, doc, key.id(), storage_next, digests)
            }
            // A timeline's id is public (storage entries, presence); its key is not. Only a
            // connection that subscribed with the key writes to it, so no client can take
            // another's LSNs (the owner's own mutations would then be skipped as done).
            // (A subscription the server ended, closing the document, gets the same answer:
            // its client subscribes again, with the key, and resends.)
            Message::Mutations { doc, timeline, .. }
                if c.subs.get(&doc).is_none_or(|s| s.timeline != timeline) =>
            {
                let text = format!(
                    "mutations for timeline {timeline} of {doc} on a connection that did not subscribe to it with its key: refused"
                );
                c.outbox.push_back(error(Some(doc), codes::NOT_SUBSCRIBED, text));
            }
            Message::HeadAsk { doc, .. } if !c.subs.contains_key(&doc) => {
                let text = format!("a head request for {doc} on a connection not subscribed to it");
                c.outbox.push_back(error(Some(doc), codes::NOT_SUBSCRIBED, text));
            }
            Message::HeadAsk { doc, .. } if self.docs.get(&doc).is_some_and(OpenDoc::is_away) => {
                self.defer(conn, now_ms, msg)
            }
            Message::HeadAsk { doc, id } => {
                // In the outbox after every entry already sent to this subscriber.
                let head = self.here(doc).and_then(|o| o.document()).map(|d| d.storage_range().next());
                let answer = match head {
                    Some(storage_next) => Message::Head { doc, id, storage_next },
                    None => error(Some(doc), codes::NOT_SUBSCRIBED, format!("{doc} is not open here")),
                };
                self.push(conn, answer);
            }
            Message::Mutations { doc, timeline, first, entries } => {
                let subject = c.grant.as_ref().map_or("", |g| g.subject.as_str());
                let origin =
                    Origin { subject: subject.into(), received_ms: Some(now_ms), permit: c.permit.clone() };
                if let Some(open) = self.here(doc) {
                    let d = open.document_mut().expect("BUG: here");
                    let received = d.receive_from(timeline, first, entries, &origin);
                    let storage_next = d.storage_range().next();
                    if d.queued() > 0 {
                        open.queued_since.get_or_insert(now_ms);
                        self.active.insert(doc);
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
            Message::StorageAck { doc, next, outcomes_through } => {
                let Some(sub) = c.subs.get_mut(&doc) else { return };
                // An acknowledgement past what was sent is the peer's mistake: ignored.
                sub.window.ack(next.min(sub.window.next));
                // Progress ends the resend backoff: what is left may be due sooner.
                sub.rearm(&mut self.timers, conn, doc);
                let timeline = sub.timeline;
                self.drop_acked_ahead(doc);
                // A document away hears it when it is back (a client held back for its
                // unacknowledged rejections may have nothing more to acknowledge).
                let Some(through) = outcomes_through else { return };
                match self.docs.get_mut(&doc) {
                    Some(open) if open.is_away() => {
                        self.defer(conn, now_ms, Message::StorageAck { doc, next, outcomes_through })
                    }
                    Some(open) => {
                        if let Some(d) = open.document_mut() {
                            d.forget_rejections(timeline, through);
                            if d.forget_due() {
                                // It may make room for a timeline held back for want of it.
                                open.queued_since.get_or_insert(now_ms);
                                self.active.insert(doc);
                            }
                        }
                    }
                    None => {}
                }
            }
            // After a `Subscribe` that waits for its document, in order.
            Message::Broadcast { doc, .. } if self.docs.get(&doc).is_some_and(OpenDoc::is_away) => {
                self.defer(conn, now_ms, msg)
            }
            Message::Broadcast { doc, value } => self.broadcast(conn, doc, value),
            Message::Error { .. } => {}
            other => {
                let text = format!("a client may not send {}", kind(&other));
                self.fail(conn, error(other.doc(), codes::MALFORMED, text));
            }
        }
    }

    /// Queues a `MapPages` or `ReadPages` for `doc`'s next job (it is here). A connection may
    /// have `MAX_ASKS_PER_CONNECTION` waiting or answered and not yet handed to its driver, a
    /// document `MAX_ASKS_PER_DOC` waiting; past either, or while the connection's driver holds
    /// more than `MAX_SEND_BACKLOG_BYTES` unwritten, or while the unwritten bytes over every
    /// connection are at their bound (`SessionOptions::max_send_backlog_bytes`), the ask is
    /// refused with `limit`. So page requests cost the server bounded memory and reads, even
    /// from many peers that never read.
    fn ask(&mut self, conn: ConnId, doc: DocId, msg: Message) {
        let pressed = self.send_pressed();
        let (Some(c), Some(open)) = (self.conns.get_mut(&conn), self.docs.get_mut(&doc)) else { return };
        let unread = c.backlog_bytes > MAX_SEND_BACKLOG_BYTES || pressed;
        if c.asks >= MAX_ASKS_PER_CONNECTION || open.asks.len() >= MAX_ASKS_PER_DOC || unread {
            let text = format!(
                "too many page requests waiting: at most {MAX_ASKS_PER_CONNECTION} per connection, {MAX_ASKS_PER_DOC} per document"
            );
            self.stats.page_requests_refused += 1;
            return c.outbox.push_back(error(Some(doc), codes::LIMIT, text));
        }
        c.asks += 1;
        open.asks.push((conn, msg));
        open.last_used = self.now_ms;
        self.active.insert(doc);
        self.run_here(doc);
    }

    fn push(&mut self, conn: ConnId, msg: Message) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbox.push_back(msg);
        }
    }

    /// The document, marked used, when it is open and not away.
    fn here(&mut self, doc: DocId) -> Option<&mut OpenDoc> {
        let now = self.now_ms;
        let open = self.docs.get_mut(&doc).filter(|o| !o.is_away())?;
        open.last_used = now;
        Some(open)
    }

    /// Starts opening `doc` for `conn`'s message, which waits for it. A connection may have at
    /// most `MAX_DOCS_PER_CONNECTION` documents subscribed or opening.
    fn start_open(&mut self, conn: ConnId, now_ms: i64, msg: Message, doc: DocId, create: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.subs.len() + c.opening.len() >= MAX_DOCS_PER_CONNECTION {
            let text =
                format!("a connection may subscribe to or open at most {MAX_DOCS_PER_CONNECTION} documents");
            return self.push(conn, error(Some(doc), codes::LIMIT, text));
        }
        if self.docs.len() >= self.options.max_open_docs {
            let max = self.options.max_open_docs;
            let text = format!(
                "the server has {max} documents open, as many as it may (--max-open-docs): retry later"
            );
            return self.push(conn, error(Some(doc), codes::LIMIT, text));
        }
        let held = Held::Opening { deferred: Deferred::default(), create, out: false };
        self.docs.insert(doc, OpenDoc::new(held, now_ms));
        self.active.insert(doc);
        self.to_open.insert(doc);
        self.defer(conn, now_ms, msg);
        self.run_here(doc);
    }

    fn subscribe(
        &mut self,
        conn: ConnId,
        doc: DocId,
        timeline: TimelineId,
        storage_next: Lsn,
        digests: bool,
    ) {
        let over_limit = self.conns.get(&conn).is_some_and(|c| {
            !c.subs.contains_key(&doc) && c.subs.len() + c.opening.len() >= MAX_DOCS_PER_CONNECTION
        });
        if over_limit {
            let text = format!("a connection may subscribe to at most {MAX_DOCS_PER_CONNECTION} documents");
            return self.push(conn, error(Some(doc), codes::LIMIT, text));
        }
        let now = self.now_ms;
        let Some(open) = self.here(doc) else { return };
        let Some(d) = open.document() else { return };
        let have = d.storage_range().next();
        if storage_next > have {
            // Another server may have written it since this one opened its journal (a write
            // that landed late, in a cluster): read the journal again, now and then.
            if open.reloaded_at.is_none_or(|t| now >= t + RELOAD_MS) {
                (open.reload, open.reopen, open.reloaded_at) = (true, true, Some(now));
                self.active.insert(doc);
            }
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
        let window = SendWindow::new(start);
        let sub = Sub {
            window,
            timeline,
            digests,
            full_until,
            retry_read_at: None,
            timer: None,
            presence_seen: 0,
            mutators: None,
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            let mut sub = sub;
            // Told once: a re-subscription on the same connection is not told again.
            sub.presence_seen = c.subs.get(&doc).map_or(0, |old| old.presence_seen);
            // Definitions likewise: sent when this connection was not sent these yet.
            sub.mutators = c.subs.get(&doc).and_then(|old| old.mutators.clone());
            if self.mutators.is_some() {
                c.mutators_due.insert(doc);
            }
            if let Some(mut old) = c.subs.insert(doc, sub) {
                old.disarm(&mut self.timers, conn, doc);
                // It could not keep a confirmation: its replay gave other pages, or it does
                // not hold the mutations (see `Error::ConfirmMismatch`).
                self.stats.digest_fallbacks += u64::from(old.digests && !digests);
            }
            c.outbox.push_back(Message::MutationsAck { doc, timeline, next_expected, storage_next: have });
            if let Some(open) = self.docs.get_mut(&doc) {
                open.subscribers.insert(conn);
            }
        }
    }

    /// `conn` is no longer subscribed to `doc`: if it broadcast, the others are told.
    fn leave_presence(&mut self, doc: DocId, conn: ConnId) {
        let Some(room) = self.presence.get_mut(&doc) else { return };
        let Some(gone) = room.peers.remove(&conn) else { return };
        self.presence_bytes -= gone.bytes();
        if let Some(b) = self.presence_conn_bytes.get_mut(&conn) {
            *b -= gone.bytes();
        }
        // Nobody left to tell: the room goes.
        if self.docs.get(&doc).is_none_or(|o| o.subscribers.is_empty()) {
            self.presence.remove(&doc);
            return;
        }
        room.version += 1;
        room.left.insert(conn, room.version);
        if room.left.len() > MAX_PRESENCE_LEFT
            && let Some(oldest) = room.left.iter().min_by_key(|(_, v)| **v).map(|(id, _)| *id)
        {
            room.left.remove(&oldest);
        }
        self.ready_subscribers(doc);
    }

    /// A subscriber's broadcast: kept as its presence (replacing its last one) and told to every
    /// other subscriber as its connection has room; never journaled. One that comes within
    /// `MIN_BROADCAST_MS` of the last one told waits for that time (a newer one replaces it), so
    /// a flood costs the others at most one frame each per `MIN_BROADCAST_MS`, and the latest
    /// value always arrives.
    fn broadcast(&mut self, conn: ConnId, doc: DocId, value: Vec<u8>) {
        let now = self.now_ms;
        let subscribed = self.conns.get(&conn).and_then(|c| c.subs.get(&doc).map(|s| (s.timeline, c)));
        let Some((timeline, c)) = subscribed else {
            let text = format!("subscribe to {doc} before broadcasting to it");
            return self.push(conn, error(Some(doc), codes::MALFORMED, text));
        };
        let subject = c.grant.as_ref().map(|g| g.subject.clone()).unwrap_or_default();
        let room = self.presence.entry(doc).or_default();
        let old = room.peers.get(&conn);
        let old_bytes = old.map_or(0, PeerState::bytes);
        let held_back = old.is_some_and(|p| now < p.last_ms + MIN_BROADCAST_MS);
        let mut new =
            PeerState { subject, timeline, value, last_ms: now, version: room.version + 1, due: false };
        let conn_bytes = self.presence_conn_bytes.get(&conn).copied().unwrap_or(0);
        let refusal = if new.value.len() > MAX_BROADCAST_BYTES {
            Some((
                codes::TOO_LARGE,
                format!("a broadcast of {} bytes; at most {MAX_BROADCAST_BYTES}", new.value.len()),
            ))
        } else if old.is_none() && room.peers.len() >= MAX_PRESENCE_PEERS {
            Some((codes::LIMIT, format!("{MAX_PRESENCE_PEERS} clients already broadcast on {doc}")))
        } else if conn_bytes - old_bytes + new.bytes() > MAX_PRESENCE_CONN_BYTES
            || self.presence_bytes - old_bytes + new.bytes() > MAX_PRESENCE_BYTES
        {
            Some((codes::LIMIT, "too much presence held: broadcast less, or on fewer documents".to_owned()))
        } else {
            None
        };
        if let Some((code, text)) = refusal {
            if room.peers.is_empty() && room.left.is_empty() {
                self.presence.remove(&doc);
            }
            self.stats.broadcasts_refused += 1;
            return self.push(conn, error(Some(doc), code, text));
        }
        self.presence_bytes = self.presence_bytes - old_bytes + new.bytes();
        self.presence_conn_bytes.insert(conn, conn_bytes - old_bytes + new.bytes());
        self.stats.broadcasts += 1;
        if held_back {
            let old = old.expect("BUG: held back only after a broadcast");
            (new.last_ms, new.version, new.due) = (old.last_ms, old.version, true);
            self.presence_timers.insert((old.last_ms + MIN_BROADCAST_MS, doc, conn));
            self.stats.broadcasts_held += 1;
            room.peers.insert(conn, new);
            return;
        }
        room.version += 1;
        room.left.remove(&conn);
        room.peers.insert(conn, new);
        self.ready_subscribers(doc);
    }

    /// Tells the broadcasts held back whose time has come.
    fn tell_held_broadcasts(&mut self) {
        let now = self.now_ms;
        while let Some((t, doc, conn)) = self.presence_timers.first().copied().filter(|(t, _, _)| *t <= now) {
            self.presence_timers.remove(&(t, doc, conn));
            let Some(room) = self.presence.get_mut(&doc) else { continue };
            let Some(peer) = room.peers.get_mut(&conn).filter(|p| p.due) else { continue };
            room.version += 1;
            (peer.version, peer.last_ms, peer.due) = (room.version, now, false);
            self.ready_subscribers(doc);
        }
    }

    /// Every subscriber of `doc` has something to be told.
    fn ready_subscribers(&mut self, doc: DocId) {
        if let Some(open) = self.docs.get(&doc) {
            self.ready.extend(open.subscribers.iter().copied());
        }
    }

    /// Documents with a job due at `now`.
    fn due(&self) -> impl Iterator<Item = DocId> + '_ {
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        self.active
            .iter()
            .filter(move |id| {
                self.docs.get(id).and_then(|o| o.job_due(interval, now)).is_some_and(|t| t <= now)
            })
            .copied()
    }

    /// Drops `doc`'s entries read ahead that every subscriber now holds (all of them when it
    /// has none left), so an acknowledgement frees read-ahead at once, not at the document's
    /// next job.
    fn drop_acked_ahead(&mut self, doc: DocId) {
        if self.docs.get(&doc).is_none_or(|o| o.ahead.bytes == 0) {
            return;
        }
        let (keep_from, now) = (self.acked_by_all(doc), self.now_ms);
        self.with_ahead(doc, |ahead| ahead.merge(None, keep_from, now));
    }

    /// What every subscriber of `doc` holds (`None` without subscribers): read-ahead below it
    /// is no longer needed.
    fn acked_by_all(&self, doc: DocId) -> Option<Lsn> {
        let open = self.docs.get(&doc)?;
        let subs = open.subscribers.iter().filter_map(|id| self.conns.get(id)?.subs.get(&doc));
        subs.map(|s| s.window.acked).min()
    }

    /// Bytes of entries read ahead over every document (see `max_read_ahead_bytes`).
    pub fn read_ahead_bytes(&self) -> usize {
        self.ahead_bytes
    }

    /// Runs `f` on `doc`'s read-ahead and keeps the session's total up to date.
    fn with_ahead(&mut self, doc: DocId, f: impl FnOnce(&mut ReadAhead)) {
        let Some(open) = self.docs.get_mut(&doc) else { return };
        let before = open.ahead.bytes;
        f(&mut open.ahead);
        account_ahead(&mut self.ahead_bytes, &mut self.ahead_docs, doc, before, open.ahead.bytes);
    }

    /// Past `max_read_ahead_bytes`, drops other documents' read-ahead (the ones after `doc`
    /// first, round the ring) until the total is back under it. Their subscribers ask for the
    /// entries again when they need them.
    fn evict_ahead(&mut self, doc: DocId) {
        let max = self.options.max_read_ahead_bytes;
        if self.ahead_bytes <= max {
            return;
        }
        let others = round_robin(self.ahead_docs.iter().copied(), Some(doc));
        for other in others.into_iter().filter(|d| *d != doc) {
            if self.ahead_bytes <= max {
                break;
            }
            self.with_ahead(other, ReadAhead::clear);
            self.stats.read_ahead_evictions += 1;
        }
    }

    /// Without external jobs: runs the jobs that are due, one per document, here and now.
    fn run_jobs_here(&mut self) {
        if self.external_jobs {
            return;
        }
        let due: Vec<DocId> = self.due().collect();
        for doc in due {
            let job = self.take_job(doc);
            self.job_done(job.run(), self.now_ms);
        }
    }

    /// Without external jobs: runs `doc`'s job now, if one is due.
    fn run_here(&mut self, doc: DocId) {
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        let due = self.docs.get(&doc).and_then(|o| o.job_due(interval, now)).is_some_and(|t| t <= now);
        if !self.external_jobs && due {
            let job = self.take_job(doc);
            self.job_done(job.run(), now);
        }
    }

    /// Runs the jobs that are due (without external jobs), closes idle documents, and
    /// schedules retransmissions. A document whose step fails keeps its queue, tells its
    /// subscribers why, and retries after `STEP_RETRY_MS`; other documents carry on.
    pub fn handle_timeout(&mut self, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        self.run_jobs_here();
        self.close_idle();
        self.tell_held_broadcasts();
        while let Some(&(t, conn, doc)) = self.timers.first().filter(|(t, _, _)| *t <= now) {
            let backlog = self.conns.get(&conn).map(|c| c.backlog_bytes);
            if backlog.is_some_and(|b| b == 0) {
                // Every due timer of the connection at once.
                self.resend(conn, now);
            } else if backlog.is_some() {
                // Data still in the driver's queue is not lost: resending it would only queue
                // a second copy behind the first. Its resends wait until it drains.
                self.held.insert(conn);
            }
            // Each pass takes this timer out, whatever else it did.
            if self.timers.remove(&(t, conn, doc))
                && let Some(sub) = self.conns.get_mut(&conn).and_then(|c| c.subs.get_mut(&doc))
            {
                sub.timer = None;
            }
        }
        self.close_slow_readers();
        self.close_expired();
    }

    /// Closes the connections whose token has expired, after what they had queued.
    fn close_expired(&mut self) {
        let now = self.now_ms;
        let expired_conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing && c.grant.as_ref().is_some_and(|g| g.expired(now)))
            .map(|(id, _)| *id)
            .collect();
        for conn in expired_conns {
            self.fail(conn, expired());
        }
    }

    /// Rewinds `conn`'s windows whose batches went unacknowledged too long and ends its read
    /// retries that are over; re-arms their timers.
    fn resend(&mut self, conn: ConnId, now: i64) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        for (doc, sub) in &mut c.subs {
            let (before, retry) = (sub.window.next, sub.retry_read_at);
            sub.window.rewind_if_due(now);
            sub.retry_read_at = sub.retry_read_at.filter(|t| now < *t);
            if sub.window.next != before || sub.retry_read_at != retry {
                self.ready.insert(conn);
            }
            sub.rearm(&mut self.timers, conn, *doc);
        }
    }

    /// Closes connections whose peer stopped reading: blocked on their backlog for
    /// `SLOW_READER_CLOSE_MS`, with `MAX_OUTBOX_MESSAGES` unsent, or, while the unwritten
    /// bytes over every connection are at their bound, not drained for `PRESSURE_CLOSE_MS`.
    fn close_slow_readers(&mut self) {
        let pressed = self.pressed_since_ms;
        let (now, ready) = (self.now_ms, &mut self.ready);
        for (id, c) in self.conns.iter_mut().filter(|(_, c)| !c.closing) {
            let blocked = c.blocked_since_ms.is_some_and(|t| now >= t + SLOW_READER_CLOSE_MS);
            let stalled = pressed.is_some_and(|p| {
                let drained = Self::stall_deadline(c, p).is_some_and(|t| now >= t);
                drained || Self::idle_deadline(c, p).is_some_and(|t| now >= t)
            });
            if blocked || stalled || c.outbox.len() >= MAX_OUTBOX_MESSAGES {
                c.outbox.clear();
                let text = "the connection is closed: the client stopped reading what the server sends";
                c.outbox.push_back(error(None, codes::SLOW_READER, text));
                c.closing = true;
                ready.insert(*id);
            }
        }
    }

    /// Closes a document whose step panicked: its subscribers are told, and it reopens from
    /// its journal (the last durable state) on next use. The others carry on.
    fn close_broken(&mut self, doc: DocId, why: String) {
        self.stats.documents_failed += 1;
        let text = format!(
            "the server closed document {doc} after an internal error; subscribe again {}",
            super::SEE_THE_LOG
        );
        self.close_telling(doc, error(Some(doc), codes::INTERNAL, text));
        self.event(Event::DocumentFailed { doc, error: why });
    }

    /// Another server holds `doc`'s lease now: it is closed here (what it had queued is
    /// dropped; its clients send it again) and its clients are sent to `owner`.
    fn close_moved(&mut self, doc: DocId, owner: String) {
        self.stats.documents_moved += 1;
        let subscribers = self.docs.get(&doc).map_or(0, |o| o.subscribers.len() + o.asks.len());
        self.stats.redirects += subscribers as u64;
        self.close_telling(doc, Message::Redirect { doc, url: owner.clone() });
        self.event(Event::DocumentMoved { doc, owner });
    }

    /// Closes every open document, telling their clients `code` and `message`: what is queued
    /// is dropped (its clients send it again), and each opens again from its journal on next
    /// use. A document away on a job is closed when the job comes back. For a server that may
    /// no longer write them (its cluster membership lapsed).
    pub fn close_all(&mut self, code: &str, message: &str) {
        for doc in self.doc_ids() {
            let tell = error(Some(doc), code, message);
            match self.docs.get_mut(&doc) {
                Some(open) if open.is_away() => open.close_when_back = Some(tell),
                Some(_) => self.close_telling(doc, tell),
                None => {}
            }
        }
    }

    /// `doc` was deleted (its tombstone is written): closes it, telling its subscribers
    /// `deleted`. `true` once the session no longer holds it; `false` while a job has it out,
    /// which closes it when it comes back (ask again then, before deleting its storage).
    pub fn close_deleted(&mut self, doc: DocId) -> bool {
        let tell = error(Some(doc), codes::DELETED, format!("document {doc} was deleted"));
        match self.docs.get_mut(&doc) {
            None => true,
            Some(open) if open.is_away() => {
                open.close_when_back = Some(tell);
                false
            }
            Some(_) => {
                self.close_telling(doc, tell);
                true
            }
        }
    }

    /// Closes `doc` at once, sending `tell` to every connection that subscribed to it or
    /// waits for a page request's answer.
    fn close_telling(&mut self, doc: DocId, tell: Message) {
        self.with_ahead(doc, ReadAhead::clear);
        let Some(open) = self.docs.remove(&doc) else { return };
        // Every subscriber goes: nobody is left to tell who left.
        if let Some(room) = self.presence.remove(&doc) {
            for (conn, p) in room.peers {
                self.presence_bytes -= p.bytes();
                if let Some(b) = self.presence_conn_bytes.get_mut(&conn) {
                    *b -= p.bytes();
                }
            }
        }
        if open.export {
            let why = format!("document {doc} was closed before it could be exported");
            self.exported.push_back((doc, Err(ExportError::Unavailable(why))));
        }
        let (subscribers, asks) = (open.subscribers, open.asks);
        for (id, _) in asks {
            if let Some(c) = self.conns.get_mut(&id) {
                c.asks -= 1;
                c.outbox.push_back(tell.clone());
                self.ready.insert(id);
            }
        }
        for id in subscribers {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if let Some(mut sub) = c.subs.remove(&doc) {
                sub.disarm(&mut self.timers, id, doc);
                c.outbox.push_back(tell.clone());
                self.ready.insert(id);
            }
        }
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
            open.stored = d.storage_range();
        }
        match failed {
            // A backlog stays due: it steps again on the next turn.
            None if open.queued() > 0 || open.document().is_some_and(ServerDocument::forget_due) => {}
            None => open.queued_since = None,
            Some(Failure::Panicked(why)) => self.close_broken(doc, why),
            Some(Failure::Error { why, reopen }) => {
                open.retry_at = Some(now + STEP_RETRY_MS);
                open.reopen = reopen;
                let text =
                    format!("the server could not apply mutations to {doc} and will retry: {}", why.public);
                for id in &open.subscribers {
                    if let Some(c) = self.conns.get_mut(id) {
                        c.outbox.push_back(error(Some(doc), codes::STORAGE, text.clone()));
                        self.ready.insert(*id);
                    }
                }
                self.stats.steps_failed += 1;
                self.event(Event::StepFailed { doc, error: why.detail, retry_in_ms: STEP_RETRY_MS });
            }
        }
    }

    /// The next job that is due (with `with_external_jobs`): a document to open, step, read
    /// ahead for its subscribers or export, taken out of the session to run elsewhere. At most
    /// `step_threads` are out at once. Messages for its document wait until `job_done` brings
    /// it back; every other document carries on.
    pub fn poll_job(&mut self, now_ms: i64) -> Option<DocJob> {
        self.now_ms = self.now_ms.max(now_ms);
        if self.jobs_out >= self.options.step_threads {
            return None;
        }
        // Opens first: a client waits on each, and they are cheap next to a step; but after
        // `OPENS_PER_STEP` of them, a due step.
        let step = (self.opens_in_a_row >= OPENS_PER_STEP).then(|| self.due().next()).flatten();
        if let Some(doc) = step {
            self.opens_in_a_row = 0;
            return Some(self.take_job(doc));
        }
        let (to_open, docs) = (&mut self.to_open, &self.docs);
        let waiting =
            |d: &DocId| matches!(docs.get(d).map(|o| &o.held), Some(Held::Opening { out: false, .. }));
        if let Some(doc) = std::iter::from_fn(|| to_open.pop_first()).find(waiting) {
            self.opens_in_a_row = self.opens_in_a_row.saturating_add(1);
            return Some(self.take_job(doc));
        }
        self.opens_in_a_row = 0;
        let doc = self.due().next()?;
        Some(self.take_job(doc))
    }

    /// Takes `doc`'s due work out of the session, as a job. It must have a job due.
    fn take_job(&mut self, doc: DocId) -> DocJob {
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        let open = self.docs.get_mut(&doc).expect("BUG: a job for a document the session holds");
        self.jobs_out += 1;
        let work = match &mut open.held {
            Held::Opening { out, create, .. } => {
                assert!(!*out, "BUG: an open handed out twice");
                *out = true;
                self.to_open.remove(&doc);
                Work::Open { opener: self.opener.clone(), exists: self.exists.clone(), create: *create }
            }
            Held::Here(_) => {
                let step = open.step_due(interval, now).is_some_and(|t| t <= now);
                let read_due = open.ahead.retry_at.is_none_or(|t| t <= now);
                let fetch = if read_due { open.ahead.want.take() } else { None };
                let Held::Here(document) = std::mem::replace(&mut open.held, Held::Out(Deferred::default()))
                else {
                    unreachable!("BUG: matched above")
                };
                // Only a step needs the journal reopened (reads work on the old handle): a job
                // that only reads leaves it due, so a reopen that fails there is not forgotten.
                let reload = std::mem::take(&mut open.reload);
                let reopen =
                    ((step || reload) && std::mem::take(&mut open.reopen)).then(|| self.opener.clone());
                let (export, asks) = (std::mem::take(&mut open.export), std::mem::take(&mut open.asks));
                Work::Run { document, reopen, step, fetch, export, asks }
            }
            Held::Out(_) => unreachable!("BUG: a document out on a job is never due"),
        };
        DocJob { doc, work, now_ms: now, clock: self.clock.clone() }
    }

    /// Jobs handed out and not yet back.
    pub fn jobs_out(&self) -> usize {
        self.jobs_out
    }

    /// Whether `doc` is away: being opened, or out on a job.
    pub fn is_away(&self, doc: DocId) -> bool {
        self.docs.get(&doc).is_some_and(OpenDoc::is_away)
    }

    /// Brings a job's document back, takes in what the job did, and handles the messages that
    /// waited for it.
    pub fn job_done(&mut self, done: JobDone, now_ms: i64) {
        self.now_ms = self.now_ms.max(now_ms);
        let JobDone { doc, outcome } = done;
        let Some(open) = self.docs.get_mut(&doc).filter(|o| o.is_away()) else {
            panic!("BUG: job_done for {doc}, which is not out on a job")
        };
        self.jobs_out -= 1;
        let deferred = match outcome {
            Outcome::Opened(Ok(document)) => {
                self.stats.documents_opened += 1;
                open.stored = document.storage_range();
                let Held::Opening { deferred, .. } = std::mem::replace(&mut open.held, Held::Here(document))
                else {
                    panic!("BUG: an open came back for {doc}, which was not opening")
                };
                deferred
            }
            Outcome::Opened(Err(failure)) => return self.open_failed(doc, failure),
            Outcome::Ran(ran) => self.ran(doc, *ran),
        };
        self.deferred_bytes -= deferred.bytes;
        for (conn, _, _) in &deferred.messages {
            if let Some(c) = self.conns.get_mut(conn) {
                c.opening.remove(&doc);
            }
        }
        for (conn, at, msg) in deferred.messages {
            self.handle_message(conn, at, msg);
        }
        if let Some(tell) = self.docs.get_mut(&doc).and_then(|o| o.close_when_back.take()) {
            self.close_telling(doc, tell);
        }
        // Its storage or schedule changed: its subscribers and its next job are worth a look.
        if let Some(open) = self.docs.get(&doc) {
            self.ready.extend(open.subscribers.iter().copied());
            self.active.insert(doc);
        }
    }

    /// Takes in a finished `Work::Run`; gives back the messages that waited for it.
    fn ran(&mut self, doc: DocId, ran: Ran) -> Deferred {
        let Ran { document, reopened, moved, steps, failure, fetched, exported, answers, failed } = ran;
        self.stats.page_requests += answers.len() as u64;
        for (doing, error) in failed {
            self.event(Event::Failed { doc, doing, error });
        }
        if let Some((_, told)) = fetched.as_ref().and_then(|f| f.error.as_ref()) {
            self.event(Event::Failed { doc, doing: "reading the storage of", error: told.detail.clone() });
        }
        for (conn, answer) in answers {
            if let Some(c) = self.conns.get_mut(&conn) {
                // Counted until it goes to the driver (`next_for`).
                c.answers.push_back(answer);
                self.ready.insert(conn);
            }
        }
        let keep_from = self.acked_by_all(doc);
        let open = self.docs.get_mut(&doc).expect("BUG: checked by the caller");
        let Held::Out(deferred) = std::mem::replace(&mut open.held, Held::Here(document)) else {
            panic!("BUG: a job came back for {doc}, which was not out on one")
        };
        self.stats.storage_reads += u64::from(fetched.is_some());
        let now = self.now_ms;
        self.with_ahead(doc, |ahead| ahead.merge(fetched, keep_from, now));
        self.evict_ahead(doc);
        self.stats.documents_reopened += u64::from(reopened);
        if let Some(e) = exported {
            self.exported.push_back((doc, e));
        }
        self.record_steps(doc, &steps, failure);
        self.tell_dropped(doc);
        if let Some(owner) = moved {
            self.close_moved(doc, owner);
        }
        deferred
    }

    /// The clients of timelines whose queued mutations the document dropped, unapplied (held
    /// back for their unacknowledged rejections), are told where to send from again: a
    /// `MutationsAck` below what they were told before, which also has them acknowledge
    /// what they hold.
    fn tell_dropped(&mut self, doc: DocId) {
        let Some(dropped) = self.docs.get_mut(&doc).and_then(OpenDoc::document_mut).map(|d| d.take_dropped())
        else {
            return;
        };
        if dropped.is_empty() {
            return;
        }
        let Some(open) = self.docs.get(&doc) else { return };
        let Some(d) = open.document() else { return };
        let storage_next = d.storage_range().next();
        for id in open.subscribers.iter() {
            let Some(c) = self.conns.get_mut(id) else { continue };
            let Some(timeline) = c.subs.get(&doc).map(|s| s.timeline).filter(|t| dropped.contains(t)) else {
                continue;
            };
            let next_expected = d.next_expected(timeline);
            c.outbox.push_back(Message::MutationsAck { doc, timeline, next_expected, storage_next });
            self.ready.insert(*id);
        }
    }

    /// An open failed: the document is dropped, and the messages that waited for it get the
    /// error, except those that may create it when it merely did not exist (they open it
    /// again, to create it).
    fn open_failed(&mut self, doc: DocId, failure: OpenFailure) {
        let Some(OpenDoc { held: Held::Opening { deferred, .. }, export, .. }) = self.docs.remove(&doc)
        else {
            panic!("BUG: an open came back for {doc}, which was not opening")
        };
        self.deferred_bytes -= deferred.bytes;
        let (code, text) = match &failure {
            OpenFailure::NotFound => (
                codes::NOT_FOUND,
                format!("document {doc} does not exist, and a read-only token cannot create it"),
            ),
            OpenFailure::Moved(owner) => (codes::DOCUMENT, format!("document {doc} is served by {owner}")),
            OpenFailure::Unavailable(why) => {
                (codes::UNAVAILABLE, format!("this server cannot serve document {doc} now: {}", why.public))
            }
            OpenFailure::Deleted => (codes::DELETED, format!("document {doc} was deleted")),
            OpenFailure::Error(why) => {
                (codes::DOCUMENT, format!("cannot open document {doc}: {}", why.public))
            }
        };
        if let OpenFailure::Unavailable(why) | OpenFailure::Error(why) = &failure {
            self.event(Event::Failed { doc, doing: "opening", error: why.detail.clone() });
        }
        let tell = match &failure {
            OpenFailure::Moved(owner) => Message::Redirect { doc, url: owner.clone() },
            _ => error(Some(doc), code, text.clone()),
        };
        if export {
            let why = match &failure {
                OpenFailure::NotFound | OpenFailure::Deleted => ExportError::NotFound,
                OpenFailure::Moved(owner) => ExportError::Moved { owner: owner.clone() },
                OpenFailure::Unavailable(_) => ExportError::Unavailable(text.clone()),
                OpenFailure::Error(_) => ExportError::Failed(text.clone()),
            };
            self.exported.push_back((doc, Err(why)));
        }
        for (conn, at, msg) in deferred.messages {
            let Some(c) = self.conns.get_mut(&conn) else { continue };
            c.opening.remove(&doc);
            let asks = matches!(
                msg,
                Message::MapPages { .. } | Message::ReadPages { .. } | Message::ReadHistory { .. }
            );
            let may_write = c.grant.as_ref().is_some_and(Grant::may_write);
            if matches!(failure, OpenFailure::NotFound) && creates(c.grant.as_ref(), &msg) {
                self.handle_message(conn, at, msg);
            } else if matches!(failure, OpenFailure::NotFound) && (asks || may_write) {
                // A read, or a subscription that did not ask to create, never creates a
                // document, whatever the token may do.
                let text = format!("document {doc} does not exist");
                c.outbox.push_back(error(Some(doc), codes::NOT_FOUND, text));
                self.ready.insert(conn);
            } else {
                self.stats.redirects += u64::from(matches!(tell, Message::Redirect { .. }));
                c.outbox.push_back(tell.clone());
                self.ready.insert(conn);
            }
        }
    }

    /// Steps every document with queued mutations until their queues are empty (or a step
    /// fails), here and now: for a shutdown, after every job came back.
    pub fn flush(&mut self, now_ms: i64) {
        self.flush_while(now_ms, || true);
    }

    /// `flush`, asking `more` before each step: once it says no, what is still queued stays
    /// unacknowledged, and its clients send it again (a shutdown is bounded in time however
    /// much hostile work is queued).
    pub fn flush_while(&mut self, now_ms: i64, mut more: impl FnMut() -> bool) {
        self.now_ms = self.now_ms.max(now_ms);
        for doc in self.doc_ids() {
            while self.docs.get(&doc).is_some_and(|o| o.queued() > 0) {
                if !more() {
                    return;
                }
                let open = self.docs.get_mut(&doc).expect("BUG: just checked");
                open.retry_at = None;
                open.queued_since = Some(self.now_ms.saturating_sub(self.options.commit_interval_ms));
                let job = self.take_job(doc);
                let done = job.run();
                let stop =
                    matches!(&done.outcome, Outcome::Ran(r) if r.failure.is_some() || r.steps.is_empty());
                self.job_done(done, now_ms);
                if stop {
                    break;
                }
            }
        }
    }

    /// Keeps a message for a document that is away. Mutations past the bounds are dropped
    /// unacknowledged: their clients send them again.
    fn defer(&mut self, conn: ConnId, now_ms: i64, msg: Message) {
        let Some(doc) = msg.doc() else { return };
        let bytes = match &msg {
            Message::Mutations { entries, .. } => entries.iter().map(Vec::len).sum(),
            Message::Broadcast { value, .. } => value.len().max(DEFERRED_MESSAGE_BYTES),
            _ => DEFERRED_MESSAGE_BYTES,
        };
        let total = self.deferred_bytes;
        let Some(open) = self.docs.get_mut(&doc) else { return };
        let opening = matches!(open.held, Held::Opening { .. });
        let Some(d) = open.deferred() else { return };
        if d.bytes + bytes > MAX_DEFERRED_BYTES || total + bytes > MAX_DEFERRED_TOTAL_BYTES {
            return;
        }
        d.bytes += bytes;
        d.messages.push((conn, now_ms, msg));
        self.deferred_bytes += bytes;
        if opening && let Some(c) = self.conns.get_mut(&conn) {
            c.opening.insert(doc);
        }
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
        self.ready.extend(self.conns.keys().copied());
        let (interval, now, docs) = (self.options.commit_interval_ms, self.now_ms, &self.docs);
        self.active
            .retain(|id| docs.get(id).is_some_and(|o| o.is_away() || o.job_due(interval, now).is_some()));
        self.shrink_idle();
        let Some(idle_ms) = self.options.idle_close_ms else { return };
        let now = self.now_ms;
        let before = self.docs.len();
        let (ahead_bytes, ahead_docs) = (&mut self.ahead_bytes, &mut self.ahead_docs);
        self.docs.retain(|id, o| {
            let idle =
                o.document().is_some_and(|d| d.queued() == 0) && !o.export && now >= o.last_used + idle_ms;
            let keep = !idle || !o.subscribers.is_empty();
            if !keep {
                account_ahead(ahead_bytes, ahead_docs, *id, o.ahead.bytes, 0);
            }
            keep
        });
        self.stats.documents_closed += (before - self.docs.len()) as u64;
    }

    fn shrink_idle(&mut self) {
        let Some(shrink_ms) = self.options.idle_shrink_ms else { return };
        let now = self.now_ms;
        for id in self.doc_ids() {
            let Some(o) = self.docs.get_mut(&id) else { continue };
            let used = o.last_used;
            if now < used + shrink_ms || o.shrunk_at == Some(used) {
                continue;
            }
            account_ahead(&mut self.ahead_bytes, &mut self.ahead_docs, id, o.ahead.bytes, 0);
            o.ahead.clear();
            let Some(d) = o.document_mut().filter(|d| d.queued() == 0) else { continue };
            // A failure leaves caches in place; the document works either way.
            if d.shrink_memory().is_ok() {
                self.stats.documents_shrunk += 1;
            }
            o.shrunk_at = Some(used);
        }
    }

    /// The documents held, in order: what a sweep does to each (messages, reads, steps) then
    /// happens in the same order every run, whatever the map's hasher (the simulator replays a
    /// seed exactly; `docs` keeps a random hasher because clients choose the ids).
    fn doc_ids(&self) -> Vec<DocId> {
        let mut ids: Vec<DocId> = self.docs.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// When `handle_timeout` should run next.
    pub fn poll_timeout(&self) -> Option<i64> {
        // With every job thread busy, nothing can start before one comes back (`job_done`,
        // which the driver is woken for): no job deadline until then.
        let full = self.external_jobs && self.jobs_out >= self.options.step_threads;
        let (interval, now) = (self.options.commit_interval_ms, self.now_ms);
        // The earliest job, stopping at the first that is due now (under load, the first).
        let mut steps: Option<i64> = None;
        if !full {
            for o in self.active.iter().filter_map(|id| self.docs.get(id)) {
                if let Some(t) = o.job_due(interval, now) {
                    steps = Some(steps.map_or(t, |s| s.min(t)));
                    if t <= now {
                        break;
                    }
                }
            }
        }
        let resends = self.timers.first().map(|(t, _, _)| *t);
        let held = self.presence_timers.first().map(|(t, _, _)| *t);
        let blocked =
            self.conns.values().filter_map(|c| c.blocked_since_ms).map(|t| t + SLOW_READER_CLOSE_MS);
        let stalled = self.pressed_since_ms.into_iter().flat_map(|p| {
            self.conns
                .values()
                .filter(|c| !c.closing)
                .flat_map(move |c| Self::stall_deadline(c, p).into_iter().chain(Self::idle_deadline(c, p)))
        });
        let expiries =
            self.conns.values().filter(|c| !c.closing).filter_map(|c| c.grant.as_ref()?.expires_ms);
        steps.into_iter().chain(resends).chain(held).chain(blocked).chain(stalled).chain(expiries).min()
    }

    /// The next message to send, and its connection. Fair: round-robin over connections, and
    /// over documents within a connection.
    pub fn poll_transmit(&mut self) -> Option<(ConnId, Message)> {
        for id in round_robin(self.ready.iter().copied(), self.cursor) {
            if let Some(msg) = self.next_for(id) {
                self.cursor = Some(id);
                return Some((id, msg));
            }
            self.ready.remove(&id);
        }
        None
    }

    fn next_for(&mut self, id: ConnId) -> Option<Message> {
        let (now_ms, here) = (self.now_ms, !self.external_jobs);
        let c = self.conns.get_mut(&id)?;
        if let Some(m) = c.outbox.pop_front() {
            return Some(m);
        }
        if let Some(m) = c.answers.pop_front() {
            c.asks -= 1;
            return Some(m);
        }
        if c.closing {
            return None;
        }
        if c.backlog_bytes > MAX_SEND_BACKLOG_BYTES {
            return None;
        }
        if self.send_backlog_total >= self.options.max_send_backlog_bytes {
            self.starved.insert(id);
            return None;
        }
        // The definitions in force, before storage that their calls' results come in.
        while let Some(doc) = c.mutators_due.pop_first() {
            let Some(sub) = c.subs.get_mut(&doc) else { continue };
            let defs = self.mutators.as_ref().and_then(|source| source(doc));
            let version = defs.as_ref().map(|m| m.version().to_owned());
            if sub.mutators != version {
                sub.mutators = version;
                return Some(mutators_message(doc, defs.as_deref()));
            }
        }
        for doc in round_robin(c.subs.keys().copied(), c.cursor) {
            if let (Some(room), Some(sub)) = (self.presence.get(&doc), c.subs.get_mut(&doc))
                && let Some((version, msg)) = room.next_after(doc, sub.presence_seen, id)
            {
                sub.presence_seen = version;
                c.cursor = Some(doc);
                self.stats.presence_sent += 1;
                return Some(msg);
            }
            let (Some(open), Some(sub)) = (self.docs.get_mut(&doc), c.subs.get_mut(&doc)) else { continue };
            if sub.window.next >= open.stored.next() || open.is_away() {
                continue;
            }
            let before = open.ahead.bytes;
            let msg = storage_batch(doc, open, sub, now_ms, here);
            // Without external jobs it reads ahead itself.
            account_ahead(&mut self.ahead_bytes, &mut self.ahead_docs, doc, before, open.ahead.bytes);
            if open.ahead.want.is_some() {
                self.active.insert(doc);
            }
            if let Some(msg) = msg {
                sub.rearm(&mut self.timers, id, doc);
                c.cursor = Some(doc);
                if let Message::Storage { entries, .. } = &msg {
                    let confirms = entries.iter().filter(|e| e.kind == crate::wire::WireKind::Confirm);
                    self.stats.confirms_sent += confirms.count() as u64;
                }
                return Some(msg);
            }
        }
        None
    }
}

/// Keeps the session's read-ahead total and the documents holding any up to date after
/// `doc`'s went from `before` to `after` bytes.
fn account_ahead(total: &mut usize, docs: &mut BTreeSet<DocId>, doc: DocId, before: usize, after: usize) {
    *total = *total - before + after;
    if after > 0 {
        docs.insert(doc);
    } else {
        docs.remove(&doc);
    }
}

/// The next `Storage` message for one subscriber, within its window and the batch size, from
/// the entries the document holds in memory. An entry that is not there is asked of the next
/// job (`ReadAhead::want`), or, with `here` (no external jobs), read at once.
fn storage_batch(doc: DocId, open: &mut OpenDoc, sub: &mut Sub, now_ms: i64, here: bool) -> Option<Message> {
    let Held::Here(d) = &open.held else { return None };
    let (avail, window) = (open.stored, sub.window.room(DOC_WINDOW_BYTES));
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
    let (full_until, confirms) = (sub.full_until, sub.digests.then_some(sub.timeline));
    let in_memory = |ahead: &ReadAhead, lsn: Lsn| cached(d, ahead, full_until, None, lsn).is_some();
    let first = sub.window.next.max(avail.first());
    // A read is already asked for the entry it needs next: nothing to do until it is back.
    if !in_memory(&open.ahead, first) && open.ahead.want.is_some_and(|w| w <= first) {
        return None;
    }
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut lsn = first;
    while lsn < avail.next() && bytes < MAX_BATCH_BYTES.min(window) {
        let e = match cached(d, &open.ahead, full_until, confirms, lsn) {
            Some(e) => e.clone(),
            None if here && open.ahead.error.is_none() => {
                open.ahead.merge(Some(super::job::read_ahead(d, lsn)), Some(lsn), now_ms);
                continue;
            }
            None => {
                if entries.is_empty()
                    && let Some((_, why)) = open.ahead.error.as_ref().filter(|(at, _)| *at == lsn)
                {
                    // Told once per `RETRANSMIT_MS`; the read is tried again then.
                    sub.retry_read_at = Some(now_ms + RETRANSMIT_MS);
                    let text = format!("cannot read storage entry {lsn}: {}", why.public);
                    // `storage`: it is retried, so a client's wait to sync goes on.
                    let msg = error(Some(doc), codes::STORAGE, text);
                    if here {
                        open.ahead.error = None;
                    } else {
                        open.ahead.wants(lsn);
                    }
                    return Some(msg);
                }
                open.ahead.wants(lsn);
                break;
            }
        };
        bytes += e.data.len();
        entries.push(e);
        lsn = lsn.next();
    }
    // Read the rest ahead while this batch travels.
    if lsn < avail.next() && !in_memory(&open.ahead, lsn) {
        open.ahead.wants(lsn);
    }
    if entries.is_empty() {
        return None;
    }
    sub.window.sent(lsn, bytes, now_ms);
    Some(Message::Storage { doc, first, entries })
}

/// Entry `lsn` in memory, in a form a subscriber can take: whole up to `full_until` (it holds
/// no pages a delta could apply to), else as the document keeps it, or as a confirmation by
/// digest when it applied only the mutations of `confirms` (the subscriber's timeline, when
/// it takes them).
fn cached<'a>(
    d: &'a ServerDocument,
    ahead: &'a ReadAhead,
    full_until: Option<Lsn>,
    confirms: Option<TimelineId>,
    lsn: Lsn,
) -> Option<&'a WireEntry> {
    let recent = match full_until {
        Some(until) if lsn <= until => None,
        _ => confirms.and_then(|tl| d.recent_confirm(lsn, tl)).or_else(|| d.recent_wire(lsn)),
    };
    recent.or_else(|| ahead.entries.get(&lsn))
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
        Message::MapPages { .. } => "MapPages",
        Message::PageMap { .. } => "PageMap",
        Message::ReadPages { .. } => "ReadPages",
        Message::Pages { .. } => "Pages",
        Message::Redirect { .. } => "Redirect",
        Message::Broadcast { .. } => "Broadcast",
        Message::Presence { .. } => "Presence",
        Message::PeerLeft { .. } => "PeerLeft",
        Message::ReadHistory { .. } => "ReadHistory",
        Message::Mutators { .. } => "Mutators",
        Message::History { .. } => "History",
        Message::HeadAsk { .. } => "HeadAsk",
        Message::Head { .. } => "Head",
    }
}
