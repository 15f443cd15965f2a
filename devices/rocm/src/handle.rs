//! The sharing handles this device exports and imports, and their validation.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use mooncake_core::{Error, Result, SharingHandle};

use crate::DEVICE_NAME;
use crate::ffi::HIP_IPC_HANDLE_SIZE;

/// [`SharingHandle::kind`] of a legacy HIP IPC handle: `data` holds the 64 bytes of a `hipIpcMemHandle_t`,
/// `fd` is `None`, `len` the length of the shared allocation.
pub const HIP_IPC_HANDLE_KIND: &str = "hip_ipc";

/// [`SharingHandle::kind`] of a VMM allocation (`hipMemCreate`) exported as a POSIX file descriptor: `fd`
/// holds it (a transport carries it to another process, which obtains its own copy with `pidfd_getfd` or
/// `SCM_RIGHTS`), `data` is empty, `len` the length of the shared allocation.
pub const HIP_POSIX_FD_HANDLE_KIND: &str = "hip_posix_fd";

/// A handle checked by [`parse_handle`].
#[derive(Debug)]
pub(crate) enum ParsedHandle<'a> {
    /// A `hipIpcMemHandle_t`.
    Ipc([u8; HIP_IPC_HANDLE_SIZE]),
    /// A shareable file descriptor.
    PosixFd(&'a Arc<OwnedFd>),
}

/// Checks a handle's kind and shape without importing it: `Unsupported` for a kind this device does not
/// import, `InvalidArgument` for a malformed one (zero length, IPC data that is not 64 bytes, a
/// `hip_posix_fd` handle without its descriptor or with data).
pub fn validate_handle(handle: &SharingHandle) -> Result<()> {
    parse_handle(handle).map(|_| ())
}

pub(crate) fn parse_handle(handle: &SharingHandle) -> Result<ParsedHandle<'_>> {
    let kind = handle.kind.as_str();
    if kind != HIP_IPC_HANDLE_KIND && kind != HIP_POSIX_FD_HANDLE_KIND {
        return Err(Error::unsupported(
            format!("import_handle of kind {kind:?} (expected {HIP_IPC_HANDLE_KIND} or {HIP_POSIX_FD_HANDLE_KIND})"),
            DEVICE_NAME,
        ));
    }
    if handle.len == 0 {
        return Err(Error::InvalidArgument(format!("{kind} handle of zero bytes")));
    }
    if kind == HIP_IPC_HANDLE_KIND {
        let bytes: [u8; HIP_IPC_HANDLE_SIZE] = handle.data.as_slice().try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "{kind} handle carries {} bytes; a hipIpcMemHandle_t has {HIP_IPC_HANDLE_SIZE}",
                handle.data.len()
            ))
        })?;
        return Ok(ParsedHandle::Ipc(bytes));
    }
    if !handle.data.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{kind} handle carries {} data bytes; expected none",
            handle.data.len()
        )));
    }
    let fd = handle.fd.as_ref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{kind} handle carries no file descriptor (the importing side obtains it with pidfd_getfd or SCM_RIGHTS)"
        ))
    })?;
    Ok(ParsedHandle::PosixFd(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(kind: &str, data: Vec<u8>, fd: Option<Arc<OwnedFd>>, len: u64) -> SharingHandle {
        SharingHandle { kind: kind.into(), data, fd, len }
    }

    fn some_fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
    }

    #[test]
    fn ipc_handles_are_64_bytes() {
        let ok = handle(HIP_IPC_HANDLE_KIND, vec![7; 64], None, 4096);
        assert!(matches!(parse_handle(&ok), Ok(ParsedHandle::Ipc(b)) if b == [7; 64]));
        for n in [0, 63, 65, 128] {
            let bad = handle(HIP_IPC_HANDLE_KIND, vec![0; n], None, 4096);
            assert!(matches!(validate_handle(&bad), Err(Error::InvalidArgument(_))), "{n} bytes");
        }
        let empty = handle(HIP_IPC_HANDLE_KIND, vec![0; 64], None, 0);
        assert!(matches!(validate_handle(&empty), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn posix_fd_handles_need_their_descriptor_and_no_data() {
        let fd = some_fd();
        let ok = handle(HIP_POSIX_FD_HANDLE_KIND, vec![], Some(fd.clone()), 1 << 21);
        assert!(matches!(parse_handle(&ok), Ok(ParsedHandle::PosixFd(_))));
        let no_fd = handle(HIP_POSIX_FD_HANDLE_KIND, vec![], None, 1 << 21);
        let msg = validate_handle(&no_fd).unwrap_err().to_string();
        assert!(msg.contains("no file descriptor"), "{msg}");
        let with_data = handle(HIP_POSIX_FD_HANDLE_KIND, vec![1, 2], Some(fd.clone()), 1 << 21);
        assert!(matches!(validate_handle(&with_data), Err(Error::InvalidArgument(_))));
        let empty = handle(HIP_POSIX_FD_HANDLE_KIND, vec![], Some(fd), 0);
        assert!(matches!(validate_handle(&empty), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn other_kinds_are_unsupported() {
        for kind in ["cuda_ipc", "memfd", "dmabuf", "", "HIP_IPC"] {
            let h = handle(kind, vec![0; 64], Some(some_fd()), 4096);
            assert!(matches!(validate_handle(&h), Err(Error::Unsupported { .. })), "{kind:?}");
        }
    }
}
