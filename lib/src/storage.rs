//! The storage journal entry: one reducer step on the server.
//!
//! ```text
//! version u8 = 4 | page_count u32 | n_applied u32 | n_pages u32 | n_forgotten u32
//! time_ms i64 | part u32 | parts u32 | pad [3] = 0
//! applied:   n_applied x (timeline [16] | lsn u64 | time_ms i64)
//! forgotten: n_forgotten x (timeline [16] | lsn u64)
//! page_idx:  n_pages x u32, strictly ascending, each <= page_count
//! pages:     n_pages x 4096 bytes
//! ```
//!
//! Version 3 (still read) has no `pad`; version 2 (still read) has no `pad`, no `n_forgotten`
//! and no `forgotten` list. The pad makes the header 36 bytes, so every list and page starts at
//! a multiple of 4 from the payload's start, and payloads are of a length divisible by 4: in
//! a file journal (20-byte frame headers after a 40-byte segment header), the pages of a
//! segment of version 4 entries lie 4-byte aligned, as SQLite needs (2-byte) of a page it
//! reads in place (`PageStore::fetch`). Version 3's 33-byte header put every other entry's
//! pages at odd offsets, and an entry of it shifts the entries after it in its segment by one
//! byte: such pages are read by copy. `forgotten` names the
//! timelines whose rejection rows the step deleted, through which LSN (their clients had
//! copied them: see `ServerDocument::forget_rejections`), so a replay deletes the same rows.
//! `time_ms` is the server's clock when it wrote the entry (restore by time reads it). `part`
//! and `parts` are 0 for a step; a checkpoint is `parts` entries, part 1..=parts in order,
//! that together hold every page of the document, with steps possibly between them (see
//! `PageStore`'s module docs).
//!
//! Little endian. Pages are stored uncompressed so a reader can fetch one page by offset
//! (`page_offset`) without decoding the entry; compression happens on the wire.

use pagesync_journal::Lsn;

use crate::ids::TimelineId;
use crate::page::{PAGE_SIZE, Page, PageIdx};

const VERSION: u8 = 4;
/// Version 2's header: no `n_forgotten`.
const HEADER_BYTES_V2: usize = 29;
/// Version 3's header: no pad.
const HEADER_BYTES_V3: usize = 33;
const HEADER_BYTES: usize = 36;

/// The header's length in an entry of `version`; `None` for a version this build does not read.
fn header_bytes(version: u8) -> Option<usize> {
    match version {
        2 => Some(HEADER_BYTES_V2),
        3 => Some(HEADER_BYTES_V3),
        VERSION => Some(HEADER_BYTES),
        _ => None,
    }
}
const APPLIED_BYTES: usize = 32;
const FORGOTTEN_BYTES: usize = 24;

/// One mutation applied by a step: its timeline, its LSN there, and the clock it ran with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Applied {
    pub timeline: TimelineId,
    pub lsn: Lsn,
    /// The clamped client time the mutation ran with; replay uses it.
    pub time_ms: i64,
}

/// Which part of a checkpoint an entry is: `index` in `1..=count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub index: u32,
    pub count: u32,
}

/// A decoded storage entry (the page bytes stay in the payload; see `page_offset`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    pub page_count: u32,
    /// The server's clock when it wrote the entry.
    pub time_ms: i64,
    /// Set on the parts of a checkpoint.
    pub checkpoint: Option<Part>,
    pub applied: Vec<Applied>,
    /// Timelines whose rejections through an LSN the step deleted.
    pub forgotten: Vec<(TimelineId, Lsn)>,
    pub pages: Vec<PageIdx>,
    /// Bytes before the lists (by version).
    header_bytes: usize,
}

impl EntryHeader {
    /// Byte offset of the `i`-th page's bytes in the payload.
    pub fn page_offset(&self, i: usize) -> usize {
        self.header_bytes
            + APPLIED_BYTES * self.applied.len()
            + FORGOTTEN_BYTES * self.forgotten.len()
            + 4 * self.pages.len()
            + PAGE_SIZE * i
    }
}

/// Why a storage entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed storage entry: {0}")]
pub struct EntryError(pub String);

