//! The table of locally registered memory, and the proofs that let a transport touch local memory.
//!
//! Every remote access is checked against the [`RegionTable`] before a transport touches memory, and every
//! in-flight access (remote, and local since a transfer carries its [`LocalRange`]) holds a [`RegionGuard`]
//! so that unregistering waits for it to finish.
//!
//! # What proves that memory may be touched
//! - A [`RegionGuard`]: the range was registered, through an `unsafe` call whose caller vouched for it
//!   ([`RegionTable::insert`], `TransferEngine::register_memory`) or through memory the engine holds itself
//!   ([`OwnedMemory`]: a device allocation, a leaked slice). Guards exist only for registered ranges.
//! - A [`LocalRange`]: the local side of one transfer, either inside a registered region (it holds the
//!   guard) or vouched for by the caller of an `unsafe` entry point ([`LocalRange::vouched`]).
//!
//! Core never dereferences memory. The one crate that turns these proofs into bytes is `mooncake-raw`; it
//! refuses ranges outside the proof and memory of a device the CPU cannot read ([`Access`]), which it moves
//! through the owning [`MemoryDevice`] instead.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::device::{Allocation, MemoryDevice};
use crate::error::{Error, Result};
use crate::sync;
use crate::types::{Location, MemoryKind};

/// One registered buffer.
pub struct Region {
    /// Start address in this process.
    pub addr: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Where it lives.
    pub location: Location,
    access: Access,
    /// Keeps memory the engine holds itself allocated until the region is gone (last guard dropped).
    _owned: Option<OwnedMemory>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("location", &self.location)
            .field("access", &self.access)
            .finish()
    }
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

    /// How this process reaches the region's bytes.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// True when the CPU may read and write the region directly (host memory).
    pub fn is_host(&self) -> bool {
        matches!(self.access, Access::Host)
    }
}

/// How this process reaches a registered range's bytes.
#[derive(Clone)]
pub enum Access {
    /// Host memory: the CPU reads and writes it directly.
    Host,
    /// Memory of a device the CPU must never dereference (GPU memory): CPU transports move its bytes through
    /// the device's copies, staging them in host memory.
    Device(DeviceMemory),
    /// Device memory no linked device owns (e.g. registered as `cuda:0` without a CUDA device): the CPU
    /// neither dereferences it nor can copy it; CPU transports refuse it with a typed error.
    Unreachable,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Host => f.write_str("Host"),
            Access::Device(d) => write!(f, "Device({})", d.device.name()),
            Access::Unreachable => f.write_str("Unreachable"),
        }
    }
}

impl Access {
    /// The access of a region registered at `location` and owned by `owner` (when a device claims it):
    /// the owner decides whether the CPU may dereference it; without one, host locations (and names this
    /// build does not interpret, as upstream treats them) are host memory and device locations unreachable.
    fn of(location: &Location, owner: Option<DeviceMemory>) -> Access {
        match owner {
            Some(d) if d.device.capabilities().host_accessible => Access::Host,
            Some(d) => Access::Device(d),
            None => match location.kind() {
                Some(k) if k != MemoryKind::Host => Access::Unreachable,
                _ => Access::Host,
            },
        }
    }
}

/// Device memory behind a region: the owning device and its allocation. Copies go through the device, which
/// checks them against the allocation.
#[derive(Clone)]
pub struct DeviceMemory {
    /// The device that owns the memory.
    pub device: Arc<dyn MemoryDevice>,
    /// The allocation holding the region.
    pub allocation: Allocation,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("device", &self.device.name())
            .field("allocation", &self.allocation)
            .finish()
    }
}

impl DeviceMemory {
    fn offset(&self, addr: u64, len: u64) -> Result<u64> {
        let a = &self.allocation;
        match addr.checked_sub(a.addr) {
            Some(off) if off.checked_add(len).is_some_and(|end| end <= a.len) => Ok(off),
            _ => Err(Error::AddressNotRegistered {
                addr,
                len,
                context: format!("outside the {} allocation at {:#x} (+{})", self.device.name(), a.addr, a.len),
            }),
        }
    }

