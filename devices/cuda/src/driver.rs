//! The CUDA driver API, loaded at run time through cudarc's `dynamic-loading` bindings.
//!
//! cudarc panics when `libcuda` is missing or a symbol is absent, so nothing here calls into the
//! library before [`Driver::get`] has checked, once per process, that the library loads
//! (`is_culib_present`) and that every symbol this crate uses exists. Each wrapper names the CUDA
//! call it makes; a failure becomes [`CudaError::Call`] with the call and the driver's error name
//! (`cuGetErrorName`).
//!
//! Contexts: every device's primary context (`cuDevicePrimaryCtxRetain`, the one the CUDA runtime
//! and PyTorch use) is retained on first use and kept for the life of the process. Calls come from
//! any thread, so each operation makes the right context current with [`Driver::enter`], which
//! restores the thread's previous context when it ends.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::OnceLock;

use cudarc::driver::sys;

/// File name of the CUDA driver library this crate loads at run time.
pub const LIBCUDA: &str = "libcuda.so.1";

/// Oldest driver API version (CUDA 11.7) with `cuMemGetHandleForAddressRange` (dmabuf export).
pub const DMABUF_MIN_DRIVER_VERSION: i32 = 11070;

/// Symbols every operation of this crate needs; a driver without one of them is unusable.
const REQUIRED_SYMBOLS: &[&str] = &[
    "cuGetErrorName",
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceGetAttribute",
    "cuDeviceGetPCIBusId",
    "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxGetState",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxGetDevice",
    "cuPointerGetAttributes",
    "cuMemGetAddressRange_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyPeerAsync",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuEventCreate",
    "cuEventDestroy_v2",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
];

/// Symbols of the virtual memory management API (CUDA 10.2+/11.0+): shareable allocations and fd or
/// fabric handles need all of them.
const VMM_SYMBOLS: &[&str] = &[
    "cuMemCreate",
    "cuMemRelease",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuMemGetAllocationGranularity",
    "cuMemGetAllocationPropertiesFromHandle",
    "cuMemExportToShareableHandle",
    "cuMemImportFromShareableHandle",
    "cuMemRetainAllocationHandle",
];

/// The dmabuf export symbol (CUDA 11.7+).
const DMABUF_SYMBOL: &str = "cuMemGetHandleForAddressRange";

/// Bytes of a legacy IPC handle (`CUipcMemHandle`) and of a fabric handle (`CUmemFabricHandle`).
pub const RAW_HANDLE_BYTES: usize = 64;

/// What went wrong in the CUDA driver, naming the call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The driver library is not installed.
    #[error("{LIBCUDA} not found (no NVIDIA driver on this machine)")]
    LibraryMissing,
    /// The driver library lacks a function this crate needs (the driver is too old).
    #[error("{LIBCUDA} lacks {symbol} (driver API version {version} is too old; update the NVIDIA driver)")]
    MissingSymbol {
        /// The missing function.
        symbol: String,
        /// The driver API version (`12040` for CUDA 12.4), or 0 when unknown.
        version: i32,
    },
    /// The driver works but sees no GPU.
    #[error("no CUDA device ({0})")]
    NoDevice(String),
    /// A driver call returned an error.
    #[error("{call} failed: {name} (CUresult {code})")]
    Call {
        /// The CUDA function (`cuMemAlloc`).
        call: &'static str,
        /// The numeric `CUresult`.
        code: u32,
        /// Its name from `cuGetErrorName` (`CUDA_ERROR_OUT_OF_MEMORY`).
        name: String,
    },
}

