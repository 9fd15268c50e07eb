//! The handle backend: a journal in two files that are opened before it is, for platforms where
//! a file cannot be opened inside a synchronous call. The browser's OPFS is one: a
//! `FileSystemSyncAccessHandle` is created asynchronously, but SQLite's VFS reads and writes
//! synchronously. The files are reached through [`RandomAccess`], so the same code runs (and is
//! tested) on native files.
//!
//! Layout of each file (byte diagrams in `docs/design.md`):
//! - a 48-byte header: magic, journal id, generation, base LSN (the LSN of its first frame),
//!   checksummed;
//! - two 24-byte trim slots: the first readable LSN and a sequence number, checksummed; the
//!   valid slot with the higher sequence number holds the trim point;
//! - frames (see `codec`) from byte 96, starting at the base LSN.
//!
//! One file is live: the one with a valid header and the higher generation. The other is empty.
//!
//! Crash model:
//! - An append writes its frames at the end of the live file, then flushes; it is acknowledged
//!   only after both. On open, a torn tail is truncated exactly as in the file backend.
//! - `remove_prefix` writes the slot not holding the current trim point, then flushes. A torn
//!   slot fails its checksum and the previous trim point stands, which is correct: that
//!   `remove_prefix` never returned.
//! - Space is reclaimed by compaction, once the removed bytes outweigh both the live bytes and
//!   [`COMPACT_MIN_BYTES`]: the live frames are copied into the other file, flushed, and only
//!   then is its header written (generation + 1) and flushed. A crash before that header is
//!   durable leaves the old file live; after it, the new one. The old file is then emptied (if
//!   that fails, by the next open: the compaction is done either way).
//! - `create` writes the trim slots, flushes, and only then writes and flushes the header; a
//!   failed creation empties the file. A creation cut short leaves no valid header and nothing
//!   but its own slots, no frame and no other trim point: `open_or_create` creates the journal
//!   again, which loses nothing (a damaged header beside such files held an empty journal at
//!   LSN 1, the same).
//! - After a failed write or flush the journal refuses appends until it is reopened. What the
//!   failed append wrote is cut off first: after a failed flush those pages may be clean in the
//!   cache without being durable, so a reopen must not read them, and no later flush writes
//!   them (entries appended after them would follow a hole after a power cut). A failed
//!   compaction empties the file it was writing, for the same reason.

use crate::codec::{self, FRAME_HEADER_BYTES};
use crate::{Journal, JournalError, JournalId, Lsn, LsnRange, Result};

/// A file the journal reads and writes at offsets. `flush` is the durability barrier.
pub trait RandomAccess {
    /// A name for error messages (e.g. the OPFS path).
    fn name(&self) -> String;
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; fewer bytes available is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()>;
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
    /// Returns once everything written is durable.
    fn flush(&mut self) -> std::io::Result<()>;
}

#[cfg(unix)]
impl RandomAccess for (std::fs::File, std::path::PathBuf) {
    fn name(&self) -> String {
        self.1.display().to_string()
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }
    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.sync_data()
    }
}

const MAGIC: &[u8; 8] = b"PGSJHDL\x01";
/// magic 8 | journal id 16 | generation 8 | base LSN 8 | reserved 4 | crc32c 4
pub const HEADER_BYTES: usize = 48;
/// first readable LSN 8 | sequence 8 | reserved 4 | crc32c 4
const SLOT_BYTES: usize = 24;
/// Where the first frame starts.
pub const FRAMES_AT: u64 = (HEADER_BYTES + 2 * SLOT_BYTES) as u64;
/// Compaction never runs for fewer removed bytes than this: copying is not worth it.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    id: JournalId,
    generation: u64,
    base: Lsn,
}

fn encode_header(h: Header) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(MAGIC);
    b[8..24].copy_from_slice(h.id.as_bytes());
    b[24..32].copy_from_slice(&h.generation.to_le_bytes());
    b[32..40].copy_from_slice(&h.base.get().to_le_bytes());
    let crc = crc32c::crc32c(&b[..44]);
    b[44..48].copy_from_slice(&crc.to_le_bytes());
    b
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("BUG: caller passes 8 bytes"))
}

