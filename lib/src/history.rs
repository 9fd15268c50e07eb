//! The history of a document's mutations: who sent each one, when, and what became of it.
//!
//! The server keeps a second journal per document beside its storage, written by the same
//! step: one entry per step that applied mutations, appended durably *before* the step's
//! storage entry, holding for each mutation its timeline and timeline LSN, the subject of the
//! token that sent it, the server's receive time, the outcome (applied, or the rejection's code
//! and message) and the mutation exactly as its client encoded it (its clock, its SQL and
//! parameters). The entry names the storage LSN the step will take and the step's time.
//!
//! Where the storage journal can take its newest entry back (files), the two are written
//! beside each other instead and made durable at once (`ServerDocument::write_history_beside`):
//! a storage entry that became durable without its history entry (a failed history append, or
//! a power cut between the two barriers) is taken back before anything reads it, so no
//! committed step lacks its entry either way (`records_step`).
//!
//! Because the history entry is written first (or at once), a step whose storage append then
//! failed (or a crash between the two, or a second server that lost the storage entry's LSN to
//! another) leaves an entry naming a storage entry that says something else, or that was never
//! written. So a reader checks every history entry against the header of the storage entry it
//! names (its time and its list of applied mutations, a few bytes read without the pages) and
//! lists only those that match, each storage entry once. Every listed record is of a step that
//! committed, and every committed step's mutations are listed.
//!
//! The history is trimmed with the storage: when compaction trims the storage journal to a
//! checkpoint older than the retention window, the history drops the steps before it. Both
//! are therefore kept for at least the retention window, and checkpoints (which apply no
//! mutations) write no history.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{DocId, TimelineId};
use crate::journal::{Journal, JournalId, Lsn};
use crate::mutation::{Mutation, SqlMutation, Statement};
use crate::reducer::Rejection;

/// Records one page of a history read holds at most, by default: 1,000.
pub const DEFAULT_HISTORY_LIMIT: u32 = 1_000;

/// Records one page may hold at most, whatever is asked: 10,000.
pub const MAX_HISTORY_LIMIT: u32 = 10_000;

/// Bytes of mutations (and subjects and messages) one page holds at most, past its first
/// record: 1 MiB, as much as a page request's answer, so a connection's answers waiting to be
/// written stay bounded the same way (a record is at most a 1 MiB mutation).
pub const MAX_HISTORY_PAGE_BYTES: usize = 1 << 20;

/// The history journal's id: the document's id with every bit flipped (the storage journal
/// has the document's own id).
pub fn journal_id(doc: DocId) -> JournalId {
    JournalId::from_bytes(doc.0.map(|b| !b))
}

/// Who sent mutations, and when the server received them: kept with each queued mutation
/// until its step records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The sender's token's `sub` claim (empty without one).
    pub subject: std::sync::Arc<str>,
    /// The server's clock when the mutations arrived (`None`: the step's time is used).
    pub received_ms: Option<i64>,
    /// What the sender's token allows, checked before each mutation runs (`None`: anything).
    pub permit: Option<std::sync::Arc<crate::mutators::Permit>>,
}

/// One history journal entry, as stored: a step that is to commit storage entry
/// `storage_lsn` at `applied_ms` (it did if that entry says so).
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    storage_lsn: u64,
    applied_ms: i64,
    records: Vec<StoredRecord>,
}

