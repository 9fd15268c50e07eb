//! pagesync core: SQLite over a page-journal VFS, the deterministic reducer, and the client and
//! server documents. Sans-io: no sockets, no clock reads, no threads; time and seeds come in as
//! arguments.
//!
//! - [`store::PageStore`]: the database file as pages in the storage journal (+ overlay).
//! - `vfs` (private): the SQLite VFS over the page store; the only unsafe code in this crate.
//! - [`db::Database`]: a connection over a page store, with deterministic `random()`, clock and
//!   an authorizer for app SQL.
//! - [`reducer`]: the `Reducer` trait and the SQL reducer.
//! - [`sandbox`]: what app SQL may do (the allow-list) and the budget it runs under.
//! - [`server::ServerDocument`], [`client::ClientDocument`].
//! - [`remote::RemoteSnapshot`]: a document's server state, queried before its download ends.
#![deny(unsafe_code)]

mod bytes;
pub mod client;
pub mod db;
pub mod error;
pub mod history;
pub mod ids;
pub mod mutation;
pub mod mutators;
pub mod page;
pub mod protocol;
pub mod reducer;
pub mod remote;
pub mod sandbox;
pub mod server;
pub mod storage;
pub mod store;
mod vfs;
#[cfg(not(target_arch = "wasm32"))]
pub use vfs::meter::install as install_memory_meter;
pub mod wire;

pub use client::{
    ClientDocument, ConfirmStats, Durability, MutationState, NORMAL_SYNC_MS, Outcomes, Rows, SEND_AHEAD_LSNS,
    Submitted,
};
pub use error::{Error, Result};
pub use ids::{DocId, TimelineId, TimelineKey};
pub use mutation::{Mutation, SqlMutation, Statement, Value};
pub use pagesync_journal as journal;
pub use reducer::{Reducer, Rejection, RejectionCode, SqlReducer};
pub use sandbox::Budget;
pub use server::{CHECKPOINT_PARTS_PER_STEP, Compaction, Rejected, ServerDocument, StepLimits, StepOutcome};
pub use store::Checkpoint;
