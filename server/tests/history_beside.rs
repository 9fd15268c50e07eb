//! On a `file://` store a step writes its history entry beside its storage entry, the two
//! barriers at once. A power cut between them can leave the storage entry durable and the
//! history entry lost: that step was never acknowledged (both come first), so opening the
//! document again takes it back, and its client's resend applies it once, with its history.
//! A storage entry the mark does not cover (history off when it was written, an offline
//! restore) is never taken back.

use pagesync::history::HistoryQuery;
use pagesync::journal::{FileJournal, FileJournalOptions, Journal, Lsn};
use pagesync::{DocId, Mutation, ServerDocument, SqlMutation, SqlReducer, StepLimits, TimelineId};
use pagesync_server::{Store, history_dir};

const DOC: DocId = DocId([0x4b; 16]);
const TIMELINE: TimelineId = TimelineId([7; 16]);
const T0: i64 = 1_700_000_000_000;

/// The document as the server opens it: its storage taken back first if it must be, the
/// history written beside the storage.
fn open(store: &Store) -> (ServerDocument, Option<Lsn>) {
    let mut storage = store.open_journal(DOC).expect("storage");
    let (taken_back, history_opened) = store.take_back_unpaired_step(DOC, &mut *storage).expect("recovery");
    let mut d =
        ServerDocument::with_reducer(storage, SqlReducer::default(), StepLimits::default()).expect("open");
    let (history, marks) = (store.clone(), store.clone());
    d.set_history(Box::new(move |create| {
        if !create && !history.history_exists(DOC)? {
            return Ok(None);
        }
        Ok(Some(history.open_history(DOC)?))
    }));
    d.write_history_beside(Box::new(move |from| marks.mark_paired(DOC, from)));
    if let Some(history) = history_opened {
        d.set_history_journal(history);
    }
    (d, taken_back)
}

fn write(d: &mut ServerDocument, lsn: u64, sql: &str) {
    let body = SqlMutation::one(sql, vec![]).encode();
    let m = Mutation { client_time_ms: T0, seed: lsn, body }.encode().expect("encode");
    d.receive(TIMELINE, Lsn::new(lsn).expect("lsn"), vec![m]);
    while d.step(T0 + lsn as i64).expect("step").is_some() {}
}

fn rows(d: &ServerDocument) -> Vec<String> {
    let conn = d.database().conn();
    let mut stmt = conn.prepare("SELECT v FROM t ORDER BY rowid").expect("prepare");
    stmt.query_map([], |r| r.get(0)).expect("query").collect::<Result<_, _>>().expect("rows")
}

/// The history as a reader lists it: each mutation's timeline LSN.
fn listed(d: &mut ServerDocument) -> Vec<u64> {
    let page = d.read_history(&HistoryQuery::default()).expect("history");
    page.records.iter().map(|r| r.timeline_lsn.get()).collect()
}

/// The history journal loses its newest entry, as a power cut between the two barriers can
/// leave it.
fn lose_newest_history_entry(root: &std::path::Path) {
    let mut h = FileJournal::open(history_dir(root, DOC), FileJournalOptions::default()).expect("history");
    h.remove_last().expect("remove");
}

#[test]
fn a_step_durable_without_its_history_is_taken_back_and_applied_again_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::Files(dir.path().to_path_buf());
    let (mut d, taken_back) = open(&store);
    assert_eq!(taken_back, None);
    write(&mut d, 1, "CREATE TABLE t(v TEXT)");
    write(&mut d, 2, "INSERT INTO t VALUES ('acknowledged')");
    write(&mut d, 3, "INSERT INTO t VALUES ('in flight')");
    let newest = d.storage_range().last().expect("entries");
    assert!(store.paired_from(DOC).expect("mark").is_some_and(|p| p <= newest));
    drop(d);
    lose_newest_history_entry(dir.path());

    let (mut d, taken_back) = open(&store);
    assert_eq!(taken_back, Some(newest), "the step without its history is taken back");
    assert_eq!(d.storage_range().last(), newest.prev());
    assert_eq!(rows(&d), ["acknowledged"]);
    assert_eq!(d.next_expected(TIMELINE), Lsn::new(3).expect("3"), "the client's resend is taken");
    write(&mut d, 3, "INSERT INTO t VALUES ('in flight')");
    assert_eq!(rows(&d), ["acknowledged", "in flight"]);
    assert_eq!(listed(&mut d), [1, 2, 3], "listed once each, the resent one with its history");
    drop(d);
    // Opened again: nothing more is taken back.
    let (d, taken_back) = open(&store);
    assert_eq!(taken_back, None);
    assert_eq!(rows(&d), ["acknowledged", "in flight"]);
}

/// Only what the mark covers: a step written without history (`--history off` forgets the
/// mark first) or before the mark was put down stays, whatever the history holds.
#[test]
fn a_step_the_mark_does_not_cover_is_never_taken_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::Files(dir.path().to_path_buf());
    let (mut d, _) = open(&store);
    write(&mut d, 1, "CREATE TABLE t(v TEXT)");
    write(&mut d, 2, "INSERT INTO t VALUES ('kept')");
    let newest = d.storage_range().last().expect("entries");
    drop(d);
    lose_newest_history_entry(dir.path());
    // A server without history forgot the mark before writing.
    store.forget_pairing(DOC).expect("forget");
    let mut storage = store.open_journal(DOC).expect("storage");
    assert_eq!(store.take_back_unpaired_step(DOC, &mut *storage).expect("recovery").0, None);
    assert_eq!(storage.range().last(), Some(newest));
    drop(storage);
    // A mark put down after the entry (a server with history again) does not reach back.
    store.mark_paired(DOC, newest.next()).expect("mark");
    let (d, taken_back) = open(&store);
    assert_eq!(taken_back, None);
    assert_eq!(rows(&d), ["kept"]);
}

/// A binary that knows no mark (or a copy of the files taken while the server wrote) can leave
/// several steps without history under it: only the step whose predecessor has its history
/// entry is the protocol's to take back, so these are all kept, at every open.
#[test]
fn steps_written_without_history_under_the_mark_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::Files(dir.path().to_path_buf());
    let (mut d, _) = open(&store);
    write(&mut d, 1, "CREATE TABLE t(v TEXT)");
    drop(d);
    // As an older binary with `--history off` would: steps, no history, the mark left alone.
    let storage = store.open_journal(DOC).expect("storage");
    let mut old =
        ServerDocument::with_reducer(storage, SqlReducer::default(), StepLimits::default()).expect("old");
    write(&mut old, 2, "INSERT INTO t VALUES ('a')");
    write(&mut old, 3, "INSERT INTO t VALUES ('b')");
    drop(old);
    for _ in 0..2 {
        let (d, taken_back) = open(&store);
        assert_eq!(taken_back, None);
        assert_eq!(rows(&d), ["a", "b"]);
    }
    // Nor without any history journal at all, past the first step under the mark.
    std::fs::remove_dir_all(history_dir(dir.path(), DOC)).expect("remove the history");
    let (d, taken_back) = open(&store);
    assert_eq!(taken_back, None);
    assert_eq!(rows(&d), ["a", "b"]);
}
