//! Crash and corruption tests of the file journal: torn tails cut at every byte, bit flips
//! anywhere, interrupted segment rolls and prefix removals, foreign directories.

use std::fs;
use std::path::{Path, PathBuf};

use pagesync_journal::file::SEGMENT_HEADER_BYTES;
use pagesync_journal::{
    DetachedSync, FileJournal, FileJournalOptions, Journal, JournalError, JournalId, Lsn, LsnRange,
};
use pagesync_tests::segment_files as segments;

const ID: JournalId = JournalId::from_bytes([0xab; 16]);
const ENTRIES: u64 = 30;

fn opts() -> FileJournalOptions {
    FileJournalOptions { max_segment_bytes: 512, ..FileJournalOptions::default() }
}

fn lsn(n: u64) -> Lsn {
    Lsn::new(n).expect("non-zero")
}

fn small_payload(n: u64) -> Vec<u8> {
    (0..(n * 13 % 90 + 1)).map(|i| (i * 31 + n) as u8).collect()
}

/// A journal of `ENTRIES` small entries over several segments. Returns the directory, the
/// last segment's path and that segment's length before the final append.
fn build(root: &Path) -> (PathBuf, PathBuf, u64) {
    let dir = root.join("j");
    let mut j = FileJournal::create(&dir, ID, opts()).expect("create");
    for n in 1..ENTRIES {
        j.append(&small_payload(n)).expect("append");
    }
    let (count, len) = last_segment(&dir);
    j.append(&small_payload(ENTRIES)).expect("append");
    // The final entry starts where the last segment ended, or after the header of a new one.
    let start = if last_segment(&dir).0 == count { len } else { SEGMENT_HEADER_BYTES as u64 };
    (dir.clone(), segments(&dir).pop().expect("a segment"), start)
}

/// The number of segments and the length of the last one.
fn last_segment(dir: &Path) -> (usize, u64) {
    let segs = segments(dir);
    let len = segs.last().map_or(0, |p| fs::metadata(p).expect("stat").len());
    (segs.len(), len)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn assert_prefix(j: &FileJournal, last: u64) {
    assert_eq!(j.range(), LsnRange::inclusive(lsn(1), lsn(last)));
    for n in 1..=last {
        assert_eq!(j.read(lsn(n)).expect("read"), small_payload(n), "entry {n}");
    }
}

#[test]
fn torn_final_entry_is_truncated_at_every_byte_offset() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, last_seg, start) = build(root.path());
    let full = fs::metadata(&last_seg).expect("stat").len();
    assert!(segments(&dir).len() > 2, "the test needs several segments");
    let frame = pagesync_journal::codec::frame_len(small_payload(ENTRIES).len());
    assert_eq!(full - start, frame as u64, "the cut range is exactly the final frame");
    for cut in start..full {
        let case = root.path().join(format!("cut{cut}"));
        copy_dir(&dir, &case);
        let seg = case.join(last_seg.file_name().expect("name"));
        fs::OpenOptions::new().write(true).open(&seg).expect("open").set_len(cut).expect("cut");
        let mut j = FileJournal::open(&case, opts()).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_prefix(&j, ENTRIES - 1);
        // The journal is writable again, at the LSN the torn entry had.
        assert_eq!(j.append(b"again").expect("append"), lsn(ENTRIES));
        drop(j);
        let j = FileJournal::open(&case, opts()).expect("reopen");
        assert_eq!(j.read(lsn(ENTRIES)).expect("read"), b"again");
        fs::remove_dir_all(&case).expect("cleanup");
    }
}

#[test]
fn bit_flips_anywhere_give_an_error_or_a_clean_tail_truncation() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _, _) = build(root.path());
    let mut files: Vec<PathBuf> = segments(&dir);
    files.push(dir.join("JOURNAL"));
    let (mut errors, mut truncations, mut cases) = (0, 0, 0);
    for file in &files {
        let len = fs::metadata(file).expect("stat").len() as usize;
        for pos in 0..len {
            cases += 1;
            let case = root.path().join("flip");
            copy_dir(&dir, &case);
            let target = case.join(file.file_name().expect("name"));
            let mut bytes = fs::read(&target).expect("read");
            bytes[pos] ^= 1 << (pos % 8);
            fs::write(&target, &bytes).expect("write");
            match FileJournal::open(&case, opts()) {
                Err(_) => errors += 1,
                Ok(j) => {
                    let last = j.range().last().expect("non-empty").get();
                    assert!(
                        last >= ENTRIES - 1,
                        "flip at {}:{pos} lost acknowledged entries",
                        file.display()
                    );
                    if last < ENTRIES {
                        truncations += 1;
                    }
                    for n in 1..=last {
                        if let Ok(got) = j.read(lsn(n)) {
                            assert_eq!(
                                got,
                                small_payload(n),
                                "flip at {}:{pos} gave wrong data",
                                file.display()
                            );
                        }
                    }
                }
            }
            fs::remove_dir_all(&case).expect("cleanup");
        }
    }
    // Every flip lands in checksummed bytes, so none may go unnoticed.
    assert_eq!(errors + truncations, cases, "some flips were silently accepted");
    assert!(truncations > 0 && errors > 0);
}

