//! Shared helpers for pagesync's integration tests (the tests live in `tests/tests/`).
#![forbid(unsafe_code)]
