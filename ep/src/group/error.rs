//! Typed errors of [`crate::group::Group`].

/// What went wrong in a call of [`crate::group::Group`]. Argument errors are found before anything is
/// written; a failed or silent peer is not an error (it is masked in the active ranks).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument does not fit the call; `arg` names it (`data`, `output`, `root`, `send_counts`, ...).
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name.
        arg: &'static str,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// A collective before [`crate::group::Group::connect`].
    #[error("the group is not connected: call connect() with every rank's MemberInfo first")]
    NotConnected,
    /// The root of a rooted collective (broadcast, scatter) is inactive or was lost during the call, so
    /// this rank has no result.
    #[error("root rank {root} is inactive (failed or deactivated); no result")]
    RootInactive {
        /// The root.
        root: usize,
    },
    /// A point-to-point peer is inactive or was lost during the call.
    #[error("peer rank {peer} is inactive (failed or deactivated)")]
    PeerInactive {
        /// The peer.
        peer: usize,
    },
    /// A peer sent a message of another size than this rank expected (the ranks called the collective
    /// with different sizes, or a send/recv pair disagrees); the message was drained, the group stays in
    /// step.
    #[error("rank {peer} sent {sent} bytes where {expected} were expected (sizes differ between ranks)")]
    SizeMismatch {
        /// The peer.
        peer: usize,
        /// Bytes it sent.
        sent: u64,
        /// Bytes this rank expected.
        expected: u64,
    },
    /// A `recv` found the next message from `peer` carrying another tag.
    #[error("recv from rank {peer} expected tag {expected} but the next message has tag {found}")]
    TagMismatch {
        /// The peer.
        peer: usize,
        /// The tag asked for.
        expected: u32,
        /// The tag of the message (it was drained).
        found: u32,
    },
    /// Ranks failed between the two phases of a large all-reduce after sending their contributions but
    /// before sending their reduced part: the parts they owned are missing from this rank's result (the
    /// rest is exact). They are masked now; calling again gives a result over the survivors.
    #[error("ranks {ranks:?} failed in the middle of the call; the parts of the result they reduced are missing")]
    Incomplete {
        /// The ranks.
        ranks: Vec<usize>,
    },
    /// The transfer engine failed (registration, a local write).
    #[error("transfer engine: {0}")]
    Engine(#[from] mooncake_core::Error),
}

impl Error {
    /// The argument an [`Error::InvalidArgument`] names.
    pub fn arg(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { arg, .. } => Some(arg),
            _ => None,
        }
    }

    pub(crate) fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument { arg, reason: reason.into() }
    }
}

/// The result type of [`crate::group`].
pub type Result<T> = std::result::Result<T, Error>;