impl CudaError {
    /// The failed CUDA call, for [`CudaError::Call`].
    pub fn call(&self) -> Option<&'static str> {
        match self {
            CudaError::Call { call, .. } => Some(call),
            _ => None,
        }
    }

    /// The driver's error name (`CUDA_ERROR_INVALID_VALUE`), for [`CudaError::Call`].
    pub fn error_name(&self) -> Option<&str> {
        match self {
            CudaError::Call { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The numeric `CUresult`, for [`CudaError::Call`].
    pub fn code(&self) -> Option<u32> {
        match self {
            CudaError::Call { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// `CUDA_ERROR_OUT_OF_MEMORY`.
pub(crate) const CUDA_ERROR_OUT_OF_MEMORY: u32 = 2;
/// `CUDA_ERROR_NOT_SUPPORTED`.
pub(crate) const CUDA_ERROR_NOT_SUPPORTED: u32 = 801;

/// The name of a `CUresult`, asked from the driver.
fn error_name(r: sys::CUresult) -> String {
    let mut p: *const c_char = ptr::null();
    // SAFETY: only called after a driver call returned `r`, so the library is loaded and has
    // cuGetErrorName (checked in Driver::load); `p` is a valid out-pointer.
    let ok = unsafe { sys::cuGetErrorName(r, &mut p) };
    if ok == sys::CUresult::CUDA_SUCCESS && !p.is_null() {
        // SAFETY: on success the driver points `p` at a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("CUDA error {}", r as u32)
    }
}

/// Turns a `CUresult` into a typed result naming `call`.
fn check(call: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Call { call, code: r as u32, name: error_name(r) })
    }
}

/// What the driver says about one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// CUDA ordinal (`cuda:N`, after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: u32,
    /// Product name (`NVIDIA H100 80GB HBM3`).
    pub name: String,
    /// PCI address, lower case (`0000:04:00.0`).
    pub pci_bus_id: String,
    /// Virtual memory management (`cuMemCreate`/`cuMemMap`) is supported.
    pub vmm: bool,
    /// VMM allocations can be exported as POSIX file descriptors.
    pub posix_fd: bool,
    /// VMM allocations can be exported as fabric handles (multi-node NVLink, IMEX).
    pub fabric: bool,
    /// Device memory can be exported as a dmabuf (`cuMemGetHandleForAddressRange`).
    pub dmabuf: bool,
    /// VMM allocations can be registered with RDMA NICs (GPUDirect RDMA).
    pub rdma_with_vmm: bool,
}

/// The loaded driver: its version and devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverInfo {
    /// Driver API version (`12040` for CUDA 12.4).
    pub version: i32,
    /// Every visible GPU, by ordinal.
    pub devices: Vec<DeviceInfo>,
}

impl DriverInfo {
    /// The version as `major.minor` (`12.4`).
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version / 1000, (self.version % 1000) / 10)
    }
}

/// A context handle shared between threads.
#[derive(Clone, Copy, Debug)]
struct Ctx(sys::CUcontext);

// SAFETY: a CUcontext is a process-wide handle; the driver lets any thread make it current.
unsafe impl Send for Ctx {}
// SAFETY: as above; the handle itself is never dereferenced by Rust code.
unsafe impl Sync for Ctx {}

struct DeviceState {
    dev: sys::CUdevice,
    ctx: OnceLock<Result<Ctx, CudaError>>,
}

/// The loaded CUDA driver (one per process, see [`Driver::get`]).
pub(crate) struct Driver {
    info: DriverInfo,
    devices: Vec<DeviceState>,
}

static DRIVER: OnceLock<Result<Driver, CudaError>> = OnceLock::new();

/// True when cudarc finds the driver library (`libcuda.so`, `libcuda.so.1`, ...). Cached.
pub(crate) fn library_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen candidate names; loading libcuda runs its
    // initializers, which are safe to run in any process.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// True when the loaded library exports `name`.
fn has_symbol(name: &str) -> bool {
    // SAFETY: only called after library_present() returned true, so culib() loads without panicking.
    let lib = unsafe { sys::culib() };
    // SAFETY: looking a symbol up only reads the library's symbol table; the pointer is not used.
    unsafe { lib.get::<*const c_void>(name.as_bytes()) }.is_ok()
}

/// The current thread's context before [`Driver::enter`] switched it; restored on drop.
pub(crate) struct Current {
    prev: sys::CUcontext,
    switched: bool,
}

impl Drop for Current {
    fn drop(&mut self) {
        if self.switched {
            // SAFETY: `prev` was this thread's current context (or null) when the guard was made;
            // making it current again only changes this thread's binding.
            let r = unsafe { sys::cuCtxSetCurrent(self.prev) };
            if let Err(e) = check("cuCtxSetCurrent", r) {
                tracing::warn!(error = %e, "could not restore the thread's CUDA context");
            }
        }
    }
}

/// What `cuPointerGetAttributes` says about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PointerInfo {
    /// `CUmemorytype` (1 host, 2 device, 3 array, 4 unified); 0 for memory CUDA does not know.
    pub memory_type: u32,
    /// Device the memory lives on (for device memory).
    pub ordinal: u32,
    /// Managed (unified) memory.
    pub managed: bool,
}

/// `CU_MEMORYTYPE_HOST`.
pub(crate) const MEMORYTYPE_HOST: u32 = 1;
/// `CU_MEMORYTYPE_DEVICE`.
pub(crate) const MEMORYTYPE_DEVICE: u32 = 2;