    /// Copies the device bytes at absolute address `addr` into `dst`.
    pub fn copy_to_host(&self, addr: u64, dst: &mut [u8]) -> Result<()> {
        let off = self.offset(addr, dst.len() as u64)?;
        self.device.copy_to_host(&self.allocation, off, dst)
    }

    /// Copies `src` into the device memory at absolute address `addr`.
    pub fn copy_from_host(&self, src: &[u8], addr: u64) -> Result<()> {
        let off = self.offset(addr, src.len() as u64)?;
        self.device.copy_from_host(src, &self.allocation, off)
    }
}

/// Memory the engine can hold on its own: a range plus whatever keeps it allocated (a device mapping, a
/// leaked slice). A region registered with it stays valid until the region is gone, whatever the caller
/// does meanwhile, so registering it needs no `unsafe`.
pub struct OwnedMemory {
    addr: u64,
    len: u64,
    _keep: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for OwnedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedMemory").field("addr", &format_args!("{:#x}", self.addr)).field("len", &self.len).finish()
    }
}

impl OwnedMemory {
    /// Memory kept valid by `keep`.
    ///
    /// # Safety
    /// `[addr, addr+len)` must be memory of this process that stays allocated at that address for as long as
    /// `keep` lives, and nothing else may free or move it meanwhile. Host memory must be mapped readable and
    /// writable; memory of a device the CPU cannot read is never dereferenced by this crate and its users
    /// (they go through the device), but must stay the device's memory. While it is registered, transports
    /// and peers read and write it at any time, so the caller keeps no Rust reference to it.
    #[allow(unsafe_code)]
    pub unsafe fn new(addr: u64, len: u64, keep: Box<dyn Any + Send + Sync>) -> Self {
        OwnedMemory { addr, len, _keep: Some(keep) }
    }

    /// A slice given up for good (e.g. `Vec::leak`): valid for the rest of the process, and nothing else can
    /// reach it any more.
    pub fn from_static(buf: &'static mut [u8]) -> Self {
        OwnedMemory { addr: buf.as_mut_ptr() as u64, len: buf.len() as u64, _keep: None }
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// Adds a region of memory the caller vouches for; rejects zero length, the null address, wrap-around and
    /// overlap with typed errors. Device locations (`cuda:0`) are never dereferenced ([`Access::Unreachable`]);
    /// use [`RegionTable::insert_owned_by`] for device memory a device can copy.
    ///
    /// # Safety
    /// Until the region is removed and every [`RegionGuard`] of it is dropped (what
    /// [`RegionTable::remove`] waits for when it returns `Ok`), `[addr, addr+len)` must be memory of this
    /// process at that address: for a host location mapped readable and writable and not freed. Transports
    /// and peers read and write it at any time meanwhile, so the caller keeps no Rust reference to it.
    #[allow(unsafe_code)]
    pub unsafe fn insert(&self, addr: u64, len: u64, location: Location) -> Result<()> {
        self.insert_by_contract(addr, len, location, None)
    }

    /// [`RegionTable::insert`] for memory `owner` claims: when the owner's device is not host-accessible the
    /// region is [`Access::Device`], and CPU transports copy it through the device instead of dereferencing.
    ///
    /// # Safety
    /// As for [`RegionTable::insert`]; for device memory, the range must stay the owner's memory.
    #[allow(unsafe_code)]
    pub unsafe fn insert_owned_by(&self, addr: u64, len: u64, location: Location, owner: DeviceMemory) -> Result<()> {
        self.insert_by_contract(addr, len, location, Some(owner))
    }

    /// [`RegionTable::insert_owned_by`] without an `unsafe` block, for the engine's `unsafe` registration
    /// calls, whose callers take on the same obligation.
    pub(crate) fn insert_by_contract(
        &self,
        addr: u64,
        len: u64,
        location: Location,
        owner: Option<DeviceMemory>,
    ) -> Result<()> {
        self.add(addr, len, location, owner, None)
    }

    /// Adds a region of memory the table holds itself (no `unsafe`: `memory` keeps it valid until the region
    /// and all its guards are gone). `owner` is the device that owns it, for staging copies of device memory.
    pub fn insert_held(&self, memory: OwnedMemory, location: Location, owner: Option<DeviceMemory>) -> Result<()> {
        self.add(memory.addr, memory.len, location, owner, Some(memory))
    }

    fn add(
        &self,
        addr: u64,
        len: u64,
        location: Location,
        owner: Option<DeviceMemory>,
        owned: Option<OwnedMemory>,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidArgument(format!("cannot register zero bytes at {addr:#x}")));
        }
        if addr == 0 {
            return Err(Error::InvalidArgument("cannot register the null address".into()));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument(format!("range [{addr:#x}, +{len}) wraps around")))?;
        if let Some(o) = &owner {
            o.offset(addr, len)?;
        }
        let access = Access::of(&location, owner);
        let mut map = sync::write(&self.regions);
        // The closest region starting before `end` is the only one that can overlap.
        if let Some((_, r)) = map.range(..end).next_back() {
            if r.end() > addr {
                return Err(Error::AddressOverlapped { addr, len, existing_addr: r.addr, existing_len: r.len });
            }
        }
        map.insert(addr, Arc::new(Region { addr, len, location, access, _owned: owned }));
        Ok(())
    }

    /// Removes the region starting at `addr`, then waits (up to `wait`) for in-flight accesses to
    /// finish. New accesses are refused from the moment this is called. `Timeout` means accesses (local
    /// transfers or peers) still hold the region: memory the caller vouched for must not be freed then.
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

