//! The history journal in the core (`pagesync::history`, `ServerDocument::set_history`):
//! every mutation of a committed step listed once, with who sent it, its times, its storage
//! LSN, its outcome and its SQL; paging and `since`; an entry whose storage entry never
//! committed (a failed append, a crash between the two appends, also when a checkpoint takes
//! the LSN it named, a second server that lost the LSN) is never listed; the history is
//! trimmed with the storage.

use pagesync::history::{HistoryCursor, HistoryOutcome, HistoryQuery, Origin};
use pagesync::journal::{Journal, Lsn};
use pagesync::{Compaction, Mutation, ServerDocument, SqlMutation, TimelineId, Value};
use pagesync_tests::SharedJournal;

fn open(storage: &SharedJournal, history: &SharedJournal) -> ServerDocument {
    let mut d = ServerDocument::open(storage.boxed()).expect("open");
    let h = history.clone();
    d.set_history(Box::new(move |_| Ok(Some(h.boxed()))));
    d
}

fn mutation(sql: &str, params: Vec<Value>, client_ms: i64) -> Vec<u8> {
    let body = SqlMutation::one(sql, params).encode();
    Mutation { client_time_ms: client_ms, seed: 7, body }.encode().expect("encode")
}

fn from(subject: &str, received_ms: i64) -> Origin {
    Origin { subject: subject.into(), received_ms: Some(received_ms), permit: None }
}

fn all(d: &mut ServerDocument) -> Vec<pagesync::history::HistoryRecord> {
    d.read_history(&HistoryQuery::default()).expect("read history").records
}

/// The (timeline, timeline LSN) of every record, in order.
fn keys(records: &[pagesync::history::HistoryRecord]) -> Vec<(TimelineId, u64)> {
    records.iter().map(|r| (r.timeline, r.timeline_lsn.get())).collect()
}

/// Whether storage entry `lsn` applied `(timeline, timeline_lsn)`.
fn entry_applied(storage: &SharedJournal, lsn: Lsn, timeline: TimelineId, timeline_lsn: Lsn) -> bool {
    let header = pagesync::storage::decode(&storage.read(lsn).expect("read entry")).expect("decode entry");
    header.applied.iter().any(|a| a.timeline == timeline && a.lsn == timeline_lsn)
}

const ALICE: TimelineId = TimelineId([0xa; 16]);
const BOB: TimelineId = TimelineId([0xb; 16]);