#[test]
fn corruption_in_the_middle_names_journal_segment_and_lsn() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _, _) = build(root.path());
    let first = segments(&dir).remove(0);
    let mut bytes = fs::read(&first).expect("read");
    // Segment header, frame 1, frame 2 header, then 1 byte into entry 2 payload.
    let frame = pagesync_journal::codec::FRAME_HEADER_BYTES;
    let pos = 40 + frame + small_payload(1).len() + frame + 1;
    bytes[pos] ^= 0x10;
    fs::write(&first, &bytes).expect("write");
    let err = FileJournal::open(&dir, opts()).expect_err("corruption must be reported");
    match &err {
        JournalError::Corrupt { journal, location, lsn: at, .. } => {
            assert_eq!(*journal, ID);
            assert_eq!(*at, lsn(2));
            assert!(location.ends_with("00000000000000000001.seg"), "{location}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&ID.to_string()) && text.contains("LSN 2"), "{text}");
}

#[test]
fn torn_segment_roll_is_discarded() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _, _) = build(root.path());
    let torn = dir.join(format!("{:020}.seg", ENTRIES + 1));
    fs::write(&torn, b"PGSJSEG").expect("write partial header");
    let mut j = FileJournal::open(&dir, opts()).expect("open");
    assert_prefix(&j, ENTRIES);
    assert!(!torn.exists(), "the torn segment is removed");
    assert_eq!(j.append(b"next").expect("append"), lsn(ENTRIES + 1));
}

#[test]
fn interrupted_prefix_removal_finishes_on_open() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _, _) = build(root.path());
    let backup = root.path().join("backup");
    copy_dir(&dir, &backup);
    let mut j = FileJournal::open(&dir, opts()).expect("open");
    j.remove_prefix(lsn(20)).expect("remove_prefix");
    let removed: Vec<PathBuf> =
        segments(&backup).into_iter().filter(|p| !dir.join(p.file_name().expect("name")).exists()).collect();
    assert!(!removed.is_empty(), "whole segments were deleted");
    drop(j);
    // Crash between writing the trim point and deleting the segments: they come back.
    for p in &removed {
        fs::copy(p, dir.join(p.file_name().expect("name"))).expect("restore");
    }
    let j = FileJournal::open(&dir, opts()).expect("open");
    assert_eq!(j.range(), LsnRange::inclusive(lsn(21), lsn(ENTRIES)));
    assert!(matches!(j.read(lsn(20)), Err(JournalError::OutOfRange { .. })));
    assert_eq!(j.read(lsn(21)).expect("read"), small_payload(21));
    assert!(removed.iter().all(|p| !dir.join(p.file_name().expect("name")).exists()));
}

#[test]
fn missing_and_foreign_directories_are_clear_errors() {
    let root = tempfile::tempdir().expect("tempdir");
    let missing = FileJournal::open(root.path().join("nope"), opts()).expect_err("missing");
    assert!(matches!(missing, JournalError::Missing { .. }), "{missing}");
    assert!(missing.to_string().contains("does not exist"));

    let foreign = root.path().join("foreign");
    fs::create_dir(&foreign).expect("mkdir");
    fs::write(foreign.join("notes.txt"), b"hello").expect("write");
    let err = FileJournal::open(&foreign, opts()).expect_err("foreign");
    assert!(matches!(err, JournalError::Foreign { .. }), "{err}");
    let err = FileJournal::create(&foreign, ID, opts()).expect_err("not empty");
    assert!(matches!(err, JournalError::Foreign { .. }), "{err}");

    let (dir, _, _) = build(root.path());
    let other = JournalId::from_bytes([1; 16]);
    let err = FileJournal::open_or_create(&dir, other, opts()).expect_err("other journal");
    assert!(err.to_string().contains(&ID.to_string()), "{err}");
    fs::write(dir.join("stray.bin"), b"x").expect("write");
    let err = FileJournal::open(&dir, opts()).expect_err("stray file");
    assert!(err.to_string().contains("stray.bin"), "{err}");
}

