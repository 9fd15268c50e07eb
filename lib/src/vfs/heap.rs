//! The browser's bound on the memory one mutation makes SQLite hold. There, one thread runs
//! SQLite, so its process-wide hard heap limit (`sqlite3_hard_heap_limit64`) can stand for the
//! native meter (`vfs/meter.rs`): set to what SQLite holds plus the bound while a mutation
//! runs, and lifted after. An allocation past it fails; SQLite answers `SQLITE_NOMEM`, and the
//! mutation is stopped `too_big` rather than the worker running out of memory (a wasm heap
//! ends at 4 GiB, and a page that hits it is gone).

use std::ffi::c_int;

use rusqlite::ffi;

/// A running mutation's limit: lifted when dropped.
pub struct Limited {
    limit: i64,
    /// The soft heap limit before (a hard limit lowers it), restored after.
    soft: i64,
}

impl Limited {
    pub fn start(bound: i64) -> Limited {
        // SAFETY: plain calls into SQLite's allocator statistics and limit, which take its
        // own mutex.
        unsafe {
            let limit = ffi::sqlite3_memory_used().saturating_add(bound);
            let soft = ffi::sqlite3_soft_heap_limit64(-1);
            // The high-water marks start over here: `refused` reads them.
            status(ffi::SQLITE_STATUS_MEMORY_USED, true);
            status(ffi::SQLITE_STATUS_MALLOC_SIZE, true);
            ffi::sqlite3_hard_heap_limit64(limit);
            Limited { limit, soft }
        }
    }

    /// Whether an allocation was most likely refused: the most SQLite held plus the largest
    /// allocation asked for reach the limit. (Read when the mutation failed.)
    pub fn refused(&self) -> bool {
        // SAFETY: as in `start`.
        let (held, largest) = unsafe {
            (status(ffi::SQLITE_STATUS_MEMORY_USED, false), status(ffi::SQLITE_STATUS_MALLOC_SIZE, false))
        };
        held.saturating_add(largest) >= self.limit
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        // SAFETY: as in `start`; 0 lifts the limit.
        unsafe {
            ffi::sqlite3_hard_heap_limit64(0);
            ffi::sqlite3_soft_heap_limit64(self.soft);
        }
    }
}

/// A status counter's high-water mark, restarted from its current value if `reset`.
unsafe fn status(op: c_int, reset: bool) -> i64 {
    let (mut current, mut highest) = (0, 0);
    // SAFETY: both pointers are to locals.
    unsafe { ffi::sqlite3_status64(op, &mut current, &mut highest, c_int::from(reset)) };
    highest
}
