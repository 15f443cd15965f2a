//! Bookkeeping of the allocations a [`crate::CudaDevice`] made or imported.
//!
//! Pure data: the driver resource of each entry is a type parameter, so the rules (tokens, stale
//! and double frees, deferred release while held) are tested here without a GPU.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::{Allocation, Error, Location, MemoryKind, Result, sync};

/// How an allocation of a [`crate::CudaDevice`] came to be, which decides how it is shared and freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocationKind {
    /// `cuMemAlloc`: shared as [`crate::CUDA_IPC_HANDLE_KIND`], freed with `cuMemFree`.
    MemAlloc,
    /// `cuMemCreate` + `cuMemMap` (virtual memory management): shared as
    /// [`crate::CUDA_POSIX_FD_HANDLE_KIND`], or [`crate::CUDA_FABRIC_HANDLE_KIND`] when `fabric`.
    Vmm {
        /// Created with the fabric handle type.
        fabric: bool,
    },
    /// Opened with `cuIpcOpenMemHandle`; freeing closes it.
    ImportedIpc,
    /// Imported from a POSIX fd or a fabric handle and mapped; freeing unmaps it.
    ImportedVmm,
}

impl AllocationKind {
    /// True for memory another process exported.
    pub fn is_imported(self) -> bool {
        matches!(self, AllocationKind::ImportedIpc | AllocationKind::ImportedVmm)
    }
}

/// One live allocation: where it is, who owns it, and the driver resource that frees it.
#[derive(Debug)]
pub(crate) struct Entry<R> {
    /// First usable byte.
    pub addr: u64,
    /// Usable length.
    pub len: u64,
    /// Token handed out in the [`Allocation`] (never 0: 0 marks memory this device did not make).
    pub token: u64,
    /// Device the memory lives on.
    pub ordinal: u32,
    /// Device whose context reaches the memory (differs for IPC imports opened elsewhere).
    pub ctx_ordinal: u32,
    /// How it was made.
    pub kind: AllocationKind,
    /// What frees it.
    pub resource: R,
}

impl<R> Entry<R> {
    /// The allocation as handed to callers.
    pub fn allocation(&self) -> Allocation {
        Allocation {
            addr: self.addr,
            len: self.len,
            location: Location::Device(MemoryKind::Cuda, self.ordinal),
            token: self.token,
        }
    }

    /// True when `[addr, addr+len)` lies inside the entry.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.addr + self.len)
    }
}

/// What [`Records::free`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freed {
    /// The resource was released now.
    Now,
    /// Someone holds the entry (a hold or a copy in flight): released when the last holder lets go.
    Deferred,
}

/// Live allocations by start address.
#[derive(Debug)]
pub(crate) struct Records<R> {
    map: Mutex<BTreeMap<u64, Arc<Entry<R>>>>,
    next: AtomicU64,
}

impl<R> Default for Records<R> {
    fn default() -> Self {
        Records { map: Mutex::new(BTreeMap::new()), next: AtomicU64::new(1) }
    }
}

impl<R> Records<R> {
    /// Records a new allocation and returns it with a fresh token. An overlap with a live entry
    /// (the driver never hands out such memory) is refused.
    pub fn insert(
        &self,
        addr: u64,
        len: u64,
        ordinal: u32,
        ctx_ordinal: u32,
        kind: AllocationKind,
        resource: R,
    ) -> Result<Allocation> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry { addr, len, token, ordinal, ctx_ordinal, kind, resource });
        let allocation = entry.allocation();
        let mut map = sync::lock(&self.map);
        let end =
            addr.checked_add(len).ok_or_else(|| Error::InvalidArgument(format!("range {addr:#x}+{len} wraps")))?;
        if let Some((_, e)) = map.range(..end).next_back() {
            if e.addr + e.len > addr {
                return Err(Error::AlreadyExists(format!(
                    "CUDA allocation [{addr:#x}, +{len}) overlaps recorded [{:#x}, +{}) on cuda:{}",
                    e.addr, e.len, e.ordinal
                )));
            }
        }
        map.insert(addr, entry);
        Ok(allocation)
    }

    /// The live entry `allocation` names (address, token and length must all match).
    pub fn get(&self, allocation: &Allocation, op: &str) -> Result<Arc<Entry<R>>> {
        match sync::lock(&self.map).get(&allocation.addr) {
            Some(e) if e.token == allocation.token && e.len == allocation.len => Ok(Arc::clone(e)),
            _ => Err(unknown(allocation, op)),
        }
    }

    /// The live entry holding `[addr, addr+len)`.
    pub fn containing(&self, addr: u64, len: u64) -> Option<Arc<Entry<R>>> {
        let map = sync::lock(&self.map);
        let (_, e) = map.range(..=addr).next_back()?;
        e.contains(addr, len).then(|| Arc::clone(e))
    }

    /// Forgets `allocation` and releases its resource with `release` unless someone still holds
    /// it (then the resource's own drop releases it when the last holder lets go). An allocation
    /// that is not live (never made, freed already, or a stale copy) is a typed `NotFound`.
    pub fn free(&self, allocation: &Allocation, release: impl FnOnce(&mut R) -> Result<()>) -> Result<Freed> {
        let entry = {
            let mut map = sync::lock(&self.map);
            match map.get(&allocation.addr) {
                Some(e) if e.token == allocation.token && e.len == allocation.len => {
                    map.remove(&allocation.addr).ok_or_else(|| unknown(allocation, "free"))?
                }
                _ => return Err(unknown(allocation, "free")),
            }
        };
        match Arc::try_unwrap(entry) {
            Ok(mut e) => {
                release(&mut e.resource)?;
                Ok(Freed::Now)
            }
            Err(_) => Ok(Freed::Deferred),
        }
    }

    /// Live allocations, by address.
    pub fn allocations(&self) -> Vec<Allocation> {
        sync::lock(&self.map).values().map(|e| e.allocation()).collect()
    }

    /// Number of live allocations.
    pub fn len(&self) -> usize {
        sync::lock(&self.map).len()
    }
}

