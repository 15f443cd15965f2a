//! Cache maintenance for CXL memory that is not kept coherent by hardware across hosts (CXL 2.0 memory pooling
//! shared by software, or a device without back-invalidation).
//!
//! On coherent memory (one host, or CXL 3.x shared memory with back-invalidation) ordinary loads and stores plus
//! the release/acquire fences the transport issues are enough. On non-coherent memory a store may sit in this
//! host's cache where another host never sees it, and a load may hit a stale line this host cached earlier. With
//! `MC_CXL_FLUSH=1`:
//! - after writing a range, every line of it is written back ([`write_back`]: `clwb` when the CPU has it, else
//!   `clflushopt`, else `clflush`) and an `sfence` orders the write-backs before whatever announces completion;
//! - before reading a range, every line of it is written back and dropped from the cache ([`invalidate`]:
//!   `clflushopt`, else `clflush`) and an `mfence` keeps the loads after the flushes, so they reach the device.
//!
//! These are x86-64 instructions; on other architectures [`supported`] is false and both calls only fence.

use std::sync::atomic::{Ordering, fence};

/// Cache line size assumed for flushing (every x86-64 CPU in use has 64-byte lines).
pub const LINE: u64 = 64;

/// Whether this CPU can flush cache lines from user space (x86-64: always, `clflush` is baseline).
pub fn supported() -> bool {
    cfg!(target_arch = "x86_64")
}

/// Which flush instructions this CPU has, found once.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Features {
    clflushopt: bool,
    clwb: bool,
}

#[cfg(target_arch = "x86_64")]
fn features() -> Features {
    use std::sync::OnceLock;
    static F: OnceLock<Features> = OnceLock::new();
    *F.get_or_init(|| {
        // `__cpuid_count` is a safe function in newer toolchains and unsafe in older ones.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID leaf 7 exists on every x86-64 CPU that runs Rust's baseline; it only reads registers.
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        Features { clflushopt: leaf7.ebx & (1 << 23) != 0, clwb: leaf7.ebx & (1 << 24) != 0 }
    })
}

/// Writes back every cache line of `[addr, addr+len)` and fences, so that the bytes are in the device before
/// whatever this thread does next becomes visible. The range must be mapped memory of this process.
pub fn write_back(addr: u64, len: u64) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        for line in lines(addr, len) {
            // SAFETY: the caller passes mapped memory of this process; these instructions only move a cache line
            // between the cache and memory, they neither read nor change the bytes as the program sees them.
            unsafe {
                if f.clwb {
                    std::arch::asm!("clwb [{0}]", in(reg) line, options(nostack, preserves_flags));
                } else if f.clflushopt {
                    std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags));
                } else {
                    std::arch::x86_64::_mm_clflush(line as *const u8);
                }
            }
        }
        // SAFETY: sfence has no operands and no memory-safety preconditions.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    let _ = (addr, len);
    fence(Ordering::Release);
}

/// Writes back and drops every cache line of `[addr, addr+len)`, then fences, so that the loads that follow read
/// the device rather than stale lines. The range must be mapped memory of this process.
pub fn invalidate(addr: u64, len: u64) {
    fence(Ordering::Acquire);
    #[cfg(target_arch = "x86_64")]
    {
        let f = features();
        for line in lines(addr, len) {
            // SAFETY: as in `write_back`: only cache state changes.
            unsafe {
                if f.clflushopt {
                    std::arch::asm!("clflushopt [{0}]", in(reg) line, options(nostack, preserves_flags));
                } else {
                    std::arch::x86_64::_mm_clflush(line as *const u8);
                }
            }
        }
        // SAFETY: mfence has no operands and no memory-safety preconditions.
        unsafe { std::arch::x86_64::_mm_mfence() };
    }
    let _ = (addr, len);
    fence(Ordering::Acquire);
}

/// Start addresses of the cache lines covering `[addr, addr+len)`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn lines(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let start = addr & !(LINE - 1);
    let end = if len == 0 { start } else { addr.saturating_add(len) };
    (start..end).step_by(LINE as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_cover_the_range() {
        assert_eq!(lines(100, 0).count(), 0);
        assert_eq!(lines(64, 64).collect::<Vec<_>>(), vec![64]);
        assert_eq!(lines(100, 64).collect::<Vec<_>>(), vec![64, 128]);
        assert_eq!(lines(0, 129).count(), 3);
    }

    #[test]
    fn flushing_keeps_the_bytes() {
        let mut v = vec![7u8; 4096];
        let addr = v.as_mut_ptr() as u64;
        write_back(addr, 4096);
        invalidate(addr + 3, 1000);
        assert!(v.iter().all(|b| *b == 7));
        v[5] = 1;
        write_back(addr, 4096);
        assert_eq!(v[5], 1);
    }
}