/// The local side of one transfer: `len` bytes at `addr` in this process, with the proof that a transport
/// may read and write them. Transports get it in [`TransferTask`](crate::TransferTask) and turn it into bytes
/// only through `mooncake-raw`; while it lives it keeps its region registered (unregistering waits for it).
#[derive(Debug, Clone)]
pub struct LocalRange {
    addr: u64,
    len: u64,
    /// `None`: vouched for by the caller of an `unsafe` entry point ([`LocalRange::vouched`]).
    region: Option<RegionGuard>,
    /// How a vouched range is reached: host memory, or device memory a linked device claimed.
    vouched: Access,
}

impl LocalRange {
    /// `[addr, addr+len)` inside `region`; `AddressNotRegistered` when it is not (zero length and overflow
    /// included).
    pub fn in_region(region: RegionGuard, addr: u64, len: u64, context: &str) -> Result<Self> {
        if len == 0 || !region.contains(addr, len) {
            return Err(Error::AddressNotRegistered { addr, len, context: context.to_string() });
        }
        Ok(LocalRange { addr, len, region: Some(region), vouched: Access::Host })
    }

    /// `[addr, addr+len)` looked up in `table`: it must lie inside one registered region
    /// (`AddressNotRegistered`, naming `context`, otherwise).
    pub fn check(table: &RegionTable, addr: u64, len: u64, context: &str) -> Result<Self> {
        let region = table.check(addr, len, context)?;
        Ok(LocalRange { addr, len, region: Some(region), vouched: Access::Host })
    }

    /// A range the caller vouches for, registered or not (upstream's TCP transport sends from and receives
    /// into any local buffer; the Python binding keeps that). It is host memory to transports.
    ///
    /// # Safety
    /// `[addr, addr+len)` must be host memory of this process, mapped readable and writable, that stays
    /// allocated for as long as this value or any range made from it ([`Clone`], [`LocalRange::sub`]) lives:
    /// a transport keeps it until the transfer is finished, which for a timed-out blocking call may be after
    /// the call returned. The transfer reads or writes it meanwhile, so the caller keeps no Rust reference
    /// to it.
    #[allow(unsafe_code)]
    pub unsafe fn vouched(addr: u64, len: u64) -> Self {
        Self::vouched_by_contract(addr, len)
    }