/// The error for an allocation this device does not hold.
pub(crate) fn unknown(allocation: &Allocation, op: &str) -> Error {
    Error::NotFound(format!(
        "{op}: no live CUDA allocation [{:#x}, +{}) with token {} (never allocated or imported by this device, \
         already freed, or a stale copy)",
        allocation.addr, allocation.len, allocation.token
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts releases: explicit ones and ones by drop.
    struct Fake {
        released: Arc<AtomicUsize>,
        done: bool,
    }

    impl Fake {
        fn release(&mut self) -> Result<()> {
            if !self.done {
                self.done = true;
                self.released.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = self.release();
        }
    }

    fn records() -> (Records<Fake>, Arc<AtomicUsize>) {
        (Records::default(), Arc::new(AtomicUsize::new(0)))
    }

    fn fake(c: &Arc<AtomicUsize>) -> Fake {
        Fake { released: c.clone(), done: false }
    }

    #[test]
    fn tokens_are_fresh_and_never_zero() {
        let (r, c) = records();
        let a = r.insert(0x1000, 100, 0, 0, AllocationKind::MemAlloc, fake(&c)).unwrap();
        let b = r.insert(0x2000, 100, 1, 1, AllocationKind::Vmm { fabric: false }, fake(&c)).unwrap();
        assert!(a.token != 0 && b.token != 0 && a.token != b.token);
        assert_eq!(b.location, Location::Device(MemoryKind::Cuda, 1));
        assert_eq!(r.allocations(), vec![a, b]);
    }

    #[test]
    fn stale_unknown_and_double_frees_are_refused() {
        let (r, c) = records();
        let a = r.insert(0x1000, 100, 0, 0, AllocationKind::MemAlloc, fake(&c)).unwrap();
        let mut stale = a.clone();
        stale.token += 7;
        assert!(matches!(r.free(&stale, Fake::release), Err(Error::NotFound(_))));
        let mut shorter = a.clone();
        shorter.len = 10;
        assert!(matches!(r.get(&shorter, "copy_to_host"), Err(Error::NotFound(_))));
        let foreign = Allocation { token: 0, ..a.clone() };
        assert!(matches!(r.free(&foreign, Fake::release), Err(Error::NotFound(_))));
        assert_eq!(r.free(&a, Fake::release).unwrap(), Freed::Now);
        assert_eq!(c.load(Ordering::SeqCst), 1);
        let e = r.free(&a, Fake::release).unwrap_err();
        assert!(e.to_string().contains("already freed"), "{e}");
        assert_eq!(c.load(Ordering::SeqCst), 1, "released exactly once");
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_held_entry_is_released_when_the_hold_ends() {
        let (r, c) = records();
        let a = r.insert(0x1000, 100, 0, 0, AllocationKind::MemAlloc, fake(&c)).unwrap();
        let held = r.get(&a, "hold").unwrap();
        assert_eq!(r.free(&a, Fake::release).unwrap(), Freed::Deferred);
        assert_eq!(c.load(Ordering::SeqCst), 0, "still held");
        assert!(matches!(r.get(&a, "hold"), Err(Error::NotFound(_))), "cannot be held again once freed");
        drop(held);
        assert_eq!(c.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn release_errors_reach_the_caller() {
        let (r, c) = records();
        let a = r.insert(0x1000, 100, 0, 0, AllocationKind::MemAlloc, fake(&c)).unwrap();
        let e = r.free(&a, |_| Err(Error::InvalidArgument("cuMemFree failed".into()))).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert_eq!(r.len(), 0, "forgotten even when the driver refused");
    }

    #[test]
    fn ranges_are_found_inside_entries_only() {
        let (r, c) = records();
        let a = r.insert(0x1000, 0x100, 0, 0, AllocationKind::MemAlloc, fake(&c)).unwrap();
        assert_eq!(r.containing(0x1010, 0x10).unwrap().token, a.token);
        assert_eq!(r.containing(0x1000, 0x100).unwrap().token, a.token);
        assert!(r.containing(0x10f0, 0x20).is_none(), "crosses the end");
        assert!(r.containing(0xff0, 0x20).is_none(), "starts before");
        assert!(r.containing(0x1000, u64::MAX).is_none(), "wraps");
        let overlap = r.insert(0x1080, 0x100, 0, 0, AllocationKind::MemAlloc, fake(&c));
        assert!(matches!(overlap, Err(Error::AlreadyExists(_))));
        assert!(AllocationKind::ImportedIpc.is_imported() && !AllocationKind::MemAlloc.is_imported());
    }
}