impl Driver {
    /// The process's driver, loaded and initialised on first use; an error says why CUDA cannot be
    /// used here (library missing, too old, `cuInit` failed, no device). Never panics.
    pub(crate) fn get() -> Result<&'static Driver, CudaError> {
        DRIVER.get_or_init(|| Driver::load(library_present)).as_ref().map_err(Clone::clone)
    }

    /// Loads the driver if `present()` says the library exists.
    pub(crate) fn load(present: impl FnOnce() -> bool) -> Result<Driver, CudaError> {
        if !present() {
            return Err(CudaError::LibraryMissing);
        }
        let mut version: c_int = 0;
        if has_symbol("cuDriverGetVersion") {
            // SAFETY: the symbol exists (checked); `version` is a valid out-pointer.
            let r = unsafe { sys::cuDriverGetVersion(&mut version) };
            check("cuDriverGetVersion", r)?;
        }
        if let Some(missing) = REQUIRED_SYMBOLS.iter().find(|s| !has_symbol(s)) {
            return Err(CudaError::MissingSymbol { symbol: (*missing).to_string(), version });
        }
        // SAFETY: cuInit exists (checked above) and takes flags 0.
        let r = unsafe { sys::cuInit(0) };
        if r == sys::CUresult::CUDA_ERROR_NO_DEVICE {
            return Err(CudaError::NoDevice("cuInit: CUDA_ERROR_NO_DEVICE".into()));
        }
        check("cuInit", r)?;
        let mut count: c_int = 0;
        // SAFETY: the driver is initialised; `count` is a valid out-pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
        if count <= 0 {
            return Err(CudaError::NoDevice("cuDeviceGetCount returned 0".into()));
        }
        let vmm_api = VMM_SYMBOLS.iter().all(|s| has_symbol(s));
        let dmabuf_api = version >= DMABUF_MIN_DRIVER_VERSION && has_symbol(DMABUF_SYMBOL);
        if !dmabuf_api {
            tracing::info!(version, "CUDA driver too old for dmabuf export (needs 11.7)");
        }
        let mut devices = Vec::new();
        let mut infos = Vec::new();
        for ordinal in 0..count {
            let mut dev: sys::CUdevice = 0;
            // SAFETY: ordinal < count; `dev` is a valid out-pointer.
            check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
            let info = device_info(dev, ordinal as u32, vmm_api, dmabuf_api)?;
            infos.push(info);
            devices.push(DeviceState { dev, ctx: OnceLock::new() });
        }
        Ok(Driver { info: DriverInfo { version, devices: infos }, devices })
    }

    /// Version and devices.
    pub(crate) fn info(&self) -> &DriverInfo {
        &self.info
    }

    /// Number of visible GPUs (at least 1).
    pub(crate) fn device_count(&self) -> u32 {
        self.devices.len() as u32
    }

    /// One device's properties.
    pub(crate) fn device(&self, ordinal: u32) -> Option<&DeviceInfo> {
        self.info.devices.get(ordinal as usize)
    }

    fn state(&self, ordinal: u32) -> Result<&DeviceState, CudaError> {
        self.devices.get(ordinal as usize).ok_or(CudaError::Call {
            call: "cuDeviceGet",
            code: sys::CUresult::CUDA_ERROR_INVALID_DEVICE as u32,
            name: format!("CUDA_ERROR_INVALID_DEVICE (ordinal {ordinal}, {} devices)", self.devices.len()),
        })
    }

    /// The device's primary context, retained on first use.
    fn context(&self, ordinal: u32) -> Result<sys::CUcontext, CudaError> {
        let state = self.state(ordinal)?;
        let ctx = state.ctx.get_or_init(|| {
            let mut ctx: sys::CUcontext = ptr::null_mut();
            // SAFETY: `dev` came from cuDeviceGet; `ctx` is a valid out-pointer. The retained
            // context is never released: it lives as long as the process (as with the runtime).
            let r = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, state.dev) };
            check("cuDevicePrimaryCtxRetain", r).map(|()| Ctx(ctx))
        });
        ctx.clone().map(|c| c.0)
    }

    /// Makes device `ordinal`'s primary context current on this thread until the guard drops.
    pub(crate) fn enter(&self, ordinal: u32) -> Result<Current, CudaError> {
        let ctx = self.context(ordinal)?;
        let mut prev: sys::CUcontext = ptr::null_mut();
        // SAFETY: `prev` is a valid out-pointer.
        check("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut prev) })?;
        if prev == ctx {
            return Ok(Current { prev, switched: false });
        }
        // SAFETY: `ctx` is a retained primary context, valid for the life of the process.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx) })?;
        Ok(Current { prev, switched: true })
    }

    /// The device of the context current on this thread, if any.
    pub(crate) fn current_device(&self) -> Option<u32> {
        let mut ctx: sys::CUcontext = ptr::null_mut();
        // SAFETY: `ctx` is a valid out-pointer.
        let r = unsafe { sys::cuCtxGetCurrent(&mut ctx) };
        if r != sys::CUresult::CUDA_SUCCESS || ctx.is_null() {
            return None;
        }
        let mut dev: sys::CUdevice = 0;
        // SAFETY: a context is current; `dev` is a valid out-pointer.
        let r = unsafe { sys::cuCtxGetDevice(&mut dev) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        self.devices.iter().position(|d| d.dev == dev).map(|i| i as u32)
    }

    /// The device whose context serves queries that work in any context (pointer attributes): the
    /// thread's current device, else one this process already uses (retained here or active
    /// elsewhere, e.g. by PyTorch), else device 0. So no context is created on a GPU the process
    /// does not use when it uses another one.
    pub(crate) fn preferred_device(&self) -> u32 {
        if let Some(d) = self.current_device() {
            return d;
        }
        if let Some(i) = self.devices.iter().position(|d| d.ctx.get().is_some_and(|c| c.is_ok())) {
            return i as u32;
        }
        let active = self.devices.iter().position(|d| {
            let (mut flags, mut active): (c_uint, c_int) = (0, 0);
            // SAFETY: `dev` came from cuDeviceGet; both are valid out-pointers; this creates nothing.
            let r = unsafe { sys::cuDevicePrimaryCtxGetState(d.dev, &mut flags, &mut active) };
            r == sys::CUresult::CUDA_SUCCESS && active != 0
        });
        active.unwrap_or(0) as u32
    }

    /// Whether device `a` can map memory of device `b`.
    pub(crate) fn can_access_peer(&self, a: u32, b: u32) -> bool {
        if a == b {
            return true;
        }
        let (Ok(da), Ok(db)) = (self.state(a), self.state(b)) else { return false };
        let mut can: c_int = 0;
        // SAFETY: both devices came from cuDeviceGet; `can` is a valid out-pointer.
        let r = unsafe { sys::cuDeviceCanAccessPeer(&mut can, da.dev, db.dev) };
        r == sys::CUresult::CUDA_SUCCESS && can != 0
    }

    /// Memory type, device and managed flag of `addr` (a context must be current). Addresses CUDA
    /// does not know give memory type 0 rather than an error.
    pub(crate) fn pointer_info(&self, addr: u64) -> Result<PointerInfo, CudaError> {
        // Zeroed 8-byte slots: each attribute writes at most 8 bytes (an enum, an int or a bool),
        // and unset ones stay 0 (little-endian reads of the low bytes).
        let mut memory_type: u64 = 0;
        let mut ordinal: u64 = 0;
        let mut managed: u64 = 0;
        let mut attrs = [
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_IS_MANAGED,
        ];
        let mut data: [*mut c_void; 3] = [
            (&mut memory_type as *mut u64).cast(),
            (&mut ordinal as *mut u64).cast(),
            (&mut managed as *mut u64).cast(),
        ];
        // SAFETY: `attrs` and `data` have 3 entries each; every data slot is 8 writable bytes,
        // enough for the attribute types asked (CUmemorytype, int, bool). `addr` is only looked up.
        let r = unsafe { sys::cuPointerGetAttributes(3, attrs.as_mut_ptr(), data.as_mut_ptr(), addr) };
        check("cuPointerGetAttributes", r)?;
        Ok(PointerInfo { memory_type: memory_type as u32, ordinal: ordinal as u32, managed: (managed & 0xff) != 0 })
    }

    /// Base and size of the allocation containing `addr` (a context must be current).
    pub(crate) fn address_range(&self, addr: u64) -> Result<(u64, u64), CudaError> {
        let mut base: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: valid out-pointers; the driver only looks `addr` up.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) };
        check("cuMemGetAddressRange", r)?;
        Ok((base, size as u64))
    }

    /// `cuMemAlloc` in the current context.
    pub(crate) fn mem_alloc(&self, len: u64) -> Result<u64, CudaError> {
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; a context is current (caller holds a Current guard).
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, len as usize) })?;
        Ok(p)
    }

    /// `cuMemFree`.
    ///
    /// # Safety
    /// `ptr` must come from [`Driver::mem_alloc`], not yet freed, with no copy using it.
    pub(crate) unsafe fn mem_free(&self, ptr: u64) -> Result<(), CudaError> {
        // SAFETY: the caller guarantees `ptr` is a live cuMemAlloc allocation nobody uses.
        check("cuMemFree", unsafe { sys::cuMemFree_v2(ptr) })
    }

    /// Allocation properties of pinned device memory on `ordinal` with the given handle types.
    pub(crate) fn vmm_prop(&self, ordinal: u32, handle_types: u32, rdma: bool) -> sys::CUmemAllocationProp {
        sys::CUmemAllocationProp {
            type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes: sys::CUmemAllocationHandleType(handle_types),
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: ordinal as c_int,
            },
            win32HandleMetaData: ptr::null_mut(),
            allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
                compressionType: 0,
                gpuDirectRDMACapable: u8::from(rdma),
                usage: 0,
                reserved: [0; 4],
            },
        }
    }

    /// Minimum granularity of allocations with `prop`.
    pub(crate) fn granularity(&self, prop: &sys::CUmemAllocationProp) -> Result<u64, CudaError> {
        let mut g: usize = 0;
        // SAFETY: `prop` is a valid allocation property; `g` a valid out-pointer.
        let r = unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut g,
                prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        };
        check("cuMemGetAllocationGranularity", r)?;
        Ok((g as u64).max(1))
    }

    /// `cuMemCreate` of `size` bytes (a multiple of the granularity).
    pub(crate) fn mem_create(&self, size: u64, prop: &sys::CUmemAllocationProp) -> Result<u64, CudaError> {
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property; the driver checks size against the granularity.
        check("cuMemCreate", unsafe { sys::cuMemCreate(&mut h, size as usize, prop, 0) })?;
        Ok(h)
    }

    /// `cuMemRelease` of a generic allocation handle.
    pub(crate) fn mem_release(&self, handle: u64) -> Result<(), CudaError> {
        // SAFETY: releasing a handle drops one reference; mappings keep their own reference.
        check("cuMemRelease", unsafe { sys::cuMemRelease(handle) })
    }

    /// `cuMemAddressReserve` of `size` bytes aligned to `align`.
    pub(crate) fn address_reserve(&self, size: u64, align: u64) -> Result<u64, CudaError> {
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; reserving address space touches no memory.
        let r = unsafe { sys::cuMemAddressReserve(&mut p, size as usize, align as usize, 0, 0) };
        check("cuMemAddressReserve", r)?;
        Ok(p)
    }

    /// `cuMemAddressFree`.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` must be a reservation from [`Driver::address_reserve`] with nothing mapped.
    pub(crate) unsafe fn address_free(&self, ptr: u64, size: u64) -> Result<(), CudaError> {
        // SAFETY: per the contract, an unmapped reservation of ours.
        check("cuMemAddressFree", unsafe { sys::cuMemAddressFree(ptr, size as usize) })
    }

    /// `cuMemMap` of `handle` at `ptr` (offset 0).
    pub(crate) fn mem_map(&self, ptr: u64, size: u64, handle: u64) -> Result<(), CudaError> {
        // SAFETY: mapping into a reservation of ours; the driver validates handle and range.
        check("cuMemMap", unsafe { sys::cuMemMap(ptr, size as usize, 0, handle, 0) })
    }

    /// `cuMemUnmap`.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` must be a mapping made by [`Driver::mem_map`] that no copy uses any more.
    pub(crate) unsafe fn mem_unmap(&self, ptr: u64, size: u64) -> Result<(), CudaError> {
        // SAFETY: per the contract, an unused mapping of ours.
        check("cuMemUnmap", unsafe { sys::cuMemUnmap(ptr, size as usize) })
    }

    /// `cuMemSetAccess`: read-write access for each device in `ordinals`.
    pub(crate) fn set_access(&self, ptr: u64, size: u64, ordinals: &[u32]) -> Result<(), CudaError> {
        let descs: Vec<sys::CUmemAccessDesc> = ordinals
            .iter()
            .map(|&o| sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: o as c_int,
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            })
            .collect();
        // SAFETY: `descs` holds `descs.len()` valid access descriptors for a mapped range of ours.
        let r = unsafe { sys::cuMemSetAccess(ptr, size as usize, descs.as_ptr(), descs.len()) };
        check("cuMemSetAccess", r)
    }

    /// `cuMemRetainAllocationHandle` of the VMM allocation mapped at `ptr` (release it after use).
    pub(crate) fn retain_allocation_handle(&self, ptr: u64) -> Result<u64, CudaError> {
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer; the driver only looks the address up.
        let r = unsafe { sys::cuMemRetainAllocationHandle(&mut h, ptr as *mut c_void) };
        check("cuMemRetainAllocationHandle", r)?;
        Ok(h)
    }

    /// Properties of an allocation handle (its device and handle types).
    pub(crate) fn handle_prop(&self, handle: u64) -> Result<sys::CUmemAllocationProp, CudaError> {
        let mut prop = self.vmm_prop(0, 0, false);
        // SAFETY: `prop` is a valid out-pointer of the right type.
        let r = unsafe { sys::cuMemGetAllocationPropertiesFromHandle(&mut prop, handle) };
        check("cuMemGetAllocationPropertiesFromHandle", r)?;
        Ok(prop)
    }

    /// Exports an allocation handle as a POSIX file descriptor.
    pub(crate) fn export_fd(&self, handle: u64) -> Result<OwnedFd, CudaError> {
        let mut fd: c_int = -1;
        // SAFETY: for POSIX_FILE_DESCRIPTOR the driver writes an int to the out-pointer.
        let r = unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fd as *mut c_int).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                0,
            )
        };
        check("cuMemExportToShareableHandle(POSIX_FILE_DESCRIPTOR)", r)?;
        // SAFETY: on success `fd` is a new descriptor the caller owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Exports an allocation handle as a fabric handle (64 bytes).
    pub(crate) fn export_fabric(&self, handle: u64) -> Result<[u8; RAW_HANDLE_BYTES], CudaError> {
        let mut fh = sys::CUmemFabricHandle { data: [0; RAW_HANDLE_BYTES] };
        // SAFETY: for FABRIC the driver writes a CUmemFabricHandle to the out-pointer.
        let r = unsafe {
            sys::cuMemExportToShareableHandle(
                (&mut fh as *mut sys::CUmemFabricHandle).cast(),
                handle,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_FABRIC,
                0,
            )
        };
        check("cuMemExportToShareableHandle(FABRIC)", r)?;
        Ok(fh.data)
    }

    /// Imports an allocation handle from a POSIX file descriptor (the fd stays the caller's).
    pub(crate) fn import_fd(&self, fd: RawFd) -> Result<u64, CudaError> {
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX_FILE_DESCRIPTOR the OS handle is the fd value itself, passed as a pointer.
        let r = unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut h,
                fd as isize as *mut c_void,
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            )
        };
        check("cuMemImportFromShareableHandle(POSIX_FILE_DESCRIPTOR)", r)?;
        Ok(h)
    }

    /// Imports an allocation handle from a fabric handle.
    pub(crate) fn import_fabric(&self, data: &[u8; RAW_HANDLE_BYTES]) -> Result<u64, CudaError> {
        let mut h: sys::CUmemGenericAllocationHandle = 0;
        let mut fh = sys::CUmemFabricHandle { data: *data };
        // SAFETY: for FABRIC the OS handle is a pointer to a CUmemFabricHandle, valid for the call.
        let r = unsafe {
            sys::cuMemImportFromShareableHandle(
                &mut h,
                (&mut fh as *mut sys::CUmemFabricHandle).cast(),
                sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_FABRIC,
            )
        };
        check("cuMemImportFromShareableHandle(FABRIC)", r)?;
        Ok(h)
    }

    /// `cuIpcGetMemHandle` of a `cuMemAlloc` allocation (current context).
    pub(crate) fn ipc_get(&self, ptr: u64) -> Result<[u8; RAW_HANDLE_BYTES], CudaError> {
        let mut h = sys::CUipcMemHandle { reserved: [0; RAW_HANDLE_BYTES] };
        // SAFETY: valid out-pointer; the driver only looks the allocation up.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut h, ptr) })?;
        Ok(h.reserved.map(|b| b as u8))
    }

    /// `cuIpcOpenMemHandle` (lazy peer access) in the current context.
    pub(crate) fn ipc_open(&self, data: &[u8; RAW_HANDLE_BYTES]) -> Result<u64, CudaError> {
        let h = sys::CUipcMemHandle { reserved: data.map(|b| b as c_char) };
        let mut p: sys::CUdeviceptr = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as c_uint;
        // SAFETY: valid out-pointer; the driver validates the handle bytes.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut p, h, flags) })?;
        Ok(p)
    }

    /// `cuIpcCloseMemHandle`.
    ///
    /// # Safety
    /// `ptr` must come from [`Driver::ipc_open`], not yet closed, with no copy using it.
    pub(crate) unsafe fn ipc_close(&self, ptr: u64) -> Result<(), CudaError> {
        // SAFETY: per the contract, an open mapping of ours nobody uses.
        check("cuIpcCloseMemHandle", unsafe { sys::cuIpcCloseMemHandle(ptr) })
    }

    /// `cuMemGetHandleForAddressRange(DMA_BUF_FD)` of a host-page-aligned device range.
    pub(crate) fn dmabuf_fd(&self, ptr: u64, size: u64) -> Result<OwnedFd, CudaError> {
        let mut fd: c_int = -1;
        // SAFETY: only reached when the symbol exists (dmabuf support checked at load); for
        // DMA_BUF_FD the driver writes an int to the out-pointer.
        let r = unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut c_int).cast(),
                ptr,
                size as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        };
        check("cuMemGetHandleForAddressRange(DMA_BUF_FD)", r)?;
        // SAFETY: on success `fd` is a new dmabuf descriptor the caller owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// A non-blocking stream in the current context.
    pub(crate) fn stream_create(&self) -> Result<sys::CUstream, CudaError> {
        let mut s: sys::CUstream = ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint;
        // SAFETY: valid out-pointer; a context is current.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, flags) })?;
        Ok(s)
    }

    /// `cuStreamDestroy`.
    ///
    /// # Safety
    /// `s` must be a stream of ours, not destroyed yet.
    pub(crate) unsafe fn stream_destroy(&self, s: sys::CUstream) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuStreamDestroy", unsafe { sys::cuStreamDestroy_v2(s) })
    }

    /// Waits for all work on `s`.
    pub(crate) fn stream_sync(&self, s: sys::CUstream) -> Result<(), CudaError> {
        // SAFETY: `s` is a live stream of ours (callers hold the Lane that owns it).
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })
    }

    /// An event without timing in the current context.
    pub(crate) fn event_create(&self) -> Result<sys::CUevent, CudaError> {
        let mut e: sys::CUevent = ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint;
        // SAFETY: valid out-pointer; a context is current.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, flags) })?;
        Ok(e)
    }

    /// `cuEventDestroy`.
    ///
    /// # Safety
    /// `e` must be an event of ours, not destroyed yet.
    pub(crate) unsafe fn event_destroy(&self, e: sys::CUevent) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuEventDestroy", unsafe { sys::cuEventDestroy_v2(e) })
    }

    /// Records `e` on `s`.
    pub(crate) fn event_record(&self, e: sys::CUevent, s: sys::CUstream) -> Result<(), CudaError> {
        // SAFETY: both are live handles of ours in the same context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(e, s) })
    }

    /// Waits for `e`.
    pub(crate) fn event_sync(&self, e: sys::CUevent) -> Result<(), CudaError> {
        // SAFETY: `e` is a live event of ours.
        check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(e) })
    }

    /// Page-locked host memory usable from every context (`CU_MEMHOSTALLOC_PORTABLE`).
    pub(crate) fn host_alloc(&self, len: usize) -> Result<*mut u8, CudaError> {
        let mut p: *mut c_void = ptr::null_mut();
        // SAFETY: valid out-pointer; a context is current.
        let r = unsafe { sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE) };
        check("cuMemHostAlloc", r)?;
        Ok(p.cast())
    }

    /// `cuMemFreeHost`.
    ///
    /// # Safety
    /// `p` must come from [`Driver::host_alloc`], not freed, with no copy in flight using it.
    pub(crate) unsafe fn host_free(&self, p: *mut u8) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(p.cast()) })
    }

    /// Queues a host-to-device copy on `s`.
    ///
    /// # Safety
    /// `src` must be readable for `n` bytes and stay unchanged until the copy completes;
    /// `[dst, dst+n)` must be device memory the caller may write.
    pub(crate) unsafe fn htod_async(
        &self,
        dst: u64,
        src: *const u8,
        n: usize,
        s: sys::CUstream,
    ) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), n, s) })
    }

    /// Queues a device-to-host copy on `s`.
    ///
    /// # Safety
    /// `dst` must be writable for `n` bytes, untouched by anyone else until the copy completes;
    /// `[src, src+n)` must be device memory the caller may read.
    pub(crate) unsafe fn dtoh_async(
        &self,
        dst: *mut u8,
        src: u64,
        n: usize,
        s: sys::CUstream,
    ) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuMemcpyDtoHAsync", unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, n, s) })
    }

    /// Queues a device-to-device copy (same context) on `s`.
    ///
    /// # Safety
    /// Both ranges must be device memory the caller may read (`src`) and write (`dst`).
    pub(crate) unsafe fn dtod_async(&self, dst: u64, src: u64, n: usize, s: sys::CUstream) -> Result<(), CudaError> {
        // SAFETY: per the contract.
        check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, n, s) })
    }

    /// Queues a copy between the memories of two devices' contexts on `s`.
    ///
    /// # Safety
    /// As for [`Driver::dtod_async`]; `dst` is reachable in `dst_ordinal`'s context and `src` in
    /// `src_ordinal`'s.
    pub(crate) unsafe fn peer_async(
        &self,
        dst: u64,
        dst_ordinal: u32,
        src: u64,
        src_ordinal: u32,
        n: usize,
        s: sys::CUstream,
    ) -> Result<(), CudaError> {
        let dst_ctx = self.context(dst_ordinal)?;
        let src_ctx = self.context(src_ordinal)?;
        // SAFETY: per the contract; both contexts are retained primary contexts.
        check("cuMemcpyPeerAsync", unsafe { sys::cuMemcpyPeerAsync(dst, dst_ctx, src, src_ctx, n, s) })
    }
}

