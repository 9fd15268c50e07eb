//! Log sequence numbers and ranges of them.
//!
//! Invariants: LSNs are dense per journal and start at 1. An `LsnRange` is either an inclusive
//! `first..=last` with `first <= last`, or empty while still knowing the LSN that comes `next`,
//! so a journal whose prefix was removed entirely stays addressable.

use std::fmt;
use std::num::NonZeroU64;

/// A log sequence number: the position of one entry in one journal, starting at 1.
/// Serialized as a plain `u64`; deserializing 0 is an error. Never 0, so an `Option<Lsn>` takes
/// no more room than an `Lsn` (a replica's page index holds one per page).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Lsn(NonZeroU64);

impl TryFrom<u64> for Lsn {
    type Error = &'static str;
    fn try_from(n: u64) -> Result<Lsn, Self::Error> {
        Lsn::new(n).ok_or("LSN 0 does not exist: LSNs start at 1")
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> u64 {
        l.0.get()
    }
}

impl Lsn {
    /// The first LSN of every journal.
    pub const FIRST: Lsn = Lsn(NonZeroU64::MIN);

    /// `None` for 0, which is not a valid LSN.
    pub const fn new(n: u64) -> Option<Lsn> {
        match NonZeroU64::new(n) {
            Some(n) => Some(Lsn(n)),
            None => None,
        }
    }

    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The following LSN.
    pub fn next(self) -> Lsn {
        Lsn(self.0.checked_add(1).expect("BUG: LSN space (2^64) exhausted"))
    }

