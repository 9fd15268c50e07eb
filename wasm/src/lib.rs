//! pagesync in the browser: the part that runs inside a dedicated worker.
//!
//! `Replica` is one document's local replica: SQLite over the page VFS, its storage and
//! timeline journals in OPFS (as [`HandleJournal`](pagesync::journal::HandleJournal)s over
//! `FileSystemSyncAccessHandle`s, opened before SQLite needs them), and the same sans-io
//! `ClientSession` the native client runs. JavaScript (`wasm/js/worker.js`) owns the WebSocket
//! and the timers and passes frames and the time in; the core reads no clock and draws no
//! randomness. Where OPFS is missing the journals live in memory, and `storage_kind()` says so.
//!
//! Everything here is for `wasm32`; on other targets the crate is empty.
#![forbid(unsafe_code)]

#[cfg(target_arch = "wasm32")]
mod opfs;
#[cfg(target_arch = "wasm32")]
mod replica;
#[cfg(target_arch = "wasm32")]
mod value;

#[cfg(target_arch = "wasm32")]
pub use opfs::{OpfsFile, open_pair, remove_document};
#[cfg(target_arch = "wasm32")]
pub use replica::Replica;
