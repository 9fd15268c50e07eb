//! The file backend: a directory of append-only segment files, fsynced before `append` returns.
//!
//! Layout (byte diagrams in `docs/design.md`):
//! - `JOURNAL`: the marker. Magic, version, the journal id and the trim point (`trimmed_through`),
//!   checksummed. Rewritten atomically (temp file, fsync, rename, fsync directory).
//! - `<first LSN, 20 digits>.seg`: a 40-byte header then frames (see `codec`), rolled by size.
//!
//! Crash model:
//! - An append writes its frames with one `pwrite` and one `fdatasync`; it is acknowledged only
//!   after both. A crash before that may leave a torn tail in the last segment. On open, the
//!   first invalid frame of the last segment is treated as a torn tail (and truncated) when
//!   nothing but that frame or zeros follows it; any other invalid frame is corruption, reported
//!   with the journal, segment and LSN, and nothing is truncated.
//! - A new segment's header is fsynced (file and directory) before any frame goes into it, so a
//!   last segment with a torn header holds no acknowledged entry and is removed on open.
//!   Except with `roll_without_barrier` (a replica's storage): a roll then waits for no disk,
//!   the new header says so (`STARTED_UNSYNCED`), and `sync` makes every segment behind durable,
//!   oldest first, then the directory. A crash before it may leave a segment torn with segments
//!   after it, or a new segment without its header or its file: open cuts the torn one and
//!   removes every segment after it (none of their entries was acknowledged).
//! - `remove_prefix` records the trim point in `JOURNAL` before deleting any segment; segments
//!   left behind by a crash in between are deleted on the next open.
//! - After a failed `fdatasync` the journal refuses further appends until it is reopened: the
//!   kernel may have dropped the dirty pages, so the file's contents are unknown until re-read.
//!   The batch is cut off the file first: Linux may keep its pages in the cache, marked clean
//!   but not on disk, so a reopen would read it, and no later `fdatasync` would write it (the
//!   entries appended after it would follow a hole after a power cut).
//! - A segment that cannot be started (its header written and synced) is removed again, so
//!   the next append can create it.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::codec::{self, FRAME_HEADER_BYTES};
use crate::os::Mapped;
use crate::{DetachedSync, Journal, JournalError, JournalId, Lsn, LsnRange, Result};

const MARKER_FILE: &str = "JOURNAL";
const MARKER_TMP: &str = "JOURNAL.tmp";
const MARKER_MAGIC: &[u8; 16] = b"PAGESYNC-JOURNAL";
const MARKER_BYTES: usize = 16 + 4 + 4 + 16 + 8 + 4;
const FORMAT_VERSION: u32 = 1;

const SEGMENT_MAGIC: &[u8; 8] = b"PGSJSEG\x01";
/// magic 8 | journal id 16 | first LSN 8 | flags 4 | crc32c 4
pub const SEGMENT_HEADER_BYTES: usize = 40;
/// Segment header flag: the segment was started before the one before it was durable
/// (`FileJournalOptions::roll_without_barrier`), so a crash may have left that one torn.
const STARTED_UNSYNCED: u32 = 1;
const SEGMENT_SUFFIX: &str = ".seg";

/// Bytes appended without a barrier after which the kernel is asked to start writing them to
/// disk (`os::start_writeback`), without waiting: 8 MiB. A download appends hundreds of MiB
/// that way; left dirty, all of it would be written by the fsync that makes them durable (a
/// segment's roll, `sync`), which a download then waits for (about 35 ms per 64 MiB here).
const WRITEBACK_BYTES: u64 = 8 << 20;
/// The same for a trickle of small appends (each under `SMALL_APPEND_BYTES`): 128 KiB. A
/// replica taking a hundred small steps a second appends about 1 MB of pages a second between
/// its storage syncs; written all at once by that sync, they held up the durable writes of
/// every other journal on the disk for 3 to 6 ms once a second, about 1% of them, which made
/// the p99 of propagation latency. A download's large appends keep the larger step: at 128 KiB
/// a 102 MB cold start ran about 10% slower (medians of 5 `pagesync-bench bulk` runs each).
const WRITEBACK_TRICKLE_BYTES: u64 = 128 << 10;
/// An append smaller than this is part of a trickle (`WRITEBACK_TRICKLE_BYTES`).
const SMALL_APPEND_BYTES: u64 = 64 << 10;
/// The granule of a writeback hint: a page of the kernel's cache.
const WRITEBACK_PAGE: u64 = 4096;

/// Tunables of a file journal.
#[derive(Clone, Debug)]
pub struct FileJournalOptions {
    /// A segment is closed and a new one started once it holds this many bytes. 64 MiB keeps the
    /// number of files small for long histories while prefix removal still frees space in steps
    /// far below a typical disk.
    pub max_segment_bytes: u64,
    /// Open without changing anything on disk, for inspection beside a running writer
    /// (`pagesync-server verify`): a torn tail or a leftover file is reported by
    /// [`FileJournal::repairs`] instead of repaired, and appends and trims are refused.
    pub read_only: bool,
    /// Close the segment files after every durable write (and open them again when used): a
    /// journal that is written once per step costs no file descriptor between steps. For
    /// journals many of which are open at once (a server's history journals), where the
    /// descriptors would otherwise double a server's; an open costs microseconds, an fsync
    /// milliseconds.
    pub close_files: bool,
    /// Read parts of entries (`read_part`: a replica's page reads) through a memory map of
    /// each segment instead of a `pread` each: one copy out of the page cache, no system call.
    /// For a replica's storage journal, read at every SQLite page-cache miss. Off by default:
    /// a server holds thousands of journals, and each map is an entry in the process's
    /// limited table of maps. Only for a journal whose directory the process owns (holding
    /// its `DirLock`): a file cut by someone else under a map, or a disk that fails a read
    /// through it, ends the process (SIGBUS) where a `pread` would fail. Ignored with
    /// `read_only` (its owner, another process, may cut what it has not synced).
    pub map_reads: bool,
    /// Keep zeros written ahead of the last segment's end (`PREALLOCATE_MIN_BYTES` up to a
    /// quarter of the segment, at most `PREALLOCATE_MAX_BYTES`), so that an append overwrites
    /// blocks the file already has: its `fdatasync` then writes the data alone, not the file's
    /// new size as well, which took about twice as long here. An append larger than that
    /// space writes none (the next like it would grow the file anyway). For journals that take
    /// a small append and a barrier at a time (a replica's timeline, a server's storage and
    /// history); a journal filled in bulk without barriers (a download) would write its bytes
    /// twice.
    /// Recovery reads zeros after the last entry as unused space, not as a torn tail.
    pub preallocate: bool,
    /// A roll starts the new segment without first making the old one durable (the next
    /// `sync` or barrier does, oldest segment first), so that a journal filled in bulk without
    /// barriers (a replica's download) does not wait for the disk at each roll, under its
    /// replica's lock (an fsync of 64 MiB took 17 to 110 ms on the development VM). Only for
    /// a journal whose entries can be fetched again (a replica's storage): a crash can then
    /// leave a segment torn with segments after it, which open cuts off (the new segment's
    /// header says it was started that way; entries in it were never acknowledged), and a
    /// damaged final entry of such a segment reads as a torn one, cut with all that follows.
    pub roll_without_barrier: bool,
}

/// The least a preallocating journal writes ahead (`FileJournalOptions::preallocate`).
pub const PREALLOCATE_MIN_BYTES: u64 = 16 << 10;
/// The most a preallocating journal writes ahead at once: 64 KiB. The zeros are made durable by
/// the barrier of the append that reached the end, which waits for them. With a quarter of the
/// segment (up to 1 MiB), the server steps of the latency benchmark that wrote zeros ahead took
/// 2.4 to 4.1 ms against 0.55 on average: 1% of the steps, so they made its p99.
pub const PREALLOCATE_MAX_BYTES: u64 = 64 << 10;

