//! Checkpoints, trimming and restarts at the page-store and document level: a checkpoint
//! switches pages atomically at its last part, one cut short changes nothing, a replica
//! restarted at a checkpoint has no state until it is complete (also across a reopen), a
//! journal that starts anywhere else is refused, and retention trims only what is old enough.

use pagesync::journal::{Journal, JournalId, Lsn, MemoryJournal};
use pagesync::page::{PAGE_SIZE, Page, PageIdx};
use pagesync::storage::{self, Part};
use pagesync::store::{PageStore, StoreError};
use pagesync::{Compaction, ServerDocument};
use pagesync_tests::{SharedJournal, drain, sql};

fn lsn(n: u64) -> Lsn {
    Lsn::new(n).expect("lsn")
}

fn page(fill: u8) -> Page {
    [fill; PAGE_SIZE]
}

/// A storage entry of `page_count` pages holding `pages` (index, fill byte).
fn entry(page_count: u32, part: Option<(u32, u32)>, pages: &[(u32, u8)]) -> Vec<u8> {
    let bodies: Vec<(PageIdx, Page)> =
        pages.iter().map(|(i, f)| (PageIdx::new(*i).expect("idx"), page(*f))).collect();
    let refs: Vec<(PageIdx, &Page)> = bodies.iter().map(|(i, p)| (*i, p)).collect();
    let part = part.map(|(index, count)| Part { index, count });
    storage::encode(page_count, 0, part, &[], &[], &refs)
}

fn read_fill(store: &mut PageStore, idx: u32) -> u8 {
    let mut buf = vec![0u8; PAGE_SIZE];
    store.read(u64::from(idx - 1) * PAGE_SIZE as u64, &mut buf).expect("read");
    buf[100]
}

fn apply(store: &mut PageStore, first: u64, payload: Vec<u8>) -> Result<(), StoreError> {
    let header = storage::decode(&payload).expect("decode");
    store.apply_remote_batch(lsn(first), vec![(header, payload)])
}

#[test]
fn a_checkpoints_pages_switch_at_its_last_part() {
    let mut store = PageStore::open(Box::new(MemoryJournal::new(JournalId::from_u128(1)))).expect("open");
    apply(&mut store, 1, entry(2, None, &[(1, 0xa), (2, 0xb)])).expect("step");
    // A restore written as a checkpoint: part 1 of 2 changes page 1, part 2 page 2.
    apply(&mut store, 2, entry(2, Some((1, 2)), &[(1, 0xc)])).expect("part 1");
    assert_eq!((read_fill(&mut store, 1), read_fill(&mut store, 2)), (0xa, 0xb), "nothing yet");
    apply(&mut store, 3, entry(2, Some((2, 2)), &[(2, 0xd)])).expect("part 2");
    assert_eq!((read_fill(&mut store, 1), read_fill(&mut store, 2)), (0xc, 0xd), "both at once");
    let cp = *store.checkpoints().last().expect("a complete checkpoint");
    assert_eq!((cp.first, cp.last), (lsn(2), lsn(3)));
    store.trim_to(cp).expect("trim");
    assert_eq!(store.journal().range().first(), lsn(2));
    assert_eq!((read_fill(&mut store, 1), read_fill(&mut store, 2)), (0xc, 0xd), "trimming changes nothing");
}

#[test]
fn a_checkpoint_cut_short_changes_nothing_and_the_next_starts_over() {
    let shared = SharedJournal::new(2);
    let mut store = PageStore::open(shared.boxed()).expect("open");
    apply(&mut store, 1, entry(2, None, &[(1, 0xa), (2, 0xb)])).expect("step");
    apply(&mut store, 2, entry(2, Some((1, 2)), &[(1, 0xc)])).expect("part 1 of 2, then a crash");
    apply(&mut store, 3, entry(2, None, &[(2, 0xe)])).expect("the next step");
    assert_eq!((read_fill(&mut store, 1), read_fill(&mut store, 2)), (0xa, 0xe));
    assert!(store.checkpoints().is_empty());
    let mut reopened = PageStore::open(shared.boxed()).expect("reopen");
    assert_eq!((read_fill(&mut reopened, 1), read_fill(&mut reopened, 2)), (0xa, 0xe));
    // The restarted server begins a new checkpoint at part 1: the old parts are forgotten.
    apply(&mut reopened, 4, entry(2, Some((1, 2)), &[(1, 0xa)])).expect("a new part 1");
    apply(&mut reopened, 5, entry(2, Some((2, 2)), &[(2, 0xe)])).expect("its part 2");
    let cp = *reopened.checkpoints().last().expect("complete");
    assert_eq!((cp.first, cp.last), (lsn(4), lsn(5)));
    assert_eq!((read_fill(&mut reopened, 1), read_fill(&mut reopened, 2)), (0xa, 0xe));
}