/// Reads one device's properties.
fn device_info(dev: sys::CUdevice, ordinal: u32, vmm_api: bool, dmabuf_api: bool) -> Result<DeviceInfo, CudaError> {
    use sys::CUdevice_attribute as A;
    let attr = |a: A| -> bool {
        let mut v: c_int = 0;
        // SAFETY: `dev` came from cuDeviceGet; `v` is a valid out-pointer. Attributes an old
        // driver does not know return an error, read as "unsupported".
        let r = unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) };
        r == sys::CUresult::CUDA_SUCCESS && v != 0
    };
    let mut name = [0 as c_char; 256];
    // SAFETY: the buffer holds 256 bytes and the driver writes at most `len` including the NUL.
    check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev) })?;
    let mut bus = [0 as c_char; 64];
    // SAFETY: as above, 64 bytes.
    check("cuDeviceGetPCIBusId", unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) })?;
    let text = |buf: &[c_char]| -> String {
        let bytes: Vec<u8> = buf.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let raw_bus = text(&bus);
    let pci_bus_id = crate::topology::normalize_pci_bus_id(&raw_bus).unwrap_or_else(|| raw_bus.to_lowercase());
    let vmm = vmm_api && attr(A::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED);
    Ok(DeviceInfo {
        ordinal,
        name: text(&name),
        pci_bus_id,
        vmm,
        posix_fd: vmm && attr(A::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED),
        fabric: vmm && attr(A::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED),
        dmabuf: dmabuf_api && attr(A::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED),
        rdma_with_vmm: vmm && attr(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED),
    })
}

