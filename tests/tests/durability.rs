//! `Durability::Normal` on real files: writes are not durable until `sync_timeline`, nothing
//! is sent to the server before it is, and a power cut that loses or tears the unsynced tail
//! of the timeline leaves a replica that opens cleanly with every synced write and none of the
//! lost ones (so the server, which never saw them, agrees).
//!
//! The server's entries a replica receives are appended without an fsync each (the server
//! holds them); a power cut that tears them off leaves a replica that opens at the state
//! before them, with the mutations they confirmed pending again, and converges on the
//! server's pages with nothing lost or applied twice.

use std::path::{Path, PathBuf};

use pagesync::journal::{FileJournal, FileJournalOptions, Journal, JournalId, Lsn};
use pagesync::protocol::{ClientSession, ConnId, Message, ServerSession};
use pagesync::{ClientDocument, DocId, Durability, MutationState, ServerDocument, Value};
use pagesync_tests::{memory_journal, sql};

const T0: i64 = 1_700_000_000_000;
const DOC: DocId = DocId([7; 16]);

fn replica(dir: &Path) -> ClientDocument {
    replica_with(dir, FileJournalOptions::default())
}

/// A replica on files whose storage journal has `storage` options.
fn replica_with(dir: &Path, storage: FileJournalOptions) -> ClientDocument {
    let open = |name: &str, id: JournalId, opts: FileJournalOptions| {
        let path = dir.join(name);
        let j =
            if path.exists() { FileJournal::open(&path, opts) } else { FileJournal::create(&path, id, opts) };
        Box::new(j.expect("journal"))
    };
    let timeline = open("timeline", pagesync_tests::timeline_journal_id(2), FileJournalOptions::default());
    let storage = open("storage", JournalId::from_u128(1), storage);
    pagesync_tests::keyed(ClientDocument::open(storage, timeline).expect("replica"), 2)
}

/// The sent mark of the replica in `dir` (its timeline's key is `timeline_key(2)`), opened or
/// made.
fn sent_mark(dir: &Path) -> Box<FileJournal> {
    let id = pagesync_tests::timeline_journal_id(2);
    Box::new(FileJournal::open_or_create(dir.join("sent"), id, FileJournalOptions::default()).expect("mark"))
}

/// The timeline's one segment file.
fn segment(dir: &Path) -> PathBuf {
    segment_of(dir, "timeline")
}

/// A journal's one segment file.
fn segment_of(dir: &Path, journal: &str) -> PathBuf {
    let segs: Vec<PathBuf> = std::fs::read_dir(dir.join(journal))
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

/// A power cut's tear of the file at `path`: its first `synced` bytes stay, and of the `len`
/// it had, `1/part` of what came after them (cut mid-frame: a torn tail).
fn tear(path: &Path, synced: u64, len: u64, part: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open");
    f.set_len(synced + (len - synced) / part).expect("cut");
}

/// Writes the row `x` through `session` (at `T0`, seed `x`); returns its LSN.
fn insert(session: &mut ClientSession, x: i64) -> Lsn {
    let body = sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]);
    session.mutate(DOC, body, T0, x as u64).expect("write").lsn
}

fn rows(doc: &ClientDocument) -> Vec<Vec<Value>> {
    doc.query("SELECT x FROM t ORDER BY x", &[]).expect("query").rows
}