fn crc_ok(b: &[u8]) -> bool {
    let (body, crc) = b.split_at(b.len() - 4);
    crc32c::crc32c(body).to_le_bytes() == crc
}

/// `Ok(None)` for an empty file; an error for bytes that are not our header.
fn decode_header(b: &[u8]) -> std::result::Result<Option<Header>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    if &b[0..8] != MAGIC {
        return Err("not a pagesync handle journal (bad magic)".into());
    }
    if !crc_ok(b) {
        return Err("header checksum mismatch".into());
    }
    let id = JournalId::from_bytes(b[8..24].try_into().expect("BUG: 16-byte slice"));
    let base = Lsn::new(le_u64(&b[32..40])).ok_or("header names base LSN 0")?;
    Ok(Some(Header { id, generation: le_u64(&b[24..32]), base }))
}

fn encode_slot(first: Lsn, seq: u64) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0..8].copy_from_slice(&first.get().to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A slot's (first readable LSN, sequence), if it is valid.
fn decode_slot(b: &[u8]) -> Option<(Lsn, u64)> {
    if !crc_ok(b) {
        return None;
    }
    Some((Lsn::new(le_u64(&b[0..8]))?, le_u64(&b[8..16])))
}

/// A journal in two pre-opened files. See the module documentation.
pub struct HandleJournal<F: RandomAccess> {
    id: JournalId,
    files: [F; 2],
    /// Index of the live file in `files`.
    live: usize,
    generation: u64,
    base: Lsn,
    /// Byte offset of each frame in the live file; `offsets[i]` holds LSN `base + i`.
    offsets: Vec<u64>,
    end: u64,
    range: LsnRange,
    /// The trim slot sequence in force, and which slot holds it.
    slot_seq: u64,
    slot: usize,
    /// Set after a failed write or flush: the file's contents are unknown until reopened.
    failed: bool,
    compact_min_bytes: u64,
}

impl<F: RandomAccess> std::fmt::Debug for HandleJournal<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandleJournal").field("id", &self.id).field("range", &self.range).finish()
    }
}

impl<F: RandomAccess> HandleJournal<F> {
    /// Starts a new journal in two empty files. Files that hold anything are refused.
    pub fn create(mut files: [F; 2], id: JournalId) -> Result<Self> {
        for f in &files {
            if f.size().map_err(io_err(id, "size", f))? != 0 {
                return Err(JournalError::AlreadyExists { path: f.name().into() });
            }
        }
        let header = Header { id, generation: 1, base: Lsn::FIRST };
        let mut slots = encode_slot(Lsn::FIRST, 0).to_vec();
        slots.extend_from_slice(&[0; SLOT_BYTES]);
        let f = &mut files[0];
        let written = (|| {
            f.write_all_at(&slots, HEADER_BYTES as u64)?;
            f.flush()?;
            f.write_all_at(&encode_header(header), 0)?;
            f.flush()
        })();
        if let Err(e) = written {
            // Its header may be in the cache and not on disk: a reopen must not take it.
            let _ = files[0].truncate(0);
            return Err(io_err(id, "create", &files[0])(e));
        }
        Self::open(files)
    }

    /// Opens the journal from its two files, verifying every frame and truncating a torn tail.
    pub fn open(files: [F; 2]) -> Result<Self> {
        let headers = read_headers(&files)?;
        let foreign =
            |i: usize, reason: String| JournalError::Foreign { path: files[i].name().into(), reason };
        // A header that does not decode beside a valid one is a compaction cut short before
        // its header was durable: that file holds nothing yet.
        let live = match &headers {
            [Ok(None), Ok(None)] => return Err(JournalError::Missing { path: files[0].name().into() }),
            [Ok(Some(a)), Ok(Some(b))] if a.id != b.id => {
                return Err(foreign(0, format!("its two files belong to journals {} and {}", a.id, b.id)));
            }
            [Ok(Some(a)), Ok(Some(b))] => usize::from(b.generation > a.generation),
            [Ok(Some(_)), _] => 0,
            [_, Ok(Some(_))] => 1,
            [Err(reason), _] => return Err(foreign(0, reason.clone())),
            [_, Err(reason)] => return Err(foreign(1, reason.clone())),
        };
        let header = headers[live].clone().ok().flatten().expect("BUG: the live file has a header");
        let mut j = HandleJournal {
            id: header.id,
            files,
            live,
            generation: header.generation,
            base: header.base,
            offsets: Vec::new(),
            end: FRAMES_AT,
            range: LsnRange::empty_at(header.base),
            slot_seq: 0,
            slot: 0,
            failed: false,
            compact_min_bytes: COMPACT_MIN_BYTES,
        };
        j.load()?;
        // A crash during compaction may leave the other file half written: it holds nothing.
        let other = 1 - live;
        if j.files[other].size().map_err(io_err(j.id, "size", &j.files[other]))? != 0 {
            j.files[other].truncate(0).map_err(io_err(j.id, "truncate", &j.files[other]))?;
            j.files[other].flush().map_err(io_err(j.id, "flush", &j.files[other]))?;
        }
        Ok(j)
    }

