//! The table of locally registered memory. Every remote access is checked against it before a
//! transport touches memory, and every in-flight access holds a [`RegionGuard`] so that
//! unregistering waits for it to finish.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sync;
use crate::types::Location;

/// One registered buffer.
#[derive(Debug)]
pub struct Region {
    /// Start address in this process.
    pub addr: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Where it lives.
    pub location: Location,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr + self.len
    }

    /// True when `[addr, addr+len)` lies inside this region (`len` may be 0).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match addr.checked_add(len) {
            Some(end) => addr >= self.addr && end <= self.end(),
            None => false,
        }
    }
}

/// Keeps a region registered while a transport reads or writes it.
#[derive(Debug, Clone)]
pub struct RegionGuard(Arc<Region>);

impl std::ops::Deref for RegionGuard {
    type Target = Region;
    fn deref(&self) -> &Region {
        &self.0
    }
}

/// Registered regions, sorted by address, non-overlapping.
#[derive(Debug, Default)]
pub struct RegionTable {
    regions: RwLock<BTreeMap<u64, Arc<Region>>>,
}

impl RegionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a region; rejects zero length, wrap-around and overlap with typed errors.
    pub fn insert(&self, addr: u64, len: u64, location: Location) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidArgument(format!("cannot register zero bytes at {addr:#x}")));
        }
        if addr == 0 {
            return Err(Error::InvalidArgument("cannot register the null address".into()));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument(format!("range [{addr:#x}, +{len}) wraps around")))?;
        let mut map = sync::write(&self.regions);
        // The closest region starting before `end` is the only one that can overlap.
        if let Some((_, r)) = map.range(..end).next_back() {
            if r.end() > addr {
                return Err(Error::AddressOverlapped { addr, len, existing_addr: r.addr, existing_len: r.len });
            }
        }
        map.insert(addr, Arc::new(Region { addr, len, location }));
        Ok(())
    }

    /// Removes the region starting at `addr`, then waits (up to `wait`) for in-flight accesses to
    /// finish. New accesses are refused from the moment this is called.
    pub fn remove(&self, addr: u64, wait: Duration) -> Result<()> {
        let region = {
            let mut map = sync::write(&self.regions);
            map.remove(&addr).ok_or(Error::AddressNotRegistered {
                addr,
                len: 0,
                context: "no registration starts at this address".into(),
            })?
        };
        let deadline = Instant::now() + wait;
        while Arc::strong_count(&region) > 1 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(wait));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// The region containing `[addr, addr+len)` entirely, held for the duration of an access.
    /// Zero length and overflow never match.
    pub fn lookup(&self, addr: u64, len: u64) -> Option<RegionGuard> {
        if len == 0 {
            return None;
        }
        let end = addr.checked_add(len)?;
        let map = sync::read(&self.regions);
        let (_, r) = map.range(..=addr).next_back()?;
        (end <= r.end()).then(|| RegionGuard(r.clone()))
    }

    /// Like [`RegionTable::lookup`] but with a typed error naming the range.
    pub fn check(&self, addr: u64, len: u64, context: &str) -> Result<RegionGuard> {
        self.lookup(addr, len).ok_or_else(|| Error::AddressNotRegistered { addr, len, context: context.to_string() })
    }

    /// The registration starting exactly at `addr`.
    pub fn get(&self, addr: u64) -> Option<RegionGuard> {
        let map = sync::read(&self.regions);
        map.get(&addr).map(|r| RegionGuard(r.clone()))
    }

    /// All regions, by address.
    pub fn snapshot(&self) -> Vec<RegionGuard> {
        let map = sync::read(&self.regions);
        map.values().map(|r| RegionGuard(r.clone())).collect()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        sync::read(&self.regions).len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Location {
        Location::Cpu(Some(0))
    }

    #[test]
    fn rejects_zero_null_wrap_and_overlap() {
        let t = RegionTable::new();
        assert!(matches!(t.insert(0x1000, 0, cpu()), Err(Error::InvalidArgument(_))));
        assert!(matches!(t.insert(0, 10, cpu()), Err(Error::InvalidArgument(_))));
        assert!(matches!(t.insert(u64::MAX - 1, 10, cpu()), Err(Error::InvalidArgument(_))));
        t.insert(0x1000, 0x1000, cpu()).unwrap();
        for (a, l) in [(0x1000, 1), (0x800, 0x801), (0x1fff, 5), (0x0800, 0x2000)] {
            assert!(matches!(t.insert(a, l, cpu()), Err(Error::AddressOverlapped { .. })), "{a:#x}+{l}");
        }
        t.insert(0x2000, 0x10, cpu()).unwrap();
        t.insert(0x800, 0x800, cpu()).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn lookup_requires_one_region() {
        let t = RegionTable::new();
        t.insert(0x1000, 0x1000, cpu()).unwrap();
        t.insert(0x2000, 0x1000, cpu()).unwrap();
        assert!(t.lookup(0x1000, 0x1000).is_some());
        assert!(t.lookup(0x1fff, 1).is_some());
        assert!(t.lookup(0x1fff, 2).is_none(), "straddles two regions");
        assert!(t.lookup(0xfff, 1).is_none());
        assert!(t.lookup(0x1000, 0).is_none());
        assert!(t.lookup(u64::MAX, 2).is_none());
        assert!(t.lookup(0x3000, 1).is_none());
        assert!(matches!(t.check(0x3000, 1, "remote"), Err(Error::AddressNotRegistered { .. })));
    }

    #[test]
    fn remove_waits_for_guards() {
        let t = Arc::new(RegionTable::new());
        t.insert(0x1000, 0x1000, cpu()).unwrap();
        let g = t.lookup(0x1000, 1).unwrap();
        assert!(matches!(t.remove(0x1000, Duration::from_millis(20)), Err(Error::Timeout(_))));
        assert!(t.lookup(0x1000, 1).is_none(), "refused after removal started");
        drop(g);
        t.insert(0x1000, 0x1000, cpu()).unwrap();
        let g = t.lookup(0x1000, 1).unwrap();
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.remove(0x1000, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(g);
        h.join().unwrap().unwrap();
        assert!(matches!(t.remove(0x1000, Duration::ZERO), Err(Error::AddressNotRegistered { .. })));
    }
}
