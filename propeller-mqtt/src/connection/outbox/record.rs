//! One message of the outbox directory as bytes, and back.
//!
//! ```text
//! offset  size  field
//!      0     4  magic "PMQO"
//!      4     1  format version, 1
//!      5     1  QoS, 1 or 2
//!      6     8  sequence number, little endian (also the file's name)
//!     14     4  topic length T, little endian
//!     18     4  payload length P, little endian
//!     22     T  topic, UTF-8
//!   22+T     P  payload
//! 22+T+P     4  CRC-32 (IEEE, as zlib and Ethernet) of every byte before it
//! ```
//!
//! The lengths say how long the file must be, so a truncated file is told
//! from a damaged one; the checksum covers the rest. Nothing here panics on
//! bad input: [`decode`] names what is wrong instead.

use bytes::Bytes;

use crate::QoS;

const MAGIC: [u8; 4] = *b"PMQO";
const VERSION: u8 = 1;
/// Magic, version, QoS, sequence number and the two lengths.
pub(crate) const HEADER: usize = 4 + 1 + 1 + 8 + 4 + 4;
/// The checksum.
pub(crate) const TRAILER: usize = 4;

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub seq: u64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
}

/// The bytes of a file holding message `seq`.
pub(crate) fn encode(seq: u64, topic: &str, payload: &[u8], qos: QoS) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + topic.len() + payload.len() + TRAILER);
    bytes.extend_from_slice(&MAGIC);
    bytes.push(VERSION);
    bytes.push(qos as u8);
    bytes.extend_from_slice(&seq.to_le_bytes());
    // Topics and payloads are bounded by the packet size limit (256 MiB).
    bytes.extend_from_slice(&(topic.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(topic.as_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The message in `bytes`, or what is wrong with them.
pub(crate) fn decode(bytes: &[u8]) -> Result<Record, &'static str> {
    if bytes.len() < HEADER + TRAILER {
        return Err("truncated: shorter than a header");
    }
    if bytes[..4] != MAGIC {
        return Err("not an outbox message (wrong magic)");
    }
    if bytes[4] != VERSION {
        return Err("written in an unknown format version");
    }
    let u32_at = |at: usize| {
        let mut word = [0; 4];
        word.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(word) as usize
    };
    let mut seq = [0; 8];
    seq.copy_from_slice(&bytes[6..14]);
    let seq = u64::from_le_bytes(seq);
    let (topic_len, payload_len) = (u32_at(14), u32_at(18));
    let expected = HEADER
        .saturating_add(topic_len)
        .saturating_add(payload_len)
        .saturating_add(TRAILER);
    if bytes.len() < expected {
        return Err("truncated: shorter than its lengths say");
    }
    if bytes.len() > expected {
        return Err("longer than its lengths say");
    }
    let body = bytes.len() - TRAILER;
    if crc32(&bytes[..body]) != u32_at(body) as u32 {
        return Err("checksum mismatch");
    }
    let qos = match bytes[5] {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err("invalid QoS"),
    };
    let topic = std::str::from_utf8(&bytes[HEADER..HEADER + topic_len])
        .map_err(|_| "the topic is not UTF-8")?;
    Ok(Record {
        seq,
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(&bytes[HEADER + topic_len..body]),
        qos,
    })
}

/// CRC-32 with the IEEE polynomial (reflected, 0xEDB88320), one table
/// lookup per byte: a few hundred MB/s, nothing next to an fsync.
pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc = CRC_TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                0xEDB8_8320 ^ (crc >> 1)
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        // The check value of CRC-32/ISO-HDLC, as zlib computes it.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn a_record_round_trips() {
        let bytes = encode(42, "m/d/c/ch/numbers", b"\x00payload\xff", QoS::ExactlyOnce);
        let record = decode(&bytes).unwrap();
        assert_eq!(
            record,
            Record {
                seq: 42,
                topic: "m/d/c/ch/numbers".to_owned(),
                payload: Bytes::from_static(b"\x00payload\xff"),
                qos: QoS::ExactlyOnce,
            }
        );
    }

    #[test]
    fn damage_is_named() {
        let bytes = encode(7, "t", b"abc", QoS::AtLeastOnce);
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]),
            Err("truncated: shorter than its lengths say")
        );
        assert_eq!(
            decode(&bytes[..10]),
            Err("truncated: shorter than a header")
        );
        let mut flipped = bytes.clone();
        flipped[HEADER + 2] ^= 0x10;
        assert_eq!(decode(&flipped), Err("checksum mismatch"));
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err("longer than its lengths say"));
        let mut magic = bytes;
        magic[0] = b'X';
        assert_eq!(decode(&magic), Err("not an outbox message (wrong magic)"));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 500,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Whatever a file holds, reading it never panics, and anything
        /// accepted is what some message encodes to.
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(record) = decode(&bytes) {
                prop_assert_eq!(encode(record.seq, &record.topic, &record.payload, record.qos), bytes);
            }
        }

        /// Any single flipped bit is caught.
        #[test]
        fn a_flipped_bit_is_caught(
            topic in "[a-z/]{0,20}",
            payload in proptest::collection::vec(any::<u8>(), 0..64),
            bit in any::<usize>(),
        ) {
            let mut bytes = encode(3, &topic, &payload, QoS::AtLeastOnce);
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&bytes).is_err());
        }
    }
}