impl Stored {
    /// Whether storage entry `storage_lsn` is the step this entry describes: the same time, the
    /// same mutations in the same order.
    fn matches(&self, storage: &dyn Journal) -> Result<bool> {
        let Some(lsn) = Lsn::new(self.storage_lsn).filter(|l| storage.range().contains(*l)) else {
            return Ok(false);
        };
        let (time_ms, applied) = crate::storage::read_applied(storage, lsn)?;
        Ok(time_ms == self.applied_ms
            && applied.len() == self.records.len()
            && applied
                .iter()
                .zip(&self.records)
                .all(|(a, r)| a.timeline == r.timeline && a.lsn.get() == r.lsn))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredRecord {
    timeline: TimelineId,
    lsn: u64,
    subject: String,
    received_ms: i64,
    /// `(code, message)` of a rejection; `None`: applied.
    rejected: Option<(String, String)>,
    #[serde(with = "crate::bytes")]
    mutation: Vec<u8>,
}

/// The format byte every entry starts with.
const FORMAT: u8 = 1;

fn encode(entry: &Stored) -> Vec<u8> {
    let mut out = vec![FORMAT];
    out.extend(postcard::to_stdvec(entry).expect("BUG: a history entry always serializes"));
    out
}

fn decode(bytes: &[u8]) -> Result<Stored> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|e| Error::Malformed(format!("a history entry: {e}")))
        }
        Some((v, _)) => Err(Error::Malformed(format!("a history entry of format {v}, not {FORMAT}"))),
        None => Err(Error::Malformed("an empty history entry".into())),
    }
}

/// One mutation of a step, as the step passes it to `step_entry`.
pub(crate) struct StepRecord<'a> {
    pub timeline: TimelineId,
    pub lsn: Lsn,
    pub origin: &'a Origin,
    pub rejection: Option<&'a Rejection>,
    pub mutation: &'a [u8],
}

/// The entry of a step that will commit storage entry `storage_lsn` at `applied_ms`.
pub(crate) fn step_entry(storage_lsn: Lsn, applied_ms: i64, records: &[StepRecord<'_>]) -> Vec<u8> {
    let records = records
        .iter()
        .map(|r| StoredRecord {
            timeline: r.timeline,
            lsn: r.lsn.get(),
            subject: r.origin.subject.to_string(),
            received_ms: r.origin.received_ms.unwrap_or(applied_ms).min(applied_ms),
            rejected: r.rejection.map(|r| (r.code.as_str().to_owned(), r.message.clone())),
            mutation: r.mutation.to_vec(),
        })
        .collect();
    encode(&Stored { storage_lsn: storage_lsn.get(), applied_ms, records })
}

/// What became of a mutation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HistoryOutcome {
    Applied,
    /// Rejected: its changes were rolled back; `code` is a `RejectionCode`'s string.
    Rejected {
        code: String,
        message: String,
    },
}

/// One mutation in a document's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Where to continue a listing after this record.
    pub cursor: HistoryCursor,
    /// The storage entry (the step) that applied or rejected it.
    pub storage_lsn: Lsn,
    pub timeline: TimelineId,
    /// Its place in its timeline.
    pub timeline_lsn: Lsn,
    /// The sender's token's `sub` claim (empty without one).
    pub subject: String,
    /// The client's clock when it made the mutation (as the client said; not checked).
    pub client_ms: i64,
    /// The server's clock when the mutation arrived.
    pub received_ms: i64,
    /// The server's clock when its step ran (the storage entry's time).
    pub applied_ms: i64,
    pub outcome: HistoryOutcome,
    /// Its SQL and parameters (empty for a mutation that is not the SQL reducer's, or that
    /// did not decode: its outcome says so).
    pub statements: Vec<Statement>,
    /// Its run-once key (migrations: `migration:N`).
    pub once: Option<String>,
    /// A call of a server-defined mutator (see `mutators`): its name and arguments
    /// (`statements` is empty then).
    pub call: Option<(String, Vec<crate::Value>)>,
}

