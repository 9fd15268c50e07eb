//! The journal layer's errors. Every corruption error names the journal, and where it can the
//! segment file and the LSN, so an operator knows what to restore.

use std::path::PathBuf;

use crate::{JournalId, Lsn, LsnRange};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("journal directory {path} does not exist (create it with FileJournal::create)")]
    Missing { path: PathBuf },

    #[error("{path} is not a pagesync journal: {reason}")]
    Foreign { path: PathBuf, reason: String },

    #[error("journal {path} already exists")]
    AlreadyExists { path: PathBuf },

    #[error("journal {journal}: corrupt entry at LSN {lsn} in {location}: {reason}")]
    Corrupt { journal: JournalId, location: String, lsn: Lsn, reason: String },

    #[error("journal {journal}: corrupt segment {location}: {reason}")]
    CorruptSegment { journal: JournalId, location: String, reason: String },

    #[error("journal {journal}: LSN {lsn} is not in the journal's range {range}")]
    OutOfRange { journal: JournalId, lsn: Lsn, range: LsnRange },

    /// A partial read (`Journal::read_part`) of bytes past the end of its entry.
    #[error("journal {journal}: partial read past the end of entry {lsn} ({len_bytes} bytes)")]
    PastEntryEnd { journal: JournalId, lsn: Lsn, len_bytes: usize },

    #[error("journal {journal}: entry of {len_bytes} bytes exceeds the limit of {max_bytes}")]
    EntryTooLarge { journal: JournalId, len_bytes: usize, max_bytes: usize },

    /// The I/O error is in the message, and not also a `source` (which a chain of causes
    /// would print a second time).
    #[error("journal {journal}: {op} failed on {path}: {error}")]
    Io { journal: JournalId, op: &'static str, path: PathBuf, error: std::io::Error },

    #[error("journal {journal}: {message}")]
    Fenced { journal: JournalId, message: String },

    /// An earlier write failed in a way that leaves what is on disk unknown (a failed fsync):
    /// the journal refuses writes until it is reopened, which re-reads what is durable.
    #[error("journal {journal}: {message}")]
    Poisoned { journal: JournalId, message: String },

    #[error("journal {journal}: the storage backend failed: {message}")]
    Backend { journal: JournalId, message: String },
}

pub type Result<T, E = JournalError> = std::result::Result<T, E>;