#[test]
fn steps_between_the_parts_of_a_checkpoint_win_over_its_older_pages() {
    // Part 1 holds pages 1-2 as of LSN 2; a step then changes page 1 and grows the file; part
    // 2 holds page 3 as of LSN 4; a step shrinks the file to 3 pages... as the server writes
    // a large checkpoint a few parts per step.
    let entries = [
        entry(3, None, &[(1, 0x1), (2, 0x2), (3, 0x3)]),
        entry(3, Some((1, 2)), &[(1, 0x1), (2, 0x2)]),
        entry(4, None, &[(1, 0x11), (4, 0x4)]),
        entry(4, Some((2, 2)), &[(3, 0x3)]),
    ];
    let want = [0x11, 0x2, 0x3, 0x4];
    let shared = SharedJournal::new(6);
    let mut store = PageStore::open(shared.boxed()).expect("open");
    for (i, e) in entries.iter().enumerate() {
        apply(&mut store, i as u64 + 1, e.clone()).expect("apply");
    }
    let fills = |s: &mut PageStore| (1..=4).map(|i| read_fill(s, i)).collect::<Vec<u8>>();
    assert_eq!(fills(&mut store), want, "a replica with the history");
    let cp = *store.checkpoints().last().expect("complete");
    assert_eq!((cp.first, cp.last), (lsn(2), lsn(4)));
    // The journal trimmed to the checkpoint, reopened: the same state from its entries alone.
    store.trim_to(cp).expect("trim");
    let mut reopened = PageStore::open(shared.boxed()).expect("reopen");
    assert_eq!(fills(&mut reopened), want, "reopened from the checkpoint and the step inside it");
    // A new replica restarted at the checkpoint gets the step between the parts too.
    let mut fresh = PageStore::open(Box::new(MemoryJournal::new(JournalId::from_u128(7)))).expect("open");
    apply(&mut fresh, 1, entry(1, None, &[(1, 0x9)])).expect("older history");
    for (i, e) in entries.iter().enumerate().skip(1) {
        let lsn = i as u64 + 1 + 40;
        apply(&mut fresh, lsn, e.clone()).expect("restart and follow");
        assert_eq!(fresh.is_restarting(), i < 3, "restarting until the last part ({i})");
    }
    assert_eq!(fills(&mut fresh), want, "restarted at the checkpoint");
}

#[test]
fn a_replica_restarted_at_a_checkpoint_has_no_state_until_its_last_part() {
    let shared = SharedJournal::new(3);
    let mut store = PageStore::open(shared.boxed()).expect("open");
    apply(&mut store, 1, entry(1, None, &[(1, 0xa)])).expect("step");
    let err = apply(&mut store, 50, entry(2, None, &[(1, 0xb)])).expect_err("a step past the end is a gap");
    assert!(matches!(err, StoreError::OutOfOrder { .. }), "{err}");
    apply(&mut store, 50, entry(2, Some((1, 2)), &[(1, 0xc)])).expect("restart at 50");
    assert!(store.is_restarting());
    assert_eq!(store.journal().range(), pagesync::journal::LsnRange::inclusive(lsn(50), lsn(50)));
    // A crash here: the reopened replica is still waiting.
    let mut store = PageStore::open(shared.boxed()).expect("reopen mid-restart");
    assert!(store.is_restarting());
    assert_eq!(store.page_count(), 0);
    apply(&mut store, 51, entry(2, Some((2, 2)), &[(2, 0xd)])).expect("part 2");
    assert!(!store.is_restarting());
    assert_eq!((read_fill(&mut store, 1), read_fill(&mut store, 2)), (0xc, 0xd));
}

#[test]
fn a_journal_that_starts_without_a_checkpoint_is_refused() {
    let mut j = MemoryJournal::new(JournalId::from_u128(4));
    for _ in 0..3 {
        j.append(&entry(1, None, &[(1, 0xa)])).expect("append");
    }
    j.remove_prefix(lsn(1)).expect("trim");
    let err = PageStore::open(Box::new(j)).expect_err("history missing");
    assert!(matches!(err, StoreError::NoBase { first } if first == lsn(2)), "{err}");
    assert!(err.to_string().contains("not the first part of a checkpoint"), "{err}");
}