/// Also with a sent mark (as the native client opens for every replica): `Normal` writes are
/// not covered by it, so their writer never waits for its fsync, and they go up once durable.
#[test]
fn unsynced_writes_are_not_sent_and_a_power_cut_loses_them_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut doc = replica(dir.path());
    assert_eq!(doc.send_before_durable(sent_mark(dir.path())).expect("mark"), 0);
    doc.mutate(sql("CREATE TABLE t(x INTEGER)", vec![]), T0, 1).expect("ddl");
    doc.set_durability(Durability::Normal).expect("normal");
    doc.mutate(sql("INSERT INTO t VALUES (1)", vec![]), T0, 2).expect("write");
    doc.sync_timeline().expect("sync");
    let synced_len = std::fs::metadata(segment(dir.path())).expect("stat").len();
    assert!(!doc.needs_sync());

    for x in 2..=4 {
        doc.mutate(sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]), T0, 10 + x as u64)
            .expect("write");
    }
    assert!(doc.needs_sync());
    assert_eq!(rows(&doc).len(), 4, "unsynced writes are visible locally at once");

    // Nothing unsynced goes up: the server sees exactly the two synced mutations.
    let mut session = ClientSession::new("");
    session.add_document(DOC, doc);
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    server.connect(ConnId(1));
    session.connected(T0);
    let mut sent = 0;
    for _ in 0..10 {
        while let Some(m) = session.poll_transmit() {
            if let Message::Mutations { entries, .. } = &m {
                sent += entries.len();
            }
            server.handle_frame(ConnId(1), T0, &m.encode());
        }
        server.handle_timeout(T0);
        while let Some((_, m)) = server.poll_transmit() {
            session.handle_frame(T0, &m.encode()).expect("apply");
        }
    }
    assert_eq!(sent, 2, "only durable writes may be sent");
    assert_eq!(session.status(DOC).expect("status").pending, 3);
    assert!(sent_mark(dir.path()).range().is_empty(), "no write waited for the sent mark");

    // Power cut: the unsynced tail is lost, its first frame torn half way.
    let doc = session.remove_document(DOC).expect("doc");
    drop(doc);
    let seg = segment(dir.path());
    let len = std::fs::metadata(&seg).expect("stat").len();
    assert!(len > synced_len + 16, "the unsynced writes reached the file ({len} bytes)");
    tear(&seg, synced_len, len, 5);

    let mut doc = replica(dir.path());
    assert_eq!(doc.send_before_durable(sent_mark(dir.path())).expect("mark"), 0, "nothing to fill");
    assert_eq!(rows(&doc), vec![vec![Value::Integer(1)]], "the synced write stays, the lost ones are gone");
    assert_eq!(doc.pending_count(), 0, "the server confirmed everything that survived");
    assert_eq!(
        doc.state(pagesync::journal::Lsn::new(2).expect("lsn")).expect("state"),
        MutationState::Confirmed
    );
    // And the replica goes on: the next write takes the next free LSN.
    let w = doc.mutate(sql("INSERT INTO t VALUES (5)", vec![]), T0, 99).expect("write");
    assert_eq!(w.lsn.get(), 3);
}

