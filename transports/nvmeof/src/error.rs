//! Typed errors of file I/O: which file, what went wrong, and the OS error behind it.
//!
//! They reach callers as core's [`Error::Io`] (so every engine API carries them) whose `io::Error` has the
//! matching [`std::io::ErrorKind`] and wraps a [`FileError`]; [`file_error`] gets it back.

use std::path::PathBuf;
use std::sync::Arc;

use mooncake_core::Error;

/// What went wrong with a segment's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileErrorKind {
    /// The path does not exist on this host (`ENOENT`): not mounted here, or removed.
    NotFound,
    /// This process may not open the file (`EACCES`, `EPERM`).
    PermissionDenied,
    /// A write to a file this process can only read (its mode, an immutable file, a read-only mount).
    ReadOnly,
    /// The file ends before the segment's published length says (a short read): published too long, or
    /// truncated underneath.
    ShortFile,
    /// The file was removed (unlinked) after it was opened: its path no longer names it.
    Removed,
    /// The device failed the I/O (`EIO` and friends).
    Device,
    /// Any other OS error.
    Other,
}

/// A failed operation on one file of a file segment.
#[derive(Debug, Clone)]
pub struct FileError {
    /// The file, as this host resolved it.
    pub path: PathBuf,
    /// What happened.
    pub kind: FileErrorKind,
    /// The operation and where (`read of 4096 bytes at offset 8192`), and the OS's word.
    pub detail: String,
    /// The OS error number, when there is one.
    pub errno: Option<i32>,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.kind {
            FileErrorKind::NotFound => "does not exist on this host",
            FileErrorKind::PermissionDenied => "permission denied",
            FileErrorKind::ReadOnly => "is read-only here",
            FileErrorKind::ShortFile => "is shorter than the segment's published length",
            FileErrorKind::Removed => "was removed",
            FileErrorKind::Device => "device I/O error",
            FileErrorKind::Other => "I/O error",
        };
        write!(f, "file {}: {what}: {}", self.path.display(), self.detail)
    }
}

impl std::error::Error for FileError {}

impl FileError {
    /// A new error.
    pub fn new(path: impl Into<PathBuf>, kind: FileErrorKind, detail: impl Into<String>) -> Self {
        FileError { path: path.into(), kind, detail: detail.into(), errno: None }
    }

    /// The error for OS error `errno` during `what`.
    pub fn os(path: impl Into<PathBuf>, errno: i32, what: &str) -> Self {
        let kind = match errno {
            libc::ENOENT | libc::ENOTDIR => FileErrorKind::NotFound,
            libc::EACCES | libc::EPERM => FileErrorKind::PermissionDenied,
            libc::EROFS | libc::ETXTBSY => FileErrorKind::ReadOnly,
            libc::EIO | libc::ENXIO | libc::ENODEV | libc::EREMOTEIO | libc::ENODATA | libc::ETIMEDOUT => {
                FileErrorKind::Device
            }
            _ => FileErrorKind::Other,
        };
        let os = std::io::Error::from_raw_os_error(errno);
        FileError { errno: Some(errno), ..FileError::new(path, kind, format!("{what}: {os}")) }
    }

    /// As core's error.
    pub fn into_error(self) -> Error {
        use std::io::ErrorKind as K;
        let kind = match self.kind {
            FileErrorKind::NotFound | FileErrorKind::Removed => K::NotFound,
            FileErrorKind::PermissionDenied => K::PermissionDenied,
            FileErrorKind::ReadOnly => K::ReadOnlyFilesystem,
            FileErrorKind::ShortFile => K::UnexpectedEof,
            FileErrorKind::Device | FileErrorKind::Other => K::Other,
        };
        Error::Io(Arc::new(std::io::Error::new(kind, self)))
    }
}

/// The [`FileError`] inside an engine error, if it is one.
pub fn file_error(e: &Error) -> Option<&FileError> {
    match e {
        Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<FileError>()),
        _ => None,
    }
}
