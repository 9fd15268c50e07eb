//! pagesync journals: dense, LSN-addressed, checksummed logs of opaque entries.
//!
//! A document's storage journal and each client's timeline journal are `Journal`s. Backends:
//! [`MemoryJournal`], [`FileJournal`] (segment files with fsync) and, with the feature
//! `s3`, [`ObjectJournal`] (one object per batch, on S3 or a directory). The trait is synchronous
//! and small on purpose: SQLite's VFS calls into it synchronously.
//!
//! Invariants:
//! - an LSN, once returned by `append`, names the same bytes until `remove_prefix` passes it;
//! - `append` returns only when the entries are durable for the backend (fsync for files);
//!   `append_batch_unsynced` entries become durable at the next `sync`, and a crash before it
//!   loses them whole, from the end;
//! - a read returns the exact appended bytes or an error, never other bytes (with
//!   `FileJournalOptions::map_reads`, a disk error on a mapped read ends the process instead).
//!
//! This crate links no SQLite and reads no clock; only the `s3` feature brings an async runtime.
#![deny(unsafe_code)]

pub mod codec;
#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
#[cfg(unix)]
pub mod file;
pub mod handles;
mod id;
#[cfg(unix)]
pub mod lock;
mod lsn;
mod memory;
#[cfg(feature = "s3")]
pub mod object;
#[cfg(unix)]
mod os;

pub use error::{JournalError, Result};
#[cfg(unix)]
pub use file::{FileJournal, FileJournalOptions, create_fresh};
pub use handles::{HandleJournal, RandomAccess};
pub use id::{JournalId, ParseIdError};
#[cfg(unix)]
pub use lock::{DirLock, LockError};
pub use lsn::{Lsn, LsnRange};
pub use memory::MemoryJournal;
#[cfg(feature = "s3")]
pub use object::{ObjectBackend, ObjectInfo, ObjectJournal, ObjectStats, StoreProblem};
#[cfg(unix)]
pub use os::{map_large_allocations, release_free_memory};

/// A journal's barrier taken out of it (`Journal::detach_sync`): an fsync of each file its
/// unsynced entries are in, oldest first (one, unless segments rolled without a barrier:
/// `FileJournalOptions::roll_without_barrier`), through descriptors kept for barriers, opened
/// apart from the journal's own: Linux reports a failed write-back to every file open when it
/// happens (since 4.13), so neither the journal's own `sync` nor a barrier can take the
/// other's error. A failed barrier fails its journal as a failed `sync` does.
#[derive(Debug)]
pub struct DetachedSync {
    /// Each file, with the first LSN of its segment and the length it had then, in order.
    #[cfg_attr(not(unix), allow(dead_code))]
    parts: Vec<(std::fs::File, Lsn, u64)>,
    /// The journal's directory, fsynced after them, with how many new segments' entries in
    /// it that covers.
    #[cfg_attr(not(unix), allow(dead_code))]
    dir: Option<(std::fs::File, u64)>,
    /// Which journal (and how many entries it had taken back).
    #[cfg_attr(not(unix), allow(dead_code))]
    owner: (u64, u64),
}

impl DetachedSync {
    /// Waits for the entries' bytes to be on disk, oldest file first, stopping at the first
    /// failure. Blocking; needs no journal.
    pub fn run(&self) -> std::io::Result<()> {
        self.parts.iter().try_for_each(|(file, _, _)| file.sync_data())?;
        self.dir.as_ref().map_or(Ok(()), |(dir, _)| dir.sync_all())
    }
}

/// `Send` on native targets, nothing on wasm32, where a journal may hold browser handles
/// (`JsValue`s are not `Send`) and everything runs on one thread anyway. A supertrait of
/// [`Journal`], so `Box<dyn Journal>` is `Send` exactly where threads exist.
#[cfg(not(target_arch = "wasm32"))]
pub trait MaybeSend: Send {}
#[cfg(not(target_arch = "wasm32"))]
impl<T: Send + ?Sized> MaybeSend for T {}
/// See the native definition.
#[cfg(target_arch = "wasm32")]
pub trait MaybeSend {}
#[cfg(target_arch = "wasm32")]
impl<T: ?Sized> MaybeSend for T {}

/// A durable, dense log of entries addressed by `Lsn`.
pub trait Journal: MaybeSend {
    fn id(&self) -> JournalId;

    /// The LSNs currently readable; `next()` is the LSN the next append gets.
    fn range(&self) -> LsnRange;

    /// Appends one entry and returns its LSN once it is durable.
    fn append(&mut self, payload: &[u8]) -> Result<Lsn> {
        Ok(self.append_batch(&[payload])?.first())
    }

    /// Appends entries as one group commit: one durability barrier for all of them. Either all
    /// are appended or, on error, none is acknowledged.
    fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<LsnRange>;

    /// Appends entries without a durability barrier: readable at once, durable after the next
    /// `sync` (or durable append). A crash may lose them, whole and from the end, never turn
    /// them into other bytes. Backends whose every append is durable (memory, object stores,
    /// browser handles) simply append.
    fn append_batch_unsynced(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        self.append_batch(payloads)
    }

    /// Makes every entry appended so far durable (see `append_batch_unsynced`).
    fn sync(&mut self) -> Result<()> {
        Ok(())
    }

    /// Whether every entry appended so far is durable: no `sync` is pending.
    fn is_synced(&self) -> bool {
        true
    }