/// A replica with a sent mark sends its writes before their fsync. A power cut then takes
/// back writes the server already holds: reopened, the replica fills their LSNs with no-ops
/// before anything else, so its next write takes a new LSN (not one the server would drop as
/// a copy of what it has), and it converges on the server's pages, every write once, with no
/// confirmation counted as a mismatch.
#[test]
fn writes_sent_before_their_fsync_and_lost_in_a_power_cut_are_filled_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut doc = replica(dir.path());
    assert_eq!(
        doc.send_before_durable(sent_mark(dir.path())).expect("mark"),
        0,
        "a new replica fills nothing"
    );
    let (mut session, mut server) = connected(doc);
    let write = |x: i64| pagesync::Mutation {
        client_time_ms: T0,
        seed: x as u64,
        body: sql("INSERT INTO t VALUES (?1)", vec![Value::Integer(x)]),
    };
    let ddl =
        pagesync::Mutation { client_time_ms: T0, seed: 0, body: sql("CREATE TABLE t(x INTEGER)", vec![]) };
    exchange(&mut session, &mut server, ConnId(1), T0);

    // Durable writes whose frames come out of the write itself, before its barrier.
    let mut frames = Vec::new();
    let answers = session
        .mutate_group_sending(DOC, vec![ddl, write(1)], T0, &mut |_, m| frames.push(m))
        .expect("write");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let sent: usize = frames
        .iter()
        .map(|m| if let Message::Mutations { entries, .. } = m { entries.len() } else { 0 })
        .sum();
    assert_eq!(sent, 2, "the write sent itself: {frames:?}");
    assert!(!session.needs_sync(), "and was durable when it answered");
    for m in frames {
        server.handle_frame(ConnId(1), T0, &m.encode());
    }
    exchange(&mut session, &mut server, ConnId(1), T0);
    assert_eq!(session.status(DOC).expect("status").pending, 0);
    let synced_len = std::fs::metadata(segment(dir.path())).expect("stat").len();

    // Two more go up before their fsync (the mark covers them) and the server applies them; the
    // power cut comes before that fsync ends and before the server's answer arrives (the test
    // cuts their bytes off the file below, as the power cut would).
    let mut frames = Vec::new();
    let answers = session
        .mutate_group_sending(DOC, vec![write(2), write(3)], T0 + 1, &mut |_, m| frames.push(m))
        .expect("write");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let mut sent = 0;
    for m in frames {
        if let Message::Mutations { entries, .. } = &m {
            sent += entries.len();
        }
        server.handle_frame(ConnId(1), T0 + 1, &m.encode());
    }
    assert_eq!(sent, 2, "sent before they were durable");
    server.handle_timeout(T0 + 1);
    while server.poll_transmit().is_some() {}
    let doc = session.remove_document(DOC).expect("doc");
    std::mem::forget(doc);
    let seg = segment(dir.path());
    let len = std::fs::metadata(&seg).expect("stat").len();
    assert!(len > synced_len + 16, "the two writes reached the file ({len} bytes)");
    tear(&seg, synced_len, len, 3);

    let mut doc = replica(dir.path());
    assert_eq!(rows(&doc), vec![vec![Value::Integer(1)]], "the power cut took the two writes back");
    let filled = doc.send_before_durable(sent_mark(dir.path())).expect("mark");
    assert_eq!(filled, pagesync::SEND_AHEAD_LSNS, "LSNs 3 up to the mark (2 + SEND_AHEAD_LSNS) filled");
    let w = doc.mutate(sql("INSERT INTO t VALUES (4)", vec![]), T0 + 2, 4).expect("write");
    assert_eq!(w.lsn.get(), 3 + pagesync::SEND_AHEAD_LSNS, "past every LSN the server may hold");

    let mut session = reconnected(&mut server, doc);
    let status = session.status(DOC).expect("status");
    assert_eq!((status.pending, status.error), (0, None));
    assert_eq!(session.digest_mismatches(), 0, "a fill's confirmation is not a determinism failure");
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(w.lsn).expect("state"), MutationState::Confirmed);
    let want: Vec<Vec<Value>> = (1..=4).map(|x| vec![Value::Integer(x)]).collect();
    assert_eq!(rows(&doc), want, "the server's copies of the lost writes, and the new one: each once");
    let theirs = server.document(DOC).expect("open on the server").export().expect("export");
    assert_eq!(doc.export().expect("export"), theirs, "the replica holds the server's pages");
}

/// A mark raised under `Durability::Full` covers LSNs past the timeline's end; after a switch
/// to `Normal`, a write there still goes up only once durable.
#[test]
fn after_a_switch_to_normal_a_write_goes_up_only_once_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut doc = replica(dir.path());
    doc.send_before_durable(sent_mark(dir.path())).expect("mark");
    let (mut session, mut server) = connected(doc);
    exchange(&mut session, &mut server, ConnId(1), T0);
    let ddl =
        pagesync::Mutation { client_time_ms: T0, seed: 0, body: sql("CREATE TABLE t(x INTEGER)", vec![]) };
    let mut sent = Vec::new();
    session.mutate_group_sending(DOC, vec![ddl], T0, &mut |_, m| sent.push(m)).expect("write");
    assert!(sent.iter().any(|m| matches!(m, Message::Mutations { .. })), "under Full it went up early");
    for m in sent {
        server.handle_frame(ConnId(1), T0, &m.encode());
    }
    exchange(&mut session, &mut server, ConnId(1), T0);

    session.set_durability(DOC, Durability::Normal).expect("normal");
    let lsn = insert(&mut session, 1);
    assert!(session.needs_sync(), "a Normal write waits for its fsync");
    let early = std::iter::from_fn(|| session.poll_transmit());
    let early = early.filter(|m| matches!(m, Message::Mutations { .. })).count();
    assert_eq!(early, 0, "nothing goes up before it is durable, whatever the mark covers");
    session.sync_timelines().expect("sync");
    let mutations: Vec<Message> = std::iter::from_fn(|| session.poll_transmit())
        .filter(|m| matches!(m, Message::Mutations { .. }))
        .collect();
    assert!(
        matches!(mutations.as_slice(), [Message::Mutations { first, .. }] if *first == lsn),
        "once durable it goes: {mutations:?}"
    );
}

