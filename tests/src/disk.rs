//! Simulated storage for the simulator (`sim.rs`): files with a live image (what reads see: the
//! page cache) and a durable image (what a power cut leaves), an object store, and the faults
//! injected into them. Every choice comes from a seeded RNG per file or store, so a seed replays
//! exactly whatever order the journals are used in.
//!
//! Crash model:
//! - A write lands in the live image and waits, unsynced, for a flush, which applies it to the
//!   durable image. A failed flush applies none, all or a part of the unsynced writes and
//!   forgets the rest, as Linux does after a failed fsync: those pages count as clean, so no
//!   later flush writes them, although reads see them until they are cut. Size changes are
//!   metadata, which the filesystem's journal commits anyway: a failed flush applies them all.
//! - A power cut keeps a random prefix of the unsynced writes (a torn write) and the live image
//!   becomes the durable one. A process crash loses nothing: the page cache outlives it.
//! - An object is put whole or not at all; a put whose outcome is unknown may have landed.
//!
//! The journals are the real backends where they can run here: `HandleJournal` over
//! [`SimFile`]s and `ObjectJournal` over a [`FaultyStore`]. `FileJournal` works on real files
//! only, so [`FileModel`] plays it: the same steps, and the same response to each failure.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use pagesync::journal::codec::{self, FRAME_HEADER_BYTES};
use pagesync::journal::{
    HandleJournal, Journal, JournalError, JournalId, Lsn, LsnRange, ObjectBackend, RandomAccess,
};

use crate::Rng;

/// How often each fault strikes, in parts per thousand of the operations it can hit.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultRates {
    /// A write fails as on a full disk (a part of it may have reached the file), or an S3
    /// delete fails.
    pub write: u64,
    /// An fsync fails.
    pub flush: u64,
    /// A read fails (EIO, a failed GET or LIST).
    pub read: u64,
    /// A put fails; half of those land all the same (the outcome is unknown to the caller).
    pub put: u64,
    /// An operation is slow: see `SLOW_MS`.
    pub slow: u64,
}

impl FaultRates {
    pub fn from_rng(r: &mut Rng) -> FaultRates {
        FaultRates {
            write: 2 + r.below(15),
            flush: 2 + r.below(15),
            read: 1 + r.below(4),
            put: 20 + r.below(40),
            slow: 20 + r.below(80),
        }
    }
}

/// The latency of a slow operation, in ms: a disk busy with other work, or an S3 request that
/// waits for a retry.
const SLOW_MS: (u64, u64) = (20, 400);

/// What the faults did, over a run.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub disk_full: AtomicU64,
    pub fsync_failures: AtomicU64,
    /// Writes that reached an image only in part (a failed write, a failed flush, a power cut).
    pub torn_writes: AtomicU64,
    /// Torn tails a backend found and cut while opening (a file cut short, not emptied).
    pub torn_tails_dropped: AtomicU64,
    pub read_failures: AtomicU64,
    /// S3 puts and deletes that failed.
    pub failed_puts: AtomicU64,
    /// Puts that landed although the caller was told they failed.
    pub unknown_puts: AtomicU64,
    pub slow_appends: AtomicU64,
    pub slow_reads: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The faults of one run: their rates, whether they strike now, and what they did.
#[derive(Debug, Default)]
pub struct Faults {
    pub rates: FaultRates,
    on: AtomicBool,
    pub counts: FaultCounts,
}

impl Faults {
    pub fn new(rates: FaultRates) -> Arc<Faults> {
        Arc::new(Faults { rates, on: AtomicBool::new(true), counts: FaultCounts::default() })
    }

    /// Stops every fault and delay (the run heals).
    pub fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    /// Lets faults strike again.
    pub fn resume(&self) {
        self.on.store(true, Ordering::Relaxed);
    }

    fn strikes(&self, rng: &mut Rng, permille: u64) -> bool {
        self.on.load(Ordering::Relaxed) && rng.below(1000) < permille
    }

    /// The latency of one operation: `base_ms`, or a slow one.
    fn latency_ms(&self, rng: &mut Rng, base_ms: u64, slow: &AtomicU64) -> i64 {
        if !self.on.load(Ordering::Relaxed) {
            return 0;
        }
        if rng.below(1000) < self.rates.slow {
            bump(slow);
            return (SLOW_MS.0 + rng.below(SLOW_MS.1 - SLOW_MS.0)) as i64;
        }
        base_ms as i64
    }
}