    /// Opens the journal, or creates it when neither file has a valid header and neither holds
    /// more than a creation writes: both are empty, or a creation was cut short (see the crash
    /// model).
    pub fn open_or_create(mut files: [F; 2], id: JournalId) -> Result<Self> {
        let no_header = read_headers(&files)?.iter().all(|h| !matches!(h, Ok(Some(_))));
        if no_header && holds_nothing(&files[0])? && holds_nothing(&files[1])? {
            for f in &mut files {
                f.truncate(0).map_err(io_err(id, "truncate", f))?;
            }
            return Self::create(files, id);
        }
        Self::open(files)
    }

    /// Gives the files back (to reopen them, or to close them).
    pub fn into_files(self) -> [F; 2] {
        self.files
    }

    /// Compacts once at least this many removed bytes are held (and they outweigh the live
    /// ones). [`COMPACT_MIN_BYTES`] by default; tests set it low to compact often.
    pub fn set_compact_min_bytes(&mut self, bytes: u64) {
        self.compact_min_bytes = bytes;
    }

    /// Bytes held in the live file.
    pub fn disk_bytes(&self) -> u64 {
        self.end
    }

    fn load(&mut self) -> Result<()> {
        let f = &self.files[self.live];
        let len = f.size().map_err(io_err(self.id, "size", f))?;
        let mut bytes = vec![0u8; len as usize];
        f.read_exact_at(&mut bytes, 0).map_err(io_err(self.id, "read", f))?;
        let slot = |at: usize| bytes.get(at..at + SLOT_BYTES).and_then(decode_slot);
        let slots = [HEADER_BYTES, HEADER_BYTES + SLOT_BYTES].map(slot);
        let Some((slot, (trim_first, seq))) =
            slots.iter().enumerate().filter_map(|(i, s)| s.map(|s| (i, s))).max_by_key(|(_, (_, seq))| *seq)
        else {
            let reason = "both trim slots fail their checksums".to_owned();
            return Err(JournalError::CorruptSegment { journal: self.id, location: f.name(), reason });
        };
        (self.slot, self.slot_seq) = (slot, seq);
        let mut pos = FRAMES_AT as usize;
        let mut lsn = self.base;
        while pos < bytes.len() {
            match codec::decode_frame(&bytes[pos..], lsn) {
                Ok(payload) => {
                    self.offsets.push(pos as u64);
                    pos += codec::frame_len(payload.len());
                    lsn = lsn.next();
                }
                Err(e) if codec::is_torn_tail(&bytes[pos..], &e) => break,
                Err(e) => {
                    let location = f.name();
                    return Err(JournalError::Corrupt {
                        journal: self.id,
                        location,
                        lsn,
                        reason: e.to_string(),
                    });
                }
            }
        }
        if pos < bytes.len() {
            let f = &mut self.files[self.live];
            f.truncate(pos as u64).map_err(io_err(self.id, "truncate torn tail", f))?;
            f.flush().map_err(io_err(self.id, "flush", f))?;
        }
        self.end = pos as u64;
        let frames = LsnRange::from_count(self.base, lsn.get() - self.base.get());
        self.range = trim_first.prev().map_or(frames, |up_to| frames.trim_prefix(up_to));
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.failed {
            let message = format!(
                "an earlier write to {} failed; reopen the journal before appending",
                self.files[self.live].name()
            );
            return Err(JournalError::Poisoned { journal: self.id, message });
        }
        Ok(())
    }