/// A file timeline whose next `sync` fails as a real one does: the journal then ends at what
/// was durable and refuses writes (`FileJournal` cuts its file back and is poisoned); here the
/// file keeps the bytes, which the test cuts itself, as the power cut would.
struct FailingSync {
    inner: FileJournal,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    synced_next: Lsn,
    cut: Option<pagesync::journal::LsnRange>,
}

impl pagesync::journal::Journal for FailingSync {
    fn id(&self) -> JournalId {
        self.inner.id()
    }
    fn range(&self) -> pagesync::journal::LsnRange {
        self.cut.unwrap_or_else(|| self.inner.range())
    }
    fn append_batch(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<pagesync::journal::LsnRange> {
        let range = self.append_batch_unsynced(payloads)?;
        self.sync()?;
        Ok(range)
    }
    fn append_batch_unsynced(
        &mut self,
        payloads: &[&[u8]],
    ) -> pagesync::journal::Result<pagesync::journal::LsnRange> {
        if self.cut.is_some() {
            let message = "refuses writes after a failed fsync".into();
            return Err(pagesync::journal::JournalError::Backend { journal: self.inner.id(), message });
        }
        self.inner.append_batch_unsynced(payloads)
    }
    fn sync(&mut self) -> pagesync::journal::Result<()> {
        if self.fail.load(std::sync::atomic::Ordering::Relaxed) && self.cut.is_none() {
            let first = self.inner.range().first();
            self.cut = Some(match self.synced_next.prev().filter(|l| *l >= first) {
                Some(last) => pagesync::journal::LsnRange::inclusive(first, last),
                None => pagesync::journal::LsnRange::empty_at(first),
            });
            let message = "fsync: input/output error".into();
            return Err(pagesync::journal::JournalError::Backend { journal: self.inner.id(), message });
        }
        self.inner.sync()?;
        self.synced_next = self.inner.range().next();
        Ok(())
    }
    fn is_synced(&self) -> bool {
        self.cut.is_some() || self.inner.is_synced()
    }
    fn read(&self, lsn: Lsn) -> pagesync::journal::Result<Vec<u8>> {
        self.inner.read(lsn)
    }
    fn remove_prefix(&mut self, up_to: Lsn) -> pagesync::journal::Result<()> {
        self.inner.remove_prefix(up_to)
    }
}

/// The barrier of writes already sent fails: their callers get the error, the replica's state
/// goes back to what is durable, and a clean close does not lower the sent mark below them
/// (the journal ends before them now). Reopened after the power cut, the replica fills them,
/// its next write takes a new LSN, and the server's copies of the sent ones are kept, once.
#[test]
fn a_failed_barrier_after_sending_keeps_the_mark_and_loses_no_later_write() {
    use pagesync::journal::Journal as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let id = pagesync_tests::timeline_journal_id(2);
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timeline =
        FileJournal::create(dir.path().join("timeline"), id, FileJournalOptions::default()).expect("tl");
    let timeline = FailingSync { inner: timeline, fail: fail.clone(), synced_next: Lsn::FIRST, cut: None };
    let storage = FileJournal::create(
        dir.path().join("storage"),
        JournalId::from_u128(1),
        FileJournalOptions::default(),
    );
    let doc = ClientDocument::open(Box::new(storage.expect("storage")), Box::new(timeline)).expect("replica");
    let mut doc = pagesync_tests::keyed(doc, 2);
    doc.send_before_durable(sent_mark(dir.path())).expect("mark");
    let (mut session, mut server) = connected(doc);
    exchange(&mut session, &mut server, ConnId(1), T0);
    let m = |x: i64, sql_text: &str| pagesync::Mutation {
        client_time_ms: T0,
        seed: x as u64,
        body: sql(sql_text, vec![Value::Integer(x)]),
    };
    let mut frames = Vec::new();
    let ddl =
        pagesync::Mutation { client_time_ms: T0, seed: 0, body: sql("CREATE TABLE t(x INTEGER)", vec![]) };
    let answers = session
        .mutate_group_sending(DOC, vec![ddl, m(1, "INSERT INTO t VALUES (?1)")], T0, &mut |_, m| {
            frames.push(m)
        })
        .expect("write");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    for f in frames.drain(..) {
        server.handle_frame(ConnId(1), T0, &f.encode());
    }
    exchange(&mut session, &mut server, ConnId(1), T0);
    let synced_len = std::fs::metadata(segment(dir.path())).expect("stat").len();

    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = session
        .mutate_group_sending(DOC, vec![m(2, "INSERT INTO t VALUES (?1)")], T0 + 1, &mut |_, m| {
            frames.push(m)
        })
        .expect("the group as a whole");
    assert!(matches!(answers[..], [Err(_)]), "not durable, not acknowledged: {answers:?}");
    assert!(frames.iter().any(|f| matches!(f, Message::Mutations { .. })), "but it was sent: {frames:?}");
    let doc = session.document(DOC).expect("open");
    assert_eq!(rows(doc), vec![vec![Value::Integer(1)]], "the replica shows only what is durable");
    session.settle_sent_marks().expect("a clean close");
    let marked = FileJournal::open(dir.path().join("sent"), FileJournalOptions::default()).expect("mark");
    let bound = marked.read(marked.range().last().expect("a mark")).expect("read");
    let bound = u64::from_le_bytes(bound.try_into().expect("8 bytes"));
    assert!(bound >= 4, "the mark still covers the sent write (LSN 3): {bound}");
    drop(marked);
    // The server applies it; the replica never hears (the process goes, the power too).
    for f in frames {
        server.handle_frame(ConnId(1), T0 + 1, &f.encode());
    }
    server.handle_timeout(T0 + 1);
    while server.poll_transmit().is_some() {}
    std::mem::forget(session.remove_document(DOC));
    let seg = segment(dir.path());
    std::fs::OpenOptions::new().write(true).open(&seg).expect("open").set_len(synced_len).expect("cut");

    let mut doc = replica(dir.path());
    assert!(doc.send_before_durable(sent_mark(dir.path())).expect("mark") > 0, "LSN 3 and on filled");
    let w = doc.mutate(sql("INSERT INTO t VALUES (3)", vec![]), T0 + 2, 3).expect("write");
    assert!(w.lsn.get() > 3, "not the LSN of the write the server holds: {}", w.lsn);
    let mut session = reconnected(&mut server, doc);
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(w.lsn).expect("state"), MutationState::Confirmed);
    let want: Vec<Vec<Value>> = (1..=3).map(|x| vec![Value::Integer(x)]).collect();
    assert_eq!(rows(&doc), want, "the sent write applied once, the next one too");
    let theirs = server.document(DOC).expect("open on the server").export().expect("export");
    assert_eq!(doc.export().expect("export"), theirs);
}

