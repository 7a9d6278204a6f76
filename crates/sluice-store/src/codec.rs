//! The record frame: every value the store keeps is wrapped in one, so corruption is detected
//! on read instead of being handed on as data.
//!
//! ```text
//! offset  size  field
//! 0       1     version (1)
//! 1       1     flags (0; reserved)
//! 2       4     payload length, u32 little-endian
//! 6       4     CRC-32C over bytes 0..6 and the payload, u32 little-endian
//! 10      len   payload
//! ```
//!
//! The checksum covers the header fields too, so a flipped length or version is caught even when
//! it still points inside the buffer. A frame must fill its buffer exactly: trailing bytes are an
//! error, because a record is always stored as one value.

use thiserror::Error;

/// The frame version written by [`encode`].
pub const VERSION: u8 = 1;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 10;

/// Why a stored frame could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the length it announces.
    #[error("truncated record: {needed} bytes needed, {available} present")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes found.
        available: usize,
    },
    /// A version this build does not know (written by a newer Sluice, or garbage).
    #[error("unknown record version {0} (this build reads version {VERSION})")]
    UnknownVersion(u8),
    /// Flags this build does not know.
    #[error("unknown record flags {0:#04x}")]
    UnknownFlags(u8),
    /// The checksum does not match: the bytes changed after they were written.
    #[error("record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes found.
        computed: u32,
    },
    /// Bytes after the end of the frame.
    #[error("{0} unexpected bytes after the record")]
    TrailingBytes(usize),
    /// The frame is intact but its content does not have the layout its table expects.
    #[error("malformed record content: {0}")]
    Malformed(String),
}

/// Why a payload could not be framed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("record payload of {0} bytes exceeds the 4 GiB frame limit")]
pub struct PayloadTooLarge(pub usize);

/// Wraps `payload` in a version 1 frame.
pub fn encode(payload: &[u8]) -> Result<Vec<u8>, PayloadTooLarge> {
    let len = u32::try_from(payload.len()).map_err(|_| PayloadTooLarge(payload.len()))?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.push(VERSION);
    frame.push(0);
    frame.extend_from_slice(&len.to_le_bytes());
    let crc = frame_crc(&frame[..6], payload);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Checks a frame and returns its payload.
pub fn decode(frame: &[u8]) -> Result<&[u8], DecodeError> {
    let header = frame.get(..HEADER_LEN).ok_or(DecodeError::Truncated {
        needed: HEADER_LEN,
        available: frame.len(),
    })?;
    let [version, flags, l0, l1, l2, l3, c0, c1, c2, c3] = header else {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN,
            available: frame.len(),
        });
    };
    if *version != VERSION {
        return Err(DecodeError::UnknownVersion(*version));
    }
    if *flags != 0 {
        return Err(DecodeError::UnknownFlags(*flags));
    }
    let len = u32::from_le_bytes([*l0, *l1, *l2, *l3]) as usize;
    let body = &frame[HEADER_LEN..];
    if body.len() < len {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN.saturating_add(len),
            available: frame.len(),
        });
    }
    if body.len() > len {
        return Err(DecodeError::TrailingBytes(body.len() - len));
    }
    let stored = u32::from_le_bytes([*c0, *c1, *c2, *c3]);
    let computed = frame_crc(&header[..6], body);
    if stored != computed {
        return Err(DecodeError::BadChecksum { stored, computed });
    }
    Ok(body)
}

/// The CRC-32C of the header's first six bytes followed by the payload.
fn frame_crc(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header), payload)
}

/// CRC-32C (Castagnoli) of `bytes`: detects all burst errors up to 32 bits, and is the checksum
/// of iSCSI, ext4 and most storage formats. The `crc32c` crate computes it with the CPU's CRC
/// instruction where there is one (SSE 4.2, ARMv8): a table-driven loop cost a third of the
/// writer thread's time in the durable channel benchmark.
pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C bit by bit, as the polynomial defines it (reflected: 0x82F63B78).
    fn reference_crc32c(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    proptest::proptest! {
        #[test]
        fn the_frame_checksum_is_the_crc32c_of_header_and_payload(
            header in proptest::collection::vec(proptest::num::u8::ANY, 6),
            payload in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
        ) {
            let whole = [header.as_slice(), payload.as_slice()].concat();
            proptest::prop_assert_eq!(frame_crc(&header, &payload), reference_crc32c(&whole));
        }
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(reference_crc32c(b"123456789"), 0xE306_9283);
        // The check value of CRC-32C for the ASCII digits 1..9 (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn round_trip_keeps_the_payload() {
        for payload in [&b""[..], b"x", &[0u8; 1024][..], b"hello world"] {
            let frame = encode(payload).unwrap();
            assert_eq!(frame.len(), HEADER_LEN + payload.len());
            assert_eq!(decode(&frame).unwrap(), payload);
        }
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let frame = encode(b"some payload").unwrap();
        for cut in 0..frame.len() {
            let err = decode(&frame[..cut]).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let frame = encode(b"payload under test").unwrap();
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut bad = frame.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode(&bad).is_err(),
                    "flip of bit {bit} in byte {byte} went unseen"
                );
            }
        }
    }

    #[test]
    fn a_flipped_payload_byte_is_a_checksum_error() {
        let mut frame = encode(b"abc").unwrap();
        frame[HEADER_LEN + 1] ^= 0x40;
        assert!(matches!(
            decode(&frame),
            Err(DecodeError::BadChecksum { .. })
        ));
    }

    #[test]
    fn unknown_version_and_flags_are_named() {
        let mut frame = encode(b"abc").unwrap();
        frame[0] = 9;
        assert_eq!(decode(&frame), Err(DecodeError::UnknownVersion(9)));
        let mut frame = encode(b"abc").unwrap();
        frame[1] = 1;
        assert_eq!(decode(&frame), Err(DecodeError::UnknownFlags(1)));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut frame = encode(b"abc").unwrap();
        frame.push(0);
        assert_eq!(decode(&frame), Err(DecodeError::TrailingBytes(1)));
    }

    proptest::proptest! {
        /// What the fuzz target checks, in CI: no panic on any input, and whatever is accepted
        /// is exactly what `encode` writes.
        #[test]
        fn decode_accepts_only_what_encode_writes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(payload) = decode(&bytes) {
                proptest::prop_assert_eq!(encode(payload).unwrap(), bytes);
            }
        }

        #[test]
        fn encode_then_decode_is_identity(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let frame = encode(&payload).unwrap();
            proptest::prop_assert_eq!(decode(&frame).unwrap(), &payload[..]);
        }
    }

    #[test]
    fn error_messages_say_what_happened() {
        assert_eq!(
            DecodeError::Truncated {
                needed: 10,
                available: 3
            }
            .to_string(),
            "truncated record: 10 bytes needed, 3 present"
        );
        assert_eq!(
            DecodeError::UnknownVersion(7).to_string(),
            "unknown record version 7 (this build reads version 1)"
        );
    }
}
