//! [`RocmDevice`]: AMD GPU memory as a [`MemoryDevice`].

use std::ffi::c_void;
use std::os::fd::AsFd;
use std::sync::Arc;

use mooncake_core::device::check_bounds;
use mooncake_core::registry::Availability;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, Error, Location, MemoryDevice, MemoryKind, OwnedMemory, Result,
    SharingHandle,
};

use crate::DEVICE_NAME;
use crate::env::SharingMode;
use crate::error::RocmError;
use crate::ffi;
use crate::handle::{HIP_IPC_HANDLE_KIND, HIP_POSIX_FD_HANDLE_KIND, ParsedHandle, parse_handle};
use crate::records::{Entry, Origin, Records};
use crate::runtime::{DeviceGuard, Hip, VmmHandle, hip};

/// What [`crate::probe`] says on a machine without the HIP runtime.
pub(crate) const NO_RUNTIME: &str = "libamdhip64.so not found (no ROCm runtime on this machine)";

/// Whether the HIP runtime and at least one AMD GPU are present. Never panics.
pub fn probe() -> Availability {
    let hip = match hip() {
        Ok(h) => h,
        Err(RocmError::LibraryNotFound { tried }) => {
            tracing::debug!(%tried, "HIP runtime not found");
            return Availability::Unavailable(NO_RUNTIME.into());
        }
        Err(e) => return Availability::Unavailable(e.to_string()),
    };
    match hip.device_count() {
        Ok(0) => Availability::Unavailable(format!("no AMD GPU ({} reports none)", hip.library())),
        Ok(_) => Availability::Available,
        Err(e) => Availability::Unavailable(e.to_string()),
    }
}

/// How the memory of one allocation is held; dropping it gives the memory back.
#[derive(Debug)]
enum Backing {
    /// `hipMalloc`: `hipFree`.
    Malloc { ptr: u64 },
    /// `hipIpcOpenMemHandle`: `hipIpcCloseMemHandle`.
    Ipc { ptr: u64 },
    /// `hipMemCreate` or `hipMemImportFromShareableHandle`, reserved and mapped: unmap, free the
    /// reservation, release the handle.
    Vmm { ptr: u64, mapped: usize, handle: VmmHandle },
}

/// The memory of one record.
#[derive(Debug)]
struct Memory {
    hip: &'static Hip,
    ordinal: i32,
    backing: Backing,
}

impl Drop for Memory {
    fn drop(&mut self) {
        let _current = DeviceGuard::enter(self.hip, self.ordinal).ok();
        let result = match self.backing {
            // SAFETY: the pointer came from hipMalloc and this Memory is its only owner; it is dropped once,
            // after the last record, copy or hold that could use the memory is gone.
            Backing::Malloc { ptr } => unsafe { self.hip.free(ptr) },
            // SAFETY: as above, for a mapping from hipIpcOpenMemHandle.
            Backing::Ipc { ptr } => unsafe { self.hip.ipc_close(ptr) },
            // SAFETY: as above, for a reservation with `handle` mapped over all of it.
            Backing::Vmm { ptr, mapped, handle } => unsafe { release_vmm(self.hip, ptr, mapped, handle, true) },
        };
        if let Err(e) = result {
            tracing::warn!(device = self.ordinal, error = %e, "releasing HIP memory failed");
        }
    }
}

/// Unmaps (when `mapped_in`), frees the reservation and releases the handle, reporting the first error.
///
/// # Safety
/// `[ptr, ptr+size)` is a reservation of this process (with `handle` mapped over it when `mapped_in`) that
/// nothing uses any more, and `handle` is live and not used again.
unsafe fn release_vmm(hip: &Hip, ptr: u64, size: usize, handle: VmmHandle, mapped_in: bool) -> Result<(), RocmError> {
    // SAFETY: the caller gives up the mapping, the reservation and the handle.
    let unmapped = if mapped_in { unsafe { hip.unmap(ptr, size) } } else { Ok(()) };
    // SAFETY: as above; the reservation is empty once unmapped.
    let freed = unsafe { hip.address_free(ptr, size) };
    // SAFETY: as above.
    let released = unsafe { hip.release(handle) };
    unmapped.and(freed).and(released)
}

/// Resolved side of a copy: where it starts, on which GPU, and what keeps it alive meanwhile.
struct Side {
    addr: u64,
    ordinal: i32,
    _keep: Option<Arc<Entry<Memory>>>,
}

/// AMD GPU memory through the HIP runtime (`libamdhip64`, loaded at run time).
///
/// Allocations it makes or imports are recorded: freeing, copying, holding or exporting an [`Allocation`]
/// it does not know (never made here, already freed, or a stale copy) is a typed [`Error::NotFound`].
/// Device memory it did not allocate (another library's `hipMalloc`), found with
/// [`MemoryDevice::allocation_of`], carries token 0 and is looked up again with `hipMemGetAddressRange`
/// before each copy, so a buffer freed meanwhile is an error rather than a fault. The CPU never
/// dereferences its memory: copies go through `hipMemcpy`. Dropping the device frees what it still holds.
#[derive(Debug)]
pub struct RocmDevice {
    hip: &'static Hip,
    count: u32,
    runtime_version: i32,
    vmm: Vec<bool>,
    mode: SharingMode,
    records: Records<Memory>,
}

