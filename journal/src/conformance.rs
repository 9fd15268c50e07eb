//! The conformance suite every `Journal` backend must pass. A backend's test file calls
//! [`conformance_tests!`](crate::conformance_tests) with a [`Backend`] constructor, which expands
//! to one `#[test]` per property.

use crate::{Journal, JournalError, Lsn, LsnRange, codec::MAX_ENTRY_BYTES};

/// Makes fresh journals of one backend, and reopens them where the backend persists.
pub trait Backend {
    type J: Journal;
    /// A new, empty journal.
    fn create(&mut self) -> Self::J;
    /// Drops `journal` and opens it again from its storage; `None` for backends that do not
    /// persist across a reopen (memory).
    fn reopen(&mut self, journal: Self::J) -> Option<Self::J>;
}

fn lsn(n: u64) -> Lsn {
    Lsn::new(n).expect("BUG: test LSNs are non-zero")
}

/// Deterministic payloads of varied sizes, including empty ones and some over 64 KiB (which
/// a file journal writes from where they are, not through its batch buffer).
pub fn payload(n: u64) -> Vec<u8> {
    let large = if n.is_multiple_of(11) { 70_000 } else { 0 };
    let len = (n * 37 % 300) as usize + if n.is_multiple_of(7) { 9000 } else { 0 } + large;
    (0..len).map(|i| (i as u64 ^ n.wrapping_mul(0x9e37)) as u8).collect()
}

fn append_n<J: Journal>(j: &mut J, from: u64, count: u64) {
    for n in from..from + count {
        assert_eq!(j.append(&payload(n)).expect("append"), lsn(n));
    }
}

fn assert_holds<J: Journal>(j: &J, range: LsnRange) {
    assert_eq!(j.range(), range);
    for l in range.iter() {
        assert_eq!(j.read(l).expect("read"), payload(l.get()), "entry {l}");
    }
}

pub fn new_journal_is_empty<B: Backend>(b: &mut B) {
    let j = b.create();
    assert_eq!(j.range(), LsnRange::new_empty());
    assert!(matches!(j.read(Lsn::FIRST), Err(JournalError::OutOfRange { .. })));
}

pub fn appends_are_dense_and_readable<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 50);
    assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(50)));
    assert!(matches!(j.read(lsn(51)), Err(JournalError::OutOfRange { .. })));
}

pub fn batches_append_atomically_in_order<B: Backend>(b: &mut B) {
    let mut j = b.create();
    assert_eq!(j.append_batch(&[]).expect("empty batch"), LsnRange::new_empty());
    let batch: Vec<Vec<u8>> = (1..=20).map(payload).collect();
    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
    assert_eq!(j.append_batch(&refs).expect("batch"), LsnRange::inclusive(lsn(1), lsn(20)));
    append_n(&mut j, 21, 3);
    assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(23)));
}

pub fn read_range_returns_entries_in_order<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 10);
    let got = j.read_range(LsnRange::inclusive(lsn(3), lsn(7))).expect("read_range");
    assert_eq!(got, (3..=7).map(payload).collect::<Vec<_>>());
    assert!(j.read_range(LsnRange::empty_at(lsn(4))).expect("empty").is_empty());
    let past_end = j.read_range(LsnRange::inclusive(lsn(8), lsn(11)));
    assert!(matches!(past_end, Err(JournalError::OutOfRange { .. })));
}

pub fn read_part_reads_within_one_entry<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 8);
    let whole = payload(7);
    let mut buf = vec![0u8; 100];
    j.read_part(lsn(7), 50, &mut buf).expect("read_part");
    assert_eq!(buf, whole[50..150]);
    let mut past = vec![0u8; 10];
    let err = j.read_part(lsn(7), whole.len() - 5, &mut past).expect_err("past the entry's end");
    assert!(matches!(err, JournalError::PastEntryEnd { .. }), "{err}");
    let err = j.read_part(lsn(9), 0, &mut past).expect_err("past the journal's end");
    assert!(matches!(err, JournalError::OutOfRange { .. }), "{err}");
}

pub fn read_into_appends_the_payload<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 4);
    let mut out = b"head".to_vec();
    j.read_into(lsn(3), &mut out).expect("read_into");
    assert_eq!(out[..4], *b"head", "what the buffer held stays");
    assert_eq!(out[4..], payload(3));
    let err = j.read_into(lsn(5), &mut out).expect_err("past the journal's end");
    assert!(matches!(err, JournalError::OutOfRange { .. }), "{err}");
    assert_eq!(out.len(), 4 + payload(3).len(), "a failed read leaves the buffer as it was");
}