    /// The preceding LSN, or `None` for the first.
    pub fn prev(self) -> Option<Lsn> {
        Lsn::new(self.0.get() - 1)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A contiguous range of LSNs: inclusive, or empty with the next LSN to be assigned.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum LsnRange {
    /// No entries; the next appended entry gets `next`.
    Empty { next: Lsn },
    /// `first..=last`, with `first <= last`.
    Inclusive { first: Lsn, last: Lsn },
}

impl LsnRange {
    /// The range of a new journal: empty, next LSN 1.
    pub const fn new_empty() -> LsnRange {
        LsnRange::Empty { next: Lsn::FIRST }
    }

    pub const fn empty_at(next: Lsn) -> LsnRange {
        LsnRange::Empty { next }
    }

    /// `first..=last`; empty-at-`first` when `last < first`.
    pub fn inclusive(first: Lsn, last: Lsn) -> LsnRange {
        if last < first { LsnRange::Empty { next: first } } else { LsnRange::Inclusive { first, last } }
    }

    /// `first` followed by `count` entries.
    pub fn from_count(first: Lsn, count: u64) -> LsnRange {
        match count {
            0 => LsnRange::Empty { next: first },
            n => LsnRange::Inclusive {
                first,
                last: Lsn(first.0.checked_add(n - 1).expect("BUG: LSN space exhausted")),
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, LsnRange::Empty { .. })
    }

    /// The number of LSNs in the range.
    pub fn len(&self) -> u64 {
        match *self {
            LsnRange::Empty { .. } => 0,
            LsnRange::Inclusive { first, last } => last.get() - first.get() + 1,
        }
    }

    /// The first LSN in the range, or the next one if the range is empty.
    pub fn first(&self) -> Lsn {
        match *self {
            LsnRange::Empty { next } => next,
            LsnRange::Inclusive { first, .. } => first,
        }
    }

    /// The last LSN in the range, if any.
    pub fn last(&self) -> Option<Lsn> {
        match *self {
            LsnRange::Empty { .. } => None,
            LsnRange::Inclusive { last, .. } => Some(last),
        }
    }

    /// The LSN that follows the range.
    pub fn next(&self) -> Lsn {
        match *self {
            LsnRange::Empty { next } => next,
            LsnRange::Inclusive { last, .. } => last.next(),
        }
    }

    pub fn contains(&self, lsn: Lsn) -> bool {
        match *self {
            LsnRange::Empty { .. } => false,
            LsnRange::Inclusive { first, last } => first <= lsn && lsn <= last,
        }
    }

    /// The range with `count` more LSNs at its end.
    pub fn extend(&self, count: u64) -> LsnRange {
        let first = self.first();
        LsnRange::from_count(first, self.len() + count)
    }

    /// The range without the LSNs `<= up_to`. The result still knows its `next`.
    pub fn trim_prefix(&self, up_to: Lsn) -> LsnRange {
        match *self {
            LsnRange::Empty { .. } => *self,
            LsnRange::Inclusive { first, last } => {
                if up_to < first {
                    *self
                } else if up_to >= last {
                    LsnRange::Empty { next: last.next() }
                } else {
                    LsnRange::Inclusive { first: up_to.next(), last }
                }
            }
        }
    }

    /// What `Journal::remove_prefix(up_to)` leaves: the range without the LSNs `<= up_to`, and
    /// when `up_to` is past the end, empty at `up_to + 1`.
    pub fn remove_through(&self, up_to: Lsn) -> LsnRange {
        if up_to >= self.next() { LsnRange::empty_at(up_to.next()) } else { self.trim_prefix(up_to) }
    }

    /// The LSNs in both ranges. Empty (at the later start) when they do not overlap.
    pub fn intersect(&self, other: &LsnRange) -> LsnRange {
        let first = self.first().max(other.first());
        match (self.last(), other.last()) {
            (Some(a), Some(b)) => LsnRange::inclusive(first, a.min(b)),
            _ => LsnRange::Empty { next: first },
        }
    }

    /// Iterates the LSNs in order.
    pub fn iter(&self) -> impl Iterator<Item = Lsn> + use<> {
        let (start, end) = (self.first().get(), self.next().get());
        (start..end).map(|n| Lsn::new(n).expect("BUG: LSNs start at 1"))
    }
}

impl fmt::Display for LsnRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LsnRange::Empty { next } => write!(f, "[empty, next {next}]"),
            LsnRange::Inclusive { first, last } => write!(f, "[{first}..={last}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lsn(n: u64) -> Lsn {
        Lsn::new(n).expect("test LSNs are non-zero")
    }

    fn range() -> impl Strategy<Value = LsnRange> {
        (1u64..1000, 0u64..50).prop_map(|(first, count)| LsnRange::from_count(lsn(first), count))
    }

    #[test]
    fn zero_is_not_an_lsn() {
        assert_eq!(Lsn::new(0), None);
        assert_eq!(Lsn::FIRST.prev(), None);
    }

    #[test]
    fn trimming_everything_keeps_next() {
        let r = LsnRange::inclusive(lsn(3), lsn(7));
        assert_eq!(r.trim_prefix(lsn(9)), LsnRange::empty_at(lsn(8)));
        assert_eq!(r.trim_prefix(lsn(7)).next(), lsn(8));
        assert_eq!(r.trim_prefix(lsn(4)), LsnRange::inclusive(lsn(5), lsn(7)));
    }

    proptest! {
        #[test]
        fn len_matches_iteration(r in range()) {
            prop_assert_eq!(r.iter().count() as u64, r.len());
            prop_assert_eq!(r.is_empty(), r.iter().next().is_none());
            prop_assert_eq!(r.next().get(), r.first().get() + r.len());
        }

        #[test]
        fn contains_matches_iteration(r in range(), probe in 1u64..1100) {
            let p = lsn(probe);
            prop_assert_eq!(r.contains(p), r.iter().any(|x| x == p));
        }

        #[test]
        fn extend_adds_at_the_end(r in range(), n in 0u64..20) {
            let e = r.extend(n);
            prop_assert_eq!(e.first(), r.first());
            prop_assert_eq!(e.len(), r.len() + n);
        }

        #[test]
        fn trim_prefix_removes_exactly_the_prefix(r in range(), up_to in 1u64..1100) {
            let t = r.trim_prefix(lsn(up_to));
            let expected: Vec<Lsn> = r.iter().filter(|l| l.get() > up_to).collect();
            prop_assert_eq!(t.iter().collect::<Vec<_>>(), expected);
            prop_assert_eq!(t.next(), r.next());
        }

        #[test]
        fn intersect_is_set_intersection(a in range(), b in range()) {
            let i = a.intersect(&b);
            let expected: Vec<Lsn> = a.iter().filter(|l| b.contains(*l)).collect();
            prop_assert_eq!(i.iter().collect::<Vec<_>>(), expected);
            prop_assert_eq!(i, b.intersect(&a));
        }
    }
}
