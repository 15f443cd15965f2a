//! The handshake frame of docs/wire-formats.md section 3: `u64` little-endian length, `u8` type, JSON.
//!
//! The length counts the type byte and the JSON bytes. A payload whose first byte is not a known
//! type (`0..=3`; in practice `{`) is a legacy frame from before typed frames existed: the whole
//! payload is JSON and the frame means "connection". Legacy frames are answered with legacy frames.
//!
//! Lengths are checked before anything is allocated: zero and anything above the configured
//! maximum ([`DEFAULT_MAX_FRAME_LENGTH`], `MC_HANDSHAKE_MAX_LENGTH`) are rejected, which also turns
//! away stray HTTP or TLS clients (their first eight bytes read as a huge length).

use mooncake_core::{Error, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 8;

/// Largest frame accepted unless `MC_HANDSHAKE_MAX_LENGTH` says otherwise (1 MiB, as upstream).
pub const DEFAULT_MAX_FRAME_LENGTH: u64 = 1 << 20;

/// What a frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameType {
    /// Type 0: transport handshake (e.g. RDMA queue-pair exchange).
    Connection,
    /// Type 1: "send me your segment descriptor".
    Metadata,
    /// Type 2: a notification `{"name","notify_msg"}`.
    Notify,
    /// Type 3: liveness probe.
    Probe,
    /// No type byte (first payload byte > 3): an old peer's connection handshake.
    Legacy,
}

impl FrameType {
    /// The type byte on the wire; `None` for [`FrameType::Legacy`], which has none.
    pub fn byte(self) -> Option<u8> {
        match self {
            FrameType::Connection => Some(0),
            FrameType::Metadata => Some(1),
            FrameType::Notify => Some(2),
            FrameType::Probe => Some(3),
            FrameType::Legacy => None,
        }
    }

    /// The type for a type byte, `None` when the byte is not a known type (a legacy frame).
    pub fn from_byte(b: u8) -> Option<FrameType> {
        match b {
            0 => Some(FrameType::Connection),
            1 => Some(FrameType::Metadata),
            2 => Some(FrameType::Notify),
            3 => Some(FrameType::Probe),
            _ => None,
        }
    }

    /// True for the two spellings of a transport handshake (type 0 and legacy).
    pub fn is_connection(self) -> bool {
        matches!(self, FrameType::Connection | FrameType::Legacy)
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the frame asks for.
    pub frame_type: FrameType,
    /// The JSON bytes, exactly as sent (upstream ends them with a newline).
    pub json: Vec<u8>,
}

impl Frame {
    /// A frame of `frame_type` carrying `json`.
    pub fn new(frame_type: FrameType, json: impl Into<Vec<u8>>) -> Self {
        Frame { frame_type, json: json.into() }
    }

    /// The wire bytes: length, type byte (absent for legacy frames), JSON.
    pub fn encode(&self) -> Vec<u8> {
        let type_len = usize::from(self.frame_type.byte().is_some());
        let len = (self.json.len() + type_len) as u64;
        let mut out = Vec::with_capacity(LENGTH_PREFIX_LEN + type_len + self.json.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend(self.frame_type.byte());
        out.extend_from_slice(&self.json);
        out
    }

    /// Splits a received payload (the `length` bytes after the prefix) into type and JSON.
    pub fn from_payload(mut payload: Vec<u8>) -> Result<Frame> {
        let Some(&first) = payload.first() else {
            return Err(Error::Protocol("empty handshake frame".into()));
        };
        match FrameType::from_byte(first) {
            Some(frame_type) => {
                payload.remove(0);
                Ok(Frame { frame_type, json: payload })
            }
            None => Ok(Frame { frame_type: FrameType::Legacy, json: payload }),
        }
    }

    /// Decodes one frame from the start of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; `Ok(Some((frame, used)))` gives the frame and the
    /// bytes it took. A bad length is an error as soon as the prefix is complete, so a caller
    /// never waits for (or allocates) an oversized payload.
    pub fn decode(buf: &[u8], max_len: u64) -> Result<Option<(Frame, usize)>> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_LEN) else { return Ok(None) };
        let mut raw = [0u8; LENGTH_PREFIX_LEN];
        raw.copy_from_slice(prefix);
        let len = check_length(u64::from_le_bytes(raw), max_len)?;
        let Some(payload) = buf.get(LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len) else { return Ok(None) };
        Ok(Some((Frame::from_payload(payload.to_vec())?, LENGTH_PREFIX_LEN + len)))
    }

