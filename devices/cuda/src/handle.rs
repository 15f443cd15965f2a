//! Sharing-handle kinds of the CUDA device and their validation (pure, tested without a GPU).

use std::os::fd::{AsRawFd, RawFd};

use mooncake_core::{Error, Result, SharingHandle};

use crate::driver::RAW_HANDLE_BYTES;

/// [`SharingHandle::kind`] of a legacy CUDA IPC handle: `data` holds the 64 raw bytes of a
/// `CUipcMemHandle` (from `cuIpcGetMemHandle`) of a `cuMemAlloc` allocation; no fd.
pub const CUDA_IPC_HANDLE_KIND: &str = "cuda_ipc";

/// [`SharingHandle::kind`] of a fabric handle (multi-node NVLink through IMEX): `data` holds the 64
/// bytes of a `CUmemFabricHandle` of a VMM allocation; no fd.
pub const CUDA_FABRIC_HANDLE_KIND: &str = "cuda_fabric";

/// [`SharingHandle::kind`] of a VMM allocation exported as a POSIX file descriptor: the fd is in
/// [`SharingHandle::fd`] (send it over a Unix socket), `data` is empty.
pub const CUDA_POSIX_FD_HANDLE_KIND: &str = "cuda_posix_fd";

/// A checked sharing handle, ready to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// Legacy IPC handle bytes.
    Ipc([u8; RAW_HANDLE_BYTES]),
    /// Fabric handle bytes.
    Fabric([u8; RAW_HANDLE_BYTES]),
    /// A POSIX fd (borrowed from the handle, which keeps it open).
    PosixFd(RawFd),
}

/// Checks a handle's kind, size and fd before anything reaches the driver.
pub(crate) fn parse(handle: &SharingHandle) -> Result<Parsed> {
    if handle.len == 0 {
        return Err(Error::InvalidArgument(format!("{} sharing handle of zero bytes", handle.kind)));
    }
    let raw = |what: &str| -> Result<[u8; RAW_HANDLE_BYTES]> {
        handle.data.as_slice().try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "{what} sharing handle must carry {RAW_HANDLE_BYTES} bytes, not {}",
                handle.data.len()
            ))
        })
    };
    match handle.kind.as_str() {
        CUDA_IPC_HANDLE_KIND => Ok(Parsed::Ipc(raw(CUDA_IPC_HANDLE_KIND)?)),
        CUDA_FABRIC_HANDLE_KIND => Ok(Parsed::Fabric(raw(CUDA_FABRIC_HANDLE_KIND)?)),
        CUDA_POSIX_FD_HANDLE_KIND => {
            if !handle.data.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{CUDA_POSIX_FD_HANDLE_KIND} sharing handle carries {} data bytes; it takes only an fd",
                    handle.data.len()
                )));
            }
            let fd = handle.fd.as_ref().ok_or_else(|| {
                Error::InvalidArgument(format!("{CUDA_POSIX_FD_HANDLE_KIND} sharing handle carries no file descriptor"))
            })?;
            Ok(Parsed::PosixFd(fd.as_raw_fd()))
        }
        other => Err(Error::InvalidArgument(format!(
            "the CUDA device imports {CUDA_IPC_HANDLE_KIND}, {CUDA_FABRIC_HANDLE_KIND} and {CUDA_POSIX_FD_HANDLE_KIND} \
             handles, not {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::sync::Arc;

    fn handle(kind: &str, data: Vec<u8>, fd: Option<Arc<OwnedFd>>, len: u64) -> SharingHandle {
        SharingHandle { kind: kind.into(), data, fd, len }
    }

    fn some_fd() -> Arc<OwnedFd> {
        Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
    }

    #[test]
    fn good_handles_parse() {
        let bytes: Vec<u8> = (0..64).collect();
        let p = parse(&handle(CUDA_IPC_HANDLE_KIND, bytes.clone(), None, 4096)).unwrap();
        assert!(matches!(p, Parsed::Ipc(b) if b[..] == bytes[..]));
        let p = parse(&handle(CUDA_FABRIC_HANDLE_KIND, bytes, None, 4096)).unwrap();
        assert!(matches!(p, Parsed::Fabric(b) if b[63] == 63));
        let fd = some_fd();
        let p = parse(&handle(CUDA_POSIX_FD_HANDLE_KIND, vec![], Some(fd.clone()), 4096)).unwrap();
        assert_eq!(p, Parsed::PosixFd(fd.as_raw_fd()));
    }

    #[test]
    fn wrong_sizes_kinds_and_fds_are_invalid_arguments() {
        let bad = [
            handle(CUDA_IPC_HANDLE_KIND, vec![0; 63], None, 4096),
            handle(CUDA_IPC_HANDLE_KIND, vec![0; 65], None, 4096),
            handle(CUDA_IPC_HANDLE_KIND, vec![0; 64], None, 0),
            handle(CUDA_FABRIC_HANDLE_KIND, vec![], None, 4096),
            handle(CUDA_POSIX_FD_HANDLE_KIND, vec![], None, 4096),
            handle(CUDA_POSIX_FD_HANDLE_KIND, vec![1], Some(some_fd()), 4096),
            handle("memfd", vec![], Some(some_fd()), 4096),
            handle("cudaIpc", vec![0; 64], None, 4096),
        ];
        for h in &bad {
            match parse(h) {
                Err(Error::InvalidArgument(msg)) => assert!(!msg.is_empty()),
                other => panic!("{} ({} bytes): expected InvalidArgument, got {other:?}", h.kind, h.data.len()),
            }
        }
        let e = parse(&bad[0]).unwrap_err().to_string();
        assert!(e.contains("64 bytes, not 63"), "{e}");
        let e = parse(&bad[6]).unwrap_err().to_string();
        assert!(e.contains("\"memfd\""), "{e}");
    }
}
