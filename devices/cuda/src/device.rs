//! [`CudaDevice`]: NVIDIA GPU memory as a [`MemoryDevice`].

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use mooncake_core::device::check_bounds;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, DmabufExport, Error, Location, MemoryDevice, MemoryKind, OwnedMemory,
    Result, SharingHandle,
};

use crate::driver::{
    CUDA_ERROR_NOT_SUPPORTED, CUDA_ERROR_OUT_OF_MEMORY, CudaError, DeviceInfo, Driver, DriverInfo, HANDLE_TYPE_FABRIC,
    HANDLE_TYPE_POSIX_FD, MEMORYTYPE_DEVICE, MEMORYTYPE_HOST, PointerInfo, RAW_HANDLE_BYTES,
};
use crate::handle::{self, CUDA_FABRIC_HANDLE_KIND, CUDA_IPC_HANDLE_KIND, CUDA_POSIX_FD_HANDLE_KIND, Parsed};
use crate::records::{AllocationKind, Entry, Records};
use crate::staging::{self, CHUNK, DIRECT_MAX, LanePipe, Lanes};
use crate::topology::{self, GpuPci};

/// Driver name of the CUDA device.
pub const DEVICE_NAME: &str = "cuda";

/// Alignment `cuMemAlloc` guarantees; larger alignments need the VMM path.
pub const MEM_ALLOC_ALIGNMENT: u64 = 256;

/// Environment variable that makes shareable allocations fabric-exportable (multi-node NVLink).
pub const USE_FABRIC_ENV: &str = "MC_USE_FABRIC";

impl From<CudaError> for Error {
    /// Out of memory becomes [`Error::NoSpace`], "not supported" [`Error::Unsupported`], a missing
    /// driver or GPU [`Error::Unavailable`]; every other driver failure is [`Error::Io`] wrapping the
    /// [`CudaError`] (find it with [`cuda_error`]).
    fn from(e: CudaError) -> Self {
        match &e {
            CudaError::LibraryMissing | CudaError::NoDevice(_) | CudaError::MissingSymbol { .. } => {
                Error::unavailable(e.to_string())
            }
            CudaError::Call { code, .. } if *code == CUDA_ERROR_OUT_OF_MEMORY => Error::NoSpace(e.to_string()),
            CudaError::Call { code, .. } if *code == CUDA_ERROR_NOT_SUPPORTED => {
                Error::unsupported(e.to_string(), DEVICE_NAME)
            }
            CudaError::Call { .. } => Error::Io(Arc::new(std::io::Error::other(e))),
        }
    }
}

/// The [`CudaError`] inside an [`Error`] made from one (driver failures other than out-of-memory,
/// not-supported and unavailable).
pub fn cuda_error(e: &Error) -> Option<&CudaError> {
    match e {
        Error::Io(io) => io.get_ref()?.downcast_ref::<CudaError>(),
        _ => None,
    }
}

/// Whether CUDA works here, for the registry: the reason names what is missing (`libcuda.so.1`,
/// `cuInit`'s error, no device, a driver too old). Never panics.
pub fn probe() -> mooncake_core::registry::Availability {
    use mooncake_core::registry::Availability;
    match Driver::get() {
        Ok(d) => {
            if d.info().devices.iter().all(|dev| !dev.dmabuf) {
                tracing::debug!(version = d.info().version, "CUDA available; dmabuf export unsupported");
            }
            Availability::Available
        }
        Err(e) => Availability::Unavailable(e.to_string()),
    }
}

/// The loaded driver's version and devices (an error says why CUDA is unusable here).
pub fn driver_info() -> std::result::Result<DriverInfo, CudaError> {
    Driver::get().map(|d| d.info().clone())
}

/// What frees one allocation; dropping it frees (so a held allocation goes when its hold ends).
#[derive(Debug)]
enum Memory {
    /// `cuMemAlloc`'d.
    Alloc { ptr: u64, ctx: u32 },
    /// Reserved and mapped (own VMM allocation or VMM import); the handle was released after mapping.
    Mapped { ptr: u64, size: u64, ctx: u32 },
    /// Opened with `cuIpcOpenMemHandle`.
    Ipc { ptr: u64, ctx: u32 },
    /// Given back already.
    Released,
}