    /// The JSON parsed as a value (a trailing newline or other whitespace is fine).
    pub fn parse_json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.json)
            .map_err(|e| Error::MalformedJson(format!("{:?} frame of {} bytes: {e}", self.frame_type, self.json.len())))
    }
}

/// Checks a frame length from the wire: non-zero and at most `max_len`. Returns it as `usize`.
pub fn check_length(len: u64, max_len: u64) -> Result<usize> {
    if len == 0 {
        return Err(Error::Protocol("zero-length handshake frame".into()));
    }
    if len > max_len {
        return Err(Error::Protocol(format!(
            "handshake frame length {len} exceeds the limit of {max_len} bytes (MC_HANDSHAKE_MAX_LENGTH); \
             not a Mooncake peer?"
        )));
    }
    usize::try_from(len).map_err(|_| Error::Protocol(format!("handshake frame length {len} does not fit in memory")))
}

/// Reads one frame. `Ok(None)` when the stream ends before its first byte (a peer that connected
/// and left). A stream that ends inside a frame gives [`Error::RemoteDisconnected`] naming `peer`.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max_len: u64, peer: &str) -> Result<Option<Frame>> {
    let mut prefix = [0u8; LENGTH_PREFIX_LEN];
    let mut got = 0;
    while got < LENGTH_PREFIX_LEN {
        let n = reader.read(&mut prefix[got..]).await.map_err(|e| io_error(peer, e))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::disconnected(
                peer,
                format!("connection closed after {got} of {LENGTH_PREFIX_LEN} length bytes"),
            ));
        }
        got += n;
    }
    let len = check_length(u64::from_le_bytes(prefix), max_len)?;
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = reader.read(&mut payload[got..]).await.map_err(|e| io_error(peer, e))?;
        if n == 0 {
            return Err(Error::disconnected(peer, format!("connection closed after {got} of {len} frame bytes")));
        }
        got += n;
    }
    Frame::from_payload(payload).map(Some)
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame, peer: &str) -> Result<()> {
    writer.write_all(&frame.encode()).await.map_err(|e| io_error(peer, e))?;
    writer.flush().await.map_err(|e| io_error(peer, e))
}

