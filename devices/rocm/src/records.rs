//! Bookkeeping of the allocations a device made or imported, independent of the HIP runtime so it can be
//! tested anywhere.
//!
//! Each live allocation is an `Arc<Entry<T>>` in a table keyed by address. `T` owns the memory and gives it
//! back when dropped, so the memory is released when the last `Arc` goes: [`Records::remove`] (a `free`)
//! drops the table's, while a copy in progress or a hold (`MemoryDevice::hold`) keeps its own clone and
//! delays the release until it ends.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::{Allocation, Error, Location, MemoryKind, Result, sync};

/// How an allocation came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Allocated by this device.
    Allocated,
    /// Mapped from another process's handle.
    Imported,
}

/// One live allocation.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    /// Start address.
    pub(crate) addr: u64,
    /// Usable length.
    pub(crate) len: u64,
    /// GPU ordinal the memory lives on.
    pub(crate) ordinal: u32,
    /// Token of the [`Allocation`] handed out (never 0: 0 marks memory this device does not own).
    pub(crate) token: u64,
    /// Allocated or imported.
    pub(crate) origin: Origin,
    /// What owns the memory.
    pub(crate) payload: T,
}

impl<T> Entry<T> {
    /// The [`Allocation`] naming this entry.
    pub(crate) fn allocation(&self) -> Allocation {
        Allocation {
            addr: self.addr,
            len: self.len,
            location: Location::Device(MemoryKind::Rocm, self.ordinal),
            token: self.token,
        }
    }

    /// True when `[addr, addr+len)` lies inside the entry (`len` may be 0).
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr && addr.checked_add(len).is_some_and(|end| end <= self.addr + self.len)
    }
}

/// The table of live allocations.
#[derive(Debug)]
pub(crate) struct Records<T> {
    table: Mutex<BTreeMap<u64, Arc<Entry<T>>>>,
    next_token: AtomicU64,
}

impl<T> Default for Records<T> {
    fn default() -> Self {
        Records { table: Mutex::new(BTreeMap::new()), next_token: AtomicU64::new(1) }
    }
}

impl<T> Records<T> {
    /// Records a new allocation. `AlreadyExists` when it overlaps a live one (the runtime handed out memory
    /// the table still holds, e.g. the same IPC handle opened twice): `payload` is then dropped, releasing
    /// what it owns.
    pub(crate) fn insert(&self, addr: u64, len: u64, ordinal: u32, origin: Origin, payload: T) -> Result<Allocation> {
        let end = addr
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("allocation [{addr:#x}, +{len}) is empty or wraps")))?;
        let mut table = sync::lock(&self.table);
        if let Some((_, e)) = table.range(..end).next_back() {
            if e.addr + e.len > addr {
                return Err(Error::AlreadyExists(format!(
                    "[{addr:#x}, +{len}) overlaps the live rocm allocation [{:#x}, +{}) (already mapped here)",
                    e.addr, e.len
                )));
            }
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry { addr, len, ordinal, token, origin, payload });
        let allocation = entry.allocation();
        table.insert(addr, entry);
        Ok(allocation)
    }

    /// The live entry `allocation` names (address, token and length must match); `NotFound` otherwise.
    pub(crate) fn get(&self, allocation: &Allocation, op: &str) -> Result<Arc<Entry<T>>> {
        match sync::lock(&self.table).get(&allocation.addr) {
            Some(e) if e.token == allocation.token && e.len == allocation.len => Ok(Arc::clone(e)),
            _ => Err(unknown(allocation, op)),
        }
    }

    /// Removes the entry `allocation` names and returns it (its memory goes when the returned `Arc` and any
    /// other clone are dropped). Unknown or already freed: `NotFound`.
    pub(crate) fn remove(&self, allocation: &Allocation) -> Result<Arc<Entry<T>>> {
        let mut table = sync::lock(&self.table);
        match table.get(&allocation.addr) {
            Some(e) if e.token == allocation.token && e.len == allocation.len => {
                Ok(table.remove(&allocation.addr).expect("present: checked under the same lock"))
            }
            _ => Err(unknown(allocation, "free")),
        }
    }

    /// The live entry holding the byte at `addr`.
    pub(crate) fn find(&self, addr: u64) -> Option<Arc<Entry<T>>> {
        let table = sync::lock(&self.table);
        let (_, e) = table.range(..=addr).next_back()?;
        (addr < e.addr + e.len).then(|| Arc::clone(e))
    }

    /// Number of live allocations.
    pub(crate) fn len(&self) -> usize {
        sync::lock(&self.table).len()
    }

    /// Live allocations by address.
    pub(crate) fn allocations(&self) -> Vec<Allocation> {
        sync::lock(&self.table).values().map(|e| e.allocation()).collect()
    }
}

