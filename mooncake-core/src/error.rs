//! The one error type of the core and of every backend written against it.

use std::sync::Arc;

/// Result alias used across mooncake-rs.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine, a transport, a device or a metadata store.
///
/// Variants are typed so callers can act on them; the upstream integer codes of docs/wire-formats.md section 6
/// are produced only at the Python/C boundary through [`Error::code`].
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is malformed or out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A batch was given more requests than the capacity it was allocated with.
    #[error("too many requests: batch capacity is {capacity}, {requested} requests submitted in total")]
    TooManyRequests {
        /// Capacity given at allocation.
        capacity: usize,
        /// Total number of requests that would be in the batch.
        requested: usize,
    },
    /// A local or remote address range does not lie inside one registered buffer.
    #[error("address range [{addr:#x}, +{len}) is not inside a registered buffer{}", context_suffix(.context))]
    AddressNotRegistered {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// Where it was checked (e.g. "local", "remote segment 10.0.0.1:15123").
        context: String,
    },
    /// The remote peer refused the access (its registered buffers do not cover the range).
    #[error("peer {peer} rejected access to [{addr:#x}, +{len})")]
    RemoteRejected {
        /// Peer segment name.
        peer: String,
        /// Start of the remote range.
        addr: u64,
        /// Length of the remote range.
        len: u64,
    },
    /// A batch cannot be freed while requests are still in flight.
    #[error("batch {0} still has requests in flight")]
    BatchBusy(u64),
    /// The batch id is unknown (never allocated or already freed).
    #[error("unknown batch id {0}")]
    UnknownBatch(u64),
    /// A memory location or device name is not known on this machine.
    #[error("device not found: {0}")]
    DeviceNotFound(String),
    /// A registration overlaps an existing one.
    #[error("address range [{addr:#x}, +{len}) overlaps registered buffer [{existing_addr:#x}, +{existing_len})")]
    AddressOverlapped {
        /// Start of the new range.
        addr: u64,
        /// Length of the new range.
        len: u64,
        /// Start of the existing registration.
        existing_addr: u64,
        /// Length of the existing registration.
        existing_len: u64,
    },
    /// The remote peer went away (connection refused, reset or closed mid-transfer).
    #[error("peer {peer} disconnected: {reason}")]
    RemoteDisconnected {
        /// Peer segment name or address.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// A peer sent bytes that do not follow the wire protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An operation did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The request was canceled before it completed.
    #[error("canceled")]
    Canceled,
    /// The backend does not support this operation.
    #[error("{op} is not supported by {backend}")]
    Unsupported {
        /// Operation name.
        op: String,
        /// Backend name.
        backend: String,
    },
    /// The backend, service or device cannot be used right now; `reason` says what to do.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What is missing and how to fix it.
        reason: String,
    },
    /// Out of memory or space.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A key, segment or object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A key, segment or object exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The metadata service failed or returned something unusable.
    #[error("metadata error: {0}")]
    Metadata(String),
    /// A descriptor or message is not valid JSON of the expected shape.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// The engine was used before `init` finished or after shutdown.
    #[error("engine not initialized: {0}")]
    NotInitialized(String),
    /// An operating-system error.
    #[error("I/O error: {0}")]
    Io(#[source] Arc<std::io::Error>),
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() { String::new() } else { format!(" ({context})") }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::MalformedJson(e.to_string())
    }
}

impl Error {
    /// True when the error says the peer cannot be reached at all (it disconnected, is unavailable, timed out
    /// or the socket failed), as opposed to a request it rejected: retrying other requests to it is pointless.
    pub fn is_peer_unreachable(&self) -> bool {
        matches!(self, Error::RemoteDisconnected { .. } | Error::Unavailable { .. } | Error::Timeout(_) | Error::Io(_))
    }

    /// Shorthand for [`Error::Unavailable`].
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Error::Unavailable { reason: reason.into() }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(op: impl Into<String>, backend: impl Into<String>) -> Self {
        Error::Unsupported { op: op.into(), backend: backend.into() }
    }

    /// Shorthand for [`Error::RemoteDisconnected`].
    pub fn disconnected(peer: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::RemoteDisconnected { peer: peer.into(), reason: reason.to_string() }
    }

    /// True when the error means the peer is gone (retrying after a reconnect may help).
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Error::RemoteDisconnected { .. })
    }

    /// The upstream transfer-engine integer code (docs/wire-formats.md section 6) for this error.
    pub fn code(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) | Error::UnknownBatch(_) => -1,
            Error::TooManyRequests { .. } => -2,
            Error::AddressNotRegistered { .. } | Error::RemoteRejected { .. } => -3,
            Error::BatchBusy(_) => -4,
            Error::DeviceNotFound(_) => -6,
            Error::AddressOverlapped { .. } => -7,
            Error::RemoteDisconnected { .. } | Error::Io(_) => -102,
            Error::MalformedJson(_) => -103,
            Error::Protocol(_) => -104,
            Error::Metadata(_) | Error::NotFound(_) | Error::AlreadyExists(_) => -200,
            Error::Unavailable { .. } => -201,
            Error::NotInitialized(_) => -202,
            Error::NoSpace(_) => -302,
            Error::Unsupported { .. } => -303,
            Error::Timeout(_) | Error::Canceled => -301,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_upstream() {
        assert_eq!(Error::InvalidArgument("x".into()).code(), -1);
        assert_eq!(Error::TooManyRequests { capacity: 1, requested: 2 }.code(), -2);
        assert_eq!(Error::BatchBusy(3).code(), -4);
        assert_eq!(Error::AddressOverlapped { addr: 0, len: 1, existing_addr: 0, existing_len: 1 }.code(), -7);
        assert_eq!(Error::unsupported("read", "x").code(), -303);
    }

    #[test]
    fn messages_name_the_range() {
        let e = Error::AddressNotRegistered { addr: 0x1000, len: 16, context: "local".into() };
        assert_eq!(e.to_string(), "address range [0x1000, +16) is not inside a registered buffer (local)");
    }
}
