//! Storage entries on the wire: compressed, either whole or as an XOR delta of every page
//! against its previous version (the version the receiver holds when it is exactly one entry
//! behind). A one-row change then costs a few hundred bytes instead of several pages.
//!
//! Format: `kind u8 (0 = full, 1 = delta) | codec u8 | raw_len u32 | block`. The codec is
//! chosen by size: LZ4 (0) for entries under `ZSTD_MIN_BYTES` (a commit of a few rows, where
//! its speed matters most and an entropy coder gains a few bytes), zstd (1) at or above it
//! (batches of rows, checkpoints), where its entropy coding saves a quarter of the bytes of
//! text-like rows that LZ4 cannot; or the bytes as they are (2, "stored") when a sample of a
//! large entry shows it does not compress. Decoding checks `raw_len` against `MAX_ENTRY_BYTES`
//! before allocating and decompresses into exactly that many bytes (zstd in one shot, with no
//! window buffer of the frame's choosing), so a forged length or frame cannot exhaust memory.
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
    /// `Full` and `Delta`: `codec u8 | raw_len u32 LE | block` of the (possibly XORed)
    /// payload (see the module docs).
    /// `Confirm`: a postcard-encoded `Confirm`.
    #[serde(with = "crate::bytes::shared")]
    pub data: bytes::Bytes,
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

/// Raw entries this large or larger are compressed with zstd, smaller ones with LZ4.
pub const ZSTD_MIN_BYTES: usize = 16 << 10;

/// zstd's fastest level with entropy coding: 300-500 MB/s on one core here.
const ZSTD_LEVEL: i32 = 1;

/// A large entry is first sampled: this many chunks of `SAMPLE_CHUNK_BYTES`, spread evenly
/// over it, compressed together. When they save less than a sixteenth, the entry is sent as
/// it is: incompressible pages (media, encrypted or already compressed data) then cost the
/// sender a sample instead of a full pass, and the receiver a copy.
const SAMPLE_CHUNKS: usize = 16;
const SAMPLE_CHUNK_BYTES: usize = 4 << 10;

/// The codec byte of a compressed entry.
const CODEC_LZ4: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const CODEC_STORED: u8 = 2;

thread_local! {
    /// One zstd context per thread, kept: a new one per entry allocated its workspace (about a
    /// megabyte at level 1, fresh pages the kernel had to fault in and zero) every time, a
    /// third of a server step's compression time in a profile of the 100-row benchmark.
    static ZSTD_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `raw` compressed at `ZSTD_LEVEL`, with this thread's context.
fn zstd_compress(raw: &[u8]) -> Vec<u8> {
    // Compressing a buffer in memory fails only on allocation failure.
    ZSTD_COMPRESSOR.with_borrow_mut(|slot| {
        let ctx = match slot {
            Some(ctx) => ctx,
            None => slot.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("BUG: a zstd context")),
        };
        ctx.compress(raw).expect("BUG: zstd compresses a buffer")
    })
}