/// A stable seed per name, so each file draws from a stream of its own.
fn seed_of(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// What one disk (the files or objects of one journal) shares: its faults, the latency its
/// operations took, and whether a fault struck since the journal was opened.
#[derive(Debug, Default)]
struct DiskShared {
    latency_ms: AtomicI64,
    /// Faults injected since `take_faults`.
    faults: AtomicU64,
    /// A write or flush failed since the journal was opened (the handle backend refuses appends
    /// after either, the file backend after a failed flush).
    write_failed: AtomicBool,
    flush_failed: AtomicBool,
    /// A put landed that the journal was told failed: it refuses appends once it finds out.
    landed_unknown: AtomicBool,
    /// The journal is being opened: a file cut short is the repair of a torn tail.
    opening: AtomicBool,
}

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

fn apply(image: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(at, data) => {
            let at = *at as usize;
            if image.len() < at {
                image.resize(at, 0);
            }
            // Copies, not a fill: this crate is built without optimizations.
            let inside = (image.len() - at).min(data.len());
            image[at..at + inside].copy_from_slice(&data[..inside]);
            image.extend_from_slice(&data[inside..]);
        }
        Op::Truncate(len) => image.resize(*len as usize, 0),
    }
}

/// Applies a prefix of `ops`: `keep` units, a byte written or a size changed being one (a write
/// cut inside keeps its start). With `all_sizes` every size change applies, and `keep` counts
/// only bytes. True when a write was cut.
fn apply_prefix(image: &mut Vec<u8>, ops: &[Op], mut keep: usize, all_sizes: bool) -> bool {
    let mut cut = false;
    for op in ops {
        match op {
            Op::Write(at, data) if data.len() > keep => {
                if keep > 0 {
                    apply(image, &Op::Write(*at, data[..keep].to_vec()));
                    cut = true;
                }
                keep = 0;
                if !all_sizes {
                    return cut;
                }
            }
            Op::Write(_, data) => {
                keep -= data.len();
                apply(image, op);
            }
            Op::Truncate(_) if all_sizes => apply(image, op),
            Op::Truncate(_) if keep == 0 => return cut,
            Op::Truncate(_) => {
                keep -= 1;
                apply(image, op);
            }
        }
    }
    cut
}

/// The units of `ops` for `apply_prefix`: bytes written, and size changes unless `all_sizes`.
fn units(ops: &[Op], all_sizes: bool) -> u64 {
    let unit = |op: &Op| match op {
        Op::Write(_, data) => data.len(),
        Op::Truncate(_) => usize::from(!all_sizes),
    };
    ops.iter().map(unit).sum::<usize>() as u64
}

#[derive(Debug)]
struct FileState {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes and truncations since the last flush, in order.
    unsynced: Vec<Op>,
    rng: Rng,
}

/// One simulated file: `RandomAccess` with a live and a durable image and injected faults.
#[derive(Clone, Debug)]
pub struct SimFile {
    name: String,
    state: Arc<Mutex<FileState>>,
    faults: Arc<Faults>,
    disk: Arc<DiskShared>,
}

fn injected(what: &str) -> std::io::Error {
    std::io::Error::other(format!("injected fault: {what}"))
}

impl SimFile {
    fn new(name: String, seed: u64, faults: Arc<Faults>, disk: Arc<DiskShared>) -> SimFile {
        let rng = Rng(seed_of(seed, &name));
        let state = FileState { live: Vec::new(), durable: Vec::new(), unsynced: Vec::new(), rng };
        SimFile { name, state: Arc::new(Mutex::new(state)), faults, disk }
    }

    fn lock(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().expect("BUG: sim file lock poisoned")
    }

