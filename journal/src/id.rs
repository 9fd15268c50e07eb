//! `JournalId`: the 128-bit name of one journal, printed as 32 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

/// Identifies a journal (a document's storage journal, or one client's timeline).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JournalId([u8; 16]);

impl JournalId {
    pub const fn from_bytes(bytes: [u8; 16]) -> JournalId {
        JournalId(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Builds an id from caller-supplied randomness (the journal crate reads none itself).
    pub fn from_u128(n: u128) -> JournalId {
        JournalId(n.to_be_bytes())
    }
}

impl fmt::Display for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for JournalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JournalId({self})")
    }
}

/// The text was not 32 hex digits (dashes, as in a UUID, are allowed and ignored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid journal id {0:?}: expected 32 hex digits (a UUID is accepted)")]
pub struct ParseIdError(pub String);

impl FromStr for JournalId {
    type Err = ParseIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        let bad = || ParseIdError(s.to_owned());
        if hex.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(JournalId(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips_and_accepts_uuids() {
        let id = JournalId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let text = id.to_string();
        assert_eq!(text, "0123456789abcdef0011223344556677");
        assert_eq!(text.parse::<JournalId>(), Ok(id));
        let uuid = "01234567-89ab-cdef-0011-223344556677";
        assert_eq!(uuid.parse::<JournalId>(), Ok(id));
        assert!("xyz".parse::<JournalId>().is_err());
        assert!("0123456789abcdef001122334455667g".parse::<JournalId>().is_err());
    }
}