/// A crash during a journal's creation, before its marker's rename, leaves the directory
/// holding only `JOURNAL.tmp` (whole or torn): no journal was made, so creating it again (or
/// `open_or_create`, as a replica and a server's document do) makes it, where it was refused
/// as foreign for good (a SIGKILL at that moment broke one new replica in four, and a server's
/// new document with a pending write for ever).
#[test]
fn a_creation_cut_short_is_made_again() {
    let root = tempfile::tempdir().expect("tempdir");
    for (i, leftover) in [&b""[..], b"PAGESYNC-JOUR", &[0xaa; 52]].into_iter().enumerate() {
        let dir = root.path().join(format!("cut-{i}"));
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join("JOURNAL.tmp"), leftover).expect("write");
        let mut j = if i == 0 {
            FileJournal::create(&dir, ID, opts()).expect("created over the leftover")
        } else {
            FileJournal::open_or_create(&dir, ID, opts()).expect("created over the leftover")
        };
        j.append(b"after").expect("append");
        drop(j);
        let j = FileJournal::open(&dir, opts()).expect("open");
        assert_eq!(j.read(lsn(1)).expect("read"), b"after");
        assert!(!dir.join("JOURNAL.tmp").exists());
    }
    // Anything else in the directory is still someone else's.
    let dir = root.path().join("other");
    fs::create_dir(&dir).expect("mkdir");
    fs::write(dir.join("JOURNAL.tmp"), b"").expect("write");
    fs::write(dir.join("notes.txt"), b"hello").expect("write");
    let err = FileJournal::create(&dir, ID, opts()).expect_err("not empty");
    assert!(matches!(err, JournalError::Foreign { .. }), "{err}");
}

#[test]
fn missing_middle_segments_are_reported() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, _, _) = build(root.path());
    let segs = segments(&dir);
    fs::remove_file(&segs[1]).expect("remove");
    let err = FileJournal::open(&dir, opts()).expect_err("gap");
    assert!(matches!(err, JournalError::CorruptSegment { .. }), "{err}");
    fs::remove_file(&segs[0]).expect("remove");
    let err = FileJournal::open(&dir, opts()).expect_err("missing head");
    assert!(err.to_string().contains("missing"), "{err}");
}

/// `remove_last` takes the newest entry back durably, wherever it sits: in the middle of a
/// segment, or alone in a segment its append rolled to (which goes with it). A reopen finds
/// the journal one shorter, and the next append takes the removed entry's LSN.
#[test]
fn the_newest_entry_can_be_taken_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("j");
    let mut j = FileJournal::create(&dir, ID, opts()).expect("create");
    assert!(j.can_remove_last());
    let mut rolled_and_cut = false;
    for n in 1..=ENTRIES {
        let before = segments(&dir).len();
        j.append(&small_payload(n)).expect("append");
        let rolled = segments(&dir).len() > before;
        j.remove_last().expect("remove the newest");
        // (The first segment stays, empty: the next append writes there.)
        assert_eq!(segments(&dir).len(), before.max(1), "entry {n}: a segment left with no frame goes");
        rolled_and_cut |= rolled && before > 0;
        let held = |j: &FileJournal| match n - 1 {
            0 => assert_eq!(j.range().last(), None),
            last => assert_prefix(j, last),
        };
        held(&j);
        drop(j);
        j = FileJournal::open(&dir, opts()).expect("reopen");
        assert!(j.repairs().is_empty(), "entry {n}: {:?}", j.repairs());
        held(&j);
        j.append(&small_payload(n)).expect("append again");
        assert_prefix(&j, n);
    }
    assert!(rolled_and_cut, "no append rolled to a new segment");
    drop(j);
    assert_prefix(&FileJournal::open(&dir, opts()).expect("reopen"), ENTRIES);
}

/// Runs a barrier from `detach_sync` and hands it back, successful.
fn run_barrier(j: &mut FileJournal, sync: DetachedSync) {
    sync.run().expect("fsync");
    j.finish_detached_sync(sync, Ok(())).expect("finish");
}