impl Default for FileJournalOptions {
    fn default() -> Self {
        FileJournalOptions {
            max_segment_bytes: 64 << 20,
            read_only: false,
            close_files: false,
            map_reads: false,
            preallocate: false,
            roll_without_barrier: false,
        }
    }
}

/// A segment's file, opened again when used if it was closed (`FileJournalOptions::close_files`);
/// once open, a read costs no more than with a plain `File`.
#[derive(Debug)]
struct SegFile {
    writable: bool,
    open: std::sync::OnceLock<File>,
    /// The file mapped for reads (`FileJournalOptions::map_reads`), made at the first such read;
    /// `None` inside when it could not be mapped (reads then `pread`).
    mapped: std::sync::OnceLock<Option<Mapped>>,
}

impl SegFile {
    fn new(file: Option<File>, writable: bool) -> SegFile {
        let open = std::sync::OnceLock::new();
        if let Some(file) = file {
            let _ = open.set(file);
        }
        SegFile { writable, open, mapped: std::sync::OnceLock::new() }
    }

    /// The file at `path` (the segment's), opened if it was closed.
    fn get(&self, path: &Path) -> std::io::Result<&File> {
        if let Some(f) = self.open.get() {
            return Ok(f);
        }
        let f = OpenOptions::new().read(true).write(self.writable).open(path)?;
        Ok(self.open.get_or_init(|| f))
    }

    /// The file's map, made `map_len` bytes long at the first call; `None` when the file
    /// cannot be mapped. Only bytes below the file's length may be read through it.
    fn mapped(&self, path: &Path, map_len: u64) -> Option<&Mapped> {
        let mapped = self.mapped.get_or_init(|| {
            let file = self.get(path).ok()?;
            Mapped::new(file, usize::try_from(map_len).ok()?).ok()
        });
        mapped.as_ref()
    }

    fn close(&mut self) {
        self.open.take();
        self.mapped.take();
    }
}

#[derive(Debug)]
struct Segment {
    first: Lsn,
    path: PathBuf,
    file: SegFile,
    /// Byte offset of each frame; `offsets[i]` holds LSN `first + i`.
    offsets: Vec<u64>,
    len_bytes: u64,
    /// Bytes known to be on disk: below `len_bytes` after `append_batch_unsynced`, until the
    /// next `sync`. Only the last segment is ever behind, unless segments rolled without a
    /// barrier (`FileJournalOptions::roll_without_barrier`): then every one after the first
    /// behind is too, from byte 0 (its header is not known to be on disk either).
    synced_bytes: u64,
    /// Where the kernel was last asked to start writing back (`WRITEBACK_BYTES`).
    writeback_from: u64,
    /// The file's size: `len_bytes` and the zeros written ahead of it, if any
    /// (`FileJournalOptions::preallocate`).
    alloc_bytes: u64,
}

impl Segment {
    fn next(&self) -> Lsn {
        LsnRange::from_count(self.first, self.offsets.len() as u64).next()
    }
}

/// A journal stored as segment files in one directory.
#[derive(Debug)]
pub struct FileJournal {
    id: JournalId,
    dir: PathBuf,
    opts: FileJournalOptions,
    segments: Vec<Segment>,
    range: LsnRange,
    /// Set when an fsync failed: appends are refused until the journal is reopened.
    poisoned: bool,
    /// Tells this journal's detached barriers from another's (`Journal::detach_sync`): unique
    /// in the process.
    instance: u64,
    /// Entries taken back (`remove_last`): a barrier detached before a cut may have run
    /// before the bytes written in its place, so it records nothing.
    cuts: u64,
    /// The descriptor detached barriers fsync through (cloned for each), with the first LSN
    /// of the segment it is of: opened at the first `detach_sync`, and again at each roll
    /// after that, before the new segment is written. Opened once, not for each barrier: a
    /// write-back error is reported to every file open when it happens, but to one opened
    /// later only if nobody has seen it yet.
    barrier: Option<(Lsn, File)>,
    /// Barrier descriptors of segments rolled without a barrier (`roll_without_barrier`), kept
    /// until they are synced: `barrier` moves here at such a roll.
    rolled_barriers: Vec<(Lsn, File)>,
    /// Segments rolled without a barrier, counted, and how many of the first of them an fsync
    /// of the directory has covered (their entries in it durable): the next `sync` or barrier
    /// covers the rest. Marks, not a count of those behind: a barrier that finishes after a
    /// `sync` and a later roll covers only the rolls before it was taken.
    dir_rolls: u64,
    dir_synced: u64,
    /// What opening found to repair (done, unless read-only): torn tails, leftover files.
    repairs: Vec<String>,
}

fn io_err(id: JournalId, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |error| JournalError::Io { journal: id, op, path, error }
}

/// A number no other `FileJournal` of this process has (`FileJournal::instance`).
fn next_instance() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn segment_name(first: Lsn) -> String {
    format!("{:020}{SEGMENT_SUFFIX}", first.get())
}

fn sync_dir(id: JournalId, dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(id, "fsync directory", dir))
}

fn encode_marker(id: JournalId, trimmed_through: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(MARKER_BYTES);
    out.extend_from_slice(MARKER_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&trimmed_through.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&out).to_le_bytes());
    out
}

