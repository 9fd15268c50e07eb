//! pagesync browser build: worker, OPFS journals, WebSocket driver. Not built yet (see the browser issue).
#![forbid(unsafe_code)]