impl RocmDevice {
    /// The device, sharing as `MC_USE_HIP_IPC` says. `Unavailable` without the HIP runtime or a GPU.
    pub fn new() -> Result<Self> {
        Self::with_sharing(SharingMode::from_env())
    }

    /// The device, sharing shareable allocations as `mode` says.
    pub fn with_sharing(mode: SharingMode) -> Result<Self> {
        Self::with_runtime(hip()?, mode)
    }

    /// The device over a given runtime (the process-wide one, or a test's fake).
    pub(crate) fn with_runtime(hip: &'static Hip, mode: SharingMode) -> Result<Self> {
        let count = hip.device_count()?;
        if count <= 0 {
            return Err(RocmError::NoDevice(format!("{} reports no GPU", hip.library())).into());
        }
        let runtime_version = hip.runtime_version()?;
        let vmm = (0..count)
            .map(|d| {
                hip.has_vmm()
                    && hip
                        .device_attribute(ffi::hipDeviceAttributeVirtualMemoryManagementSupported, d)
                        .is_ok_and(|v| v != 0)
            })
            .collect();
        let dev = RocmDevice { hip, count: count as u32, runtime_version, vmm, mode, records: Records::default() };
        tracing::debug!(library = hip.library(), count, runtime_version, vmm = ?dev.vmm, ?mode, "ROCm device ready");
        Ok(dev)
    }

    /// Number of GPUs the runtime sees.
    pub fn device_count(&self) -> u32 {
        self.count
    }

    /// `hipRuntimeGetVersion` (major * 10,000,000 + minor * 100,000 + patch).
    pub fn runtime_version(&self) -> i32 {
        self.runtime_version
    }

    /// The file the HIP runtime was loaded from.
    pub fn library(&self) -> &str {
        self.hip.library()
    }

    /// How shareable allocations are shared.
    pub fn sharing_mode(&self) -> SharingMode {
        self.mode
    }

    /// True when GPU `ordinal` supports virtual memory management and the runtime has its entry points
    /// (needed for [`HIP_POSIX_FD_HANDLE_KIND`] handles).
    pub fn supports_vmm(&self, ordinal: u32) -> bool {
        self.vmm.get(ordinal as usize).copied().unwrap_or(false)
    }

    /// Number of live allocations (made or imported).
    pub fn live_allocations(&self) -> usize {
        self.records.len()
    }