#[test]
fn every_mutation_is_listed_once_with_who_when_where_and_what_became_of_it() {
    let (storage, history) = (SharedJournal::new(1), SharedJournal::new(2));
    let mut d = open(&storage, &history);
    let setup = vec![
        mutation("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER CHECK (bal >= 0))", vec![], 5),
        mutation("INSERT INTO acct VALUES (1, 100), (2, 100)", vec![], 6),
    ];
    let setup_sent = setup.clone();
    d.receive_from(ALICE, Lsn::FIRST, setup, &from("alice", 10));
    let first = d.step(20).expect("step").expect("a step");
    let withdraw = |n: i64, at| mutation("UPDATE acct SET bal = bal - ?1 WHERE id = 2", vec![n.into()], at);
    let bob_sent = vec![withdraw(60, 25), withdraw(60, 26)];
    d.receive_from(BOB, Lsn::FIRST, bob_sent.clone(), &from("bob", 30));
    let second = d.step(40).expect("step").expect("a step");
    assert_eq!(second.rejected, 1, "the second withdrawal overdraws");

    let records = all(&mut d);
    let lsn = |n| Lsn::new(n).expect("lsn");
    assert_eq!(keys(&records), vec![(ALICE, 1), (ALICE, 2), (BOB, 1), (BOB, 2)], "each once, in order");
    for (r, (subject, client, received, applied, storage_lsn)) in records.iter().zip([
        ("alice", 5, 10, 20, first.lsn),
        ("alice", 6, 10, 20, first.lsn),
        ("bob", 25, 30, 40, second.lsn),
        ("bob", 26, 30, 40, second.lsn),
    ]) {
        assert_eq!(r.subject, subject);
        assert_eq!((r.client_ms, r.received_ms, r.applied_ms), (client, received, applied));
        assert_eq!(r.storage_lsn, storage_lsn);
        assert!(entry_applied(&storage, r.storage_lsn, r.timeline, r.timeline_lsn), "{r:?}");
    }
    assert_eq!(records[2].statements[0].sql, "UPDATE acct SET bal = bal - ?1 WHERE id = 2");
    assert_eq!(records[2].statements[0].params, vec![Value::Integer(60)]);
    assert_eq!(records[2].outcome, HistoryOutcome::Applied);
    match &records[3].outcome {
        HistoryOutcome::Rejected { code, message } => {
            assert_eq!(code, "constraint");
            assert!(message.contains("CHECK"), "{message}");
        }
        other => panic!("the overdraft was {other:?}"),
    }

    // Page by page, one record at a time: the same records; `since` starts at a step.
    let mut paged = Vec::new();
    let mut query = HistoryQuery { limit: 1, ..HistoryQuery::default() };
    loop {
        let page = d.read_history(&query).expect("page");
        assert!(page.records.len() <= 1);
        paged.extend(page.records);
        match page.next {
            Some(next) => query.after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, records);
    let since =
        d.read_history(&HistoryQuery { since_ms: Some(40), ..HistoryQuery::default() }).expect("since");
    assert_eq!(keys(&since.records), vec![(BOB, 1), (BOB, 2)]);
    let past =
        HistoryQuery { after: Some(HistoryCursor { entry: lsn(99), index: 0 }), ..HistoryQuery::default() };
    assert!(d.read_history(&past).expect("past the end").records.is_empty());

    // A replay (determinism checks, rebuilding a document) records nothing.
    let replica_history = SharedJournal::new(4);
    let mut replica = open(&SharedJournal::new(3), &replica_history);
    for (step, sent) in [(first.lsn, &setup_sent), (second.lsn, &bob_sent)] {
        let header = pagesync::storage::decode(&storage.read(step).expect("entry")).expect("decode");
        let recorded: Vec<_> = header.applied.iter().copied().zip(sent.iter().cloned()).collect();
        replica.replay_step(&recorded, &header.forgotten, header.time_ms).expect("replay");
    }
    assert!(replica_history.range().is_empty(), "a replay wrote history");
}

#[test]
fn a_step_whose_storage_append_failed_is_never_listed() {
    let (storage, history) = (SharedJournal::new(1), SharedJournal::new(2));
    let mut d = open(&storage, &history);
    d.receive_from(ALICE, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 1)], &from("alice", 1));
    d.step(2).expect("step").expect("a step");
    // The history entry goes first, then the storage append fails (a failed fsync).
    storage.poison_next.store(true, std::sync::atomic::Ordering::Relaxed);
    d.receive_from(
        ALICE,
        Lsn::new(2).expect("lsn"),
        vec![mutation("INSERT INTO t VALUES (1)", vec![], 3)],
        &from("alice", 3),
    );
    let failed = d.step(4);
    assert!(failed.is_err(), "the storage append failed: {failed:?}");
    assert_eq!(history.range().len(), 2, "the history entry was written first");
    assert_eq!(keys(&all(&mut d)), vec![(ALICE, 1)], "not listed: its storage never committed");
    // Opened again (as the server does after a failed fsync), the queued mutation carried over.
    let queued = d.take_queued();
    let mut d = open(&storage, &history);
    for (tl, lsn, entry, origin) in queued {
        d.receive_from(tl, lsn, vec![entry], &origin);
    }
    let step = d.step(5).expect("step").expect("a step");
    let records = all(&mut d);
    assert_eq!(keys(&records), vec![(ALICE, 1), (ALICE, 2)], "listed once, from the step that committed");
    assert_eq!(records[1].storage_lsn, step.lsn);
    assert_eq!((records[1].received_ms, records[1].applied_ms), (3, 5), "received when it first arrived");
    assert_eq!(history.range().len(), 3, "the failed step's entry stays, never listed");
}