impl Memory {
    fn release(&mut self) -> std::result::Result<(), CudaError> {
        let this = std::mem::replace(self, Memory::Released);
        if matches!(this, Memory::Released) {
            return Ok(());
        }
        let driver = Driver::get()?;
        match this {
            Memory::Alloc { ptr, ctx } => {
                let _c = driver.enter(ctx)?;
                // SAFETY: our cuMemAlloc allocation, freed once (the state is now Released); no copy
                // uses it: copies hold the entry, and release runs when the last holder is gone.
                unsafe { driver.mem_free(ptr) }
            }
            Memory::Mapped { ptr, size, ctx } => {
                let _c = driver.enter(ctx)?;
                // SAFETY: our mapping of the reservation [ptr, ptr+size), unused (as above).
                unsafe { driver.mem_unmap(ptr, size) }?;
                // SAFETY: the reservation is ours and now unmapped.
                unsafe { driver.address_free(ptr, size) }
            }
            Memory::Ipc { ptr, ctx } => {
                let _c = driver.enter(ctx)?;
                // SAFETY: opened by us with cuIpcOpenMemHandle, closed once, unused (as above).
                unsafe { driver.ipc_close(ptr) }
            }
            Memory::Released => Ok(()),
        }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "freeing CUDA memory failed");
        }
    }
}

/// Device memory resolved for one operation: where it is and which context reaches it.
struct Target {
    /// Start of the allocation.
    addr: u64,
    /// Device whose context reaches it.
    ctx: u32,
    /// `None` for memory this device did not make (token 0).
    kind: Option<AllocationKind>,
    /// Keeps own and imported memory allocated for the operation.
    _hold: Option<Arc<Entry<Memory>>>,
}

/// NVIDIA GPU memory through the CUDA driver API (loaded at run time).
///
/// Allocations made or imported here are recorded; freeing, copying or exporting an [`Allocation`]
/// the device does not hold is a typed [`Error::NotFound`]. Memory allocated by others in this
/// process (PyTorch's caching allocator, for instance) is described by
/// [`MemoryDevice::allocation_of`] with token 0 and checked against the driver before each use, so a
/// buffer freed meanwhile is an error, never a crash. Dropping the device frees what it still holds
/// (held allocations when their hold ends).
pub struct CudaDevice {
    driver: &'static Driver,
    records: Records<Memory>,
    lanes: Lanes,
    use_fabric: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("driver", self.driver.info())
            .field("live_allocations", &self.records.len())
            .field("use_fabric", &self.use_fabric)
            .finish()
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false" | "no" | "off"))
}

/// Rounds `len` up to a multiple of `granularity` (a power of two or any positive number).
pub(crate) fn round_up(len: u64, granularity: u64) -> Option<u64> {
    len.checked_add(granularity - 1).map(|v| v / granularity * granularity)
}