impl HistoryRecord {
    /// The record of a mutation of `doc` as JSON: times in ms since the Unix epoch, ids in
    /// hex, blobs in hex.
    pub fn to_json(&self, doc: DocId) -> serde_json::Value {
        let (outcome, code, message) = match &self.outcome {
            HistoryOutcome::Applied => ("applied", None, None),
            HistoryOutcome::Rejected { code, message } => ("rejected", Some(code), Some(message)),
        };
        let statements: Vec<serde_json::Value> = self
            .statements
            .iter()
            .map(|s| {
                let params: Vec<_> = s.params.iter().map(crate::Value::to_json).collect();
                serde_json::json!({ "sql": s.sql, "params": params })
            })
            .collect();
        serde_json::json!({
            "cursor": self.cursor.to_string(),
            "doc": doc.to_string(),
            "storage_lsn": self.storage_lsn.get(),
            "timeline": self.timeline.to_string(),
            "timeline_lsn": self.timeline_lsn.get(),
            "subject": self.subject,
            "client_ms": self.client_ms,
            "received_ms": self.received_ms,
            "applied_ms": self.applied_ms,
            "outcome": outcome,
            "code": code,
            "message": message,
            "statements": statements,
            "once": self.once,
            "call": self.call.as_ref().map(|(name, args)| {
                serde_json::json!({ "name": name, "args": args.iter().map(crate::Value::to_json).collect::<Vec<_>>() })
            }),
        })
    }
}

/// One line: when it was applied, the step, the subject, the outcome, the SQL.
impl std::fmt::Display for HistoryRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.applied_ms.max(0) as u64);
        let who = if self.subject.is_empty() { "-" } else { &self.subject };
        write!(f, "{}  lsn {}  {who}  ", humantime::format_rfc3339_millis(at), self.storage_lsn)?;
        match &self.outcome {
            HistoryOutcome::Applied => write!(f, "applied ")?,
            HistoryOutcome::Rejected { code, message } => write!(f, "rejected ({code}: {message}) ")?,
        }
        if let Some((name, args)) = &self.call {
            write!(f, "{name}({})", json_list(args))?;
        }
        for (i, s) in self.statements.iter().enumerate() {
            let sep = if i == 0 { "" } else { "; " };
            write!(f, "{sep}{}", s.sql.replace('\n', " "))?;
            if !s.params.is_empty() {
                write!(f, " [{}]", json_list(&s.params))?;
            }
        }
        Ok(())
    }
}

/// Values as JSON, comma separated.
fn json_list(values: &[crate::Value]) -> String {
    values.iter().map(|v| v.to_json().to_string()).collect::<Vec<_>>().join(", ")
}

/// A place in a history: record `index` of the history entry at `entry`. Printed and parsed
/// as `ENTRY.INDEX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryCursor {
    pub entry: Lsn,
    pub index: u32,
}

impl std::fmt::Display for HistoryCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.entry, self.index)
    }
}

impl std::str::FromStr for HistoryCursor {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<HistoryCursor, String> {
        let bad = || format!("{s:?} is not a history cursor (ENTRY.INDEX, as a listing's `next` says)");
        let (entry, index) = s.split_once('.').ok_or_else(bad)?;
        let entry = entry.parse::<u64>().ok().and_then(Lsn::new).ok_or_else(bad)?;
        let index = index.parse::<u32>().map_err(|_| bad())?;
        Ok(HistoryCursor { entry, index })
    }
}

/// A `--since` or `?since=`: milliseconds since the Unix epoch, or an RFC 3339 time
/// (`2026-12-02T09:30:00Z`).
pub fn parse_time(s: &str) -> std::result::Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("{s:?}: expected ms since the Unix epoch or an RFC 3339 time (2026-12-02T09:30:00Z): {e}")
    })?;
    let ms = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| format!("{s:?} is before 1970"))?;
    Ok(ms.as_millis() as i64)
}

/// Which records to list: those applied at or after `since_ms`, after `after`, at most
/// `limit` (at most `MAX_HISTORY_LIMIT`; 0 means `DEFAULT_HISTORY_LIMIT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryQuery {
    pub since_ms: Option<i64>,
    pub after: Option<HistoryCursor>,
    pub limit: u32,
}

impl HistoryQuery {
    /// From a command line's `--since TIME` and `--after CURSOR`.
    pub fn parse(since: Option<&str>, after: Option<&str>) -> std::result::Result<HistoryQuery, String> {
        Ok(HistoryQuery {
            since_ms: since.map(parse_time).transpose()?,
            after: after.map(str::parse).transpose()?,
            limit: 0,
        })
    }

    fn limit(&self) -> usize {
        match self.limit {
            0 => DEFAULT_HISTORY_LIMIT as usize,
            n => n.min(MAX_HISTORY_LIMIT) as usize,
        }
    }
}

