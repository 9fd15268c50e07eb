//! Crash and corruption tests of the handle journal (the browser's OPFS layout), on native
//! files: a power cut at every write and flush of an append and of a compacting prefix removal
//! (twice: once keeping every write that completed, once losing every write not yet flushed,
//! as a real power cut may) and of a creation, one failed operation at every step of a trim,
//! torn tails cut at every byte, and bit flips anywhere; and on the simulator's files, failed
//! flushes followed by restarts and a power cut.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use pagesync_journal::{HandleJournal, Journal, JournalId, Lsn, LsnRange, RandomAccess};
use pagesync_tests::disk::{Disk, FaultRates, Faults, Kind};
use pagesync_tests::{NativeFile, handle_files};

const ID: JournalId = JournalId::from_bytes([0x5a; 16]);

fn lsn(n: u64) -> Lsn {
    Lsn::new(n).expect("non-zero")
}

fn payload(n: u64) -> Vec<u8> {
    (0..(n * 29 % 200 + 1)).map(|i| (i * 7 + n) as u8).collect()
}

/// A native file that loses power after a number of operations shared by both files: the
/// write that crosses the limit lands only half, and every later operation fails. `durable`
/// is the file as of its last flush: what a power cut that loses unflushed writes leaves.
struct CrashFile {
    inner: NativeFile,
    /// Operations left before the cut; `u32::MAX` for no cut.
    ops_left: Arc<AtomicU32>,
    durable: Arc<Mutex<Vec<u8>>>,
}

fn contents(f: &NativeFile) -> Vec<u8> {
    let mut buf = vec![0; f.size().expect("size") as usize];
    f.read_exact_at(&mut buf, 0).expect("read");
    buf
}

impl CrashFile {
    fn tick(&self) -> std::io::Result<bool> {
        match self.ops_left.load(Ordering::SeqCst) {
            0 => Err(std::io::Error::other("power cut")),
            n => {
                self.ops_left.store(n - 1, Ordering::SeqCst);
                Ok(n > 1)
            }
        }
    }
}

impl RandomAccess for CrashFile {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.tick()? {
            return self.inner.write_all_at(data, offset);
        }
        self.inner.write_all_at(&data[..data.len() / 2], offset)?;
        Err(std::io::Error::other("power cut"))
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.truncate(len)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tick()?;
        self.inner.flush()?;
        *self.durable.lock().expect("lock") = contents(&self.inner);
        Ok(())
    }
}

fn assert_holds(j: &dyn Journal, range: LsnRange) {
    assert_eq!(j.range(), range);
    for l in range.iter() {
        assert_eq!(j.read(l).expect("read"), payload(l.get()), "entry {l}");
    }
}

#[test]
fn power_cut_at_every_step_of_compaction_and_append_keeps_acknowledged_entries() {
    power_cuts(false);
}

/// The same, but the cut loses every write since each file's last flush: a journal that
/// acknowledged before flushing would lose entries here.
#[test]
fn power_cut_losing_unflushed_writes_keeps_acknowledged_entries() {
    power_cuts(true);
}