fn unknown(allocation: &Allocation, op: &str) -> Error {
    let why = if allocation.token == 0 {
        "memory this device did not allocate or import"
    } else {
        "never allocated by this device, already freed, or a stale copy"
    };
    Error::NotFound(format!(
        "{op}: no live rocm allocation [{:#x}, +{}) with token {} ({why})",
        allocation.addr, allocation.len, allocation.token
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts releases, as the HIP payload calls hipFree.
    #[derive(Debug)]
    struct Release(Arc<AtomicUsize>);

    impl Drop for Release {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn table() -> (Records<Release>, Arc<AtomicUsize>) {
        (Records::default(), Arc::new(AtomicUsize::new(0)))
    }

    #[test]
    fn free_releases_once_and_double_free_is_typed() {
        let (t, freed) = table();
        let a = t.insert(0x10_0000, 4096, 1, Origin::Allocated, Release(freed.clone())).unwrap();
        assert_eq!(a.location, Location::Device(MemoryKind::Rocm, 1));
        assert_ne!(a.token, 0);
        assert_eq!(t.len(), 1);
        drop(t.remove(&a).unwrap());
        assert_eq!(freed.load(Ordering::SeqCst), 1);
        assert!(matches!(t.remove(&a), Err(Error::NotFound(_))), "double free");
        assert!(matches!(t.get(&a, "copy_to_host"), Err(Error::NotFound(_))), "use after free");
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stale_or_forged_allocations_are_refused() {
        let (t, freed) = table();
        let a = t.insert(0x10_0000, 4096, 0, Origin::Allocated, Release(freed.clone())).unwrap();
        for forged in [
            Allocation { token: a.token + 1, ..a.clone() },
            Allocation { len: 16, ..a.clone() },
            Allocation { addr: a.addr + 8, ..a.clone() },
            Allocation { token: 0, ..a.clone() },
        ] {
            assert!(matches!(t.get(&forged, "x"), Err(Error::NotFound(_))), "{forged:?}");
            assert!(matches!(t.remove(&forged), Err(Error::NotFound(_))), "{forged:?}");
        }
        let msg = t.get(&Allocation { token: 0, ..a.clone() }, "copy").unwrap_err().to_string();
        assert!(msg.contains("did not allocate"), "{msg}");
        assert_eq!(freed.load(Ordering::SeqCst), 0);
        // A new allocation at a reused address gets a new token: the old Allocation stays dead.
        drop(t.remove(&a).unwrap());
        let b = t.insert(a.addr, a.len, 0, Origin::Allocated, Release(freed.clone())).unwrap();
        assert_ne!(a.token, b.token);
        assert!(t.get(&a, "x").is_err() && t.get(&b, "x").is_ok());
    }

    #[test]
    fn a_clone_defers_the_release() {
        let (t, freed) = table();
        let a = t.insert(0x20_0000, 100, 0, Origin::Imported, Release(freed.clone())).unwrap();
        let held = t.get(&a, "hold").unwrap();
        assert_eq!(held.origin, Origin::Imported);
        drop(t.remove(&a).unwrap());
        assert_eq!(freed.load(Ordering::SeqCst), 0, "still held");
        assert_eq!(t.len(), 0);
        drop(held);
        assert_eq!(freed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn find_and_overlap() {
        let (t, freed) = table();
        let a = t.insert(0x1000, 0x1000, 2, Origin::Allocated, Release(freed.clone())).unwrap();
        assert_eq!(t.find(0x1000).unwrap().token, a.token);
        assert_eq!(t.find(0x1fff).unwrap().token, a.token);
        assert!(t.find(0x2000).is_none() && t.find(0xfff).is_none());
        let e = t.find(0x1800).unwrap();
        assert!(e.contains(0x1800, 0x800) && !e.contains(0x1800, 0x801) && !e.contains(u64::MAX, 2));
        for (addr, len) in [(0x1000, 1), (0x800, 0x801), (0x1fff, 10)] {
            let r = t.insert(addr, len, 0, Origin::Imported, Release(freed.clone()));
            assert!(matches!(r, Err(Error::AlreadyExists(_))), "{addr:#x}+{len}");
        }
        assert_eq!(freed.load(Ordering::SeqCst), 3, "refused payloads are released");
        assert!(matches!(
            t.insert(0x5000, 0, 0, Origin::Allocated, Release(freed.clone())),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            t.insert(u64::MAX, 2, 0, Origin::Allocated, Release(freed.clone())),
            Err(Error::InvalidArgument(_))
        ));
        t.insert(0x2000, 0x10, 0, Origin::Allocated, Release(freed.clone())).unwrap();
        assert_eq!(t.allocations().iter().map(|a| a.addr).collect::<Vec<_>>(), vec![0x1000, 0x2000]);
        assert_eq!(freed.load(Ordering::SeqCst), 5);
        drop(t);
        assert_eq!(freed.load(Ordering::SeqCst), 6, "dropping the table releases what only it holds");
        drop(e);
        assert_eq!(freed.load(Ordering::SeqCst), 7, "and a looked-up entry when that goes");
    }
}