/// A barrier run away from the journal (`detach_sync`): it covers what was appended before
/// it was taken, not what came after; a `sync`, a roll or a cut meanwhile leaves it nothing
/// to record; and a failed one acts as a failed `sync` (whatever came meanwhile): the journal
/// keeps only what an fsync confirmed, refuses writes, and a reopen finds just that. A failed
/// barrier of an earlier opening is said, not kept quiet.
#[test]
fn a_detached_sync_covers_what_came_before_it_and_a_failed_one_keeps_only_what_is_on_disk() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("j");
    let big = FileJournalOptions { max_segment_bytes: 1 << 20, ..FileJournalOptions::default() };
    let mut j = FileJournal::create(&dir, ID, big.clone()).expect("create");
    assert!(j.detach_sync().expect("detach").is_none(), "nothing waits");
    j.append(&small_payload(1)).expect("durable append");
    j.append_batch_unsynced(&[&small_payload(2)]).expect("append");
    let first = j.detach_sync().expect("detach").expect("entry 2 waits");
    run_barrier(&mut j, first);
    assert!(j.is_synced(), "the barrier covered entry 2");

    j.append_batch_unsynced(&[&small_payload(3)]).expect("append");
    let second = j.detach_sync().expect("detach").expect("entry 3 waits");
    j.append_batch_unsynced(&[&small_payload(4)]).expect("append during the barrier");
    run_barrier(&mut j, second);
    assert!(!j.is_synced(), "entry 4 came after the barrier was taken");
    let third = j.detach_sync().expect("detach").expect("entry 4 waits");
    j.sync().expect("a sync meanwhile");
    j.finish_detached_sync(third, Ok(())).expect("finish after a sync");
    assert!(j.is_synced());

    // An entry taken back after the barrier was taken: what is written in its place may have
    // come after the fsync, so the barrier records nothing (same length, same offsets).
    j.append_batch_unsynced(&[&small_payload(9)]).expect("append");
    let cut = j.detach_sync().expect("detach").expect("entry 5 waits");
    j.remove_last().expect("take entry 5 back");
    j.append_batch_unsynced(&[&small_payload(99)]).expect("append in its place");
    assert_eq!(small_payload(9).len(), small_payload(99).len());
    j.finish_detached_sync(cut, Ok(())).expect("finish after a cut");
    assert!(!j.is_synced(), "the entry in its place came after the barrier");
    j.remove_last().expect("take it back too");

    // An earlier opening's barrier: its failure is said, and records nothing here.
    j.append_batch_unsynced(&[&small_payload(5)]).expect("append");
    let stale = j.detach_sync().expect("detach").expect("entry 5 waits");
    drop(j);
    let mut j = FileJournal::open(&dir, big.clone()).expect("reopen");
    j.append_batch_unsynced(&[&small_payload(6)]).expect("append");
    let said = j.finish_detached_sync(stale, Err(std::io::Error::other("an earlier opening's")));
    assert!(matches!(said, Err(JournalError::Backend { .. })), "{said:?}");
    j.sync().expect("still writable");

    // A failed barrier, even after a cut (whose own fsync made entry 7 durable): what no
    // fsync confirmed is cut, and the journal refuses writes.
    j.append_batch_unsynced(&[&small_payload(7), &small_payload(8)]).expect("append");
    let failing = j.detach_sync().expect("detach").expect("entries 7 and 8 wait");
    j.remove_last().expect("take entry 8 back");
    j.append_batch_unsynced(&[&small_payload(8)]).expect("append it again");
    let err = j.finish_detached_sync(failing, Err(std::io::Error::other("injected: the disk failed")));
    assert!(matches!(err, Err(JournalError::Io { op: "fsync", .. })), "{err:?}");
    assert_prefix(&j, 7);
    assert!(matches!(j.append(&small_payload(8)), Err(JournalError::Poisoned { .. })));
    drop(j);
    let j = FileJournal::open(&dir, big).expect("reopen");
    assert_prefix(&j, 7);
}

/// A barrier taken before a roll records nothing in the new segment (the roll synced the
/// old one), and one taken after the roll fsyncs the new segment's file; nor does one after
/// a trim of every entry, which leaves no segment (and a failed one still fails the journal).
#[test]
fn a_detached_sync_taken_before_a_roll_records_nothing_in_the_new_segment() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("j");
    let mut j = FileJournal::create(&dir, ID, opts()).expect("create");
    j.append_batch_unsynced(&[&small_payload(1)]).expect("append");
    let before = j.detach_sync().expect("detach").expect("entry 1 waits");
    let mut n = 1;
    while segments(&dir).len() < 2 {
        n += 1;
        j.append_batch_unsynced(&[&small_payload(n)]).expect("append until a roll");
    }
    j.append_batch_unsynced(&[&small_payload(n + 1)]).expect("append in the new segment");
    run_barrier(&mut j, before);
    assert!(!j.is_synced(), "the new segment's entries came after the barrier");
    let after = j.detach_sync().expect("detach").expect("the new segment waits");
    run_barrier(&mut j, after);
    assert!(j.is_synced());
    assert_prefix(&j, n + 1);

    // Every entry trimmed while a barrier is out (no segment is left): it records nothing,
    // and a failed one still fails the journal.
    j.append_batch_unsynced(&[&small_payload(n + 2)]).expect("append");
    let out = j.detach_sync().expect("detach").expect("the newest waits");
    j.remove_prefix(lsn(n + 2)).expect("trim everything");
    j.finish_detached_sync(out, Ok(())).expect("finish after the trim");
    j.append_batch_unsynced(&[&small_payload(n + 3)]).expect("append");
    let failing = j.detach_sync().expect("detach").expect("the newest waits");
    j.remove_prefix(lsn(n + 3)).expect("trim everything");
    let err = j.finish_detached_sync(failing, Err(std::io::Error::other("injected")));
    assert!(matches!(err, Err(JournalError::Io { op: "fsync", .. })), "{err:?}");
    assert!(matches!(j.append(&small_payload(1)), Err(JournalError::Poisoned { .. })));
}

fn prealloc_opts() -> FileJournalOptions {
    FileJournalOptions { preallocate: true, ..opts() }
}