fn power_cuts(lose_unflushed: bool) {
    let mut cut_at = 0;
    loop {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = HandleJournal::create(handle_files(dir.path()), ID).expect("create");
        for n in 1..=40 {
            j.append(&payload(n)).expect("append");
        }
        drop(j);
        let ops_left = Arc::new(AtomicU32::new(cut_at));
        let durables: Vec<Arc<Mutex<Vec<u8>>>> =
            handle_files(dir.path()).iter().map(|f| Arc::new(Mutex::new(contents(f)))).collect();
        let files = handle_files(dir.path()).into_iter().zip(&durables).map(|(inner, durable)| CrashFile {
            inner,
            ops_left: ops_left.clone(),
            durable: durable.clone(),
        });
        let files: [CrashFile; 2] = files.collect::<Vec<_>>().try_into().ok().expect("two files");
        let mut j = HandleJournal::open(files).expect("open before the cut");
        j.set_compact_min_bytes(0);
        let trimmed = j.remove_prefix(lsn(30)).is_ok();
        let appended = trimmed && j.append(&payload(41)).is_ok();
        let finished = ops_left.load(Ordering::SeqCst) != 0;
        drop(j);
        // The power goes right after the last operation, or at the cut.
        if lose_unflushed {
            for (name, durable) in ["a", "b"].iter().zip(&durables) {
                std::fs::write(dir.path().join(name), &*durable.lock().expect("lock")).expect("restore");
            }
        }

        let j = HandleJournal::open(handle_files(dir.path())).expect("reopen after the cut");
        let last = if appended { 41 } else { j.range().next().get() - 1 };
        assert!((40..=41).contains(&last), "cut {cut_at}: entries 41.. can only be the one append");
        let first = j.range().first().get();
        assert!(first == 1 || first == 31, "cut {cut_at}: trim point {first} is neither before nor after");
        if trimmed {
            assert_eq!(first, 31, "cut {cut_at}: an acknowledged trim came back");
        }
        assert_holds(&j, LsnRange::inclusive(lsn(first), lsn(last)));
        if finished {
            assert!(cut_at > 4, "the compaction and append took only {cut_at} operations");
            break;
        }
        cut_at += 1;
    }
}

/// A native file whose operation number `fail_at` (counted over both files) fails, once.
struct FailOnce {
    inner: NativeFile,
    ops: Arc<AtomicU32>,
    fail_at: u32,
}

impl FailOnce {
    fn tick(&self) -> std::io::Result<()> {
        match self.ops.fetch_add(1, Ordering::SeqCst) == self.fail_at {
            true => Err(std::io::Error::other("injected failure")),
            false => Ok(()),
        }
    }
}

impl RandomAccess for FailOnce {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.write_all_at(data, offset)
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.tick()?;
        self.inner.truncate(len)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tick()?;
        self.inner.flush()
    }
}

/// One operation of a compacting trim fails, at every step in turn, in place and past the end
/// (a replica that restarts later). Whatever the call answered, the journal still holds exactly
/// what its range says, and an acknowledged trim holds after a reopen.
#[test]
fn one_failed_step_of_a_trim_leaves_a_consistent_journal() {
    for up_to in [30, 50] {
        for fail_at in 0.. {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut j = HandleJournal::create(handle_files(dir.path()), ID).expect("create");
            for n in 1..=40 {
                j.append(&payload(n)).expect("append");
            }
            drop(j);
            let ops = Arc::new(AtomicU32::new(0));
            let files = handle_files(dir.path()).map(|inner| FailOnce { inner, ops: ops.clone(), fail_at });
            let mut j = HandleJournal::open(files).expect("open");
            j.set_compact_min_bytes(0);
            let trimmed = j.remove_prefix(lsn(up_to)).is_ok();
            let failed = ops.load(Ordering::SeqCst) > fail_at;
            let range = j.range();
            for l in range.iter() {
                assert_eq!(j.read(l).expect("read"), payload(l.get()), "step {fail_at}: entry {l}");
            }
            let expected = if trimmed { up_to + 1 } else { 1 };
            assert_eq!(range.first(), lsn(expected), "step {fail_at}: trimmed {trimmed}");
            drop(j);
            let j = HandleJournal::open(handle_files(dir.path())).expect("reopen");
            if trimmed {
                assert_eq!(
                    j.range().first(),
                    lsn(up_to + 1),
                    "step {fail_at}: an acknowledged trim came back"
                );
            }
            assert_holds(&j, j.range());
            if !failed {
                break;
            }
        }
    }
}

