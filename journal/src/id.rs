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

/// The text was neither 32 hex digits nor a UUID (8-4-4-4-12 hex digits); it holds at most the
/// first 80 characters of what was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {0:?}: expected 32 hex digits or a UUID (8-4-4-4-12 hex digits)")]
pub struct ParseIdError(pub String);

impl FromStr for JournalId {
    type Err = ParseIdError;

    /// Exactly two spellings: 32 hex digits, or a UUID's 8-4-4-4-12 (either case). Anything
    /// else (braces, a sign, dashes elsewhere, spaces) is refused, so one id has one name in a
    /// URL, a token's grant and a log line.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseIdError(s.chars().take(80).collect());
        let bytes = s.as_bytes();
        let hex: Vec<u8> = match bytes.len() {
            32 => bytes.to_vec(),
            36 if [8, 13, 18, 23].iter().all(|&i| bytes[i] == b'-') => bytes
                .iter()
                .enumerate()
                .filter(|(i, _)| ![8, 13, 18, 23].contains(i))
                .map(|(_, &b)| b)
                .collect(),
            _ => return Err(bad()),
        };
        let nibble = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = nibble(pair[0]).zip(nibble(pair[1])).map(|(hi, lo)| hi << 4 | lo).ok_or_else(bad)?;
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
        assert_eq!("01234567-89AB-CDEF-0011-223344556677".parse::<JournalId>(), Ok(id));
    }

    #[test]
    fn one_id_has_only_the_two_spellings() {
        for other in [
            "{01234567-89ab-cdef-0011-223344556677}",
            "urn:uuid:01234567-89ab-cdef-0011-223344556677",
            "0123456789abcdef-0011223344556677",
            "0-123456789abcdef0011223344556677",
            "01234567-89abc-def0-0112-23344556677",
            "+1+2+3+4+5+6+7+8+9+a+b+c+d+e+f+0",
            " 123456789abcdef0011223344556677",
            "0123456789abcdef00112233445566770",
            "0123456789abcdef001122334455667",
            "0123456789abcdef001122334455667\u{e9}",
            "",
        ] {
            assert!(other.parse::<JournalId>().is_err(), "{other:?} parsed");
        }
        let long = "x".repeat(100_000);
        let shown = long.parse::<JournalId>().expect_err("parsed").to_string();
        assert!(shown.len() < 200, "the error echoes all of a long input: {} bytes", shown.len());
    }
}