/// Like `build`, with space written ahead: the directory, the last segment, where its final
/// entry starts and ends (the file goes on, in zeros).
fn build_preallocated(root: &Path) -> (PathBuf, PathBuf, u64, u64) {
    let dir = root.join("p");
    let mut j = FileJournal::create(&dir, ID, prealloc_opts()).expect("create");
    for n in 1..=ENTRIES {
        j.append(&small_payload(n)).expect("append");
    }
    let seg = segments(&dir).pop().expect("a segment");
    let bytes = fs::read(&seg).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("entries") as u64 + 1;
    let frame = pagesync_journal::codec::frame_len(small_payload(ENTRIES).len()) as u64;
    // The final payload ends in a byte that is not zero (see `small_payload`).
    assert_ne!(*small_payload(ENTRIES).last().expect("byte"), 0);
    (dir, seg, end - frame, end)
}

#[test]
fn space_written_ahead_is_neither_a_repair_nor_kept_in_full_segments() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, last_seg, _, end) = build_preallocated(root.path());
    let segs = segments(&dir);
    assert!(segs.len() > 2, "the test needs several segments");
    let size = fs::metadata(&last_seg).expect("stat").len();
    assert!(
        size >= end + pagesync_journal::file::PREALLOCATE_MIN_BYTES,
        "zeros ahead: {size} bytes, entries end at {end}"
    );
    for full in &segs[..segs.len() - 1] {
        let len = fs::metadata(full).expect("stat").len();
        assert!(len <= 512 + 200, "a full segment keeps no space ahead: {} is {len} bytes", full.display());
    }
    for read_only in [true, false] {
        let j = FileJournal::open(&dir, FileJournalOptions { read_only, ..prealloc_opts() }).expect("open");
        assert!(j.repairs().is_empty(), "zeros ahead are no repair: {:?}", j.repairs());
        assert_prefix(&j, ENTRIES);
    }
    assert_eq!(fs::metadata(&last_seg).expect("stat").len(), size, "opening keeps the space ahead");
    // Appends go on in that space, and read back after a reopen.
    let mut j = FileJournal::open(&dir, prealloc_opts()).expect("open");
    assert_eq!(j.append(b"next").expect("append"), lsn(ENTRIES + 1));
    drop(j);
    let j = FileJournal::open(&dir, prealloc_opts()).expect("reopen");
    assert_eq!(j.read(lsn(ENTRIES + 1)).expect("read"), b"next");
    assert!(j.repairs().is_empty());
    // A journal that does not preallocate reads it the same.
    let plain = FileJournal::open(&dir, opts()).expect("open without preallocation");
    assert_eq!(plain.range().last(), Some(lsn(ENTRIES + 1)));
}

#[test]
fn a_torn_append_into_space_written_ahead_is_cut_at_every_byte() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, last_seg, start, end) = build_preallocated(root.path());
    let size = fs::metadata(&last_seg).expect("stat").len();
    // The final append reached the disk up to `cut` (its later blocks never written: zeros,
    // as the space ahead was), the file's size unchanged.
    for cut in start..end {
        let case = root.path().join(format!("cut{cut}"));
        copy_dir(&dir, &case);
        let seg = case.join(last_seg.file_name().expect("name"));
        let mut bytes = fs::read(&seg).expect("read");
        bytes[cut as usize..end as usize].fill(0);
        fs::write(&seg, &bytes).expect("write");
        let mut j = FileJournal::open(&case, prealloc_opts()).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_prefix(&j, ENTRIES - 1);
        assert_eq!(j.repairs().is_empty(), cut == start, "cut {cut}: {:?}", j.repairs());
        assert_eq!(j.append(b"again").expect("append"), lsn(ENTRIES));
        drop(j);
        let j = FileJournal::open(&case, prealloc_opts()).expect("reopen");
        assert_eq!(j.read(lsn(ENTRIES)).expect("read"), b"again");
        assert!(fs::metadata(&seg).expect("stat").len() <= size);
        fs::remove_dir_all(&case).expect("cleanup");
    }
}