/// A creation cut anywhere (the files keeping every write, or only flushed ones) leaves files
/// that `open_or_create` makes an empty journal of.
#[test]
fn power_cut_at_every_step_of_creation_leaves_a_journal_to_create() {
    for lose_unflushed in [false, true] {
        for cut_at in 0.. {
            let dir = tempfile::tempdir().expect("tempdir");
            let ops_left = Arc::new(AtomicU32::new(cut_at));
            let durables = [(); 2].map(|()| Arc::new(Mutex::new(Vec::new())));
            let files = handle_files(dir.path()).into_iter().zip(&durables).map(|(inner, durable)| {
                CrashFile { inner, ops_left: ops_left.clone(), durable: durable.clone() }
            });
            let files: [CrashFile; 2] = files.collect::<Vec<_>>().try_into().ok().expect("two files");
            let created = HandleJournal::create(files, ID).is_ok();
            if lose_unflushed {
                for (name, durable) in ["a", "b"].iter().zip(&durables) {
                    std::fs::write(dir.path().join(name), &*durable.lock().expect("lock")).expect("restore");
                }
            }
            let mut j =
                HandleJournal::open_or_create(handle_files(dir.path()), ID).expect("open after the cut");
            assert_eq!(j.range(), LsnRange::new_empty(), "cut {cut_at}");
            j.append(&payload(1)).expect("append");
            assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(1)));
            if created {
                assert!(cut_at > 3, "the creation took only {cut_at} operations");
                break;
            }
        }
    }
}

/// After a failed flush the pages written may be clean in the cache without being durable
/// (Linux), and no later flush writes them. A reopen must not read back what failed (a header
/// being created, an entry), or what is written after it follows a hole after a power cut.
#[test]
fn failed_flushes_leave_nothing_that_a_power_cut_would_tear_out() {
    for seed in 0..64 {
        let faults = Faults::new(FaultRates { flush: 400, ..FaultRates::default() });
        let disk = Disk::new(Kind::Handle, ID, "failed-flushes", seed, &faults);
        let mut acknowledged = 0;
        // A process that opens the journal and appends; after a failure the next one reopens.
        for _ in 0..8 {
            let Ok(mut j) = disk.open() else { continue };
            while j.append(&payload(acknowledged + 1)).is_ok() {
                acknowledged += 1;
            }
        }
        faults.stop();
        disk.power_cut();
        let j = disk.open().expect("open after a power cut");
        assert_eq!(j.range().first(), lsn(1), "seed {seed}");
        assert!(j.range().next().get() > acknowledged, "seed {seed}: an acknowledged entry was lost");
        for l in j.range().iter() {
            assert_eq!(j.read(l).expect("read"), payload(l.get()), "seed {seed}: entry {l}");
        }
    }
}

#[test]
fn torn_final_entry_is_truncated_at_every_byte_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = HandleJournal::create(handle_files(dir.path()), ID).expect("create");
    for n in 1..=10 {
        j.append(&payload(n)).expect("append");
    }
    let before = j.disk_bytes();
    j.append(&payload(11)).expect("append");
    let after = j.disk_bytes();
    drop(j);
    let full = std::fs::read(dir.path().join("a")).expect("read");
    for cut in before..after {
        std::fs::write(dir.path().join("a"), &full[..cut as usize]).expect("write");
        let j = HandleJournal::open(handle_files(dir.path())).expect("open a torn journal");
        assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(10)));
    }
}

#[test]
fn bit_flips_anywhere_give_an_error_or_a_clean_tail_truncation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut j = HandleJournal::create(handle_files(dir.path()), ID).expect("create");
    for n in 1..=6 {
        j.append(&payload(n)).expect("append");
    }
    j.remove_prefix(lsn(2)).expect("trim");
    drop(j);
    let full = std::fs::read(dir.path().join("a")).expect("read");
    for byte in 0..full.len() {
        let mut bad = full.clone();
        bad[byte] ^= 0x10;
        std::fs::write(dir.path().join("a"), &bad).expect("write");
        let Ok(j) = HandleJournal::open(handle_files(dir.path())) else { continue };
        // Opened: the damage must be a stale trim slot or the final entry, cut cleanly, and
        // every entry still readable must be an error or the exact bytes.
        let range = j.range();
        assert!(range.next() >= lsn(6), "byte {byte}: more than the final entry was lost");
        assert!(range.first() <= lsn(3), "byte {byte}: entries were hidden");
        for l in range.iter() {
            if let Ok(p) = j.read(l) {
                assert_eq!(p, payload(l.get()), "byte {byte}: entry {l} read wrong data");
            }
        }
    }
}