/// Maps a socket error on an established connection: the peer went away.
pub(crate) fn io_error(peer: &str, e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected | ConnectionRefused => {
            Error::disconnected(peer, e)
        }
        _ => Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = DEFAULT_MAX_FRAME_LENGTH;

    #[test]
    fn typed_round_trip() {
        for t in [FrameType::Connection, FrameType::Metadata, FrameType::Notify, FrameType::Probe] {
            let f = Frame::new(t, b"{\"a\":1}\n".to_vec());
            let wire = f.encode();
            assert_eq!(u64::from_le_bytes(wire[..8].try_into().unwrap()), 1 + 8);
            assert_eq!(wire[8], t.byte().unwrap());
            let (back, used) = Frame::decode(&wire, MAX).unwrap().unwrap();
            assert_eq!(back, f);
            assert_eq!(used, wire.len());
        }
    }

    #[test]
    fn exact_bytes_of_a_probe() {
        let wire = Frame::new(FrameType::Probe, b"{}".to_vec()).encode();
        assert_eq!(wire, [3, 0, 0, 0, 0, 0, 0, 0, 3, b'{', b'}']);
    }

    #[test]
    fn legacy_frame_is_a_connection() {
        let json = b"{\"name\":\"segment\"}";
        let mut wire = (json.len() as u64).to_le_bytes().to_vec();
        wire.extend_from_slice(json);
        let (f, used) = Frame::decode(&wire, MAX).unwrap().unwrap();
        assert_eq!(f.frame_type, FrameType::Legacy);
        assert!(f.frame_type.is_connection());
        assert_eq!(f.json, json);
        assert_eq!(used, wire.len());
        // A legacy frame re-encodes without a type byte.
        assert_eq!(f.encode(), wire);
    }

    #[test]
    fn zero_length_rejected() {
        let wire = 0u64.to_le_bytes();
        assert!(matches!(Frame::decode(&wire, MAX), Err(Error::Protocol(_))));
        assert!(matches!(check_length(0, MAX), Err(Error::Protocol(_))));
    }

    #[test]
    fn oversized_length_rejected_before_payload() {
        // Only the 8-byte prefix is present: an oversized length must fail now, not ask for more.
        let wire = (1u64 << 40).to_le_bytes();
        assert!(matches!(Frame::decode(&wire, MAX), Err(Error::Protocol(_))));
        assert!(check_length(MAX, MAX).is_ok());
        assert!(check_length(MAX + 1, MAX).is_err());
        assert!(check_length(u64::MAX, MAX).is_err());
    }

    #[tokio::test]
    async fn oversized_length_rejected_by_reader_without_allocating() {
        // The reader sees only the prefix; if it tried to allocate 1 TiB the test would abort.
        let wire = (1u64 << 40).to_le_bytes();
        let mut r = &wire[..];
        assert!(matches!(read_frame(&mut r, MAX, "t").await, Err(Error::Protocol(_))));
    }

    #[test]
    fn http_request_rejected() {
        let wire = b"GET / HTTP/1.1\r\n\r\n";
        assert!(matches!(Frame::decode(wire, MAX), Err(Error::Protocol(_))));
    }

    #[test]
    fn incomplete_needs_more() {
        let wire = Frame::new(FrameType::Metadata, b"{}".to_vec()).encode();
        for cut in 0..wire.len() {
            assert!(Frame::decode(&wire[..cut], MAX).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn trailing_newline_accepted() {
        for json in [&b"{\"status\":\"success\"}"[..], b"{\"status\":\"success\"}\n", b"{\"status\":\"success\"}\r\n"] {
            let v = Frame::new(FrameType::Probe, json.to_vec()).parse_json().unwrap();
            assert_eq!(v["status"], "success");
        }
        assert!(matches!(Frame::new(FrameType::Probe, b"{\"a\":".to_vec()).parse_json(), Err(Error::MalformedJson(_))));
    }

    #[test]
    fn type_byte_only_is_empty_json() {
        let wire = [1u8, 0, 0, 0, 0, 0, 0, 0, 1];
        let (f, _) = Frame::decode(&wire, MAX).unwrap().unwrap();
        assert_eq!(f.frame_type, FrameType::Metadata);
        assert!(f.json.is_empty());
        assert!(f.parse_json().is_err());
    }

    #[tokio::test]
    async fn reader_reports_clean_close_and_truncation() {
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty, MAX, "t").await.unwrap().is_none());
        let wire = Frame::new(FrameType::Notify, b"{\"name\":\"a\"}".to_vec()).encode();
        let mut half = &wire[..wire.len() / 2];
        assert!(matches!(read_frame(&mut half, MAX, "t").await, Err(Error::RemoteDisconnected { .. })));
        let mut short_prefix = &wire[..3];
        assert!(matches!(read_frame(&mut short_prefix, MAX, "t").await, Err(Error::RemoteDisconnected { .. })));
        let mut full = &wire[..];
        let f = read_frame(&mut full, MAX, "t").await.unwrap().unwrap();
        assert_eq!(f.frame_type, FrameType::Notify);
    }
}
