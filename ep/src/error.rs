//! The crate's typed errors.

/// What went wrong in a call of [`crate::EpBuffer`]. Argument errors are found before anything is written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument does not fit the call or the buffer; `arg` names it as upstream's Python API does.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name (`x`, `topk_idx`, `hidden`, `num_experts`, ...).
        arg: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// This rank's buffer is smaller than the call's layout needs (see [`crate::size_hint`]).
    #[error("the EP buffer has {have} bytes but this call needs {needed} (num_ep_buffer_bytes; see size_hint)")]
    BufferTooSmall {
        /// Bytes the call needs.
        needed: u64,
        /// Bytes the buffer has.
        have: u64,
    },
    /// A peer's published buffer is smaller than the call's layout needs.
    #[error("rank {rank}'s EP buffer has {have} bytes but this call needs {needed}")]
    PeerBufferTooSmall {
        /// The peer.
        rank: usize,
        /// Bytes the call needs.
        needed: u64,
        /// Bytes the peer's buffer has.
        have: u64,
    },
    /// `dispatch`/`combine` before `connect`.
    #[error("the EP buffer is not connected: call connect() with every rank's PeerInfo first")]
    NotConnected,
    /// The transfer engine failed (registration, a local transfer setup).
    #[error("transfer engine: {0}")]
    Engine(#[from] mooncake_core::Error),
}

impl Error {
    /// The argument an [`Error::InvalidArgument`] names (`num_ep_buffer_bytes` for a buffer too small).
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            Error::BufferTooSmall { .. } => Some("num_ep_buffer_bytes"),
            _ => None,
        }
    }

    pub(crate) fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, reason: reason.into() }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