    fn fault(&self, counter: &AtomicU64) {
        bump(counter);
        self.disk.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a write of another file on this disk (the file backend's marker) fails.
    fn other_write_fails(&self) -> bool {
        let mut s = self.lock();
        let fails = self.faults.strikes(&mut s.rng, self.faults.rates.write);
        if fails {
            self.fault(&self.faults.counts.disk_full);
        }
        fails
    }

    /// A power cut: the durable image and a random prefix of the unsynced writes are what is
    /// left. True when anything unsynced was lost or torn.
    fn power_cut(&self) -> bool {
        let mut s = self.lock();
        let ops = std::mem::take(&mut s.unsynced);
        let keep = s.rng.below(units(&ops, false) + 1) as usize;
        let mut durable = std::mem::take(&mut s.durable);
        if apply_prefix(&mut durable, &ops, keep, false) {
            bump(&self.faults.counts.torn_writes);
        }
        let lost = durable != s.live;
        s.live = durable.clone();
        s.durable = durable;
        lost
    }
}

impl RandomAccess for SimFile {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut s = self.lock();
        let latency = self.faults.latency_ms(&mut s.rng, 0, &self.faults.counts.slow_reads);
        self.disk.latency_ms.fetch_add(latency, Ordering::Relaxed);
        if self.faults.strikes(&mut s.rng, self.faults.rates.read) {
            self.fault(&self.faults.counts.read_failures);
            return Err(injected("EIO on read"));
        }
        let at = offset as usize;
        let part = s.live.get(at..at + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(part);
        Ok(())
    }

    fn write_all_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let mut s = self.lock();
        if self.faults.strikes(&mut s.rng, self.faults.rates.write) {
            self.fault(&self.faults.counts.disk_full);
            self.disk.write_failed.store(true, Ordering::Relaxed);
            let keep = s.rng.below(data.len() as u64 + 1) as usize;
            if keep > 0 {
                let op = Op::Write(offset, data[..keep].to_vec());
                apply(&mut s.live, &op);
                s.unsynced.push(op);
            }
            if keep > 0 && keep < data.len() {
                bump(&self.faults.counts.torn_writes);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        let op = Op::Write(offset, data.to_vec());
        apply(&mut s.live, &op);
        s.unsynced.push(op);
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        let mut s = self.lock();
        if self.disk.opening.load(Ordering::Relaxed) && len > 0 && len < s.live.len() as u64 {
            bump(&self.faults.counts.torn_tails_dropped);
        }
        let op = Op::Truncate(len);
        apply(&mut s.live, &op);
        s.unsynced.push(op);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut s = self.lock();
        let latency = self.faults.latency_ms(&mut s.rng, 1, &self.faults.counts.slow_appends);
        self.disk.latency_ms.fetch_add(latency, Ordering::Relaxed);
        let failed = self.faults.strikes(&mut s.rng, self.faults.rates.flush);
        if failed && self.disk.opening.load(Ordering::Relaxed) {
            // The fsync a journal makes of what it found when it opens (what a crashed
            // process left in the page cache) fails before any of it is written: the open
            // fails, and a later one tries again. (After a failed fsync Linux may mark the
            // pages clean and a reopen would read data the disk does not hold; the model
            // leaves that case out.)
            self.fault(&self.faults.counts.fsync_failures);
            self.disk.flush_failed.store(true, Ordering::Relaxed);
            return Err(injected("fsync failed"));
        }
        let ops = std::mem::take(&mut s.unsynced);
        let mut durable = std::mem::take(&mut s.durable);
        if failed {
            self.fault(&self.faults.counts.fsync_failures);
            self.disk.flush_failed.store(true, Ordering::Relaxed);
            // None, all or part of the writes reached the disk before the error. A size change
            // is metadata, which the filesystem's journal commits anyway.
            let total = units(&ops, true);
            let keep = [0, total, s.rng.below(total + 1)][s.rng.below(3) as usize] as usize;
            if apply_prefix(&mut durable, &ops, keep, true) {
                bump(&self.faults.counts.torn_writes);
            }
        } else {
            ops.iter().for_each(|op| apply(&mut durable, op));
        }
        s.durable = durable;
        if failed { Err(injected("fsync failed")) } else { Ok(()) }
    }
}

/// `FileJournal`'s trim marker: replaced atomically (temp file, fsync, rename), so a failure
/// changes nothing.
#[derive(Clone, Debug)]
struct Marker {
    trimmed_through: Arc<AtomicU64>,
}

/// Bytes before the first frame of the model's segment: its first LSN.
const SEGMENT_HEADER_BYTES: u64 = 8;

/// The file backend's behaviour over one simulated segment file (`FileJournal` itself works on
/// real files). As in `FileJournal`: a segment is started (header written and flushed) before
/// frames go into it; a failed write is cut back and the journal stays usable; a failed fsync
/// cuts the file back to what the last good one covered (unsynced appends with it) and poisons
/// the journal until it is reopened; `remove_prefix` writes the marker first and then drops a
/// segment that holds nothing readable; open cuts a torn tail (`codec::is_torn_tail`) and fails
/// on any other damage.
#[derive(Debug)]
pub struct FileModel {
    id: JournalId,
    segment: SimFile,
    marker: Marker,
    /// The segment's first LSN, if it was started.
    base: Option<Lsn>,
    offsets: Vec<u64>,
    end: u64,
    /// Bytes the last good fsync covered.
    synced_end: u64,
    range: LsnRange,
    poisoned: bool,
}

impl FileModel {
    fn open(id: JournalId, segment: SimFile, marker: Marker) -> pagesync::journal::Result<FileModel> {
        let io = |op: &'static str| {
            move |error| JournalError::Io { journal: id, op, path: "sim/segment".into(), error }
        };
        let len = segment.size().map_err(io("size"))?;
        let mut bytes = vec![0; len as usize];
        segment.read_exact_at(&mut bytes, 0).map_err(io("read segment"))?;
        let trimmed = marker.trimmed_through.load(Ordering::Relaxed);
        let mut j = FileModel {
            id,
            segment,
            marker,
            base: None,
            offsets: Vec::new(),
            end: 0,
            synced_end: 0,
            range: LsnRange::empty_at(Lsn::new(trimmed + 1).expect("BUG: n + 1 > 0")),
            poisoned: false,
        };
        if bytes.len() < SEGMENT_HEADER_BYTES as usize {
            // A torn header: the segment never held a frame.
            if !bytes.is_empty() {
                j.drop_segment().map_err(io("remove torn segment"))?;
            }
            return Ok(j);
        }
        let base = Lsn::new(u64::from_le_bytes(bytes[..8].try_into().expect("BUG: 8 bytes")))
            .ok_or_else(|| j.corrupt(Lsn::FIRST, "segment header names LSN 0".into()))?;
        let (mut pos, mut lsn) = (SEGMENT_HEADER_BYTES as usize, base);
        while pos < bytes.len() {
            match codec::decode_frame(&bytes[pos..], lsn) {
                Ok(payload) => {
                    j.offsets.push(pos as u64);
                    pos += codec::frame_len(payload.len());
                    lsn = lsn.next();
                }
                Err(e) if codec::is_torn_tail(&bytes[pos..], &e) => break,
                Err(e) => return Err(j.corrupt(lsn, e.to_string())),
            }
        }
        if pos < bytes.len() {
            j.segment.truncate(pos as u64).map_err(io("truncate torn tail"))?;
        }
        // As `FileJournal`: what a crashed process appended without a barrier is made durable
        // before it counts as synced.
        j.segment.flush().map_err(io("fsync"))?;
        (j.base, j.end, j.synced_end) = (Some(base), pos as u64, pos as u64);
        let frames = LsnRange::from_count(base, j.offsets.len() as u64);
        j.range = Lsn::new(trimmed).map_or(frames, |t| frames.remove_through(t));
        if trimmed > 0 && frames.next() <= j.range.first() {
            j.drop_segment().map_err(io("remove trimmed segment"))?;
        }
        Ok(j)
    }

    fn corrupt(&self, lsn: Lsn, reason: String) -> JournalError {
        JournalError::Corrupt { journal: self.id, location: "sim/segment".into(), lsn, reason }
    }

    fn io(&self, op: &'static str, error: std::io::Error) -> JournalError {
        JournalError::Io { journal: self.id, op, path: "sim/segment".into(), error }
    }

    /// Deletes the segment (unlink, then fsync the directory). It is forgotten first, as
    /// `FileJournal` forgets a segment before it unlinks it: a failed unlink leaves a file that
    /// the next open deletes.
    fn drop_segment(&mut self) -> std::io::Result<()> {
        (self.base, self.end, self.synced_end) = (None, 0, 0);
        self.offsets.clear();
        self.segment.truncate(0)?;
        self.segment.flush()
    }

    /// Starts the segment at `first`, durable before any frame goes in. On failure the file
    /// is removed again (a second attempt creates it anew).
    fn roll(&mut self, first: Lsn) -> pagesync::journal::Result<()> {
        let header = first.get().to_le_bytes();
        let written = self.segment.write_all_at(&header, 0).and_then(|()| self.segment.flush());
        if let Err(e) = written {
            let _ = self.segment.truncate(0);
            return Err(self.io("create segment", e));
        }
        (self.base, self.end, self.synced_end) = (Some(first), SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES);
        Ok(())
    }

    fn check_writable(&self) -> pagesync::journal::Result<()> {
        if self.poisoned {
            let message = "an earlier fsync failed; reopen the journal before appending".into();
            return Err(JournalError::Poisoned { journal: self.id, message });
        }
        Ok(())
    }

    fn frame_at(&self, lsn: Lsn) -> pagesync::journal::Result<(u64, u64)> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let base = self.base.expect("BUG: a readable entry is in a segment");
        let i = (lsn.get() - base.get()) as usize;
        Ok((self.offsets[i], self.offsets.get(i + 1).copied().unwrap_or(self.end)))
    }
}

impl Journal for FileModel {
    fn id(&self) -> JournalId {
        self.id
    }

