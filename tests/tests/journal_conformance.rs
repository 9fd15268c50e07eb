//! The journal conformance suite, run against every native backend.

use pagesync_journal::conformance::Backend;
use pagesync_journal::{FileJournal, FileJournalOptions, JournalId, MemoryJournal};

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
        Files { dir, opts: FileJournalOptions { max_segment_bytes } }
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
