//! Identifiers: `DocId` (a document) and `TimelineId` (one client's mutation log for one
//! document). Both are 128 bits, printed as 32 hex digits; a UUID string is accepted.

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
