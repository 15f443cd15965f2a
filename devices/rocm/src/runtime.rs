//! The HIP runtime, loaded once at run time with `libloading`, and checked wrappers over the calls this
//! crate makes. Nothing here links against ROCm: on a machine without it [`hip`] returns
//! [`RocmError::LibraryNotFound`].

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use libloading::Library;

use crate::error::RocmError;
use crate::ffi::{self, hipError_t};

/// File names tried, in order, when the process has not loaded the HIP runtime already.
pub const LIBRARY_CANDIDATES: [&str; 4] =
    ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.7", "/opt/rocm/lib/libamdhip64.so"];

/// An opaque `hipMemGenericAllocationHandle_t`, kept as an integer so records are `Send`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VmmHandle(pub(crate) usize);

impl VmmHandle {
    fn as_ptr(self) -> ffi::hipMemGenericAllocationHandle_t {
        self.0 as ffi::hipMemGenericAllocationHandle_t
    }
}

/// The virtual memory management entry points: present together or not used at all.
pub(crate) struct Vmm {
    pub(crate) mem_create: ffi::hipMemCreate_t,
    pub(crate) export: ffi::hipMemExportToShareableHandle_t,
    pub(crate) import: ffi::hipMemImportFromShareableHandle_t,
    pub(crate) reserve: ffi::hipMemAddressReserve_t,
    pub(crate) map: ffi::hipMemMap_t,
    pub(crate) set_access: ffi::hipMemSetAccess_t,
    pub(crate) unmap: ffi::hipMemUnmap_t,
    pub(crate) address_free: ffi::hipMemAddressFree_t,
    pub(crate) release: ffi::hipMemRelease_t,
    pub(crate) granularity: ffi::hipMemGetAllocationGranularity_t,
}

/// The loaded HIP runtime: its entry points, valid for the life of the process (the library is never
/// unloaded).
pub(crate) struct Hip {
    pub(crate) library: String,
    pub(crate) get_device_count: ffi::hipGetDeviceCount_t,
    pub(crate) set_device: ffi::hipSetDevice_t,
    pub(crate) get_device: ffi::hipGetDevice_t,
    pub(crate) runtime_get_version: ffi::hipRuntimeGetVersion_t,
    pub(crate) device_get_attribute: ffi::hipDeviceGetAttribute_t,
    pub(crate) device_get_pci_bus_id: ffi::hipDeviceGetPCIBusId_t,
    pub(crate) malloc: ffi::hipMalloc_t,
    pub(crate) free: ffi::hipFree_t,
    pub(crate) memcpy: ffi::hipMemcpy_t,
    pub(crate) memcpy_peer: ffi::hipMemcpyPeer_t,
    pub(crate) pointer_get_attributes: ffi::hipPointerGetAttributes_t,
    pub(crate) mem_get_address_range: ffi::hipMemGetAddressRange_t,
    pub(crate) ipc_get_mem_handle: ffi::hipIpcGetMemHandle_t,
    pub(crate) ipc_open_mem_handle: ffi::hipIpcOpenMemHandle_t,
    pub(crate) ipc_close_mem_handle: ffi::hipIpcCloseMemHandle_t,
    pub(crate) get_error_name: ffi::hipGetErrorName_t,
    pub(crate) get_error_string: ffi::hipGetErrorName_t,
    pub(crate) get_last_error: Option<ffi::hipGetLastError_t>,
    pub(crate) vmm: Option<Vmm>,
    pub(crate) lib: Library,
}

impl std::fmt::Debug for Hip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hip").field("library", &self.library).field("vmm", &self.vmm.is_some()).finish()
    }
}

static HIP: OnceLock<Result<Hip, RocmError>> = OnceLock::new();

/// The process-wide HIP runtime, loaded on first use from [`LIBRARY_CANDIDATES`].
pub(crate) fn hip() -> Result<&'static Hip, RocmError> {
    HIP.get_or_init(|| Hip::load(&LIBRARY_CANDIDATES)).as_ref().map_err(Clone::clone)
}

