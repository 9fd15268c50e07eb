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
