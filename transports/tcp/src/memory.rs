//! The only place this crate turns addresses into slices.

/// Views `[addr, addr+len)` of this process as bytes.
///
/// # Safety
/// The range must be readable for the lifetime of the slice: either inside a registered region
/// whose [`mooncake_core::RegionGuard`] the caller holds, or a local buffer the engine's caller
/// vouched for when submitting (the engine API's contract, as in upstream).
pub(crate) unsafe fn bytes<'a>(addr: u64, len: u64) -> &'a [u8] {
    // SAFETY: the caller guarantees the range is mapped and readable (function contract); len fits
    // usize on the 64-bit targets this crate supports.
    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len as usize) }
}

/// Views `[addr, addr+len)` of this process as writable bytes.
///
/// # Safety
/// As [`bytes`], and the range must be writable. Concurrent access by peers to the same range is
/// the user's responsibility, exactly as with RDMA.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn bytes_mut<'a>(addr: u64, len: u64) -> &'a mut [u8] {
    // SAFETY: the caller guarantees the range is mapped and writable (function contract).
    unsafe { std::slice::from_raw_parts_mut(addr as usize as *mut u8, len as usize) }
}