/// Opens the first loadable candidate, preferring a copy the process has loaded already (a framework's
/// bundled runtime): two HIP runtimes in one process do not share allocations.
fn open(candidates: &[&str]) -> Result<(Library, String), RocmError> {
    for name in candidates {
        // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded (its initializers
        // have run); nothing new is loaded or initialized.
        let already = unsafe { libloading::os::unix::Library::open(Some(name), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
        if let Ok(lib) = already {
            return Ok((lib.into(), (*name).to_string()));
        }
    }
    let mut tried = Vec::new();
    for name in candidates {
        // SAFETY: loading the HIP runtime runs its initializers, which only set up the runtime's own state
        // (they are what every HIP program runs at start); no other code of ours runs meanwhile.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, (*name).to_string())),
            Err(e) => tried.push(format!("{name} ({e})")),
        }
    }
    Err(RocmError::LibraryNotFound { tried: tried.join("; ") })
}

/// Reads symbol `name` as a `T`.
///
/// # Safety
/// `T` must be the function pointer type whose signature is the C prototype of `name`, and the value must
/// not be called after `lib` is unloaded.
unsafe fn sym<T: Copy>(lib: &Library, library: &str, name: &'static str) -> Result<T, RocmError> {
    // SAFETY: the caller guarantees `T` matches the symbol's type.
    match unsafe { lib.get::<T>(name.as_bytes()) } {
        Ok(s) => Ok(*s),
        Err(_) => Err(RocmError::MissingSymbol { library: library.to_string(), symbol: name }),
    }
}

/// Reads every VMM symbol, or none.
///
/// # Safety
/// As for [`sym`]: the types are ffi's declarations of these prototypes and `lib` outlives the result.
unsafe fn load_vmm(lib: &Library, library: &str) -> Result<Vmm, RocmError> {
    // SAFETY: each type is the ffi declaration of the named function's prototype; the caller keeps `lib`.
    unsafe {
        Ok(Vmm {
            mem_create: sym(lib, library, "hipMemCreate")?,
            export: sym(lib, library, "hipMemExportToShareableHandle")?,
            import: sym(lib, library, "hipMemImportFromShareableHandle")?,
            reserve: sym(lib, library, "hipMemAddressReserve")?,
            map: sym(lib, library, "hipMemMap")?,
            set_access: sym(lib, library, "hipMemSetAccess")?,
            unmap: sym(lib, library, "hipMemUnmap")?,
            address_free: sym(lib, library, "hipMemAddressFree")?,
            release: sym(lib, library, "hipMemRelease")?,
            granularity: sym(lib, library, "hipMemGetAllocationGranularity")?,
        })
    }
}

impl Hip {
    /// Loads the runtime from the first candidate that opens, and every entry point this crate uses.
    pub(crate) fn load(candidates: &[&str]) -> Result<Hip, RocmError> {
        let (lib, library) = open(candidates)?;
        let l = library.as_str();
        // SAFETY: each symbol is read with the function pointer type ffi declares for it from the
        // header's prototype; the pointers are only called while `lib` is loaded, which is for as long
        // as the returned Hip lives (it owns `lib`).
        let mut hip = unsafe {
            Hip {
                library: String::new(),
                get_device_count: sym(&lib, l, "hipGetDeviceCount")?,
                set_device: sym(&lib, l, "hipSetDevice")?,
                get_device: sym(&lib, l, "hipGetDevice")?,
                runtime_get_version: sym(&lib, l, "hipRuntimeGetVersion")?,
                device_get_attribute: sym(&lib, l, "hipDeviceGetAttribute")?,
                device_get_pci_bus_id: sym(&lib, l, "hipDeviceGetPCIBusId")?,
                malloc: sym(&lib, l, "hipMalloc")?,
                free: sym(&lib, l, "hipFree")?,
                memcpy: sym(&lib, l, "hipMemcpy")?,
                memcpy_peer: sym(&lib, l, "hipMemcpyPeer")?,
                pointer_get_attributes: sym(&lib, l, "hipPointerGetAttributes")?,
                mem_get_address_range: sym(&lib, l, "hipMemGetAddressRange")?,
                ipc_get_mem_handle: sym(&lib, l, "hipIpcGetMemHandle")?,
                ipc_open_mem_handle: sym(&lib, l, "hipIpcOpenMemHandle")?,
                ipc_close_mem_handle: sym(&lib, l, "hipIpcCloseMemHandle")?,
                get_error_name: sym(&lib, l, "hipGetErrorName")?,
                get_error_string: sym(&lib, l, "hipGetErrorString")?,
                get_last_error: sym(&lib, l, "hipGetLastError").ok(),
                vmm: None,
                lib,
            }
        };
        // SAFETY: as above; `hip` owns the library.
        match unsafe { load_vmm(&hip.lib, &library) } {
            Ok(vmm) => hip.vmm = Some(vmm),
            Err(e) => tracing::debug!(error = %e, "HIP virtual memory management unavailable; using hipMalloc"),
        }
        hip.library = library;
        Ok(hip)
    }

    /// The file name the runtime was loaded from.
    pub(crate) fn library(&self) -> &str {
        &self.library
    }

    /// True when every VMM entry point (shareable file descriptors) is present.
    pub(crate) fn has_vmm(&self) -> bool {
        self.vmm.is_some()
    }

    fn vmm(&self, call: &'static str) -> Result<&Vmm, RocmError> {
        self.vmm.as_ref().ok_or_else(|| RocmError::MissingSymbol { library: self.library.clone(), symbol: call })
    }

    /// `Ok` for `hipSuccess`; otherwise the error, named, after clearing the thread's sticky last error (so
    /// that a failure this crate reports does not resurface in the application's next `hipGetLastError`).
    fn check(&self, call: &'static str, code: hipError_t) -> Result<(), RocmError> {
        if code == ffi::hipSuccess {
            return Ok(());
        }
        self.clear_last_error();
        Err(RocmError::Hip {
            call,
            code,
            name: self.error_text(self.get_error_name, code),
            message: self.error_text(self.get_error_string, code),
        })
    }

    fn error_text(&self, f: ffi::hipGetErrorName_t, code: hipError_t) -> String {
        // SAFETY: hipGetErrorName/hipGetErrorString accept any value and return a pointer to a static
        // NUL-terminated string (or null, handled below).
        let p = unsafe { f(code) };
        if p.is_null() {
            return format!("hipError {code}");
        }
        // SAFETY: non-null pointers from these functions point to static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Resets the calling thread's last HIP error.
    pub(crate) fn clear_last_error(&self) {
        if let Some(f) = self.get_last_error {
            // SAFETY: hipGetLastError takes no arguments and only reads and resets thread-local state.
            let _ = unsafe { f() };
        }
    }

    /// Number of GPUs; 0 when the runtime reports `hipErrorNoDevice`.
    pub(crate) fn device_count(&self) -> Result<i32, RocmError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out pointer for the call.
        let code = unsafe { (self.get_device_count)(&mut n) };
        if code == ffi::hipErrorNoDevice {
            self.clear_last_error();
            return Ok(0);
        }
        self.check("hipGetDeviceCount", code)?;
        Ok(n)
    }

    /// Makes `ordinal` the calling thread's current device.
    pub(crate) fn set_device(&self, ordinal: i32) -> Result<(), RocmError> {
        // SAFETY: plain value argument; an invalid ordinal is reported as an error.
        self.check("hipSetDevice", unsafe { (self.set_device)(ordinal) })
    }

    /// The calling thread's current device.
    pub(crate) fn get_device(&self) -> Result<i32, RocmError> {
        let mut d: c_int = 0;
        // SAFETY: `d` is a valid out pointer.
        self.check("hipGetDevice", unsafe { (self.get_device)(&mut d) })?;
        Ok(d)
    }

    /// `hipRuntimeGetVersion` (e.g. 60_342_134 for 6.3.42134, 70_100_000 for 7.1).
    pub(crate) fn runtime_version(&self) -> Result<i32, RocmError> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer.
        self.check("hipRuntimeGetVersion", unsafe { (self.runtime_get_version)(&mut v) })?;
        Ok(v)
    }

    /// An integer attribute of GPU `ordinal`.
    pub(crate) fn device_attribute(&self, attr: ffi::hipDeviceAttribute_t, ordinal: i32) -> Result<i32, RocmError> {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out pointer; attribute and ordinal are validated by the runtime.
        self.check("hipDeviceGetAttribute", unsafe { (self.device_get_attribute)(&mut v, attr, ordinal) })?;
        Ok(v)
    }

    /// The PCI address of GPU `ordinal` as the runtime spells it (`0000:03:00.0`).
    pub(crate) fn pci_bus_id(&self, ordinal: i32) -> Result<String, RocmError> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: `buf` is writable for the length passed; the runtime writes at most that many bytes.
        let code = unsafe { (self.device_get_pci_bus_id)(buf.as_mut_ptr(), buf.len() as c_int - 1, ordinal) };
        self.check("hipDeviceGetPCIBusId", code)?;
        let bytes: Vec<u8> = buf.iter().map(|c| *c as u8).collect();
        let s = CStr::from_bytes_until_nul(&bytes).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(s)
    }

    /// `hipMalloc` on the current device.
    pub(crate) fn malloc(&self, size: usize) -> Result<u64, RocmError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` is a valid out pointer; allocating touches no memory of ours.
        self.check("hipMalloc", unsafe { (self.malloc)(&mut p, size) })?;
        Ok(p as u64)
    }

    /// `hipFree`.
    ///
    /// # Safety
    /// `ptr` came from [`Hip::malloc`] and is not used (or freed) again.
    pub(crate) unsafe fn free(&self, ptr: u64) -> Result<(), RocmError> {
        // SAFETY: the caller owns the allocation and gives it up.
        self.check("hipFree", unsafe { (self.free)(ptr as *mut c_void) })
    }

    /// `hipMemcpy` (synchronous with respect to the host).
    ///
    /// # Safety
    /// `src` is readable and `dst` writable for `len` bytes (host memory of this process, or live device
    /// memory), they do not overlap, and `kind` names their sides correctly (or is `hipMemcpyDefault`).
    pub(crate) unsafe fn memcpy(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
        kind: ffi::hipMemcpyKind,
    ) -> Result<(), RocmError> {
        // SAFETY: the caller guarantees both ranges.
        self.check("hipMemcpy", unsafe { (self.memcpy)(dst, src, len, kind) })
    }

    /// `hipMemcpyPeer`.
    ///
    /// # Safety
    /// `src` is `len` readable bytes of device memory on `src_device`, `dst` `len` writable bytes on
    /// `dst_device`, not overlapping.
    pub(crate) unsafe fn memcpy_peer(
        &self,
        dst: *mut c_void,
        dst_device: i32,
        src: *const c_void,
        src_device: i32,
        len: usize,
    ) -> Result<(), RocmError> {
        // SAFETY: the caller guarantees both ranges.
        self.check("hipMemcpyPeer", unsafe { (self.memcpy_peer)(dst, dst_device, src, src_device, len) })
    }

    /// What the runtime knows about `addr` (it looks the address up in its tables; nothing is read).
    pub(crate) fn pointer_attributes(&self, addr: u64) -> Result<ffi::hipPointerAttribute_t, RocmError> {
        let mut a = ffi::hipPointerAttribute_t::zeroed();
        // SAFETY: `a` is a valid out pointer of the declared layout; the runtime does not dereference `addr`.
        self.check("hipPointerGetAttributes", unsafe { (self.pointer_get_attributes)(&mut a, addr as *const c_void) })?;
        Ok(a)
    }

    /// Base and size of the device allocation holding `addr`.
    pub(crate) fn address_range(&self, addr: u64) -> Result<(u64, u64), RocmError> {
        let mut base: ffi::hipDeviceptr_t = std::ptr::null_mut();
        let mut size: usize = 0;
        // SAFETY: valid out pointers; the runtime only looks `addr` up.
        let code = unsafe { (self.mem_get_address_range)(&mut base, &mut size, addr as ffi::hipDeviceptr_t) };
        self.check("hipMemGetAddressRange", code)?;
        Ok((base as u64, size as u64))
    }

    /// An IPC handle for the device allocation at `addr`.
    pub(crate) fn ipc_get_handle(&self, addr: u64) -> Result<[u8; ffi::HIP_IPC_HANDLE_SIZE], RocmError> {
        let mut h = ffi::hipIpcMemHandle_t::zeroed();
        // SAFETY: `h` is a valid out pointer of 64 bytes; the runtime validates `addr` against its tables.
        self.check("hipIpcGetMemHandle", unsafe { (self.ipc_get_mem_handle)(&mut h, addr as *mut c_void) })?;
        Ok(h.to_bytes())
    }

    /// Maps another process's allocation; returns its address here.
    pub(crate) fn ipc_open(&self, handle: &[u8; ffi::HIP_IPC_HANDLE_SIZE]) -> Result<u64, RocmError> {
        let mut p: *mut c_void = std::ptr::null_mut();
        let h = ffi::hipIpcMemHandle_t::from_bytes(handle);
        // SAFETY: `p` is a valid out pointer; the handle is passed by value as the prototype declares; the
        // runtime validates it (a bad or stale handle is an error) and maps new memory, touching none of ours.
        let code = unsafe { (self.ipc_open_mem_handle)(&mut p, h, ffi::hipIpcMemLazyEnablePeerAccess) };
        self.check("hipIpcOpenMemHandle", code)?;
        Ok(p as u64)
    }

    /// Unmaps memory mapped with [`Hip::ipc_open`].
    ///
    /// # Safety
    /// `ptr` came from [`Hip::ipc_open`] and is not used again.
    pub(crate) unsafe fn ipc_close(&self, ptr: u64) -> Result<(), RocmError> {
        // SAFETY: the caller gives up the mapping.
        self.check("hipIpcCloseMemHandle", unsafe { (self.ipc_close_mem_handle)(ptr as *mut c_void) })
    }

    /// The minimum granularity of VMM allocations with `prop`.
    pub(crate) fn granularity(&self, prop: &ffi::hipMemAllocationProp) -> Result<usize, RocmError> {
        let vmm = self.vmm("hipMemGetAllocationGranularity")?;
        let mut g: usize = 0;
        // SAFETY: valid out pointer and property struct of the declared layout.
        let code = unsafe { (vmm.granularity)(&mut g, prop, ffi::hipMemAllocationGranularityMinimum) };
        self.check("hipMemGetAllocationGranularity", code)?;
        Ok(g)
    }

    /// `hipMemCreate`: physical memory, not yet mapped.
    pub(crate) fn mem_create(&self, size: usize, prop: &ffi::hipMemAllocationProp) -> Result<VmmHandle, RocmError> {
        let vmm = self.vmm("hipMemCreate")?;
        let mut h: ffi::hipMemGenericAllocationHandle_t = std::ptr::null_mut();
        // SAFETY: valid out pointer and property struct.
        self.check("hipMemCreate", unsafe { (vmm.mem_create)(&mut h, size, prop, 0) })?;
        Ok(VmmHandle(h as usize))
    }

    /// Exports `handle` as a POSIX file descriptor (a new one each call, owned by the caller).
    ///
    /// # Safety
    /// `handle` is a live handle from [`Hip::mem_create`] or [`Hip::import_fd`].
    pub(crate) unsafe fn export_fd(&self, handle: VmmHandle) -> Result<OwnedFd, RocmError> {
        let vmm = self.vmm("hipMemExportToShareableHandle")?;
        let mut fd: c_int = -1;
        // SAFETY: for a POSIX fd handle type the runtime writes one `int` through the pointer; the caller
        // guarantees the handle is live.
        let code = unsafe {
            (vmm.export)(
                (&mut fd as *mut c_int).cast::<c_void>(),
                handle.as_ptr(),
                ffi::hipMemHandleTypePosixFileDescriptor,
                0,
            )
        };
        self.check("hipMemExportToShareableHandle", code)?;
        if fd < 0 {
            return Err(RocmError::Hip {
                call: "hipMemExportToShareableHandle",
                code: ffi::hipErrorInvalidHandle,
                name: "invalid fd".into(),
                message: format!("the runtime returned file descriptor {fd}"),
            });
        }
        // SAFETY: the runtime created this descriptor for the caller, who now owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Imports physical memory from a POSIX file descriptor (which stays the caller's). `fd_by_value`: ROCm
    /// 7.1 and newer take the descriptor as `(void*)(uintptr_t)fd`, older releases a pointer to it.
    pub(crate) fn import_fd(&self, fd: BorrowedFd<'_>, fd_by_value: bool) -> Result<VmmHandle, RocmError> {
        let vmm = self.vmm("hipMemImportFromShareableHandle")?;
        let mut raw: c_int = fd.as_raw_fd();
        let os_handle: *mut c_void =
            if fd_by_value { raw as usize as *mut c_void } else { (&mut raw as *mut c_int).cast::<c_void>() };
        let mut h: ffi::hipMemGenericAllocationHandle_t = std::ptr::null_mut();
        // SAFETY: `h` is a valid out pointer; `os_handle` is what this runtime version expects (the fd, or a
        // pointer to a live `int` holding it); the fd is open for the whole call (borrowed).
        let code = unsafe { (vmm.import)(&mut h, os_handle, ffi::hipMemHandleTypePosixFileDescriptor) };
        self.check("hipMemImportFromShareableHandle", code)?;
        Ok(VmmHandle(h as usize))
    }

    /// Reserves `size` bytes of device virtual address space aligned to `alignment`.
    pub(crate) fn address_reserve(&self, size: usize, alignment: usize) -> Result<u64, RocmError> {
        let vmm = self.vmm("hipMemAddressReserve")?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out pointer; no fixed address is requested.
        self.check("hipMemAddressReserve", unsafe { (vmm.reserve)(&mut p, size, alignment, std::ptr::null_mut(), 0) })?;
        Ok(p as u64)
    }

    /// Maps `size` bytes of `handle` at `ptr`.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` is an unmapped part of a reservation of this process, `handle` is live.
    pub(crate) unsafe fn map(&self, ptr: u64, size: usize, handle: VmmHandle) -> Result<(), RocmError> {
        let vmm = self.vmm("hipMemMap")?;
        // SAFETY: the caller guarantees the range and the handle.
        self.check("hipMemMap", unsafe { (vmm.map)(ptr as *mut c_void, size, 0, handle.as_ptr(), 0) })
    }

    /// Grants access to mapped memory.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` was mapped with [`Hip::map`].
    pub(crate) unsafe fn set_access(
        &self,
        ptr: u64,
        size: usize,
        desc: &[ffi::hipMemAccessDesc],
    ) -> Result<(), RocmError> {
        let vmm = self.vmm("hipMemSetAccess")?;
        // SAFETY: `desc` is a valid array of `desc.len()` descriptors; the caller guarantees the range.
        self.check("hipMemSetAccess", unsafe { (vmm.set_access)(ptr as *mut c_void, size, desc.as_ptr(), desc.len()) })
    }

    /// Unmaps memory mapped with [`Hip::map`].
    ///
    /// # Safety
    /// The range is mapped and not used again.
    pub(crate) unsafe fn unmap(&self, ptr: u64, size: usize) -> Result<(), RocmError> {
        let vmm = self.vmm("hipMemUnmap")?;
        // SAFETY: the caller gives up the mapping.
        self.check("hipMemUnmap", unsafe { (vmm.unmap)(ptr as *mut c_void, size) })
    }

    /// Gives back a reservation.
    ///
    /// # Safety
    /// `[ptr, ptr+size)` is a reservation from [`Hip::address_reserve`] with nothing mapped in it any more.
    pub(crate) unsafe fn address_free(&self, ptr: u64, size: usize) -> Result<(), RocmError> {
        let vmm = self.vmm("hipMemAddressFree")?;
        // SAFETY: the caller gives up the reservation.
        self.check("hipMemAddressFree", unsafe { (vmm.address_free)(ptr as *mut c_void, size) })
    }

    /// Releases a physical allocation handle (the memory goes when its last mapping is unmapped).
    ///
    /// # Safety
    /// `handle` is live and not used again.
    pub(crate) unsafe fn release(&self, handle: VmmHandle) -> Result<(), RocmError> {
        let vmm = self.vmm("hipMemRelease")?;
        // SAFETY: the caller gives up the handle.
        self.check("hipMemRelease", unsafe { (vmm.release)(handle.as_ptr()) })
    }
}