/// Decompresses the zstd frame `block` into `out` (at most its length), with this thread's
/// context; the bytes written.
fn zstd_decompress(block: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    ZSTD_DECOMPRESSOR.with_borrow_mut(|slot| {
        let ctx = match slot {
            Some(ctx) => ctx,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        ctx.decompress_to_buffer(block, out)
    })
}

/// Whether zstd is worth a full pass over `raw` (see `SAMPLE_CHUNKS`).
fn worth_compressing(raw: &[u8]) -> bool {
    let stride = raw.len() / SAMPLE_CHUNKS;
    if stride < SAMPLE_CHUNK_BYTES {
        return true;
    }
    let sample: Vec<u8> =
        (0..SAMPLE_CHUNKS).flat_map(|i| &raw[i * stride..i * stride + SAMPLE_CHUNK_BYTES]).copied().collect();
    let packed = zstd_compress(&sample);
    packed.len() < sample.len() - sample.len() / 16
}

/// Bytes of `WireEntry::data` before the block: the codec byte and the raw length.
const BLOCK_AT: usize = 1 + 4;

fn codec_for(raw: &[u8]) -> u8 {
    match raw.len() {
        n if n < ZSTD_MIN_BYTES => CODEC_LZ4,
        _ if worth_compressing(raw) => CODEC_ZSTD,
        _ => CODEC_STORED,
    }
}

fn compress(raw: &[u8]) -> Vec<u8> {
    compress_as(codec_for(raw), raw)
}

fn compress_as(codec: u8, raw: &[u8]) -> Vec<u8> {
    // The block first, then a buffer of exactly its size: recent entries are kept in memory
    // (and counted by their length), so none may carry unused capacity.
    let compressed;
    let block = match codec {
        CODEC_LZ4 => {
            compressed = lz4_flex::block::compress(raw);
            &compressed[..]
        }
        CODEC_ZSTD => {
            compressed = zstd_compress(raw);
            &compressed[..]
        }
        _ => raw,
    };
    let mut out = Vec::with_capacity(BLOCK_AT + block.len());
    out.push(codec);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(block);
    out
}

impl WireEntry {
    pub fn full(payload: &[u8]) -> WireEntry {
        WireEntry { kind: WireKind::Full, data: compress(payload).into() }
    }

    /// `full` of the payload `read` appends to the buffer it is given (a journal's `read_into`):
    /// an incompressible payload is sent in that buffer, behind the header, with no copy (a
    /// cold start reads gigabytes of them).
    pub fn full_read<E>(read: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<WireEntry, E> {
        let mut data = vec![CODEC_STORED; BLOCK_AT];
        read(&mut data)?;
        let raw = &data[BLOCK_AT..];
        let codec = codec_for(raw);
        if codec != CODEC_STORED {
            return Ok(WireEntry { kind: WireKind::Full, data: compress_as(codec, raw).into() });
        }
        let len = u32::try_from(raw.len()).expect("BUG: an entry's payload is below MAX_ENTRY_BYTES");
        data[1..BLOCK_AT].copy_from_slice(&len.to_le_bytes());
        // Entries kept in memory are counted by their length: a buffer that grew past it (a
        // backend without a `read_into` of its own) is trimmed. A `FileJournal`'s is exact.
        data.shrink_to_fit();
        Ok(WireEntry { kind: WireKind::Full, data: data.into() })
    }

    pub fn delta(delta_payload: &[u8]) -> WireEntry {
        WireEntry { kind: WireKind::Delta, data: compress(delta_payload).into() }
    }

    pub fn confirm(confirm: &Confirm) -> WireEntry {
        WireEntry {
            kind: WireKind::Confirm,
            data: postcard::to_stdvec(confirm).expect("BUG: a Confirm serializes").into(),
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

    /// The payload, in the buffer it arrived in when it was sent uncompressed (incompressible
    /// pages: a cold start moves gigabytes that way, and this is the copy it no longer makes).
    pub fn into_payload(self) -> Result<Payload, WireError> {
        if self.parts()?.0 == CODEC_STORED {
            // The block is the rest of the buffer, past the codec byte and the length.
            return Ok(Payload { buf: self.data, start: BLOCK_AT });
        }
        self.decompress().map(Payload::from)
    }

    /// The codec, the declared length (at most `MAX_ENTRY_BYTES`) and the block of an entry
    /// that carries pages; a stored block must be exactly the declared length.
    fn parts(&self) -> Result<(u8, usize, &[u8]), WireError> {
        if self.kind == WireKind::Confirm {
            return Err(WireError::Corrupt("a confirmation carries no pages".into()));
        }
        let Some((&codec, rest)) = self.data.split_first() else {
            return Err(WireError::Corrupt("empty".into()));
        };
        let Some((len, block)) = rest.split_first_chunk::<4>() else {
            return Err(WireError::Corrupt("shorter than its length prefix".into()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_ENTRY_BYTES {
            return Err(WireError::TooLarge { len });
        }
        if codec == CODEC_STORED && block.len() != len {
            return Err(WireError::Corrupt(format!("decompressed to {} bytes, declared {len}", block.len())));
        }
        Ok((codec, len, block))
    }

    /// The compressed payload, bounded by `MAX_ENTRY_BYTES`.
    pub fn decompress(&self) -> Result<Vec<u8>, WireError> {
        let (codec, len, block) = self.parts()?;
        if codec == CODEC_STORED {
            // Copied once, not into a zeroed buffer first (`into_payload` does not copy).
            return Ok(block.to_vec());
        }
        let mut out = vec![0u8; len];
        let n = match codec {
            CODEC_LZ4 => lz4_flex::block::decompress_into(block, &mut out)
                .map_err(|e| WireError::Corrupt(e.to_string()))?,
            CODEC_ZSTD => {
                zstd_decompress(block, &mut out[..]).map_err(|e| WireError::Corrupt(format!("zstd: {e}")))?
            }
            other => return Err(WireError::Corrupt(format!("unknown codec {other}"))),
        };
        if n != len {
            return Err(WireError::Corrupt(format!("decompressed to {n} bytes, declared {len}")));
        }
        Ok(out)
    }

    /// The storage entry's payload. For a delta, `previous` gives the receiver's version of each
    /// page (which must be the state just before this entry).
    pub fn resolve(
        self,
        mut previous: impl FnMut(crate::page::PageIdx) -> Result<std::sync::Arc<Page>, crate::store::StoreError>,
    ) -> Result<Result<Payload, WireError>, crate::store::StoreError> {
        let kind = self.kind;
        let raw = match self.into_payload() {
            Ok(raw) => raw,
            Err(e) => return Ok(Err(e)),
        };
        let header = match storage::decode(&raw) {
            Ok(h) => h,
            Err(e) => return Ok(Err(e.into())),
        };
        if kind == WireKind::Full {
            return Ok(Ok(raw));
        }
        let olds = header.pages.iter().map(|&idx| previous(idx)).collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Page> = olds.iter().map(|p| &**p).collect();
        Ok(Ok(Payload::from(xor_pages(&header, raw.into_vec(), &refs))))
    }

    /// Moves the entry out, leaving an empty one of the same kind in its place.
    pub fn take(&mut self) -> WireEntry {
        WireEntry { kind: self.kind, data: std::mem::take(&mut self.data) }
    }
}

/// A storage entry's payload, kept in the buffer it arrived in when it can be: a stored
/// (uncompressed) entry is the bytes past the wire's codec byte and length, not a copy of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payload {
    buf: bytes::Bytes,
    start: usize,
}

impl Payload {
    /// The payload as a vector of its own: the buffer itself when it is the payload's alone
    /// (a decompressed one), else a copy (a view of a frame, or past the wire's header).
    pub fn into_vec(self) -> Vec<u8> {
        match self.start {
            0 => self.buf.into(),
            start => self.buf.slice(start..).into(),
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(buf: Vec<u8>) -> Payload {
        Payload { buf: buf.into(), start: 0 }
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageIdx;

    /// A storage entry of `pages` pages, each filled by `fill(page, byte)`.
    fn entry(pages: u32, fill: impl Fn(u32, usize) -> u8) -> Vec<u8> {
        let owned: Vec<Page> = (1..=pages).map(|p| std::array::from_fn(|i| fill(p, i))).collect();
        let refs: Vec<(PageIdx, &Page)> = owned
            .iter()
            .enumerate()
            .map(|(i, p)| (PageIdx::new(i as u32 + 1).expect("non-zero"), p))
            .collect();
        storage::encode(pages, 7, None, &[], &[], &refs)
    }

    fn noise(seed: u32, i: usize) -> u8 {
        let x = (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        (x ^ (x >> 29)).wrapping_mul(0x94d0_49bb_1331_11eb).to_le_bytes()[3]
    }

    #[test]
    fn each_size_and_content_takes_its_codec_and_comes_back_whole() {
        let small = entry(2, |p, i| (p as usize + i % 7) as u8);
        let text = entry(32, |p, i| b"abcdefghij0123"[(i * 7 + p as usize) % 14]);
        let random = entry(32, noise);
        for (raw, codec) in [(&small, CODEC_LZ4), (&text, CODEC_ZSTD), (&random, CODEC_STORED)] {
            let wire = WireEntry::full(raw);
            assert_eq!(wire.data[0], codec, "entry of {} bytes", raw.len());
            assert_eq!(&wire.decompress().expect("decompresses"), raw);
            let payload = wire.clone().into_payload().expect("payload");
            assert_eq!(&*payload, &raw[..], "the payload in place is the entry");
            assert_eq!(&payload.clone().into_vec(), raw, "and so is its own vector");
        }
        assert!(WireEntry::full(&text).data.len() < text.len() / 4, "text compresses");
        assert_eq!(WireEntry::full(&random).data.len(), random.len() + 5, "noise is sent as it is");
    }

    /// An entry read into a buffer of its own (`full_read`) is the entry `full` makes, whatever
    /// its codec; a failed read is the reader's error.
    #[test]
    fn an_entry_read_into_its_own_buffer_is_the_same_entry() {
        let text = entry(32, |p, i| b"abcdefghij0123"[(i * 7 + p as usize) % 14]);
        for raw in [entry(1, noise), entry(32, noise), text] {
            let read = WireEntry::full_read(|out| {
                out.extend_from_slice(&raw);
                Ok::<_, ()>(())
            });
            let read = read.expect("read");
            assert_eq!(read, WireEntry::full(&raw), "entry of {} bytes", raw.len());
            // A decompressed payload becomes a vector with no copy.
            let payload = Payload::from(raw.clone());
            let at = payload.as_ptr();
            let vec = payload.into_vec();
            assert_eq!(vec.as_ptr(), at);
        }
        assert_eq!(WireEntry::full_read(|_| Err("gone")), Err("gone"));
    }

    #[test]
    fn damaged_or_forged_entries_are_refused_without_overrunning_their_length() {
        let text = entry(32, |p, i| b"abcdefghij0123"[(i * 7 + p as usize) % 14]);
        let good = WireEntry::full(&text);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut data = good.data.to_vec();
            f(&mut data);
            WireEntry { kind: WireKind::Full, data: data.into() }.decompress()
        };
        // A declared length shorter than the frame holds: zstd stops at the buffer's end.
        assert!(matches!(
            with(&|d| d[1..5].copy_from_slice(&1000u32.to_le_bytes())),
            Err(WireError::Corrupt(_))
        ));
        assert!(matches!(with(&|d| d[0] = 9), Err(WireError::Corrupt(_))));
        assert!(matches!(with(&|d| d.truncate(40)), Err(WireError::Corrupt(_))));
        let huge = (MAX_ENTRY_BYTES as u32 + 1).to_le_bytes();
        assert!(matches!(with(&|d| d[1..5].copy_from_slice(&huge)), Err(WireError::TooLarge { .. })));
        // Stored bytes must be exactly the declared length.
        let stored = WireEntry::full(&entry(32, noise));
        let edited = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut data = stored.data.to_vec();
            f(&mut data);
            WireEntry { kind: WireKind::Full, data: data.into() }
        };
        let short = edited(&|d| {
            d.pop();
        });
        assert!(matches!(short.decompress(), Err(WireError::Corrupt(_))));
        assert!(matches!(short.clone().into_payload(), Err(WireError::Corrupt(_))), "nor kept in place");
        let long = edited(&|d| d.push(0));
        assert!(matches!(long.into_payload(), Err(WireError::Corrupt(_))));
        let forged = edited(&|d| d[1..5].copy_from_slice(&huge));
        assert!(matches!(forged.into_payload(), Err(WireError::TooLarge { .. })));
        assert!(matches!(
            WireEntry { kind: WireKind::Full, data: bytes::Bytes::new() }.decompress(),
            Err(WireError::Corrupt(_))
        ));
    }
}