    fn offset_of(&self, lsn: Lsn) -> Result<u64> {
        crate::check_in_range(self.id, self.range, LsnRange::inclusive(lsn, lsn))?;
        Ok(self.offsets[(lsn.get() - self.base.get()) as usize])
    }

    /// Bytes of frames before the trim point, still in the live file.
    fn dead_bytes(&self) -> u64 {
        let live_from = (self.range.first().get() - self.base.get()) as usize;
        self.offsets.get(live_from).copied().unwrap_or(self.end) - FRAMES_AT
    }

    /// Copies the live frames into the other file and switches to it (see the crash model).
    fn compact(&mut self) -> Result<()> {
        let from = self.offsets.get((self.range.first().get() - self.base.get()) as usize).copied();
        let from = from.unwrap_or(self.end);
        let mut frames = vec![0u8; (self.end - from) as usize];
        let old = self.live;
        self.files[old].read_exact_at(&mut frames, from).map_err(io_err(
            self.id,
            "read",
            &self.files[old],
        ))?;
        let new = 1 - old;
        let header = Header { id: self.id, generation: self.generation + 1, base: self.range.first() };
        let mut body = encode_slot(header.base, 0).to_vec();
        body.extend_from_slice(&[0; SLOT_BYTES]);
        body.extend_from_slice(&frames);
        let f = &mut self.files[new];
        let written = (|| {
            f.truncate(0)?;
            f.write_all_at(&body, HEADER_BYTES as u64)?;
            f.flush()?;
            f.write_all_at(&encode_header(header), 0)?;
            f.flush()
        })();
        if let Err(e) = written {
            // Its header may be in the cache and not on disk: a reopen must not take it.
            let _ = f.truncate(0);
            self.failed = true;
            return Err(io_err(self.id, "compact", f)(e));
        }
        let shift = from - FRAMES_AT;
        let first_kept = (self.range.first().get() - self.base.get()) as usize;
        self.offsets = self.offsets[first_kept.min(self.offsets.len())..].iter().map(|o| o - shift).collect();
        (self.live, self.generation, self.base, self.end) =
            (new, header.generation, header.base, self.end - shift);
        (self.slot, self.slot_seq) = (0, 0);
        // Switched: an old file that fails to empty is emptied by the next open.
        let f = &mut self.files[old];
        let _ = f.truncate(0).and_then(|()| f.flush());
        Ok(())
    }
}

impl<F: RandomAccess + crate::MaybeSend> Journal for HandleJournal<F> {
    fn id(&self) -> JournalId {
        self.id
    }

    fn range(&self) -> LsnRange {
        self.range
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        self.check_writable()?;
        for p in payloads {
            crate::check_entry_len(self.id, p)?;
        }
        let first = self.range.next();
        let mut buf = Vec::new();
        let starts = codec::encode_frames(&mut buf, first, payloads);
        let f = &mut self.files[self.live];
        if let Err(e) = f.write_all_at(&buf, self.end).and_then(|()| f.flush()) {
            // Written but maybe not durable: see the crash model.
            let _ = f.truncate(self.end);
            self.failed = true;
            return Err(io_err(self.id, "append", f)(e));
        }
        // Offsets stay dense from the base LSN, trimmed frames included.
        debug_assert_eq!(self.offsets.len() as u64, first.get() - self.base.get());
        self.offsets.extend(starts.iter().map(|at| self.end + *at as u64));
        self.end += buf.len() as u64;
        self.range = self.range.extend(payloads.len() as u64);
        Ok(LsnRange::from_count(first, payloads.len() as u64))
    }