/// The host-page-aligned window a dmabuf of `[addr, addr+len)` must cover: its start, size and
/// the offset of `addr` inside it (what `cuMemGetHandleForAddressRange` requires).
pub fn dmabuf_window(addr: u64, len: u64, page: u64) -> Option<(u64, u64, u64)> {
    if len == 0 || !page.is_power_of_two() {
        return None;
    }
    let start = addr & !(page - 1);
    let end = round_up(addr.checked_add(len)?, page)?;
    Some((start, end - start, addr - start))
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

impl CudaDevice {
    /// The CUDA device, or [`Error::Unavailable`] naming why CUDA cannot be used here (`libcuda.so.1`
    /// missing, `cuInit` failed, no device, driver too old). Fabric export follows
    /// [`USE_FABRIC_ENV`].
    pub fn new() -> Result<CudaDevice> {
        let driver = Driver::get()?;
        Ok(CudaDevice {
            driver,
            records: Records::default(),
            lanes: Lanes::new(driver.device_count()),
            use_fabric: env_flag(USE_FABRIC_ENV),
        })
    }

    /// Makes shareable allocations fabric-exportable (where the GPU supports it) or not,
    /// overriding [`USE_FABRIC_ENV`].
    pub fn with_fabric(mut self, on: bool) -> CudaDevice {
        self.use_fabric = on;
        self
    }

    /// Driver version and devices.
    pub fn driver_info(&self) -> &DriverInfo {
        self.driver.info()
    }

    /// One GPU's properties.
    pub fn device_info(&self, ordinal: u32) -> Option<&DeviceInfo> {
        self.driver.device(ordinal)
    }

    /// Number of visible GPUs.
    pub fn device_count(&self) -> u32 {
        self.driver.device_count()
    }

    /// How a live allocation of this device was made (`None` when it holds no such allocation).
    pub fn allocation_kind(&self, allocation: &Allocation) -> Option<AllocationKind> {
        self.records.get(allocation, "allocation_kind").ok().map(|e| e.kind)
    }

    /// Live allocations (made or imported), by address.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.records.allocations()
    }

    /// Number of live allocations.
    pub fn live_allocations(&self) -> usize {
        self.records.len()
    }

    /// [`MemoryDevice::import_handle`] in device `ordinal`'s context (for legacy IPC handles, the
    /// device whose context opens the memory; VMM imports are mapped for every device that can
    /// reach the memory whatever `ordinal` is).
    pub fn import_handle_on(&self, handle: &SharingHandle, ordinal: u32) -> Result<Allocation> {
        let parsed = handle::parse(handle)?;
        self.check_ordinal(ordinal)?;
        self.import_parsed(&parsed, handle.len, &[ordinal])
    }

    /// Upstream's topology-matrix entries `{"cuda:N": [[preferred nics], [other nics]]}` for every
    /// GPU, from the sysfs tree at `sysfs_root` (normally `/sys`); GPUs are matched by PCI address.
    pub fn nic_affinity(&self, sysfs_root: &Path) -> Result<serde_json::Value> {
        let gpus: Vec<GpuPci> = self
            .driver
            .info()
            .devices
            .iter()
            .map(|d| GpuPci { ordinal: d.ordinal, pci_bus_id: d.pci_bus_id.clone() })
            .collect();
        Ok(topology::nic_affinity(&gpus, sysfs_root)?)
    }

    fn check_ordinal(&self, ordinal: u32) -> Result<()> {
        let count = self.driver.device_count();
        if ordinal < count {
            Ok(())
        } else {
            Err(Error::DeviceNotFound(format!(
                "cuda:{ordinal}: this process sees {count} CUDA device(s) (cuda:0..cuda:{}); check CUDA_VISIBLE_DEVICES",
                count - 1
            )))
        }
    }

    /// The GPU an allocation request names.
    fn requested_ordinal(&self, location: &Location) -> Result<u32> {
        match location {
            Location::Detect => Ok(0),
            Location::Device(MemoryKind::Cuda, n) => {
                self.check_ordinal(*n)?;
                Ok(*n)
            }
            other => {
                Err(Error::InvalidArgument(format!("the CUDA device allocates GPU memory (cuda:N or *), not {other}")))
            }
        }
    }

    /// What the driver says about a device address: its pointer info and enclosing allocation,
    /// `None` when it is not plain device memory (host, registered host, managed, unknown). The
    /// range is asked in the memory's device's context, then in `ctx` (the context an import was
    /// opened in), then in the thread's preferred one.
    fn lookup(&self, addr: u64, ctx: Option<u32>) -> Option<(PointerInfo, u64, u64)> {
        let info = {
            let _c = self.driver.enter(ctx.unwrap_or_else(|| self.driver.preferred_device())).ok()?;
            self.driver.pointer_info(addr).ok()?
        };
        if info.memory_type != MEMORYTYPE_DEVICE || info.managed || info.ordinal >= self.driver.device_count() {
            return None;
        }
        let mut tried = Vec::with_capacity(3);
        for c in [Some(info.ordinal), ctx, Some(self.driver.preferred_device())].into_iter().flatten() {
            if tried.contains(&c) {
                continue;
            }
            tried.push(c);
            let Ok(_c) = self.driver.enter(c) else { continue };
            if let Ok((base, size)) = self.driver.address_range(addr) {
                return Some((info, base, size));
            }
        }
        None
    }

    /// The memory an allocation names, checked: own and imported ones against the records (and
    /// imported ones against the driver), foreign ones (token 0) against the driver.
    fn resolve(&self, allocation: &Allocation, op: &str) -> Result<Target> {
        if allocation.token != 0 {
            let e = self.records.get(allocation, op)?;
            if e.kind.is_imported() {
                self.check_alive(e.addr, e.len, e.ctx_ordinal, op)?;
            }
            return Ok(Target { addr: e.addr, ctx: e.ctx_ordinal, kind: Some(e.kind), _hold: Some(e) });
        }
        match self.lookup(allocation.addr, None) {
            Some((info, base, size)) if base == allocation.addr && size == allocation.len => {
                Ok(Target { addr: base, ctx: info.ordinal, kind: None, _hold: None })
            }
            found => Err(Error::NotFound(format!(
                "{op}: no live CUDA allocation [{:#x}, +{}) ({}); it was freed, or never was device memory",
                allocation.addr,
                allocation.len,
                match found {
                    Some((_, b, s)) => format!("the driver reports [{b:#x}, +{s}) there"),
                    None => "the driver knows no device memory there".into(),
                }
            ))),
        }
    }

    /// Checks with the driver that `[addr, addr+len)` is still mapped device memory.
    fn check_alive(&self, addr: u64, len: u64, ctx: u32, op: &str) -> Result<()> {
        match self.lookup(addr, Some(ctx)) {
            Some((_, base, size)) if base <= addr && addr + len <= base + size => Ok(()),
            _ => Err(Error::NotFound(format!(
                "{op}: imported CUDA memory [{addr:#x}, +{len}) is no longer mapped (its exporter freed it or exited)"
            ))),
        }
    }

    fn allocate_plain(&self, len: u64, ordinal: u32) -> Result<Allocation> {
        let _c = self.driver.enter(ordinal)?;
        let ptr = self.driver.mem_alloc(len)?;
        let memory = Memory::Alloc { ptr, ctx: ordinal };
        self.records.insert(ptr, len, ordinal, ordinal, AllocationKind::MemAlloc, memory)
    }

    fn allocate_vmm(&self, len: u64, align: u64, ordinal: u32) -> Result<Allocation> {
        let info = self.driver.device(ordinal).ok_or_else(|| Error::DeviceNotFound(format!("cuda:{ordinal}")))?;
        let _c = self.driver.enter(ordinal)?;
        let base_types = if info.posix_fd { HANDLE_TYPE_POSIX_FD } else { 0 };
        let want_fabric = self.use_fabric && info.fabric;
        let types = if want_fabric { base_types | HANDLE_TYPE_FABRIC } else { base_types };
        let prop = self.driver.vmm_prop(ordinal, types, info.rdma_with_vmm);
        let granularity = self.driver.granularity(&prop)?;
        let size = round_up(len, granularity)
            .ok_or_else(|| Error::InvalidArgument(format!("allocation length {len} overflows")))?;
        let (handle, fabric) = match self.driver.mem_create(size, &prop) {
            Ok(h) => (h, want_fabric),
            Err(e) if want_fabric => {
                // Fabric handles need an IMEX channel; without one, fall back to fd sharing.
                tracing::warn!(error = %e, ordinal, "cuMemCreate with fabric handles failed; allocating without");
                let prop = self.driver.vmm_prop(ordinal, base_types, info.rdma_with_vmm);
                (self.driver.mem_create(size, &prop)?, false)
            }
            Err(e) => return Err(e.into()),
        };
        let peers = self.peers_of(ordinal);
        let (ptr, granted) = self.map_handle(handle, size, align.max(granularity), &peers)?;
        let memory = Memory::Mapped { ptr, size, ctx: ordinal };
        if granted.first() != Some(&ordinal) {
            drop(memory);
            return Err(Error::unavailable(format!("cuMemSetAccess refused cuda:{ordinal} access to its own memory")));
        }
        self.records.insert(ptr, len, ordinal, ordinal, AllocationKind::Vmm { fabric }, memory)
    }

    /// Devices that can reach memory of `ordinal` (itself first).
    fn peers_of(&self, ordinal: u32) -> Vec<u32> {
        let mut v = vec![ordinal];
        v.extend((0..self.driver.device_count()).filter(|&d| d != ordinal && self.driver.can_access_peer(d, ordinal)));
        v
    }

    /// Reserves address space, maps `handle` there and grants read-write access to the devices of
    /// `access` that can have it (at least one must). Returns the address and the devices granted,
    /// in `access` order. Always consumes (releases) `handle`; a context must be current.
    fn map_handle(
        &self,
        handle: u64,
        size: u64,
        align: u64,
        access: &[u32],
    ) -> std::result::Result<(u64, Vec<u32>), CudaError> {
        let release = |h| {
            if let Err(e) = self.driver.mem_release(h) {
                tracing::warn!(error = %e, "cuMemRelease failed");
            }
        };
        let ptr = match self.driver.address_reserve(size, align) {
            Ok(p) => p,
            Err(e) => {
                release(handle);
                return Err(e);
            }
        };
        let undo = |ptr| {
            // SAFETY: our reservation, with nothing mapped (mapping failed or was just undone).
            if let Err(e) = unsafe { self.driver.address_free(ptr, size) } {
                tracing::warn!(error = %e, "cuMemAddressFree failed");
            }
        };
        if let Err(e) = self.driver.mem_map(ptr, size, handle) {
            undo(ptr);
            release(handle);
            return Err(e);
        }
        // The mapping holds its own reference to the physical memory.
        release(handle);
        let granted = match self.driver.set_access(ptr, size, access) {
            Ok(()) => Ok(access.to_vec()),
            Err(all) => {
                // Grant what can be granted one device at a time.
                let mut granted = Vec::new();
                for &d in access {
                    match self.driver.set_access(ptr, size, &[d]) {
                        Ok(()) => granted.push(d),
                        Err(e) => tracing::debug!(error = %e, device = d, "no access from this device"),
                    }
                }
                if granted.is_empty() { Err(all) } else { Ok(granted) }
            }
        };
        match granted {
            Ok(g) => Ok((ptr, g)),
            Err(e) => {
                // SAFETY: just mapped by us, never handed out.
                if let Err(u) = unsafe { self.driver.mem_unmap(ptr, size) } {
                    tracing::warn!(error = %u, "cuMemUnmap failed");
                }
                undo(ptr);
                Err(e)
            }
        }
    }

    /// Imports a checked handle, trying the contexts of `ordinals` in turn for legacy IPC handles.
    fn import_parsed(&self, parsed: &Parsed, len: u64, ordinals: &[u32]) -> Result<Allocation> {
        let vmm = |ctx: u32| -> Result<()> {
            match self.driver.device(ctx) {
                Some(d) if d.vmm => Ok(()),
                _ => Err(Error::unsupported(
                    format!("import_handle of fd or fabric handles on cuda:{ctx} (no virtual memory management)"),
                    DEVICE_NAME,
                )),
            }
        };
        match parsed {
            Parsed::Ipc(bytes) => self.import_ipc(bytes, len, ordinals),
            Parsed::Fabric(bytes) => {
                let ctx = ordinals.first().copied().unwrap_or(0);
                vmm(ctx)?;
                let _c = self.driver.enter(ctx)?;
                let h = self.driver.import_fabric(bytes)?;
                self.import_vmm(h, len, ctx, true)
            }
            Parsed::PosixFd(fd) => {
                let ctx = ordinals.first().copied().unwrap_or(0);
                vmm(ctx)?;
                let _c = self.driver.enter(ctx)?;
                let h = self.driver.import_fd(*fd)?;
                self.import_vmm(h, len, ctx, false)
            }
        }
    }

    fn import_ipc(&self, bytes: &[u8; RAW_HANDLE_BYTES], len: u64, ordinals: &[u32]) -> Result<Allocation> {
        // Errors that mean "this context cannot open it, another device's might".
        const RETRY: [u32; 3] = [101 /* INVALID_DEVICE */, 217 /* PEER_ACCESS_UNSUPPORTED */, 705];
        let mut last = None;
        for &ctx in ordinals {
            let _c = self.driver.enter(ctx)?;
            let ptr = match self.driver.ipc_open(bytes) {
                Ok(p) => p,
                Err(e) if e.code().is_some_and(|c| RETRY.contains(&c)) => {
                    last = Some(e);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let memory = Memory::Ipc { ptr, ctx };
            let (base, size) = self.driver.address_range(ptr)?;
            if base != ptr || size < len {
                drop(memory);
                return Err(Error::InvalidArgument(format!(
                    "{CUDA_IPC_HANDLE_KIND} handle claims {len} bytes but the exported allocation holds {size}"
                )));
            }
            let ordinal = self.driver.pointer_info(ptr).map(|i| i.ordinal).unwrap_or(ctx);
            let ordinal = if ordinal < self.driver.device_count() { ordinal } else { ctx };
            return self.records.insert(ptr, len, ordinal, ctx, AllocationKind::ImportedIpc, memory);
        }
        Err(last.map(Error::from).unwrap_or_else(|| Error::InvalidArgument("no device to import on".into())))
    }

    /// Maps an imported VMM handle for every device that can reach it (a context must be current).
    fn import_vmm(&self, handle: u64, len: u64, ctx: u32, fabric: bool) -> Result<Allocation> {
        let prop = match self.driver.handle_prop(handle) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.driver.mem_release(handle);
                return Err(e.into());
            }
        };
        let count = self.driver.device_count();
        let owner = u32::try_from(prop.location.id).ok().filter(|o| *o < count);
        let granularity = match self.driver.granularity(&prop) {
            Ok(g) => g,
            Err(e) => {
                let _ = self.driver.mem_release(handle);
                return Err(e.into());
            }
        };
        let Some(size) = round_up(len, granularity) else {
            let _ = self.driver.mem_release(handle);
            return Err(Error::InvalidArgument(format!("handle length {len} overflows")));
        };
        // Same-node memory: its device and the peers that reach it. Fabric memory from another
        // node: every local device (the driver refuses the ones that cannot).
        let access = match owner {
            Some(o) if !fabric => self.peers_of(o),
            Some(o) => std::iter::once(o).chain((0..count).filter(|d| *d != o)).collect(),
            None => std::iter::once(ctx).chain((0..count).filter(|d| *d != ctx)).collect(),
        };
        let (ptr, granted) = self.map_handle(handle, size, granularity, &access)?;
        // Copies run in the owner's context when it was granted access, else the first that was.
        let ctx = owner.filter(|o| granted.contains(o)).unwrap_or(granted[0]);
        let memory = Memory::Mapped { ptr, size, ctx };
        self.records.insert(ptr, len, owner.unwrap_or(ctx), ctx, AllocationKind::ImportedVmm, memory)
    }

    /// Device to host through a lane: direct for small or pinned destinations, staged otherwise.
    fn download(&self, ctx: u32, src: u64, dst: &mut [u8]) -> Result<()> {
        let _c = self.driver.enter(ctx)?;
        let mut lane = self.lanes.take(self.driver, ctx)?;
        let r = if dst.len() <= DIRECT_MAX || self.is_pinned(dst.as_ptr()) {
            // SAFETY: `dst` is an exclusive live slice of dst.len() bytes, not touched until the
            // stream sync below returns; the device range was checked by the caller.
            unsafe { self.driver.dtoh_async(dst.as_mut_ptr(), src, dst.len(), lane.stream()) }
                .and_then(|()| lane.sync(self.driver))
        } else {
            LanePipe::new(self.driver, &mut lane, src).and_then(|mut p| staging::download(&mut p, dst, CHUNK))
        };
        self.finish(lane, r)
    }

    /// Host to device through a lane: direct for small or pinned sources, staged otherwise.
    fn upload(&self, ctx: u32, src: &[u8], dst: u64) -> Result<()> {
        let _c = self.driver.enter(ctx)?;
        let mut lane = self.lanes.take(self.driver, ctx)?;
        let r = if src.len() <= DIRECT_MAX || self.is_pinned(src.as_ptr()) {
            // SAFETY: `src` is a live slice, borrowed (so unchanged) until the stream sync below
            // returns; the device range was checked by the caller.
            unsafe { self.driver.htod_async(dst, src.as_ptr(), src.len(), lane.stream()) }
                .and_then(|()| lane.sync(self.driver))
        } else {
            LanePipe::new(self.driver, &mut lane, dst).and_then(|mut p| staging::upload(&mut p, src, CHUNK))
        };
        self.finish(lane, r)
    }

    /// Ends a copy: after an error the lane's stream is drained before its buffers can be reused.
    fn finish(&self, mut lane: staging::Lane, r: std::result::Result<(), CudaError>) -> Result<()> {
        if r.is_err() {
            // Nothing queued may outlive the call: the caller's slice is released on return.
            if let Err(e) = lane.sync(self.driver) {
                tracing::warn!(error = %e, "stream failed after a failed copy");
            }
        }
        self.lanes.give(lane);
        r.map_err(Error::from)
    }

    /// True when host memory at `p` is page-locked (registered or `cuMemHostAlloc`'d), so the
    /// driver can DMA it directly.
    fn is_pinned(&self, p: *const u8) -> bool {
        self.driver.pointer_info(p as u64).is_ok_and(|i| i.memory_type == MEMORYTYPE_HOST)
    }
}

