//! Byte vectors in serde as bytes, not as sequences of `u8`: postcard writes both as a varint
//! length and the raw bytes (so the format is unchanged), but a sequence goes through serde one
//! element at a time, which made encoding a 100 KB entry cost a call per byte.
//!
//! Use with `#[serde(with = "crate::bytes")]` on a `Vec<u8>`, or `crate::bytes::vec` on a
//! `Vec<Vec<u8>>`.

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};

pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(v)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // Bounded by what the input holds: never trust a declared length for the capacity.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// `bytes::Bytes` as bytes. Decoded inside `shared::within(frame, ..)` (a frame the decoder
/// reads from), a byte string is a view of that frame, not a copy: a cold start's entries go
/// from the socket's buffer to the replica's file with no copy of their own in between. A
/// view keeps the whole frame in memory, so it is for values dropped once applied.
pub mod shared {
    use super::*;
    use std::cell::RefCell;

    thread_local! {
        static FRAME: RefCell<Option<bytes::Bytes>> = const { RefCell::new(None) };
    }

    /// Runs `decode` with `frame` as the buffer byte strings it decodes may be views of.
    pub fn within<T>(frame: &bytes::Bytes, decode: impl FnOnce() -> T) -> T {
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                FRAME.with(|f| f.borrow_mut().take());
            }
        }
        FRAME.with(|f| *f.borrow_mut() = Some(frame.clone()));
        let _clear = Clear;
        decode()
    }

    pub fn serialize<S: Serializer>(v: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        // Not `deserialize_byte_buf`: postcard lends the input's own bytes only here.
        d.deserialize_bytes(SharedVisitor)
    }

    struct SharedVisitor;

    impl<'de> Visitor<'de> for SharedVisitor {
        type Value = bytes::Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<bytes::Bytes, E> {
            let view = FRAME.with(|f| {
                let f = f.borrow();
                let frame = f.as_ref()?;
                let (start, at) = (frame.as_ptr() as usize, v.as_ptr() as usize);
                let inside = at >= start && at + v.len() <= start + frame.len();
                inside.then(|| frame.slice_ref(v))
            });
            Ok(view.unwrap_or_else(|| bytes::Bytes::copy_from_slice(v)))
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<bytes::Bytes, E> {
            Ok(bytes::Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<bytes::Bytes, E> {
            Ok(v.into())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<bytes::Bytes, A::Error> {
            BytesVisitor.visit_seq(seq).map(Into::into)
        }
    }
}

/// `Vec<Vec<u8>>` as a sequence of byte strings.
pub mod vec {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for item in v {
            seq.serialize_element(&Bytes(item))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        d.deserialize_seq(VecVisitor)
    }

    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    struct Owned(Vec<u8>);

    impl<'de> serde::Deserialize<'de> for Owned {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Owned, D::Error> {
            super::deserialize(d).map(Owned)
        }
    }

    struct VecVisitor;

    impl<'de> Visitor<'de> for VecVisitor {
        type Value = Vec<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a sequence of byte strings")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Vec<u8>>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
            while let Some(Owned(b)) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Fast {
        #[serde(with = "crate::bytes")]
        one: Vec<u8>,
        #[serde(with = "crate::bytes::vec")]
        many: Vec<Vec<u8>>,
    }

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Plain {
        one: Vec<u8>,
        many: Vec<Vec<u8>>,
    }

    /// The same bytes on the wire as serde's default for `Vec<u8>`: old frames and journals
    /// still decode.
    #[test]
    fn the_encoding_is_unchanged() {
        let (one, many) = ((0..=255u8).collect::<Vec<_>>(), vec![vec![1, 2, 3], vec![], vec![9; 300]]);
        let fast = postcard::to_stdvec(&Fast { one: one.clone(), many: many.clone() }).expect("encode");
        let plain = postcard::to_stdvec(&Plain { one: one.clone(), many: many.clone() }).expect("encode");
        assert_eq!(fast, plain);
        assert_eq!(postcard::from_bytes::<Fast>(&plain).expect("decode"), Fast { one, many });
    }
}