/// One page of a listing, oldest first; `next` continues it (`None`: nothing more now).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub records: Vec<HistoryRecord>,
    pub next: Option<HistoryCursor>,
}

/// One line per record, then where to continue if there is more.
impl std::fmt::Display for HistoryPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.records {
            writeln!(f, "{r}")?;
        }
        match self.next {
            Some(next) => writeln!(f, "more: --after {next}"),
            None => Ok(()),
        }
    }
}

impl HistoryPage {
    /// The page of `doc`'s history as JSON: `{"doc", "records", "next"}`.
    pub fn to_json(&self, doc: DocId) -> serde_json::Value {
        let records: Vec<_> = self.records.iter().map(|r| r.to_json(doc)).collect();
        serde_json::json!({ "doc": doc.to_string(), "records": records, "next": self.next.map(|c| c.to_string()) })
    }
}

/// Pages through a history until `limit` records (`None`: all) or its end: ask for
/// `next_query()` until it is `None`, handing each answer to `take`.
#[derive(Debug)]
pub struct Pager {
    query: HistoryQuery,
    limit: Option<usize>,
    all: HistoryPage,
    done: bool,
}

impl Pager {
    pub fn new(query: HistoryQuery, limit: Option<u32>) -> Pager {
        Pager { query, limit: limit.map(|l| l as usize), all: HistoryPage::default(), done: false }
    }

    /// The next page to ask for.
    pub fn next_query(&mut self) -> Option<HistoryQuery> {
        let left = self.limit.map_or(usize::MAX, |l| l.saturating_sub(self.all.records.len()));
        if self.done || left == 0 {
            return None;
        }
        self.query.limit = left.min(MAX_HISTORY_LIMIT as usize) as u32;
        Some(self.query)
    }

    pub fn take(&mut self, page: HistoryPage) {
        self.done = page.next.is_none() || page.records.is_empty();
        self.query.after = page.next;
        self.all.records.extend(page.records);
        self.all.next = page.next;
    }

    /// Everything read; `next` continues after it when `limit` stopped it.
    pub fn finish(self) -> HistoryPage {
        self.all
    }
}

/// Lists a history journal: the records of the steps that committed the entries of `storage`
/// they name, in the order they were applied. Reads the entries it lists and the headers of
/// the storage entries they name (and finds where `since_ms` starts by bisection), never the
/// whole journal.
/// Whether the history holds the entry of storage entry `lsn` (a step): looked for among its
/// newest entries, which name storage entries in the order steps ran. For a recovery that takes
/// back a step whose history entry was lost (see the module docs).
pub fn records_step(history: &dyn Journal, storage: &dyn Journal, lsn: Lsn) -> Result<bool> {
    let range = history.range();
    let Some(mut at) = range.last() else { return Ok(false) };
    loop {
        let entry = decode(&history.read(at)?)?;
        if entry.storage_lsn < lsn.get() {
            return Ok(false);
        }
        if entry.storage_lsn == lsn.get() && entry.matches(storage)? {
            return Ok(true);
        }
        match at.prev().filter(|p| *p >= range.first()) {
            Some(prev) => at = prev,
            None => return Ok(false),
        }
    }
}

