//! The crate's one unsafe module: the system calls std does not wrap (`mmap`,
//! `sync_file_range`, `mallopt`), and a `pread` into a buffer's spare capacity
//! (`append_read_at`), which std's `read_exact_at` cannot do.
//!
//! `Mapped`, a read-only memory map of a segment file: a page read from a replica's storage
//! journal (`FileJournalOptions::map_reads`) becomes one copy out of the page cache instead of
//! a `pread` system call each, or no copy at all (`slice`, `Journal::mapped_part`: SQLite reads
//! the page in place; the slice borrows the journal, and `pagesync`'s store, which hands it to
//! SQLite past that borrow, changes nothing in the journal until SQLite gives it back). What
//! makes reading the map sound:
//! - segment files are append-only: a byte below a file's length is never written again (a
//!   torn tail is cut on open, before anything is mapped);
//! - the journal reads only bytes below the file's length: frames it indexed. The cuts of a
//!   file in use drop nothing a read can reach: a failed append's cuts bytes never indexed,
//!   and a failed fsync's cuts frames it also drops from the range (a read is `&self`, a cut
//!   `&mut self`, so none runs between);
//! - one process owns a journal's directory (`DirLock`), and a read-only journal (whose owner
//!   is another process) never maps.
//!
//! What it cannot keep: a disk that fails a read through the map, or a file cut from outside,
//! raises SIGBUS, which ends the process, where a `pread` would return an error.
//!
//! The map may reach past the file's end (it is made once, as large as a segment may grow):
//! those bytes are never read.

#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

#[derive(Debug)]
pub(crate) struct Mapped {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the map is never written through, and unmapped only on drop (with `&mut self`).
unsafe impl Send for Mapped {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps the first `len` bytes of `file` read-only (`len` may exceed its length).
    pub(crate) fn new(file: &File, len: usize) -> std::io::Result<Mapped> {
        if len == 0 {
            return Err(std::io::Error::other("an empty map"));
        }
        // SAFETY: a fresh shared read-only mapping of an open descriptor; no existing memory is
        // touched, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap gave null"))?;
        Ok(Mapped { ptr, len })
    }

    /// Copies the bytes at `at..at + out.len()` into `out`; `false` (nothing copied) when they
    /// lie past the map. The caller guarantees they lie below the file's length (see the
    /// module docs).
    pub(crate) fn copy(&self, at: u64, out: &mut [u8]) -> bool {
        self.slice(at, out.len()).map(|bytes| out.copy_from_slice(bytes)).is_some()
    }

    /// The `len` bytes at `at`, in place; `None` when they lie past the map. The caller
    /// guarantees they lie below the file's length (see the module docs).
    pub(crate) fn slice(&self, at: u64, len: usize) -> Option<&[u8]> {
        let at = usize::try_from(at).ok()?;
        if at.checked_add(len).is_none_or(|end| end > self.len) {
            return None;
        }
        // SAFETY: `at..at + len` lies within the mapping (checked above) and within the file
        // (the caller), whose bytes there never change while the journal is borrowed (module
        // docs); the map lives as long as `self`, which the slice borrows.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at), len) })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no reference into it outlives
        // `self` (`copy` copies out).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Appends exactly `len` bytes of `file` from `offset` to `out`, read into its spare capacity
/// (`pread`), not into bytes zeroed first: a server reading a cold start's entries of megabytes
/// each would otherwise write every byte twice. On an error `out` is as it was.
pub(crate) fn append_read_at(file: &File, out: &mut Vec<u8>, len: usize, offset: u64) -> std::io::Result<()> {
    out.reserve_exact(len);
    let mut done = 0;
    while done < len {
        // 64-bit offsets on 32-bit Linux too (as std's `read_exact_at`).
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        use libc::{off_t as Offset, pread};
        #[cfg(any(target_os = "linux", target_os = "android"))]
        use libc::{off64_t as Offset, pread64 as pread};
        let at = offset
            .checked_add(done as u64)
            .and_then(|at| Offset::try_from(at).ok())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let spare = &mut out.spare_capacity_mut()[done..len];
        // SAFETY: `spare` is `len - done` writable bytes of `out`'s allocation, which `pread`
        // fills from the start and no one reads before `set_len` below.
        let n = unsafe { pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    // SAFETY: the `len` bytes after the old length were all written by `pread` above.
    unsafe { out.set_len(out.len() + len) };
    Ok(())
}

/// Writeback hints waiting for the background thread, at most (each holds a duplicated file
/// descriptor): past it a hint is dropped.
#[cfg(target_os = "linux")]
const WRITEBACK_QUEUE: usize = 16;

/// Asks the kernel to start writing `len` bytes of `file` at `offset` to disk (Linux's
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`), on a background thread: submitting the writes
/// costs about half a millisecond per MiB, which the appending thread (a replica applying a
/// download) does not wait for, and the fsync that later makes the bytes durable then waits
/// for little. Only a hint: a failure is ignored (that fsync reports it), and other systems do
/// nothing. `false` when the hint was dropped because the queue is full, so that the next one
/// covers these bytes too.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::sync::{Mutex, OnceLock, mpsc};
        type Request = (File, u64, u64);
        static WRITER: OnceLock<Option<Mutex<mpsc::SyncSender<Request>>>> = OnceLock::new();
        let writer = WRITER.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Request>(WRITEBACK_QUEUE);
            let spawned = std::thread::Builder::new().name("pagesync-writeback".into()).spawn(move || {
                for (file, offset, len) in rx {
                    let (Ok(offset), Ok(len)) =
                        (libc::off64_t::try_from(offset), libc::off64_t::try_from(len))
                    else {
                        continue;
                    };
                    // SAFETY: a plain system call on a descriptor this request owns, with no
                    // memory passed.
                    unsafe {
                        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
                    }
                }
            });
            spawned.ok().map(|_| Mutex::new(tx))
        });
        // The descriptor is duplicated: the journal may close or delete the segment meanwhile.
        // A full queue (a disk slower than the appends) drops the hint: it only saves a wait.
        match (writer, file.try_clone()) {
            (Some(writer), Ok(file)) => writer.lock().map_or(true, |tx| {
                !matches!(tx.try_send((file, offset, len)), Err(mpsc::TrySendError::Full(_)))
            }),
            // No thread or no descriptor: there is nothing to try again.
            _ => true,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        true
    }
}

/// Makes the C allocator serve every allocation of `threshold` bytes or more from a mapping of
/// its own, given back to the system when it is freed. glibc otherwise raises that threshold
/// each time such a buffer is freed (up to 32 MiB), after which large buffers (a server's
/// frames of storage) come from its heap, and freed ones stay in the process: 150 subscribers
/// that never read a document of 10 MB entries kept a server at 630 MB where 330 MB were in
/// use. Does nothing where the allocator is not glibc's.
pub fn map_large_allocations(threshold: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let threshold = libc::c_int::try_from(threshold).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt only sets a parameter of the allocator; it takes no pointers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = threshold;
}

/// Gives the allocator's free memory back to the system (glibc's `malloc_trim`): after a
/// burst of small allocations was freed (a mutation stopped at its memory bound), which would
/// otherwise stay in the process. Does nothing where the allocator is not glibc's.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