#[test]
fn bit_flips_before_space_written_ahead_are_still_caught() {
    let root = tempfile::tempdir().expect("tempdir");
    let (dir, last_seg, _, end) = build_preallocated(root.path());
    let (mut errors, mut truncations) = (0, 0);
    // Every byte of the entries, and the first bytes of the zeros after them.
    for pos in 0..end as usize + 64 {
        let case = root.path().join("flip");
        copy_dir(&dir, &case);
        let seg = case.join(last_seg.file_name().expect("name"));
        let mut bytes = fs::read(&seg).expect("read");
        bytes[pos] ^= 1 << (pos % 8);
        fs::write(&seg, &bytes).expect("write");
        match FileJournal::open(&case, prealloc_opts()) {
            Err(_) => errors += 1,
            Ok(j) => {
                let last = j.range().last().expect("non-empty").get();
                assert!(last >= ENTRIES - 1, "flip at {pos} lost acknowledged entries");
                for n in 1..=last {
                    assert_eq!(
                        j.read(lsn(n)).expect("read"),
                        small_payload(n),
                        "flip at {pos} gave wrong data"
                    );
                }
                match pos < end as usize {
                    // In an entry: that entry (the last) is cut, never kept changed.
                    true => {
                        assert_eq!(last, ENTRIES - 1, "flip at {pos} went unnoticed");
                        truncations += 1;
                    }
                    // In the zeros: nothing is lost, and the garbage is cut as a torn tail.
                    false => {
                        assert_eq!(last, ENTRIES, "flip at {pos} in the zeros lost an entry");
                        assert!(!j.repairs().is_empty(), "flip at {pos} in the zeros went unsaid");
                    }
                }
            }
        }
        fs::remove_dir_all(&case).expect("cleanup");
    }
    assert!(errors > 0 && truncations > 0, "errors {errors}, truncations {truncations}");
}

#[test]
fn an_append_whose_first_blocks_never_reached_the_disk_is_torn_not_corrupt() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("h");
    let big =
        FileJournalOptions { max_segment_bytes: 1 << 20, preallocate: true, ..FileJournalOptions::default() };
    let mut j = FileJournal::create(&dir, ID, big.clone()).expect("create");
    for n in 1..ENTRIES - 1 {
        j.append(&small_payload(n)).expect("append");
    }
    // An entry that holds sectors of zeros (a blob of zeros), acknowledged like the rest.
    j.append(&[0; 2000]).expect("append");
    let last: Vec<u8> = (0..4000u32).map(|i| (i % 251 + 1) as u8).collect();
    j.append(&last).expect("append");
    drop(j);
    let seg = segments(&dir).pop().expect("a segment");
    let bytes = fs::read(&seg).expect("read");
    let end = bytes.iter().rposition(|&b| b != 0).expect("entries") + 1;
    let start = end - pagesync_journal::codec::frame_len(last.len());
    let open_with = |damage: &dyn Fn(&mut Vec<u8>)| {
        let case = root.path().join("case");
        copy_dir(&dir, &case);
        let mut b = bytes.clone();
        damage(&mut b);
        fs::write(case.join(seg.file_name().expect("name")), &b).expect("write");
        let opened = FileJournal::open(&case, big.clone()).map(|j| (j.range(), j.repairs().len())).ok();
        fs::remove_dir_all(&case).expect("cleanup");
        opened
    };
    let torn = Some((LsnRange::inclusive(lsn(1), lsn(ENTRIES - 1)), 1));
    // Its header's block never written, the rest on disk.
    assert_eq!(open_with(&|b| b[start..start + 20].fill(0)), torn);
    // A sector in its middle never written.
    let sector = (start / 512 + 2) * 512;
    assert!(sector + 512 < end);
    assert_eq!(open_with(&|b| b[sector..sector + 512].fill(0)), torn);
    // A flipped bit in its header, nothing missing: corruption, said.
    assert!(open_with(&|b| b[start + 5] ^= 0x04).is_none(), "a damaged header with its entry behind it");
    // A flipped bit in an entry before the one of zeros: corruption, not a torn append (the
    // zeros are another entry's).
    let before: usize = SEGMENT_HEADER_BYTES
        + (1..ENTRIES - 2).map(|n| pagesync_journal::codec::frame_len(small_payload(n).len())).sum::<usize>();
    assert!(small_payload(ENTRIES - 2).len() > 2);
    assert!(open_with(&|b| b[before + 22] ^= 0x01).is_none(), "a damaged entry before acknowledged zeros");
    // Nothing damaged: every entry, no repair.
    assert_eq!(open_with(&|_| {}), Some((LsnRange::inclusive(lsn(1), lsn(ENTRIES)), 0)));
}

/// Small segments that roll without a barrier (a replica's storage journal).
fn rolling_opts() -> FileJournalOptions {
    FileJournalOptions { roll_without_barrier: true, ..opts() }
}

/// Entries 1..=`durable` appended with a barrier each, then up to `ENTRIES` without any, over
/// several rolls; the journal is dropped as a killed process leaves it (everything in the page
/// cache, nothing synced since entry `durable`). Returns the directory.
fn build_rolled(root: &Path, durable: u64) -> PathBuf {
    let dir = root.join("j");
    let mut j = FileJournal::create(&dir, ID, rolling_opts()).expect("create");
    for n in 1..=durable {
        j.append(&small_payload(n)).expect("durable append");
    }
    for n in durable + 1..=ENTRIES {
        j.append_batch_unsynced(&[&small_payload(n)]).expect("append");
    }
    assert!(!j.is_synced(), "nothing after entry {durable} is synced");
    dir
}

