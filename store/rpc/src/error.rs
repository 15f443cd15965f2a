//! The crate's error type.

use std::time::Duration;

use crate::ServiceId;

/// Why an RPC (or binding a server) failed.
///
/// Whether the server may have run the request matters for retries; [`RpcError::may_have_executed`] answers it:
/// - definitely not executed: `ConnectFailed`, `Handshake`, `VersionMismatch`, `Rejected`, `FrameTooLarge`,
///   `Encode` (and `Bind`, which is not a call);
/// - may have executed: `Timeout`, `Disconnected`, `Remote`;
/// - executed: `Decode` (the server answered, we could not read the answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// The TCP connection to `addr` could not be made within the connect timeout; `reason` is the OS error text
    /// (e.g. "Connection refused (os error 111)") or the timeout. Not executed: start the server or fix the address.
    #[error("cannot connect to {addr}: {reason}")]
    ConnectFailed {
        /// Address as given to the client.
        addr: String,
        /// OS error text or timeout description.
        reason: String,
    },
    /// TCP connected but the peer did not complete the RPC handshake within the connect timeout: it is not a
    /// mooncake RPC server (wrong port?), or it closed the connection. Not executed.
    #[error("RPC handshake with {addr} failed: {reason} (is this a mooncake RPC port?)")]
    Handshake {
        /// Address as given to the client.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The server serves another service name or version than the client speaks. Not executed: upgrade one side.
    #[error("service mismatch: this client speaks {ours}, the server at the other end serves {theirs}")]
    VersionMismatch {
        /// What this client asked for.
        ours: ServiceId,
        /// What the server serves.
        theirs: ServiceId,
    },
    /// The server refused the connection for the given reason (e.g. an unsupported wire version). Not executed.
    #[error("server refused the connection: {0}")]
    Rejected(String),
    /// A frame of `len` bytes exceeds the limit of `max` bytes (ours or the server's, whichever is smaller).
    /// Detected before sending: not executed, and the connection stays up. Raise `max_frame` or split the request.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Encoded frame size (header included).
        len: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// The request could not be serialized. Not executed.
    #[error("cannot encode the request: {0}")]
    Encode(String),
    /// No reply within the call's timeout; a late reply is dropped. The request may have executed.
    #[error("no reply within {after:?}")]
    Timeout {
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection broke (or was closed) while the call was in flight. The request may have executed.
    /// The next call reconnects.
    #[error("connection lost: {reason}")]
    Disconnected {
        /// What closed it.
        reason: String,
    },
    /// The server replied but the reply does not decode as the response type (client and server disagree on
    /// the schema). The request executed.
    #[error("cannot decode the reply: {0}")]
    Decode(String),
    /// The server answered with an RPC-level error instead of a response: it could not decode the request, the
    /// handler panicked, or the response exceeded a frame limit. The request may have executed.
    #[error("server failed the request: {0}")]
    Remote(String),
    /// The server could not listen on `addr`.
    #[error("cannot bind {addr}: {reason}")]
    Bind {
        /// Address as given to the server.
        addr: String,
        /// OS error text.
        reason: String,
    },
}

impl RpcError {
    /// Whether the server may have executed the request (true for `Timeout`, `Disconnected`, `Remote` and
    /// `Decode`); `false` means it certainly did not, so a retry is safe even for non-idempotent requests.
    pub fn may_have_executed(&self) -> bool {
        matches!(
            self,
            RpcError::Timeout { .. } | RpcError::Disconnected { .. } | RpcError::Remote(_) | RpcError::Decode(_)
        )
    }
}