/// Parses `JOURNAL` into `(id, trimmed_through)`, or says why it is not ours.
fn decode_marker(bytes: &[u8]) -> std::result::Result<(JournalId, u64), String> {
    if bytes.len() != MARKER_BYTES || &bytes[..16] != MARKER_MAGIC {
        return Err("the JOURNAL file does not start with the pagesync magic".into());
    }
    let (body, crc) = bytes.split_at(MARKER_BYTES - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("the JOURNAL file fails its checksum".into());
    }
    let version = u32::from_le_bytes(body[16..20].try_into().expect("BUG: 4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("format version {version}, this build reads {FORMAT_VERSION}"));
    }
    let id = JournalId::from_bytes(body[24..40].try_into().expect("BUG: 16 bytes"));
    Ok((id, u64::from_le_bytes(body[40..48].try_into().expect("BUG: 8 bytes"))))
}

fn encode_segment_header(id: JournalId, first: Lsn, flags: u32) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..24].copy_from_slice(id.as_bytes());
    h[24..32].copy_from_slice(&first.get().to_le_bytes());
    h[32..36].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&h[..36]);
    h[36..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment's header and returns its flags (`STARTED_UNSYNCED`).
fn check_segment_header(h: &[u8], id: JournalId, first: Lsn) -> std::result::Result<u32, String> {
    let h = h.get(..SEGMENT_HEADER_BYTES).ok_or("shorter than a segment header")?;
    if crc32c::crc32c(&h[..36]).to_le_bytes() != h[36..] || &h[..8] != SEGMENT_MAGIC {
        return Err("segment header fails its checksum".into());
    }
    if h[8..24] != id.as_bytes()[..] {
        return Err("segment belongs to another journal".into());
    }
    let found = u64::from_le_bytes(h[24..32].try_into().expect("BUG: 8 bytes"));
    if found != first.get() {
        return Err(format!("header says first LSN {found}, file name says {first}"));
    }
    let flags = u32::from_le_bytes(h[32..36].try_into().expect("BUG: 4 bytes"));
    if flags & !STARTED_UNSYNCED != 0 {
        return Err(format!("unknown segment flags {flags:#x}"));
    }
    Ok(flags)
}

impl FileJournal {
    /// Creates a new, empty journal in `dir`, which must be missing or empty, or hold only the
    /// temporary marker of a creation that a crash cut short (before its rename: no journal
    /// was made, and the next creation replaces it).
    pub fn create(dir: impl AsRef<Path>, id: JournalId, opts: FileJournalOptions) -> Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(io_err(id, "create directory", dir))?;
        if dir.join(MARKER_FILE).exists() {
            return Err(JournalError::AlreadyExists { path: dir.to_path_buf() });
        }
        let entries = fs::read_dir(dir).map_err(io_err(id, "list directory", dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(id, "list directory", dir))?;
            if entry.file_name() != MARKER_TMP {
                let reason = "the directory is not empty and has no JOURNAL marker".into();
                return Err(JournalError::Foreign { path: dir.to_path_buf(), reason });
            }
        }
        write_marker(id, dir, 0)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(id, parent)?;
        }
        Ok(FileJournal {
            id,
            dir: dir.to_path_buf(),
            opts,
            segments: Vec::new(),
            range: LsnRange::new_empty(),
            poisoned: false,
            instance: next_instance(),
            cuts: 0,
            barrier: None,
            rolled_barriers: Vec::new(),
            dir_rolls: 0,
            dir_synced: 0,
            repairs: Vec::new(),
        })
    }

    /// Opens an existing journal, verifying every frame and truncating a torn tail.
    pub fn open(dir: impl AsRef<Path>, opts: FileJournalOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let (id, trimmed_through) = read_marker(dir)?;
        let mut journal = FileJournal {
            id,
            dir: dir.to_path_buf(),
            opts,
            segments: Vec::new(),
            range: LsnRange::empty_at(Lsn::new(trimmed_through + 1).expect("BUG: n + 1 > 0")),
            poisoned: false,
            instance: next_instance(),
            cuts: 0,
            barrier: None,
            rolled_barriers: Vec::new(),
            dir_rolls: 0,
            dir_synced: 0,
            repairs: Vec::new(),
        };
        journal.load_segments(trimmed_through)?;
        Ok(journal)
    }

    /// Opens the journal in `dir`, creating it if the directory is missing or empty. Fails if
    /// the directory holds another journal.
    pub fn open_or_create(dir: impl AsRef<Path>, id: JournalId, opts: FileJournalOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.join(MARKER_FILE).exists() {
            return Self::create(dir, id, opts);
        }
        let journal = Self::open(dir, opts)?;
        if journal.id != id {
            let reason = format!("it holds journal {}, not {id}", journal.id);
            return Err(JournalError::Foreign { path: dir.to_path_buf(), reason });
        }
        Ok(journal)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `open` found to repair after a crash: a torn final entry, a torn empty segment,
    /// segments left behind by an interrupted trim, a leftover temporary marker. Repaired
    /// unless the journal was opened read-only.
    pub fn repairs(&self) -> &[String] {
        &self.repairs
    }

    /// After a failed fsync: cuts the first segment behind the disk (the last, unless segments
    /// rolled without a barrier) to what is known to be on disk and removes the segments after
    /// it, which hold nothing on disk but their headers (a reopen must not read what may not
    /// be; see the crash model), and refuses every later call until the journal is reopened
    /// from what is.
    fn failed_sync(&mut self, e: std::io::Error) -> JournalError {
        let id = self.id;
        self.poisoned = true;
        // A detached barrier's segment may have been trimmed away since: nothing to cut.
        let Some(i) = self.segments.iter().position(|s| s.synced_bytes < s.len_bytes) else {
            return io_err(id, "fsync", &self.dir)(e);
        };
        let removed: Vec<Segment> = self.segments.drain(i + 1..).collect();
        if !removed.is_empty() {
            // Best effort: a reopen cuts them anyway (their headers say they were started
            // before this one was durable).
            removed.iter().for_each(|r| drop(fs::remove_file(&r.path)));
            let _ = sync_dir(id, &self.dir);
            self.rolled_barriers.retain(|(first, _)| *first < removed[0].first);
        }
        let seg = self.segments.last_mut().expect("BUG: segment i was kept");
        let _ = seg.file.get(&seg.path).and_then(|f| f.set_len(seg.synced_bytes));
        let synced = seg.synced_bytes;
        seg.alloc_bytes = synced;
        seg.offsets.retain(|at| *at < synced);
        seg.len_bytes = synced;
        let err = io_err(id, "fsync", &seg.path)(e);
        let next = seg.next();
        // Only what is on disk stays readable (nothing can be written until a reopen).
        self.range = match next.prev().filter(|last| *last >= self.range.first()) {
            Some(last) => LsnRange::inclusive(self.range.first(), last),
            None => LsnRange::empty_at(self.range.first()),
        };
        err
    }

    /// A clone of the last segment's barrier descriptor (`barrier`), opened first if it is
    /// not of that segment.
    fn barrier_file(&mut self) -> std::io::Result<File> {
        let seg = self.segments.last().expect("BUG: a barrier is of a segment");
        if self.barrier.as_ref().is_none_or(|(first, _)| *first != seg.first) {
            self.barrier = Some((seg.first, File::open(&seg.path)?));
        }
        self.barrier.as_ref().expect("BUG: just opened").1.try_clone()
    }

    /// Appends and trims are refused read-only, and after a failed fsync until reopened.
    fn check_writable(&self) -> Result<()> {
        if self.opts.read_only {
            let message = format!("{} was opened read-only", self.dir.display());
            return Err(JournalError::Backend { journal: self.id, message });
        }
        if self.poisoned {
            let message = "an earlier fsync failed; reopen the journal before appending".into();
            return Err(JournalError::Poisoned { journal: self.id, message });
        }
        Ok(())
    }

    /// Bytes on disk in segment files.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len_bytes).sum()
    }

    /// Lists the segment files, verifies them in order and builds the frame index.
    fn load_segments(&mut self, trimmed_through: u64) -> Result<()> {
        let mut firsts = self.list_segment_files()?;
        firsts.sort();
        let count = firsts.len();
        // Which segments were started before the one before them was durable: that one may
        // end torn, its entries cut short, and then neither it nor any later one was
        // acknowledged past the cut.
        let starts: Vec<Start> = firsts.iter().map(|&f| self.start_of(f)).collect();
        for (i, &first) in firsts.iter().enumerate() {
            let path = self.dir.join(segment_name(first));
            if starts[i] == Start::Torn {
                // A later segment started after a sync (no flag): this header was on disk then.
                if starts[i + 1..].contains(&Start::Synced) {
                    let reason = "its header is gone, yet a segment after it was started once it was durable";
                    return Err(self.corrupt_segment(&path, reason.into()));
                }
                self.cut_rolled(&firsts[i..], "its header never reached the disk")?;
                break;
            }
            let next_first = self.segments.last().map(Segment::next);
            if let Some(expected) = next_first.filter(|&e| e != first) {
                if starts[i] == Start::Unsynced && expected < first {
                    let why = format!("entries from LSN {expected} on were lost with the segment before it");
                    self.cut_rolled(&firsts[i..], &why)?;
                    break;
                }
                let reason = format!("segment starts at LSN {first}, expected {expected}");
                return Err(self.corrupt_segment(&path, reason));
            }
            let is_last = i + 1 == count;
            let may_be_behind = is_last || starts[i + 1] != Start::Synced;
            match self.load_segment(&path, first, is_last, may_be_behind)? {
                Some((seg, torn)) => {
                    let next = seg.next();
                    self.segments.push(seg);
                    if torn && !is_last {
                        let why = format!("the segment before it was torn at LSN {next}");
                        self.cut_rolled(&firsts[i + 1..], &why)?;
                        break;
                    }
                }
                None => {
                    self.repairs.push(format!("{}: a torn, empty last segment", path.display()));
                    if !self.opts.read_only {
                        remove_file(self.id, &path)?;
                    }
                }
            }
        }
        // Segments kept that were rolled without a barrier: their data was synced above, and
        // their names in the directory may still be in memory only (a killed process).
        let kept = self.segments.len();
        if !self.opts.read_only && starts.iter().take(kept).any(|s| *s == Start::Unsynced) {
            sync_dir(self.id, &self.dir)?;
        }
        if let Some(first) = self.segments.first().map(|s| s.first) {
            if first.get() > trimmed_through + 1 {
                let reason = format!(
                    "entries {}..{first} are missing: the trim point says they were never removed",
                    trimmed_through + 1
                );
                return Err(self.corrupt_segment(&self.segments[0].path, reason));
            }
            let next = self.segments.last().map(Segment::next).expect("BUG: non-empty");
            self.range = LsnRange::from_count(first, next.get() - first.get());
        }
        if let Some(t) = Lsn::new(trimmed_through) {
            // Also when every segment is gone, the marker promises entries up to `t` existed.
            self.range = self.range.remove_through(t);
            self.delete_trimmed_segments()?;
        }
        Ok(())
    }

    fn list_segment_files(&self) -> Result<Vec<Lsn>> {
        let entries = fs::read_dir(&self.dir).map_err(io_err(self.id, "list directory", &self.dir))?;
        let mut firsts = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(self.id, "list directory", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == MARKER_FILE {
                continue;
            }
            if name == MARKER_TMP {
                if !self.opts.read_only {
                    remove_file(self.id, &entry.path())?;
                }
                continue;
            }
            match parse_segment_name(&name) {
                Some(first) => firsts.push(first),
                None => {
                    let reason = format!("unexpected file {name:?} in the journal directory");
                    return Err(JournalError::Foreign { path: self.dir.clone(), reason });
                }
            }
        }
        Ok(firsts)
    }

    /// How the segment at `first` was started, as its header says. A header of zeros, or a
    /// file shorter than one, is `Torn` only in a journal that rolls without a barrier (a
    /// header never reaches the disk otherwise: it is synced before the segment is used); any
    /// other header that does not check is `Synced`, left for `load_segment` to report.
    fn start_of(&self, first: Lsn) -> Start {
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        let path = self.dir.join(segment_name(first));
        let missing = match File::open(path).and_then(|f| f.read_exact_at(&mut header, 0)) {
            Ok(()) => header.iter().all(|&b| b == 0),
            // Shorter than a header; any other failure is for `load_segment` to report.
            Err(e) => e.kind() == ErrorKind::UnexpectedEof,
        };
        match check_segment_header(&header, self.id, first) {
            Ok(flags) if flags & STARTED_UNSYNCED != 0 => Start::Unsynced,
            Err(_) if missing && self.opts.roll_without_barrier => Start::Torn,
            _ => Start::Synced,
        }
    }

    /// Removes the segments `firsts` (in order, the first of them started before the segment
    /// before it was durable, which a crash cut short): nothing in them was acknowledged.
    fn cut_rolled(&mut self, firsts: &[Lsn], why: &str) -> Result<()> {
        for &first in firsts {
            let path = self.dir.join(segment_name(first));
            self.repairs
                .push(format!("{}: started before the segment before it was durable; {why}", path.display()));
            if !self.opts.read_only {
                remove_file(self.id, &path)?;
            }
        }
        if !self.opts.read_only {
            sync_dir(self.id, &self.dir)?;
        }
        Ok(())
    }

    /// Reads and verifies one segment, and says whether it cut a torn tail off. `None` means
    /// "a torn, empty last segment: remove it". `may_be_behind`: the last segment, or one
    /// rolled without a barrier (`STARTED_UNSYNCED` on the next), may end torn.
    fn load_segment(
        &mut self,
        path: &Path,
        first: Lsn,
        is_last: bool,
        may_be_behind: bool,
    ) -> Result<Option<(Segment, bool)>> {
        let bytes = fs::read(path).map_err(io_err(self.id, "read segment", path))?;
        if let Err(reason) = check_segment_header(&bytes, self.id, first) {
            if is_last && bytes.len() <= SEGMENT_HEADER_BYTES {
                return Ok(None);
            }
            return Err(self.corrupt_segment(path, reason));
        }
        let mut offsets = Vec::new();
        let mut pos = SEGMENT_HEADER_BYTES;
        let mut lsn = first;
        // Zeros at the end are space written ahead (`FileJournalOptions::preallocate`), in any
        // segment; what comes before them is judged as the file's end would be.
        let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1).max(SEGMENT_HEADER_BYTES);
        while pos < bytes.len() {
            match codec::decode_frame(&bytes[pos..], lsn) {
                Ok(payload) => {
                    offsets.push(pos as u64);
                    pos += codec::frame_len(payload.len());
                    lsn = lsn.next();
                }
                Err(_) if pos >= end => break,
                Err(e) => {
                    let rest = &bytes[pos..end];
                    let torn =
                        codec::decode_frame(rest, lsn).err().is_some_and(|e| codec::is_torn_tail(rest, &e))
                            || has_hole(&bytes[..end], pos);
                    if may_be_behind && torn {
                        break;
                    }
                    return Err(self.corrupt(path, lsn, e.to_string()));
                }
            }
        }
        // Bytes other than zeros after the last entry: a torn append, cut off. Zeros alone are
        // space written ahead, and stay.
        let torn = pos < end;
        let read_only = self.opts.read_only;
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(io_err(
            self.id,
            "open segment",
            path,
        ))?;
        if torn {
            let cut = end - pos;
            self.repairs.push(format!("{}: a torn final entry at LSN {lsn} ({cut} bytes)", path.display()));
        }
        if torn && !read_only {
            file.set_len(pos as u64).map_err(io_err(self.id, "truncate torn tail", path))?;
            file.flush().map_err(io_err(self.id, "truncate torn tail", path))?;
            file.sync_all().map_err(io_err(self.id, "fsync", path))?;
        } else if may_be_behind && !read_only && pos > SEGMENT_HEADER_BYTES {
            // What a process that crashed appended without a barrier is in the page cache,
            // not yet on disk: made durable now, since everything read here counts as synced
            // (and may be sent on: a power cut must not take it back afterwards).
            file.sync_data().map_err(io_err(self.id, "fsync", path))?;
        }
        let len_bytes = pos as u64;
        let alloc_bytes = if torn && !read_only { len_bytes } else { bytes.len() as u64 };
        let file = SegFile::new((!self.opts.close_files).then_some(file), !read_only);
        let segment = Segment {
            first,
            path: path.to_path_buf(),
            file,
            offsets,
            len_bytes,
            synced_bytes: len_bytes,
            writeback_from: len_bytes,
            alloc_bytes,
        };
        Ok(Some((segment, torn)))
    }

    fn corrupt(&self, path: &Path, lsn: Lsn, reason: String) -> JournalError {
        JournalError::Corrupt { journal: self.id, location: path.display().to_string(), lsn, reason }
    }

    fn corrupt_segment(&self, path: &Path, reason: String) -> JournalError {
        JournalError::CorruptSegment { journal: self.id, location: path.display().to_string(), reason }
    }

    /// Deletes whole segments that hold only LSNs before `range.first()`.
    fn delete_trimmed_segments(&mut self) -> Result<()> {
        let keep_from = self.range.first();
        let mut removed = false;
        while let Some(seg) = self.segments.first() {
            if seg.next() > keep_from {
                break;
            }
            let seg = self.segments.remove(0);
            if self.opts.read_only {
                self.repairs.push(format!("{}: left behind by an interrupted trim", seg.path.display()));
                continue;
            }
            remove_file(self.id, &seg.path)?;
            removed = true;
        }
        if removed {
            sync_dir(self.id, &self.dir)?;
        }
        Ok(())
    }

    /// With `close_files`, closes every segment's file (they open again when used).
    fn close_idle_files(&mut self) {
        if self.opts.close_files {
            self.segments.iter_mut().for_each(|s| s.file.close());
        }
    }

    /// Starts a new segment at `first`, durable (file and directory entry) before it is used;
    /// or, rolled without a barrier, made durable by the next `sync` with the segments behind.
    fn roll(&mut self, first: Lsn) -> Result<()> {
        // Entries are durable in order: the old segment's before any of the new one's. Without
        // a barrier here, `sync` keeps that order, and the header says a crash may break it.
        let behind = !self.is_synced();
        let flags = if behind && self.opts.roll_without_barrier {
            STARTED_UNSYNCED
        } else {
            self.sync()?;
            0
        };
        // A full segment keeps no space written ahead. Not made durable: zeros left by a
        // crash are read as unused space.
        if let Some(old) = self.segments.last_mut().filter(|s| s.alloc_bytes > s.len_bytes)
            && old.file.get(&old.path).and_then(|f| f.set_len(old.len_bytes)).is_ok()
        {
            old.alloc_bytes = old.len_bytes;
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io_err(
            self.id,
            "create segment",
            &path,
        ))?;
        let header = encode_segment_header(self.id, first, flags);
        // Rolled without a barrier, the header and the directory entry wait for the next
        // `sync` too: an fsync here would wait for the old segment's bytes all the same (a
        // disk's cache is flushed whole). A crash before it may leave no file, or one without
        // its header, which open removes with any segment after it.
        let written = file.write_all_at(&header, 0).map_err(io_err(self.id, "write segment header", &path));
        let started = written.and_then(|()| {
            if flags != 0 {
                return Ok(());
            }
            file.sync_all()
                .map_err(io_err(self.id, "fsync", &path))
                .and_then(|()| sync_dir(self.id, &self.dir))
        });
        if let Err(e) = started {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.dir_rolls += u64::from(flags != 0);
        // Detached barriers are in use: theirs is opened before anything is written here. The
        // old segment's stays in use while it is behind the disk.
        if self.barrier.is_some() {
            let old = std::mem::replace(&mut self.barrier, File::open(&path).ok().map(|f| (first, f)));
            if let Some((old_first, _)) = old.as_ref().filter(|_| flags != 0) {
                self.rolled_barriers.retain(|(f, _)| f != old_first);
            }
            self.rolled_barriers.extend(old.filter(|_| flags != 0));
        }
        let len_bytes = SEGMENT_HEADER_BYTES as u64;
        let file = SegFile::new(Some(file), true);
        self.segments.push(Segment {
            first,
            path,
            file,
            offsets: Vec::new(),
            len_bytes,
            synced_bytes: if flags != 0 { 0 } else { len_bytes },
            writeback_from: len_bytes,
            alloc_bytes: len_bytes,
        });
        Ok(())
    }

    fn needs_roll(&self, batch_bytes: u64) -> bool {
        match self.segments.last() {
            None => true,
            Some(seg) => {
                seg.len_bytes > SEGMENT_HEADER_BYTES as u64
                    && seg.len_bytes + batch_bytes > self.opts.max_segment_bytes
            }
        }
    }

    fn segment_of(&self, lsn: Lsn) -> &Segment {
        let i = self.segments.partition_point(|s| s.first <= lsn);
        &self.segments[i.checked_sub(1).expect("BUG: caller checked the range")]
    }

    /// The segment holding `len` bytes of the entry at `lsn` from `offset` into its payload,
    /// and where in its file they start; an error when they are not all in that entry.
    fn part_at(&self, lsn: Lsn, offset: usize, len: usize) -> Result<(&Segment, u64)> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let seg = self.segment_of(lsn);
        let i = (lsn.get() - seg.first.get()) as usize;
        let frame = seg.offsets[i];
        let end = seg.offsets.get(i + 1).copied().unwrap_or(seg.len_bytes);
        let payload_len = (end - frame) as usize - FRAME_HEADER_BYTES;
        if offset.checked_add(len).is_none_or(|e| e > payload_len) {
            return Err(crate::part_out_of_bounds(self.id, lsn, payload_len));
        }
        Ok((seg, frame + (FRAME_HEADER_BYTES + offset) as u64))
    }

    /// How long a segment's map is made: as long as the segment may grow, so that appends
    /// never outgrow it.
    fn map_len(&self, seg: &Segment) -> u64 {
        self.opts.max_segment_bytes.max(seg.len_bytes)
    }
}