    /// Live allocations (made or imported), by address.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.records.allocations()
    }

    /// The GPU an allocation request names.
    fn ordinal_for(&self, location: &Location) -> Result<i32> {
        match location {
            Location::Detect => Ok(self.hip.get_device().unwrap_or(0)),
            Location::Device(MemoryKind::Rocm, n) if *n < self.count => Ok(*n as i32),
            Location::Device(MemoryKind::Rocm, n) => Err(Error::DeviceNotFound(format!(
                "hip:{n}: this machine has {} AMD GPU(s) (hip:0 to hip:{})",
                self.count,
                self.count - 1
            ))),
            other => {
                Err(Error::InvalidArgument(format!("the rocm device allocates GPU memory (hip:N or *), not {other}")))
            }
        }
    }

    /// The GPU memory holding `[addr, addr+len)` that this device did not allocate or import, from the
    /// runtime's own tables (token 0).
    fn foreign(&self, addr: u64, len: u64) -> Option<Allocation> {
        let a = self.hip.pointer_attributes(addr).ok()?;
        if a.r#type != ffi::hipMemoryTypeDevice || a.isManaged != 0 {
            return None; // host, unregistered or managed (host-accessible) memory
        }
        let ordinal = u32::try_from(a.device).ok()?;
        let (base, size) = self.hip.address_range(addr).ok()?;
        let end = addr.checked_add(len)?;
        (addr >= base && end <= base.checked_add(size)?).then_some(Allocation {
            addr: base,
            len: size,
            location: Location::Device(MemoryKind::Rocm, ordinal),
            token: 0,
        })
    }

    /// Checks with `hipMemGetAddressRange` that `[addr, addr+len)` still lies in one live allocation, and for
    /// memory this device does not own (`foreign`: it can be freed behind the device's back) also that
    /// `hipPointerGetAttributes` still reports device memory on `ordinal`. Imported mappings skip the
    /// attribute check: the runtime may report them on the importing GPU.
    fn recheck(&self, addr: u64, len: u64, ordinal: u32, foreign: bool, op: &str) -> Result<()> {
        let gone = |why: String| {
            Error::NotFound(format!("{op}: [{addr:#x}, +{len}) is no longer live memory of hip:{ordinal} ({why})"))
        };
        if foreign {
            let a = self.hip.pointer_attributes(addr).map_err(|e| gone(e.to_string()))?;
            if a.r#type != ffi::hipMemoryTypeDevice || a.device != ordinal as i32 {
                return Err(gone(format!("the runtime reports memory type {} on device {}", a.r#type, a.device)));
            }
        }
        let (base, size) = self.hip.address_range(addr).map_err(|e| gone(e.to_string()))?;
        if addr < base || addr.saturating_add(len) > base.saturating_add(size) {
            return Err(gone(format!("its allocation is now [{base:#x}, +{size})")));
        }
        Ok(())
    }

    /// The start and GPU of `allocation`, kept alive (own records) or rechecked (foreign and imported
    /// memory) for one copy.
    fn side(&self, allocation: &Allocation, op: &str) -> Result<Side> {
        if allocation.token != 0 {
            let e = self.records.get(allocation, op)?;
            if e.origin == Origin::Imported {
                self.recheck(e.addr, e.len, e.ordinal, false, op)?;
            }
            return Ok(Side { addr: e.addr, ordinal: e.ordinal as i32, _keep: Some(e) });
        }
        let ordinal = match allocation.location {
            Location::Device(MemoryKind::Rocm, n) => n,
            ref other => {
                return Err(Error::NotFound(format!(
                    "{op}: [{:#x}, +{}) at {other} with token 0 is not rocm memory",
                    allocation.addr, allocation.len
                )));
            }
        };
        self.recheck(allocation.addr, allocation.len, ordinal, true, op)?;
        Ok(Side { addr: allocation.addr, ordinal: ordinal as i32, _keep: None })
    }

    fn allocate_malloc(&self, ordinal: i32, len: usize) -> Result<(u64, Memory)> {
        let ptr = self.hip.malloc(len)?;
        Ok((ptr, Memory { hip: self.hip, ordinal, backing: Backing::Malloc { ptr } }))
    }

    /// `hipMemCreate` memory exportable as a POSIX fd, reserved, mapped and made accessible.
    fn allocate_vmm(&self, ordinal: i32, len: usize, alignment: usize) -> Result<(u64, Memory)> {
        let mut prop = ffi::hipMemAllocationProp::pinned_posix_fd(ordinal);
        // As upstream: NICs may register it for GPUDirect RDMA.
        prop.allocFlags.gpuDirectRDMACapable = 1;
        let granularity = self.granularity(&prop)?;
        let size = round_up(len, granularity)?;
        let handle = self.hip.mem_create(size, &prop)?;
        let (ptr, size) = self.reserve_and_map(size, granularity.max(alignment), handle, ordinal)?;
        Ok((ptr, Memory { hip: self.hip, ordinal, backing: Backing::Vmm { ptr, mapped: size, handle } }))
    }

    fn granularity(&self, prop: &ffi::hipMemAllocationProp) -> Result<usize> {
        match self.hip.granularity(prop)? {
            0 => Err(Error::unavailable("hipMemGetAllocationGranularity reported a granularity of 0")),
            g => Ok(g),
        }
    }

    /// Reserves `size` bytes, maps `handle` there and grants access; on failure gives everything back,
    /// `handle` included.
    fn reserve_and_map(&self, size: usize, alignment: usize, handle: VmmHandle, ordinal: i32) -> Result<(u64, usize)> {
        let ptr = match self.hip.address_reserve(size, alignment) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: the handle is live, mapped nowhere, and dropped here.
                if let Err(r) = unsafe { self.hip.release(handle) } {
                    tracing::warn!(error = %r, "hipMemRelease after a failed reservation");
                }
                return Err(e.into());
            }
        };
        // SAFETY: `[ptr, ptr+size)` is the fresh, empty reservation just made; `handle` is live and at least
        // `size` bytes (created with that size, or imported and mapped no further than the exporter's size).
        if let Err(e) = unsafe { self.hip.map(ptr, size, handle) } {
            // SAFETY: nothing is mapped in the reservation; neither it nor the handle is used again.
            let _ = unsafe { release_vmm(self.hip, ptr, size, handle, false) };
            return Err(e.into());
        }
        if let Err(e) = self.grant_access(ptr, size, ordinal) {
            // SAFETY: the mapping was just made and nothing else knows about it.
            let _ = unsafe { release_vmm(self.hip, ptr, size, handle, true) };
            return Err(e);
        }
        Ok((ptr, size))
    }

    /// Read-write access for every GPU (so peers can copy), or at least for `ordinal`.
    fn grant_access(&self, ptr: u64, size: usize, ordinal: i32) -> Result<()> {
        let all: Vec<_> = (0..self.count as i32).map(ffi::hipMemAccessDesc::read_write).collect();
        // SAFETY: `[ptr, ptr+size)` was just mapped by the caller.
        match unsafe { self.hip.set_access(ptr, size, &all) } {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "access for every GPU refused; granting hip:{ordinal} only");
                // SAFETY: as above.
                unsafe { self.hip.set_access(ptr, size, &[ffi::hipMemAccessDesc::read_write(ordinal)]) }
                    .map_err(Error::from)
            }
        }
    }

    fn import_ipc(&self, handle: &SharingHandle, bytes: &[u8; ffi::HIP_IPC_HANDLE_SIZE]) -> Result<Allocation> {
        let ptr = self.hip.ipc_open(bytes)?;
        let memory = |ordinal| Memory { hip: self.hip, ordinal, backing: Backing::Ipc { ptr } };
        let current = self.hip.get_device().unwrap_or(0);
        // Checked before the record exists: dropping `memory` closes the mapping.
        let fits = self.hip.address_range(ptr).map(|(base, size)| ptr.saturating_add(handle.len) <= base + size);
        if !fits.unwrap_or(false) {
            drop(memory(current));
            return Err(Error::InvalidArgument(format!(
                "{HIP_IPC_HANDLE_KIND} handle claims {} bytes, more than the exported allocation holds",
                handle.len
            )));
        }
        let ordinal = self.owner_of(ptr).unwrap_or(current);
        self.records.insert(ptr, handle.len, ordinal as u32, Origin::Imported, memory(ordinal))
    }

    fn import_posix_fd(&self, handle: &SharingHandle, fd: &std::os::fd::OwnedFd) -> Result<Allocation> {
        let current = self.hip.get_device().unwrap_or(0);
        if !self.hip.has_vmm() {
            return Err(Error::unsupported(
                format!("import_handle of kind {HIP_POSIX_FD_HANDLE_KIND} (this HIP runtime lacks the VMM API)"),
                DEVICE_NAME,
            ));
        }
        let len = usize::try_from(handle.len).map_err(|_| too_large(handle.len))?;
        let prop = ffi::hipMemAllocationProp::pinned_posix_fd(current);
        let granularity = self.granularity(&prop)?;
        let size = round_up(len, granularity)?;
        let by_value = self.runtime_version >= ffi::HIP_VERSION_FD_BY_VALUE;
        let vmm_handle = self.hip.import_fd(fd.as_fd(), by_value)?;
        let (ptr, size) = self.reserve_and_map(size, granularity, vmm_handle, current)?;
        let ordinal = self.owner_of(ptr).unwrap_or(current);
        let memory = Memory { hip: self.hip, ordinal, backing: Backing::Vmm { ptr, mapped: size, handle: vmm_handle } };
        self.records.insert(ptr, handle.len, ordinal as u32, Origin::Imported, memory)
    }

    /// The GPU the runtime says `ptr` lives on.
    fn owner_of(&self, ptr: u64) -> Option<i32> {
        let a = self.hip.pointer_attributes(ptr).ok()?;
        (a.r#type == ffi::hipMemoryTypeDevice && a.device >= 0).then_some(a.device)
    }

    fn export_ipc(&self, addr: u64, len: u64, ordinal: i32) -> Result<SharingHandle> {
        let _current = DeviceGuard::enter(self.hip, ordinal)?;
        let bytes = self.hip.ipc_get_handle(addr)?;
        Ok(SharingHandle { kind: HIP_IPC_HANDLE_KIND.into(), data: bytes.to_vec(), fd: None, len })
    }
}