/// A session holding `doc`, connected (at `T0`, as `ConnId(1)`) to a new server over memory
/// journals.
fn connected(doc: ClientDocument) -> (ClientSession, ServerSession) {
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    let mut session = ClientSession::new("");
    session.add_document(DOC, doc);
    server.connect(ConnId(1));
    session.connected(T0);
    (session, server)
}

/// A reopened replica's new session, on a new connection (`ConnId(2)`, at `T0 + 2`) to
/// `server`, whose old one (`ConnId(1)`) went: synced until both are quiet.
fn reconnected(server: &mut ServerSession, doc: ClientDocument) -> ClientSession {
    let mut session = ClientSession::new("");
    session.add_document(DOC, doc);
    server.disconnect(ConnId(1));
    server.connect(ConnId(2));
    session.connected(T0 + 2);
    exchange(&mut session, server, ConnId(2), T0 + 2);
    session
}

/// Client and server exchange frames until neither has anything to send.
fn exchange(session: &mut ClientSession, server: &mut ServerSession, conn: ConnId, now: i64) {
    deliver(server, conn, session, now, None);
}

#[test]
fn received_entries_torn_off_by_a_power_cut_come_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerSession::new(Box::new(|d: DocId| {
        ServerDocument::open(memory_journal(u128::from_be_bytes(d.0)))
    }));
    let mut session = ClientSession::new("");
    session.add_document(DOC, replica(dir.path()));
    server.connect(ConnId(1));
    session.connected(T0);
    session.mutate(DOC, sql("CREATE TABLE t(x INTEGER)", vec![]), T0, 1).expect("ddl");
    insert(&mut session, 1);
    exchange(&mut session, &mut server, ConnId(1), T0);
    assert_eq!(session.status(DOC).expect("status").pending, 0);
    session.sync_storage().expect("sync");
    let synced_len = std::fs::metadata(segment_of(dir.path(), "storage")).expect("stat").len();

    let (l2, l3) = (insert(&mut session, 2), insert(&mut session, 3));
    exchange(&mut session, &mut server, ConnId(1), T0 + 1);
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(l3).expect("state"), MutationState::Confirmed);
    let seg = segment_of(dir.path(), "storage");
    let len = std::fs::metadata(&seg).expect("stat").len();
    assert!(len > synced_len + 64, "the confirming entries reached the file unsynced ({len} bytes)");
    // Power cut: no clean close (which would sync), and the unsynced tail torn part way.
    std::mem::forget(doc);
    tear(&seg, synced_len, len, 3);

    let doc = replica(dir.path());
    assert_eq!(doc.state(l2).expect("state"), MutationState::Pending, "its confirmation was lost");
    assert_eq!(doc.pending_count(), 2);
    assert_eq!(rows(&doc).len(), 3, "the writes are still there, pending again");
    let mut session = reconnected(&mut server, doc);
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.state(l3).expect("state"), MutationState::Confirmed);
    assert_eq!(doc.pending_count(), 0);
    let want: Vec<Vec<Value>> = (1..=3).map(|x| vec![Value::Integer(x)]).collect();
    assert_eq!(rows(&doc), want, "every write once");
    let theirs = server.document(DOC).expect("open on the server").export().expect("export");
    assert_eq!(doc.export().expect("export"), theirs, "the replica holds the server's pages");
}