/// How a segment was started (`FileJournal::start_of`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// After the segment before it was durable (its header synced before it was used).
    Synced,
    /// Before the segment before it was durable (`STARTED_UNSYNCED`): that one may end torn.
    Unsynced,
    /// Rolled without a barrier, and a crash came before its header reached the disk.
    Torn,
}

/// Whether the undecodable frame at `pos` has a hole an interrupted append left: a disk
/// writes a file's blocks in any order, so a power cut during an append (into zeros written
/// ahead, or past the file's old end) can keep its later blocks and not its first. Zeros from
/// the frame's start, or from a sector boundary inside its header, to the header's end; or,
/// its header whole, an aligned sector (512 bytes) of zeros inside the frame it declares. No
/// header is all zeros (LSN 0 does not exist), and corruption of what was on disk does not
/// zero a sector. Only this frame is looked at: a damaged entry followed by entries that hold
/// zeros is corruption. The price: a flipped bit in an entry that itself holds a sector of
/// zeros (a blob of zeros in a mutation), when it is the last segment's first bad frame, is
/// taken for a torn append.
fn has_hole(bytes: &[u8], pos: usize) -> bool {
    const SECTOR: usize = 512;
    let zeros = |r: std::ops::Range<usize>| bytes.get(r).is_some_and(|b| b.iter().all(|&x| x == 0));
    let header_end = pos + FRAME_HEADER_BYTES;
    let boundary = pos.div_ceil(SECTOR) * SECTOR;
    if zeros(pos..header_end) || (boundary > pos && boundary < header_end && zeros(boundary..header_end)) {
        return true;
    }
    let Ok(header) = codec::decode_header(&bytes[pos..]) else { return false };
    let frame_end = (pos + codec::frame_len(header.len)).min(bytes.len());
    bytes
        .get(boundary..frame_end.max(boundary))
        .is_some_and(|frame| frame.chunks_exact(SECTOR).any(|sector| sector.iter().all(|&b| b == 0)))
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Lsn::new(digits.parse().ok()?)
}