#[test]
fn retention_trims_only_to_checkpoints_older_than_the_window() {
    let journal = SharedJournal::new(5);
    let mut doc = ServerDocument::open(journal.boxed()).expect("open");
    doc.set_compaction(Some(Compaction { checkpoint_after_bytes: 0, retention_ms: 10_000 }));
    let tl = pagesync::TimelineId([7; 16]);
    let mut n = 0u64;
    let mut step_at = |doc: &mut ServerDocument, t: i64| {
        n += 1;
        let m = pagesync::Mutation {
            client_time_ms: t,
            seed: n,
            body: sql("CREATE TABLE IF NOT EXISTS t(x); INSERT INTO t VALUES (1)", vec![]),
        };
        doc.receive(tl, lsn(n), vec![m.encode().expect("encode")]);
        drain(doc, t);
    };
    // A step checkpoints first once the history since the last checkpoint outgrows the
    // document (the byte threshold is 0). None is 10 s old yet.
    for t in [0, 1_000, 2_000, 3_000, 4_000] {
        step_at(&mut doc, t);
    }
    let written = doc.database().store().checkpoints().to_vec();
    assert!(written.len() >= 2, "checkpoints were written: {written:?}");
    assert_eq!(doc.storage_range().first(), lsn(1), "nothing is 10 s old yet");
    step_at(&mut doc, 12_500);
    // Trimmed to the newest checkpoint written at or before 2,500 ms.
    let expected = written.iter().rev().find(|c| c.time_ms <= 2_500).expect("an old checkpoint");
    let first = doc.storage_range().first();
    assert_eq!(first, expected.first);
    let header = storage::decode(&journal.read(first).expect("read")).expect("decode");
    assert_eq!((header.checkpoint.map(|p| p.index), header.time_ms), (Some(1), expected.time_ms));
    assert!(doc.database().store().checkpoints().iter().all(|c| c.first >= first));
    let count: i64 =
        doc.database().conn().query_row("SELECT count(*) FROM t", [], |r| r.get(0)).expect("count");
    assert_eq!(count, 6, "trimming kept the state");
    let reopened = ServerDocument::open(journal.boxed()).expect("reopen from the checkpoint");
    assert_eq!(pagesync_tests::pages_of(reopened.database()), pagesync_tests::pages_of(doc.database()));
}

#[test]
fn a_part_does_not_bring_back_a_page_a_later_step_cut_off() {
    let mut store = PageStore::open(Box::new(MemoryJournal::new(JournalId::from_u128(11)))).expect("open");
    let entries = [
        entry(2, None, &[(1, 0xa), (2, 0xb)]),
        entry(2, Some((1, 2)), &[(1, 0xa), (2, 0xb)]),
        // The file is cut to one page, then grows to three without writing page 2 again.
        entry(1, None, &[(1, 0xc)]),
        entry(3, None, &[(3, 0xd)]),
        entry(3, Some((2, 2)), &[(3, 0xd)]),
    ];
    for (i, e) in entries.iter().enumerate() {
        apply(&mut store, i as u64 + 1, e.clone()).expect("apply");
    }
    assert!(!store.checkpoints().is_empty(), "complete");
    let fills: Vec<u8> = (1..=3).map(|i| read_fill(&mut store, i)).collect();
    assert_eq!(fills, [0xc, 0x0, 0xd], "page 2 stays as the cut left it");
}

