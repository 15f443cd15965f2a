//! [`MusaDevice`]: Moore Threads GPU memory as a [`MemoryDevice`].

use std::cell::Cell;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex};

use mooncake_core::device::check_bounds;
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, Error, Location, MemoryDevice, MemoryKind, OwnedMemory, Result,
    SharingHandle, sync,
};

use crate::error::MusaError;
use crate::records::{Origin, RecordError, Records};
use crate::sys::{self, Api, AttributesSlot, IPC_HANDLE_SIZE, IpcMemHandle, SUCCESS};

/// Driver name of the MUSA device (registry name, [`MemoryDevice::name`]).
pub const DEVICE_NAME: &str = "musa";

/// [`SharingHandle::kind`] of handles exported by [`MusaDevice`]: `data` is the 64-byte `musaIpcMemHandle_t`,
/// `fd` is `None`, `len` the exported allocation's length.
pub const MUSA_IPC_HANDLE_KIND: &str = "musa_ipc";

/// Memory one of this device's records keeps alive; dropping the last `Arc` gives it back to the runtime.
#[derive(Debug)]
struct Buffer {
    api: &'static Api,
    addr: u64,
    /// The device whose context the pointer is valid in: where it was allocated, or current when imported.
    context: c_int,
    imported: bool,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let api = self.api;
        let guard = match DeviceGuard::enter(api, self.context) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(addr = self.addr, error = %e, "cannot select the MUSA device to give memory back");
                return;
            }
        };
        let (call, rc) = if self.imported {
            // SAFETY: `addr` is what musaIpcOpenMemHandle returned in this device's context; the record holding
            // this buffer is gone and this is the last reference, so nothing uses the mapping any more.
            ("musaIpcCloseMemHandle", unsafe { (api.ipc_close_mem_handle)(self.addr as *mut c_void) })
        } else {
            // SAFETY: `addr` is what musaMalloc returned on this device; as above, nothing uses it any more.
            ("musaFree", unsafe { (api.free)(self.addr as *mut c_void) })
        };
        if let Err(e) = api.check(call, rc) {
            tracing::warn!(addr = self.addr, error = %e, "giving MUSA memory back failed");
        }
        drop(guard);
    }
}

/// Makes `device` the calling thread's current MUSA device for the guard's life, then restores the previous one
/// (unless the thread had no context before, so that no context is created on a device it never used).
struct DeviceGuard<'a> {
    api: &'a Api,
    previous: Option<c_int>,
}

impl<'a> DeviceGuard<'a> {
    fn enter(api: &'a Api, device: c_int) -> std::result::Result<Self, MusaError> {
        let current = api.current_device()?;
        if current == device {
            return Ok(DeviceGuard { api, previous: None });
        }
        let restore = api.has_current_context().unwrap_or(true);
        api.set_device(device)?;
        Ok(DeviceGuard { api, previous: restore.then_some(current) })
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            if let Err(e) = self.api.set_device(p) {
                tracing::warn!(device = p, error = %e, "cannot restore the thread's MUSA device");
            }
        }
    }
}

thread_local! {
    /// Devices whose primary context this thread has made current (bit N for device N < 64), so driver calls,
    /// which need a current context, find one.
    static CONTEXTS: Cell<u64> = const { Cell::new(0) };
}

/// What the driver says about the allocation holding an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Range {
    /// No `muMemGetAddressRange_v2` in this process.
    Unknown,
    /// No live allocation holds the address.
    NotFound,
    /// The allocation `[base, base+size)`.
    Found { base: u64, size: u64 },
}

impl Api {
    /// `Ok` for success, else the typed error of `call` (name and description from the runtime).
    pub(crate) fn check(&self, call: &'static str, rc: sys::MusaStatus) -> std::result::Result<(), MusaError> {
        if rc == SUCCESS {
            return Ok(());
        }
        // SAFETY: musaGetErrorName/String take any error value and return null or a static string.
        let name = unsafe { sys::text((self.get_error_name)(rc), "unknown MUSA error") };
        // SAFETY: as above.
        let description = unsafe { sys::text((self.get_error_string)(rc), "no description") };
        Err(MusaError::Call { call, code: rc, name, description })
    }

