//! The core's errors. SQLite result codes are classified in one place (`RejectionCode::of_sqlite`).

use pagesync_journal::{JournalError, Lsn};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not a `#[source]`: SQLite's message is said once (as `{0}`), not again by the chain.
    #[error("SQLite: {0}")]
    Sqlite(rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("mutation of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    MutationTooLarge { len_bytes: usize, max_bytes: usize },
    #[error("malformed mutation: {0}")]
    Malformed(String),
    #[error("the database uses {found}-byte pages; pagesync requires {}", crate::page::PAGE_SIZE)]
    PageSize { found: i64 },
    #[error("a query only reads; a write is a mutation (`execute`, `pagesync exec`): {sql}")]
    NotReadOnly { sql: String },
    /// A statement (`INSERT OR ROLLBACK`, `RAISE(ROLLBACK, ...)`) ended the whole transaction,
    /// not just its mutation's savepoint. The caller restarts its batch without the mutation.
    #[error("the mutation ended its transaction: {0}")]
    TransactionLost(crate::reducer::Rejection),
    /// The mutation made its step change more pages than one storage entry may hold. The
    /// server ends the step before it, or rejects it when it is alone.
    #[error("the step would change more than {max_pages} pages")]
    StepFull { max_pages: usize },
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error("storage entry {got} arrived but {expected} is next: the missing range must be sent first")]
    Gap { expected: Lsn, got: Lsn },
    /// A confirmation by digest (`wire::Confirm`) could not be kept: the replica's replay of
    /// its own mutations did not give the server's entry (`replayed`: a determinism failure,
    /// or a different budget), or it does not hold the mutations it confirms. The entry must
    /// be sent with its pages.
    #[error("storage entry {lsn} confirmed by digest could not be kept: {why}")]
    ConfirmMismatch { lsn: Lsn, replayed: bool, why: String },
    /// The replica was further behind than the server keeps history, and is receiving a
    /// checkpoint of the whole document; it has nothing to read or write on until then.
    #[error(
        "this replica is downloading a checkpoint of the document (it was behind the history the server keeps): try again once it has synced"
    )]
    Restarting,
    /// Another server of the cluster serves the document (it holds its lease): clients go
    /// there (`Message::Redirect`).
    #[error("the document is served by another server: {owner}")]
    Moved { owner: String },
    /// This server may not serve documents now (it is not a live member of its cluster, or is
    /// leaving it); clients try again, here or elsewhere.
    #[error("this server cannot serve documents now: {0}")]
    Unavailable(String),
    /// The document was deleted on the server: it will not be created again, and its
    /// replicas can only be forgotten.
    #[error("the document was deleted on the server")]
    Deleted,
    /// `ClientDocument::set_timeline_key` with a key that opens another timeline.
    #[error("the timeline key opens timeline {opens}, not this replica's {timeline}")]
    WrongTimelineKey { opens: crate::TimelineId, timeline: crate::TimelineId },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        Error::Sqlite(e)
    }
}

impl Error {
    /// Whether the journal refuses writes until it is reopened (an earlier write's outcome is
    /// unknown, or another writer fenced it): retrying on the same handle cannot succeed.
    pub fn needs_reopen(&self) -> bool {
        matches!(self.journal_error(), Some(JournalError::Poisoned { .. } | JournalError::Fenced { .. }))
    }

    /// What a client may be told of this error, met by the server on its own storage or
    /// state: the kind of failure, never the paths, bucket names, endpoints or messages behind
    /// it (those are for the server's log: see `protocol::Event::Failed`). The errors made to
    /// be told (`Unavailable`, `Moved`, `Deleted`, `Restarting`) are told whole.
    pub fn public(&self) -> String {
        let kind = match self {
            Error::Unavailable(_) | Error::Moved { .. } | Error::Deleted | Error::Restarting => {
                return self.to_string();
            }
            _ => match self.journal_error() {
                Some(
                    JournalError::Corrupt { .. }
                    | JournalError::CorruptSegment { .. }
                    | JournalError::Foreign { .. },
                ) => "its stored data is damaged",
                Some(JournalError::Fenced { .. }) => "it is owned by another server",
                Some(JournalError::Backend { .. }) => "its storage is not answering",
                Some(JournalError::Io { error, .. }) if error.kind() == std::io::ErrorKind::StorageFull => {
                    "its disk is full"
                }
                _ if self.is_io() => "its storage failed",
                _ => "an internal error",
            },
        };
        format!("{kind} {}", crate::protocol::SEE_THE_LOG)
    }

    /// What a read of storage the journal does not hold asked for (an LSN outside its range,
    /// bytes past an entry's end), in words a client may be told; `None` for other errors.
    pub fn absent_read(&self) -> Option<String> {
        match self.journal_error()? {
            JournalError::OutOfRange { lsn, range, .. } => {
                Some(format!("storage entry {lsn} is not held (the entries held are {range})"))
            }
            JournalError::PastEntryEnd { lsn, len_bytes, .. } => {
                Some(format!("the read runs past the end of storage entry {lsn} ({len_bytes} bytes)"))
            }
            _ => None,
        }
    }

    /// The journal's error, directly or through the page store.
    fn journal_error(&self) -> Option<&JournalError> {
        match self {
            Error::Journal(e) | Error::Store(StoreError::Journal(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the storage failed in a way that may pass (an object store that did not answer
    /// or refused, a journal waiting to be reopened, a full disk, a timeout), not one that
    /// stays (a corrupt or foreign journal, a missing directory, a refused permission). An
    /// object store's refusals (403, no such bucket) count as passing: they cannot be told
    /// from an outage here.
    pub fn is_transient_storage(&self) -> bool {
        use std::io::ErrorKind as K;
        let Some(journal) = self.journal_error() else { return false };
        match journal {
            JournalError::Backend { .. } | JournalError::Poisoned { .. } => true,
            // A full disk, a timeout or an interrupted call may pass; a missing directory or a
            // refused permission needs someone to act.
            JournalError::Io { error, .. } => matches!(
                error.kind(),
                K::TimedOut | K::Interrupted | K::WouldBlock | K::StorageFull | K::ResourceBusy
            ),
            _ => false,
        }
    }

    /// Whether the storage failed (a journal or page-store error), as opposed to the SQL or
    /// the input: the work can succeed when retried.
    pub fn is_io(&self) -> bool {
        use rusqlite::ffi::ErrorCode as C;
        match self {
            Error::Store(_) | Error::Journal(_) => true,
            Error::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => matches!(
                f.code,
                C::SystemIoFailure | C::DatabaseCorrupt | C::OutOfMemory | C::CannotOpen | C::NotADatabase
            ),
            _ => false,
        }
    }
}
