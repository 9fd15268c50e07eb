//! pagesync native client: Rust API and the `pagesync` CLI. Not built yet (see the server issue).
#![forbid(unsafe_code)]
