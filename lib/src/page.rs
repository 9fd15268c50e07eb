//! Pages: the unit of replication. The page size is 4096 bytes on every target.

use std::num::NonZeroU32;

/// Bytes per page, on every target (the wasm SQLite build defaults to 8192: we set it
/// explicitly before the first write and refuse any other size).
pub const PAGE_SIZE: usize = 4096;

/// One page's bytes.
pub type Page = [u8; PAGE_SIZE];

/// A 1-based page number, as SQLite numbers them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PageIdx(NonZeroU32);

impl PageIdx {
    pub const FIRST: PageIdx = PageIdx(NonZeroU32::MIN);

    pub fn new(n: u32) -> Option<PageIdx> {
        NonZeroU32::new(n).map(PageIdx)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The page holding byte `offset` of the database file.
    pub fn containing(offset: u64) -> PageIdx {
        let n = u32::try_from(offset / PAGE_SIZE as u64 + 1).expect("BUG: offset beyond 2^32 pages");
        PageIdx::new(n).expect("BUG: n >= 1")
    }

    /// Byte offset of the page in the database file.
    pub fn offset(self) -> u64 {
        (self.get() as u64 - 1) * PAGE_SIZE as u64
    }
}

/// An all-zero page, for pages within the file size that were never written.
pub static ZERO_PAGE: Page = [0u8; PAGE_SIZE];