    fn read(&self, lsn: Lsn) -> Result<Vec<u8>> {
        let at = self.offset_of(lsn)?;
        let f = &self.files[self.live];
        let mut head = [0u8; FRAME_HEADER_BYTES];
        f.read_exact_at(&mut head, at).map_err(io_err(self.id, "read", f))?;
        let corrupt =
            |reason: String| JournalError::Corrupt { journal: self.id, location: f.name(), lsn, reason };
        let header = codec::decode_header(&head).map_err(|e| corrupt(e.to_string()))?;
        let mut payload = vec![0u8; header.len];
        f.read_exact_at(&mut payload, at + FRAME_HEADER_BYTES as u64).map_err(io_err(self.id, "read", f))?;
        codec::verify(&header, lsn, &payload).map_err(|e| corrupt(e.to_string()))?;
        Ok(payload)
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        let at = self.offset_of(lsn)?;
        let next = self.offsets.get((lsn.get() - self.base.get()) as usize + 1).copied().unwrap_or(self.end);
        let len = (next - at) as usize - FRAME_HEADER_BYTES;
        if offset.checked_add(buf.len()).is_none_or(|end| end > len) {
            return Err(crate::part_out_of_bounds(self.id, lsn, len));
        }
        let f = &self.files[self.live];
        f.read_exact_at(buf, at + (FRAME_HEADER_BYTES + offset) as u64).map_err(io_err(self.id, "read", f))
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> Result<()> {
        if up_to >= self.range.next() {
            // A restart later: the other file gets a header based at `up_to + 1` and no frames.
            self.check_writable()?;
            let before = self.range;
            self.range = LsnRange::empty_at(up_to.next());
            let compacted = self.compact();
            if compacted.is_err() {
                self.range = before;
            }
            return compacted;
        }
        let trimmed = self.range.trim_prefix(up_to);
        let first = trimmed.first();
        if first <= self.range.first() {
            return Ok(());
        }
        self.check_writable()?;
        let (slot, seq) = (1 - self.slot, self.slot_seq + 1);
        let f = &mut self.files[self.live];
        let at = (HEADER_BYTES + slot * SLOT_BYTES) as u64;
        if let Err(e) = f.write_all_at(&encode_slot(first, seq), at).and_then(|()| f.flush()) {
            self.failed = true;
            return Err(io_err(self.id, "write trim point", f)(e));
        }
        (self.slot, self.slot_seq) = (slot, seq);
        self.range = trimmed;
        let dead = self.dead_bytes();
        if dead > 0 && dead >= self.compact_min_bytes && dead >= self.end - FRAMES_AT - dead {
            // Trimmed with the slot. A failed compaction refuses appends until the journal is
            // reopened, and a later trim compacts.
            let _ = self.compact();
        }
        Ok(())
    }
}

/// The header of each file: `Ok(None)` for none (shorter than a header, or zeros).
fn read_headers<F: RandomAccess>(files: &[F; 2]) -> Result<[std::result::Result<Option<Header>, String>; 2]> {
    let mut headers = [Ok(None), Ok(None)];
    for (i, f) in files.iter().enumerate() {
        let len = f.size().map_err(io_err(JournalId::from_u128(0), "size", f))?;
        if len < HEADER_BYTES as u64 {
            continue;
        }
        let mut b = [0u8; HEADER_BYTES];
        f.read_exact_at(&mut b, 0).map_err(io_err(JournalId::from_u128(0), "read header", f))?;
        headers[i] = decode_header(&b);
    }
    Ok(headers)
}

/// Whether a file holds at most what `create` writes before its header: no frame, and the
/// first trim slot or none.
fn holds_nothing<F: RandomAccess>(f: &F) -> Result<bool> {
    let err = || io_err(JournalId::from_u128(0), "read", f);
    let len = f.size().map_err(err())?;
    if len > FRAMES_AT {
        return Ok(false);
    }
    let mut bytes = vec![0; len as usize];
    f.read_exact_at(&mut bytes, 0).map_err(err())?;
    let slots = bytes.get(HEADER_BYTES..).unwrap_or_default();
    let mut created = encode_slot(Lsn::FIRST, 0).to_vec();
    created.extend_from_slice(&[0; SLOT_BYTES]);
    Ok(slots.iter().all(|&b| b == 0) || created.starts_with(slots))
}

fn io_err<F: RandomAccess>(
    id: JournalId,
    op: &'static str,
    f: &F,
) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = f.name().into();
    move |error| JournalError::Io { journal: id, op, path, error }
}
