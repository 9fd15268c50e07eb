//! Storage entries on the wire: LZ4-compressed, either whole or as an XOR delta of every page
//! against its previous version (the version the receiver holds when it is exactly one entry
//! behind). A one-row change then costs a few hundred bytes instead of several pages.
//!
//! Format: `kind u8 (0 = full, 1 = delta) | raw_len u32 | lz4 block`. Decoding checks `raw_len`
//! against `MAX_ENTRY_BYTES` before allocating, so a forged length cannot exhaust memory.
//!
//! A third kind (2) confirms by digest: to the client whose mutations, and only those, the
//! entry applied, the server sends a `Confirm` (what the entry records beside its pages, and a
//! digest of the whole entry) in place of the pages. The client replays its own pending
//! mutations as the server's step did, checks the digest and keeps its own pages
//! (`ClientDocument::receive_wire`); a mismatch falls back to the pages.

use serde::{Deserialize, Serialize};

use crate::page::{PAGE_SIZE, Page};
use crate::storage::{self, EntryHeader};
use pagesync_journal::codec::MAX_ENTRY_BYTES;

/// One storage entry as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    pub kind: WireKind,
    /// `Full` and `Delta`: `raw_len u32 LE | lz4 block` of the (possibly XORed) payload.
    /// `Confirm`: a postcard-encoded `Confirm`.
    #[serde(with = "crate::bytes")]
    pub data: Vec<u8>,
}

/// How a `WireEntry` carries its storage entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireKind {
    /// The payload, whole.
    Full,
    /// The payload with every page XORed with its previous version: for a receiver that holds
    /// the entry before it.
    Delta,
    /// No pages: for the receiver whose pending mutations the entry applied (and no others),
    /// which holds the entry before it and makes the pages itself.
    Confirm,
}

/// Bytes of the digest in a `Confirm`: the first 16 of the entry's SHA-256.
pub const DIGEST_BYTES: usize = 16;

/// What a storage entry records beside its pages, for the client whose mutations it applied:
/// that client replays them (its mutations `first..=last()`, each at its own time, as one step),
/// deletes the same rejections (`forgotten`), writes the same system rows, cuts the entry as
/// the server did (dated `entry_time_ms`) and keeps it when its digest is `digest`. Small on
/// the wire: a one-row commit's whole `Storage` frame is about 60 bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirm {
    /// The first of the client's mutations the step applied.
    pub first: pagesync_journal::Lsn,
    /// How many it applied after `first`.
    pub more: u64,
    /// The entry's time less the last mutation's own time (which the client knows): a few
    /// milliseconds, a byte or two.
    pub time_after_ms: i64,
    pub forgotten: Vec<(crate::ids::TimelineId, pagesync_journal::Lsn)>,
    pub digest: [u8; DIGEST_BYTES],
}

impl Confirm {
    /// The last of the client's mutations the step applied; `None` past the LSN space.
    pub fn last(&self) -> Option<pagesync_journal::Lsn> {
        self.first.get().checked_add(self.more).and_then(pagesync_journal::Lsn::new)
    }

    /// The entry's time, given the last mutation's own.
    pub fn entry_time_ms(&self, last_mutation_ms: i64) -> i64 {
        last_mutation_ms.wrapping_add(self.time_after_ms)
    }
}

/// The digest a `Confirm` carries: the first `DIGEST_BYTES` of the payload's SHA-256.
pub fn digest(payload: &[u8]) -> [u8; DIGEST_BYTES] {
    use sha2::Digest as _;
    let full = sha2::Sha256::digest(payload);
    full[..DIGEST_BYTES].try_into().expect("BUG: SHA-256 is 32 bytes")
}

/// Why a wire entry could not be turned back into a storage entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("wire entry declares {len} bytes, above the limit of {MAX_ENTRY_BYTES}")]
    TooLarge { len: usize },
    #[error("wire entry does not decompress: {0}")]
    Corrupt(String),
    #[error("wire entry: {0}")]
    Entry(#[from] storage::EntryError),
}

/// XORs the page bytes of `payload` with `olds` (one per page of `header`, in order).
pub fn xor_pages(header: &EntryHeader, mut payload: Vec<u8>, olds: &[&Page]) -> Vec<u8> {
    assert_eq!(olds.len(), header.pages.len(), "BUG: one previous version per page");
    for (i, old) in olds.iter().enumerate() {
        let at = header.page_offset(i);
        payload[at..at + PAGE_SIZE].iter_mut().zip(old.iter()).for_each(|(b, o)| *b ^= o);
    }
    payload
}

fn compress(raw: &[u8]) -> Vec<u8> {
    let mut out = (raw.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&lz4_flex::block::compress(raw));
    out
}

impl WireEntry {
    pub fn full(payload: &[u8]) -> WireEntry {
        WireEntry { kind: WireKind::Full, data: compress(payload) }
    }

    pub fn delta(delta_payload: &[u8]) -> WireEntry {
        WireEntry { kind: WireKind::Delta, data: compress(delta_payload) }
    }

    pub fn confirm(confirm: &Confirm) -> WireEntry {
        WireEntry {
            kind: WireKind::Confirm,
            data: postcard::to_stdvec(confirm).expect("BUG: a Confirm serializes"),
        }
    }

    /// Whether it holds no whole pages: a receiver needs the entry before it.
    pub fn needs_previous(&self) -> bool {
        self.kind != WireKind::Full
    }

    /// The `Confirm` of a `WireKind::Confirm` entry.
    pub fn as_confirm(&self) -> Option<Result<Confirm, WireError>> {
        (self.kind == WireKind::Confirm)
            .then(|| postcard::from_bytes(&self.data).map_err(|e| WireError::Corrupt(e.to_string())))
    }

    /// The compressed payload, bounded by `MAX_ENTRY_BYTES`.
    pub fn decompress(&self) -> Result<Vec<u8>, WireError> {
        if self.kind == WireKind::Confirm {
            return Err(WireError::Corrupt("a confirmation carries no pages".into()));
        }
        let Some((len, block)) = self.data.split_first_chunk::<4>() else {
            return Err(WireError::Corrupt("shorter than its length prefix".into()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(WireError::TooLarge { len });
        }
        let mut out = vec![0u8; len];
        let n = lz4_flex::block::decompress_into(block, &mut out)
            .map_err(|e| WireError::Corrupt(e.to_string()))?;
        if n != len {
            return Err(WireError::Corrupt(format!("decompressed to {n} bytes, declared {len}")));
        }
        Ok(out)
    }

    /// The storage entry's payload. For a delta, `previous` gives the receiver's version of each
    /// page (which must be the state just before this entry).
    pub fn resolve(
        &self,
        mut previous: impl FnMut(crate::page::PageIdx) -> Result<std::sync::Arc<Page>, crate::store::StoreError>,
    ) -> Result<Result<Vec<u8>, WireError>, crate::store::StoreError> {
        let raw = match self.decompress() {
            Ok(raw) => raw,
            Err(e) => return Ok(Err(e)),
        };
        let header = match storage::decode(&raw) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e.into())),
        };
        if self.kind == WireKind::Full {
            return Ok(Ok(raw));
        }
        let olds = header.pages.iter().map(|&idx| previous(idx)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Page> = olds.iter().map(|p| &**p).collect();
        Ok(Ok(xor_pages(&header, raw, &refs)))
    }
}