    fn range(&self) -> LsnRange {
        self.range
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<LsnRange> {
        let batch = self.append_batch_unsynced(payloads)?;
        self.sync()?;
        Ok(batch)
    }

    fn sync(&mut self) -> pagesync::journal::Result<()> {
        self.check_writable()?;
        if self.synced_end == self.end {
            return Ok(());
        }
        if let Err(e) = self.segment.flush() {
            let synced = self.synced_end;
            let _ = self.segment.truncate(synced);
            self.offsets.retain(|at| *at < synced);
            self.end = synced;
            let base = self.base.expect("BUG: unsynced bytes are in a segment");
            let next = LsnRange::from_count(base, self.offsets.len() as u64).next();
            self.range = match next.prev().filter(|last| *last >= self.range.first()) {
                Some(last) => LsnRange::inclusive(self.range.first(), last),
                None => LsnRange::empty_at(self.range.first()),
            };
            self.poisoned = true;
            return Err(self.io("fsync", e));
        }
        self.synced_end = self.end;
        Ok(())
    }

    fn is_synced(&self) -> bool {
        self.synced_end == self.end
    }

    fn append_batch_unsynced(&mut self, payloads: &[&[u8]]) -> pagesync::journal::Result<LsnRange> {
        self.check_writable()?;
        let first = self.range.next();
        let batch = LsnRange::from_count(first, payloads.len() as u64);
        if payloads.is_empty() {
            return Ok(batch);
        }
        if self.base.is_none() {
            self.roll(first)?;
        }
        let mut buf = Vec::new();
        let starts = codec::encode_frames(&mut buf, first, payloads);
        let start = self.end;
        if let Err(e) = self.segment.write_all_at(&buf, start) {
            let _ = self.segment.truncate(start);
            return Err(self.io("append", e));
        }
        self.offsets.extend(starts.iter().map(|at| start + *at as u64));
        self.end += buf.len() as u64;
        self.range = self.range.extend(payloads.len() as u64);
        Ok(batch)
    }

    fn read(&self, lsn: Lsn) -> pagesync::journal::Result<Vec<u8>> {
        let (at, end) = self.frame_at(lsn)?;
        let mut frame = vec![0; (end - at) as usize];
        self.segment.read_exact_at(&mut frame, at).map_err(|e| self.io("read", e))?;
        Ok(codec::decode_frame(&frame, lsn).map_err(|e| self.corrupt(lsn, e.to_string()))?.to_vec())
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> pagesync::journal::Result<()> {
        let (at, end) = self.frame_at(lsn)?;
        let payload_len = (end - at) as usize - FRAME_HEADER_BYTES;
        if offset.checked_add(buf.len()).is_none_or(|e| e > payload_len) {
            return Err(JournalError::PastEntryEnd { journal: self.id, lsn, len_bytes: payload_len });
        }
        let from = at + (FRAME_HEADER_BYTES + offset) as u64;
        self.segment.read_exact_at(buf, from).map_err(|e| self.io("read", e))
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> pagesync::journal::Result<()> {
        let trimmed = self.range.remove_through(up_to);
        if trimmed == self.range {
            return Ok(());
        }
        self.check_writable()?;
        let through = trimmed.first().prev().expect("BUG: a trimmed range starts after LSN 1");
        if self.segment.other_write_fails() {
            let e = std::io::Error::from(std::io::ErrorKind::StorageFull);
            return Err(self.io("write JOURNAL.tmp", e));
        }
        self.marker.trimmed_through.store(through.get(), Ordering::Relaxed);
        self.range = trimmed;
        let held = self.base.map(|b| LsnRange::from_count(b, self.offsets.len() as u64));
        if held.is_some_and(|h| h.next() <= self.range.first()) {
            // Trimmed with the marker: a segment that would not delete goes on the next open.
            let _ = self.drop_segment();
        }
        Ok(())
    }
}

/// How a put is answered.
enum PutFault {
    /// It fails before it reaches the store.
    Failed,
    /// It lands, and the caller is told it failed (a timeout after the store took it).
    Landed,
}

/// An in-memory object store that fails puts (some of which land all the same), GETs and LISTs,
/// and takes time, on a seeded RNG.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<InMemory>,
    rng: Mutex<Rng>,
    faults: Arc<Faults>,
    disk: Arc<DiskShared>,
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

fn store_err(what: &str) -> object_store::Error {
    object_store::Error::Generic { store: "sim", source: format!("injected fault: {what}").into() }
}

/// Latency of an S3 request that is not slow, in ms.
const S3_MS: u64 = 15;

impl FaultyStore {
    fn rng(&self) -> MutexGuard<'_, Rng> {
        self.rng.lock().expect("BUG: store rng lock poisoned")
    }

    fn delay(&self, rng: &mut Rng, slow: &AtomicU64) {
        self.disk.latency_ms.fetch_add(self.faults.latency_ms(rng, S3_MS, slow), Ordering::Relaxed);
    }

    /// Whether this read fails.
    fn read_fails(&self) -> bool {
        let mut rng = self.rng();
        self.delay(&mut rng, &self.faults.counts.slow_reads);
        let fails = self.faults.strikes(&mut rng, self.faults.rates.read);
        if fails {
            bump(&self.faults.counts.read_failures);
            self.disk.faults.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    /// Whether this delete fails (the object stays).
    fn write_fails(&self) -> bool {
        let mut rng = self.rng();
        let fails = self.faults.strikes(&mut rng, self.faults.rates.write);
        if fails {
            bump(&self.faults.counts.failed_puts);
            self.disk.faults.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    fn put_fault(&self) -> Option<PutFault> {
        let mut rng = self.rng();
        self.delay(&mut rng, &self.faults.counts.slow_appends);
        if !self.faults.strikes(&mut rng, self.faults.rates.put) {
            return None;
        }
        self.disk.faults.fetch_add(1, Ordering::Relaxed);
        Some(if rng.chance(50) { PutFault::Landed } else { PutFault::Failed })
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match self.put_fault() {
            None => self.inner.put_opts(location, payload, opts).await,
            Some(PutFault::Failed) => {
                bump(&self.faults.counts.failed_puts);
                Err(store_err("the put failed before reaching the store"))
            }
            Some(PutFault::Landed) => {
                self.inner.put_opts(location, payload, opts).await?;
                bump(&self.faults.counts.unknown_puts);
                self.disk.landed_unknown.store(true, Ordering::Relaxed);
                Err(store_err("the put timed out after the store took it"))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        if self.read_fails() {
            return Err(store_err("GET failed"));
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures_util::stream::BoxStream<'static, object_store::Result<Path>>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<Path>> {
        use futures_util::StreamExt;
        if self.write_fails() {
            return locations.map(|_| Err(store_err("DELETE failed"))).boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
        use futures_util::StreamExt;
        if self.read_fails() {
            return futures_util::stream::once(async { Err(store_err("LIST failed")) }).boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// The backend a journal runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `FileJournal`, as [`FileModel`]: server stores and native clients.
    File,
    /// `HandleJournal` over two files: the browser's OPFS.
    Handle,
    /// `ObjectJournal`: an S3 server store.
    Object,
}

/// Handle journals of the simulator compact once this many removed bytes are held (and they
/// outweigh the live ones), far below the default, so compaction runs (and fails) too.
const SIM_COMPACT_MIN_BYTES: u64 = 16 << 10;

#[derive(Debug)]
enum Media {
    Files([SimFile; 2], Marker),
    Objects { store: Arc<FaultyStore>, rt: Arc<tokio::runtime::Runtime> },
}

/// The storage of one journal, which outlives the journals opened on it: what a crash leaves.
#[derive(Clone, Debug)]
pub struct Disk {
    kind: Kind,
    id: JournalId,
    media: Arc<Media>,
    shared: Arc<DiskShared>,
}

impl Disk {
    /// Storage for journal `id`, named `name` (which also seeds its faults).
    pub fn new(kind: Kind, id: JournalId, name: &str, seed: u64, faults: &Arc<Faults>) -> Disk {
        let shared = Arc::new(DiskShared::default());
        let media = match kind {
            Kind::File | Kind::Handle => {
                let file =
                    |n: &str| SimFile::new(format!("{name}/{n}"), seed, faults.clone(), shared.clone());
                Media::Files([file("a"), file("b")], Marker { trimmed_through: Arc::default() })
            }
            Kind::Object => {
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime");
                let rng = Mutex::new(Rng(seed_of(seed, name)));
                let inner = Arc::new(InMemory::new());
                let store = FaultyStore { inner, rng, faults: faults.clone(), disk: shared.clone() };
                Media::Objects { store: Arc::new(store), rt: Arc::new(rt) }
            }
        };
        Disk { kind, id, media: Arc::new(media), shared }
    }

    /// Opens (or creates) the journal, as a process that starts does.
    pub fn open(&self) -> pagesync::journal::Result<Box<dyn Journal>> {
        for flag in [&self.shared.write_failed, &self.shared.flush_failed, &self.shared.landed_unknown] {
            flag.store(false, Ordering::Relaxed);
        }
        self.shared.opening.store(true, Ordering::Relaxed);
        let opened = self.open_journal();
        self.shared.opening.store(false, Ordering::Relaxed);
        opened
    }

    fn open_journal(&self) -> pagesync::journal::Result<Box<dyn Journal>> {
        match (&*self.media, self.kind) {
            (Media::Files([a, _], marker), Kind::File) => {
                Ok(Box::new(FileModel::open(self.id, a.clone(), marker.clone())?))
            }
            (Media::Files(files, _), _) => {
                let mut j = HandleJournal::open_or_create(files.clone(), self.id)?;
                j.set_compact_min_bytes(SIM_COMPACT_MIN_BYTES);
                Ok(Box::new(j))
            }
            (Media::Objects { store, rt }, _) => {
                let store: Arc<dyn ObjectStore> = store.clone();
                let backend = ObjectBackend::new(store, "docs", rt.handle().clone(), "sim://objects");
                Ok(Box::new(backend.open_or_create(&self.id.to_string(), self.id)?))
            }
        }
    }

    /// A power cut: what was not flushed may be lost or torn. True when anything was.
    pub fn power_cut(&self) -> bool {
        match &*self.media {
            Media::Files(files, _) => files.iter().fold(false, |lost, f| f.power_cut() | lost),
            Media::Objects { .. } => false,
        }
    }

    /// Whether the journal opened last may refuse appends until it is reopened, after the
    /// faults that struck it (a failed flush of the file backend's own cleanup counts too).
    pub fn needs_reopen(&self) -> bool {
        let s = &self.shared;
        match self.kind {
            Kind::File => s.flush_failed.load(Ordering::Relaxed),
            Kind::Handle => s.write_failed.load(Ordering::Relaxed) || s.flush_failed.load(Ordering::Relaxed),
            Kind::Object => s.landed_unknown.load(Ordering::Relaxed),
        }
    }

    /// Faults injected since the last call.
    pub fn take_faults(&self) -> u64 {
        self.shared.faults.swap(0, Ordering::Relaxed)
    }

    /// Time the operations took since the last call, in ms.
    pub fn take_latency_ms(&self) -> i64 {
        self.shared.latency_ms.swap(0, Ordering::Relaxed)
    }
}
