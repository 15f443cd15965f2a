//! [`CxlError`]: what can go wrong opening, mapping or sharing the CXL region, and how it maps onto
//! [`mooncake_core::Error`].

use std::path::PathBuf;
use std::sync::Arc;

use mooncake_core::Error;

/// Why the CXL region cannot be used, naming the path and what is wrong with it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CxlError {
    /// Neither `MC_CXL_DEV_PATH` nor upstream's `CXL_DEV_PATH` is set.
    #[error(
        "no CXL device configured: set MC_CXL_DEV_PATH (or CXL_DEV_PATH) to a DAX device such as /dev/dax0.0, or to a \
         file for a file-backed region"
    )]
    NotConfigured,
    /// An environment variable or option has a value that cannot be used.
    #[error("{name}={value:?}: {reason}")]
    BadValue {
        /// The variable (or option) name.
        name: String,
        /// What it was set to.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured path does not exist.
    #[error("CXL device {path}: no such file or device")]
    PathMissing {
        /// The configured path.
        path: PathBuf,
    },
    /// This process may not open the path for reading and writing.
    #[error("CXL device {path}: permission denied ({reason}); the region is mapped read-write")]
    PermissionDenied {
        /// The configured path.
        path: PathBuf,
        /// The operating system's message.
        reason: String,
    },
    /// The path exists but is nothing that can be mapped as shared memory (a directory, /dev/null, a FIFO).
    #[error("CXL device {path} cannot be mapped: {reason}")]
    NotMappable {
        /// The configured path.
        path: PathBuf,
        /// What it is, or what mmap said.
        reason: String,
    },
    /// The region's size is not configured and cannot be found out.
    #[error("CXL device {path}: size unknown ({reason}); set MC_CXL_DEV_SIZE (or CXL_DEV_SIZE) in bytes")]
    SizeUnknown {
        /// The configured path.
        path: PathBuf,
        /// Why it could not be read.
        reason: String,
    },
    /// The device or file is smaller than the region it should hold.
    #[error("CXL device {path} holds {have} bytes but {need} are needed ({what})")]
    TooSmall {
        /// The configured path.
        path: PathBuf,
        /// Bytes available.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// What needs them.
        what: String,
    },
    /// The region starts with bytes that are not a mooncake-rs region header (garbage, or another program's data):
    /// it is never reused silently.
    #[error(
        "CXL device {path} does not start with a mooncake-rs region header ({found}); refusing to reuse it. If nothing \
         else uses the device, set MC_CXL_FORMAT=1 once to initialize it (its contents are lost)"
    )]
    ForeignHeader {
        /// The configured path.
        path: PathBuf,
        /// What was found instead.
        found: String,
    },
    /// The region's header was written by a process with another layout (size, granularity, table sizes) or
    /// version than this one asks for.
    #[error(
        "CXL device {path}: its region header has {field} = {found}, this process expects {expected}; every process \
         sharing the device must use the same settings"
    )]
    HeaderMismatch {
        /// The configured path.
        path: PathBuf,
        /// The header field that differs.
        field: &'static str,
        /// The header's value.
        found: String,
        /// This process's value.
        expected: String,
    },
    /// The header has our magic but its contents are inconsistent (torn write, corruption).
    #[error("CXL device {path}: region header is corrupt: {reason}")]
    CorruptHeader {
        /// The configured path.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },
    /// The region lock stayed held by another process for longer than the lock timeout.
    #[error(
        "CXL device {path}: the region lock is held by {holder} for more than {waited_ms} ms (a process on another \
         host that died while holding it leaves it held; see docs/cxl.md)"
    )]
    LockTimeout {
        /// The configured path.
        path: PathBuf,
        /// Who holds it (`host <tag> pid <pid>`).
        holder: String,
        /// How long we waited.
        waited_ms: u64,
    },
    /// A table of the region header has no free slot.
    #[error(
        "CXL region {path}: the {table} table is full ({slots} slots); a larger table needs a region initialized \
         with it (MC_CXL_MAX_* are fixed when the region is first used)"
    )]
    TableFull {
        /// The configured path.
        path: PathBuf,
        /// `owner`, `publication` or `allocation`.
        table: &'static str,
        /// Its number of slots.
        slots: u32,
    },
    /// A system call on the device failed.
    #[error("CXL device {path}: {op}: {source}")]
    Io {
        /// The configured path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl CxlError {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: std::io::Error) -> Self {
        CxlError::Io { path: path.to_path_buf(), op, source: Arc::new(source) }
    }
}

impl From<CxlError> for Error {
    fn from(e: CxlError) -> Self {
        match e {
            CxlError::BadValue { .. } => Error::InvalidArgument(e.to_string()),
            CxlError::TableFull { .. } => Error::NoSpace(e.to_string()),
            CxlError::Io { ref source, .. } => Error::Io(Arc::new(std::io::Error::new(source.kind(), e.to_string()))),
            _ => Error::unavailable(e.to_string()),
        }
    }
}