/// Makes a device current for the calling thread and restores the previous one when dropped, so that a
/// call into this crate does not change the current device of an application thread (PyTorch relies on it).
pub(crate) struct DeviceGuard<'a> {
    hip: &'a Hip,
    previous: Option<i32>,
}

impl<'a> DeviceGuard<'a> {
    /// Switches the calling thread to `ordinal`.
    pub(crate) fn enter(hip: &'a Hip, ordinal: i32) -> Result<Self, RocmError> {
        let current = hip.get_device().ok();
        if current == Some(ordinal) {
            return Ok(DeviceGuard { hip, previous: None });
        }
        hip.set_device(ordinal)?;
        Ok(DeviceGuard { hip, previous: current })
    }
}

impl Drop for DeviceGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            if let Err(e) = self.hip.set_device(p) {
                tracing::warn!(device = p, error = %e, "could not restore the thread's current HIP device");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_a_typed_error_naming_libamdhip64() {
        let err = Hip::load(&["libamdhip64-not-here.so", "/nonexistent/libamdhip64.so"]).unwrap_err();
        match &err {
            RocmError::LibraryNotFound { tried } => {
                assert!(tried.contains("libamdhip64-not-here.so") && tried.contains("/nonexistent/libamdhip64.so"))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().starts_with("libamdhip64.so not found (no ROCm runtime on this machine)"));
    }

    #[test]
    fn a_library_without_hip_symbols_names_the_missing_symbol() {
        // libc loads everywhere this crate builds and has no HIP entry points.
        match Hip::load(&["libc.so.6"]) {
            Err(RocmError::MissingSymbol { library, symbol }) => {
                assert_eq!(library, "libc.so.6");
                assert_eq!(symbol, "hipGetDeviceCount");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_process_wide_runtime_loads_or_says_why() {
        match hip() {
            Ok(h) => assert!(h.library().contains("amdhip64")),
            Err(e) => assert!(e.to_string().contains("libamdhip64"), "{e}"),
        }
        // Loading is attempted once; the answer is stable.
        assert_eq!(hip().is_ok(), hip().is_ok());
    }
}