impl MemoryDevice for RocmDevice {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Rocm
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities { host_accessible: false, export_handles: true, huge_pages: false, device_count: self.count }
    }

    /// `hip:N` for GPU memory (this device's records first, then `hipPointerGetAttributes` checked against
    /// `hipMemGetAddressRange`); `None` for host, unregistered and managed memory, and for a range that runs
    /// past its allocation.
    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        if let Some(e) = self.records.find(addr) {
            return e.contains(addr, len).then_some(Location::Device(MemoryKind::Rocm, e.ordinal));
        }
        self.foreign(addr, len).map(|a| a.location)
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if len == 0 {
            return Err(Error::InvalidArgument("allocation length must be greater than zero".into()));
        }
        let size = usize::try_from(len).map_err(|_| too_large(len))?;
        let alignment = options.alignment;
        if alignment != 0 && !alignment.is_power_of_two() {
            return Err(Error::InvalidArgument(format!("alignment {alignment} is not a power of two")));
        }
        let alignment = usize::try_from(alignment).map_err(|_| too_large(alignment))?;
        let ordinal = self.ordinal_for(&options.location)?;
        if options.huge_pages {
            tracing::debug!("huge_pages means nothing for GPU memory; ignored");
        }
        let _current = DeviceGuard::enter(self.hip, ordinal)?;
        let vmm = options.shareable && self.mode == SharingMode::PosixFd && self.supports_vmm(ordinal as u32);
        let (ptr, memory) =
            if vmm { self.allocate_vmm(ordinal, size, alignment)? } else { self.allocate_malloc(ordinal, size)? };
        if alignment != 0 && ptr % alignment as u64 != 0 {
            drop(memory);
            return Err(Error::InvalidArgument(format!(
                "hipMalloc returned {ptr:#x}, not aligned to {alignment}; larger alignments need \
                 shareable VMM memory (MC_USE_HIP_IPC=0)"
            )));
        }
        self.records.insert(ptr, len, ordinal as u32, Origin::Allocated, memory)
    }

    /// Frees memory this device allocated, or unmaps memory it imported (the exporter's memory stays).
    /// If a hold or a copy still uses it, the release happens when that ends.
    fn free(&self, allocation: &Allocation) -> Result<()> {
        self.records.remove(allocation).map(drop)
    }

    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        let side = self.side(allocation, "copy_to_host")?;
        check_bounds(allocation, offset, dst.len() as u64)?;
        if dst.is_empty() {
            return Ok(());
        }
        let _current = DeviceGuard::enter(self.hip, side.ordinal)?;
        let src = (side.addr + offset) as *const c_void;
        // SAFETY: `src` lies `dst.len()` bytes inside live device memory (a record kept alive by `side`, or
        // memory the runtime has just confirmed, bounds-checked above); `dst` is an exclusive host slice,
        // which device memory cannot overlap.
        unsafe { self.hip.memcpy(dst.as_mut_ptr().cast(), src, dst.len(), ffi::hipMemcpyDeviceToHost) }?;
        Ok(())
    }

    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()> {
        let side = self.side(allocation, "copy_from_host")?;
        check_bounds(allocation, offset, src.len() as u64)?;
        if src.is_empty() {
            return Ok(());
        }
        let _current = DeviceGuard::enter(self.hip, side.ordinal)?;
        let dst = (side.addr + offset) as *mut c_void;
        // SAFETY: as in copy_to_host, with the directions swapped; `src` is a live host slice.
        unsafe { self.hip.memcpy(dst, src.as_ptr().cast(), src.len(), ffi::hipMemcpyHostToDevice) }?;
        Ok(())
    }

    /// GPU to GPU: `hipMemcpy` with `hipMemcpyDefault` on one GPU, `hipMemcpyPeer` between two. Overlapping
    /// ranges are refused.
    fn copy_between(
        &self,
        src: &Allocation,
        src_offset: u64,
        dst: &Allocation,
        dst_offset: u64,
        len: u64,
    ) -> Result<()> {
        let s = self.side(src, "copy_between (source)")?;
        let d = self.side(dst, "copy_between (destination)")?;
        check_bounds(src, src_offset, len)?;
        check_bounds(dst, dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let n = usize::try_from(len).map_err(|_| too_large(len))?;
        let (from, to) = (s.addr + src_offset, d.addr + dst_offset);
        if from < to + len && to < from + len {
            return Err(Error::InvalidArgument(format!(
                "copy_between: source [{from:#x}, +{len}) and destination [{to:#x}, +{len}) overlap"
            )));
        }
        let _current = DeviceGuard::enter(self.hip, s.ordinal)?;
        // SAFETY: both ranges lie inside live device memory (records kept alive by `s` and `d`, or memory the
        // runtime has just confirmed), bounds-checked above, and do not overlap.
        unsafe {
            if s.ordinal == d.ordinal {
                self.hip.memcpy(to as *mut c_void, from as *const c_void, n, ffi::hipMemcpyDefault)
            } else {
                self.hip.memcpy_peer(to as *mut c_void, d.ordinal, from as *const c_void, s.ordinal, n)
            }
        }?;
        Ok(())
    }

    /// Keeps the allocation (made or imported here) until the returned memory is dropped, even past `free`.
    fn hold(&self, allocation: &Allocation) -> Result<OwnedMemory> {
        if allocation.token == 0 {
            return Err(Error::unsupported("hold of GPU memory this device did not allocate", DEVICE_NAME));
        }
        let e = self.records.get(allocation, "hold")?;
        let (addr, len) = (e.addr, e.len);
        // SAFETY: `e` is a live record whose Memory gives the device memory back only when the last Arc of
        // the entry is dropped, and the boxed Arc is one; `[addr, addr+len)` is that memory. It is GPU
        // memory of a device that is not host accessible, so users reach it through this device only.
        Ok(unsafe { OwnedMemory::new(addr, len, Box::new(e)) })
    }

    /// This device's record holding the range, else the GPU allocation the runtime reports (token 0).
    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        if let Some(e) = self.records.find(addr) {
            return e.contains(addr, len).then(|| e.allocation());
        }
        self.foreign(addr, len)
    }

    /// `hipMalloc` memory (and GPU memory found with `allocation_of`): [`HIP_IPC_HANDLE_KIND`]; VMM memory
    /// (allocated shareable with `MC_USE_HIP_IPC=0`): [`HIP_POSIX_FD_HANDLE_KIND`]. Imported memory cannot
    /// be exported again.
    fn export_handle(&self, allocation: &Allocation) -> Result<SharingHandle> {
        if allocation.token == 0 {
            let side = self.side(allocation, "export_handle")?;
            return self.export_ipc(side.addr, allocation.len, side.ordinal);
        }
        let e = self.records.get(allocation, "export_handle")?;
        if e.origin == Origin::Imported {
            return Err(Error::unsupported("export_handle of imported memory", DEVICE_NAME));
        }
        match e.payload.backing {
            Backing::Vmm { handle, .. } => {
                // SAFETY: the handle is live while `e` holds the record's memory.
                let fd = unsafe { self.hip.export_fd(handle) }?;
                Ok(SharingHandle {
                    kind: HIP_POSIX_FD_HANDLE_KIND.into(),
                    data: Vec::new(),
                    fd: Some(Arc::new(fd)),
                    len: e.len,
                })
            }
            Backing::Malloc { ptr } => self.export_ipc(ptr, e.len, e.ordinal as i32),
            Backing::Ipc { .. } => Err(Error::unsupported("export_handle of imported memory", DEVICE_NAME)),
        }
    }

    /// Maps a [`HIP_IPC_HANDLE_KIND`] or [`HIP_POSIX_FD_HANDLE_KIND`] handle on the calling thread's current
    /// GPU; `free` of the result unmaps it.
    fn import_handle(&self, handle: &SharingHandle) -> Result<Allocation> {
        match parse_handle(handle)? {
            ParsedHandle::Ipc(bytes) => self.import_ipc(handle, &bytes),
            ParsedHandle::PosixFd(fd) => self.import_posix_fd(handle, fd),
        }
    }

    /// `hipDeviceGetPCIBusId` of `hip:N`, lower case.
    fn pci_address(&self, location: &Location) -> Option<String> {
        match location {
            Location::Device(MemoryKind::Rocm, n) if *n < self.count => {
                self.hip.pci_bus_id(*n as i32).ok().map(|s| s.to_ascii_lowercase()).filter(|s| !s.is_empty())
            }
            _ => None,
        }
    }
}

