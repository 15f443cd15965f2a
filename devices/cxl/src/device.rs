//! [`CxlDevice`]: the [`MemoryDevice`] over the CXL region.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::device::check_bounds;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, Error, Location, MemoryDevice, MemoryKind, OwnedMemory, Result,
    SharingHandle, sync,
};

use crate::config::CxlConfig;
use crate::error::CxlError;
use crate::region::{MAX_ALIGNMENT, Region};
use crate::{FILE_HANDLE_KIND, flush, sys};

/// Driver name of the CXL device (and its registry name).
pub const DEVICE_NAME: &str = "cxl";

/// The location of region memory: `cxl:0`.
pub fn location() -> Location {
    Location::Device(MemoryKind::Cxl, 0)
}

/// One live allocation (made here, or a view of another process's allocation imported from its handle).
/// Its bytes stay reserved in the region header until the last holder drops it.
#[derive(Debug)]
struct Entry {
    region: Arc<Region>,
    offset: u64,
    len: u64,
    id: u64,
    imported: bool,
}

impl Entry {
    fn addr(&self) -> u64 {
        self.region.base() + self.offset
    }

    fn allocation(&self) -> Allocation {
        Allocation { addr: self.addr(), len: self.len, location: location(), token: self.id }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if !self.imported {
            if let Err(e) = self.region.release(self.offset) {
                tracing::warn!(offset = self.offset, error = %e, "giving back a CXL allocation failed");
            }
        }
    }
}

/// The CXL region as a memory device: allocates from the shared header (so processes on every host mapping the
/// device hand out disjoint bytes), copies with bounds checks, exports allocations as file handles.
///
/// Copies honour `MC_CXL_FLUSH` (cache lines written back after writes, invalidated before reads).
#[derive(Debug)]
pub struct CxlDevice {
    region: Arc<Region>,
    /// Live entries by (address, token): a view imported from a handle may start where an allocation does.
    table: Mutex<BTreeMap<(u64, u64), Arc<Entry>>>,
    next_id: AtomicU64,
}

/// The device of this process for each configured path: mapped once, shared by the registry, every engine and
/// the `cxl` transport.
static SHARED: Mutex<Option<(CxlConfig, Arc<CxlDevice>)>> = Mutex::new(None);

impl CxlDevice {
    /// Opens the region `config` names with a mapping of its own (tests, tools). Engines use [`CxlDevice::shared`].
    pub fn open(config: &CxlConfig) -> std::result::Result<Arc<CxlDevice>, CxlError> {
        let region = Region::open(config)?;
        Ok(Arc::new(CxlDevice { region, table: Mutex::new(BTreeMap::new()), next_id: AtomicU64::new(1) }))
    }

    /// The process-wide device of the environment's configuration (`MC_CXL_DEV_PATH` ...): opened and mapped on
    /// first use, then shared. A different configuration later opens its own.
    pub fn shared() -> std::result::Result<Arc<CxlDevice>, CxlError> {
        let config = CxlConfig::from_env()?;
        let mut slot = sync::lock(&SHARED);
        if let Some((c, dev)) = slot.as_ref() {
            if *c == config {
                return Ok(dev.clone());
            }
        }
        let dev = CxlDevice::open(&config)?;
        *slot = Some((config, dev.clone()));
        Ok(dev)
    }

    /// The mapped region (layout, publication table, owners).
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Number of live allocations of this device (made or imported).
    pub fn live_allocations(&self) -> usize {
        sync::lock(&self.table).len()
    }

    fn insert(&self, offset: u64, len: u64, imported: bool) -> Allocation {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry { region: self.region.clone(), offset, len, id, imported });
        let a = entry.allocation();
        sync::lock(&self.table).insert((a.addr, a.token), entry);
        a
    }

    fn lookup(&self, allocation: &Allocation, op: &str) -> Result<Arc<Entry>> {
        match sync::lock(&self.table).get(&(allocation.addr, allocation.token)) {
            Some(e) if e.len == allocation.len => Ok(e.clone()),
            _ => Err(Error::NotFound(format!(
                "{op}: no live CXL allocation [{:#x}, +{}) with token {} (never allocated by this device, already \
                 freed, or a stale copy)",
                allocation.addr, allocation.len, allocation.token
            ))),
        }
    }
}

