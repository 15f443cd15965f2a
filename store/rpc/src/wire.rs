//! Frame layout shared by the client and the server (see the crate docs for the picture).

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec, LengthDelimitedCodecError};
use tokio_util::sync::CancellationToken;

use crate::{RpcError, ServiceId};

/// Bytes before the postcard body of a message frame: request id (u64 BE) and kind (u8).
pub(crate) const HEADER_LEN: usize = 9;
/// First bytes of both hello frames; anything else is not a mooncake RPC peer.
pub(crate) const MAGIC: [u8; 6] = *b"MCRPC\0";
/// Version of the framing itself (not of the service on top of it).
pub(crate) const WIRE_VERSION: u16 = 1;
const HELLO_PREFIX_LEN: usize = MAGIC.len() + 2;

/// What a message frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Client to server: postcard `Req`.
    Request = 0,
    /// Server to client: postcard `Resp`.
    Response = 1,
    /// Server to client: postcard `String`, the request failed inside the RPC layer.
    Error = 2,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            0 => Some(Kind::Request),
            1 => Some(Kind::Response),
            2 => Some(Kind::Error),
            _ => None,
        }
    }
}

/// A decoded message frame; `body` is still postcard.
#[derive(Debug)]
pub(crate) struct Frame {
    pub id: u64,
    pub kind: Kind,
    pub body: Bytes,
}

/// The client's first frame.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Hello {
    pub service: ServiceId,
    /// Largest frame the client accepts, so the server can refuse oversized responses per call.
    pub max_frame: u32,
}

/// The server's answer to [`Hello`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum HelloReply {
    /// Go ahead; requests larger than `max_frame` would close the connection.
    Accept { max_frame: u32 },
    /// The server serves another service name or version.
    Mismatch { theirs: ServiceId },
    /// Refused for another reason (e.g. wire version, malformed hello).
    Reject { reason: String },
}

/// Why a hello frame could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HelloError {
    /// Wrong magic: the peer does not speak this protocol at all.
    NotRpc,
    /// Right magic, unsupported framing version.
    WireVersion(u16),
    /// Right magic and version, undecodable body.
    Body(String),
}

/// The length-delimited codec (u32 big-endian length prefix) with the given frame limit.
fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_type::<u32>().max_frame_length(max_frame).new_codec()
}

/// Initial read buffer and write batch size per connection: big enough that many small messages (or 16 in-flight
/// 4 KiB ones) move in few system calls; 4x the 8 KiB default gave 1.6x the throughput with 4 KiB messages.
const IO_BUFFER: usize = 32 << 10;

/// Frames both directions of a connection.
pub(crate) fn framed<R, W>(
    read_half: R,
    write_half: W,
    max_frame: usize,
) -> (FramedRead<R, LengthDelimitedCodec>, FramedWrite<W, LengthDelimitedCodec>) {
    let reader = FramedRead::with_capacity(read_half, codec(max_frame), IO_BUFFER);
    let mut writer = FramedWrite::new(write_half, codec(max_frame));
    writer.set_backpressure_boundary(IO_BUFFER);
    (reader, writer)
}

/// A frame limit as sent in the hello.
/// The next frame of `reader`, polled without sleeping for up to `spin` first while `keep_polling()`
/// holds (yielding to the runtime between polls, which keeps polling the socket), then awaited.
///
/// A thread that sleeps in epoll is woken by the kernel when a frame arrives; on virtual machines that
/// wake-up of an idle vCPU costs tens of microseconds each way (measured here: 118 us per round trip
/// across vCPUs against 12-15 us on one). Polling briefly where a frame is expected soon avoids it.
pub(crate) async fn next_frame<R>(
    reader: &mut FramedRead<R, LengthDelimitedCodec>,
    spin: std::time::Duration,
    keep_polling: impl Fn() -> bool,
) -> Option<io::Result<BytesMut>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    if !spin.is_zero() && keep_polling() {
        let until = std::time::Instant::now() + spin;
        loop {
            if let Some(item) = reader.next().now_or_never() {
                return item;
            }
            if std::time::Instant::now() >= until || !keep_polling() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    reader.next().await
}

pub(crate) fn max_frame_on_wire(max_frame: usize) -> u32 {
    u32::try_from(max_frame).unwrap_or(u32::MAX)
}

/// Encodes header + postcard body; fails with `FrameTooLarge` when the frame exceeds `max_frame`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    kind: Kind,
    id: u64,
    body: &T,
    max_frame: usize,
) -> Result<Bytes, RpcError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&id.to_be_bytes());
    buf.push(kind as u8);
    let buf = postcard::to_extend(body, buf).map_err(|e| RpcError::Encode(e.to_string()))?;
    check_len(buf.len(), max_frame)?;
    Ok(Bytes::from(buf))
}