#[test]
fn a_crash_between_the_appends_is_not_listed_when_a_checkpoint_takes_the_storage_lsn() {
    let (storage, history) = (SharedJournal::new(1), SharedJournal::new(2));
    let mut d = open(&storage, &history);
    d.receive_from(ALICE, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 1)], &from("alice", 1));
    d.step(2).expect("step");
    // Many small steps: the entries since the last checkpoint outgrow the document.
    let mut lsn = Lsn::new(2).expect("lsn");
    for i in 0..20 {
        d.receive_from(
            ALICE,
            lsn,
            vec![mutation("INSERT INTO t VALUES (?1)", vec![i.into()], 3)],
            &from("alice", 3),
        );
        d.step(4).expect("step").expect("a step");
        lsn = lsn.next();
    }
    let listed = all(&mut d).len();
    storage.poison_next.store(true, std::sync::atomic::Ordering::Relaxed);
    d.receive_from(ALICE, lsn, vec![mutation("INSERT INTO t VALUES (-1)", vec![], 5)], &from("alice", 5));
    assert!(d.step(6).is_err());
    let stale_names = storage.range().next();
    // The process dies here. Reopened, the stale entry is not listed even before anything is
    // written; the client sends the mutation again.
    drop(d);
    let mut d = open(&storage, &history);
    assert_eq!(all(&mut d).len(), listed);
    d.set_compaction(Some(Compaction { checkpoint_after_bytes: 1, retention_ms: i64::MAX / 4 }));
    d.receive_from(ALICE, lsn, vec![mutation("INSERT INTO t VALUES (-1)", vec![], 5)], &from("alice", 7));
    let step = d.step(8).expect("step").expect("a step");
    assert!(d.newest_checkpoint().is_some(), "a checkpoint was written first");
    assert!(step.lsn > stale_names, "the checkpoint took the LSN the stale entry named");
    let records = all(&mut d);
    assert_eq!(records.len(), listed + 1, "listed once");
    let last = records.last().expect("a record");
    assert_eq!((last.timeline_lsn, last.storage_lsn, last.received_ms), (lsn, step.lsn, 7));
    for r in &records {
        assert!(entry_applied(&storage, r.storage_lsn, r.timeline, r.timeline_lsn), "{r:?} names its step");
    }
}

#[test]
fn the_history_is_trimmed_with_the_storage_and_no_further() {
    let (storage, history) = (SharedJournal::new(1), SharedJournal::new(2));
    let mut d = open(&storage, &history);
    // Checkpoints often; history kept for 1,000 ms.
    d.set_compaction(Some(Compaction { checkpoint_after_bytes: 1, retention_ms: 1_000 }));
    d.receive_from(ALICE, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 0)], &from("alice", 0));
    d.step(0).expect("step");
    let mut lsn = Lsn::new(2).expect("lsn");
    for t in (100..=5_000).step_by(100) {
        d.receive_from(
            ALICE,
            lsn,
            vec![mutation("INSERT INTO t VALUES (?1)", vec![t.into()], t)],
            &from("alice", t),
        );
        d.step(t).expect("step").expect("a step");
        lsn = lsn.next();
    }
    assert!(storage.range().first() > Lsn::FIRST, "the storage was trimmed");
    assert!(history.range().first() > Lsn::FIRST, "so was the history");
    let records = all(&mut d);
    let oldest = records.first().expect("records");
    assert!(oldest.storage_lsn >= storage.range().first(), "nothing listed of a trimmed step");
    assert!(oldest.applied_ms <= 5_000 - 1_000, "the retention window is kept: oldest {oldest:?}");
    let times: Vec<i64> = records.iter().map(|r| r.applied_ms).collect();
    let expected: Vec<i64> = (oldest.applied_ms..=5_000).step_by(100).collect();
    assert_eq!(times, expected, "every step since is listed");
}