/// The storage barrier a client runs with its session's lock let go
/// (`ClientSession::detach_storage_syncs`): while it is out the session writes, receives and
/// answers queries; once it is back, what was received before it survives a power cut, what
/// came after may be torn off and comes again, and nothing is lost or applied twice.
#[test]
fn a_storage_barrier_run_without_the_session_covers_what_was_received_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut session, mut server) = connected(replica(dir.path()));
    session.mutate(DOC, sql("CREATE TABLE t(x INTEGER)", vec![]), T0, 1).expect("ddl");
    let l1 = insert(&mut session, 1);
    exchange(&mut session, &mut server, ConnId(1), T0);
    let storage = segment_of(dir.path(), "storage");
    let received_len = std::fs::metadata(&storage).expect("stat").len();

    let (detached, taken) = session.detach_storage_syncs();
    taken.expect("detach");
    assert_eq!(detached.len(), 1, "one replica received entries since its last barrier");
    // The barrier is out: the session goes on.
    let l2 = insert(&mut session, 2);
    exchange(&mut session, &mut server, ConnId(1), T0 + 1);
    let doc = session.document(DOC).expect("open");
    assert_eq!(rows(doc).len(), 2);
    assert_eq!(doc.state(l2).expect("state"), MutationState::Confirmed);
    let len = std::fs::metadata(&storage).expect("stat").len();
    assert!(len > received_len + 64, "the later confirmation reached the file unsynced ({len} bytes)");
    session.finish_storage_syncs(ClientSession::run_storage_syncs(detached)).expect("finish");
    let (after, taken) = session.detach_storage_syncs();
    taken.expect("detach");
    assert_eq!(after.len(), 1, "what was received while the barrier was out still waits for one");
    drop(after); // never run: it records nothing

    // Power cut: what came after the barrier is torn part way; no clean close.
    let doc = session.remove_document(DOC).expect("doc");
    std::mem::forget(doc);
    tear(&storage, received_len, len, 3);

    let doc = replica(dir.path());
    assert_eq!(doc.state(l1).expect("state"), MutationState::Confirmed, "received before the barrier");
    assert_eq!(doc.state(l2).expect("state"), MutationState::Pending, "its confirmation came after");
    let mut session = reconnected(&mut server, doc);
    // A barrier that ran covers what it was taken after: none is left to take.
    let (again, taken) = session.detach_storage_syncs();
    taken.expect("detach");
    assert_eq!(again.len(), 1, "the entries that came again wait for a barrier");
    session.finish_storage_syncs(ClientSession::run_storage_syncs(again)).expect("finish");
    let (none, taken) = session.detach_storage_syncs();
    taken.expect("detach");
    assert!(none.is_empty(), "the barrier covered everything received");
    let doc = session.remove_document(DOC).expect("doc");
    assert_eq!(doc.pending_count(), 0);
    let want: Vec<Vec<Value>> = (1..=2).map(|x| vec![Value::Integer(x)]).collect();
    assert_eq!(rows(&doc), want, "every write once");
    let theirs = server.document(DOC).expect("open on the server").export().expect("export");
    assert_eq!(doc.export().expect("export"), theirs, "the replica holds the server's pages");
}

