//! The device's table of live allocations (made by `musaMalloc` or imported from IPC handles), kept apart
//! from the runtime so that it is tested without one.
//!
//! Each record holds an `Arc` of a payload whose `Drop` gives the memory back (`musaFree`,
//! `musaIpcCloseMemHandle`). Removing a record hands the `Arc` back to the caller, so the memory is given back
//! outside the table's lock, and only once every other holder (a copy in progress, a hold) is done with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use mooncake_core::{Allocation, Location};

use crate::sys::IPC_HANDLE_SIZE;

/// How a recorded allocation came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `musaMalloc`.
    Allocated,
    /// `musaIpcOpenMemHandle` of these handle bytes.
    Imported([u8; IPC_HANDLE_SIZE]),
}

/// One live allocation.
#[derive(Debug)]
pub(crate) struct Record<T> {
    pub(crate) allocation: Allocation,
    pub(crate) origin: Origin,
    /// How many times it was handed out: an import of a handle this process already imported returns the same
    /// allocation again, and each import is freed once.
    refs: u32,
    pub(crate) payload: Arc<T>,
}

/// Why a record operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// No live record matches the allocation's address, token and length.
    Unknown,
    /// The range overlaps a live record at `[addr, +len)`.
    Overlaps { addr: u64, len: u64 },
}

/// Live allocations by start address. Tokens start at 1; token 0 names memory this device did not allocate.
#[derive(Debug)]
pub(crate) struct Records<T> {
    map: BTreeMap<u64, Record<T>>,
    next_token: u64,
}

impl<T> Default for Records<T> {
    fn default() -> Self {
        Records { map: BTreeMap::new(), next_token: 1 }
    }
}

impl<T> Records<T> {
    /// Records `[addr, +len)`; refused when it overlaps a live record (the runtime handing out memory that is
    /// still recorded means it was freed behind this device's back).
    pub(crate) fn insert(
        &mut self,
        addr: u64,
        len: u64,
        location: Location,
        origin: Origin,
        payload: Arc<T>,
    ) -> Result<Allocation, RecordError> {
        if let Some(r) = self.overlapping(addr, len) {
            return Err(RecordError::Overlaps { addr: r.allocation.addr, len: r.allocation.len });
        }
        let token = self.next_token;
        self.next_token += 1;
        let allocation = Allocation { addr, len, location, token };
        self.map.insert(addr, Record { allocation: allocation.clone(), origin, refs: 1, payload });
        Ok(allocation)
    }

    /// A live import of `handle` that covers `len` bytes, handed out once more.
    pub(crate) fn reuse_import(&mut self, handle: &[u8; IPC_HANDLE_SIZE], len: u64) -> Option<Allocation> {
        let r = self
            .map
            .values_mut()
            .find(|r| matches!(&r.origin, Origin::Imported(h) if h == handle) && r.allocation.len >= len)?;
        r.refs += 1;
        Some(r.allocation.clone())
    }

    /// The length of a live import of `handle`, if there is one.
    pub(crate) fn imported_len(&self, handle: &[u8; IPC_HANDLE_SIZE]) -> Option<u64> {
        self.map.values().find(|r| matches!(&r.origin, Origin::Imported(h) if h == handle)).map(|r| r.allocation.len)
    }

    /// The live record `allocation` names (same address, token and length).
    pub(crate) fn get(&self, allocation: &Allocation) -> Option<&Record<T>> {
        self.map
            .get(&allocation.addr)
            .filter(|r| r.allocation.token == allocation.token && r.allocation.len == allocation.len)
    }

    /// Drops one reference to `allocation`; returns the payload when that was the last one (the caller drops
    /// it, outside any lock), `None` when other imports of the same handle still use it.
    pub(crate) fn remove(&mut self, allocation: &Allocation) -> Result<Option<Arc<T>>, RecordError> {
        let r = self.map.get_mut(&allocation.addr).ok_or(RecordError::Unknown)?;
        if r.allocation.token != allocation.token || r.allocation.len != allocation.len {
            return Err(RecordError::Unknown);
        }
        r.refs -= 1;
        if r.refs > 0 {
            return Ok(None);
        }
        Ok(self.map.remove(&allocation.addr).map(|r| r.payload))
    }

    /// The record holding all of `[addr, addr+len)` (`len` 0 counts as one byte).
    pub(crate) fn containing(&self, addr: u64, len: u64) -> Option<&Record<T>> {
        let end = addr.checked_add(len.max(1))?;
        let (_, r) = self.map.range(..=addr).next_back()?;
        (end <= r.allocation.addr + r.allocation.len).then_some(r)
    }

    /// A record sharing at least one byte with `[addr, addr+len)`.
    pub(crate) fn overlapping(&self, addr: u64, len: u64) -> Option<&Record<T>> {
        let end = addr.saturating_add(len.max(1));
        let (_, r) = self.map.range(..end).next_back()?;
        (r.allocation.addr + r.allocation.len > addr).then_some(r)
    }