#[test]
fn a_large_checkpoint_is_spread_over_steps_that_keep_applying_writes() {
    let journal = SharedJournal::new(8);
    let mut doc = ServerDocument::open(journal.boxed()).expect("open");
    let tl = pagesync::TimelineId([8; 16]);
    let mut n = 0u64;
    let mut send = |doc: &mut ServerDocument, body: Vec<u8>| {
        n += 1;
        let m = pagesync::Mutation { client_time_ms: 0, seed: n, body };
        doc.receive(tl, lsn(n), vec![m.encode().expect("encode")]);
    };
    send(&mut doc, sql("CREATE TABLE big(x BLOB); CREATE TABLE small(i INTEGER)", vec![]));
    drain(&mut doc, 0);
    // About 20 MiB: more than one step's worth of checkpoint parts.
    for _ in 0..5 {
        let fill = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 1000) \
                    INSERT INTO big SELECT printf('%.4000c', char(65 + i % 26)) FROM s";
        send(&mut doc, sql(fill, vec![]));
        drain(&mut doc, 0);
    }
    let parts = pagesync::store::checkpoint_part_count(doc.database().store().page_count());
    assert!(parts > pagesync::CHECKPOINT_PARTS_PER_STEP, "{parts} parts");
    doc.set_compaction(Some(Compaction { checkpoint_after_bytes: 0, retention_ms: i64::MAX }));
    // Each step writes a few parts and still applies its write.
    let mut steps = 0;
    while doc.database().store().checkpoints().is_empty() {
        send(&mut doc, sql("INSERT INTO small VALUES (1)", vec![]));
        let outcome = doc.step(1_000).expect("step").expect("a write was queued");
        assert_eq!((outcome.applied, outcome.rejected), (1, 0), "step {steps}");
        steps += 1;
        assert!(steps <= parts, "the checkpoint never completed");
    }
    assert_eq!(steps, parts.div_ceil(pagesync::CHECKPOINT_PARTS_PER_STEP), "parts per step");
    let cp = *doc.database().store().checkpoints().last().expect("complete");
    let between = (cp.first.get()..=cp.last.get())
        .filter(|l| {
            storage::decode(&journal.read(lsn(*l)).expect("read")).expect("decode").checkpoint.is_none()
        })
        .count();
    assert_eq!(between as u32, steps - 1, "the steps between the parts");

    // A new replica starts at the checkpoint and ends byte-identical to the server.
    let mut fresh =
        pagesync::ClientDocument::open(pagesync_tests::memory_journal(9), pagesync_tests::memory_journal(10))
            .expect("client");
    let tail = doc.storage_range().intersect(&pagesync::journal::LsnRange::inclusive(
        cp.first,
        doc.storage_range().last().expect("entries"),
    ));
    fresh.receive_storage(tail.first(), &doc.read_storage(tail).expect("read")).expect("restart");
    assert_eq!(pagesync_tests::pages_of(fresh.database()), pagesync_tests::pages_of(doc.database()));
    let count: i64 =
        fresh.database().conn().query_row("SELECT count(*) FROM small", [], |r| r.get(0)).expect("count");
    assert_eq!(count, i64::from(steps));
    // So does the server reopened from its journal.
    let reopened = ServerDocument::open(journal.boxed()).expect("reopen");
    assert_eq!(pagesync_tests::pages_of(reopened.database()), pagesync_tests::pages_of(doc.database()));
}

/// A replica's sequential reads take pages that lie side by side in one entry together: each
/// read still returns its own page, pages in other entries or newer ones are never served
/// from the run, and a run read before a new entry is not used after it.
#[test]
fn sequential_reads_ahead_return_exactly_the_committed_pages() {
    let mut store = PageStore::open(Box::new(MemoryJournal::new(JournalId::from_u128(40)))).expect("open");
    store.set_read_ahead(true);
    // Pages 1..=40 in one entry (fill = page number), then page 7 rewritten by a second.
    let all: Vec<(u32, u8)> = (1..=40).map(|i| (i, i as u8)).collect();
    apply(&mut store, 1, entry(40, None, &all)).expect("first");
    apply(&mut store, 2, entry(40, None, &[(7, 200)])).expect("second");
    let expect = |i: u32| if i == 7 { 200 } else { i as u8 };
    for i in 1..=40 {
        assert_eq!(read_fill(&mut store, i), expect(i), "page {i}, scanning");
    }
    // A run taken at page 21 (through 36), then a new entry rewrites page 25 and adds 41.
    for i in 20..=22 {
        assert_eq!(read_fill(&mut store, i), expect(i));
    }
    apply(&mut store, 3, entry(41, None, &[(25, 250), (41, 41)])).expect("third");
    for i in 23..=41 {
        let want = match i {
            25 => 250,
            i => expect(i),
        };
        assert_eq!(read_fill(&mut store, i), want, "page {i}, after the third entry");
    }
    // Backwards and at random, alike.
    for i in (1..=41).rev() {
        assert_eq!(
            read_fill(&mut store, i),
            match i {
                25 => 250,
                i => expect(i),
            }
        );
    }
}
