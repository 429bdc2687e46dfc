//! Frame encoding and decoding: the only place that knows the on-disk byte
//! layout of one record.
//!
//! Layout: `[payload_len u32 LE][crc32c u32 LE][seq u64 LE][payload]`, where
//! the crc covers `seq LE bytes ++ payload`. The engine reuses this module to
//! write snapshot files in the same format.
//!
//! This module must never panic on any input (decoding runs over bytes read
//! from disk, which may be torn or corrupt) and must never allocate while
//! decoding: it only describes where the payload is.

use crate::Seq;
use std::ops::Range;

/// Bytes of framing before each payload.
pub const HEADER_BYTES: usize = 16;

/// The largest payload the format itself can describe. Callers pass their
/// own, usually much smaller, limit to [`decode_limited`].
pub const PAYLOAD_BYTES_MAX: usize = u32::MAX as usize;

/// Outcome of decoding the frame at the start of a byte slice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeResult {
    /// A whole, checksum-valid frame starts the slice.
    Ok {
        seq: Seq,
        /// Where the payload lies within the decoded slice.
        payload: Range<usize>,
        /// Header plus payload: how far to advance to the next frame.
        frame_len: usize,
    },
    /// The slice ends before the frame does. `needed_bytes` is how many bytes
    /// from the start of the slice are required to make progress (the header,
    /// or the whole frame once the header is readable).
    Incomplete { needed_bytes: usize },
    /// The bytes cannot be a frame written by this crate.
    Bad(String),
}

fn checksum(seq: Seq, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&seq.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Appends one frame for `(seq, payload)` to `out`.
///
/// Panics if the payload is larger than the format can describe; callers
/// enforce the (much smaller) configured record limit before this point.
pub fn encode(seq: Seq, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= PAYLOAD_BYTES_MAX,
        "payload too large to frame"
    );
    let payload_len = payload.len() as u32;
    out.reserve(HEADER_BYTES + payload.len());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Decodes the frame at the start of `buf` with no payload limit beyond what
/// the format can express.
pub fn decode(buf: &[u8]) -> DecodeResult {
    decode_limited(buf, PAYLOAD_BYTES_MAX)
}

/// Decodes the frame at the start of `buf`, rejecting payloads longer than
/// `payload_bytes_limit` as [`DecodeResult::Bad`] (before waiting for them).
pub fn decode_limited(buf: &[u8], payload_bytes_limit: usize) -> DecodeResult {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return DecodeResult::Incomplete {
            needed_bytes: HEADER_BYTES,
        };
    };
    let mut len_bytes = [0u8; 4];
    len_bytes.copy_from_slice(&header[0..4]);
    let mut crc_bytes = [0u8; 4];
    crc_bytes.copy_from_slice(&header[4..8]);
    let mut seq_bytes = [0u8; 8];
    seq_bytes.copy_from_slice(&header[8..16]);
    let payload_len = u32::from_le_bytes(len_bytes) as usize;
    let crc_stored = u32::from_le_bytes(crc_bytes);
    let seq = u64::from_le_bytes(seq_bytes);

    if payload_len > payload_bytes_limit {
        return DecodeResult::Bad(format!(
            "payload length {payload_len} exceeds the limit of {payload_bytes_limit} bytes"
        ));
    }
    let frame_len = HEADER_BYTES + payload_len;
    let Some(payload) = buf.get(HEADER_BYTES..frame_len) else {
        return DecodeResult::Incomplete {
            needed_bytes: frame_len,
        };
    };
    let crc_computed = checksum(seq, payload);
    if crc_computed != crc_stored {
        return DecodeResult::Bad(format!(
            "checksum mismatch for seq {seq}: stored {crc_stored:#010x}, computed {crc_computed:#010x}"
        ));
    }
    DecodeResult::Ok {
        seq,
        payload: HEADER_BYTES..frame_len,
        frame_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode(7, b"hello", &mut buf);
        encode(8, b"", &mut buf);
        assert_eq!(buf.len(), 2 * HEADER_BYTES + 5);
        let DecodeResult::Ok {
            seq,
            payload,
            frame_len,
        } = decode(&buf)
        else {
            panic!("expected a frame");
        };
        assert_eq!((seq, &buf[payload], frame_len), (7, &b"hello"[..], 21));
        let DecodeResult::Ok { seq, payload, .. } = decode(&buf[frame_len..]) else {
            panic!("expected a frame");
        };
        assert_eq!((seq, payload.len()), (8, 0));
    }

    #[test]
    fn incomplete_and_bad() {
        let mut buf = Vec::new();
        encode(1, b"abcdef", &mut buf);
        for cut in 0..buf.len() {
            let needed = if cut < HEADER_BYTES {
                HEADER_BYTES
            } else {
                buf.len()
            };
            assert_eq!(
                decode(&buf[..cut]),
                DecodeResult::Incomplete {
                    needed_bytes: needed
                }
            );
        }
        let mut flipped = buf.clone();
        flipped[HEADER_BYTES + 2] ^= 0x40;
        assert!(matches!(decode(&flipped), DecodeResult::Bad(_)));
        assert!(matches!(decode_limited(&buf, 5), DecodeResult::Bad(_)));
        assert!(matches!(decode_limited(&buf, 6), DecodeResult::Ok { .. }));
    }

    #[test]
    fn decode_random_bytes_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5157_4c4f_4701);
        let mut valid = Vec::new();
        encode(42, b"payload bytes", &mut valid);
        for round in 0..200_000u32 {
            let len = rng.gen_range(0..64);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if round % 4 == 0 {
                // Mutate a valid frame: more interesting than pure noise.
                buf = valid.clone();
                let i = rng.gen_range(0..buf.len());
                buf[i] = rng.gen();
                buf.truncate(rng.gen_range(0..=buf.len()));
            }
            match decode_limited(&buf, 1 << 20) {
                DecodeResult::Ok {
                    payload, frame_len, ..
                } => {
                    assert!(frame_len <= buf.len());
                    assert_eq!(payload.end, frame_len);
                }
                DecodeResult::Incomplete { needed_bytes } => assert!(needed_bytes > buf.len()),
                DecodeResult::Bad(reason) => assert!(!reason.is_empty()),
            }
            let _ = decode(&buf);
        }
    }
}
