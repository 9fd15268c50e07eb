//! File journal append rate against raw `write` + `fdatasync` of the same payload bytes; and,
//! like for like, a journal that writes zeros ahead (`FileJournalOptions::preallocate`, as a
//! replica's timeline and a server's journals do) against raw writes over zeros written ahead.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::Instant;

use pagesync_journal::{FileJournal, FileJournalOptions, Journal, JournalId};

use crate::Config;
use crate::report::{Better, Pair, Target, interleave, per_second};

/// Bytes per entry: about one small single-row mutation.
const ENTRY_BYTES: usize = 128;
/// Entries per grouped append: what a busy server step or a client flush batches.
const GROUP_ENTRIES: usize = 64;

pub fn run(cfg: &Config) -> Vec<Pair> {
    let singles = if cfg.quick { 40 } else { 300 };
    let groups = if cfg.quick { 10 } else { 60 };
    let payload = vec![0x5a_u8; ENTRY_BYTES];
    let (ours, raw) =
        interleave(cfg.reps, || journal_rate(&payload, singles, 1), || raw_rate(&payload, singles, 1));
    let single = Pair::new(
        "journal",
        "single appends, fsync each",
        "entries/s",
        Better::Higher,
        ours,
        "raw write+fdatasync",
        raw,
        None,
    );
    let (ours, raw) = interleave(
        cfg.reps,
        || journal_rate(&payload, groups, GROUP_ENTRIES),
        || raw_rate(&payload, groups, GROUP_ENTRIES),
    );
    let grouped = Pair::new(
        "journal",
        "grouped appends (64 per fsync)",
        "entries/s",
        Better::Higher,
        ours,
        "raw write+fdatasync",
        raw,
        Some(Target::RatioAtLeast(0.8)),
    );
    let (ours, raw) = interleave(
        cfg.reps,
        || journal_rate_with(&payload, singles, 1, true),
        || raw_over_zeros_rate(&payload, singles),
    );
    let ahead = Pair::new(
        "journal",
        "single appends, fsync each, zeros written ahead (preallocate)",
        "entries/s",
        Better::Higher,
        ours,
        "raw pwrite+fdatasync over zeros written (and synced) ahead",
        raw,
        None,
    );
    vec![single, grouped, ahead]
}

fn journal_rate(payload: &[u8], batches: usize, per_batch: usize) -> f64 {
    journal_rate_with(payload, batches, per_batch, false)
}

fn journal_rate_with(payload: &[u8], batches: usize, per_batch: usize, preallocate: bool) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = JournalId::from_bytes([1; 16]);
    let opts = FileJournalOptions { preallocate, ..FileJournalOptions::default() };
    let mut j = FileJournal::create(dir.path().join("j"), id, opts).expect("create journal");
    let batch: Vec<&[u8]> = vec![payload; per_batch];
    // Warm-up: the first append creates the first segment, which a long-lived journal does not
    // pay per batch. The raw peer gets the same warm-up write.
    j.append_batch(&batch).expect("append");
    let start = Instant::now();
    for _ in 0..batches {
        j.append_batch(&batch).expect("append");
    }
    per_second((batches * per_batch) as u64, start.elapsed())
}

fn raw_rate(payload: &[u8], batches: usize, per_batch: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut f = OpenOptions::new().create(true).append(true).open(dir.path().join("raw")).expect("create");
    let bytes = payload.repeat(per_batch);
    f.write_all(&bytes).expect("write");
    f.sync_all().expect("fsync");
    let start = Instant::now();
    for _ in 0..batches {
        f.write_all(&bytes).expect("write");
        f.sync_data().expect("fdatasync");
    }
    per_second((batches * per_batch) as u64, start.elapsed())
}

/// Single appends of `payload` by `pwrite` at the end of what was written, each with an
/// `fdatasync`, into a file whose zeros were written and synced beforehand: no append changes
/// the file's size.
fn raw_over_zeros_rate(payload: &[u8], appends: usize) -> f64 {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(dir.path().join("raw"))
        .expect("create");
    f.write_all_at(&vec![0; (appends + 1) * payload.len() + 4096], 0).expect("zeros");
    f.sync_all().expect("fsync");
    f.write_all_at(payload, 0).expect("write");
    f.sync_data().expect("fdatasync");
    let start = Instant::now();
    for i in 1..=appends {
        f.write_all_at(payload, (i * payload.len()) as u64).expect("write");
        f.sync_data().expect("fdatasync");
    }
    per_second(appends as u64, start.elapsed())
}
