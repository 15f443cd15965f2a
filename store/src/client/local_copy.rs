//! Copies between memory of this process: a replica on our own mounted segment, the staging buffer, a user
//! buffer registered with `register_buffer`, or a Rust slice.
//!
//! This is the store's one module with `unsafe` code. Every raw range is first looked up in the engine's
//! [`RegionTable`] (the same table transports check remote accesses against): it must lie inside one
//! registered host-memory region, and the [`RegionGuard`] is held for the duration of the copy, so the region
//! cannot be unregistered (and, by the registration contract, freed) while it is being read or written.
//! Copies use `ptr::copy` (memmove), so overlapping ranges are harmless.
#![allow(unsafe_code)]

use mooncake_core::{MemoryKind, RegionGuard, RegionTable};

use crate::error::Result;
use crate::types::ErrorCode;

/// The registered host-memory region holding `[addr, addr+len)`, or `InvalidParams` for a null address, zero
/// length, a length that does not fit in `isize`, a range outside every registered region, or device memory.
fn host_region(regions: &RegionTable, addr: u64, len: u64) -> Result<(RegionGuard, usize)> {
    let n = usize::try_from(len).ok().filter(|n| *n <= isize::MAX as usize).ok_or(ErrorCode::InvalidParams)?;
    if addr == 0 || n == 0 {
        return Err(ErrorCode::InvalidParams.into());
    }
    let guard = regions.lookup(addr, len).ok_or(ErrorCode::InvalidParams)?;
    if guard.location.kind() != Some(MemoryKind::Host) {
        return Err(ErrorCode::InvalidParams.into());
    }
    Ok((guard, n))
}

/// Copies of at least this many bytes are split over several threads: one core does not saturate memory
/// bandwidth (measured here: 32 MiB copies 1.3-1.5x faster on 2 threads than on one).
const PARALLEL_MIN: usize = 8 << 20;

/// Most threads one copy uses.
const PARALLEL_MAX_THREADS: usize = 4;

/// Copies `len` bytes from `src` to `dst`, both inside registered host memory. Large copies of disjoint ranges
/// are split over up to [`PARALLEL_MAX_THREADS`] threads.
pub(crate) fn copy_registered(regions: &RegionTable, src: u64, dst: u64, len: u64) -> Result<()> {
    let (src_guard, n) = host_region(regions, src, len)?;
    let (dst_guard, _) = host_region(regions, dst, len)?;
    let disjoint = src.saturating_add(len) <= dst || dst.saturating_add(len) <= src;
    let threads = if n >= PARALLEL_MIN && disjoint {
        std::thread::available_parallelism().map_or(1, |p| p.get()).min(PARALLEL_MAX_THREADS)
    } else {
        1
    };
    if threads > 1 {
        // Chunks of whole pages (4 KiB), the last one taking the rest.
        let chunk = (n / threads).next_multiple_of(4096);
        std::thread::scope(|scope| {
            for i in 1..threads {
                let start = i * chunk;
                if start >= n {
                    break;
                }
                let len = chunk.min(n - start);
                let (s, d) = (src as usize + start, dst as usize + start);
                // SAFETY: as for the single-threaded copy below; each thread copies its own disjoint part of the
                // two ranges, which do not overlap each other (`disjoint`), and the scope ends (joining every
                // thread) before the guards are dropped.
                scope.spawn(move || unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, len) });
            }
            // SAFETY: the first chunk, on this thread; same reasoning.
            unsafe { std::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, chunk.min(n)) };
        });
        drop((src_guard, dst_guard));
        return Ok(());
    }
    // SAFETY: both ranges lie inside registered host-memory regions of this process (checked just above), and
    // the registration contract says registered memory stays mapped and writable until it is unregistered;
    // `src_guard` and `dst_guard` keep both registrations alive until after the copy (unregistering waits for
    // guards). `ptr::copy` tolerates overlap. Peers may access the same bytes concurrently, exactly as with
    // RDMA: which bytes win is the application's protocol, not memory safety of this process.
    unsafe { std::ptr::copy(src as usize as *const u8, dst as usize as *mut u8, n) };
    drop((src_guard, dst_guard));
    Ok(())
}

