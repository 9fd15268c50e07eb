//! The entry frame: `len u32 | lsn u64 | payload_crc u32 | header_crc u32 | payload[len]`,
//! little endian, CRC32C.
//!
//! The header has a checksum of its own so that a damaged length or LSN is told apart from a
//! torn append: a torn tail has an intact header with a short or unfinished payload (or is all
//! zeros), while a header that fails its checksum is corruption. The LSN in every frame catches
//! a frame found at the wrong position.

use crate::Lsn;

/// Bytes before the payload.
pub const FRAME_HEADER_BYTES: usize = 20;

/// The largest payload an entry may carry. 64 MiB: far above any page batch the reducer builds
/// (bounded separately), yet small enough that a corrupt length cannot make a reader allocate
/// gigabytes.
pub const MAX_ENTRY_BYTES: usize = 64 << 20;

/// Appends one frame to `out`.
pub fn encode_frame(out: &mut Vec<u8>, lsn: Lsn, payload: &[u8]) {
    encode_frame_header(out, lsn, payload);
    out.extend_from_slice(payload);
}

/// Appends the header of `payload`'s frame to `out`, for a writer that writes the payload
/// from where it is.
pub fn encode_frame_header(out: &mut Vec<u8>, lsn: Lsn, payload: &[u8]) {
    assert!(payload.len() <= MAX_ENTRY_BYTES, "BUG: callers check MAX_ENTRY_BYTES first");
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&lsn.get().to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let header_crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&header_crc.to_le_bytes());
}

/// Appends one frame per payload, LSNs `first`, `first + 1`, ..., and returns where each frame
/// starts in `out`.
pub fn encode_frames(out: &mut Vec<u8>, first: Lsn, payloads: &[&[u8]]) -> Vec<usize> {
    out.reserve(payloads.iter().map(|p| frame_len(p.len())).sum());
    let mut lsn = first;
    payloads
        .iter()
        .map(|p| {
            let at = out.len();
            encode_frame(out, lsn, p);
            lsn = lsn.next();
            at
        })
        .collect()
}

/// The frame bytes an entry with this payload occupies.
pub fn frame_len(payload_len: usize) -> usize {
    FRAME_HEADER_BYTES + payload_len
}

/// A frame header whose own checksum holds; the payload is not verified yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub len: usize,
    pub lsn: u64,
    payload_crc: u32,
}

/// Why a frame could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the header or the declared payload need.
    Truncated { need_bytes: usize, have_bytes: usize },
    /// The header fails its own checksum.
    BadHeader,
    /// The declared length exceeds `MAX_ENTRY_BYTES`.
    TooLong { len: usize },
    /// The header is intact but the payload fails its checksum.
    BadPayload,
    /// The frame is intact but carries another LSN than its position says.
    WrongLsn { found: u64 },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated { need_bytes, have_bytes } => {
                write!(f, "truncated frame: need {need_bytes} bytes, have {have_bytes}")
            }
            FrameError::BadHeader => write!(f, "frame header checksum mismatch"),
            FrameError::TooLong { len } => write!(f, "frame length {len} exceeds the maximum"),
            FrameError::BadPayload => write!(f, "payload checksum mismatch"),
            FrameError::WrongLsn { found } => write!(f, "frame carries LSN {found}"),
        }
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("BUG: caller passes 4 bytes"))
}

/// Parses and checks a header from the first `FRAME_HEADER_BYTES` of `bytes`.
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader, FrameError> {
    let Some(h) = bytes.get(..FRAME_HEADER_BYTES) else {
        return Err(FrameError::Truncated { need_bytes: FRAME_HEADER_BYTES, have_bytes: bytes.len() });
    };
    if crc32c::crc32c(&h[..16]) != le_u32(&h[16..20]) {
        return Err(FrameError::BadHeader);
    }
    let len = le_u32(&h[0..4]) as usize;
    let lsn = u64::from_le_bytes(h[4..12].try_into().expect("BUG: 8-byte slice"));
    if len > MAX_ENTRY_BYTES {
        return Err(FrameError::TooLong { len });
    }
    Ok(FrameHeader { len, lsn, payload_crc: le_u32(&h[12..16]) })
}

/// Checks `payload` against `header`, and that the frame sits at `expected` LSN.
pub fn verify(header: &FrameHeader, expected: Lsn, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() != header.len {
        return Err(FrameError::Truncated { need_bytes: header.len, have_bytes: payload.len() });
    }
    if header.lsn != expected.get() {
        return Err(FrameError::WrongLsn { found: header.lsn });
    }
    if crc32c::crc32c(payload) != header.payload_crc {
        return Err(FrameError::BadPayload);
    }
    Ok(())
}

/// Decodes one whole frame from the start of `bytes`, returning its payload.
pub fn decode_frame(bytes: &[u8], expected: Lsn) -> Result<&[u8], FrameError> {
    let header = decode_header(bytes)?;
    let end = FRAME_HEADER_BYTES + header.len;
    let payload = bytes
        .get(FRAME_HEADER_BYTES..end)
        .ok_or(FrameError::Truncated { need_bytes: end, have_bytes: bytes.len() })?;
    verify(&header, expected, payload)?;
    Ok(payload)
}

/// True when the undecodable bytes at the end of a log look like an interrupted
/// append: a frame cut short, a payload that fails its checksum while running exactly to the end
/// of the file, or nothing but zeros (blocks allocated but never written). A header that fails
/// its own checksum is corruption, unless only zeros follow.
pub fn is_torn_tail(rest: &[u8], err: &FrameError) -> bool {
    match err {
        FrameError::Truncated { .. } => true,
        FrameError::BadPayload => decode_header(rest).is_ok_and(|h| frame_len(h.len) == rest.len()),
        FrameError::BadHeader | FrameError::TooLong { .. } | FrameError::WrongLsn { .. } => {
            rest.iter().all(|&b| b == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_and_rejects_every_single_bit_flip() {
        let lsn = Lsn::new(42).expect("non-zero");
        let mut frame = Vec::new();
        encode_frame(&mut frame, lsn, b"hello pages");
        assert_eq!(frame.len(), frame_len(11));
        assert_eq!(decode_frame(&frame, lsn), Ok(&b"hello pages"[..]));
        for bit in 0..frame.len() * 8 {
            let mut bad = frame.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_frame(&bad, lsn).is_err(), "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn frame_at_the_wrong_position_is_rejected() {
        let mut frame = Vec::new();
        encode_frame(&mut frame, Lsn::FIRST, b"x");
        let other = Lsn::new(2).expect("non-zero");
        assert_eq!(decode_frame(&frame, other), Err(FrameError::WrongLsn { found: 1 }));
    }

    #[test]
    fn truncations_are_errors() {
        let mut frame = Vec::new();
        encode_frame(&mut frame, Lsn::FIRST, b"payload");
        for cut in 0..frame.len() {
            assert!(decode_frame(&frame[..cut], Lsn::FIRST).is_err());
        }
    }
}
