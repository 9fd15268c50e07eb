//! pagesync server: the tokio/websocket driver of the core. Not built yet (see the server issue).
#![forbid(unsafe_code)]
