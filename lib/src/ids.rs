//! Identifiers: `DocId` (a document) and `TimelineId` (one client's mutation log for one
//! document). Both are 128 bits, printed as 32 hex digits; a UUID string is accepted.
//!
//! A timeline id is public (storage entries and presence name it), so it is not what lets a
//! client write to it: its [`TimelineKey`] is. The id is a hash of the key; a client proves
//! it owns a timeline by sending the key when it subscribes, and the server takes mutations
//! for that timeline only on a connection that did (see `protocol::server`).

use std::fmt;
use std::str::FromStr;

use pagesync_journal::{JournalId, ParseIdError};
use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// From caller-supplied randomness or a stable name; the core draws none itself.
            pub fn from_u128(n: u128) -> Self {
                $name(n.to_be_bytes())
            }

            /// The journal that holds this id's entries.
            pub fn journal_id(&self) -> JournalId {
                JournalId::from_bytes(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.journal_id(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ok($name(*s.parse::<JournalId>()?.as_bytes()))
            }
        }
    };
}

id_type!(
    /// A document: one replicated SQLite database.
    DocId
);
id_type!(
    /// One client's timeline of mutations for one document.
    TimelineId
);

/// The secret a timeline's id is derived from (`TimelineKey::id`): 32 random bytes the
/// replica keeps beside its timeline and sends only to the server, when it subscribes. Without
/// it no one can write to, or acknowledge the rejections of, another client's timeline, even
/// knowing its id. Never printed (its `Debug` shows the id only).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineKey(pub [u8; 32]);

impl TimelineKey {
    /// The bytes of a key file (see `from_file_bytes`).
    pub const FILE_BYTES: usize = 32;

    /// The timeline this key opens: SHA-256 of a fixed label and the key, first 16 bytes.
    pub fn id(&self) -> TimelineId {
        use sha2::Digest;
        let digest =
            sha2::Sha256::new().chain_update(b"pagesync timeline key\0").chain_update(self.0).finalize();
        TimelineId(digest[..16].try_into().expect("BUG: 16 of 32 bytes"))
    }

    /// A key from caller-supplied randomness (the core draws none itself).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        TimelineKey(bytes)
    }

    /// A key for tests and tools: derived from `n`, so anyone can derive it. Never for a
    /// replica whose timeline others can reach.
    pub fn insecure_from_u128(n: u128) -> Self {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&n.to_be_bytes());
        TimelineKey(key)
    }

    /// A key as kept in a file: exactly its 32 bytes.
    pub fn from_file_bytes(bytes: &[u8]) -> Option<Self> {
        Some(TimelineKey(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for TimelineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TimelineKey(for {})", self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_names_one_timeline_and_hides_itself() {
        let (a, b) = (TimelineKey::insecure_from_u128(1), TimelineKey::insecure_from_u128(2));
        assert_eq!(a.id(), TimelineKey::insecure_from_u128(1).id());
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id().0[..], a.0[..16], "the id is not the key");
        assert!(!format!("{a:?}").contains("0000000000000001"), "Debug must not print the key");
        assert_eq!(TimelineKey::from_file_bytes(&a.0), Some(a));
        assert_eq!(TimelineKey::from_file_bytes(&a.0[..31]), None);
    }
}