/// A new replica's download (a checkpoint of several parts, on real files) dies with the
/// process part-way. Reopened from its files, the replica keeps every entry it had written,
/// asks for the rest only, and ends byte-identical to the server: nothing is fetched twice.
#[test]
fn an_interrupted_cold_start_resumes_without_refetching_what_it_has() {
    const C: ConnId = ConnId(1);
    let (mut s, cold, end) = server_with_a_checkpoint(C);

    // The new replica takes two entries (parts), then its process dies: nothing synced them.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fresh = ClientSession::new("");
    fresh.add_document(DOC, replica(dir.path()));
    s.connect(C);
    fresh.connected(100);
    let first = deliver(&mut s, C, &mut fresh, 100, Some(2));
    assert_eq!(first.first(), Some(&cold), "the download starts at the checkpoint");
    drop(fresh);
    s.disconnect(C);

    let reopened = replica(dir.path());
    let held = reopened.storage_range();
    assert_eq!((held.first(), held.next().get()), (cold, cold.get() + 2), "what it wrote is still there");
    assert!(reopened.is_restarting(), "half a checkpoint is no state yet");
    resume(&mut s, C, reopened, end);
}

/// A new replica's download rolls its storage journal's segments without a barrier (as a
/// client's does), and a power cut comes before any sync: the second segment ends torn in the
/// middle of an entry while the segments after it were kept. Reopened, the replica cuts the
/// torn segment, drops those after it, asks for the rest from the cut, and ends byte-identical
/// to the server.
#[test]
fn a_download_torn_across_segments_rolled_without_a_barrier_resumes_from_the_cut() {
    const C: ConnId = ConnId(1);
    let (mut s, cold, end) = server_with_a_checkpoint(C);

    // Segments of at most 5 MiB: about one checkpoint part (4 MiB) each.
    let opts =
        FileJournalOptions { roll_without_barrier: true, max_segment_bytes: 5 << 20, ..Default::default() };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fresh = ClientSession::new("");
    fresh.add_document(DOC, replica_with(dir.path(), opts.clone()));
    s.connect(C);
    fresh.connected(100);
    let all = deliver(&mut s, C, &mut fresh, 100, None);
    assert_eq!(all.first(), Some(&cold));
    drop(fresh);
    s.disconnect(C);

    let segs = pagesync_tests::segment_files(&dir.path().join("storage"));
    assert!(segs.len() >= 4, "the download rolled several segments: {segs:?}");
    let flagged = |p: &Path| std::fs::read(p).expect("read")[32] & 1 == 1;
    assert!(segs[2..].iter().all(|p| flagged(p)), "rolled without a barrier");
    // The power cut: the second segment's last blocks never reached the disk.
    let torn_len = std::fs::metadata(&segs[1]).expect("stat").len() / 2;
    std::fs::OpenOptions::new().write(true).open(&segs[1]).expect("open").set_len(torn_len).expect("tear");

    let reopened = replica_with(dir.path(), opts);
    let held = reopened.storage_range();
    let second_first: u64 = segs[1].file_stem().expect("name").to_string_lossy().parse().expect("lsn");
    assert!(
        held.next().get() >= second_first && held.next().get() < end.get(),
        "cut inside the second segment: {held:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("storage")).expect("list").count(),
        1 + 2,
        "JOURNAL and two segments"
    );
    resume(&mut s, C, reopened, end);
}