/// Encodes an entry. `pages` must be sorted by index, each within `page_count`.
pub fn encode(
    page_count: u32,
    time_ms: i64,
    checkpoint: Option<Part>,
    applied: &[Applied],
    forgotten: &[(TimelineId, Lsn)],
    pages: &[(PageIdx, &Page)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        HEADER_BYTES
            + APPLIED_BYTES * applied.len()
            + FORGOTTEN_BYTES * forgotten.len()
            + (4 + PAGE_SIZE) * pages.len(),
    );
    out.push(VERSION);
    out.extend_from_slice(&page_count.to_le_bytes());
    out.extend_from_slice(&(applied.len() as u32).to_le_bytes());
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    out.extend_from_slice(&(forgotten.len() as u32).to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    let part = checkpoint.map_or((0, 0), |p| (p.index, p.count));
    out.extend_from_slice(&part.0.to_le_bytes());
    out.extend_from_slice(&part.1.to_le_bytes());
    out.extend_from_slice(&[0; HEADER_BYTES - HEADER_BYTES_V3]);
    for a in applied {
        out.extend_from_slice(&a.timeline.0);
        out.extend_from_slice(&a.lsn.get().to_le_bytes());
        out.extend_from_slice(&a.time_ms.to_le_bytes());
    }
    for (timeline, lsn) in forgotten {
        out.extend_from_slice(&timeline.0);
        out.extend_from_slice(&lsn.get().to_le_bytes());
    }
    for (idx, _) in pages {
        out.extend_from_slice(&idx.get().to_le_bytes());
    }
    for (_, page) in pages {
        out.extend_from_slice(&page[..]);
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EntryError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| EntryError(format!("truncated at byte {}", self.pos)))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, EntryError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("BUG: 4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, EntryError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("BUG: 8 bytes")))
    }
}

/// The time and the applied mutations of entry `lsn` of a storage journal, reading its header
/// alone (a few bytes, not its pages). For checking what a history entry says of it.
pub fn read_applied(
    journal: &dyn pagesync_journal::Journal,
    lsn: Lsn,
) -> crate::error::Result<(i64, Vec<Applied>)> {
    let mut head = vec![0u8; HEADER_BYTES_V2];
    journal.read_part(lsn, 0, &mut head)?;
    let version = head[0];
    let Some(header_bytes) = header_bytes(version) else {
        return Err(crate::Error::Malformed(format!("storage entry {lsn}: version {version}")));
    };
    let time_at = if version == 2 { 13 } else { 17 }; // after `n_forgotten`, which version 2 lacks
    head.resize(header_bytes, 0);
    journal.read_part(lsn, HEADER_BYTES_V2, &mut head[HEADER_BYTES_V2..])?;
    let le32 = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("BUG: 4 bytes")) as usize;
    let n_applied = le32(5);
    if n_applied > pagesync_journal::codec::MAX_ENTRY_BYTES / APPLIED_BYTES {
        return Err(crate::Error::Malformed(format!("storage entry {lsn}: {n_applied} mutations")));
    }
    let time_ms = i64::from_le_bytes(head[time_at..time_at + 8].try_into().expect("BUG: 8 bytes"));
    let mut list = vec![0u8; n_applied * APPLIED_BYTES];
    journal.read_part(lsn, header_bytes, &mut list)?;
    let applied = list
        .chunks_exact(APPLIED_BYTES)
        .map(|a| {
            let lsn = u64::from_le_bytes(a[16..24].try_into().expect("BUG: 8 bytes"));
            Ok(Applied {
                timeline: TimelineId(a[..16].try_into().expect("BUG: 16 bytes")),
                lsn: Lsn::new(lsn).ok_or_else(|| crate::Error::Malformed("applied LSN 0".into()))?,
                time_ms: i64::from_le_bytes(a[24..32].try_into().expect("BUG: 8 bytes")),
            })
        })
        .collect::<crate::error::Result<Vec<Applied>>>()?;
    Ok((time_ms, applied))
}