    /// Number of live records.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Every live allocation, by address.
    pub(crate) fn allocations(&self) -> Vec<Allocation> {
        self.map.values().map(|r| r.allocation.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mooncake_core::MemoryKind;

    use super::*;

    /// Counts how many payloads were dropped (memory given back).
    #[derive(Debug)]
    struct Payload<'a>(&'a AtomicUsize);

    impl Drop for Payload<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    const LOC: Location = Location::Device(MemoryKind::Musa, 0);

    #[test]
    fn free_gives_back_once_and_refuses_unknown_and_double_frees() {
        let released = AtomicUsize::new(0);
        let mut t = Records::default();
        let a = t.insert(0x1000, 256, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap();
        assert_eq!(a.token, 1);
        assert!(t.get(&a).is_some());
        let mut stale = a.clone();
        stale.token = 7;
        assert_eq!(t.remove(&stale).unwrap_err(), RecordError::Unknown);
        let mut shorter = a.clone();
        shorter.len = 16;
        assert!(t.get(&shorter).is_none());
        assert_eq!(t.remove(&shorter).unwrap_err(), RecordError::Unknown);
        let payload = t.remove(&a).unwrap().expect("last reference");
        assert_eq!(released.load(Ordering::SeqCst), 0, "given back only when the caller drops the payload");
        drop(payload);
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert_eq!(t.remove(&a).unwrap_err(), RecordError::Unknown, "double free");
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_held_payload_outlives_its_record() {
        let released = AtomicUsize::new(0);
        let mut t = Records::default();
        let a = t.insert(0x1000, 256, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap();
        let held = t.get(&a).unwrap().payload.clone();
        drop(t.remove(&a).unwrap());
        assert_eq!(released.load(Ordering::SeqCst), 0, "a hold defers the free");
        assert!(t.get(&a).is_none(), "but the allocation is gone from the table");
        drop(held);
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn overlaps_are_refused_and_tokens_differ() {
        let released = AtomicUsize::new(0);
        let mut t = Records::default();
        let a = t.insert(0x1000, 0x100, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap();
        let err = t.insert(0x10ff, 0x10, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap_err();
        assert_eq!(err, RecordError::Overlaps { addr: 0x1000, len: 0x100 });
        assert_eq!(released.load(Ordering::SeqCst), 1, "the refused payload is dropped by the caller's Arc");
        let err = t.insert(0xf00, 0x101, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap_err();
        assert_eq!(err, RecordError::Overlaps { addr: 0x1000, len: 0x100 });
        let b = t.insert(0x1100, 0x100, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap();
        assert_ne!(a.token, b.token);
        assert_eq!(t.allocations(), vec![a, b]);
    }

    #[test]
    fn containing_checks_the_whole_range() {
        let released = AtomicUsize::new(0);
        let mut t = Records::default();
        t.insert(0x1000, 0x100, LOC, Origin::Allocated, Arc::new(Payload(&released))).unwrap();
        assert!(t.containing(0x1000, 0x100).is_some());
        assert!(t.containing(0x10ff, 0).is_some(), "zero length counts as one byte");
        assert!(t.containing(0x10ff, 2).is_none());
        assert!(t.containing(0x1100, 1).is_none());
        assert!(t.containing(0xfff, 1).is_none());
        assert!(t.containing(u64::MAX, 2).is_none(), "overflow never matches");
        assert!(t.overlapping(0xf00, 0x101).is_some());
        assert!(t.overlapping(0xf00, 0x100).is_none());
    }

    #[test]
    fn imports_of_one_handle_share_a_record_until_the_last_free() {
        let released = AtomicUsize::new(0);
        let mut t = Records::default();
        let h = [7u8; IPC_HANDLE_SIZE];
        assert!(t.reuse_import(&h, 64).is_none());
        let a = t.insert(0x2000, 4096, LOC, Origin::Imported(h), Arc::new(Payload(&released))).unwrap();
        assert_eq!(t.imported_len(&h), Some(4096));
        assert_eq!(t.reuse_import(&h, 4096), Some(a.clone()));
        assert_eq!(t.reuse_import(&h, 4097), None, "an import asking for more than the first is not shared");
        assert!(t.reuse_import(&[8u8; IPC_HANDLE_SIZE], 1).is_none());
        assert!(t.remove(&a).unwrap().is_none(), "one import still uses it");
        assert!(t.get(&a).is_some());
        drop(t.remove(&a).unwrap());
        assert_eq!(released.load(Ordering::SeqCst), 1);
        assert_eq!(t.remove(&a).unwrap_err(), RecordError::Unknown);
        assert_eq!(t.imported_len(&h), None);
    }
}
