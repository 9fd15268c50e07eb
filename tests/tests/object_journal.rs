//! The object-store backend beyond the conformance suite: fencing between two writers, damaged
//! objects, how many requests a cold open costs, and a trim whose deletes fail.

use std::sync::atomic::Ordering;

use pagesync_journal::{Journal, JournalError, JournalId, Lsn, ObjectBackend};

const ID: JournalId = JournalId::from_bytes([9; 16]);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

/// Object-store semantics on a temporary directory; each `backend()` is a fresh process's view
/// (its own cache and counters) of the same objects.
struct Local {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl Local {
    fn new() -> Local {
        Local { rt: runtime(), dir: tempfile::tempdir().expect("tempdir") }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }

    fn backend(&self) -> ObjectBackend {
        ObjectBackend::from_url(&self.url(), self.rt.handle().clone()).expect("backend")
    }
}

fn lsn(n: u64) -> Lsn {
    Lsn::new(n).expect("non-zero")
}

/// Two writers open the same journal; both try the next LSN. Exactly one wins, the loser is
/// fenced for good, and what is stored is the winner's entry.
fn two_writers_are_fenced(url: &str) {
    let rt = runtime();
    let a_backend = ObjectBackend::from_url(url, rt.handle().clone()).expect("backend");
    let b_backend = ObjectBackend::from_url(url, rt.handle().clone()).expect("backend");
    let mut a = a_backend.open_or_create("doc", ID).expect("open a");
    a.append(b"first").expect("append");
    let mut b = b_backend.open_or_create("doc", ID).expect("open b");
    assert_eq!(b.range().next(), lsn(2));
    assert_eq!(a.append(b"from a").expect("a wins LSN 2"), lsn(2));
    let err = b.append(b"from b").expect_err("b lost LSN 2");
    assert!(matches!(err, JournalError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("owned by another"), "{err}");
    let again = b.append(b"retry").expect_err("a fenced writer stays fenced");
    assert!(matches!(again, JournalError::Fenced { .. }), "{again}");
    // Nor may it rewrite the trim marker: the winner's history stays whole.
    let trim = b.remove_prefix(lsn(2)).expect_err("a fenced writer trims nothing");
    assert!(matches!(trim, JournalError::Fenced { .. }), "{trim}");
    let fresh = ObjectBackend::from_url(url, rt.handle().clone()).expect("backend");
    let c = fresh.open_or_create("doc", ID).expect("reopen");
    assert_eq!(c.read(lsn(2)).expect("read"), b"from a");
    assert_eq!(c.range().next(), lsn(3));
    assert_eq!(c.range().first(), lsn(1), "the fenced writer's trim did not land");
}

#[test]
fn two_writers_local() {
    let local = Local::new();
    two_writers_are_fenced(&local.url());
}

#[test]
fn two_writers_s3() {
    let Some(url) = pagesync_tests::s3_url("fence") else { return };
    two_writers_are_fenced(&url);
}

#[test]
fn a_flipped_byte_is_reported_with_the_lsn() {
    let local = Local::new();
    let backend = local.backend();
    let mut j = backend.open_or_create("doc", ID).expect("open");
    j.append_batch(&[b"one", b"two", b"three"]).expect("batch");
    j.append(b"four").expect("append");
    drop(j);
    let path = local.dir.path().join("doc").join(format!("{:020}.batch", 1));
    let mut bytes = std::fs::read(&path).expect("read object");
    let last = bytes.len() - 1; // inside the payload of LSN 3
    bytes[last] ^= 0x10;
    std::fs::write(&path, bytes).expect("write object");
    let fresh = local.backend();
    let j = fresh.open_or_create("doc", ID).expect("open reads only the last batch");
    assert_eq!(j.read(lsn(4)).expect("untouched batch"), b"four");
    let err = j.read(lsn(1)).expect_err("damaged batch");
    assert!(matches!(err, JournalError::Corrupt { lsn: l, .. } if l == lsn(3)), "{err}");
    assert!(err.to_string().contains("00000000000000000001.batch"), "{err}");
}

#[test]
fn a_foreign_journal_is_refused() {
    let local = Local::new();
    let backend = local.backend();
    backend.open_or_create("doc", ID).expect("open").append(b"x").expect("append");
    let err = backend.open_or_create("doc", JournalId::from_bytes([1; 16])).expect_err("other id");
    assert!(matches!(err, JournalError::Foreign { .. }), "{err}");
}

/// A cold open lists once and fetches only the last batch; reading the whole history then
/// fetches every other batch exactly once.
#[test]
fn a_cold_open_downloads_each_object_once() {
    let local = Local::new();
    let backend = local.backend();
    let mut j = backend.open_or_create("doc", ID).expect("open");
    for n in 0..20u32 {
        j.append_batch(&[&n.to_le_bytes(), b"second"]).expect("batch");
    }
    drop(j);
    let cold = local.backend();
    let j = cold.open_or_create("doc", ID).expect("open");
    let stats = cold.stats();
    assert_eq!(stats.lists.load(Ordering::Relaxed), 1);
    // JOURNAL, TRIM (absent) and the last batch.
    assert_eq!(stats.gets.load(Ordering::Relaxed), 3);
    for round in 0..2 {
        for l in j.range().iter() {
            j.read(l).expect("read");
        }
        assert_eq!(stats.gets.load(Ordering::Relaxed), 3 + 19, "round {round}");
    }
}

/// A trim is made with `TRIM`; batches that then fail to delete are left for the next trim. The
/// call succeeds: a caller told it failed would think nothing was removed (the page store then
/// keeps a checkpoint list that no longer matches the journal, and the server refuses
/// subscribers behind it as if its storage were damaged).
#[test]
fn a_trim_whose_deletes_fail_is_a_trim() {
    use pagesync_tests::disk::{Disk, FaultRates, Faults, Kind};
    let faults = Faults::new(FaultRates { write: 1000, ..FaultRates::default() });
    faults.stop();
    let disk = Disk::new(Kind::Object, ID, "trim", 1, &faults);
    let mut j = disk.open().expect("create");
    for n in 1..=4u8 {
        j.append(&[n]).expect("append");
    }
    faults.resume();
    j.remove_prefix(lsn(2)).expect("trimmed, though no batch would delete");
    assert_eq!((j.range().first(), j.range().next()), (lsn(3), lsn(5)));
    faults.stop();
    j.remove_prefix(lsn(3)).expect("trim again, deleting what was left");
    drop(j);
    let j = disk.open().expect("reopen");
    assert_eq!((j.range().first(), j.range().next()), (lsn(4), lsn(5)));
    assert_eq!(j.read(lsn(4)).expect("read"), vec![4]);
}