/// A segment's first LSN (its name) and whether its header says it was started before the
/// segment before it was durable.
fn first_and_flag(seg: &Path) -> (u64, bool) {
    let name = seg.file_stem().expect("name").to_string_lossy().into_owned();
    let bytes = fs::read(seg).expect("read");
    (name.parse().expect("a segment name"), bytes[32] & 1 == 1)
}

/// The entries wholly within the first `len` bytes of the segment starting at `first`.
fn whole_entries(first: u64, len: u64) -> u64 {
    let (mut pos, mut n) = (SEGMENT_HEADER_BYTES as u64, first);
    while pos + pagesync_journal::codec::frame_len(small_payload(n).len()) as u64 <= len {
        pos += pagesync_journal::codec::frame_len(small_payload(n).len()) as u64;
        n += 1;
    }
    n - first
}

/// Rolled without a barrier, the old segment is left to the next sync, and the new one's
/// header says so. A power cut before that sync can tear the old segment anywhere after its
/// header (its last blocks not written), and keep the new ones or not: open cuts the torn
/// segment at its first damaged entry and removes every segment after it (nothing in them was
/// acknowledged), leaving a journal that appends at the cut. A killed process (everything in
/// the page cache) loses nothing.
#[test]
fn a_segment_rolled_without_a_barrier_may_end_torn_and_is_cut_with_those_after_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = build_rolled(root.path(), 5);
    let segs = segments(&dir);
    assert!(segs.len() > 3, "the test needs several rolls");
    let flags: Vec<(u64, bool)> = segs.iter().map(|s| first_and_flag(s)).collect();
    assert!(!flags[0].1, "the first segment was started on an empty journal");
    assert!(flags[2..].iter().all(|f| f.1), "every roll after entry 5 was without a barrier: {flags:?}");
    assert_prefix(&FileJournal::open(&dir, rolling_opts()).expect("reopen after a kill"), ENTRIES);

    // Every segment followed by one started without a barrier, torn at every byte after its
    // header.
    for k in (0..segs.len() - 1).filter(|&k| flags[k + 1].1) {
        let full = fs::metadata(&segs[k]).expect("stat").len();
        for len in SEGMENT_HEADER_BYTES as u64..full {
            let case = root.path().join(format!("cut-{k}-{len}"));
            copy_dir(&dir, &case);
            let seg = case.join(segs[k].file_name().expect("name"));
            fs::OpenOptions::new().write(true).open(&seg).expect("open").set_len(len).expect("tear");
            let mut j = FileJournal::open(&case, rolling_opts())
                .unwrap_or_else(|e| panic!("segment {k} torn at {len}: {e}"));
            let last = flags[k].0 + whole_entries(flags[k].0, len) - 1;
            if last == 0 {
                assert_eq!(j.range(), LsnRange::empty_at(lsn(1)));
            } else {
                assert_prefix(&j, last);
            }
            assert_eq!(segments(&case).len(), k + 1, "the segments after the torn one are gone");
            assert!(!j.repairs().is_empty(), "the cut is reported");
            assert_eq!(j.append(b"next").expect("append"), lsn(last + 1));
            drop(j);
            fs::remove_dir_all(&case).expect("clean up");
        }
    }
}