/// A clock that steps back (or a cluster server whose clock is behind the last holder's) never
/// stamps a step earlier than the one before it, so `since` (a bisection on step times) finds
/// every step at or after it; reopening keeps the order too.
#[test]
fn step_times_never_go_back_so_since_finds_every_step() {
    let (storage, history) = (SharedJournal::new(31), SharedJournal::new(32));
    let mut d = open(&storage, &history);
    d.receive_from(ALICE, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 1)], &from("alice", 1));
    d.step(1_000).expect("step").expect("a step");
    let lsn = |n| Lsn::new(n).expect("lsn");
    d.receive_from(ALICE, lsn(2), vec![mutation("INSERT INTO t VALUES (1)", vec![], 2)], &from("alice", 2));
    d.step(500).expect("step").expect("a step (the clock stepped back)");
    drop(d);
    let mut d = open(&storage, &history);
    d.receive_from(ALICE, lsn(3), vec![mutation("INSERT INTO t VALUES (2)", vec![], 3)], &from("alice", 3));
    d.step(700).expect("step").expect("a step after a reopen, the clock still behind");
    let records = all(&mut d);
    let applied: Vec<i64> = records.iter().map(|r| r.applied_ms).collect();
    assert_eq!(applied, vec![1_000, 1_000, 1_000], "no step stamped before the one before it");
    let mut since = |ms| {
        let q = HistoryQuery { since_ms: Some(ms), ..HistoryQuery::default() };
        d.read_history(&q).expect("since").records.len()
    };
    assert_eq!(since(900), 3, "every step at or after 900");
    assert_eq!(since(1_001), 0);
}

/// Only a small step back is smoothed over (up to `MAX_CLOCK_AHEAD_MS`): an entry stamped far
/// ahead of the clock (a server with a wrong clock) does not pin every later step to its time.
#[test]
fn an_entry_stamped_far_ahead_does_not_pin_later_steps() {
    let (storage, history) = (SharedJournal::new(33), SharedJournal::new(34));
    let mut d = open(&storage, &history);
    let far = pagesync::server::MAX_CLOCK_AHEAD_MS + 1;
    d.receive_from(ALICE, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 1)], &from("alice", 1));
    d.step(1_000 + far).expect("step").expect("a step, stamped far ahead");
    let lsn = |n| Lsn::new(n).expect("lsn");
    d.receive_from(ALICE, lsn(2), vec![mutation("INSERT INTO t VALUES (1)", vec![], 2)], &from("alice", 2));
    d.step(1_000).expect("step").expect("a step by the right clock");
    let applied: Vec<i64> = all(&mut d).iter().map(|r| r.applied_ms).collect();
    assert_eq!(applied, vec![1_000 + far, 1_000]);
}

/// Written beside the storage entry (`write_history_beside`, on a journal that can take its
/// newest entry back): when the history append fails after the storage entry became durable,
/// the storage entry is taken back, on disk too, and the step fails as a whole; its retry
/// commits both, and the history lists it once.
#[test]
fn a_history_append_that_fails_beside_a_durable_storage_entry_takes_the_step_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = pagesync::journal::FileJournalOptions::default;
    let id = pagesync::journal::JournalId::from_u128(0x51);
    let storage = pagesync::journal::FileJournal::create(dir.path().join("s"), id, opts()).expect("storage");
    let mut d = ServerDocument::open(Box::new(storage)).expect("open");
    let history = SharedJournal::new(0x52);
    let h = history.clone();
    d.set_history(Box::new(move |_| Ok(Some(h.boxed()))));
    let marked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let marks = marked.clone();
    d.write_history_beside(Box::new(move |from| {
        marks.lock().expect("lock").push(from);
        Ok(())
    }));
    let tl = TimelineId([5; 16]);
    d.receive(tl, Lsn::FIRST, vec![mutation("CREATE TABLE t(x)", vec![], 10)]);
    while d.step(100).expect("step").is_some() {}
    let before = d.storage_range();
    assert_eq!(
        marked.lock().expect("lock").as_slice(),
        [before.last().expect("an entry")],
        "marked once, first"
    );
    history.disk_full.store(true, std::sync::atomic::Ordering::Relaxed);
    d.receive(tl, Lsn::new(2).expect("2"), vec![mutation("INSERT INTO t VALUES (1)", vec![], 20)]);
    assert!(d.step(200).is_err(), "the history append failed");
    assert_eq!(d.storage_range(), before, "the storage entry is taken back");
    let on_disk = pagesync::journal::FileJournal::open(dir.path().join("s"), opts()).expect("reopen");
    assert_eq!(on_disk.range(), before, "on disk too");
    history.disk_full.store(false, std::sync::atomic::Ordering::Relaxed);
    while d.step(300).expect("step").is_some() {}
    let n: i64 = d.database().conn().query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
    assert_eq!(n, 1);
    assert_eq!(keys(&all(&mut d)), [(tl, 1), (tl, 2)]);
    assert_eq!(marked.lock().expect("lock").len(), 1, "marked once");
}