pub fn read(history: &dyn Journal, storage: &dyn Journal, query: &HistoryQuery) -> Result<HistoryPage> {
    let range = history.range();
    let mut page = HistoryPage::default();
    let Some(last) = range.last() else { return Ok(page) };
    let (mut at, mut skip) = match query.after {
        Some(c) if c.entry >= range.first() => (c.entry, c.index as usize + 1),
        _ => (range.first(), 0),
    };
    if let Some(since) = query.since_ms {
        let first = first_applied_since(history, at, last, since)?;
        if first > at {
            (at, skip) = (first, 0);
        }
    }
    let (limit, mut bytes) = (query.limit(), 0usize);
    // Each storage entry is listed once: after a race, two history entries may match it.
    let mut listed: Option<u64> = None;
    // One entry at a time: what a listing holds is bounded by its page, whatever it reads.
    for lsn in crate::journal::LsnRange::inclusive(at, last).iter() {
        let entry = decode(&history.read(lsn)?)?;
        let first_index = if lsn == at { std::mem::take(&mut skip) } else { 0 };
        // Before `since` (a clock that stepped back), or listed already: no storage read.
        let early = query.since_ms.is_some_and(|s| entry.applied_ms < s);
        if early || listed.is_some_and(|l| entry.storage_lsn <= l) || !entry.matches(storage)? {
            continue;
        }
        listed = Some(entry.storage_lsn);
        let storage_lsn = Lsn::new(entry.storage_lsn).expect("BUG: matched a storage entry");
        for (index, r) in entry.records.into_iter().enumerate().skip(first_index) {
            let full = page.records.len() >= limit
                || (bytes > 0 && bytes + r.mutation.len() > MAX_HISTORY_PAGE_BYTES);
            if full {
                page.next = page.records.last().map(|r| r.cursor);
                return Ok(page);
            }
            bytes += r.mutation.len() + r.subject.len() + r.rejected.as_ref().map_or(0, |(_, m)| m.len());
            let cursor = HistoryCursor { entry: lsn, index: index as u32 };
            page.records.push(record(cursor, storage_lsn, entry.applied_ms, r)?);
        }
    }
    Ok(page)
}

/// The first entry in `from..=last` whose step ran at or after `since_ms` (`last + 1` if none),
/// by bisection: steps are recorded in the order they ran, by one clock.
fn first_applied_since(journal: &dyn Journal, from: Lsn, last: Lsn, since_ms: i64) -> Result<Lsn> {
    let (mut lo, mut hi) = (from.get(), last.get() + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let entry = decode(&journal.read(Lsn::new(mid).expect("BUG: past 0"))?)?;
        if entry.applied_ms >= since_ms {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Lsn::new(lo).expect("BUG: past 0"))
}

fn record(
    cursor: HistoryCursor,
    storage_lsn: Lsn,
    applied_ms: i64,
    r: StoredRecord,
) -> Result<HistoryRecord> {
    let timeline_lsn = Lsn::new(r.lsn).ok_or_else(|| Error::Malformed("timeline LSN 0".into()))?;
    let (client_ms, statements, once, call) = match Mutation::decode(&r.mutation) {
        Ok(m) => match crate::mutators::Call::decode(&m.body) {
            Some(Ok(c)) => (m.client_time_ms, Vec::new(), None, Some((c.name, c.args))),
            Some(Err(_)) => (m.client_time_ms, Vec::new(), None, None),
            None => match postcard::from_bytes::<SqlMutation>(&m.body) {
                Ok(sql) => (m.client_time_ms, sql.statements, sql.once, None),
                Err(_) => (m.client_time_ms, Vec::new(), None, None),
            },
        },
        Err(_) => (0, Vec::new(), None, None),
    };
    let outcome = match r.rejected {
        None => HistoryOutcome::Applied,
        Some((code, message)) => HistoryOutcome::Rejected { code, message },
    };
    Ok(HistoryRecord {
        cursor,
        storage_lsn,
        timeline: r.timeline,
        timeline_lsn,
        subject: r.subject,
        client_ms,
        received_ms: r.received_ms,
        applied_ms,
        outcome,
        statements,
        once,
        call,
    })
}

/// Through which history entry the history may go when the storage is trimmed to
/// `storage_first`: the entries from the first on that name an earlier storage entry, read in
/// order (as many as go, and one more). An entry out of order after them (a stale one a racing
/// server left) stays; no entry naming `storage_first` or later is ever dropped.
pub(crate) fn trim_point(journal: &dyn Journal, storage_first: Lsn) -> Result<Option<Lsn>> {
    let mut through = None;
    for lsn in journal.range().iter() {
        if decode(&journal.read(lsn)?)?.storage_lsn >= storage_first.get() {
            break;
        }
        through = Some(lsn);
    }
    Ok(through)
}
