//! Errors of the P2P store, one variant per thing that can go wrong (upstream's `error.go` names in brackets).

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Empty buffer list, a zero length, a zero shard size (`ErrInvalidArgument`).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The catalogue already has a checkpoint of this name; register with `force` to overwrite it.
    #[error("checkpoint {0:?} already exists in the catalogue (register with force to overwrite)")]
    AlreadyExists(String),
    /// This process already holds the checkpoint, as its source or a replica (`ErrPayloadOpened`).
    #[error("checkpoint {0:?} is already registered or replicated by this process")]
    AlreadyOpened(String),
    /// This process holds no copy of the checkpoint (`ErrPayloadNotOpened`).
    #[error("checkpoint {0:?} is not registered or replicated by this process")]
    NotOpened(String),
    /// No checkpoint of this name in the catalogue (`ErrPayloadNotFound`).
    #[error("checkpoint {0:?} not found in the catalogue")]
    NotFound(String),
    /// The caller's buffers do not have the checkpoint's shape.
    #[error("checkpoint {name:?}: {what}")]
    SizeMismatch {
        /// Checkpoint name.
        name: String,
        /// Expected and given sizes.
        what: String,
    },
    /// Every holder of a shard failed (`ErrTooManyRetries`).
    #[error("checkpoint {name:?}: shard {shard} could not be fetched from any of its {holders} holders: {last}")]
    NoHolder {
        /// Checkpoint name.
        name: String,
        /// Shard index.
        shard: usize,
        /// Holders tried.
        holders: usize,
        /// The last holder's error.
        last: String,
    },
    /// Compare-and-swap lost to other writers this many times in a row.
    #[error("checkpoint {name:?}: catalogue update lost to concurrent writers {attempts} times")]
    CasConflict {
        /// Checkpoint name.
        name: String,
        /// Attempts made.
        attempts: u32,
    },
    /// etcd could not be reached or refused a request.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A catalogue value that is not a checkpoint's JSON.
    #[error("catalogue: {0}")]
    Catalogue(String),
    /// The transfer engine failed (registration, segment, transfer).
    #[error("transfer engine: {0}")]
    Engine(#[from] mooncake::Error),
}

/// Result of the P2P store.
pub type Result<T> = std::result::Result<T, Error>;