/// Fails with `FrameTooLarge` when a frame of `len` bytes exceeds `max_frame`.
pub(crate) fn check_len(len: usize, max_frame: usize) -> Result<(), RpcError> {
    if len > max_frame { Err(RpcError::FrameTooLarge { len, max: max_frame }) } else { Ok(()) }
}

/// An error-response frame carrying `message`.
pub(crate) fn encode_error(id: u64, message: &str) -> Bytes {
    let mut buf = Vec::with_capacity(HEADER_LEN + message.len() + 5);
    buf.extend_from_slice(&id.to_be_bytes());
    buf.push(Kind::Error as u8);
    // Serializing a `str` into a Vec cannot fail; fall back to an empty body rather than panic.
    let header = buf.clone();
    Bytes::from(postcard::to_extend(message, buf).unwrap_or(header))
}

/// Splits a received frame into header and body.
pub(crate) fn decode(frame: BytesMut) -> Result<Frame, String> {
    let (id, kind, _) = split(&frame)?;
    let mut body = frame.freeze();
    body.advance(HEADER_LEN);
    Ok(Frame { id, kind, body })
}

/// The request id, kind and body of a received frame, borrowed.
pub(crate) fn split(frame: &[u8]) -> Result<(u64, Kind, &[u8]), String> {
    if frame.len() < HEADER_LEN {
        return Err(format!("frame of {} bytes is shorter than the {HEADER_LEN}-byte header", frame.len()));
    }
    let (header, body) = frame.split_at(HEADER_LEN);
    let id = u64::from_be_bytes(header[..8].try_into().map_err(|_| "short header".to_string())?);
    let kind = Kind::from_byte(header[8]).ok_or_else(|| format!("unknown frame kind {}", header[8]))?;
    Ok((id, kind, body))
}

/// Decodes a postcard body that must be consumed exactly (trailing bytes mean the two sides disagree on the type).
pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    match postcard::take_from_bytes(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} unexpected trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// Encodes a hello or hello reply: magic, wire version, postcard body.
pub(crate) fn encode_hello<T: Serialize>(message: &T) -> Bytes {
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    let prefix = buf.clone();
    // Our hello types always serialize; an empty body would be rejected by the peer, never panic.
    Bytes::from(postcard::to_extend(message, buf).unwrap_or(prefix))
}

/// Decodes a hello or hello reply.
pub(crate) fn decode_hello<T: DeserializeOwned>(frame: &[u8]) -> Result<T, HelloError> {
    if frame.len() < HELLO_PREFIX_LEN || frame[..MAGIC.len()] != MAGIC {
        return Err(HelloError::NotRpc);
    }
    let version = u16::from_be_bytes([frame[MAGIC.len()], frame[MAGIC.len() + 1]]);
    if version != WIRE_VERSION {
        return Err(HelloError::WireVersion(version));
    }
    decode_body(&frame[HELLO_PREFIX_LEN..]).map_err(HelloError::Body)
}

/// The server's hello reply read by a client: `Ok` holds the reply, `Err` why the frame is not one (for a
/// `Handshake` error).
pub(crate) fn read_hello_reply(frame: &[u8]) -> Result<HelloReply, String> {
    decode_hello::<HelloReply>(frame).map_err(|e| match e {
        HelloError::NotRpc => "the reply is not a mooncake RPC hello".to_string(),
        HelloError::WireVersion(v) => format!("the server speaks wire version {v}, we speak {WIRE_VERSION}"),
        HelloError::Body(e) => format!("malformed hello reply: {e}"),
    })
}