pub fn oversized_entry_is_refused_and_changes_nothing<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 2);
    let huge = vec![0u8; MAX_ENTRY_BYTES + 1];
    let err = j.append_batch(&[&payload(3), &huge]).expect_err("over the limit");
    assert!(matches!(err, JournalError::EntryTooLarge { .. }), "{err}");
    assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(2)));
    append_n(&mut j, 3, 1);
}

pub fn remove_prefix_keeps_next<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 30);
    j.remove_prefix(lsn(10)).expect("remove_prefix");
    assert_holds(&j, LsnRange::inclusive(lsn(11), lsn(30)));
    assert!(matches!(j.read(lsn(10)), Err(JournalError::OutOfRange { .. })));
    j.remove_prefix(lsn(5)).expect("removing less is a no-op");
    assert_holds(&j, LsnRange::inclusive(lsn(11), lsn(30)));
    j.remove_prefix(lsn(30)).expect("remove everything");
    assert_eq!(j.range(), LsnRange::empty_at(lsn(31)));
    append_n(&mut j, 31, 5);
    assert_holds(&j, LsnRange::inclusive(lsn(31), lsn(35)));
}

pub fn reopen_preserves_entries_and_trim_point<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 40);
    let Some(mut j) = b.reopen(j) else { return };
    assert_holds(&j, LsnRange::inclusive(lsn(1), lsn(40)));
    j.remove_prefix(lsn(25)).expect("remove_prefix");
    let mut j = b.reopen(j).expect("persistent backend");
    assert_holds(&j, LsnRange::inclusive(lsn(26), lsn(40)));
    append_n(&mut j, 41, 3);
    j.remove_prefix(lsn(43)).expect("remove everything");
    let mut j = b.reopen(j).expect("persistent backend");
    assert_eq!(j.range(), LsnRange::empty_at(lsn(44)));
    append_n(&mut j, 44, 2);
    let j = b.reopen(j).expect("persistent backend");
    assert_holds(&j, LsnRange::inclusive(lsn(44), lsn(45)));
}

pub fn remove_prefix_past_the_end_restarts_later<B: Backend>(b: &mut B) {
    let mut j = b.create();
    append_n(&mut j, 1, 12);
    j.remove_prefix(lsn(99)).expect("restart at 100");
    assert_eq!(j.range(), LsnRange::empty_at(lsn(100)));
    assert!(matches!(j.read(lsn(12)), Err(JournalError::OutOfRange { .. })));
    append_n(&mut j, 100, 3);
    assert_holds(&j, LsnRange::inclusive(lsn(100), lsn(102)));
    let Some(mut j) = b.reopen(j) else { return };
    assert_holds(&j, LsnRange::inclusive(lsn(100), lsn(102)));
    j.remove_prefix(lsn(199)).expect("restart at 200");
    let mut j = b.reopen(j).expect("persistent backend");
    assert_eq!(j.range(), LsnRange::empty_at(lsn(200)));
    append_n(&mut j, 200, 2);
    let j = b.reopen(j).expect("persistent backend");
    assert_holds(&j, LsnRange::inclusive(lsn(200), lsn(201)));
}

/// Calls `$callback!` with the names of every conformance property, after `$args`: the one
/// list of properties, for harnesses that need their own test attribute (the browser's
/// `wasm_bindgen_test`). `$callback` must be in scope where this is invoked.
#[macro_export]
macro_rules! conformance_properties {
    ($callback:ident ! ($($args:tt)*)) => {
        $callback!($($args)*
            new_journal_is_empty,
            appends_are_dense_and_readable,
            batches_append_atomically_in_order,
            read_range_returns_entries_in_order,
            read_part_reads_within_one_entry,
            read_into_appends_the_payload,
            oversized_entry_is_refused_and_changes_nothing,
            remove_prefix_keeps_next,
            remove_prefix_past_the_end_restarts_later,
            reopen_preserves_entries_and_trim_point);
    };
}

/// Expands to one `#[test]` per conformance property. `$backend` is an expression that
/// builds a fresh [`Backend`].
#[macro_export]
macro_rules! conformance_tests {
    ($backend:expr) => {
        use $crate::conformance_tests as __pagesync_conformance_tests;
        $crate::conformance_properties!(__pagesync_conformance_tests!(@each $backend;));
    };
    (@each $backend:expr; $($name:ident),*) => {
        $(
            #[test]
            fn $name() {
                $crate::conformance::$name(&mut $backend);
            }
        )*
    };
}