    /// `sync`, split so that its wait runs without the journal: returns the barrier for every
    /// entry appended so far, for the caller to `run` on any thread (a replica's storage,
    /// flushed every second, while its readers and writers go on), and to hand back with its
    /// outcome to `finish_detached_sync`. `None` when nothing is pending, or when the backend
    /// made its entries durable here (the default: it calls `sync`).
    fn detach_sync(&mut self) -> Result<Option<DetachedSync>> {
        self.sync().map(|()| None)
    }

    /// Records the outcome of a barrier from `detach_sync`: on success its entries are
    /// durable; on failure the journal acts as when `sync` fails (and returns that error).
    fn finish_detached_sync(&mut self, sync: DetachedSync, outcome: std::io::Result<()>) -> Result<()> {
        let _ = (sync, outcome);
        Ok(())
    }

    /// Whether `read_part` copies out of a memory map of the backend's files, with no system
    /// call (a `FileJournal` with `map_reads`): a reader gains nothing by reading ahead into a
    /// buffer of its own. `false` by default, which keeps a replica's read-ahead.
    fn reads_from_memory(&self) -> bool {
        false
    }

    /// `len` bytes of the entry at `lsn`, `offset` bytes into its payload, in place in the
    /// backend's memory map (`reads_from_memory`), with no copy; `None` when the backend does
    /// not map, or they are not all in that entry or in the map. Read as `read_part` reads
    /// (no checksum). The bytes stay as they are for as long as the journal is borrowed:
    /// only a change (`&mut self`: a removal, a failed barrier's cut) can take them away.
    fn mapped_part(&self, lsn: Lsn, offset: usize, len: usize) -> Option<&[u8]> {
        let _ = (lsn, offset, len);
        None
    }

    /// The payload of the entry at `lsn`.
    fn read(&self, lsn: Lsn) -> Result<Vec<u8>>;

    /// Appends the payload of the entry at `lsn` to `out` (which keeps what it held before, and
    /// is left as it was on an error): for a reader that sends the payload behind a header of
    /// its own, with no copy out of a buffer of the journal's. Verified as `read` verifies.
    fn read_into(&self, lsn: Lsn, out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(&self.read(lsn)?);
        Ok(())
    }

    /// The payloads of every entry in `range`, in order. The range must lie within `range()`.
    fn read_range(&self, range: LsnRange) -> Result<Vec<Vec<u8>>> {
        range.iter().map(|lsn| self.read(lsn)).collect()
    }

    /// Copies `buf.len()` bytes of the entry at `lsn`, starting `offset` bytes into its payload.
    /// Used to fetch one page out of a large entry. Backends may skip the checksum here (the
    /// file backend verified every frame when it opened); the bounds are always checked.
    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        let payload = self.read(lsn)?;
        let part = offset.checked_add(buf.len()).and_then(|end| payload.get(offset..end));
        buf.copy_from_slice(part.ok_or_else(|| part_out_of_bounds(self.id(), lsn, payload.len()))?);
        Ok(())
    }

    /// Forgets every entry with an LSN `<= up_to`. Up to the last entry, `next()` does not
    /// change, also when every entry is removed. Past it, the journal restarts later: it is
    /// empty and `next()` becomes `up_to + 1` (a replica that installs a snapshot taken at
    /// `up_to` continues from there). Backends may keep removed bytes on disk until a whole
    /// segment can go, but they are never readable again. On error nothing was removed: once
    /// the trim point is durable the call succeeds, and space it failed to free (a file or
    /// object that would not delete) is freed later.
    fn remove_prefix(&mut self, up_to: Lsn) -> Result<()>;

    /// Whether `remove_last` is supported.
    fn can_remove_last(&self) -> bool {
        false
    }

    /// Removes the newest entry, durably, as if it had never been appended: its LSN is the next
    /// append's. For a writer that appended it beside another journal's entry and must take it
    /// back when the other did not become durable (see `pagesync::history`). On error the
    /// entry is no longer readable (the journal refuses writes until reopened, as after a
    /// failed fsync), but may still be on disk. Backends that cannot: an error.
    fn remove_last(&mut self) -> Result<()> {
        let message = "this backend cannot remove its newest entry".into();
        Err(JournalError::Backend { journal: self.id(), message })
    }
}

pub(crate) fn part_out_of_bounds(journal: JournalId, lsn: Lsn, len: usize) -> JournalError {
    JournalError::PastEntryEnd { journal, lsn, len_bytes: len }
}

/// Checks a payload against the entry size limit.
pub(crate) fn check_entry_len(journal: JournalId, payload: &[u8]) -> Result<()> {
    if payload.len() > codec::MAX_ENTRY_BYTES {
        return Err(JournalError::EntryTooLarge {
            journal,
            len_bytes: payload.len(),
            max_bytes: codec::MAX_ENTRY_BYTES,
        });
    }
    Ok(())
}

/// The `OutOfRange` error when `range` does not lie within `have`.
pub(crate) fn check_in_range(journal: JournalId, have: LsnRange, range: LsnRange) -> Result<()> {
    let outside = [Some(range.first()), range.last()]
        .into_iter()
        .flatten()
        .find(|&lsn| !range.is_empty() && !have.contains(lsn));
    match outside {
        Some(lsn) => Err(JournalError::OutOfRange { journal, lsn, range: have }),
        None => Ok(()),
    }
}
