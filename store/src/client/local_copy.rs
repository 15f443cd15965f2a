//! Copies between memory of this process: a replica on our own mounted segment, the staging buffer, a user
//! buffer registered with `register_buffer`, or a Rust slice.
//!
//! Every raw range is first looked up in the engine's [`RegionTable`] (the same table transports check remote
//! accesses against): it must lie inside one registered host-memory region, and the [`RegionGuard`] is held
//! for the duration of the copy, so the region cannot be unregistered (and, by the registration contract,
//! freed) while it is being read or written. The bytes move through `mooncake-raw`, the one place addresses
//! become bytes: it checks each range against its guard again, and copies with `memmove` semantics, so
//! overlapping ranges are harmless. No `unsafe` here.

use mooncake_core::{RegionGuard, RegionTable};
use mooncake_raw::Span;

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
    if !guard.is_host() {
        return Err(ErrorCode::InvalidParams.into());
    }
    Ok((guard, n))
}

/// The bytes `[addr, addr+len)` of `region` (checked again by mooncake-raw).
fn span(region: &RegionGuard, addr: u64, len: u64) -> Result<Span<'_>> {
    Span::region(region, addr, len).map_err(|e| {
        tracing::warn!(error = %e, "local copy refused");
        ErrorCode::InvalidParams.into()
    })
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
    let copy_part = |start: u64, part: u64| -> Result<()> {
        let (from, to) = (span(&src_guard, src + start, part)?, span(&dst_guard, dst + start, part)?);
        mooncake_raw::copy(&from, &to).map_err(|_| ErrorCode::InvalidParams.into())
    };
    if threads > 1 {
        // Chunks of whole pages (4 KiB), the last one taking the rest; each thread copies its own disjoint part,
        // and the scope joins every thread before the guards are dropped.
        let chunk = (n / threads).next_multiple_of(4096) as u64;
        return std::thread::scope(|scope| {
            let parts: Vec<_> = (1..threads as u64)
                .map(|i| i * chunk)
                .filter(|start| *start < len)
                .map(|start| scope.spawn(move || copy_part(start, chunk.min(len - start))))
                .collect();
            let first = copy_part(0, chunk.min(len));
            parts.into_iter().map(|h| h.join().unwrap_or(Err(ErrorCode::Internal.into()))).fold(first, Result::and)
        });
    }
    copy_part(0, len)
}

/// Copies `src` into registered host memory at `dst`.
pub(crate) fn copy_from_slice(regions: &RegionTable, src: &[u8], dst: u64) -> Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let (dst_guard, _) = host_region(regions, dst, src.len() as u64)?;
    span(&dst_guard, dst, src.len() as u64)?.write_from(0, src).map_err(|_| ErrorCode::InvalidParams.into())
}

/// Appends the `len` bytes at `src` (registered host memory) to `out`. `Internal` when `out` cannot grow.
pub(crate) fn append_to_vec(regions: &RegionTable, src: u64, len: u64, out: &mut Vec<u8>) -> Result<()> {
    let (src_guard, n) = host_region(regions, src, len)?;
    let from = span(&src_guard, src, len)?;
    out.try_reserve_exact(n).map_err(|e| {
        tracing::warn!(bytes = n, error = %e, "cannot allocate the value buffer");
        ErrorCode::Internal
    })?;
    from.append_to(out).map_err(|_| ErrorCode::InvalidParams.into())
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use mooncake_core::{Location, MemoryKind};

    fn table_with(addr: u64, len: usize, location: Location) -> RegionTable {
        let t = RegionTable::new();
        // SAFETY: each test keeps its buffer alive (and reads it only between copies) as long as the table.
        unsafe { t.insert(addr, len as u64, location) }.unwrap();
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
