//! `FarDevice`: a test-only memory device that stands in for a GPU on a machine without one. It keeps its
//! bytes in vectors and hands out addresses that are mapped nowhere in this process (non-canonical on x86-64
//! and aarch64), so a CPU access through one of them would crash the test instead of passing by luck: every
//! byte has to move through `copy_to_host` / `copy_from_host` / `copy_between`, as with real device memory.
//!
//! It declares itself `MemoryKind::Cuda`, exports handles (`far`: the exporter's address and token) that import
//! as a second address for the same bytes, and copies device to device: enough for the transport suite's GPU
//! memory pairs and the device suite's GPU cases to run on a CPU-only machine.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::device::check_bounds;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, Error, Location, MemoryDevice, MemoryKind, OwnedMemory, Result,
    SharingHandle,
};

/// Where the device's made-up address space starts: never mapped in a user process.
const BASE: u64 = 0x4000_0000_0000_0000;
/// Allocations (and imported mappings) start this far apart, so every one is aligned to it.
const SPACING: u64 = 1 << 32;
/// [`SharingHandle::kind`] of this device's handles.
pub const HANDLE_KIND: &str = "far";

/// The bytes of one allocation (shared by its imported mappings).
type Storage = Arc<Mutex<Vec<u8>>>;

/// A "GPU" whose memory lives in host vectors the CPU reaches only through the device's copies.
#[derive(Default)]
pub struct FarDevice {
    /// Start address -> (token, bytes).
    allocations: Mutex<BTreeMap<u64, (u64, Storage)>>,
    next: AtomicU64,
    /// Copies made through the device (host copies and device-to-device ones).
    pub copies: AtomicU64,
}

impl FarDevice {
    fn storage(&self, a: &Allocation) -> Result<Storage> {
        match self.allocations.lock().unwrap().get(&a.addr) {
            Some((token, v)) if *token == a.token && v.lock().unwrap().len() as u64 == a.len => Ok(v.clone()),
            _ => Err(Error::NotFound(format!("no far allocation at {:#x}", a.addr))),
        }
    }

    /// A copy of all the bytes of `a` (panics when `a` is not live: a bug in the test).
    pub fn bytes(&self, a: &Allocation) -> Vec<u8> {
        self.storage(a).unwrap().lock().unwrap().clone()
    }

    /// Maps `storage` at a fresh address.
    fn insert(&self, storage: Storage) -> Allocation {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let addr = BASE + id * SPACING;
        let len = storage.lock().unwrap().len() as u64;
        self.allocations.lock().unwrap().insert(addr, (id, storage));
        Allocation { addr, len, location: Location::Device(MemoryKind::Cuda, 0), token: id }
    }
}

impl MemoryDevice for FarDevice {
    fn name(&self) -> &str {
        "far"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Cuda
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities { host_accessible: false, export_handles: true, huge_pages: false, device_count: 1 }
    }

    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        self.allocation_of(addr, len).map(|a| a.location)
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if len == 0 {
            return Err(Error::InvalidArgument("far: zero-length allocation".into()));
        }
        let align = options.alignment;
        if align != 0 && (!align.is_power_of_two() || align > SPACING) {
            return Err(Error::InvalidArgument(format!("far: alignment {align} is not a power of two up to 4 GiB")));
        }
        if len > SPACING {
            return Err(Error::NoSpace(format!("far: {len} bytes is more than one allocation may hold")));
        }
        Ok(self.insert(Arc::new(Mutex::new(vec![0u8; len as usize]))))
    }

    fn free(&self, a: &Allocation) -> Result<()> {
        self.storage(a)?;
        self.allocations.lock().unwrap().remove(&a.addr);
        Ok(())
    }

    fn copy_to_host(&self, a: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_bounds(a, offset, dst.len() as u64)?;
        let v = self.storage(a)?;
        let v = v.lock().unwrap();
        dst.copy_from_slice(&v[offset as usize..offset as usize + dst.len()]);
        self.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn copy_from_host(&self, src: &[u8], a: &Allocation, offset: u64) -> Result<()> {
        check_bounds(a, offset, src.len() as u64)?;
        let v = self.storage(a)?;
        v.lock().unwrap()[offset as usize..offset as usize + src.len()].copy_from_slice(src);
        self.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn copy_between(
        &self,
        src: &Allocation,
        src_offset: u64,
        dst: &Allocation,
        dst_offset: u64,
        len: u64,
    ) -> Result<()> {
        check_bounds(src, src_offset, len)?;
        check_bounds(dst, dst_offset, len)?;
        let (s, d) = (self.storage(src)?, self.storage(dst)?);
        let (so, doff, n) = (src_offset as usize, dst_offset as usize, len as usize);
        if Arc::ptr_eq(&s, &d) {
            s.lock().unwrap().copy_within(so..so + n, doff);
        } else {
            // One lock at a time: two copies in opposite directions must not deadlock.
            let bytes = s.lock().unwrap()[so..so + n].to_vec();
            d.lock().unwrap()[doff..doff + n].copy_from_slice(&bytes);
        }
        self.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn hold(&self, a: &Allocation) -> Result<OwnedMemory> {
        let storage = self.storage(a)?;
        // SAFETY: the range is this device's memory (the allocation was just found live); the CPU never
        // dereferences it (the device is not host-accessible, so the engine copies through the device), and
        // the held storage keeps the bytes alive while the registration lives.
        Ok(unsafe { OwnedMemory::new(a.addr, a.len, Box::new(storage)) })
    }

    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        let map = self.allocations.lock().unwrap();
        let (start, (token, v)) = map.range(..=addr).next_back()?;
        let size = v.lock().unwrap().len() as u64;
        (addr.checked_add(len)? <= start + size).then_some(Allocation {
            addr: *start,
            len: size,
            location: Location::Device(MemoryKind::Cuda, 0),
            token: *token,
        })
    }

    fn export_handle(&self, a: &Allocation) -> Result<SharingHandle> {
        self.storage(a)?;
        let mut data = a.addr.to_le_bytes().to_vec();
        data.extend_from_slice(&a.token.to_le_bytes());
        Ok(SharingHandle { kind: HANDLE_KIND.into(), data, fd: None, len: a.len })
    }

    fn import_handle(&self, h: &SharingHandle) -> Result<Allocation> {
        let word = |i: usize| h.data.get(i * 8..i * 8 + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let (Some(addr), Some(token), true) = (word(0), word(1), h.kind == HANDLE_KIND) else {
            return Err(Error::InvalidArgument(format!("far: not a far handle ({:?})", h.kind)));
        };
        let exported = Allocation { addr, len: h.len, location: Location::Device(MemoryKind::Cuda, 0), token };
        Ok(self.insert(self.storage(&exported)?))
    }
}