/// Decodes and validates an entry's header; checks the payload holds every page.
pub fn decode(payload: &[u8]) -> Result<EntryHeader, EntryError> {
    let mut r = Reader { bytes: payload, pos: 0 };
    let version = r.take(1)?[0];
    let Some(header_bytes) = header_bytes(version) else {
        return Err(EntryError(format!("version {version}, this build reads 2 to {VERSION}")));
    };
    let page_count = r.u32()?;
    let (n_applied, n_pages) = (r.u32()? as usize, r.u32()? as usize);
    let n_forgotten = if version == 2 { 0 } else { r.u32()? as usize };
    let time_ms = r.u64()? as i64;
    let checkpoint = match (r.u32()?, r.u32()?) {
        (0, 0) => None,
        (index, count) if (1..=count).contains(&index) => Some(Part { index, count }),
        (index, count) => return Err(EntryError(format!("checkpoint part {index} of {count}"))),
    };
    // One encoding per entry: a digest of the payload names it.
    if version == VERSION && r.take(HEADER_BYTES - HEADER_BYTES_V3)?.iter().any(|&b| b != 0) {
        return Err(EntryError("the header's pad is not zeros".into()));
    }
    // Bound the counts by the payload before allocating, so a corrupt count cannot.
    let need = n_applied
        .checked_mul(APPLIED_BYTES)
        .and_then(|a| n_forgotten.checked_mul(FORGOTTEN_BYTES).and_then(|f| f.checked_add(a)))
        .and_then(|a| n_pages.checked_mul(4 + PAGE_SIZE).and_then(|p| p.checked_add(a)))
        .and_then(|b| b.checked_add(header_bytes));
    if need != Some(payload.len()) {
        return Err(EntryError(format!(
            "{n_applied} mutations, {n_forgotten} forgotten and {n_pages} pages do not fit a payload of {} bytes",
            payload.len()
        )));
    }
    let mut applied = Vec::with_capacity(n_applied);
    for _ in 0..n_applied {
        let timeline = TimelineId(r.take(16)?.try_into().expect("BUG: 16 bytes"));
        let lsn = Lsn::new(r.u64()?).ok_or_else(|| EntryError("applied LSN 0".into()))?;
        let time_ms = r.u64()? as i64;
        applied.push(Applied { timeline, lsn, time_ms });
    }
    let mut forgotten = Vec::with_capacity(n_forgotten);
    for _ in 0..n_forgotten {
        let timeline = TimelineId(r.take(16)?.try_into().expect("BUG: 16 bytes"));
        let lsn = Lsn::new(r.u64()?).ok_or_else(|| EntryError("forgotten LSN 0".into()))?;
        forgotten.push((timeline, lsn));
    }
    let mut pages = Vec::with_capacity(n_pages);
    for _ in 0..n_pages {
        let n = r.u32()?;
        let idx = PageIdx::new(n).filter(|_| n <= page_count);
        let idx = idx.ok_or_else(|| EntryError(format!("page {n} outside 1..={page_count}")))?;
        if pages.last().is_some_and(|&prev| prev >= idx) {
            return Err(EntryError("page numbers are not strictly ascending".into()));
        }
        pages.push(idx);
    }
    Ok(EntryHeader { page_count, time_ms, checkpoint, applied, forgotten, pages, header_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_page_offsets() {
        let p1 = [1u8; PAGE_SIZE];
        let p3 = [3u8; PAGE_SIZE];
        let applied = [Applied { timeline: TimelineId([9; 16]), lsn: Lsn::FIRST, time_ms: -5 }];
        let pages = [(PageIdx::new(1).expect("1"), &p1), (PageIdx::new(3).expect("3"), &p3)];
        let part = Some(Part { index: 2, count: 3 });
        let forgotten = [(TimelineId([8; 16]), Lsn::new(7).expect("7"))];
        let bytes = encode(4, 77, part, &applied, &forgotten, &pages);
        let h = decode(&bytes).expect("decode");
        assert_eq!((h.page_count, h.time_ms, h.checkpoint), (4, 77, part));
        assert_eq!((h.applied.as_slice(), h.forgotten.as_slice()), (&applied[..], &forgotten[..]));
        assert_eq!(&bytes[h.page_offset(1)..h.page_offset(2)], &p3[..]);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// Entries written before the `forgotten` list (version 2) still read, pages and all.
    #[test]
    fn version_2_entries_still_decode() {
        let p1 = [1u8; PAGE_SIZE];
        let applied = [Applied { timeline: TimelineId([9; 16]), lsn: Lsn::FIRST, time_ms: 5 }];
        let mut bytes = encode(1, 77, None, &applied, &[], &[(PageIdx::new(1).expect("1"), &p1)]);
        bytes.drain(HEADER_BYTES_V3..HEADER_BYTES);
        bytes.drain(13..17);
        bytes[0] = 2;
        let h = decode(&bytes).expect("decode");
        assert_eq!((h.applied.as_slice(), h.forgotten.len()), (&applied[..], 0));
        assert_eq!(&bytes[h.page_offset(0)..h.page_offset(1)], &p1[..]);
    }

    /// Entries written before the pad (version 3) still read, pages and all; `read_applied`
    /// reads their header too.
    #[test]
    fn version_3_entries_still_decode() {
        let p1 = [1u8; PAGE_SIZE];
        let applied = [Applied { timeline: TimelineId([9; 16]), lsn: Lsn::FIRST, time_ms: 5 }];
        let forgotten = [(TimelineId([8; 16]), Lsn::new(7).expect("7"))];
        let mut bytes = encode(1, 77, None, &applied, &forgotten, &[(PageIdx::new(1).expect("1"), &p1)]);
        bytes.drain(HEADER_BYTES_V3..HEADER_BYTES);
        bytes[0] = 3;
        let h = decode(&bytes).expect("decode");
        assert_eq!((h.applied.as_slice(), h.forgotten.as_slice()), (&applied[..], &forgotten[..]));
        assert_eq!(&bytes[h.page_offset(0)..h.page_offset(1)], &p1[..]);
        let mut journal = pagesync_journal::MemoryJournal::new(pagesync_journal::JournalId::from_u128(1));
        pagesync_journal::Journal::append(&mut journal, &bytes).expect("append");
        assert_eq!(read_applied(&journal, Lsn::FIRST).expect("read_applied"), (77, applied.to_vec()));
    }

    /// Every page of an entry lies at a multiple of 4 from its payload's start, and the payload
    /// is a multiple of 4 long; the pad is zeros, or the entry does not decode.
    #[test]
    fn pages_lie_four_byte_aligned_and_the_pad_is_zeros() {
        let p = [5u8; PAGE_SIZE];
        for (n_applied, n_forgotten, n_pages) in [(0, 0, 1), (1, 0, 1), (3, 2, 3), (0, 1, 2)] {
            let applied: Vec<Applied> = (0..n_applied)
                .map(|i| Applied { timeline: TimelineId([i; 16]), lsn: Lsn::FIRST, time_ms: 0 })
                .collect();
            let forgotten: Vec<(TimelineId, Lsn)> =
                (0..n_forgotten).map(|i| (TimelineId([i; 16]), Lsn::FIRST)).collect();
            let pages: Vec<(PageIdx, &Page)> =
                (1..=n_pages).map(|i| (PageIdx::new(i).expect("i"), &p)).collect();
            let bytes = encode(n_pages, 0, None, &applied, &forgotten, &pages);
            assert!(bytes.len().is_multiple_of(4));
            let h = decode(&bytes).expect("decode");
            assert!((0..n_pages as usize).all(|i| h.page_offset(i).is_multiple_of(4)));
            for at in HEADER_BYTES_V3..HEADER_BYTES {
                let mut padded = bytes.clone();
                padded[at] = 1;
                assert!(decode(&padded).is_err(), "a pad byte at {at} that is not zero");
            }
        }
    }

    #[test]
    fn pages_beyond_the_count_or_unsorted_are_rejected() {
        let p = [0u8; PAGE_SIZE];
        let two = PageIdx::new(2).expect("2");
        assert!(decode(&encode(1, 0, None, &[], &[], &[(two, &p)])).is_err());
        assert!(decode(&encode(3, 0, None, &[], &[], &[(two, &p), (two, &p)])).is_err());
        for (index, count) in [(0, 1), (2, 1), (1, 0)] {
            let mut bytes = encode(3, 0, None, &[], &[], &[(two, &p)]);
            bytes[25..29].copy_from_slice(&u32::to_le_bytes(index));
            bytes[29..33].copy_from_slice(&u32::to_le_bytes(count));
            assert!(decode(&bytes).is_err(), "part {index} of {count}");
        }
    }
}