/// A server holding about 16 MiB written by a client on `conn` (since gone), rewritten so the
/// history outgrew the document and the next write checkpointed it: a checkpoint of several
/// parts (4 MiB each). Returns it with the checkpoint's first LSN and the storage's next one.
fn server_with_a_checkpoint(conn: ConnId) -> (ServerSession, Lsn, Lsn) {
    let mut s = pagesync_tests::checkpointing_server();
    let mut writer = ClientSession::new("");
    writer.add_document(DOC, pagesync_tests::client_doc(memory_journal(3), 4));
    s.connect(conn);
    writer.connected(0);
    for (i, step) in pagesync_tests::checkpoint_steps(4000).iter().enumerate() {
        writer.mutate(DOC, sql(step, vec![]), T0, i as u64).expect("mutate");
        deliver(&mut s, conn, &mut writer, i as i64, None);
    }
    let newest = s.document(DOC).expect("open").newest_checkpoint().expect("a checkpoint");
    let end = s.document(DOC).expect("open").storage_range().next();
    assert!(newest.last.get() >= newest.first.get() + 3, "a checkpoint of several parts: {newest:?}");
    s.disconnect(conn);
    (s, newest.first, end)
}

/// Connects `reopened` (a replica part-way through its download) to `s` on `conn` and checks
/// that it is sent the rest, from what it holds up to `end`, each entry once, and ends
/// byte-identical to the server.
fn resume(s: &mut ServerSession, conn: ConnId, reopened: ClientDocument, end: Lsn) {
    let held = reopened.storage_range();
    let mut resumed = ClientSession::new("");
    resumed.add_document(DOC, reopened);
    s.connect(conn);
    resumed.connected(2_000);
    let second = deliver(s, conn, &mut resumed, 2_000, None);
    let expected: Vec<Lsn> = (held.next().get()..end.get()).map(|n| Lsn::new(n).expect("lsn")).collect();
    assert_eq!(second, expected, "the rest, each entry once, none it had");
    let replica = resumed.document(DOC).expect("open");
    assert!(!replica.is_restarting());
    assert_eq!(
        pagesync_tests::pages_of(replica.database()),
        pagesync_tests::pages_of(s.document(DOC).expect("open").database())
    );
}

/// Moves messages between `s` (as `conn`) and `c` until both are quiet, or until `c` has taken
/// `storage_limit` storage entries (then the rest is left undelivered). Returns the LSNs of
/// the storage entries delivered to `c`, in order.
fn deliver(
    s: &mut ServerSession,
    conn: ConnId,
    c: &mut ClientSession,
    now: i64,
    storage_limit: Option<usize>,
) -> Vec<Lsn> {
    let mut delivered = Vec::new();
    for _ in 0..10_000 {
        let mut moved = false;
        while let Some(m) = c.poll_transmit() {
            s.handle_frame(conn, now, &m.encode());
            moved = true;
        }
        s.handle_timeout(now);
        while let Some((_, m)) = s.poll_transmit() {
            if let Message::Storage { first, entries, .. } = &m {
                if storage_limit.is_some_and(|n| delivered.len() + entries.len() > n) {
                    return delivered;
                }
                delivered.extend(
                    (first.get()..first.get() + entries.len() as u64).map(|n| Lsn::new(n).expect("lsn")),
                );
            }
            c.handle_frame(now, &m.encode()).expect("apply");
            moved = true;
        }
        if !moved {
            return delivered;
        }
    }
    panic!("the link never went quiet");
}