/// The server's frame limit from its hello reply, or why this client cannot use the connection.
pub(crate) fn accepted_limit(reply: HelloReply, ours: &ServiceId) -> Result<u32, RpcError> {
    match reply {
        HelloReply::Accept { max_frame } => Ok(max_frame),
        HelloReply::Mismatch { theirs } => Err(RpcError::VersionMismatch { ours: ours.clone(), theirs }),
        HelloReply::Reject { reason } => Err(RpcError::Rejected(reason)),
    }
}

/// Human-readable reason for a failed frame read.
pub(crate) fn describe_read_error(error: &io::Error, max_frame: usize) -> String {
    let too_big = error.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
    if too_big {
        format!("peer sent a length prefix above the {max_frame}-byte frame limit (oversized or garbage frame)")
    } else {
        format!("read failed: {error}")
    }
}

/// Writes queued frames, batching whatever is queued into one flush. Returns when every sender is gone
/// (after flushing and shutting down the write side), on a write error, or when `token` is cancelled.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut sink: FramedWrite<W, LengthDelimitedCodec>,
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    token: CancellationToken,
) -> io::Result<()> {
    let work = async {
        while let Some(frame) = queue.recv().await {
            sink.feed(frame).await?;
            while let Ok(frame) = queue.try_recv() {
                sink.feed(frame).await?;
            }
            SinkExt::<Bytes>::flush(&mut sink).await?;
        }
        SinkExt::<Bytes>::close(&mut sink).await
    };
    token.run_until_cancelled(work).await.unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let bytes = encode(Kind::Response, 0xdead_beef_0000_0001, &("hi", 7u32), 1024).expect("encode");
        let frame = decode(BytesMut::from(&bytes[..])).expect("decode");
        assert_eq!(frame.id, 0xdead_beef_0000_0001);
        assert_eq!(frame.kind, Kind::Response);
        let body: (String, u32) = postcard::from_bytes(&frame.body).expect("body");
        assert_eq!(body, ("hi".to_string(), 7));
    }

    #[test]
    fn error_frame_round_trip() {
        let frame = decode(BytesMut::from(&encode_error(5, "boom")[..])).expect("decode");
        assert_eq!((frame.id, frame.kind), (5, Kind::Error));
        assert_eq!(postcard::from_bytes::<String>(&frame.body).expect("body"), "boom");
    }

    #[test]
    fn oversized_frame_is_refused_locally() {
        let err = encode(Kind::Request, 1, &vec![0u8; 100], 50).expect_err("too large");
        assert!(matches!(err, RpcError::FrameTooLarge { max: 50, .. }), "{err:?}");
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(decode(BytesMut::from(&[1u8, 2, 3][..])).is_err());
        let mut bad_kind = vec![0u8; 8];
        bad_kind.push(9);
        assert!(decode(BytesMut::from(&bad_kind[..])).unwrap_err().contains("unknown frame kind 9"));
    }

    #[test]
    fn hello_round_trip_and_rejections() {
        let hello = Hello { service: ServiceId::new("svc", 3), max_frame: 99 };
        let decoded: Hello = decode_hello(&encode_hello(&hello)).expect("decode");
        assert_eq!(decoded.service, hello.service);
        assert_eq!(decoded.max_frame, 99);

        assert_eq!(decode_hello::<Hello>(b"GET / HTTP/1.1\r\n").unwrap_err(), HelloError::NotRpc);
        assert_eq!(decode_hello::<Hello>(b"MC").unwrap_err(), HelloError::NotRpc);
        let mut future = MAGIC.to_vec();
        future.extend_from_slice(&7u16.to_be_bytes());
        assert_eq!(decode_hello::<Hello>(&future).unwrap_err(), HelloError::WireVersion(7));
        let mut truncated = MAGIC.to_vec();
        truncated.extend_from_slice(&WIRE_VERSION.to_be_bytes());
        assert!(matches!(decode_hello::<Hello>(&truncated), Err(HelloError::Body(_))));
    }
}