/// Copies `src` into registered host memory at `dst`.
pub(crate) fn copy_from_slice(regions: &RegionTable, src: &[u8], dst: u64) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let (dst_guard, n) = host_region(regions, dst, src.len() as u64)?;
    // SAFETY: `[dst, dst+n)` lies inside a registered host-memory region kept registered by `dst_guard`
    // (see copy_registered); `src` is a live slice of exactly `n` bytes; `ptr::copy` tolerates overlap.
    unsafe { std::ptr::copy(src.as_ptr(), dst as usize as *mut u8, n) };
    drop(dst_guard);
    Ok(())
}

/// Appends the `len` bytes at `src` (registered host memory) to `out`. `Internal` when `out` cannot grow.
pub(crate) fn append_to_vec(regions: &RegionTable, src: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
    let (src_guard, n) = host_region(regions, src, len)?;
    out.try_reserve_exact(n).map_err(|e| {
        tracing::warn!(bytes = n, error = %e, "cannot allocate the value buffer");
        ErrorCode::Internal
    })?;
    let old_len = out.len();
    let spare = out.spare_capacity_mut();
    // SAFETY: `[src, src+n)` lies inside a registered host-memory region kept registered by `src_guard`;
    // `spare` has room for at least `n` bytes (reserved above) and belongs to `out`, which we borrow
    // exclusively, so it cannot overlap memory we read through a shared alias.
    unsafe { std::ptr::copy(src as usize as *const u8, spare.as_mut_ptr().cast::<u8>(), n) };
    // SAFETY: the `n` bytes after `old_len` were initialized by the copy above and lie within the capacity.
    unsafe { out.set_len(old_len + n) };
    drop(src_guard);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_core::Location;

    fn table_with(addr: u64, len: usize, location: Location) -> RegionTable {
        let t = RegionTable::new();
        t.insert(addr, len as u64, location).unwrap();
        t
    }

    #[test]
    fn copies_inside_registered_host_memory_only() {
        let mut buf = vec![0u8; 64];
        let base = buf.as_mut_ptr() as u64;
        let t = table_with(base, buf.len(), Location::Cpu(Some(0)));
        copy_from_slice(&t, b"abcdef", base).unwrap();
        copy_registered(&t, base, base + 10, 6).unwrap();
        copy_registered(&t, base + 10, base + 12, 6).unwrap(); // overlapping
        let mut out = b"x".to_vec();
        append_to_vec(&t, base + 12, 6, &mut out).unwrap();
        assert_eq!(out, b"xabcdef");
        assert_eq!(copy_from_slice(&t, &[1; 8], base + 60), Err(ErrorCode::InvalidParams.into()));
        assert_eq!(copy_registered(&t, base, base + 63, 2), Err(ErrorCode::InvalidParams.into()));
        assert_eq!(copy_registered(&t, 0, base, 1), Err(ErrorCode::InvalidParams.into()));
        assert_eq!(append_to_vec(&t, base, 0, &mut out), Err(ErrorCode::InvalidParams.into()));
        assert_eq!(append_to_vec(&t, u64::MAX - 1, 8, &mut out), Err(ErrorCode::InvalidParams.into()));
        assert!(host_region(&t, base, 64).is_ok());
        assert!(host_region(&t, base, 65).is_err());
        assert_eq!(&buf[..6], b"abcdef");
        assert_eq!(&buf[60..], &[0; 4]);
    }

    #[test]
    fn large_copies_split_over_threads_copy_every_byte() {
        let n = PARALLEL_MIN * 2 + 12345;
        let mut buf: Vec<u8> = (0..2 * n).map(|i| (i % 251) as u8).collect();
        let base = buf.as_mut_ptr() as u64;
        let t = table_with(base, buf.len(), Location::Cpu(None));
        copy_registered(&t, base, base + n as u64, n as u64).unwrap();
        assert!(buf[n..].iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // Overlapping large ranges take the single memmove.
        copy_registered(&t, base + 1, base, n as u64).unwrap();
        assert!(buf[..n - 1].iter().enumerate().all(|(i, b)| *b == ((i + 1) % 251) as u8));
    }

    #[test]
    fn refuses_device_memory() {
        let mut buf = vec![0u8; 16];
        let base = buf.as_mut_ptr() as u64;
        let t = table_with(base, buf.len(), Location::Device(MemoryKind::Cuda, 0));
        assert_eq!(copy_from_slice(&t, b"a", base), Err(ErrorCode::InvalidParams.into()));
        assert!(host_region(&t, base, 1).is_err());
        assert_eq!(buf, [0; 16]);
    }
}