impl MemoryDevice for CxlDevice {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Cxl
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities { host_accessible: true, export_handles: true, huge_pages: false, device_count: 1 }
    }

    /// `cxl:0` for any range inside the mapped region.
    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        self.region.contains(addr, len.max(1)).then(location)
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if len == 0 {
            return Err(Error::InvalidArgument("allocation length must be greater than zero".into()));
        }
        match &options.location {
            Location::Detect | Location::Device(MemoryKind::Cxl, 0) => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                    "the cxl device allocates cxl:0 memory (or *), not {other}"
                )));
            }
        }
        let align = options.alignment;
        if align != 0 && !align.is_power_of_two() {
            return Err(Error::InvalidArgument(format!("alignment {align} is not a power of two")));
        }
        if align > MAX_ALIGNMENT {
            return Err(Error::InvalidArgument(format!("alignment {align} exceeds the maximum {MAX_ALIGNMENT}")));
        }
        let offset = self.region.allocate(len, align)?;
        Ok(self.insert(offset, len, false))
    }

    fn free(&self, allocation: &Allocation) -> Result<()> {
        let mut table = sync::lock(&self.table);
        let key = (allocation.addr, allocation.token);
        match table.get(&key) {
            Some(e) if e.len == allocation.len => {
                // Given back when the last holder (a registration, a copy in progress) drops the entry.
                table.remove(&key);
                Ok(())
            }
            _ => Err(Error::NotFound(format!(
                "free: no live CXL allocation [{:#x}, +{}) with token {}",
                allocation.addr, allocation.len, allocation.token
            ))),
        }
    }

    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        let e = self.lookup(allocation, "copy_to_host")?;
        check_bounds(allocation, offset, dst.len() as u64)?;
        let src = e.addr() + offset;
        if self.region.flushes() {
            flush::invalidate(src, dst.len() as u64);
        }
        // SAFETY: `e` keeps the mapping alive and the allocation reserved for the call; the range was checked
        // against the allocation, which lies inside the mapping; `dst` is an exclusive slice; ptr::copy
        // tolerates overlap should it alias the mapping.
        unsafe { std::ptr::copy(src as usize as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()> {
        let e = self.lookup(allocation, "copy_from_host")?;
        check_bounds(allocation, offset, src.len() as u64)?;
        let dst = e.addr() + offset;
        // SAFETY: as in copy_to_host; the mapping is shared read-write.
        unsafe { std::ptr::copy(src.as_ptr(), dst as usize as *mut u8, src.len()) };
        if self.region.flushes() {
            flush::write_back(dst, src.len() as u64);
        }
        Ok(())
    }

    /// Holds the allocation: its bytes stay mapped and reserved until the hold is dropped, even if it is freed
    /// meanwhile.
    fn hold(&self, allocation: &Allocation) -> Result<OwnedMemory> {
        let e = self.lookup(allocation, "hold")?;
        let (addr, len) = (e.addr(), e.len);
        // SAFETY: the entry lies inside the shared read-write mapping its region holds, and the boxed Arc keeps
        // both the mapping and the reservation (released in Entry::drop) alive until the OwnedMemory is dropped.
        Ok(unsafe { OwnedMemory::new(addr, len, Box::new(e)) })
    }

    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        let table = sync::lock(&self.table);
        let end = addr.checked_add(len)?;
        table.range(..=(addr, u64::MAX)).rev().map(|(_, e)| e).find(|e| end <= e.addr() + e.len).map(|e| e.allocation())
    }

    fn export_handle(&self, allocation: &Allocation) -> Result<SharingHandle> {
        let e = self.lookup(allocation, "export_handle")?;
        Ok(SharingHandle {
            kind: FILE_HANDLE_KIND.into(),
            data: e.offset.to_le_bytes().to_vec(),
            fd: Some(self.region.fd().clone()),
            len: e.len,
        })
    }

    /// Imports a [`FILE_HANDLE_KIND`] handle of this same region (another process's allocation, or one of ours)
    /// as a view into our own mapping; freeing the view leaves the exporter's allocation alone. Handles of other
    /// files belong to the host device.
    fn import_handle(&self, handle: &SharingHandle) -> Result<Allocation> {
        if handle.kind != FILE_HANDLE_KIND {
            return Err(Error::unsupported(format!("import_handle of kind {:?}", handle.kind), DEVICE_NAME));
        }
        let fd =
            handle.fd.as_ref().ok_or_else(|| Error::InvalidArgument("file handle carries no descriptor".into()))?;
        if sys::file_id(fd.as_fd())? != self.region.file_id() {
            return Err(Error::unsupported(
                "import_handle of a file that is not this CXL region (map it with the host device)",
                DEVICE_NAME,
            ));
        }
        let offset = match handle.data.as_slice() {
            [] => 0,
            bytes => u64::from_le_bytes(
                bytes.try_into().map_err(|_| Error::InvalidArgument("file handle offset must be 8 bytes".into()))?,
            ),
        };
        if handle.len == 0 || self.region.addr_of(offset, handle.len).is_none() {
            return Err(Error::InvalidArgument(format!(
                "file handle [{offset:#x}, +{}) is not inside the allocatable part of the CXL region",
                handle.len
            )));
        }
        Ok(self.insert(offset, handle.len, true))
    }

    /// The named area of the region's header (see [`Region::reserve_shared`]): reserved by the first process
    /// that asks, a view for everyone after. The name is hashed (FNV-1a) into the header's table.
    fn attach_named(&self, name: &str, len: u64) -> Result<Allocation> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("a shared CXL area needs a name".into()));
        }
        let (offset, len) = self.region.reserve_shared(sys::fnv1a(name.as_bytes()), len)?;
        Ok(self.insert(offset, len, true))
    }

    fn prefault(&self, allocation: &Allocation) -> Result<()> {
        let e = self.lookup(allocation, "prefault")?;
        if let Err(err) = sys::populate_write(e.addr() as usize, e.len as usize) {
            tracing::debug!(addr = e.addr(), len = e.len, error = %err, "prefault not done");
        }
        Ok(())
    }
}

/// Whether the environment names a usable region (opens and maps it on first use; cheap afterwards).
pub(crate) fn probe() -> std::result::Result<(), String> {
    CxlDevice::shared().map(|_| ()).map_err(|e| e.to_string())
}