    /// Devices the runtime sees (0 when it reports `musaErrorNoDevice`).
    pub(crate) fn device_count(&self) -> std::result::Result<u32, MusaError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer for the call.
        let rc = unsafe { (self.get_device_count)(&mut n) };
        match self.check("musaGetDeviceCount", rc) {
            Ok(()) => Ok(u32::try_from(n).unwrap_or(0)),
            Err(MusaError::Call { name, .. }) if name == "musaErrorNoDevice" => {
                self.clear_last_error();
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn current_device(&self) -> std::result::Result<c_int, MusaError> {
        let mut d: c_int = 0;
        // SAFETY: `d` is a valid out-pointer.
        let rc = unsafe { (self.get_device)(&mut d) };
        self.check("musaGetDevice", rc).map(|()| d)
    }

    fn set_device(&self, device: c_int) -> std::result::Result<(), MusaError> {
        // SAFETY: takes a plain integer; an invalid ordinal is an error return.
        let rc = unsafe { (self.set_device)(device) };
        self.check("musaSetDevice", rc)
    }

    /// Whether the calling thread has a current context (`None`: the driver cannot tell).
    fn has_current_context(&self) -> Option<bool> {
        let f = self.driver?.ctx_get_current?;
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer.
        let rc = unsafe { f(&mut ctx) };
        (rc == SUCCESS).then_some(!ctx.is_null())
    }

    /// Clears the runtime's sticky last error after a call whose failure was expected.
    fn clear_last_error(&self) {
        // SAFETY: takes nothing, returns (and resets) the last error.
        unsafe { (self.get_last_error)() };
    }

    /// `musaPointerGetAttributes`; `None` when the runtime does not know the address (unregistered host memory
    /// fails on some runtime versions: the error is cleared).
    fn attributes(&self, addr: u64) -> Option<sys::PointerAttributes> {
        let mut slot = AttributesSlot::zeroed();
        // SAFETY: the slot is a valid, writable musaPointerAttributes followed by slack; the address is only
        // looked up by the runtime, never dereferenced.
        let rc = unsafe {
            (self.pointer_get_attributes)(&mut slot as *mut AttributesSlot as *mut sys::PointerAttributes, addr as _)
        };
        if rc != SUCCESS {
            self.clear_last_error();
            return None;
        }
        Some(slot.attributes)
    }

    /// The device `addr` is device memory of, if it is (host, managed and unknown memory are not).
    fn device_of(&self, addr: u64) -> Option<c_int> {
        let a = self.attributes(addr)?;
        (a.memory_type == sys::MEMORY_TYPE_DEVICE && a.device >= 0).then_some(a.device)
    }

    /// Makes sure the thread has a current context on `device` (driver calls need one): the first time, a
    /// `musaFree(NULL)` makes the runtime set up the device's primary context. Call with `device` current.
    fn ensure_context(&self, device: c_int) {
        let bit = u32::try_from(device).ok().filter(|d| *d < 64).map(|d| 1u64 << d);
        if bit.is_some_and(|b| CONTEXTS.with(|c| c.get() & b != 0)) {
            return;
        }
        // SAFETY: musaFree(NULL) frees nothing; it only initializes the runtime on the current device.
        let rc = unsafe { (self.free)(std::ptr::null_mut()) };
        if rc != SUCCESS {
            self.clear_last_error();
        } else if let Some(b) = bit {
            CONTEXTS.with(|c| c.set(c.get() | b));
        }
    }

    /// The allocation holding `addr` on `device`, asked of the driver in that device's context.
    fn range(&self, device: c_int, addr: u64) -> Range {
        let Some(f) = self.driver.and_then(|d| d.mem_get_address_range) else { return Range::Unknown };
        let Ok(_guard) = DeviceGuard::enter(self, device) else { return Range::NotFound };
        self.ensure_context(device);
        let (mut base, mut size): (sys::MuDevicePtr, usize) = (0, 0);
        // SAFETY: both out-pointers are valid; the address is only looked up.
        let rc = unsafe { f(&mut base, &mut size, addr) };
        if rc != SUCCESS || size == 0 {
            return Range::NotFound;
        }
        Range::Found { base, size: size as u64 }
    }
}

/// The memory behind an [`Allocation`], checked live for one operation.
struct Live {
    addr: u64,
    /// Device whose context to run the operation in.
    context: c_int,
    /// Keeps recorded memory allocated for the operation (`None` for foreign memory).
    _keep: Option<Arc<Buffer>>,
}

/// Moore Threads GPU memory through the MUSA runtime (see the crate documentation).
///
/// Every allocation made or imported is recorded; freeing, copying, holding or exporting an [`Allocation`] the
/// device does not know (never made here, already freed, or a stale copy whose token no longer matches) is a
/// typed [`Error::NotFound`], never a crash. Memory other code allocated (found with
/// [`MemoryDevice::allocation_of`], token 0) is re-checked with the runtime and driver before each operation.
/// Dropping the device gives back every allocation it still records (holds keep theirs until dropped).
#[derive(Debug)]
pub struct MusaDevice {
    api: &'static Api,
    count: u32,
    records: Mutex<Records<Buffer>>,
    /// Serializes imports, so that two imports of one handle open it once.
    imports: Mutex<()>,
}

impl MusaDevice {
    /// The device of this process's MUSA runtime. `Unavailable` when `libmusart.so` cannot be loaded or lacks
    /// an entry point, or when no device is visible.
    pub fn new() -> Result<Self> {
        MusaDevice::with_api(sys::api()?)
    }

    pub(crate) fn with_api(api: &'static Api) -> Result<Self> {
        // Whatever keeps the runtime from counting devices makes the device unavailable, as `probe` says.
        let count = api.device_count().map_err(|e| Error::unavailable(e.to_string()))?;
        if count == 0 {
            return Err(MusaError::NoDevice.into());
        }
        tracing::debug!(library = api.library, devices = count, driver = api.driver.is_some(), "MUSA runtime loaded");
        Ok(MusaDevice { api, count, records: Mutex::new(Records::default()), imports: Mutex::new(()) })
    }

    /// Number of MUSA devices visible to this process.
    pub fn device_count(&self) -> u32 {
        self.count
    }

    /// The runtime's version (`musaRuntimeGetVersion`, e.g. `40000` for 4.0).
    pub fn runtime_version(&self) -> Result<i32> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out-pointer.
        let rc = unsafe { (self.api.runtime_get_version)(&mut v) };
        self.api.check("musaRuntimeGetVersion", rc)?;
        Ok(v)
    }

    /// Live allocations (made or imported), by address.
    pub fn allocations(&self) -> Vec<Allocation> {
        sync::lock(&self.records).allocations()
    }

    /// Number of live allocations.
    pub fn live_allocations(&self) -> usize {
        sync::lock(&self.records).len()
    }

    /// [`MemoryDevice::import_handle`] with the mapping opened in device `ordinal`'s context instead of the
    /// calling thread's current device.
    pub fn import_handle_on(&self, handle: &SharingHandle, ordinal: u32) -> Result<Allocation> {
        let device = self.ordinal(ordinal)?;
        self.import(handle, device)
    }

    /// `ordinal` as a device of this process, or `DeviceNotFound`.
    fn ordinal(&self, ordinal: u32) -> Result<c_int> {
        if ordinal >= self.count {
            return Err(Error::DeviceNotFound(format!(
                "musa:{ordinal}: this process sees {} MUSA device(s) (musa:0 to musa:{})",
                self.count,
                self.count - 1
            )));
        }
        c_int::try_from(ordinal).map_err(|_| Error::DeviceNotFound(format!("musa:{ordinal}")))
    }

    /// The device an allocation at `location` goes to.
    fn target(&self, location: &Location) -> Result<c_int> {
        match location {
            Location::Detect => Ok(self.api.current_device()?),
            Location::Device(MemoryKind::Musa, n) => self.ordinal(*n),
            other => Err(Error::InvalidArgument(format!(
                "the MUSA device allocates device memory only (musa:N or *), not {other}"
            ))),
        }
    }

    /// The live memory `allocation` names, for `op`.
    fn resolve(&self, allocation: &Allocation, op: &str) -> Result<Live> {
        if allocation.token == 0 {
            return self.resolve_foreign(allocation, op);
        }
        let buffer = {
            let records = sync::lock(&self.records);
            let r = records.get(allocation).ok_or_else(|| unknown(allocation, op))?;
            r.payload.clone()
        };
        if buffer.imported && self.api.device_of(allocation.addr).is_none() {
            return Err(Error::NotFound(format!(
                "{op}: the imported MUSA mapping at {:#x} is no longer device memory",
                allocation.addr
            )));
        }
        Ok(Live { addr: allocation.addr, context: buffer.context, _keep: Some(buffer) })
    }

    /// Memory another allocator owns: still device memory of the device the allocation names, and still inside
    /// one live allocation (asked of the driver; without it such memory cannot be checked and is refused).
    fn resolve_foreign(&self, allocation: &Allocation, op: &str) -> Result<Live> {
        let gone = |why: &str| {
            Error::NotFound(format!(
                "{op}: MUSA memory [{:#x}, +{}) that this device did not allocate {why}",
                allocation.addr, allocation.len
            ))
        };
        let device = self.api.device_of(allocation.addr).ok_or_else(|| gone("is not device memory (freed?)"))?;
        if let Location::Device(MemoryKind::Musa, n) = allocation.location {
            if c_int::try_from(n).ok() != Some(device) {
                return Err(gone(&format!("is on musa:{device}, not on musa:{n}")));
            }
        }
        match self.api.range(device, allocation.addr) {
            Range::Found { base, size } if covers(base, size, allocation.addr, allocation.len) => {
                Ok(Live { addr: allocation.addr, context: device, _keep: None })
            }
            Range::Found { .. } | Range::NotFound => Err(gone("is no longer one live allocation (freed?)")),
            Range::Unknown => Err(Error::unsupported(
                format!(
                    "{op} of memory it did not allocate (checking it needs muMemGetAddressRange_v2 from libmusa.so, \
                     which this process could not load)"
                ),
                DEVICE_NAME,
            )),
        }
    }

    /// Records freshly obtained memory; on failure the buffer is dropped (given back).
    fn record(&self, buffer: Buffer, len: u64, location: Location, origin: Origin) -> Result<Allocation> {
        let addr = buffer.addr;
        let mut records = sync::lock(&self.records);
        records.insert(addr, len, location, origin, Arc::new(buffer)).map_err(|e| match e {
            RecordError::Overlaps { addr: a, len: l } => Error::AlreadyExists(format!(
                "the MUSA runtime returned [{addr:#x}, +{len}), which overlaps the live allocation [{a:#x}, +{l}) \
                 (was memory of this device freed behind its back?)"
            )),
            RecordError::Unknown => unknown(&Allocation { addr, len, location: Location::Detect, token: 0 }, "record"),
        })
    }

    fn import(&self, handle: &SharingHandle, device: c_int) -> Result<Allocation> {
        let bytes = handle_bytes(handle)?;
        let _serial = sync::lock(&self.imports);
        {
            let mut records = sync::lock(&self.records);
            if let Some(a) = records.reuse_import(&bytes, handle.len) {
                return Ok(a);
            }
            if let Some(len) = records.imported_len(&bytes) {
                return Err(Error::InvalidArgument(format!(
                    "this MUSA IPC handle is already imported with {len} bytes; an import of {} bytes needs that \
                     one freed first",
                    handle.len
                )));
            }
        }
        let _guard = DeviceGuard::enter(self.api, device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the handle is passed by value as the 64-byte struct it is.
        let rc = unsafe {
            (self.api.ipc_open_mem_handle)(
                &mut ptr,
                IpcMemHandle { reserved: bytes },
                sys::IPC_MEM_LAZY_ENABLE_PEER_ACCESS,
            )
        };
        self.api.check("musaIpcOpenMemHandle", rc)?;
        if ptr.is_null() {
            return Err(Error::InvalidArgument("musaIpcOpenMemHandle returned a null mapping".into()));
        }
        let buffer = Buffer { api: self.api, addr: ptr as u64, context: device, imported: true };
        let owner = self.api.device_of(buffer.addr).unwrap_or(device);
        if let Range::Found { base, size } = self.api.range(device, buffer.addr) {
            if !covers(base, size, buffer.addr, handle.len) {
                return Err(Error::InvalidArgument(format!(
                    "the MUSA IPC handle maps {size} bytes at {base:#x}; the handle claims {} at {:#x}",
                    handle.len, buffer.addr
                )));
            }
        }
        let location = Location::Device(MemoryKind::Musa, owner as u32);
        self.record(buffer, handle.len, location, Origin::Imported(bytes))
    }

    /// One synchronous copy of `len` bytes in `context`; waits for the legacy default stream of that device
    /// when the runtime may return before the bytes have landed (host to device, device to device).
    ///
    /// # Safety
    /// `dst` and `src` are valid for `len` bytes as `kind` says (host pointers in this process's memory, device
    /// pointers inside live allocations usable from `context`).
    unsafe fn memcpy(
        &self,
        context: c_int,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
        kind: c_int,
    ) -> Result<()> {
        let _guard = DeviceGuard::enter(self.api, context)?;
        // SAFETY: per this function's contract.
        let rc = unsafe { (self.api.memcpy)(dst, src, len, kind) };
        self.api.check("musaMemcpy", rc)?;
        if kind != sys::MEMCPY_DEVICE_TO_HOST {
            self.synchronize()?;
        }
        Ok(())
    }

    /// Waits for the current device's legacy default stream (where `musaMemcpy` and `musaMemcpyPeer` run).
    fn synchronize(&self) -> Result<()> {
        // SAFETY: a null stream is the legacy default stream of the current device.
        let rc = unsafe { (self.api.stream_synchronize)(std::ptr::null_mut()) };
        Ok(self.api.check("musaStreamSynchronize", rc)?)
    }
}

/// True when `[addr, addr+len)` lies inside `[base, base+size)`.
fn covers(base: u64, size: u64, addr: u64, len: u64) -> bool {
    match (addr.checked_sub(base), base.checked_add(size), addr.checked_add(len)) {
        (Some(_), Some(end), Some(want)) => want <= end,
        _ => false,
    }
}

/// The 64 handle bytes of a [`MUSA_IPC_HANDLE_KIND`] handle, checked.
pub(crate) fn handle_bytes(handle: &SharingHandle) -> Result<[u8; IPC_HANDLE_SIZE]> {
    if handle.kind != MUSA_IPC_HANDLE_KIND {
        return Err(Error::InvalidArgument(format!(
            "the MUSA device imports {MUSA_IPC_HANDLE_KIND:?} handles, not {:?}",
            handle.kind
        )));
    }
    if handle.len == 0 {
        return Err(Error::InvalidArgument("a MUSA IPC handle of zero bytes".into()));
    }
    handle.data.as_slice().try_into().map_err(|_| {
        Error::InvalidArgument(format!(
            "a {MUSA_IPC_HANDLE_KIND} handle has {IPC_HANDLE_SIZE} bytes (musaIpcMemHandle_t), not {}",
            handle.data.len()
        ))
    })
}

fn unknown(allocation: &Allocation, op: &str) -> Error {
    Error::NotFound(format!(
        "{op}: no live MUSA allocation [{:#x}, +{}) with token {} (never allocated or imported by this device, \
         already freed, or a stale copy)",
        allocation.addr, allocation.len, allocation.token
    ))
}

fn as_usize(len: u64) -> Result<usize> {
    usize::try_from(len)
        .ok()
        .filter(|l| *l <= isize::MAX as usize)
        .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes do not fit in the address space")))
}

impl MemoryDevice for MusaDevice {
    fn name(&self) -> &str {
        DEVICE_NAME
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Musa
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities { host_accessible: false, export_handles: true, huge_pages: false, device_count: self.count }
    }

    /// `musa:N` for device memory of device N whose allocation holds the whole range; `None` for host
    /// (registered or not), managed and unknown memory. Without the driver's address range, memory this device
    /// did not allocate is checked at both ends of the range instead.
    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        {
            let records = sync::lock(&self.records);
            if let Some(r) = records.containing(addr, len) {
                return Some(r.allocation.location.clone());
            }
            if records.overlapping(addr, len).is_some() {
                return None;
            }
        }
        let device = self.api.device_of(addr)?;
        let inside = match self.api.range(device, addr) {
            Range::Found { base, size } => covers(base, size, addr, len.max(1)),
            Range::NotFound => false,
            Range::Unknown => {
                let last = addr.checked_add(len.max(1) - 1)?;
                self.api.device_of(last) == Some(device)
            }
        };
        inside.then_some(Location::Device(MemoryKind::Musa, device as u32))
    }

    /// `musaMalloc` on `musa:N` (or the calling thread's current device for `*`). Memory is at least 256-byte
    /// aligned; a larger `alignment` the runtime did not give is an `InvalidArgument`. `huge_pages` means
    /// nothing for device memory; every allocation is exportable.
    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        if len == 0 {
            return Err(Error::InvalidArgument("allocation length must be greater than zero".into()));
        }
        let size = as_usize(len)?;
        let align = options.alignment;
        if align != 0 && !align.is_power_of_two() {
            return Err(Error::InvalidArgument(format!("alignment {align} is not a power of two")));
        }
        let device = self.target(&options.location)?;
        let _guard = DeviceGuard::enter(self.api, device)?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer.
        let rc = unsafe { (self.api.malloc)(&mut ptr, size) };
        self.api.check("musaMalloc", rc)?;
        if ptr.is_null() {
            return Err(Error::NoSpace(format!("musaMalloc of {len} bytes returned null")));
        }
        let buffer = Buffer { api: self.api, addr: ptr as u64, context: device, imported: false };
        if align != 0 && buffer.addr % align != 0 {
            return Err(Error::InvalidArgument(format!(
                "musaMalloc returned {:#x}, which is not {align}-byte aligned",
                buffer.addr
            )));
        }
        self.record(buffer, len, Location::Device(MemoryKind::Musa, device as u32), Origin::Allocated)
    }

