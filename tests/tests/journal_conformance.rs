//! The journal conformance suite, run against every native backend.

use pagesync_journal::conformance::Backend;
use pagesync_journal::{FileJournal, FileJournalOptions, HandleJournal, JournalId, MemoryJournal};
use pagesync_tests::NativeFile;

const ID: JournalId = JournalId::from_bytes([7; 16]);

struct Memory;

impl Backend for Memory {
    type J = MemoryJournal;
    fn create(&mut self) -> MemoryJournal {
        MemoryJournal::new(ID)
    }
    fn reopen(&mut self, _: MemoryJournal) -> Option<MemoryJournal> {
        None
    }
}

/// File journals in a temporary directory. `max_segment_bytes` small enough to roll often.
struct Files {
    dir: tempfile::TempDir,
    opts: FileJournalOptions,
}

impl Files {
    fn new(max_segment_bytes: u64) -> Files {
        let dir = tempfile::tempdir().expect("tempdir");
        Files { dir, opts: FileJournalOptions { max_segment_bytes, ..FileJournalOptions::default() } }
    }
}

impl Backend for Files {
    type J = FileJournal;
    fn create(&mut self) -> FileJournal {
        FileJournal::create(self.dir.path().join("j"), ID, self.opts.clone()).expect("create")
    }
    fn reopen(&mut self, journal: FileJournal) -> Option<FileJournal> {
        let dir = journal.dir().to_path_buf();
        drop(journal);
        Some(FileJournal::open(dir, self.opts.clone()).expect("reopen"))
    }
}

/// Handle journals on two native files, as the browser keeps them in OPFS. `compact_min_bytes`
/// 0 compacts on every `remove_prefix` that leaves more removed bytes than live ones.
struct Handles {
    dir: tempfile::TempDir,
    compact_min_bytes: u64,
}

impl Handles {
    fn new(compact_min_bytes: u64) -> Handles {
        Handles { dir: tempfile::tempdir().expect("tempdir"), compact_min_bytes }
    }
}

impl Backend for Handles {
    type J = HandleJournal<NativeFile>;
    fn create(&mut self) -> Self::J {
        let mut j = HandleJournal::create(pagesync_tests::handle_files(self.dir.path()), ID).expect("create");
        j.set_compact_min_bytes(self.compact_min_bytes);
        j
    }
    fn reopen(&mut self, journal: Self::J) -> Option<Self::J> {
        let mut j = HandleJournal::open(journal.into_files()).expect("reopen");
        j.set_compact_min_bytes(self.compact_min_bytes);
        Some(j)
    }
}

mod handles_default {
    use super::*;
    pagesync_journal::conformance_tests!(Handles::new(pagesync_journal::handles::COMPACT_MIN_BYTES));
}

mod handles_compacting {
    use super::*;
    pagesync_journal::conformance_tests!(Handles::new(0));
}

mod memory {
    use super::*;
    pagesync_journal::conformance_tests!(Memory);
}

mod file_one_segment {
    use super::*;
    pagesync_journal::conformance_tests!(Files::new(FileJournalOptions::default().max_segment_bytes));
}

mod file_small_segments {
    use super::*;
    pagesync_journal::conformance_tests!(Files::new(2048));
}

/// Files closed after every write and opened again when used (the server's history journals).
mod file_closed_between_writes {
    use super::*;
    pagesync_journal::conformance_tests!({
        let mut files = Files::new(2048);
        files.opts.close_files = true;
        files
    });
}

/// Parts read through a memory map of each segment (a client's storage journal).
mod file_mapped_reads {
    use super::*;
    pagesync_journal::conformance_tests!({
        let mut files = Files::new(2048);
        files.opts.map_reads = true;
        files
    });
}

/// Mapped reads on files closed after every write: the map goes with the file.
mod file_mapped_reads_closed_between_writes {
    use super::*;
    pagesync_journal::conformance_tests!({
        let mut files = Files::new(2048);
        files.opts.map_reads = true;
        files.opts.close_files = true;
        files
    });
}