/// Handle-type bit of POSIX file descriptors (`CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`).
pub(crate) const HANDLE_TYPE_POSIX_FD: u32 = 1;
/// Handle-type bit of fabric handles (`CU_MEM_HANDLE_TYPE_FABRIC`).
pub(crate) const HANDLE_TYPE_FABRIC: u32 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_typed_error_naming_it() {
        let e = Driver::load(|| false).err().unwrap();
        assert_eq!(e, CudaError::LibraryMissing);
        assert_eq!(e.to_string(), "libcuda.so.1 not found (no NVIDIA driver on this machine)");
        assert_eq!(e.call(), None);
    }

    #[test]
    fn call_errors_name_the_call_and_the_error() {
        let e = CudaError::Call { call: "cuMemAlloc", code: 2, name: "CUDA_ERROR_OUT_OF_MEMORY".into() };
        assert_eq!(e.to_string(), "cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY (CUresult 2)");
        assert_eq!(
            (e.call(), e.error_name(), e.code()),
            (Some("cuMemAlloc"), Some("CUDA_ERROR_OUT_OF_MEMORY"), Some(2))
        );
        let e = CudaError::MissingSymbol { symbol: "cuMemCreate".into(), version: 10010 };
        assert!(e.to_string().contains("libcuda.so.1 lacks cuMemCreate"));
    }

    #[test]
    fn versions_print_as_major_minor() {
        let info = DriverInfo { version: 12040, devices: vec![] };
        assert_eq!(info.version_string(), "12.4");
        assert_eq!(DriverInfo { version: 11070, devices: vec![] }.version_string(), "11.7");
    }

    #[test]
    fn the_process_driver_never_panics() {
        // Without libcuda (this machine) an error naming it; with a GPU, a driver with devices.
        match Driver::get() {
            Ok(d) => assert!(d.device_count() >= 1),
            Err(e) if !library_present() => assert_eq!(e, CudaError::LibraryMissing),
            Err(e) => println!("CUDA unusable here: {e}"),
        }
    }
}