    /// Frees an allocation (`musaFree`) or unmaps an import (`musaIpcCloseMemHandle`); a hold or a copy in
    /// progress defers that until it is done. Unknown, foreign (token 0) and already freed allocations are
    /// `NotFound`.
    fn free(&self, allocation: &Allocation) -> Result<()> {
        let removed = sync::lock(&self.records).remove(allocation).map_err(|_| unknown(allocation, "free"))?;
        drop(removed);
        Ok(())
    }

    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        let live = self.resolve(allocation, "copy_to_host")?;
        check_bounds(allocation, offset, dst.len() as u64)?;
        if dst.is_empty() {
            return Ok(());
        }
        let src = (live.addr + offset) as *const c_void;
        // SAFETY: `dst` is a live exclusive host slice of dst.len() bytes; the source lies inside the live device
        // allocation `live` keeps (bounds checked above), valid in `live.context`.
        unsafe { self.memcpy(live.context, dst.as_mut_ptr().cast(), src, dst.len(), sys::MEMCPY_DEVICE_TO_HOST) }
    }

    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()> {
        let live = self.resolve(allocation, "copy_from_host")?;
        check_bounds(allocation, offset, src.len() as u64)?;
        if src.is_empty() {
            return Ok(());
        }
        let dst = (live.addr + offset) as *mut c_void;
        // SAFETY: `src` is a live host slice; the destination lies inside the live device allocation `live`
        // keeps (bounds checked above), valid in `live.context`.
        unsafe { self.memcpy(live.context, dst, src.as_ptr().cast(), src.len(), sys::MEMCPY_HOST_TO_DEVICE) }
    }

    /// Same context: `musaMemcpy` with `musaMemcpyDefault`; different devices: `musaMemcpyPeer`. Either way
    /// the call returns after the legacy default stream of the destination's device is synchronized.
    fn copy_between(
        &self,
        src: &Allocation,
        src_offset: u64,
        dst: &Allocation,
        dst_offset: u64,
        len: u64,
    ) -> Result<()> {
        let from = self.resolve(src, "copy_between (source)")?;
        let to = self.resolve(dst, "copy_between (destination)")?;
        check_bounds(src, src_offset, len)?;
        check_bounds(dst, dst_offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let n = as_usize(len)?;
        let s = (from.addr + src_offset) as *const c_void;
        let d = (to.addr + dst_offset) as *mut c_void;
        if from.context == to.context {
            // SAFETY: both ranges lie inside live device allocations (kept by `from`/`to`, bounds checked) that
            // are valid in this context.
            return unsafe { self.memcpy(to.context, d, s, n, sys::MEMCPY_DEFAULT) };
        }
        let _guard = DeviceGuard::enter(self.api, to.context)?;
        // SAFETY: as above; each pointer is valid in the context of the device passed with it.
        let rc = unsafe { (self.api.memcpy_peer)(d, to.context, s, from.context, n) };
        self.api.check("musaMemcpyPeer", rc)?;
        self.synchronize()
    }

    /// Keeps the allocation's memory until the returned value is dropped, even if [`MemoryDevice::free`] runs
    /// first. Memory this device did not allocate or import (token 0) cannot be held: `Unsupported`.
    fn hold(&self, allocation: &Allocation) -> Result<OwnedMemory> {
        if allocation.token == 0 {
            return Err(Error::unsupported("hold of MUSA memory this device did not allocate", DEVICE_NAME));
        }
        let buffer = {
            let records = sync::lock(&self.records);
            records.get(allocation).ok_or_else(|| unknown(allocation, "hold"))?.payload.clone()
        };
        // SAFETY: `[addr, addr+len)` is a live allocation of this device (found by address, token and length),
        // kept allocated by the boxed Arc until the OwnedMemory is dropped (Buffer gives memory back only when its
        // last Arc goes). It is device memory: this device is not host-accessible, so the engine and transports
        // never dereference it and move its bytes through this device's copies.
        Ok(unsafe { OwnedMemory::new(allocation.addr, allocation.len, Box::new(buffer)) })
    }

    /// A recorded allocation holding the range, else the live allocation the driver finds (token 0: memory
    /// another allocator owns, re-checked before every use). `None` without the driver's address range.
    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        if let Some(r) = sync::lock(&self.records).containing(addr, len) {
            return Some(r.allocation.clone());
        }
        let device = self.api.device_of(addr)?;
        match self.api.range(device, addr) {
            Range::Found { base, size } if covers(base, size, addr, len.max(1)) => Some(Allocation {
                addr: base,
                len: size,
                location: Location::Device(MemoryKind::Musa, device as u32),
                token: 0,
            }),
            _ => None,
        }
    }

    /// `musaIpcGetMemHandle` of a whole allocation (made here, or foreign memory starting at its allocation's
    /// base). Imported memory cannot be exported again.
    fn export_handle(&self, allocation: &Allocation) -> Result<SharingHandle> {
        if allocation.token != 0 {
            let records = sync::lock(&self.records);
            let r = records.get(allocation).ok_or_else(|| unknown(allocation, "export_handle"))?;
            if matches!(r.origin, Origin::Imported(_)) {
                return Err(Error::InvalidArgument(format!(
                    "the MUSA allocation at {:#x} was imported from another process; only its owner can export it",
                    allocation.addr
                )));
            }
        }
        let live = self.resolve(allocation, "export_handle")?;
        if allocation.token == 0
            && !matches!(self.api.range(live.context, live.addr), Range::Found { base, .. } if base == live.addr)
        {
            return Err(Error::InvalidArgument(format!(
                "a MUSA IPC handle names a whole allocation; {:#x} is not the start of one",
                allocation.addr
            )));
        }
        let _guard = DeviceGuard::enter(self.api, live.context)?;
        let mut handle = IpcMemHandle { reserved: [0; IPC_HANDLE_SIZE] };
        // SAFETY: `handle` is a valid out-pointer; the address is the start of a live device allocation.
        let rc = unsafe { (self.api.ipc_get_mem_handle)(&mut handle, live.addr as *mut c_void) };
        self.api.check("musaIpcGetMemHandle", rc)?;
        Ok(SharingHandle {
            kind: MUSA_IPC_HANDLE_KIND.into(),
            data: handle.reserved.to_vec(),
            fd: None,
            len: allocation.len,
        })
    }

    /// `musaIpcOpenMemHandle` (lazy peer access) in the calling thread's current device's context (see
    /// [`MusaDevice::import_handle_on`] to choose). Importing a handle this process has already imported
    /// returns the same allocation, to be freed once per import. A handle of another kind or size is an
    /// `InvalidArgument`.
    fn import_handle(&self, handle: &SharingHandle) -> Result<Allocation> {
        handle_bytes(handle)?;
        let device = self.api.current_device()?;
        self.import(handle, device)
    }

    /// `musaDeviceGetPCIBusId`, lower-cased (`0000:3b:00.0`); `None` for other locations or unknown devices.
    fn pci_address(&self, location: &Location) -> Option<String> {
        let Location::Device(MemoryKind::Musa, n) = location else { return None };
        let device = self.ordinal(*n).ok()?;
        let mut buf = [0u8; 64];
        // SAFETY: `buf` is writable for the length passed.
        let rc = unsafe { (self.api.device_get_pci_bus_id)(buf.as_mut_ptr().cast(), buf.len() as c_int, device) };
        if let Err(e) = self.api.check("musaDeviceGetPCIBusId", rc) {
            tracing::debug!(device, error = %e, "no PCI address");
            return None;
        }
        sys::parse_bus_id(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_checked_before_the_runtime_sees_them() {
        let h = |kind: &str, data: Vec<u8>, len: u64| SharingHandle { kind: kind.into(), data, fd: None, len };
        assert_eq!(handle_bytes(&h(MUSA_IPC_HANDLE_KIND, vec![3; 64], 4096)).unwrap(), [3; 64]);
        for bad in [
            h("cuda_ipc", vec![0; 64], 4096),
            h(MUSA_IPC_HANDLE_KIND, vec![0; 63], 4096),
            h(MUSA_IPC_HANDLE_KIND, vec![0; 65], 4096),
            h(MUSA_IPC_HANDLE_KIND, vec![], 4096),
            h(MUSA_IPC_HANDLE_KIND, vec![0; 64], 0),
        ] {
            assert!(matches!(handle_bytes(&bad), Err(Error::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn ranges_cover_only_inside() {
        assert!(covers(0x1000, 0x100, 0x1000, 0x100));
        assert!(covers(0x1000, 0x100, 0x10f0, 0x10));
        assert!(!covers(0x1000, 0x100, 0x10f0, 0x11));
        assert!(!covers(0x1000, 0x100, 0xfff, 1));
        assert!(!covers(0x1000, 0x100, u64::MAX, 2));
        assert!(!covers(u64::MAX, 2, u64::MAX, 1));
    }
}