fn remove_file(id: JournalId, path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(id, "remove", path)(e)),
        _ => Ok(()),
    }
}

fn read_marker(dir: &Path) -> Result<(JournalId, u64)> {
    let meta = match fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(JournalError::Missing { path: dir.to_path_buf() });
        }
        other => other,
    };
    let foreign = |reason: String| JournalError::Foreign { path: dir.to_path_buf(), reason };
    if !meta.is_ok_and(|m| m.is_dir()) {
        return Err(foreign("it is not a readable directory".into()));
    }
    let bytes = match fs::read(dir.join(MARKER_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(foreign("it has no JOURNAL marker file".into()));
        }
        Err(e) => return Err(foreign(format!("its JOURNAL marker cannot be read: {e}"))),
    };
    decode_marker(&bytes).map_err(foreign)
}

/// Payloads this large are written from where they are instead of copied into the batch's
/// buffer: a 4 MiB checkpoint part costs one `pwrite` of its own, not an allocation and a copy
/// first (a download of a large document is a stream of them).
const DIRECT_WRITE_BYTES: usize = 64 << 10;

/// Writes the frames of `payloads` (LSNs `first`, `first + 1`, ...) at `offset`, in order:
/// small ones gathered into one buffer, large ones written from where they are.
fn write_frames(file: &File, offset: u64, first: Lsn, payloads: &[&[u8]]) -> std::io::Result<()> {
    let small: usize = payloads.iter().filter(|p| p.len() < DIRECT_WRITE_BYTES).map(|p| p.len()).sum();
    let mut buf = Vec::with_capacity(small + payloads.len() * FRAME_HEADER_BYTES);
    let (mut at, mut lsn) = (offset, first);
    for p in payloads {
        codec::encode_frame_header(&mut buf, lsn, p);
        if p.len() < DIRECT_WRITE_BYTES {
            buf.extend_from_slice(p);
        } else {
            file.write_all_at(&buf, at)?;
            at += buf.len() as u64;
            buf.clear();
            file.write_all_at(p, at)?;
            at += p.len() as u64;
        }
        lsn = lsn.next();
    }
    file.write_all_at(&buf, at)
}