/// Every part read through the map equals the same bytes read whole, while the mapped segment
/// grows past what it held when it was mapped, after a roll, after the segments the map was
/// made of are trimmed away, and in a segment larger than the map (one entry bigger than a
/// segment: read with `pread`).
#[test]
fn parts_read_through_a_map_are_the_bytes_appended() {
    use pagesync_journal::{Journal, Lsn};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts =
        FileJournalOptions { max_segment_bytes: 16 << 10, map_reads: true, ..FileJournalOptions::default() };
    let mut j = FileJournal::create(dir.path().join("j"), ID, opts.clone()).expect("create");
    let entry =
        |n: u64, len: usize| -> Vec<u8> { (0..len).map(|i| (n as usize * 31 + i * 7) as u8).collect() };
    let check = |j: &FileJournal| {
        for lsn in j.range().iter() {
            let whole = j.read(lsn).expect("read");
            for (at, len) in [(0, whole.len()), (whole.len() / 3, whole.len() / 2), (whole.len() - 1, 1)] {
                let mut part = vec![0u8; len];
                j.read_part(lsn, at, &mut part).expect("read_part");
                assert_eq!(part, whole[at..at + len], "LSN {lsn:?} bytes {at}..{}", at + len);
            }
        }
    };
    for n in 1..=40 {
        j.append(&entry(n, 700 + n as usize * 13)).expect("append");
        // Read after every append: the first read maps the segment, later appends grow it.
        check(&j);
    }
    let segments = || {
        std::fs::read_dir(dir.path().join("j"))
            .expect("ls")
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".seg")))
            .count()
    };
    assert!(segments() > 1, "the entries rolled into several segments");
    j.append(&entry(41, 40 << 10)).expect("an entry larger than a segment");
    j.append(&entry(42, 900)).expect("append");
    check(&j);
    j.remove_prefix(Lsn::new(30).expect("LSN")).expect("trim");
    check(&j);
    assert!(j.reads_from_memory(), "a reader need not read ahead of a mapped journal");
    drop(j);
    let j = FileJournal::open(dir.path().join("j"), opts.clone()).expect("reopen");
    check(&j);
    drop(j);
    // Read-only (another process owns it, and may cut what it has not synced): never mapped.
    let read_only = FileJournalOptions { read_only: true, ..opts };
    let j = FileJournal::open(dir.path().join("j"), read_only).expect("open read-only");
    assert!(!j.reads_from_memory());
    check(&j);
}

/// Object-store journals: each `create` gets a fresh key prefix. The runtime drives the
/// store's requests; the journal blocks on it from the test thread.
struct Objects {
    backend: pagesync_journal::ObjectBackend,
    _dir: Option<tempfile::TempDir>,
    _rt: tokio::runtime::Runtime,
    n: u32,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime")
}

impl Objects {
    /// Object-store semantics on a local directory.
    fn local() -> Objects {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let backend = pagesync_journal::ObjectBackend::from_url(&url, rt.handle().clone()).expect("backend");
        Objects { backend, _dir: Some(dir), _rt: rt, n: 0 }
    }

    /// moto's S3 (`None`, and the test is skipped, when no endpoint is configured).
    fn s3() -> Option<Objects> {
        let url = pagesync_tests::s3_url("conformance")?;
        let rt = runtime();
        let backend = pagesync_journal::ObjectBackend::from_url(&url, rt.handle().clone()).expect("backend");
        Some(Objects { backend, _dir: None, _rt: rt, n: 0 })
    }
}

impl Backend for Objects {
    type J = pagesync_journal::ObjectJournal;
    fn create(&mut self) -> Self::J {
        self.n += 1;
        self.backend.open_or_create(&format!("j{}", self.n), ID).expect("create")
    }
    fn reopen(&mut self, journal: Self::J) -> Option<Self::J> {
        drop(journal);
        Some(self.backend.open_or_create(&format!("j{}", self.n), ID).expect("reopen"))
    }
}

mod object_local {
    use super::*;
    pagesync_journal::conformance_tests!(Objects::local());
}

/// The suite against S3. Each test skips itself when no endpoint is set (CI sets one).
mod object_s3 {
    use super::*;
    macro_rules! s3_or_skip {
        () => {
            match Objects::s3() {
                Some(o) => o,
                None => return,
            }
        };
    }
    pagesync_journal::conformance_tests!(s3_or_skip!());
}