impl MemoryDevice for CudaDevice {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Cuda
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            host_accessible: false,
            export_handles: true,
            huge_pages: false,
            device_count: self.driver.device_count(),
        }
    }

    /// `cuda:N` for plain device memory inside one allocation; `None` for host memory (pinned or
    /// not), managed memory (the host device classifies it) and ranges crossing an allocation's end.
    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        if let Some(e) = self.records.containing(addr, len) {
            return Some(Location::Device(MemoryKind::Cuda, e.ordinal));
        }
        let (info, base, size) = self.lookup(addr, None)?;
        let end = addr.checked_add(len)?;
        (end <= base + size).then_some(Location::Device(MemoryKind::Cuda, info.ordinal))
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if len == 0 {
            return Err(Error::InvalidArgument("allocation length must be greater than zero".into()));
        }
        let align = options.alignment;
        if align != 0 && !align.is_power_of_two() {
            return Err(Error::InvalidArgument(format!("alignment {align} is not a power of two")));
        }
        let ordinal = self.requested_ordinal(&options.location)?;
        let info = self.driver.device(ordinal).ok_or_else(|| Error::DeviceNotFound(format!("cuda:{ordinal}")))?;
        if (options.shareable || align > MEM_ALLOC_ALIGNMENT) && info.vmm {
            return self.allocate_vmm(len, align, ordinal);
        }
        if align > MEM_ALLOC_ALIGNMENT {
            return Err(Error::InvalidArgument(format!(
                "alignment {align} needs virtual memory management, which cuda:{ordinal} lacks (at most {MEM_ALLOC_ALIGNMENT})"
            )));
        }
        // Without VMM, cuMemAlloc memory is still shareable through legacy CUDA IPC.
        self.allocate_plain(len, ordinal)
    }

    fn free(&self, allocation: &Allocation) -> Result<()> {
        self.records.free(allocation, |m| m.release().map_err(Error::from))?;
        Ok(())
    }

    /// Holds the allocation's record: the memory stays allocated until the hold is dropped, even
    /// if [`MemoryDevice::free`] runs first.
    fn hold(&self, allocation: &Allocation) -> Result<OwnedMemory> {
        let e = self.records.get(allocation, "hold")?;
        let (addr, len) = (e.addr, e.len);
        // SAFETY: `e` is a live allocation of this device (address, token and length checked);
        // the boxed Arc keeps its Memory (and so the device memory) alive until the OwnedMemory is
        // dropped. It is GPU memory: this device is not host-accessible, so users never
        // dereference it and move its bytes through this device's copies.
        Ok(unsafe { OwnedMemory::new(addr, len, Box::new(e)) })
    }

    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        if let Some(e) = self.records.containing(addr, len) {
            return Some(e.allocation());
        }
        let (info, base, size) = self.lookup(addr, None)?;
        let end = addr.checked_add(len)?;
        (end <= base + size).then_some(Allocation {
            addr: base,
            len: size,
            location: Location::Device(MemoryKind::Cuda, info.ordinal),
            token: 0,
        })
    }

    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        let t = self.resolve(allocation, "copy_to_host")?;
        check_bounds(allocation, offset, dst.len() as u64)?;
        if dst.is_empty() {
            return Ok(());
        }
        self.download(t.ctx, t.addr + offset, dst)
    }

    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()> {
        let t = self.resolve(allocation, "copy_from_host")?;
        check_bounds(allocation, offset, src.len() as u64)?;
        if src.is_empty() {
            return Ok(());
        }
        self.upload(t.ctx, src, t.addr + offset)
    }

    fn copy_between(
        &self,
        src: &Allocation,
        src_offset: u64,
        dst: &Allocation,
        dst_offset: u64,
        len: u64,
    ) -> Result<()> {
        let s = self.resolve(src, "copy_between")?;
        let d = self.resolve(dst, "copy_between")?;
        check_bounds(src, src_offset, len)?;
        check_bounds(dst, dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (from, to) = (s.addr + src_offset, d.addr + dst_offset);
        if from < to + len && to < from + len {
            return Err(Error::InvalidArgument(format!(
                "copy_between: source [{from:#x}, +{len}) and destination [{to:#x}, +{len}) overlap"
            )));
        }
        let n = usize::try_from(len).map_err(|_| Error::InvalidArgument(format!("{len} bytes")))?;
        let _c = self.driver.enter(s.ctx)?;
        let mut lane = self.lanes.take(self.driver, s.ctx)?;
        let r = if s.ctx == d.ctx {
            // SAFETY: both ranges were checked against live allocations reachable in this context
            // (held for the call) and do not overlap; the stream sync waits for the copy.
            unsafe { self.driver.dtod_async(to, from, n, lane.stream()) }
        } else {
            // SAFETY: as above, each range in its own device's context.
            unsafe { self.driver.peer_async(to, d.ctx, from, s.ctx, n, lane.stream()) }
        }
        .and_then(|()| lane.sync(self.driver));
        self.finish(lane, r)
    }

    fn export_handle(&self, allocation: &Allocation) -> Result<SharingHandle> {
        let t = self.resolve(allocation, "export_handle")?;
        let _c = self.driver.enter(t.ctx)?;
        match t.kind {
            None | Some(AllocationKind::MemAlloc) => {
                let data = self.driver.ipc_get(t.addr)?;
                Ok(SharingHandle {
                    kind: CUDA_IPC_HANDLE_KIND.into(),
                    data: data.to_vec(),
                    fd: None,
                    len: allocation.len,
                })
            }
            Some(AllocationKind::Vmm { fabric }) => {
                let h = self.driver.retain_allocation_handle(t.addr)?;
                let out = if fabric && self.use_fabric {
                    self.driver.export_fabric(h).map(|data| SharingHandle {
                        kind: CUDA_FABRIC_HANDLE_KIND.into(),
                        data: data.to_vec(),
                        fd: None,
                        len: allocation.len,
                    })
                } else {
                    self.driver.export_fd(h).map(|fd| SharingHandle {
                        kind: CUDA_POSIX_FD_HANDLE_KIND.into(),
                        data: Vec::new(),
                        fd: Some(Arc::new(fd)),
                        len: allocation.len,
                    })
                };
                if let Err(e) = self.driver.mem_release(h) {
                    tracing::warn!(error = %e, "cuMemRelease after export failed");
                }
                Ok(out?)
            }
            Some(AllocationKind::ImportedIpc | AllocationKind::ImportedVmm) => Err(Error::unsupported(
                "export_handle of memory imported from another process (export it from its owner)",
                DEVICE_NAME,
            )),
        }
    }

    /// Maps a [`CUDA_IPC_HANDLE_KIND`], [`CUDA_FABRIC_HANDLE_KIND`] or
    /// [`CUDA_POSIX_FD_HANDLE_KIND`] handle. Legacy IPC handles open in the calling thread's
    /// current device's context (device 0 without one), then other devices' if that one cannot
    /// reach the memory; see [`CudaDevice::import_handle_on`] to choose.
    fn import_handle(&self, handle: &SharingHandle) -> Result<Allocation> {
        let parsed = handle::parse(handle)?;
        let first = self.driver.current_device().unwrap_or(0);
        let order: Vec<u32> =
            std::iter::once(first).chain((0..self.driver.device_count()).filter(|d| *d != first)).collect();
        self.import_parsed(&parsed, handle.len, &order)
    }

    fn pci_address(&self, location: &Location) -> Option<String> {
        match location {
            Location::Device(MemoryKind::Cuda, n) => self.driver.device(*n).map(|d| d.pci_bus_id.clone()),
            _ => None,
        }
    }

    fn export_dmabuf(&self, addr: u64, len: u64) -> Result<DmabufExport> {
        if len == 0 {
            return Err(Error::InvalidArgument("export_dmabuf of zero bytes".into()));
        }
        let (info, base, size) = self.lookup(addr, None).ok_or_else(|| Error::AddressNotRegistered {
            addr,
            len,
            context: "export_dmabuf: not CUDA device memory".into(),
        })?;
        if addr.checked_add(len).is_none_or(|end| end > base + size) {
            return Err(Error::AddressNotRegistered {
                addr,
                len,
                context: format!("export_dmabuf: crosses the end of the CUDA allocation [{base:#x}, +{size})"),
            });
        }
        let dev =
            self.driver.device(info.ordinal).ok_or_else(|| Error::DeviceNotFound(format!("cuda:{}", info.ordinal)))?;
        if !dev.dmabuf {
            return Err(Error::unsupported(
                format!(
                    "export_dmabuf on cuda:{} (needs CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED and a CUDA 11.7+ driver; \
                     driver is {})",
                    info.ordinal,
                    self.driver.info().version_string()
                ),
                DEVICE_NAME,
            ));
        }
        let (start, span, offset) = dmabuf_window(addr, len, host_page_size())
            .ok_or_else(|| Error::InvalidArgument(format!("dmabuf range [{addr:#x}, +{len}) overflows")))?;
        let _c = self.driver.enter(info.ordinal)?;
        let fd = self.driver.dmabuf_fd(start, span)?;
        tracing::debug!(addr, len, start, span, fd = fd.as_raw_fd(), "exported dmabuf");
        Ok(DmabufExport { fd, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_dmabuf_windows() {
        assert_eq!(round_up(1, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(2 << 20, 2 << 20), Some(2 << 20));
        assert_eq!(round_up(u64::MAX, 4096), None);
        assert_eq!(dmabuf_window(0x10_0000, 4096, 4096), Some((0x10_0000, 4096, 0)));
        assert_eq!(dmabuf_window(0x10_0010, 4096, 4096), Some((0x10_0000, 8192, 0x10)));
        assert_eq!(dmabuf_window(0x10_0ff0, 0x20, 4096), Some((0x10_0000, 8192, 0xff0)));
        assert_eq!(dmabuf_window(0x10_0000, 0, 4096), None);
        assert_eq!(dmabuf_window(u64::MAX - 10, 100, 4096), None);
        assert_eq!(dmabuf_window(0, 1, 3000), None);
    }

    #[test]
    fn driver_errors_map_to_typed_core_errors() {
        let call = |code, name: &str| CudaError::Call { call: "cuMemAlloc", code, name: name.into() };
        assert!(matches!(Error::from(call(2, "CUDA_ERROR_OUT_OF_MEMORY")), Error::NoSpace(_)));
        assert!(matches!(Error::from(call(801, "CUDA_ERROR_NOT_SUPPORTED")), Error::Unsupported { .. }));
        let e = Error::from(CudaError::LibraryMissing);
        assert!(matches!(&e, Error::Unavailable { reason } if reason.contains("libcuda.so.1")));
        let e = Error::from(call(400, "CUDA_ERROR_INVALID_HANDLE"));
        let inner = cuda_error(&e).expect("the CUDA error is kept");
        assert_eq!(inner.error_name(), Some("CUDA_ERROR_INVALID_HANDLE"));
        assert!(e.to_string().contains("cuMemAlloc failed: CUDA_ERROR_INVALID_HANDLE"), "{e}");
        assert!(cuda_error(&Error::Canceled).is_none());
    }

    #[test]
    fn fabric_flag_reads_like_upstream() {
        // Only reads: set_var is avoided because tests run in parallel.
        assert!(!env_flag("MC_CUDA_TEST_SURELY_UNSET_VARIABLE"));
    }
}
