//! The TCP data-plane framing of docs/wire-formats.md section 4: a 24-byte request header and the 8-byte
//! MCTV status word. Pure functions, fuzzed and unit-tested.

use mooncake_core::{Error, Opcode, Result};

/// Size of a request header.
pub const HEADER_LEN: usize = 24;
/// Bit of the opcode byte that selects version-2 framing (status words).
pub const V2_FLAG: u8 = 0x80;
/// High 32 bits of every status word ("MCTV").
pub const STATUS_MAGIC: u32 = 0x4D43_5456;
/// Status: request applied.
pub const STATUS_OK: u32 = 0;
/// Status: address range rejected.
pub const STATUS_REJECTED: u32 = 1;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload size in bytes.
    pub size: u64,
    /// Absolute address in the server's memory.
    pub addr: u64,
    /// Read or write.
    pub opcode: Opcode,
    /// Version-2 framing (status words).
    pub v2: bool,
}

impl Header {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16] = (self.opcode as u8) | if self.v2 { V2_FLAG } else { 0 };
        b
    }

    /// Decodes a header; an unknown opcode is a protocol error. Padding is ignored.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        let size = u64::from_le_bytes(b[0..8].try_into().unwrap_or_default());
        let addr = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
        let op = b[16];
        let opcode = match op & !V2_FLAG {
            0 => Opcode::Read,
            1 => Opcode::Write,
            other => return Err(Error::Protocol(format!("unknown TCP opcode {other:#x} (byte {op:#x})"))),
        };
        Ok(Header { size, addr, opcode, v2: op & V2_FLAG != 0 })
    }
}

/// Encodes a status word.
pub fn encode_status(code: u32) -> [u8; 8] {
    ((u64::from(STATUS_MAGIC) << 32) | u64::from(code)).to_le_bytes()
}

/// Decodes a status word; a word without the magic is a protocol error.
pub fn decode_status(b: [u8; 8]) -> Result<u32> {
    let w = u64::from_le_bytes(b);
    if (w >> 32) as u32 != STATUS_MAGIC {
        return Err(Error::Protocol(format!("status word {w:#018x} lacks the MCTV magic")));
    }
    Ok(w as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_is_upstreams() {
        let h = Header { size: 0x0102, addr: 0x7f00_0000_1000, opcode: Opcode::Write, v2: true };
        let b = h.encode();
        assert_eq!(&b[0..8], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(b[16], 0x81);
        assert_eq!(&b[17..], &[0; 7]);
        assert_eq!(Header::decode(&b).unwrap(), h);
        let mut r = Header { opcode: Opcode::Read, v2: false, ..h }.encode();
        assert_eq!(r[16], 0);
        r[20] = 0xff; // padding is ignored
        assert_eq!(Header::decode(&r).unwrap().opcode, Opcode::Read);
    }

    #[test]
    fn bad_opcodes_are_protocol_errors() {
        for op in [2u8, 0x7f, 0x82, 0xff] {
            let mut b = [0u8; HEADER_LEN];
            b[16] = op;
            assert!(matches!(Header::decode(&b), Err(Error::Protocol(_))), "{op:#x}");
        }
    }

    #[test]
    fn status_words() {
        assert_eq!(encode_status(0), 0x4D43_5456_0000_0000u64.to_le_bytes());
        assert_eq!(decode_status(encode_status(STATUS_REJECTED)).unwrap(), 1);
        assert!(matches!(decode_status([0; 8]), Err(Error::Protocol(_))));
        assert!(matches!(decode_status(*b"HTTP/1.1"), Err(Error::Protocol(_))));
    }
}
