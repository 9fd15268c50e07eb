//! pagesync core. Filled by the core issue.
pub use pagesync_journal as journal;