/// The other crash states of a roll without a barrier: a new segment whose header never
/// reached the disk (zeros, with or without entries after them; or a file shorter than a
/// header), and a new segment's file lost while a later one was kept. Each is removed with
/// every segment after it. A read-only open reports the same and changes nothing.
#[test]
fn a_segment_rolled_without_a_barrier_may_lose_its_header_or_its_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = build_rolled(root.path(), 5);
    let segs = segments(&dir);
    let flags: Vec<(u64, bool)> = segs.iter().map(|s| first_and_flag(s)).collect();
    let k = flags.iter().position(|f| f.1).expect("a segment started without a barrier");
    assert!(k + 2 < segs.len(), "the test needs segments after it");
    let name = |i: usize| segs[i].file_name().expect("name").to_owned();
    type Damage = fn(&Path);
    let cases: [(&str, Damage); 4] = [
        ("header of zeros", |seg| {
            let mut bytes = fs::read(seg).expect("read");
            bytes[..SEGMENT_HEADER_BYTES].fill(0);
            fs::write(seg, bytes).expect("write");
        }),
        ("no bytes at all", |seg| fs::write(seg, b"").expect("write")),
        ("a partial header", |seg| fs::write(seg, b"PGSJSEG").expect("write")),
        ("file lost, the next kept", |seg| fs::remove_file(seg).expect("remove")),
    ];
    for (what, damage) in cases {
        for read_only in [true, false] {
            let case = root.path().join(format!("{what}-{read_only}"));
            copy_dir(&dir, &case);
            damage(&case.join(name(k)));
            let before: Vec<Vec<u8>> = segments(&case).iter().map(|s| fs::read(s).expect("read")).collect();
            let o = FileJournalOptions { read_only, ..rolling_opts() };
            let j = FileJournal::open(&case, o).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_prefix(&j, flags[k].0 - 1);
            assert!(!j.repairs().is_empty(), "{what}: the cut is reported");
            let after: Vec<Vec<u8>> = segments(&case).iter().map(|s| fs::read(s).expect("read")).collect();
            if read_only {
                assert_eq!(before, after, "{what}: a read-only open changes nothing");
            } else {
                assert_eq!(after.len(), k, "{what}: the segment and those after it are gone");
                drop(j);
                let mut j = FileJournal::open(&case, rolling_opts()).expect("reopen");
                assert_prefix(&j, flags[k].0 - 1);
                assert!(j.repairs().is_empty(), "{what}: nothing is left to repair");
                assert_eq!(j.append(b"next").expect("append"), lsn(flags[k].0));
            }
        }
    }

    // Where rolls always sync first, a header of zeros is not a crash's: corruption.
    let strict = root.path().join("strict");
    let mut j = FileJournal::create(&strict, ID, opts()).expect("create");
    for n in 1..=ENTRIES {
        j.append(&small_payload(n)).expect("append");
    }
    drop(j);
    let segs_before = segments(&strict).len();
    assert!(segs_before > 2, "a segment after the damaged one");
    let second = segments(&strict)[1].clone();
    let mut bytes = fs::read(&second).expect("read");
    bytes[..SEGMENT_HEADER_BYTES].fill(0);
    fs::write(&second, bytes).expect("write");
    let err = FileJournal::open(&strict, opts()).expect_err("a lost header is corruption");
    assert!(matches!(err, JournalError::CorruptSegment { .. }), "{err:?}");
    // So it is with the option when a later segment was started after a sync (no flag): the
    // lost header had been on disk.
    let err = FileJournal::open(&strict, rolling_opts()).expect_err("a lost header is corruption");
    assert!(matches!(err, JournalError::CorruptSegment { .. }), "{err:?}");
    assert_eq!(segments(&strict).len(), segs_before, "nothing is removed");
}

/// Rolled without a barrier, a damaged entry that is not a torn tail (a flipped bit in an
/// entry with more after it) is still corruption, and nothing is cut.
#[test]
fn corruption_before_a_roll_without_a_barrier_is_still_reported() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = build_rolled(root.path(), 5);
    let segs = segments(&dir);
    let k = segs.iter().position(|s| first_and_flag(s).1).expect("a segment started without a barrier") - 1;
    let (first, _) = first_and_flag(&segs[k]);
    let mut bytes = fs::read(&segs[k]).expect("read");
    let frame = pagesync_journal::codec::FRAME_HEADER_BYTES;
    bytes[SEGMENT_HEADER_BYTES + frame + 1] ^= 0x10;
    fs::write(&segs[k], &bytes).expect("write");
    let err = FileJournal::open(&dir, rolling_opts()).expect_err("corruption must be reported");
    assert!(matches!(err, JournalError::Corrupt { lsn: at, .. } if at == lsn(first)), "{err:?}");
    assert_eq!(segments(&dir).len(), segs.len(), "nothing is removed");
}

/// The next `sync`, or a barrier taken out of the journal, makes every segment rolled
/// without a barrier durable, oldest first, with the directory; a failed barrier keeps only
/// what an fsync confirmed (the first segment behind, cut; those after it, removed), as a
/// reopen finds.
#[test]
fn a_sync_or_a_barrier_covers_every_segment_rolled_without_one() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("j");
    let mut j = FileJournal::create(&dir, ID, rolling_opts()).expect("create");
    let mut n = 0;
    let mut fill = |j: &mut FileJournal, segs: usize| {
        while segments(&dir).len() < segs {
            n += 1;
            j.append_batch_unsynced(&[&small_payload(n)]).expect("append");
        }
        n
    };
    fill(&mut j, 3);
    j.sync().expect("sync");
    assert!(j.is_synced());
    let last = fill(&mut j, 6);
    let barrier = j.detach_sync().expect("detach").expect("three segments wait");
    run_barrier(&mut j, barrier);
    assert!(j.is_synced(), "the barrier covered every segment and the directory");
    assert_prefix(&j, last);

    let synced = last;
    let last = fill(&mut j, 9);
    let failing = j.detach_sync().expect("detach").expect("three segments wait");
    let err = j.finish_detached_sync(failing, Err(std::io::Error::other("injected: the disk failed")));
    assert!(matches!(err, Err(JournalError::Io { op: "fsync", .. })), "{err:?}");
    assert!(last > synced + 2);
    assert_prefix(&j, synced);
    assert_eq!(segments(&dir).len(), 6, "the segments after the first one behind are gone");
    assert!(matches!(j.append(b"x"), Err(JournalError::Poisoned { .. })));
    drop(j);
    assert_prefix(&FileJournal::open(&dir, rolling_opts()).expect("reopen"), synced);
}