/// Creates the file at `path` anew, for writing, with `mode` (Unix permissions, before the
/// umask): whatever was at its name (a temporary file a crash left, or a link planted there)
/// is removed first, and the file is never opened through a link, so nothing is written
/// wherever a link points. For temporary files renamed over their target when complete.
pub fn create_fresh(path: &Path, mode: u32) -> std::io::Result<File> {
    let _ = fs::remove_file(path);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

/// Atomically replaces `JOURNAL`: temp file, fsync, rename, fsync directory.
fn write_marker(id: JournalId, dir: &Path, trimmed_through: u64) -> Result<()> {
    let tmp = dir.join(MARKER_TMP);
    let mut f = create_fresh(&tmp, 0o666).map_err(io_err(id, "create", &tmp))?;
    f.write_all(&encode_marker(id, trimmed_through)).map_err(io_err(id, "write", &tmp))?;
    f.sync_all().map_err(io_err(id, "fsync", &tmp))?;
    let marker = dir.join(MARKER_FILE);
    fs::rename(&tmp, &marker).map_err(io_err(id, "rename", &marker))?;
    sync_dir(id, dir)
}

impl Journal for FileJournal {
    fn id(&self) -> JournalId {
        self.id
    }

    fn range(&self) -> LsnRange {
        self.range
    }

    fn append_batch(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        // No writeback hint: the barrier writes these bytes now.
        let (batch, _) = self.append_frames(payloads)?;
        self.sync()?;
        self.close_idle_files();
        Ok(batch)
    }

    fn sync(&mut self) -> Result<()> {
        self.check_writable()?;
        // Oldest first: a segment rolled without a barrier is durable before the next one.
        for i in 0..self.segments.len() {
            let seg = &mut self.segments[i];
            if seg.synced_bytes == seg.len_bytes {
                continue;
            }
            if let Err(e) = seg.file.get(&seg.path).and_then(|f| f.sync_data()) {
                return Err(self.failed_sync(e));
            }
            seg.synced_bytes = seg.len_bytes;
        }
        self.rolled_barriers.clear();
        if self.dir_synced < self.dir_rolls {
            // The new segments' entries may not be durable: as after a failed fsync.
            sync_dir(self.id, &self.dir).inspect_err(|_| self.poisoned = true)?;
            self.dir_synced = self.dir_rolls;
        }
        Ok(())
    }

    fn detach_sync(&mut self) -> Result<Option<DetachedSync>> {
        self.check_writable()?;
        let behind: Vec<(usize, Lsn, u64)> = (self.segments.iter().enumerate())
            .filter(|(_, s)| s.synced_bytes < s.len_bytes)
            .map(|(i, s)| (i, s.first, s.len_bytes))
            .collect();
        let mut parts = Vec::with_capacity(behind.len());
        for (i, first, len_bytes) in behind {
            let file = if i + 1 == self.segments.len() {
                self.barrier_file()
            } else {
                // Rolled without a barrier: the descriptor kept for it, or (none was open at
                // the roll) one opened now, apart from the journal's own (an error nobody has
                // seen yet is reported to it too).
                match self.rolled_barriers.iter().find(|(f, _)| *f == first) {
                    Some((_, file)) => file.try_clone(),
                    None => File::open(&self.segments[i].path),
                }
            };
            match file {
                Ok(file) => parts.push((file, first, len_bytes)),
                // No descriptor to be had (out of them, say): the barrier runs here.
                Err(_) => return self.sync().map(|()| None),
            }
        }
        let dir = match self.dir_synced < self.dir_rolls {
            false => None,
            true => match File::open(&self.dir) {
                Ok(dir) => Some((dir, self.dir_rolls)),
                Err(_) => return self.sync().map(|()| None),
            },
        };
        if parts.is_empty() && dir.is_none() {
            return Ok(None);
        }
        Ok(Some(DetachedSync { parts, dir, owner: (self.instance, self.cuts) }))
    }

    fn finish_detached_sync(&mut self, sync: DetachedSync, outcome: std::io::Result<()>) -> Result<()> {
        if sync.owner.0 != self.instance {
            // An earlier opening's barrier: this one read its files from what the system
            // held, so a failure is said, not kept quiet (a reopen is what recovers).
            return outcome.map_err(|e| JournalError::Backend {
                journal: self.id,
                message: format!("an fsync of this journal before it was opened again failed: {e}"),
            });
        }
        if self.poisoned {
            return Ok(());
        }
        match outcome {
            // Whatever was cut, rolled or trimmed since: the error was this barrier's to
            // report (no barrier opened later would see it). The journal's own fsyncs since
            // stand: had the failure come before one, it would have failed too.
            Err(e) => Err(self.failed_sync(e)),
            Ok(()) => {
                // A cut may have put bytes after the fsync in place of those it covered; a trim
                // may have left none of its segments; a roll's sync or `sync` may have come
                // first.
                if sync.owner.1 != self.cuts {
                    return Ok(());
                }
                if let Some((_, through)) = &sync.dir {
                    self.dir_synced = self.dir_synced.max(*through);
                }
                for (_, first, len_bytes) in &sync.parts {
                    if let Some(seg) = self.segments.iter_mut().find(|s| s.first == *first) {
                        seg.synced_bytes = seg.synced_bytes.max((*len_bytes).min(seg.len_bytes));
                    }
                }
                let segments = &self.segments;
                self.rolled_barriers.retain(|(first, _)| {
                    segments.iter().any(|s| s.first == *first && s.synced_bytes < s.len_bytes)
                });
                Ok(())
            }
        }
    }

    fn is_synced(&self) -> bool {
        self.dir_synced == self.dir_rolls && self.segments.iter().all(|s| s.synced_bytes == s.len_bytes)
    }

    fn can_remove_last(&self) -> bool {
        !self.opts.read_only && !self.opts.map_reads
    }

    /// Cuts the newest frame off the last segment (an entry is always in the segment its
    /// append rolled to, so the newest is in the last) and makes the cut durable. A failure
    /// leaves the journal refusing writes, the entry unreadable, until it is reopened.
    fn remove_last(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.opts.map_reads {
            // A reader's map of the segment would fault past the cut.
            let message = "a journal that maps its files for reads cannot remove its newest entry".into();
            return Err(JournalError::Backend { journal: self.id, message });
        }
        let id = self.id;
        let Some(last) = self.range.last() else { return Ok(()) };
        self.cuts += 1;
        let seg = self.segments.last_mut().expect("BUG: a journal with entries has a segment");
        let Some(at) = seg.offsets.pop() else {
            let message = format!("entry {last} is not in the last segment");
            return Err(JournalError::Backend { journal: id, message });
        };
        seg.len_bytes = at;
        seg.alloc_bytes = at;
        seg.synced_bytes = seg.synced_bytes.min(at);
        seg.writeback_from = seg.writeback_from.min(at);
        self.range = match last.prev().filter(|l| *l >= self.range.first()) {
            Some(prev) => LsnRange::inclusive(self.range.first(), prev),
            None => LsnRange::empty_at(self.range.first()),
        };
        let cut = seg.file.get(&seg.path).and_then(|f| f.set_len(at).and_then(|()| f.sync_data()));
        if let Err(e) = cut {
            self.poisoned = true;
            return Err(io_err(id, "remove the newest entry from", &seg.path)(e));
        }
        seg.synced_bytes = at;
        // A segment left with no frame goes (the next append rolls to it again): a later roll
        // must not find a file of its name there.
        if seg.offsets.is_empty() && self.segments.len() > 1 {
            let seg = self.segments.pop().expect("BUG: just looked");
            // No barrier may fsync the unlinked file for a segment made again under its name.
            self.rolled_barriers.retain(|(f, _)| *f != seg.first);
            if self.barrier.as_ref().is_some_and(|(f, _)| *f == seg.first) {
                let last = self.segments.last().map(|s| s.first);
                let kept = self.rolled_barriers.iter().position(|(f, _)| Some(*f) == last);
                self.barrier = kept.map(|i| self.rolled_barriers.remove(i));
            }
            remove_file(id, &seg.path)?;
            sync_dir(id, &self.dir)?;
        }
        Ok(())
    }

    fn reads_from_memory(&self) -> bool {
        self.opts.map_reads && !self.opts.read_only
    }

    fn append_batch_unsynced(&mut self, payloads: &[&[u8]]) -> Result<LsnRange> {
        let (batch, bytes) = self.append_frames(payloads)?;
        self.hint_writeback(bytes);
        Ok(batch)
    }

    fn read(&self, lsn: Lsn) -> Result<Vec<u8>> {
        let mut payload = Vec::new();
        self.read_into(lsn, &mut payload)?;
        Ok(payload)
    }

    fn read_into(&self, lsn: Lsn, out: &mut Vec<u8>) -> Result<()> {
        if !self.range.contains(lsn) {
            return Err(JournalError::OutOfRange { journal: self.id, lsn, range: self.range });
        }
        let seg = self.segment_of(lsn);
        let offset = seg.offsets[(lsn.get() - seg.first.get()) as usize];
        let mut header = [0u8; FRAME_HEADER_BYTES];
        let read_err = || io_err(self.id, "read", &seg.path);
        let file = seg.file.get(&seg.path).map_err(read_err())?;
        file.read_exact_at(&mut header, offset).map_err(read_err())?;
        let h = codec::decode_header(&header).map_err(|e| self.corrupt(&seg.path, lsn, e.to_string()))?;
        let start = out.len();
        // Exactly: a reader may keep the buffer, counted by its length.
        let read = crate::os::append_read_at(file, out, h.len, offset + FRAME_HEADER_BYTES as u64)
            .map_err(read_err())
            .and_then(|()| {
                codec::verify(&h, lsn, &out[start..]).map_err(|e| self.corrupt(&seg.path, lsn, e.to_string()))
            });
        if read.is_err() {
            out.truncate(start);
        }
        read
    }

    fn read_part(&self, lsn: Lsn, offset: usize, buf: &mut [u8]) -> Result<()> {
        let (seg, at) = self.part_at(lsn, offset, buf.len())?;
        if self.reads_from_memory()
            && let Some(mapped) = seg.file.mapped(&seg.path, self.map_len(seg))
            && mapped.copy(at, buf)
        {
            return Ok(());
        }
        seg.file
            .get(&seg.path)
            .and_then(|f| f.read_exact_at(buf, at))
            .map_err(io_err(self.id, "read", &seg.path))
    }

    fn mapped_part(&self, lsn: Lsn, offset: usize, len: usize) -> Option<&[u8]> {
        if !self.reads_from_memory() {
            return None;
        }
        let (seg, at) = self.part_at(lsn, offset, len).ok()?;
        seg.file.mapped(&seg.path, self.map_len(seg))?.slice(at, len)
    }

    fn read_range(&self, range: LsnRange) -> Result<Vec<Vec<u8>>> {
        crate::check_in_range(self.id, self.range, range)?;
        range.iter().map(|lsn| self.read(lsn)).collect()
    }

    fn remove_prefix(&mut self, up_to: Lsn) -> Result<()> {
        let trimmed = self.range.remove_through(up_to);
        if trimmed == self.range {
            return Ok(());
        }
        self.check_writable()?;
        let through = trimmed.first().prev().expect("BUG: a trimmed range starts after LSN 1");
        write_marker(self.id, &self.dir, through.get())?;
        self.range = trimmed;
        // Trimmed with the marker: a segment that would not delete goes on the next open.
        let _ = self.delete_trimmed_segments();
        Ok(())
    }
}

impl FileJournal {
    /// Writes the frames of `payloads` after the last entry, without a barrier; their LSNs and
    /// bytes.
    fn append_frames(&mut self, payloads: &[&[u8]]) -> Result<(LsnRange, u64)> {
        self.check_writable()?;
        for p in payloads {
            crate::check_entry_len(self.id, p)?;
        }
        let first = self.range.next();
        let batch = LsnRange::from_count(first, payloads.len() as u64);
        if payloads.is_empty() {
            return Ok((batch, 0));
        }
        let total: usize = payloads.iter().map(|p| codec::frame_len(p.len())).sum();
        if self.needs_roll(total as u64) {
            self.roll(first)?;
        }
        let id = self.id;
        let preallocate = self.opts.preallocate;
        let seg = self.segments.last_mut().expect("BUG: roll() guarantees a segment");
        let start = seg.len_bytes;
        if let Err(e) = seg.file.get(&seg.path).and_then(|f| write_frames(f, start, first, payloads)) {
            // Nothing was acknowledged; cut whatever part of the batch reached the file.
            let _ = seg.file.get(&seg.path).and_then(|f| f.set_len(start));
            seg.alloc_bytes = start;
            return Err(io_err(id, "append", &seg.path)(e));
        }
        let end = start + total as u64;
        seg.alloc_bytes = seg.alloc_bytes.max(end);
        let ahead = (end / 4).clamp(PREALLOCATE_MIN_BYTES, PREALLOCATE_MAX_BYTES);
        // Zeros that an append of this size would not fit in would only add to what this one
        // writes: the next would grow the file anyway.
        if preallocate && seg.alloc_bytes == end && total as u64 <= ahead {
            // Zeros ahead, made durable by the barrier that follows (with this append's size).
            // Best effort: without them, the next append grows the file as before.
            if seg.file.get(&seg.path).and_then(|f| f.write_all_at(&vec![0; ahead as usize], end)).is_ok() {
                seg.alloc_bytes = end + ahead;
            }
        }
        let mut at = start;
        for p in payloads {
            seg.offsets.push(at);
            at += codec::frame_len(p.len()) as u64;
        }
        seg.len_bytes = at;
        self.range = self.range.extend(payloads.len() as u64);
        Ok((batch, total as u64))
    }

    /// Once `WRITEBACK_BYTES` of the last segment wait for a barrier (`WRITEBACK_TRICKLE_BYTES`
    /// after an append of `appended` bytes that is small), asks the kernel to start writing them
    /// (whole pages: the last one partly written would be written twice). A hint dropped (a
    /// full queue) is given again with the next.
    fn hint_writeback(&mut self, appended: u64) {
        let Some(seg) = self.segments.last_mut() else { return };
        let from = seg.writeback_from.max(seg.synced_bytes);
        let to = seg.len_bytes & !(WRITEBACK_PAGE - 1);
        let step = if appended < SMALL_APPEND_BYTES { WRITEBACK_TRICKLE_BYTES } else { WRITEBACK_BYTES };
        if to.saturating_sub(from) < step {
            return;
        }
        let hinted = seg.file.get(&seg.path).map(|file| crate::os::start_writeback(file, from, to - from));
        if hinted.unwrap_or(true) {
            seg.writeback_from = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rolling(dir: &Path) -> FileJournal {
        let opts =
            FileJournalOptions { max_segment_bytes: 512, roll_without_barrier: true, ..Default::default() };
        FileJournal::create(dir, JournalId::from_bytes([7; 16]), opts).expect("create")
    }

    /// Appends 100-byte entries without a barrier until the journal has `segments` segments.
    fn fill_to(j: &mut FileJournal, segments: usize) {
        while j.segments.len() < segments {
            j.append_batch_unsynced(&[&[1u8; 100]]).expect("append");
        }
    }

    /// A barrier taken before a `sync` and a later roll without a barrier, and finished after
    /// them, covers the directory only as it was when taken: the newer segment's name still
    /// waits for an fsync of the directory.
    #[test]
    fn a_late_barrier_covers_only_the_rolls_before_it() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut j = rolling(&root.path().join("j"));
        fill_to(&mut j, 2);
        assert_eq!((j.dir_rolls, j.dir_synced), (1, 0), "the roll waited for nothing");
        let late = j.detach_sync().expect("detach").expect("a barrier");
        late.run().expect("fsync");
        j.sync().expect("sync");
        assert!(j.is_synced());
        fill_to(&mut j, 3);
        j.finish_detached_sync(late, Ok(())).expect("finish");
        assert_eq!((j.dir_rolls, j.dir_synced), (2, 1), "the second roll's name is not covered");
        assert!(!j.is_synced());
        j.sync().expect("sync");
        assert_eq!(j.dir_synced, 2);
        assert!(j.is_synced());
    }

    /// Space written ahead stays small however long the segment grows: an append that
    /// writes it waits for it (`PREALLOCATE_MAX_BYTES`; the bound is written out, so that
    /// raising it fails here). Every small append lands in zeros already written, or writes
    /// more.
    #[test]
    fn space_written_ahead_stays_within_its_bound() {
        let root = tempfile::tempdir().expect("tempdir");
        let opts = FileJournalOptions { preallocate: true, ..Default::default() };
        let mut j =
            FileJournal::create(root.path().join("j"), JournalId::from_bytes([7; 16]), opts).expect("create");
        let (mut grew, mut most) = (0, 0);
        while j.segments.first().is_none_or(|seg| seg.len_bytes < 4 << 20) {
            let before = j.segments.first().map_or(0, |seg| seg.alloc_bytes);
            j.append(&[9u8; 3000]).expect("append");
            let seg = &j.segments[0];
            let size = std::fs::metadata(&seg.path).expect("stat").len();
            assert_eq!(size, seg.alloc_bytes, "the file holds the space ahead it counts");
            assert!(size > seg.len_bytes, "zeros ahead after every append");
            grew += usize::from(seg.alloc_bytes != before);
            most = most.max(seg.alloc_bytes - seg.len_bytes);
        }
        assert!(most <= 64 << 10, "{most} bytes ahead, over 64 KiB");
        assert!(most > PREALLOCATE_MIN_BYTES, "it grows past the least as the segment does: {most}");
        assert!(grew < 4 << 20 >> 15, "written ahead {grew} times for 4 MiB: not once per append");
        // Appends larger than the space ahead write none: the next would grow the file anyway.
        let seg = &j.segments[0];
        let (left, large) = (seg.alloc_bytes - seg.len_bytes, vec![9u8; 80 << 10]);
        for _ in 0..=left / (80 << 10) + 1 {
            j.append(&large).expect("append");
        }
        for _ in 0..3 {
            j.append(&large).expect("append");
            let seg = &j.segments[0];
            let size = std::fs::metadata(&seg.path).expect("stat").len();
            assert_eq!(
                (size, seg.alloc_bytes),
                (seg.len_bytes, seg.len_bytes),
                "no zeros ahead of a large append"
            );
        }
    }

    /// Small appends without a barrier are handed to the kernel to write as they come, a
    /// little at a time, rather than left for the next barrier to write all at once (which
    /// holds up every durable write on the disk meanwhile); large ones in larger steps.
    #[test]
    fn bytes_appended_without_a_barrier_are_written_back_as_they_come() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut j =
            FileJournal::create(root.path().join("j"), JournalId::from_bytes([7; 16]), Default::default())
                .expect("create");
        let entry = [5u8; 4000];
        for _ in 0..500 {
            j.append_batch_unsynced(&[&entry]).expect("append");
            let seg = &j.segments[0];
            let unhinted = seg.len_bytes - seg.writeback_from.max(seg.synced_bytes);
            // 128 KiB at a time, with room for a hint dropped while the writeback thread lags.
            assert!(unhinted < 1 << 20, "{unhinted} bytes appended and not yet handed over");
        }
        assert!(j.segments[0].writeback_from > 1 << 20, "handed over as they came");
        let (large, before) = (vec![5u8; 1 << 20], j.segments[0].writeback_from);
        for _ in 0..4 {
            j.append_batch_unsynced(&[&large]).expect("append");
        }
        assert_eq!(j.segments[0].writeback_from, before, "large appends are handed over 8 MiB at a time");
    }

    /// Header flags this build does not know fail the header's check.
    #[test]
    fn unknown_header_flags_fail_the_check() {
        let (id, first) = (JournalId::from_bytes([7; 16]), Lsn::new(5).expect("lsn"));
        assert_eq!(check_segment_header(&encode_segment_header(id, first, 0), id, first), Ok(0));
        let flagged = encode_segment_header(id, first, STARTED_UNSYNCED);
        assert_eq!(check_segment_header(&flagged, id, first), Ok(STARTED_UNSYNCED));
        let unknown = encode_segment_header(id, first, STARTED_UNSYNCED | 4);
        assert!(
            check_segment_header(&unknown, id, first).is_err_and(|e| e.contains("unknown segment flags"))
        );
    }

    /// A segment taken back whole (`remove_last`) leaves no barrier descriptor of its file
    /// behind: a segment made again under its name gets one of its own.
    #[test]
    fn a_removed_segment_leaves_no_barrier_descriptor() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut j = rolling(&root.path().join("j"));
        j.append_batch_unsynced(&[&[1u8; 100]]).expect("append");
        drop(j.detach_sync().expect("detach").expect("a barrier")); // opens `barrier`
        fill_to(&mut j, 2);
        fill_to(&mut j, 3);
        let second = j.segments[1].first;
        assert!(j.rolled_barriers.iter().any(|(f, _)| *f == second), "kept while it is behind");
        while j.segments.len() > 2 {
            j.remove_last().expect("take back");
        }
        while j.segments.len() > 1 {
            j.remove_last().expect("take back");
        }
        assert!(j.rolled_barriers.iter().all(|(f, _)| *f < second), "{:?}", j.rolled_barriers);
        let first = j.segments[0].first;
        assert!(j.barrier.as_ref().is_some_and(|(f, _)| *f == first), "the first segment's, handed back");
        fill_to(&mut j, 3);
        let barrier = j.detach_sync().expect("detach").expect("a barrier");
        let again = std::fs::metadata(&j.segments[1].path).expect("stat");
        let covered = barrier.parts.iter().find(|(_, f, _)| *f == second).expect("the second segment");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(covered.0.metadata().expect("stat").ino(), again.ino(), "the file made again");
    }
}