    /// [`LocalRange::vouched`] for the engine's `unsafe` entry points, whose contracts carry the same
    /// obligation (core declares `unsafe fn`s but contains no `unsafe` block).
    pub(crate) fn vouched_by_contract(addr: u64, len: u64) -> Self {
        LocalRange { addr, len, region: None, vouched: Access::Host }
    }

    /// A vouched range that a linked device claims as its memory (an unregistered GPU buffer handed to the
    /// Python binding's unchecked calls): transports move it through `owner`, never dereferencing it.
    pub(crate) fn vouched_device_by_contract(addr: u64, len: u64, owner: DeviceMemory) -> Self {
        LocalRange { addr, len, region: None, vouched: Access::Device(owner) }
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for zero bytes (never for ranges the engine hands out).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }

    /// The registered region it lies in; `None` when it was vouched for.
    pub fn region(&self) -> Option<&RegionGuard> {
        self.region.as_ref()
    }

    /// How this process reaches the bytes (vouched ranges are host memory unless a linked device claimed them).
    pub fn access(&self) -> &Access {
        self.region.as_ref().map_or(&self.vouched, |r| r.access())
    }

    /// `len` bytes at `offset` into this range, with the same proof; `None` when they do not fit.
    pub fn sub(&self, offset: u64, len: u64) -> Option<LocalRange> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| LocalRange {
            addr: self.addr + offset,
            len,
            region: self.region.clone(),
            vouched: self.vouched.clone(),
        })
    }

    /// This range if it lies in registered memory, else a lookup in `table` (a transport that needs
    /// registered local memory, given a vouched range): `AddressNotRegistered` naming `context` when not.
    pub fn registered_in(&self, table: &RegionTable, context: &str) -> Result<RegionGuard> {
        match &self.region {
            Some(r) => Ok(r.clone()),
            None => table.check(self.addr, self.len, context),
        }
    }
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;

    fn cpu() -> Location {
        Location::Cpu(Some(0))
    }

    /// Inserts a made-up range into a table of these tests.
    fn add(t: &RegionTable, addr: u64, len: u64, location: Location) -> Result<()> {
        // SAFETY: these tables are never handed to a transport or to mooncake-raw: nothing reads or writes
        // through their (made-up) addresses; only the table's bookkeeping is under test.
        unsafe { t.insert(addr, len, location) }
    }

    #[test]
    fn rejects_zero_null_wrap_and_overlap() {
        let t = RegionTable::new();
        assert!(matches!(add(&t, 0x1000, 0, cpu()), Err(Error::InvalidArgument(_))));
        assert!(matches!(add(&t, 0, 10, cpu()), Err(Error::InvalidArgument(_))));
        assert!(matches!(add(&t, u64::MAX - 1, 10, cpu()), Err(Error::InvalidArgument(_))));
        add(&t, 0x1000, 0x1000, cpu()).unwrap();
        for (a, l) in [(0x1000, 1), (0x800, 0x801), (0x1fff, 5), (0x0800, 0x2000)] {
            assert!(matches!(add(&t, a, l, cpu()), Err(Error::AddressOverlapped { .. })), "{a:#x}+{l}");
        }
        add(&t, 0x2000, 0x10, cpu()).unwrap();
        add(&t, 0x800, 0x800, cpu()).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn lookup_requires_one_region() {
        let t = RegionTable::new();
        add(&t, 0x1000, 0x1000, cpu()).unwrap();
        add(&t, 0x2000, 0x1000, cpu()).unwrap();
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
        add(&t, 0x1000, 0x1000, cpu()).unwrap();
        let g = t.lookup(0x1000, 1).unwrap();
        assert!(matches!(t.remove(0x1000, Duration::from_millis(20)), Err(Error::Timeout(_))));
        assert!(t.lookup(0x1000, 1).is_none(), "refused after removal started");
        drop(g);
        add(&t, 0x1000, 0x1000, cpu()).unwrap();
        let g = t.lookup(0x1000, 1).unwrap();
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.remove(0x1000, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(g);
        h.join().unwrap().unwrap();
        assert!(matches!(t.remove(0x1000, Duration::ZERO), Err(Error::AddressNotRegistered { .. })));
    }

    #[test]
    fn local_ranges_carry_their_region_and_stay_inside_it() {
        let t = Arc::new(RegionTable::new());
        add(&t, 0x1000, 0x1000, cpu()).unwrap();
        let r = LocalRange::check(&t, 0x1800, 0x100, "local").unwrap();
        assert_eq!((r.addr(), r.len(), r.end()), (0x1800, 0x100, 0x1900));
        assert!(matches!(r.access(), Access::Host));
        let s = r.sub(0x80, 0x80).unwrap();
        assert_eq!((s.addr(), s.len()), (0x1880, 0x80));
        assert!(r.sub(0x80, 0x81).is_none() && r.sub(u64::MAX, 2).is_none());
        for (a, l) in [(0x1f00, 0x101), (0x800, 0x10), (0x1000, 0)] {
            assert!(matches!(LocalRange::check(&t, a, l, "local"), Err(Error::AddressNotRegistered { .. })));
        }
        let g = t.lookup(0x1000, 1).unwrap();
        assert!(LocalRange::in_region(g.clone(), 0x1000, 0x1000, "x").is_ok());
        assert!(matches!(LocalRange::in_region(g, 0x1000, 0x1001, "x"), Err(Error::AddressNotRegistered { .. })));
        // A range holds its region: removing waits for it (and for the sub-range made from it).
        drop(r);
        assert!(matches!(t.remove(0x1000, Duration::from_millis(20)), Err(Error::Timeout(_))));
        drop(s);
        // A vouched range has no region and counts as host memory.
        // SAFETY: never turned into bytes.
        let v = unsafe { LocalRange::vouched(0x5000, 8) };
        assert!(v.region().is_none() && matches!(v.access(), Access::Host));
        assert!(matches!(v.registered_in(&t, "x"), Err(Error::AddressNotRegistered { .. })));
    }

    #[test]
    fn device_locations_without_an_owner_are_unreachable() {
        let t = RegionTable::new();
        add(&t, 0x1000, 0x1000, Location::Device(MemoryKind::Cuda, 0)).unwrap();
        add(&t, 0x4000, 0x1000, Location::Other("npu:0".into())).unwrap();
        assert!(matches!(t.lookup(0x1000, 1).unwrap().access(), Access::Unreachable));
        assert!(!t.lookup(0x1000, 1).unwrap().is_host());
        assert!(t.lookup(0x4000, 1).unwrap().is_host(), "names this build does not interpret stay host memory");
    }

    #[test]
    fn held_memory_lives_as_long_as_its_region() {
        let keep = Arc::new(());
        let buf: &'static mut [u8] = Vec::leak(vec![0u8; 64]);
        let addr = buf.as_ptr() as u64;
        // SAFETY: the leaked buffer is valid for the rest of the process; `keep` only counts references.
        let memory = unsafe { OwnedMemory::new(addr, 64, Box::new(keep.clone())) };
        let t = RegionTable::new();
        t.insert_held(memory, cpu(), None).unwrap();
        let g = t.lookup(addr, 64).unwrap();
        assert_eq!(Arc::strong_count(&keep), 2);
        assert!(matches!(t.remove(addr, Duration::ZERO), Err(Error::Timeout(_))));
        assert_eq!(Arc::strong_count(&keep), 2, "kept while a guard holds the region");
        drop(g);
        assert_eq!(Arc::strong_count(&keep), 1, "released with the last guard");
        let leaked = OwnedMemory::from_static(Vec::leak(vec![0u8; 8]));
        assert_eq!(leaked.len(), 8);
        t.insert_held(leaked, cpu(), None).unwrap();
    }
}