fn round_up(len: usize, granularity: usize) -> Result<usize> {
    len.div_ceil(granularity).checked_mul(granularity).ok_or_else(|| too_large(len as u64))
}

fn too_large(len: u64) -> Error {
    Error::InvalidArgument(format!("{len} bytes do not fit in this machine's address space"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_names_the_missing_runtime_and_never_panics() {
        match probe() {
            Availability::Available => assert!(RocmDevice::new().is_ok()),
            Availability::Unavailable(why) => {
                assert!(why == NO_RUNTIME || why.contains("no AMD GPU") || why.contains("libamdhip64"), "{why}");
                match RocmDevice::new() {
                    Err(Error::Unavailable { reason }) => {
                        assert!(reason.contains("libamdhip64") || reason.contains("no AMD GPU"), "{reason}")
                    }
                    other => panic!("expected Unavailable, got {other:?}"),
                }
            }
        }
    }

    mod with_a_fake_runtime {
        use super::*;
        use crate::fake;

        fn device(mode: SharingMode) -> RocmDevice {
            RocmDevice::with_runtime(fake::runtime(70_100_000), mode).unwrap()
        }

        fn on(n: u32) -> AllocOptions {
            AllocOptions { location: Location::Device(MemoryKind::Rocm, n), ..Default::default() }
        }

        #[test]
        fn allocate_classify_copy_and_free() {
            let dev = device(SharingMode::Ipc);
            assert_eq!(dev.device_count(), 2);
            assert!(dev.supports_vmm(1) && !dev.supports_vmm(2));
            assert_eq!(dev.capabilities().device_count, 2);
            let a = dev.allocate(10_000, &on(1)).unwrap();
            assert_eq!(a.location.to_string(), "hip:1");
            assert!(fake::is_device_memory(a.addr));
            assert_eq!(dev.classify(a.addr + 10, 100), Some(a.location.clone()));
            assert_eq!(dev.classify(a.addr, a.len + 1), None, "runs past the allocation");
            assert_eq!(dev.allocation_of(a.addr + 9_999, 1), Some(a.clone()));
            let host = [0u8; 64];
            assert_eq!(dev.classify(host.as_ptr() as u64, 64), None);
            assert_eq!(dev.allocation_of(host.as_ptr() as u64, 64), None);

            dev.copy_from_host(b"hello gpu", &a, 5000).unwrap();
            let mut out = [0u8; 9];
            dev.copy_to_host(&a, 5000, &mut out).unwrap();
            assert_eq!(&out, b"hello gpu");
            assert!(matches!(dev.copy_to_host(&a, 9_995, &mut out), Err(Error::AddressNotRegistered { .. })));
            assert!(matches!(dev.copy_from_host(&out, &a, u64::MAX), Err(Error::AddressNotRegistered { .. })));
            dev.copy_to_host(&a, a.len, &mut []).unwrap();

            dev.free(&a).unwrap();
            assert!(!fake::is_device_memory(a.addr), "hipFree ran");
            assert!(matches!(dev.free(&a), Err(Error::NotFound(_))), "double free");
            assert!(matches!(dev.copy_to_host(&a, 0, &mut out), Err(Error::NotFound(_))));
            assert_eq!(dev.live_allocations(), 0);
        }

        #[test]
        fn the_callers_current_device_is_restored() {
            let dev = device(SharingMode::Ipc);
            let hip = fake::runtime(70_100_000);
            hip.set_device(1).unwrap();
            let a = dev.allocate(4096, &on(0)).unwrap();
            assert_eq!(a.location, Location::Device(MemoryKind::Rocm, 0));
            dev.copy_from_host(&[1; 16], &a, 0).unwrap();
            assert_eq!(fake::current_device(), 1, "allocation and copies leave the thread on its device");
            let d = dev.allocate(4096, &AllocOptions::default()).unwrap();
            assert_eq!(d.location, Location::Device(MemoryKind::Rocm, 1), "* means the current device");
            dev.free(&a).unwrap();
            dev.free(&d).unwrap();
            assert_eq!(fake::current_device(), 1);
            hip.set_device(0).unwrap();
        }

        #[test]
        fn bad_ordinals_locations_and_sizes() {
            let dev = device(SharingMode::Ipc);
            assert!(matches!(dev.allocate(4096, &on(2)), Err(Error::DeviceNotFound(_))));
            let cpu = AllocOptions { location: Location::Cpu(Some(0)), ..Default::default() };
            assert!(matches!(dev.allocate(4096, &cpu), Err(Error::InvalidArgument(_))));
            let cuda = AllocOptions { location: Location::Device(MemoryKind::Cuda, 0), ..Default::default() };
            assert!(matches!(dev.allocate(4096, &cuda), Err(Error::InvalidArgument(_))));
            assert!(matches!(dev.allocate(0, &on(0)), Err(Error::InvalidArgument(_))));
            assert!(matches!(
                dev.allocate(64, &AllocOptions { alignment: 48, ..on(0) }),
                Err(Error::InvalidArgument(_))
            ));
            // Page-aligned hipMalloc memory cannot promise 1 GiB alignment: refused, and given back.
            let huge_align = AllocOptions { alignment: 1 << 30, ..on(0) };
            assert!(matches!(dev.allocate(4096, &huge_align), Err(Error::InvalidArgument(_))));
            assert_eq!(dev.live_allocations(), 0);
            assert_eq!(dev.pci_address(&Location::Device(MemoryKind::Rocm, 1)).as_deref(), Some("0000:c1:00.0"));
            assert_eq!(dev.pci_address(&Location::Device(MemoryKind::Rocm, 2)), None);
            assert_eq!(dev.pci_address(&Location::Device(MemoryKind::Cuda, 0)), None);
        }

        #[test]
        fn copy_between_one_gpu_and_two() {
            let dev = device(SharingMode::Ipc);
            let a = dev.allocate(8192, &on(0)).unwrap();
            let b = dev.allocate(8192, &on(0)).unwrap();
            let c = dev.allocate(8192, &on(1)).unwrap();
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            dev.copy_from_host(&data, &a, 0).unwrap();
            dev.copy_between(&a, 100, &b, 0, 8000).unwrap();
            dev.copy_between(&b, 0, &c, 192, 8000).unwrap(); // hipMemcpyPeer
            let mut out = vec![0u8; 8000];
            dev.copy_to_host(&c, 192, &mut out).unwrap();
            assert_eq!(out, data[100..8100]);
            assert!(matches!(dev.copy_between(&a, 0, &a, 100, 200), Err(Error::InvalidArgument(_))), "overlap");
            dev.copy_between(&a, 0, &a, 4096, 4096).unwrap();
            assert!(matches!(dev.copy_between(&a, 1, &b, 0, 8192), Err(Error::AddressNotRegistered { .. })));
            dev.copy_between(&a, 0, &b, 0, 0).unwrap();
            for x in [a, b, c.clone()] {
                dev.free(&x).unwrap();
            }
            assert!(matches!(dev.copy_between(&c, 0, &c, 4096, 1), Err(Error::NotFound(_))));
        }

        #[test]
        fn foreign_memory_is_rechecked_before_each_copy() {
            let owner = device(SharingMode::Ipc);
            let other = device(SharingMode::Ipc);
            let a = owner.allocate(4096, &on(1)).unwrap();
            owner.copy_from_host(b"theirs", &a, 10).unwrap();
            let f = other.allocation_of(a.addr + 10, 6).unwrap();
            assert_eq!((f.addr, f.len, f.token), (a.addr, a.len, 0));
            assert_eq!(f.location, Location::Device(MemoryKind::Rocm, 1));
            assert_eq!(other.classify(a.addr, 4096), Some(f.location.clone()));
            let mut out = [0u8; 6];
            other.copy_to_host(&f, 10, &mut out).unwrap();
            assert_eq!(&out, b"theirs");
            assert!(matches!(other.free(&f), Err(Error::NotFound(_))));
            assert!(matches!(other.hold(&f), Err(Error::Unsupported { .. })));
            let wrong_gpu = Allocation { location: Location::Device(MemoryKind::Rocm, 0), ..f.clone() };
            assert!(matches!(other.copy_to_host(&wrong_gpu, 0, &mut out), Err(Error::NotFound(_))));
            owner.free(&a).unwrap();
            let err = other.copy_to_host(&f, 10, &mut out).unwrap_err();
            assert!(matches!(err, Error::NotFound(_)), "{err}");
            assert!(err.to_string().contains("no longer live"), "{err}");
            // A HIP call that fails leaves no sticky error behind for the application to trip over.
            let hip = fake::runtime(70_100_000);
            assert!(matches!(hip.address_range(a.addr), Err(RocmError::Hip { code: ffi::hipErrorNotFound, .. })));
            assert_eq!(fake::last_error(), 0, "the failed call's sticky error was cleared");
            assert!(matches!(other.copy_from_host(b"x", &f, 0), Err(Error::NotFound(_))));
            assert!(matches!(other.export_handle(&f), Err(Error::NotFound(_))));
            assert_eq!(other.allocation_of(a.addr, 1), None);
        }

        #[test]
        fn a_hold_defers_the_free() {
            let dev = device(SharingMode::Ipc);
            let a = dev.allocate(4096, &on(0)).unwrap();
            let held = dev.hold(&a).unwrap();
            assert_eq!((held.addr(), held.len()), (a.addr, a.len));
            dev.free(&a).unwrap();
            assert_eq!(dev.live_allocations(), 0);
            assert!(fake::is_device_memory(a.addr), "still allocated while held");
            assert!(matches!(dev.hold(&a), Err(Error::NotFound(_))));
            drop(held);
            assert!(!fake::is_device_memory(a.addr), "freed when the hold ends");
        }

        #[test]
        fn dropping_the_device_frees_what_it_holds() {
            let dev = device(SharingMode::PosixFd);
            let a = dev.allocate(4096, &on(0)).unwrap();
            let v = dev.allocate(4096, &AllocOptions { shareable: true, ..on(0) }).unwrap();
            drop(dev);
            assert!(!fake::is_device_memory(a.addr) && !fake::is_device_memory(v.addr) && !fake::is_reserved(v.addr));
        }

        #[test]
        fn ipc_export_and_import() {
            let exporter = device(SharingMode::Ipc);
            let importer = device(SharingMode::Ipc);
            let a = exporter.allocate(100_000, &AllocOptions { shareable: true, ..on(1) }).unwrap();
            exporter.copy_from_host(b"shared", &a, 0).unwrap();
            let h = exporter.export_handle(&a).unwrap();
            assert_eq!((h.kind.as_str(), h.data.len(), h.len), (HIP_IPC_HANDLE_KIND, 64, a.len));
            assert!(h.fd.is_none());
            let b = importer.import_handle(&h).unwrap();
            assert_eq!(fake::ipc_opens(a.addr), 1);
            assert_eq!(b.location, Location::Device(MemoryKind::Rocm, 1));
            let mut out = [0u8; 6];
            importer.copy_to_host(&b, 0, &mut out).unwrap();
            assert_eq!(&out, b"shared");
            assert!(matches!(importer.export_handle(&b), Err(Error::Unsupported { .. })), "no re-export");
            importer.free(&b).unwrap();
            assert_eq!(fake::ipc_opens(a.addr), 0, "free of an import closes it");
            // Claiming more than the exporter's allocation: refused, and the mapping closed again.
            let too_long = SharingHandle { len: a.len + 1, ..h.clone() };
            assert!(matches!(importer.import_handle(&too_long), Err(Error::InvalidArgument(_))));
            assert_eq!(fake::ipc_opens(a.addr), 0);
            exporter.free(&a).unwrap();
            // A handle of freed memory: the runtime's error, typed.
            assert!(matches!(importer.import_handle(&h), Err(Error::InvalidArgument(_))));
            let junk = SharingHandle { data: vec![9; 64], ..h };
            assert!(importer.import_handle(&junk).is_err());
        }

        fn posix_fd_round_trip(version: i32) {
            let exporter = RocmDevice::with_runtime(fake::runtime(version), SharingMode::PosixFd).unwrap();
            let importer = RocmDevice::with_runtime(fake::runtime(version), SharingMode::Ipc).unwrap();
            let a = exporter.allocate(100_000, &AllocOptions { shareable: true, ..on(0) }).unwrap();
            assert_eq!(a.len, 100_000, "the usable length is what was asked");
            let h = exporter.export_handle(&a).unwrap();
            assert_eq!((h.kind.as_str(), h.data.len(), h.len), (HIP_POSIX_FD_HANDLE_KIND, 0, a.len));
            let b = importer.import_handle(&h).unwrap();
            assert_ne!(a.addr, b.addr, "a second mapping of the same memory");
            exporter.copy_from_host(b"through the fd", &a, 99_000).unwrap();
            let mut out = [0u8; 14];
            importer.copy_to_host(&b, 99_000, &mut out).unwrap();
            assert_eq!(&out, b"through the fd");
            importer.copy_between(&b, 99_000, &b, 0, 14).unwrap();
            exporter.copy_to_host(&a, 0, &mut out).unwrap();
            assert_eq!(&out, b"through the fd", "writes through the import reach the exporter");
            importer.free(&b).unwrap();
            assert!(!fake::is_device_memory(b.addr) && !fake::is_reserved(b.addr), "import unmapped");
            exporter.copy_to_host(&a, 0, &mut out).unwrap();
            exporter.free(&a).unwrap();
            assert!(!fake::is_device_memory(a.addr) && !fake::is_reserved(a.addr), "unmapped, reservation freed");
            let no_fd = SharingHandle { fd: None, ..h };
            assert!(matches!(importer.import_handle(&no_fd), Err(Error::InvalidArgument(_))));
        }

        #[test]
        fn posix_fd_export_and_import_rocm_7_1() {
            posix_fd_round_trip(70_100_000);
        }

        #[test]
        fn posix_fd_export_and_import_before_rocm_7_1() {
            posix_fd_round_trip(60_400_000);
        }

        #[test]
        fn sharing_mode_decides_what_shareable_memory_is() {
            let ipc = device(SharingMode::Ipc);
            let a = ipc.allocate(4096, &AllocOptions { shareable: true, ..on(0) }).unwrap();
            assert_eq!(ipc.export_handle(&a).unwrap().kind, HIP_IPC_HANDLE_KIND);
            let fd = device(SharingMode::PosixFd);
            let b = fd.allocate(4096, &AllocOptions { shareable: true, ..on(0) }).unwrap();
            assert_eq!(fd.export_handle(&b).unwrap().kind, HIP_POSIX_FD_HANDLE_KIND);
            assert!(fake::is_reserved(b.addr), "VMM memory");
            let c = fd.allocate(4096, &on(0)).unwrap();
            assert_eq!(fd.export_handle(&c).unwrap().kind, HIP_IPC_HANDLE_KIND, "not shareable: hipMalloc");
            // VMM memory honours large alignments through its reservation.
            let d = fd.allocate(4096, &AllocOptions { shareable: true, alignment: 1 << 20, ..on(1) }).unwrap();
            assert_eq!(d.addr % (1 << 20), 0);
            ipc.free(&a).unwrap();
            for x in [b, c, d] {
                fd.free(&x).unwrap();
            }
        }

        #[test]
        fn unsupported_handle_kinds_are_refused() {
            let dev = device(SharingMode::Ipc);
            let h = SharingHandle { kind: "cuda_ipc".into(), data: vec![0; 64], fd: None, len: 4096 };
            assert!(matches!(dev.import_handle(&h), Err(Error::Unsupported { .. })));
        }
    }

    #[test]
    fn round_up_to_granularity() {
        assert_eq!(round_up(1, 4096).unwrap(), 4096);
        assert_eq!(round_up(4096, 4096).unwrap(), 4096);
        assert_eq!(round_up(4097, 2 << 20).unwrap(), 2 << 20);
        assert!(round_up(usize::MAX, 4096).is_err());
    }
}
